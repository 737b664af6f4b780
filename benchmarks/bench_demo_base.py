"""What a demo-world base model costs to train: one training step (UNet + text encoder, batch 64, 16x16x4 latents,
AdamW on both) of candidate configurations, against the first world's (v1) in the same process.

The candidates differ where the demo world's base must bind words to places: cross-attention at 16x16 (where an
object is resolved) as well as 8x8 and 4x4, a wider text encoder, a wider UNet. The build's budget (3 hours on 2
CPU cores, base training about 2 of them) divided by a candidate's step time says how many steps it can train.

    python benchmarks/bench_demo_base.py              # CPU, the machine's threads
    python benchmarks/bench_demo_base.py --device cuda
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from common import header, interleaved
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from mole_diffusion.demo.build import BuildSettings, text_config, unet_config

CANDIDATES = {
    "v1: 32-64-64, attn 8+4, text 32": BuildSettings(),
    "32-64-64, attn 16+8+4, text 64": BuildSettings(unet_cross_attention=[True] * 3, text_width=64),
    "48-96-96, attn 16+8+4, text 64": BuildSettings(unet_channels=[48, 96, 96], unet_cross_attention=[True] * 3, text_width=64),
    "64-128-128, attn 8+4, text 64": BuildSettings(unet_channels=[64, 128, 128], text_width=64),
    "64-128-128, attn 16+8+4, text 64": BuildSettings(unet_channels=[64, 128, 128], unet_cross_attention=[True] * 3, text_width=64),
}


def training_step(settings: BuildSettings, batch: int, device: str):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(settings)).to(device).train()
    text = CLIPTextModel(CLIPTextConfig(**text_config(settings))).to(device).train()
    optimizer = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=1e-4)
    ids = torch.randint(0, 49408, (batch, 77), device=device)
    latents, noise = torch.randn(batch, 4, 16, 16, device=device), torch.randn(batch, 4, 16, 16, device=device)
    steps = torch.randint(0, 1000, (batch,), device=device)

    def step():
        prediction = unet(latents + noise, steps, encoder_hidden_states=text(ids).last_hidden_state).sample
        F.mse_loss(prediction, noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sizes = sum(p.numel() for p in unet.parameters()), sum(p.numel() for p in text.parameters())
    return step, sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    steps, sizes = {}, {}
    for name, settings in CANDIDATES.items():
        steps[name], sizes[name] = training_step(settings, args.batch, args.device)
    seconds = interleaved(steps, rounds=args.rounds, inner=1, device=args.device)
    reference = seconds[next(iter(CANDIDATES))]
    print(header(args.device))
    print(f"one base-training step, batch {args.batch}, 16x16x4 latents, 77 tokens")
    print(f"{'candidate':36} {'UNet M':>7} {'text M':>7} {'s/step':>7} {'x v1':>6} {'steps in 2 h':>12}")
    for name, (unet, text) in sizes.items():
        print(f"{name:36} {unet / 1e6:7.2f} {text / 1e6:7.2f} {seconds[name]:7.3f} {seconds[name] / reference:6.2f} "
              f"{int(7200 / seconds[name]):12d}")


if __name__ == "__main__":
    main()

"""UNet-step benchmark (issue 5, item 2): an SD-1.5-shaped UNet (random weights), batch 2 (CFG).

Variants: bare; MoLE with 3 rank-16 experts on attention q/k/v/out (block gates); MoLE with per-position
sigmoid gates (``mole_position``: weights (B, L, N) per token, METHOD.md section 8); the same 3 LoRAs through
diffusers' ``load_lora_adapter`` + ``set_adapters`` (unfused PEFT); MoLE with constant weights fused.
Prints median seconds a step, ratios to bare and to diffusers, and the FLOP count of each variant
(torch.utils.flop_counter) so the measured overhead can be set against the arithmetic one.

    python benchmarks/bench_unet.py                      # CPU: 32x32 latent
    python benchmarks/bench_unet.py --device cuda --dtype float16 --latent 64
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

from common import header, interleaved
from mole_diffusion.experts import Expert, LoRAWeights
from mole_diffusion.inject import inject_experts

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_experts(unet: UNet2DConditionModel, n: int, rank: int) -> list[Expert]:
    g = torch.Generator().manual_seed(0)
    experts = []
    for i in range(n):
        layers = {}
        for name, module in unet.named_modules():
            if name.endswith(TARGETS) and isinstance(module, torch.nn.Linear):
                down = torch.randn(rank, module.in_features, generator=g) * 0.01
                up = torch.randn(module.out_features, rank, generator=g) * 0.01
                layers[f"unet.{name}"] = LoRAWeights(down, up, 1.0)
        experts.append(Expert(f"e{i}", "random", layers))
    return experts


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), args.device
    print(header(device, dtype))
    print(f"SD-1.5-shaped UNet, batch 2, latent {args.latent}x{args.latent}, {args.experts} experts of rank {args.rank} on attention q/k/v/out")

    config = json.loads((Path(__file__).parent / "sd15_unet_config.json").read_text())
    torch.manual_seed(0)
    bare = UNet2DConditionModel(**config).to(device, dtype).eval()
    experts = random_experts(bare, args.experts, args.rank)

    mole = copy.deepcopy(bare)
    inject_experts({"unet": mole}, experts, "block")

    position = copy.deepcopy(bare)
    position_mole = inject_experts({"unet": position}, experts, "block", activation="sigmoid", per_position=True)
    with torch.no_grad():  # trained-looking gates: every position its own weights
        for gate in position_mole.gates.values():
            gate.weight.normal_(std=1.0)

    fused = copy.deepcopy(bare)
    fused_mole = inject_experts({"unet": fused}, experts, "block")
    fused_mole.set_experts([e.name for e in experts], [1.0 / args.experts] * args.experts)
    fused_mole.fuse()

    peft = copy.deepcopy(bare)
    for e in experts:
        state = {}
        for module, lora in e.layers.items():
            state[f"{module}.lora_A.weight"] = lora.down.to(dtype)
            state[f"{module}.lora_B.weight"] = lora.up.to(dtype)
        peft.load_lora_adapter(state, prefix="unet", adapter_name=e.name)
    peft.set_adapters([e.name for e in experts], [1.0 / args.experts] * args.experts)
    peft.to(device, dtype)

    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, args.latent, args.latent, generator=g).to(device, dtype)
    text = torch.randn(2, 77, 768, generator=g).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    models = {"bare": bare, "mole": mole, "mole_position": position, "diffusers": peft, "mole_fused": fused}

    with torch.inference_mode():
        flops = {}
        for name, model in models.items():
            with FlopCounterMode(display=False) as counter:
                model(sample, t, encoder_hidden_states=text)
            flops[name] = counter.get_total_flops()
        times = interleaved({n: (lambda m=m: m(sample, t, encoder_hidden_states=text)) for n, m in models.items()},
                            rounds=args.rounds, inner=1, device=device)

    print(f"{'variant':13s} {'s/step':>8s} {'it/s':>7s} {'x bare':>7s} {'x diffusers':>11s} {'GFLOP':>9s} {'FLOP x bare':>11s}")
    for name in models:
        print(f"{name:13s} {times[name]:8.3f} {1 / times[name]:7.2f} {times[name] / times['bare']:7.3f} "
              f"{times[name] / times['diffusers']:11.3f} {flops[name] / 1e9:9.1f} {flops[name] / flops['bare']:11.4f}")
    over, floor = times["mole"] / times["bare"] - 1, flops["mole"] / flops["bare"] - 1
    print(f"MoLE measured overhead {over:+.2%} vs FLOP overhead {floor:+.2%} (ratio {over / floor:.2f}; target <= 1.5)")


if __name__ == "__main__":
    main()

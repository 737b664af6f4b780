"""Denoiser-step benchmark, random weights.

``--family sd`` (default): an SD-1.5-shaped UNet, batch 2 (CFG). ``--family sdxl``: SDXL base's UNet
(sdxl_unet_config.json, 2.6 B parameters), batch 2 (CFG), 77 prompt tokens of 2048 and SDXL's added conditions
(pooled text 1280, six size/crop ids). ``--family flux``: FLUX.1's transformer (flux1_transformer_config.json),
batch 1 (guidance-distilled: no CFG), the latent packed 2x2 into tokens; on CPU ``--layers`` defaults to 2 double
+ 4 single blocks at full width (FLUX.1 has 19 + 38, about 12 B parameters), on CUDA to the full model.
``--latent`` is the VAE latent's side for every family (pixels / 8).

Variants: bare; MoLE with 3 rank-16 experts (block gates, untrained) on attention q/k/v/out (Flux: also the
double blocks' add_q/k/v_proj and to_add_out, and the single blocks' proj_out); SD only: MoLE with
per-position sigmoid gates (``mole_position``: weights (B, L, N) per token, docs/method.md); the same 3
LoRAs through diffusers' ``load_lora_adapter`` + ``set_adapters`` (unfused PEFT); MoLE with constant weights
fused. Prints median seconds a step, ratios to bare and to diffusers, and the FLOP count of each variant
(torch.utils.flop_counter) so the measured overhead can be set against the arithmetic one.
The variants share the bare model's weights (the fused one has its own adapted weights), so SDXL and Flux
fit in memory four times over.

    python benchmarks/bench_unet.py                      # CPU: 32x32 latent
    python benchmarks/bench_unet.py --device cuda --dtype float16 --latent 64
    python benchmarks/bench_unet.py --family sdxl --rounds 5                # CPU: 32x32 latent (256 px)
    python benchmarks/bench_unet.py --family sdxl --device cuda --dtype float16 --latent 128
    python benchmarks/bench_unet.py --family flux --rounds 5                # CPU: 2 + 4 blocks, 256 px
    python benchmarks/bench_unet.py --family flux --device cuda --dtype bfloat16 --latent 128
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
from diffusers import FluxTransformer2DModel, UNet2DConditionModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common import header, interleaved
from mole_diffusion.config import GateConfig
from mole_diffusion.experts import Expert, LoRAWeights
from mole_diffusion.inject import MoLE, inject_experts

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
FLUX_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "proj_out")
FLUX_BLOCKS = ("transformer_blocks.", "single_transformer_blocks.")  # not the model's own final proj_out
CONFIGS = Path(__file__).parent


def random_experts(unet: nn.Module, n: int, rank: int, component: str = "unet", targets: tuple[str, ...] = TARGETS,
                   within: tuple[str, ...] = ("",)) -> list[Expert]:
    """N random rank-``rank`` experts on every Linear whose name ends with one of ``targets`` (and starts with
    one of ``within``), keyed ``<component>.<module>``."""
    g = torch.Generator().manual_seed(0)
    experts = []
    for i in range(n):
        layers = {}
        for name, module in unet.named_modules():
            if name.endswith(targets) and name.startswith(within) and isinstance(module, torch.nn.Linear):
                down = torch.randn(rank, module.in_features, generator=g) * 0.01
                up = torch.randn(module.out_features, rank, generator=g) * 0.01
                layers[f"{component}.{name}"] = LoRAWeights(down, up, 1.0)
        experts.append(Expert(f"e{i}", "random", layers))
    return experts


def shared_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are the model's own tensors: adapters wrap modules without
    writing their weights (``fuse_fresh`` assigns new ones), so the variants can share one set of weights."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


@torch.no_grad()
def fuse_fresh(mole: MoLE) -> None:
    """What ``MoLE.fuse()`` leaves for the forward pass (each base weight plus its constant-weight delta, the
    layer marked fused), written into a new tensor rather than in place and without fuse()'s CPU copy for
    ``unfuse``: the base weights are shared with the bare model, and SDXL's adapted weights are 3.8 GB."""
    for layer in mole.layers.values():
        base = layer.base_layer
        base.weight = nn.Parameter(base.weight + layer.constant_delta_weight().to(base.weight.dtype), requires_grad=False)
        layer.fused = True
    mole.fused = True


def build(args, device: str, dtype: torch.dtype):
    """(description, bare model, component name, experts, forward kwargs) for ``args.family``."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    side = args.latent
    if args.family in ("sd", "sdxl"):
        config = json.loads((CONFIGS / f"{'sd15' if args.family == 'sd' else 'sdxl'}_unet_config.json").read_text())
        with torch.device(device):
            bare = UNet2DConditionModel(**config).to(dtype).eval()
        experts = random_experts(bare, args.experts, args.rank)
        kwargs = dict(sample=torch.randn(2, 4, side, side, generator=g).to(device, dtype),
                      timestep=torch.tensor([500, 500], device=device),
                      encoder_hidden_states=torch.randn(2, 77, config["cross_attention_dim"], generator=g).to(device, dtype))
        if args.family == "sd":
            what = f"SD-1.5-shaped UNet, batch 2, latent {side}x{side}"
        else:
            kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280, generator=g).to(device, dtype),
                                           "time_ids": torch.tensor([[side * 8, side * 8, 0, 0, side * 8, side * 8]] * 2,
                                                                    device=device, dtype=dtype)}
            what = (f"SDXL-shaped UNet ({sum(p.numel() for p in bare.parameters()) / 1e9:.2f} B parameters), batch 2, "
                    f"latent {side}x{side} ({side * 8} px), 77 prompt tokens of 2048 + pooled 1280 + 6 time ids")
        return what + f", {args.experts} experts of rank {args.rank} on attention q/k/v/out", bare, "unet", experts, kwargs

    config = json.loads((CONFIGS / "flux1_transformer_config.json").read_text())
    full = (config["num_layers"], config["num_single_layers"])
    layers = tuple(args.layers) if args.layers else (full if device.startswith("cuda") else (2, 4))
    config["num_layers"], config["num_single_layers"] = layers
    with torch.device(device):
        bare = FluxTransformer2DModel(**config).to(dtype).eval()
    experts = random_experts(bare, args.experts, args.rank, "transformer", FLUX_TARGETS, FLUX_BLOCKS)
    text = args.text_tokens or (512 if device.startswith("cuda") else 128)
    h = side // 2  # the pipeline packs 2x2 latent patches (16 channels) into one 64-channel token
    image_ids = torch.zeros(h, h, 3)
    image_ids[..., 1] += torch.arange(h)[:, None]
    image_ids[..., 2] += torch.arange(h)[None, :]
    kwargs = dict(hidden_states=torch.randn(1, h * h, config["in_channels"], generator=g).to(device, dtype),
                  encoder_hidden_states=torch.randn(1, text, config["joint_attention_dim"], generator=g).to(device, dtype),
                  pooled_projections=torch.randn(1, config["pooled_projection_dim"], generator=g).to(device, dtype),
                  timestep=torch.tensor([0.5], device=device, dtype=dtype),
                  img_ids=image_ids.reshape(h * h, 3).to(device, dtype),
                  txt_ids=torch.zeros(text, 3, device=device, dtype=dtype),
                  guidance=torch.tensor([3.5], device=device, dtype=dtype))
    reduced = "" if layers == full else f" (FLUX.1 has {full[0]} + {full[1]}; reduced{' for CPU' if device == 'cpu' else ''})"
    width = config["num_attention_heads"] * config["attention_head_dim"]
    what = (f"FLUX.1-shaped transformer, {layers[0]} double + {layers[1]} single blocks{reduced}, width {width}, "
            f"{sum(p.numel() for p in bare.parameters()) / 1e9:.2f} B parameters, batch 1, latent {side}x{side} "
            f"({side * 8} px) = {h}x{h} packed image tokens + {text} text tokens of {config['joint_attention_dim']}, "
            f"{args.experts} experts of rank {args.rank} on attention q/k/v/out, add_q/k/v, to_add_out, single proj_out")
    return what, bare, "transformer", experts, kwargs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", choices=("sd", "sdxl", "flux"), default="sd")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--latent", type=int, default=32, help="the VAE latent's side (pixels / 8)")
    parser.add_argument("--layers", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"), default=None,
                        help="flux: double and single blocks (default 2 4 on CPU, FLUX.1's 19 38 on CUDA)")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="flux: T5 prompt tokens (default 128 on CPU, 512 on CUDA)")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), args.device
    print(header(device, dtype))
    what, bare, component, experts, kwargs = build(args, device, dtype)
    print(what)
    names = [e.name for e in experts]

    mole = shared_copy(bare)
    inject_experts({component: mole}, experts)

    models = {"bare": bare, "mole": mole}
    if args.family == "sd":
        position = shared_copy(bare)
        position_mole = inject_experts({"unet": position}, experts, GateConfig(activation="sigmoid", per_position=True))
        with torch.no_grad():  # trained-looking gates: every position its own weights
            for gate in position_mole.gates.values():
                gate.weight.normal_(std=1.0)
        models["mole_position"] = position

    peft = shared_copy(bare)
    for e in experts:
        state = {}
        for module, lora in e.layers.items():
            state[f"{module}.lora_A.weight"] = lora.down.to(dtype)
            state[f"{module}.lora_B.weight"] = lora.up.to(dtype)
        peft.load_lora_adapter(state, prefix=component, adapter_name=e.name)
    peft.set_adapters(names, [1.0 / args.experts] * args.experts)
    peft.to(device, dtype)
    models["diffusers"] = peft

    fused = shared_copy(bare)
    fused_mole = inject_experts({component: fused}, experts)
    fused_mole.set_experts(names, [1.0 / args.experts] * args.experts)
    fuse_fresh(fused_mole)
    models["mole_fused"] = fused

    with torch.inference_mode():
        flops = {}
        for name, model in models.items():
            with FlopCounterMode(display=False) as counter:
                model(**kwargs)
            flops[name] = counter.get_total_flops()
        times = interleaved({n: (lambda m=m: m(**kwargs)) for n, m in models.items()},
                            rounds=args.rounds, inner=1, device=device)

    print(f"{'variant':13s} {'s/step':>8s} {'it/s':>7s} {'x bare':>7s} {'x diffusers':>11s} {'GFLOP':>9s} {'FLOP x bare':>11s}")
    for name in models:
        print(f"{name:13s} {times[name]:8.3f} {1 / times[name]:7.2f} {times[name] / times['bare']:7.3f} "
              f"{times[name] / times['diffusers']:11.3f} {flops[name] / 1e9:9.1f} {flops[name] / flops['bare']:11.4f}")
    over, floor = times["mole"] / times["bare"] - 1, flops["mole"] / flops["bare"] - 1
    print(f"MoLE measured overhead {over:+.2%} vs FLOP overhead {floor:+.2%} (ratio {over / floor:.2f}; target <= 1.5)")


if __name__ == "__main__":
    main()

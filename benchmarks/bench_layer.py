"""Layer benchmark (issue 5, item 1): one adapted Linear at SD shapes, N rank-16 experts.

Variants: the plain Linear; MoLE (gated, concatenated product: MoLELayer); MoLE with per-position weights
(``mole_pos``: a (B, N, h, w) map, the rank-space scale per token); PEFT with N active adapters;
a naive per-expert Python loop. Prints median ms and each variant's ratio to the plain Linear, beside the
FLOP floor ((d_in*d_out + N*r*(d_in+d_out)) / (d_in*d_out)).

    python benchmarks/bench_layer.py [--device cuda --dtype float16] [--experts 1 2 3 4 8]
"""

from __future__ import annotations

import argparse

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from common import header, interleaved
from mole_diffusion import Gate, MoLELayer

SHAPES = [("unet 64x64 latent, 320 ch", 4096, 320), ("unet 32x32 latent, 640 ch", 1024, 640),
          ("unet 16x16 latent, 1280 ch", 256, 1280), ("text 77 tokens, 768", 77, 768)]


class Holder(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear


def variants(tokens: int, width: int, n: int, rank: int, device: str, dtype: torch.dtype):
    x = torch.randn(2, tokens, width, device=device, dtype=dtype)
    base = nn.Linear(width, width).to(device, dtype)
    downs = [torch.randn(rank, width, device=device, dtype=dtype) * 0.01 for _ in range(n)]
    ups = [torch.randn(width, rank, device=device, dtype=dtype) * 0.01 for _ in range(n)]
    gate = Gate(n, width).to(device)
    gate.weights = torch.softmax(torch.randn(2, n, device=device), -1)
    mole = MoLELayer(base, torch.cat(downs), torch.cat(ups, 1), torch.arange(n).repeat_interleave(rank),
                     torch.ones(n * rank), gate)

    peft_model = Holder(nn.Linear(width, width).to(device, dtype))
    for i in range(n):
        peft_model = inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=["proj"]), peft_model, adapter_name=f"e{i}")
    peft_model.to(device, dtype)
    peft_model.proj.set_adapter([f"e{i}" for i in range(n)])

    def loop():
        y = base(x)
        for i in range(n):
            y = y + gate.weights[:, i, None, None].to(dtype) * ((x @ downs[i].T) @ ups[i].T)
        return y

    side = int(tokens**0.5)
    position_gate = Gate(n, width).to(device)
    position_gate.weights = gate.weights
    if side * side == tokens:  # image tokens (the text's 77 have no grid)
        position_gate.position_weights = torch.rand(2, n, side, side, device=device)
    positional = MoLELayer(base, torch.cat(downs), torch.cat(ups, 1), torch.arange(n).repeat_interleave(rank),
                           torch.ones(n * rank), position_gate)
    return {"linear": lambda: base(x), "mole": lambda: mole(x), "mole_pos": lambda: positional(x),
            "peft": lambda: peft_model.proj(x), "loop": loop}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    print(header(args.device, dtype))
    print(f"{'shape':28s} {'N':>2s} {'linear ms':>9s} {'mole':>6s} {'mole_pos':>8s} {'peft':>6s} {'loop':>6s} {'floor':>6s}  (ratios to linear)")
    with torch.inference_mode():
        for label, tokens, width in SHAPES:
            for n in args.experts:
                t = interleaved(variants(tokens, width, n, args.rank, args.device, dtype), rounds=args.rounds, device=args.device)
                floor = 1 + n * args.rank * 2 * width / (width * width)
                print(f"{label:28s} {n:2d} {t['linear'] * 1e3:9.2f} {t['mole'] / t['linear']:6.2f} {t['mole_pos'] / t['linear']:8.2f} "
                      f"{t['peft'] / t['linear']:6.2f} {t['loop'] / t['linear']:6.2f} {floor:6.3f}")


if __name__ == "__main__":
    main()

"""Layer benchmark (issue 5, item 1): one adapted Linear at SD shapes, N rank-16 experts.

Variants: the plain Linear; MoLE (gated, concatenated product: MoLELayer); MoLE with per-position weights
(``mole_pos``: a (B, N, h, w) map, the rank-space scale per token); PEFT with N active adapters;
a naive per-expert Python loop. Prints median ms and each variant's ratio to the plain Linear, beside the
FLOP floor ((d_in*d_out + N*r*(d_in+d_out)) / (d_in*d_out)).

``--shapes flux`` (issue 13): FLUX.1's widths instead, batch 1 (no CFG): the image tokens x 3072 (attention
q/k/v/out), x 3072 -> 12288 (the MLP's up projection, ff.net.0.proj / proj_mlp), and the 512 T5 tokens x 3072
(the double blocks' text stream). A 1024 px image is 64x64 = 4096 packed tokens; on CPU the default is 1024
(a 512 px image) to keep the run short, said in the header (``--flux-tokens`` sets it).

    python benchmarks/bench_layer.py [--device cuda --dtype float16] [--experts 1 2 3 4 8]
    python benchmarks/bench_layer.py --shapes flux --experts 3 [--device cuda --dtype bfloat16]
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


def flux_shapes(image_tokens: int) -> list[tuple[str, int, int, int]]:
    """(label, tokens, d_in, d_out) at FLUX.1's hidden size 3072 and MLP width 12288."""
    side = int(image_tokens**0.5)
    grid = f"{side}x{side}" if side * side == image_tokens else str(image_tokens)
    return [(f"flux {grid} tok, 3072", image_tokens, 3072, 3072),
            (f"flux {grid} tok, 3072>12288", image_tokens, 3072, 12288),
            ("flux text 512 tok, 3072", 512, 3072, 3072)]


class Holder(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.proj = linear


def variants(tokens: int, width: int, n: int, rank: int, device: str, dtype: torch.dtype,
             width_out: int | None = None, batch: int = 2):
    width_out = width if width_out is None else width_out
    x = torch.randn(batch, tokens, width, device=device, dtype=dtype)
    base = nn.Linear(width, width_out).to(device, dtype)
    downs = [torch.randn(rank, width, device=device, dtype=dtype) * 0.01 for _ in range(n)]
    ups = [torch.randn(width_out, rank, device=device, dtype=dtype) * 0.01 for _ in range(n)]
    gate = Gate(n, width).to(device)
    gate.weights = torch.softmax(torch.randn(batch, n, device=device), -1)
    mole = MoLELayer(base, torch.cat(downs), torch.cat(ups, 1), torch.arange(n).repeat_interleave(rank),
                     torch.ones(n * rank), gate)

    peft_model = Holder(nn.Linear(width, width_out).to(device, dtype))
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
        position_gate.position_weights = torch.rand(batch, n, side, side, device=device)
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
    parser.add_argument("--shapes", choices=("sd", "flux", "all"), default="sd",
                        help="sd: the SD-1.5 rows (batch 2); flux: FLUX.1's widths (batch 1); all: both")
    parser.add_argument("--flux-tokens", type=int, default=None,
                        help="image tokens of the flux rows (default 4096, a 1024 px image; 1024 on CPU)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    flux_tokens = args.flux_tokens or (1024 if args.device == "cpu" else 4096)
    shapes = [(label, tokens, width, width, 2) for label, tokens, width in SHAPES] if args.shapes != "flux" else []
    if args.shapes != "sd":
        shapes += [(*shape, 1) for shape in flux_shapes(flux_tokens)]
    print(header(args.device, dtype))
    if args.shapes != "sd":
        note = " (fewer, to keep the CPU run short)" if flux_tokens < 4096 else ""
        print(f"# flux rows: batch 1, {flux_tokens} image tokens{note}; a 1024 px FLUX.1 image is 64x64 = 4096")
    print(f"{'shape':28s} {'N':>2s} {'linear ms':>9s} {'mole':>6s} {'mole_pos':>8s} {'peft':>6s} {'loop':>6s} {'floor':>6s}  (ratios to linear)")
    with torch.inference_mode():
        for label, tokens, width, width_out, batch in shapes:
            for n in args.experts:
                t = interleaved(variants(tokens, width, n, args.rank, args.device, dtype, width_out, batch),
                                rounds=args.rounds, device=args.device)
                floor = 1 + n * args.rank * (width + width_out) / (width * width_out)
                print(f"{label:28s} {n:2d} {t['linear'] * 1e3:9.2f} {t['mole'] / t['linear']:6.2f} {t['mole_pos'] / t['linear']:8.2f} "
                      f"{t['peft'] / t['linear']:6.2f} {t['loop'] / t['linear']:6.2f} {floor:6.3f}")


if __name__ == "__main__":
    main()

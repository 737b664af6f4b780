"""Layer benchmark: one adapted Linear at SD shapes, N rank-16 experts.

Variants: the plain Linear; MoLE (gated, concatenated product: MoLELayer); MoLE with per-position weights
(``mole_pos``: a (B, N, h, w) map, the rank-space scale per token); PEFT with N active adapters;
a naive per-expert Python loop. Prints median ms and each variant's ratio to the plain Linear, beside the
FLOP floor ((d_in*d_out + N*r*(d_in+d_out)) / (d_in*d_out)).

``--shapes flux``: FLUX.1's widths instead, batch 1 (no CFG): the image tokens x 3072 (attention
q/k/v/out), x 3072 -> 12288 (the MLP's up projection, ff.net.0.proj / proj_mlp), and the 512 T5 tokens x 3072
(the double blocks' text stream). A 1024 px image is 64x64 = 4096 packed tokens; on CPU the default is 1024
(a 512 px image) to keep the run short, said in the header (``--flux-tokens`` sets it).

    python benchmarks/bench_layer.py [--device cuda --dtype float16] [--experts 1 2 3 4 8]
    python benchmarks/bench_layer.py --shapes flux --experts 3 [--device cuda --dtype bfloat16]
    python benchmarks/bench_layer.py --lycoris

``--lycoris``: one expert per row at the SD shapes, as MoLE reads it: a LoRA of rank 16, a LoHa of two rank-4
pairs and a LoKr (factor 8, W2 of rank 2), which load as the LoRA pairs they equal (rank 4 * 4 = 16 and
rank(W1) * 2 = 16), beside PEFT's LoHa layer, which rebuilds the dense delta (B1 A1) * (B2 A2) on every call.
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


def lycoris_variants(tokens: int, width: int, device: str, dtype: torch.dtype, batch: int = 2):
    """One expert: LoRA rank 16, LoHa 4 x 4 and LoKr converted to LoRA pairs (mole_diffusion.lycoris), PEFT's LoHa."""
    from peft import LoHaConfig

    from mole_diffusion.lycoris import lycoris_to_lora

    x = torch.randn(batch, tokens, width, device=device, dtype=dtype)
    base = nn.Linear(width, width).to(device, dtype)
    small = 8  # LoKr: W1 (8 x 8, full), W2 (width/8 x width/8) of rank 2
    files = {"lora": {"m.lora_down.weight": torch.randn(16, width), "m.lora_up.weight": torch.randn(width, 16)},
             "loha": {f"m.hada_w{i}_{ab}": torch.randn(*((width, 4) if ab == "a" else (4, width))) for i in (1, 2) for ab in "ab"},
             "lokr": {"m.lokr_w1": torch.randn(small, small), "m.lokr_w2_a": torch.randn(width // small, 2),
                      "m.lokr_w2_b": torch.randn(2, width // small)}}
    layers = {}
    for name, tensors in files.items():
        pair = lycoris_to_lora({**tensors, "m.alpha": torch.tensor(1.0)}, name)
        down, up = pair["m.lora_down.weight"] * 0.01, pair["m.lora_up.weight"] * 0.01
        gate = Gate(1, width).to(device)
        gate.weights = torch.ones(batch, 1, device=device)
        layers[name] = MoLELayer(base, down, up, torch.zeros(down.shape[0], dtype=torch.long), torch.ones(down.shape[0]), gate)
    peft_model = inject_adapter_in_model(LoHaConfig(r=4, alpha=4, target_modules=["proj"]), Holder(nn.Linear(width, width)))
    peft_model.to(device, dtype)
    ranks = {name: layer.lora_A.shape[0] for name, layer in layers.items()}
    return {"linear": lambda: base(x), **{name: (lambda layer=layer: layer(x)) for name, layer in layers.items()},
            "peft_loha": lambda: peft_model.proj(x)}, ranks


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
    parser.add_argument("--lycoris", action="store_true", help="LoHa and LoKr experts against a LoRA of the same rank")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.lycoris:
        print(header(args.device, dtype))
        print(f"{'shape':28s} {'linear ms':>9s} {'lora':>6s} {'loha':>6s} {'lokr':>6s} {'peft_loha':>9s}  (ratios to linear; "
              "converted ranks below)")
        with torch.inference_mode():
            for label, tokens, width in SHAPES[:3]:
                fns, ranks = lycoris_variants(tokens, width, args.device, dtype)
                t = interleaved(fns, rounds=args.rounds, device=args.device)
                print(f"{label:28s} {t['linear'] * 1e3:9.2f} {t['lora'] / t['linear']:6.2f} {t['loha'] / t['linear']:6.2f} "
                      f"{t['lokr'] / t['linear']:6.2f} {t['peft_loha'] / t['linear']:9.2f}   ranks {ranks}")
        return
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

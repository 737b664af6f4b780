"""Loading benchmark: read N LoRA files and attach them to an SD-1.5-shaped UNet.

- mole: ``load_expert`` for each file (diffusers' key conversion + every shape checked) and ``inject_experts``;
- diffusers: ``unet.load_lora_adapter(file, adapter_name=...)`` N times, then ``set_adapters``.
Files are rank-16 LoRAs on attention q/k/v/out in diffusers layout, written once to a temporary folder. Each
round times both variants (interleaved), then takes the experts/adapters off again, untimed.

    python benchmarks/bench_load.py --experts 1 3 8
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_unet import random_experts
from common import header
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from mole_diffusion.experts import load_expert
from mole_diffusion.inject import inject_experts


def write_files(unet, n: int, rank: int, folder: Path) -> list[Path]:
    paths = []
    for i, expert in enumerate(random_experts(unet, n, rank)):
        layers = {}
        for module, lora in expert.layers.items():
            name = module.removeprefix("unet.")
            layers[f"{name}.lora_A.weight"] = lora.down
            layers[f"{name}.lora_B.weight"] = lora.up
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=f"e{i}.safetensors")
        paths.append(folder / f"e{i}.safetensors")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 3, 8])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    print(header())
    print(f"SD-1.5-shaped UNet; N rank-{args.rank} LoRA files (attention q/k/v/out, diffusers layout) read and attached")

    config = json.loads((Path(__file__).parent / "sd15_unet_config.json").read_text())
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config).eval()
    peft_unet = copy.deepcopy(unet)  # delete_adapters leaves PEFT wrapper layers behind
    print(f"{'N':>3s} {'mole s':>8s} {'diffusers s':>12s} {'mole x diffusers':>17s}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.experts:
            folder = Path(tmp) / f"n{n}"
            paths = write_files(unet, n, args.rank, folder)
            names = [p.stem for p in paths]
            times = {"mole": [], "diffusers": []}
            for _ in range(args.rounds + 1):  # the first round warms up caches
                start = time.perf_counter()
                mole = inject_experts({"unet": unet}, [load_expert(p.stem, p, {"unet": unet}) for p in paths])
                times["mole"].append(time.perf_counter() - start)
                mole.remove()

                start = time.perf_counter()
                for p in paths:
                    peft_unet.load_lora_adapter(str(p), prefix="unet", adapter_name=p.stem)
                peft_unet.set_adapters(names, [1.0 / n] * n)
                times["diffusers"].append(time.perf_counter() - start)
                peft_unet.delete_adapters(names)
            mole_s, diffusers_s = (statistics.median(times[k][1:]) for k in ("mole", "diffusers"))
            print(f"{n:3d} {mole_s:8.3f} {diffusers_s:12.3f} {mole_s / diffusers_s:17.3f}")


if __name__ == "__main__":
    main()

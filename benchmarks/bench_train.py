"""Training-step benchmark: one gate-training step against one single-LoRA
DreamBooth step (PEFT), on the same SD-1.5-shaped UNet (random weights), same batch, same latent size.

- gates: MoLE with 3 rank-16 experts on attention q/k/v/out, block gates trainable, loss = denoising
  + 0.5 * balance (what ``train_gates`` computes), AdamW on the gates.
- lora: one rank-16 PEFT LoRA on the same modules, trainable, denoising loss, AdamW on the LoRA.
Both backpropagate through the whole frozen UNet (the first trainable tensor sits in the first block).

Memory: on CUDA the peak allocated bytes of a step above the model's own. On CPU, where torch keeps no
allocator statistics, the bytes a step adds: tensors saved for backward (deduplicated by storage) plus
gradients and optimizer state of the trainable parameters.

    python benchmarks/bench_train.py                      # CPU: 32x32 latent, batch 2
    python benchmarks/bench_train.py --device cuda --dtype float16 --latent 64
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_unet import TARGETS, random_experts
from common import header, interleaved
from diffusers import UNet2DConditionModel
from peft import LoraConfig

from mole_diffusion.gates import balance_loss
from mole_diffusion.inject import inject_experts


def make_step(unet, params, extra_loss, sample, t, text, noise):
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        prediction = unet(sample, t, encoder_hidden_states=text).sample
        loss = F.mse_loss(prediction.float(), noise.float()) + extra_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, optimizer


def cpu_step_bytes(step, params, optimizer) -> int:
    """Saved-for-backward bytes of one forward (deduplicated by storage) + grads + optimizer state."""
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step()
    grads = sum(p.numel() * p.element_size() for p in params)
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return sum(seen.values()) + grads + state


def cuda_step_bytes(step, device) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - before


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    dtype, device = getattr(torch, args.dtype), args.device
    print(header(device, dtype))
    print(f"SD-1.5-shaped UNet, batch {args.batch}, latent {args.latent}x{args.latent}: gate training ({args.experts} experts "
          f"of rank {args.rank}, block gates) vs single-LoRA DreamBooth (rank {args.rank}), attention q/k/v/out")

    config = json.loads((Path(__file__).parent / "sd15_unet_config.json").read_text())
    torch.manual_seed(0)
    bare = UNet2DConditionModel(**config).requires_grad_(False)
    if dtype != torch.float32:  # trainable tensors are set back to fp32 below, as the trainers do
        bare.to(dtype=dtype)
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(args.batch, 4, args.latent, args.latent, generator=g).to(device, dtype)
    noise = torch.randn(args.batch, 4, args.latent, args.latent, generator=g).to(device, dtype)
    text = torch.randn(args.batch, 77, 768, generator=g).to(device, dtype)
    t = torch.full((args.batch,), 500, device=device)

    gated = copy.deepcopy(bare)
    mole = inject_experts({"unet": gated}, random_experts(bare, args.experts, args.rank))
    gated.to(device)
    gate_params = mole.gate_parameters()
    for p in gate_params:
        p.data = p.data.float()
        p.requires_grad_(True)

    coverage = mole.gate_coverage()

    def balance():
        return 0.5 * balance_loss([gate.weights for gate in mole.gates.values()], coverage)

    lora = copy.deepcopy(bare)
    lora.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=list(TARGETS)))
    lora.to(device)
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    for p in lora_params:
        p.data = p.data.float()

    steps = {
        "lora": make_step(lora, lora_params, lambda: 0.0, sample, t, text, noise),
        "gates": make_step(gated, gate_params, balance, sample, t, text, noise),
    }
    params = {"lora": lora_params, "gates": gate_params}
    with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
        times = interleaved({name: fn for name, (fn, _) in steps.items()}, rounds=args.rounds, inner=1, device=device)
        if device.startswith("cuda"):
            memory = {name: cuda_step_bytes(fn, device) for name, (fn, _) in steps.items()}
        else:
            memory = {name: cpu_step_bytes(fn, params[name], opt) for name, (fn, opt) in steps.items()}

    print(f"{'variant':8s} {'s/step':>8s} {'x lora':>7s} {'trainable':>10s} {'step MiB':>9s} {'mem x lora':>10s}")
    for name in steps:
        trainable = sum(p.numel() for p in params[name])
        print(f"{name:8s} {times[name]:8.3f} {times[name] / times['lora']:7.3f} {trainable:10d} "
              f"{memory[name] / 2**20:9.1f} {memory[name] / memory['lora']:10.3f}")
    print(f"gate step {times['gates'] / times['lora']:.3f}x the LoRA step (target <= 1.15), "
          f"memory {memory['gates'] / memory['lora']:.3f}x (target <= 1.10)")


if __name__ == "__main__":
    main()

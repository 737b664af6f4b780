"""Shared by the benchmarks: interleaved timing with medians, and a header naming the machine."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def header(device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "-"
    return (
        f"# {time.strftime('%Y-%m-%d')} | {platform.processor() or platform.machine()} | torch {torch.__version__} | "
        f"threads {torch.get_num_threads()} | device {device} ({gpu}) | dtype {str(dtype).removeprefix('torch.')}"
    )


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], object]], rounds: int = 9, inner: int = 3, device: str = "cpu") -> dict[str, float]:
    """Median seconds per call of each variant, timed round-robin so drift hits all variants alike."""
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            _sync(device)
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(t) for name, t in times.items()}

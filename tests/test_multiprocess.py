"""Gate training under `accelerate launch` with two CPU processes (gloo) on the tiny checkpoint: it ends with
the gates of one process with the same (global) batch, and a two-process run resumed from a checkpoint ends
with the gates of an uninterrupted one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port
from safetensors.torch import load_file

from mole_diffusion.cli import main
from mole_diffusion.errors import MoLEError
from mole_diffusion.gates import Gate
from mole_diffusion.train import TrainingSettings, common




def launch_two_processes(args: list[str]) -> subprocess.CompletedProcess:
    """``accelerate launch`` the CLI on two CPU processes. ``--cpu`` would start only one (accelerate needs
    mpirun for more); ``--multi_gpu`` with ACCELERATE_USE_CPU=1 starts two, joined by gloo."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "-m", "mole_diffusion.cli", *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "training on 2 processes, 1 of the 2 examples" in result.stdout  # really two, joined
    assert result.stdout.count("wrote ") == 1  # the main process reports, once
    return result


def losses(folder: Path) -> list[float]:
    return [row["loss"] for row in map(json.loads, (folder / "log.jsonl").read_text().splitlines())]


def test_two_processes_train_the_gates_of_one_and_resume(world, concepts_file, tmp_path):
    args = ["train-gates", "--base", str(world["base"]), "--concepts", str(concepts_file), "--resolution", "32",
            "--steps", "4", "--batch-size", "2", "--learning-rate", "5e-2", "--checkpoint-every", "2",
            "--validation-every", "4", "--validation-steps", "1", "--validation-seeds", "0"]
    launch_two_processes([*args, "--out", str(tmp_path / "two")])
    assert main([*args, "--out", str(tmp_path / "one")]) == 0  # one process, the same global batch of 2

    two, one = load_file(tmp_path / "two" / "gates.safetensors"), load_file(tmp_path / "one" / "gates.safetensors")
    assert two.keys() == one.keys()
    # the gates moved far from their start (weights 0, biases 0, log temperatures 0) ...
    assert max(t.abs().max().item() for t in one.values()) > 0.1
    for key in one:  # ... and the two runs agree to float rounding (per-process samples: 5e-2 off)
        # rounding: the gradients are summed in another order (two halves, thread counts differ), which Adam,
        # normalising, lets reach ~1e-4 in 4 steps; every breakage tried (own samples per process, no averaging,
        # local balance loss) is 4e-2 or more off
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=5e-4, msg=lambda m: f"{key}: {m}")
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)  # logged: the global batch's
    checkpoints = tmp_path / "two" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002", "step-000004"]  # written once, no .tmp left

    # a two-process run stopped after step 3 (its last checkpoint step 2, its log ahead of it), then resumed
    shutil.copytree(tmp_path / "two", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-000004")
    (tmp_path / "resumed" / "gates.safetensors").unlink()
    rows = (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
    (tmp_path / "resumed" / "log.jsonl").write_text("\n".join(rows[:3]) + "\n")
    result = launch_two_processes([*args, "--out", str(tmp_path / "resumed"), "--resume"])
    assert "resuming from" in result.stdout and "step 2" in result.stdout
    resumed = load_file(tmp_path / "resumed" / "gates.safetensors")
    for key in two:
        torch.testing.assert_close(resumed[key], two[key], rtol=0, atol=1e-6, msg=lambda m: f"{key}: {m}")
    assert losses(tmp_path / "resumed") == pytest.approx(losses(tmp_path / "two"), rel=1e-6)


def test_a_batch_that_does_not_split_over_the_processes_is_refused():
    settings = TrainingSettings(output_dir=Path("unused"), batch_size=3)
    assert common.local_batch_size(settings, 1) == 3
    with pytest.raises(MoLEError, match="--batch-size 3 is the global batch .* multiple of 2"):
        common.local_batch_size(settings, 2)


def test_launches_that_would_not_train_together_are_named(tmp_path, monkeypatch, capsys):
    for name in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "MASTER_PORT", "ACCELERATE_USE_CPU"):
        monkeypatch.delenv(name, raising=False)
    # several processes launched (torchrun sets WORLD_SIZE) that accelerate did not join: each would train alone
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MoLEError, match="2 processes were launched but accelerate runs each alone .*ACCELERATE_USE_CPU=1"):
        common.make_accelerator(TrainingSettings(output_dir=tmp_path))
    # `accelerate launch --cpu --num_processes 2`: the rendezvous port is set, but only this one process runs
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.setenv("MASTER_PORT", "29500")
    common.make_accelerator(TrainingSettings(output_dir=tmp_path))
    assert "started one process" in capsys.readouterr().out


@pytest.mark.parametrize("experts", [2, 3])
def test_an_untrained_gate_gives_its_temperature_no_gradient(experts):
    """At the start the temperature has no effect on a uniform gate (all logits equal), so its gradient must be
    exactly 0: float noise there becomes a full-size first step under Adam, different for every batch split
    (logits log(1/N) gave ~1e-9 and two processes' gates 3e-2 apart)."""
    gate = Gate(experts, 16)
    g = torch.Generator().manual_seed(0)
    weights = gate(torch.randn(4, 7, 16, generator=g))
    torch.testing.assert_close(weights, torch.full((4, experts), 1 / experts), rtol=0, atol=0)  # still the prior
    (weights * torch.randn(weights.shape, generator=g)).sum().backward()
    assert gate.log_temperature.grad.item() == 0.0

"""What a person sees: the commands print no third-party load reports, warnings or extra progress bars on the demo
world, and the silencing (``mole_diffusion/quiet.py``) keeps the reports that are real problems."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mole_diffusion
from mole_diffusion.demo.run import ASSETS, demo_methods
from mole_diffusion.quiet import ADAPTER_REPORT_LOGGER, NO_KEYS_LOGGERS, quiet_adapter_loading, quiet_loading

ROOT = Path(mole_diffusion.__file__).parent.parent
# what a newcomer must not see: transformers' load reports, Python warnings (FutureWarning, UserWarning...),
# deprecation notices, loading bars, tracebacks
NOISE = ("LOAD REPORT", "MISSING", "newly initialized", "[transformers]", "Warning", "warnings.warn", "deprecated",
         "Loading pipeline components", "Loading weights", "Traceback")
_BAR = re.compile(r"^(?P<desc>[^\n|]*?):?\s*\d+%\|")  # a tqdm line: "evaluating:  50%|█████ | 22/44 ..."


def start_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    """``python -m mole_diffusion.cli ARGS`` in a fresh process, as a user runs it (no pytest warning filters, no
    test-wide logging settings), on one thread; stdout and stderr together, in order."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "mole_diffusion.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finished(process: subprocess.Popen, timeout: int = 300) -> str:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 0, output
    return output


def run_cli(args: list[str], cwd: Path, timeout: int = 300) -> str:
    return finished(start_cli(args, cwd), timeout)


def assert_quiet(output: str, bars: set[str]) -> None:
    """No noise, and only the progress bars named (by their description; the denoising bar has none), never two
    at once (tqdm moves the cursor up, ESC [A, to draw a nested bar)."""
    found = [word for word in NOISE if word in output]
    assert not found, f"{found} in the output:\n{output}"
    assert "\x1b[A" not in output, output
    lines = re.split(r"[\r\n]+", output)
    assert {m["desc"].strip() for line in lines if (m := _BAR.match(line))} <= bars, output


def test_demo_prints_one_bar_the_headline_table_and_where_the_files_went(tmp_path):
    out = run_cli(["demo", "--out", "demo", "--steps", "1"], cwd=tmp_path)
    assert_quiet(out, {"evaluating"})
    table = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    # per method: every concept present, each concept present, the CLIP text score; scores.md has the rest
    assert table[0] == ["method", "n", "all", "star", "stripes", "checker", "clip_text"]
    assert [row[0] for row in table[1:]] == demo_methods()
    assert max(len(line) for line in re.split(r"[\r\n]+", out)) <= 100, out  # fits a terminal: nothing wraps
    for name in ("grid.png", "gate_heatmap.png", "expert_maps.png", "scores.md", "scores.csv"):
        assert f"wrote demo/{name}" in out and (tmp_path / "demo" / name).is_file()
    assert out.rstrip().endswith("(scores.md is the full report; demo/eval holds every image and its scores)")


def test_generate_evaluate_and_training_are_quiet_on_the_demo_world(tmp_path):
    """Each command in its own process; the evaluator's methods load diffusers' adapters one after another into
    one text encoder (where transformers reported the earlier ones MISSING) and run PEFT's merges."""
    a = str(ASSETS)
    loras = [f"--lora={n}={a}/loras/{n}.safetensors" for n in ("star", "stripes", "checker")]
    small = ["--resolution", "64", "--steps", "1", "--batch-size", "1", "--validation-seeds", "0", "--validation-steps", "1"]
    commands = {
        "generate": (["generate", "--base", f"{a}/pipeline", *loras, "--gates", f"{a}/gates.safetensors",
                      "--prompt", "a red sks on a blue background", "--steps", "1", "--out", "g.png"], {""}, "wrote g.png"),
        "train-gates": (["train-gates", "--base", f"{a}/pipeline", "--concepts", f"{a}/concepts.toml", "--out", "gates",
                         "--validation-prompt", "a sks", *small], {"training"}, "wrote gates/gates.safetensors"),
        "train-lora": (["train-lora", "--base", f"{a}/pipeline", "--images", f"{a}/world/concepts/star", "--prompt", "a sks",
                        "--train-text-encoder", "--out", "lora", *small], {"training"}, "wrote lora/pytorch_lora_weights.safetensors"),
        "evaluate": (["evaluate", "--base", f"{a}/pipeline", "--concepts", f"{a}/concepts.toml", "--clip-model",
                      f"local-dir:{a}/clip", "--methods", "base", "set_adapters", "peft_cat", "--steps", "1", "--seeds", "0",
                      "--prompt", "a red sks in zwx style on a qkx background", "--scheduler", "ddim", "--out", "eval"],
                     {"evaluating"}, "wrote eval/report.md"),
    }
    # one thread each, so two of them at a time use a 2-core machine fully; each writes its own folder
    started = {name: start_cli(args, cwd=tmp_path) for name, (args, _, _) in commands.items()}
    for name, (args, bars, summary) in commands.items():
        out = finished(started[name])
        assert_quiet(out, bars)
        assert summary in out, (name, out)
    rows = {cells[0]: cells[1] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
                                             if line.startswith("| "))}
    assert rows["set_adapters"] == rows["peft_cat"] == "1"  # evaluate's headline table: method, n, ...


@pytest.fixture(scope="module")
def reference_pipe():
    from diffusers import StableDiffusionPipeline

    with quiet_loading():
        return StableDiffusionPipeline.from_pretrained(ASSETS / "pipeline", safety_checker=None)


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_load_report_about_the_adapter_being_loaded_still_shows(reference_pipe, tmp_path):
    """Loading star then stripes: transformers reports star's text-encoder tensors MISSING (benign: silenced);
    a checker file without one of its tensors: that row shows, without the other adapters' rows."""
    from safetensors.torch import load_file, save_file

    broken = load_file(str(ASSETS / "loras" / "checker.safetensors"))
    del broken["text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight"]
    save_file(broken, str(tmp_path / "checker.safetensors"))
    logger, records = logging.getLogger(ADAPTER_REPORT_LOGGER), Records()
    logger.addHandler(records)  # behind the logger's filters, like transformers' own handler
    try:
        for name in ("star", "stripes"):
            with quiet_adapter_loading(name):
                reference_pipe.load_lora_weights(str(ASSETS / "loras" / f"{name}.safetensors"), adapter_name=name)
        assert records.messages == []
        with quiet_adapter_loading("checker"):
            reference_pipe.load_lora_weights(str(tmp_path / "checker.safetensors"), adapter_name="checker")
    finally:
        logger.removeHandler(records)
    [report] = records.messages
    rows = [line for line in report.splitlines() if "| MISSING" in line]
    assert "LOAD REPORT" in report and rows == [line for line in rows if "lora_A.checker" in line] and len(rows) == 1
    assert not logger.filters  # the filter lived for the call only


def test_a_unet_only_lora_loads_without_diffusers_no_keys_warning_only_inside_the_context(reference_pipe):
    """The shipped stripes LoRA has no text-encoder half; diffusers warns "No LoRA keys associated to
    CLIPTextModel" on every load of such a file: silenced inside ``quiet_adapter_loading``, shown outside."""
    from safetensors import safe_open

    stripes = str(ASSETS / "loras" / "stripes.safetensors")
    with safe_open(stripes, "pt") as f:
        assert not [k for k in f.keys() if k.startswith("text_encoder.")]
    logger, records = logging.getLogger(NO_KEYS_LOGGERS[0]), Records()  # diffusers.loaders.lora_base
    filters, level = list(logger.filters), logger.level
    logger.addHandler(records)
    logger.setLevel(logging.WARNING)  # diffusers' default verbosity, as the commands run
    try:
        with quiet_adapter_loading("stripes_quiet"):
            reference_pipe.load_lora_weights(stripes, adapter_name="stripes_quiet")
        assert records.messages == [] and logger.filters == filters  # the filter lived for the call only
        reference_pipe.load_lora_weights(stripes, adapter_name="stripes_loud")
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)
    assert any("No LoRA keys associated to CLIPTextModel" in m for m in records.messages)


def test_a_benign_report_shows_outside_the_context():
    """The filter is scoped: the same report logged outside ``quiet_adapter_loading`` reaches the handler."""
    report = ("CLIPTextModel LOAD REPORT from: None\nKey | Status | \n---+---\n"
              "encoder.layers.{0, 1}.self_attn.q_proj.lora_A.star.weight | MISSING | \n")
    logger, records = logging.getLogger(ADAPTER_REPORT_LOGGER), Records()
    logger.addHandler(records)
    try:
        with quiet_adapter_loading("stripes"):
            logger.warning(report)
            logger.warning("an unrelated warning")
        logger.warning(report)
    finally:
        logger.removeHandler(records)
    assert records.messages == ["an unrelated warning", report]


def test_quiet_loading_restores_the_progress_bars():
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as transformers_logging

    def transformers_hook():
        hook = transformers_logging.set_tqdm_hook(None)
        transformers_logging.set_tqdm_hook(hook)
        return hook

    before = diffusers_logging.is_progress_bar_enabled(), transformers_hook(), are_progress_bars_disabled()
    with quiet_loading():
        assert not diffusers_logging.is_progress_bar_enabled()
        with transformers_logging.tqdm(range(3), desc="x") as bar:
            assert bar.disable is True  # transformers' bars off ...
        assert are_progress_bars_disabled() == before[2]  # ... the hub's download bars untouched
    assert (diffusers_logging.is_progress_bar_enabled(), transformers_hook(), are_progress_bars_disabled()) == before

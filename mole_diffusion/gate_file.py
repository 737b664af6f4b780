"""Gate files: the gates' tensors in safetensors, with what they were trained for in the metadata.

Metadata: format version, expert names in order, each expert's content hash, the gates' ``GateConfig`` (key
``gate_config``, JSON; its prior weights in the expert order), the model family ("sd", "sdxl", "flux"), and the
base model's name and a fingerprint of the adapted modules' shapes. The config's granularity, activation,
per_position and timestep_knots are also written as keys of their own, as files from before ``gate_config`` hold
them (those files are read from them), so that older versions of this package still read new files.
``load_gates`` refuses gates trained for other experts, another granularity, another family or another base, and matches experts by name, so the order in which
experts are passed does not matter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import GRANULARITIES, GateConfig
from .errors import MoLEError
from .gates import ACTIVATIONS, check_timestep_knots
from .inject import MoLE, reads_timestep

FORMAT = "mole-diffusion-gates"
FORMAT_VERSION = "1"
REQUIRED_METADATA = ("expert_names", "expert_hashes", "granularity", "base_model", "base_fingerprint")
GATE_CONFIG_KEY = "gate_config"
# the settings files from before GATE_CONFIG_KEY hold as keys of their own (still written, for older readers)
SEPARATE_KEYS = ("granularity", "activation", "per_position", "timestep_knots")
logger = logging.getLogger(__name__)


class GateFileError(MoLEError):
    """A gate file that does not belong to the loaded base model and experts."""


def base_fingerprint(mole: MoLE) -> str:
    """sha256 of each adapted module's name and base weight shape."""
    shapes = sorted(f"{name}:{tuple(layer.base_layer.weight.shape)}" for name, layer in mole.layers.items())
    return hashlib.sha256("\n".join(shapes).encode()).hexdigest()


def model_id(base_model: str) -> str:
    """How a gate file names its base: a local folder by its absolute path (so "pipe" and "/work/pipe" are one
    base, whatever the working folder), anything else (a hub id) as given."""
    return str(Path(base_model).resolve()) if base_model and Path(base_model).is_dir() else base_model


def save_gates(mole: MoLE, path: str | os.PathLike, base_model: str = "", family: str = "sd") -> None:
    """Write ``mole``'s gates to ``path`` atomically (a temporary file, then a rename)."""
    tensors = {}
    for name, gate in mole.gates.items():
        for key, param in gate.named_parameters():
            tensors[f"{name}.{key}"] = param.detach().float().cpu().contiguous()
    config = mole.gate_config
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "expert_names": json.dumps(mole.expert_names),
        "expert_hashes": json.dumps({e.name: e.content_hash for e in mole.experts}),
        GATE_CONFIG_KEY: json.dumps(dataclasses.asdict(config)),
        "granularity": config.granularity,
        "activation": config.activation,
        "per_position": json.dumps(config.per_position),
        "timestep_knots": json.dumps(config.timestep_knots),
        "family": family,
        "base_model": model_id(base_model),
        "base_fingerprint": base_fingerprint(mole),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def read_gate_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise GateFileError(f"{path}: gate file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise GateFileError(f"{path}: not a readable safetensors gate file ({e})") from e
    if metadata.get("format") != FORMAT:
        raise GateFileError(f"{path}: not a mole-diffusion gate file (metadata format={metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise GateFileError(f"{path}: gate file format version {metadata.get('format_version')}, this version reads {FORMAT_VERSION}")
    missing = [key for key in REQUIRED_METADATA if key not in metadata]
    if missing:
        raise GateFileError(f"{path}: gate file metadata lacks {missing} (written by save_gates, which records "
                            f"{list(REQUIRED_METADATA)})")
    try:
        names, hashes = json.loads(metadata["expert_names"]), json.loads(metadata["expert_hashes"])
    except json.JSONDecodeError as e:
        raise GateFileError(f"{path}: gate file metadata expert_names / expert_hashes is not JSON ({e})") from e
    if not isinstance(hashes, dict) or set(hashes) != set(names):
        raise GateFileError(f"{path}: gate file metadata expert_hashes should hold one hash for each of {names}")
    if metadata["granularity"] not in GRANULARITIES:
        raise GateFileError(f"{path}: gate file metadata granularity is {metadata['granularity']!r} (expected one of "
                            f"{GRANULARITIES})")
    for key, tensor in tensors.items():
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise GateFileError(f"{path}: gate tensor {key} holds NaN or inf values or is not floating point "
                                f"({tensor.dtype}); expected finite numbers (a diverged training run?)")
    return tensors, metadata


FAMILY_NAMES = {"sd": "Stable Diffusion 1.x/2.x", "sdxl": "SDXL", "flux": "Flux"}


@torch.no_grad()
def load_gates(mole: MoLE, path: str | os.PathLike, base_model: str = "", family: str = "sd") -> None:
    """Load gates saved by ``save_gates`` into ``mole``, after checking they were trained for it; the gates
    become the file's kind (``GateConfig``: activation, per position, timestep knots), so they compute what was
    trained."""
    tensors, meta = read_gate_file(path)
    saved_family = meta.get("family", "sd")  # files from before the key are Stable Diffusion's
    if saved_family != family:
        raise GateFileError(f"{path}: gates were trained on a {FAMILY_NAMES.get(saved_family, saved_family)} base "
                            f"({meta['base_model'] or 'unnamed'}); this pipeline is {FAMILY_NAMES.get(family, family)}")
    saved_names = json.loads(meta["expert_names"])
    saved_hashes = json.loads(meta["expert_hashes"])
    names = mole.expert_names
    if sorted(saved_names) != sorted(names):
        missing = [n for n in saved_names if n not in names]
        extra = [n for n in names if n not in saved_names]
        raise GateFileError(
            f"{path}: gates were trained for experts {saved_names}, but {names} are loaded"
            + (f" (missing: {missing})" if missing else "") + (f" (not in the gate file: {extra})" if extra else "")
        )
    hashes = {e.name: e.content_hash for e in mole.experts}
    for name in saved_names:
        if hashes[name] != saved_hashes[name]:
            owner = next((n for n, h in saved_hashes.items() if h == hashes[name]), None)
            hint = f"; it holds the LoRA the gates knew as {owner!r} (experts swapped?)" if owner else ""
            raise GateFileError(
                f"{path}: expert {name!r} ({mole.experts[names.index(name)].path}) is not the LoRA these gates were "
                f"trained with (content hash {hashes[name][:12]} vs {saved_hashes[name][:12]}){hint}"
            )
    config = _gate_config(path, meta)
    if config.granularity != mole.gate_config.granularity:
        raise GateFileError(
            f"{path}: gates have granularity {config.granularity!r}, experts were loaded with "
            f"{mole.gate_config.granularity!r}; load_experts(..., granularity={config.granularity!r})"
        )
    if meta["base_fingerprint"] != base_fingerprint(mole):
        raise GateFileError(
            f"{path}: gates were trained on another base model ({meta['base_model'] or 'unnamed'}, adapted-shape "
            f"fingerprint {meta['base_fingerprint'][:12]}); this one ({base_model or 'unnamed'}) has "
            f"{base_fingerprint(mole)[:12]}"
        )
    if meta["base_model"] and base_model and model_id(meta["base_model"]) != model_id(base_model):
        logger.warning("%s: gates were trained on %s, loading into %s (same shapes)", path, meta["base_model"], base_model)

    order = [saved_names.index(n) for n in names]  # file's expert order -> loaded order
    n = len(names)
    # the shapes the file's kind of gate has (W_g, b_g, tau; timestep knots on the denoiser's gates), checked
    # before any gate changes: a refused file leaves the gates as they were
    expected = {}
    for name, gate in mole.gates.items():
        expected |= {f"{name}.weight": tuple(gate.weight.shape), f"{name}.bias": (n,), f"{name}.log_temperature": ()}
        if config.timestep_knots and reads_timestep(name):
            expected[f"{name}.timestep_logits"] = (n, config.timestep_knots)
    if set(tensors) != set(expected):
        raise GateFileError(f"{path}: gate tensors do not match the injected gates (first difference: {sorted(set(tensors) ^ set(expected))[:1]})")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise GateFileError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, this pipeline's gate has {shape}")
    prior = None if config.prior_weights is None else [config.prior_weights[i] for i in order]
    mole.set_gate_config(dataclasses.replace(config, prior_weights=prior))  # restore what was trained
    for name, gate in mole.gates.items():
        for key, param in gate.named_parameters():
            saved = tensors[f"{name}.{key}"]
            param.copy_(saved if key == "log_temperature" else saved[order])


def _separate_settings(path, meta: dict[str, str]) -> dict:
    """The settings a file holds as keys of their own; files from before the kind's keys are softmax, per sample,
    timestep-blind."""
    try:
        kind = {"activation": meta.get("activation", "softmax"), "per_position": json.loads(meta.get("per_position", "false")),
                "timestep_knots": json.loads(meta.get("timestep_knots", "0"))}
    except json.JSONDecodeError as e:
        raise GateFileError(f"{path}: gate file metadata per_position / timestep_knots is not JSON ({e})") from e
    try:
        check_timestep_knots(kind["timestep_knots"])
        known = kind["activation"] in ACTIVATIONS and isinstance(kind["per_position"], bool)
    except MoLEError:
        known = False
    if not known:
        raise GateFileError(f"{path}: gate file metadata names an unknown kind of gate {kind} (activation one of {ACTIVATIONS}, "
                            "per_position true or false, timestep_knots 0 or at least 2)")
    return {"granularity": meta["granularity"], **kind}


def _gate_config(path, meta: dict[str, str]) -> GateConfig:
    """The gate file's ``GateConfig``: its ``gate_config`` key, with which the separate keys must agree; from the
    separate keys alone in files from before it (which did not record the prior weights)."""
    separate, names = _separate_settings(path, meta), json.loads(meta["expert_names"])
    if GATE_CONFIG_KEY not in meta:
        return _checked_config(path, separate, names)
    try:
        settings = json.loads(meta[GATE_CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise GateFileError(f"{path}: gate file metadata {GATE_CONFIG_KEY} is not JSON ({e})") from e
    known = [f.name for f in dataclasses.fields(GateConfig)]
    if not isinstance(settings, dict) or not set(settings) <= set(known):
        raise GateFileError(f"{path}: gate file metadata {GATE_CONFIG_KEY} should be an object of some of {known}, "
                            f"got {meta[GATE_CONFIG_KEY]}")
    config = _checked_config(path, settings, names)
    for key in SEPARATE_KEYS:
        if key in meta and separate[key] != getattr(config, key):
            raise GateFileError(f"{path}: gate file metadata {key} is {separate[key]!r}, but its {GATE_CONFIG_KEY} says "
                                f"{getattr(config, key)!r}")
    return config


def _checked_config(path, settings: dict, expert_names: list[str]) -> GateConfig:
    """``GateConfig(**settings)``, its prior weights one per expert of the file, in its order."""
    try:
        return GateConfig(**settings).for_experts(expert_names)
    except MoLEError as e:
        raise GateFileError(f"{path}: gate file metadata: {e}") from e


def read_gate_config(path: str | os.PathLike) -> GateConfig:
    """The ``GateConfig`` the gates of a gate file were made with (prior weights in the file's expert order;
    None for files from before the ``gate_config`` key)."""
    path = Path(path)
    return _gate_config(path, read_gate_file(path)[1])


def gate_kind(path: str | os.PathLike) -> GateConfig:
    """What ``load_experts(..., gate_config=...)`` needs to load a gate file as trained: its ``GateConfig`` less the
    prior weights, which only start untrained gates (the file's experts may also be passed in another order).
    ``load_gates`` also turns the gates into the file's kind; the granularity must match before."""
    return dataclasses.replace(read_gate_config(path), prior_weights=None)

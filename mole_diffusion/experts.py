"""Experts (docs/method.md): LoRA files read into per-module (A, B, alpha / r), checked against the base.

Formats: diffusers/PEFT safetensors (``save_lora_weights`` output, with or without ``lora_adapter_metadata``),
PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``), kohya/A1111 safetensors (SDXL's
sgm block names too), and LyCORIS LoHa, LoKr and Tucker LoCon modules, converted to the LoRA pairs they equal
(``lycoris.py``). DoRA experts (PEFT's ``lora_magnitude_vector``, LyCORIS ``dora_scale``) keep their magnitude.
Key conversion is diffusers' own (``lora_state_dict``, ``convert_*_to_peft``); every module gets its own alpha / r,
as the file says, so one expert here equals ``load_lora_weights`` there wherever diffusers reads the file exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .errors import MoLEError
from .lycoris import conv_shaped, lycoris_to_lora

# the components a LoRA file of any supported family has weights for (each pipeline class has some of them)
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


class ExpertError(MoLEError):
    """A LoRA file that cannot be used: missing, unreadable, or not fitting the base model."""


@dataclass
class LoRAWeights:
    down: torch.Tensor  # A: (r, d_in) or (r, C_in, kh, kw)
    up: torch.Tensor  # B: (d_out, r) or (C_out, r, 1, 1)
    scale: float  # alpha / r
    magnitude: torch.Tensor | None = None  # DoRA: m, (d_out,): the adapted weight is m * (W + s B A) / ||W + s B A||

    @property
    def rank(self) -> int:
        return self.down.shape[0]


@dataclass
class Expert:
    """One LoRA: ``layers`` maps "unet.<module>" / "text_encoder.<module>" to its weights."""

    name: str
    path: str
    layers: dict[str, LoRAWeights] = field(repr=False)

    @property
    def content_hash(self) -> str:
        """sha256 of the converted tensors and scales: the same for a kohya file and its diffusers twin."""
        digest = hashlib.sha256()
        for module in sorted(self.layers):
            lora = self.layers[module]
            digest.update(f"{module}:{lora.scale!r}".encode())
            for tensor in (lora.down, lora.up) + (() if lora.magnitude is None else (lora.magnitude,)):
                digest.update(str(tuple(tensor.shape)).encode())
                digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise ExpertError(f"{path}: not a readable safetensors LoRA file ({e})") from e


def _read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, dict] | None]:
    """Tensors and, where the file has it, the LoraConfig dict per component (None: no metadata)."""
    path = Path(path)
    if not path.exists():
        raise ExpertError(f"{path}: LoRA file not found")
    if path.is_dir():
        if (path / "adapter_config.json").exists():  # a PEFT adapter folder
            tensors, _ = _read_safetensors(_only_safetensors(path / "adapter_model.safetensors"))
            config = _json(path / "adapter_config.json", lambda: (path / "adapter_config.json").read_text(encoding="utf-8"))
            if not isinstance(config, dict):
                raise ExpertError(f"{path / 'adapter_config.json'}: expected a JSON object (a PEFT LoraConfig)")
            tensors = {k.removeprefix("base_model.model."): v for k, v in tensors.items()}
            return tensors, {"": config}
        path = _only_safetensors(path / "pytorch_lora_weights.safetensors")
    elif path.suffix != ".safetensors":
        raise ExpertError(f"{path}: only .safetensors LoRA files are read (pickled files are never unpickled)")
    tensors, metadata = _read_safetensors(path)
    if "lora_adapter_metadata" not in metadata:
        return tensors, None
    packed = _json(f"{path}: lora_adapter_metadata", lambda: metadata["lora_adapter_metadata"])
    if not isinstance(packed, dict):  # {"unet.r": 4, "unet.lora_alpha": 8, ...}
        raise ExpertError(f"{path}: lora_adapter_metadata is not a JSON object of LoraConfig fields")
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, option = key.partition(".")
        configs.setdefault(component, {})[option] = value
    return tensors, configs


def _json(where, read):
    try:
        return json.loads(read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExpertError(f"{where}: not valid JSON ({e})") from None


def _only_safetensors(path: Path) -> Path:
    if not path.exists():
        raise ExpertError(f"{path}: LoRA file not found (only .safetensors files are read)")
    return path


def _split_components(tensors: dict[str, torch.Tensor], models: dict[str, nn.Module], pipeline_class: type):
    """diffusers' key conversion, as ``pipeline_class.load_lora_weights`` does it: kohya / XLabs / ai-toolkit
    -> diffusers -> PEFT keys, split by component. The first of ``models`` is the denoiser (UNet or transformer)."""
    from diffusers.loaders import FluxLoraLoaderMixin
    from diffusers.utils.state_dict_utils import (
        StateDictType,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if issubclass(pipeline_class, FluxLoraLoaderMixin):  # kohya and XLabs files come back with alpha folded in
        state_dict, network_alphas = pipeline_class.lora_state_dict(dict(tensors), return_alphas=True)
    else:  # SDXL: kohya's original (sgm) block names are mapped with the UNet's config, as load_lora_weights does
        unet = models.get("unet")
        state_dict, network_alphas = pipeline_class.lora_state_dict(
            dict(tensors), unet_config=None if unet is None else unet.config)
    # diffusers names a kohya alpha after its module ("<module>.alpha") or after its down weight
    # ("<down key>.alpha"). Each alpha is renamed here to sit beside its down weight ("...down.alpha"), so that the
    # key conversion below renames it with that weight and it ends up as "<module>.lora_A.alpha" on every module.
    for key, alpha in (network_alphas or {}).items():
        stem = key.removesuffix(".alpha")
        down = stem if stem in state_dict else f"{stem}.lora.down.weight"
        if down not in state_dict:
            raise ExpertError(f"{key}: an alpha that belongs to no lora_down weight")
        state_dict[down.removesuffix("weight") + "alpha"] = torch.tensor(float(alpha))
    components = list(models)
    foreign = sorted(k for k in state_dict if k.split(".")[0] in set(COMPONENTS) - set(components))
    if foreign:
        raise ExpertError(f"{foreign[0]}: weights for a {foreign[0].split('.')[0]}, which this pipeline "
                          f"({pipeline_class.__name__}, components {components}) does not have: a LoRA for another "
                          "model family")
    out = {}
    for component in components:
        part = {k.removeprefix(f"{component}."): v for k, v in state_dict.items() if k.startswith(f"{component}.")}
        if component == components[0] and not any(k.split(".")[0] in COMPONENTS for k in state_dict):
            part = dict(state_dict)  # unprefixed files are the denoiser's (diffusers: load_lora_adapter(prefix=None))
        if not part:
            continue
        if component == components[0]:
            # as diffusers' load_lora_adapter: maps the `lora.down`/`lora.up` keys its training scripts write
            part = convert_unet_state_dict_to_peft(part)
        else:
            # diffusers tells its old text-encoder keys ("to_q_lora.down.weight", what kohya files convert to) by an
            # out-projection key, so a file adapting only some attention projections (q and v) would not convert
            old = any(k.endswith(("_lora.down.weight", "_lora.up.weight")) for k in part)
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part, StateDictType.DIFFUSERS_OLD if old else None))
            if not hasattr(models[component], "text_model"):
                part = {k.removeprefix("text_model."): v for k, v in part.items()}
        out[component] = part
    return out


# each half of a kohya (lora_down/lora_up) or diffusers-old (lora.down/lora.up) pair -> its other half
HALF_PAIRS = {"lora_down.weight": "lora_up.weight", "lora_up.weight": "lora_down.weight",
              "lora.down.weight": "lora.up.weight", "lora.up.weight": "lora.down.weight"}


def _check_halves(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Each half has its pair: named here, before diffusers' key conversion, which fails on a lone half with a
    message about renaming keys."""
    for key in sorted(tensors):
        have = next((h for h in HALF_PAIRS if key.endswith(h)), None)
        if have is not None and (pair := key.removesuffix(have) + HALF_PAIRS[have]) not in tensors:
            raise ExpertError(f"{path}: {key} has no {pair}: every module needs both")


def _scale(module: str, rank: int, config: dict | None, alpha: torch.Tensor | None) -> float:
    """alpha / r as diffusers/PEFT would set it for ``module``: from the file's LoraConfig (``lora_alpha``, per-module
    ``alpha_pattern``, ``use_rslora``: alpha / sqrt(r)) or else the module's own kohya alpha (none: alpha == r)."""
    if config is not None:
        from peft.utils.other import get_pattern_key

        alpha_pattern = config.get("alpha_pattern") or {}
        if not isinstance(alpha_pattern, dict):
            raise ExpertError(f"alpha_pattern is {alpha_pattern!r} (expected an object of module pattern -> alpha)")
        value = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", rank))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ExpertError(f"lora_alpha of {module} is {value!r} (expected a number)")
        return float(value) / (math.sqrt(rank) if config.get("use_rslora") else rank)
    return 1.0 if alpha is None else float(alpha) / rank


# what follows ".lora_" in a converted key: the two factors, the kohya alpha carried beside lora_A, DoRA's magnitude
LORA_KEYS = ("A.weight", "B.weight", "A.alpha", "magnitude_vector")


def _check_values(where: str, key: str, tensor: torch.Tensor) -> None:
    """Refuse tensors a LoRA cannot hold: not floating point (an int8 file would be cast silently), NaN or inf."""
    if not tensor.is_floating_point():
        raise ExpertError(f"{where}: {key} is {tensor.dtype} (expected floating-point weights)")
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ExpertError(f"{where}: {key} holds {bad} NaN or inf value(s) (expected finite numbers)")


def _check_fits(path, component: str, module_name: str, model: nn.Module, down: torch.Tensor, up: torch.Tensor):
    where = f"{path}: {component}.{module_name}"
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ExpertError(f"{where}: the base model's {component} has no such module") from None
    if isinstance(module, nn.Linear):
        expected = ((down.shape[0], module.in_features), (module.out_features, down.shape[0]))
    elif isinstance(module, nn.Conv2d) and module.groups == 1:
        expected = ((down.shape[0], module.in_channels, *module.kernel_size), (module.out_channels, down.shape[0], 1, 1))
    elif hasattr(module, "base_layer"):  # a PEFT/diffusers LoRA layer, possibly with every adapter deleted
        raise ExpertError(f"{where}: the base model already has a PEFT LoRA layer here; call unload_lora_weights() first")
    else:
        raise ExpertError(f"{where}: LoRA on {type(module).__name__} is not supported (Linear and Conv2d are)")
    if (tuple(down.shape), tuple(up.shape)) != expected:
        raise ExpertError(
            f"{where}: LoRA shapes lora_A {tuple(down.shape)}, lora_B {tuple(up.shape)} do not fit the base "
            f"module {module} (weight {tuple(module.weight.shape)}; expected lora_A {expected[0]}, lora_B {expected[1]})"
        )


def load_expert(name: str, path: str | os.PathLike, models: dict[str, nn.Module], pipeline_class: type | None = None) -> Expert:
    """Read one LoRA and check every module against ``models`` ({"unet": ..., "text_encoder": ...}; the
    denoiser first), converting its keys with ``pipeline_class``'s ``lora_state_dict`` (default
    ``StableDiffusionPipeline``; ``StableDiffusionXLPipeline`` reads kohya's ``lora_te1_`` / ``lora_te2_``,
    ``FluxPipeline`` kohya, XLabs and ai-toolkit Flux files).

    Raises ``ExpertError`` naming the file, the module and both shapes when anything does not fit.
    Nothing is changed in ``models``.
    """
    if pipeline_class is None:
        from diffusers import StableDiffusionPipeline as pipeline_class
    tensors, configs = _read_lora_file(path)
    try:  # LoHa, LoKr and Tucker LoCon modules become the LoRA pairs they equal
        tensors = lycoris_to_lora(tensors, str(path))
    except ValueError as e:
        raise ExpertError(str(e)) from None
    dora_scales = {k: tensors.pop(k) for k in list(tensors) if k.endswith(".dora_scale")}
    _check_halves(path, tensors)
    if configs is not None and "" in configs:  # PEFT adapter folder: find the component whose modules it names
        modules = {k.split(".lora_")[0] for k in tensors}
        component = next((c for c in models if all(_has(models[c], m) for m in modules)), next(iter(models)))
        tensors = {f"{component}.{k}": v for k, v in tensors.items()}
        configs = {component: configs[""]}
    try:
        parts = _split_components(tensors, models, pipeline_class)
    except ExpertError as e:
        raise ExpertError(f"{path}: {e}") from None
    except Exception as e:  # diffusers raises ValueError/KeyError on keys it cannot convert
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ExpertError(f"{path}: diffusers' {pipeline_class.__name__}.lora_state_dict could not convert its keys "
                          f"(a LoRA for another model family? keys start {sorted(tensors)[:2]}; "
                          f"{type(e).__name__}: {first_line})") from e
    if not parts:
        raise ExpertError(f"{path}: no LoRA weights for {' or '.join(models)} found (keys start: {list(tensors)[:3]})")
    if dora_scales:
        _add_dora_scales(path, dora_scales, parts, models, pipeline_class)

    layers: dict[str, LoRAWeights] = {}
    for component, state in parts.items():
        modules = sorted({key.rsplit(".lora_", 1)[0] for key in state if ".lora_" in key})
        unexpected = sorted(k for k in state if ".lora_" not in k or k.rsplit(".lora_", 1)[1] not in LORA_KEYS)
        if unexpected:
            raise ExpertError(f"{path}: unexpected key {component}.{unexpected[0]} (expected lora_A/lora_B weights "
                              "and an alpha per module)")
        config = None if configs is None else configs.get(component)
        for module in modules:
            where = f"{path}: {component}.{module}"
            down, up = state.get(f"{module}.lora_A.weight"), state.get(f"{module}.lora_B.weight")
            if down is None or up is None:
                raise ExpertError(f"{where} has lora_{'A' if down is not None else 'B'} but no "
                                  f"lora_{'B' if down is not None else 'A'}: every module needs both")
            for key, tensor in (("lora_A", down), ("lora_B", up)):
                _check_values(where, key, tensor)
            if down.shape[0] == 0:
                raise ExpertError(f"{where}: rank 0 (lora_A {tuple(down.shape)}): a LoRA needs rank >= 1")
            target = models[component].get_submodule(module) if _has(models[component], module) else None
            if isinstance(target, nn.Conv2d) and down.dim() == 2:  # LyCORIS stores some conv factors flattened
                down, up = conv_shaped(down, up, target.weight.shape)
            _check_fits(path, component, module, models[component], down, up)
            alpha = state.get(f"{module}.lora_A.alpha")
            if alpha is not None:
                _check_values(where, "alpha", alpha)
            try:
                scale = _scale(module, down.shape[0], config, alpha)
            except ExpertError as e:
                raise ExpertError(f"{path}: {component} LoRA config: {e}") from None
            if not math.isfinite(scale):
                raise ExpertError(f"{where}: its scale alpha / r is {scale} (expected a finite number)")
            magnitude = state.get(f"{module}.lora_magnitude_vector")
            if magnitude is not None:
                _check_values(where, "lora_magnitude_vector", magnitude)
                if magnitude.numel() != up.shape[0]:
                    raise ExpertError(f"{where}: DoRA lora_magnitude_vector {tuple(magnitude.shape)} does not fit "
                                      f"the module's {up.shape[0]} output channels")
                magnitude = magnitude.flatten()
            layers[f"{component}.{module}"] = LoRAWeights(down, up, scale, magnitude)
    return Expert(name=name, path=str(path), layers=layers)


def _add_dora_scales(path, dora_scales: dict[str, torch.Tensor], parts: dict, models: dict, pipeline_class: type) -> None:
    """LyCORIS DoRA (``<kohya module>.dora_scale``, the magnitude per output channel) as PEFT's
    ``lora_magnitude_vector`` beside each module's converted factors. diffusers drops these keys (with a warning), so
    their module names are found by converting a stand-in LoRA with one module per scale: the names kohya files
    get, whatever the family's key conversion does."""
    from diffusers.loaders import FluxLoraLoaderMixin

    if issubclass(pipeline_class, FluxLoraLoaderMixin):
        raise ExpertError(f"{path}: {sorted(dora_scales)[0]}: kohya-style DoRA (dora_scale) is read for SD and SDXL "
                          "files; Flux DoRA is read in the diffusers/PEFT layout (lora_magnitude_vector)")
    stand_in = {}
    for key, scale in dora_scales.items():
        if scale.dim() < 2 or scale.shape[0] == 1 or scale[0].numel() != 1:
            raise ExpertError(f"{path}: {key} has shape {tuple(scale.shape)}: a DoRA magnitude per input channel "
                              "(LyCORIS wd_on_output=False) has no per-output-channel form; expected (out, 1, ...)")
        prefix = key.removesuffix(".dora_scale")
        stand_in[f"{prefix}.lora_down.weight"] = scale.reshape(1, -1)
        stand_in[f"{prefix}.lora_up.weight"] = torch.zeros(1, 1)
    for component, part in _split_components(stand_in, models, pipeline_class).items():
        for key, scale in part.items():
            if key.endswith(".lora_A.weight"):
                module = key.removesuffix(".lora_A.weight")
                if f"{module}.lora_A.weight" not in parts.get(component, {}):
                    raise ExpertError(f"{path}: {component}.{module} has a dora_scale but no LoRA weights")
                parts[component][f"{module}.lora_magnitude_vector"] = scale.flatten()


def _has(model: nn.Module, module_name: str) -> bool:
    try:
        model.get_submodule(module_name)
        return True
    except AttributeError:
        return False


def lora_components(pipe) -> dict[str, nn.Module]:
    """The models of a diffusers pipeline that LoRAs may adapt, as diffusers lists them for its class
    (``_lora_loadable_modules``: SD unet + text_encoder, SDXL + text_encoder_2, Flux transformer + text_encoder),
    the denoiser (UNet or transformer) first."""
    names = sorted(pipe._lora_loadable_modules, key=lambda component: component.startswith("text_encoder"))
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}


def expert_paths(experts: dict[str, str | os.PathLike] | list[str | os.PathLike]) -> dict[str, str]:
    """{name: path}; a list takes names from file stems (a folder's own name for folders)."""
    if isinstance(experts, dict):
        named = {str(k): str(v) for k, v in experts.items()}
    else:
        named = {}
        for p in experts:
            stem = Path(p).stem if Path(p).suffix == ".safetensors" else Path(p).name
            if stem in named:
                raise ExpertError(f"two experts are named {stem!r} ({named[stem]}, {p}); pass a dict name -> path")
            named[stem] = str(p)
    if not named:
        raise ExpertError("no experts given")
    return named

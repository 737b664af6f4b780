"""The composition methods the evaluator compares, by name (names as in the outputs), and ``draw``: one image of one.

- ``mole``: learned gates (the gate file); ``mole_without_<name>``: the same with one concept masked out;
- ``mole_constant``: the learned gates frozen into constant per-block weights (their mean over the
  evaluation prompts, ``export_block_weights``) and fused: what gates cost nothing would give up;
- ``nla``: constant weights summing to 1 (uniform unless given); ``sum``: the plain sum of the deltas;
- ``set_adapters``: diffusers' own ``load_lora_weights`` + ``set_adapters`` with the NLA weights (must
  give the same images as ``nla``);
- ``peft_cat``, ``peft_svd``, ``peft_ties``, ``peft_dare_linear``: PEFT's ``add_weighted_adapter`` merges with
  the NLA weights (cat is exact; svd truncates; ties and dare_linear combine A's and B's separately, not the
  weighted sum of deltas, and need LoRAs of one rank);
- ``switch``: LoRA Switch, one LoRA active per denoising step, cycling every ``switch_every`` steps;
- ``composite``: LoRA Composite, the guided noise prediction averaged over the LoRAs (classifier-free
  guidance is linear, so averaging each half of the UNet's batch over the LoRAs is exactly the mean of the
  per-LoRA guidances);
- ``regional``: training-free regional routing (``mole_diffusion.routing``): each LoRA at weight 1 where the
  cross-attention of its trigger word points (the trigger: the concepts file's ``trigger``, or the instance
  prompt's own word);
- ``single_<name>``: one LoRA alone; ``base``: no LoRA.

``methods_for(names)`` is the registry: each method's name, how it draws and what it needs. ``draw`` makes one
image; ``draw_images`` several of one method in one pipeline call (prompts and seeds of their own).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from PIL import Image

from ..errors import MoLEError
from ..experts import lora_components
from ..quiet import quiet_multiple_adapters
from ..concepts import Concept, concept_triggers

PEFT_MERGES = ("cat", "svd", "ties", "dare_linear")  # add_weighted_adapter combination types
SAME_RANK_MERGES = ("ties", "dare_linear")  # these combine the A's and the B's separately: one rank for all


@dataclass(frozen=True)
class DrawRequest:
    """What one image is drawn from."""

    pipe: Any  # the MoLE pipeline with the experts loaded (and the gate file, for the learned methods)
    reference_pipe: Any | None  # diffusers' own pipeline, the same LoRAs as adapters set to ``weights``
    prompt: str | list[str]  # a list: one image per prompt, in one pipeline call
    names: list[str]  # the loaded experts, in their order
    weights: list[float]  # the constant (NLA) weights, one per expert
    call: dict[str, Any]  # the pipeline call's other arguments (steps, guidance, size, generator, output type)
    switch_every: int = 1
    block_weights: dict[str, list[float]] | None = None  # mole_constant's per-block weights
    triggers: Mapping[str, str | Sequence[str]] | None = None  # each expert's trigger words, for regional routing


@dataclass(frozen=True)
class Method:
    """A composition method: how it draws one image, and what it needs."""

    name: str
    draw: Callable[[DrawRequest], list[Image.Image]] = field(repr=False)
    needs_gates: bool = False  # learned gates: listed only with a gate file
    uses_reference: bool = False  # draws with diffusers' own pipeline: the evaluator loads one
    peft_merge: str | None = None  # the PEFT merged adapter it draws with, added to diffusers' pipeline
    same_rank: bool = False  # LoRAs of one rank only
    needs_triggers: bool = False  # a trigger word for every concept
    not_for_families: tuple[str, ...] = ()  # model families it cannot run on


def methods_for(names: Sequence[str]) -> dict[str, Method]:
    """Every method for experts ``names``, by name, in the order of the outputs (per-concept ones spelled out)."""
    methods = [
        Method("mole", _learned, needs_gates=True),
        Method("mole_constant", _constant_from_gates, needs_gates=True),
        *(Method(f"mole_without_{n}", partial(_learned, without=n), needs_gates=True) for n in names),
        Method("nla", _nla),
        Method("sum", _sum),
        Method("set_adapters", _set_adapters, uses_reference=True),
        *(Method(f"peft_{m}", partial(_peft, merge=m), uses_reference=True, peft_merge=m, same_rank=m in SAME_RANK_MERGES)
          for m in PEFT_MERGES),
        Method("switch", _switch_method),
        Method("composite", _composite),
        # regional routing reads a UNet's cross-attention maps: not Flux's joint attention
        Method("regional", _regional, needs_triggers=True, not_for_families=("flux",)),
        Method("regional_tokens", partial(_regional, own_trigger_tokens=True), needs_triggers=True, not_for_families=("flux",)),
        *(Method(f"single_{n}", partial(_single, name=n)) for n in names),
        Method("base", _base, uses_reference=True),
    ]
    return {m.name: m for m in methods}


def method_names(concepts: list[Concept], has_gates: bool, same_rank: bool = True, family: str = "sd") -> list[str]:
    """The methods that apply: to these concepts, with or without a gate file, LoRAs of one rank or not, a family."""
    has_triggers = bool(concept_triggers(concepts))
    return [m.name for m in methods_for([c.name for c in concepts]).values()
            if (has_gates or not m.needs_gates) and (same_rank or not m.same_rank)
            and (has_triggers or not m.needs_triggers) and family not in m.not_for_families]


def draw(pipe, *, method: str, prompt: str, names: Sequence[str], weights: Sequence[float], reference_pipe=None,
         seed: int | None = None, switch_every: int = 1, block_weights: dict[str, list[float]] | None = None,
         triggers: Mapping[str, str | Sequence[str]] | None = None, **call: Any) -> Image.Image:
    """One image of ``method`` for ``prompt`` with the experts ``names`` loaded in ``pipe`` (a MoLE pipeline).

    ``weights``: the constant (NLA) weights, one per expert; ``reference_pipe``: diffusers' own pipeline with the
    same LoRAs as adapters set to those weights (for ``set_adapters`` and the ``peft_*`` merges; ``base`` uses it
    when given, else the MoLE pipeline with every expert at weight 0, which adds exactly nothing); ``seed``: a CPU
    generator's (or pass ``generator`` in ``call``); ``switch_every``: LoRA Switch's steps per LoRA;
    ``block_weights``: ``mole_constant``'s; ``triggers``: ``regional``'s. ``call``: the pipeline's other arguments.

    Drawn in runs of one method (as the evaluator does), ``mole_constant`` fuses once and ``regional`` routes once
    for the run; any other method takes both off again."""
    if seed is not None:
        if "generator" in call:
            raise MoLEError("give a seed or a generator, not both")
        call["generator"] = torch.Generator().manual_seed(seed)
    request = DrawRequest(pipe, reference_pipe, prompt, list(names), list(weights), call, switch_every, block_weights, triggers)
    return _draw(method, request)[0]


def draw_images(pipe, *, method: str, prompts: Sequence[str], seeds: Sequence[int], names: Sequence[str],
                weights: Sequence[float], reference_pipe=None, switch_every: int = 1,
                block_weights: dict[str, list[float]] | None = None,
                triggers: Mapping[str, str | Sequence[str]] | None = None, **call: Any) -> list[Image.Image]:
    """``draw`` for several images of one method: image i of ``prompts[i]`` from a CPU generator seeded
    ``seeds[i]``, all in one pipeline call. Each image is the one ``draw`` makes with that prompt and seed, up
    to float rounding (the batch's other images do not change its noise or its gates' weights), and a batch of
    k images costs far less than k calls (on 2 CPU cores, 8 images about 4x less per image:
    ``benchmarks/bench_evaluate.py``)."""
    if len(prompts) != len(seeds):
        raise MoLEError(f"{len(prompts)} prompts for {len(seeds)} seeds: draw_images draws one image per prompt and seed")
    if "generator" in call:
        raise MoLEError("draw_images seeds each image's generator itself: pass seeds, not a generator")
    call["generator"] = [torch.Generator().manual_seed(seed) for seed in seeds]
    request = DrawRequest(pipe, reference_pipe, list(prompts), list(names), list(weights), call, switch_every,
                          block_weights, triggers)
    return _draw(method, request)


def _draw(method: str, request: DrawRequest) -> list[Image.Image]:
    known = methods_for(request.names)
    if method not in known:
        raise MoLEError(f"unknown method {method!r}; for experts {request.names}: {list(known)}")
    if not method.startswith("regional"):
        request.pipe.disable_regional_routing()
    if method != "mole_constant" and request.pipe.mole.fused:
        request.pipe.mole.unfuse()
    return known[method].draw(request)


def _image(request: DrawRequest, **extra: Any) -> list[Image.Image]:
    return request.pipe(request.prompt, **extra, **request.call).images


def _learned(request: DrawRequest, without: str | None = None) -> list[Image.Image]:
    request.pipe.mole.set_experts(None)  # learned gates
    return _image(request, experts=[n for n in request.names if n != without])


def _constant_from_gates(request: DrawRequest) -> list[Image.Image]:
    if request.block_weights is None:
        raise MoLEError("mole_constant draws with per-block weights (export_block_weights): pass block_weights")
    mole = request.pipe.mole
    if not mole.fused:  # fused once for the run of mole_constant images (the work list is grouped by method)
        mole.set_experts(request.names, request.block_weights)
        mole.fuse()
    return _image(request)


def _constant(request: DrawRequest, names: list[str], weights: list[float]) -> list[Image.Image]:
    request.pipe.mole.set_experts(names, weights)
    return _image(request)


def _nla(request: DrawRequest) -> list[Image.Image]:
    return _constant(request, request.names, request.weights)


def _sum(request: DrawRequest) -> list[Image.Image]:
    return _constant(request, request.names, [1.0] * len(request.names))


def _single(request: DrawRequest, name: str) -> list[Image.Image]:
    return _constant(request, [name], [1.0])


def _on_reference(request: DrawRequest, method: str, set_up: Callable[[Any], None] = lambda reference: None) -> list[Image.Image]:
    """An image of diffusers' own pipeline, set up for it, then set back to the NLA adapters."""
    reference = request.reference_pipe
    if reference is None:
        raise MoLEError(f"{method} draws with diffusers' own pipeline, the LoRAs loaded as adapters: pass reference_pipe")
    set_up(reference)
    try:
        return reference(request.prompt, **request.call).images
    finally:
        reference.enable_lora()
        reference.set_adapters(request.names, request.weights)


def _set_adapters(request: DrawRequest) -> list[Image.Image]:
    return _on_reference(request, "set_adapters")


def _peft(request: DrawRequest, merge: str) -> list[Image.Image]:
    adapter = f"peft_{merge}"  # the merged adapter add_peft_merges added
    return _on_reference(request, adapter, lambda reference: reference.set_adapters([adapter], [1.0]))


def _base(request: DrawRequest) -> list[Image.Image]:
    if request.reference_pipe is None:  # zero weights add exactly nothing: the base model's own image
        return _constant(request, request.names, [0.0] * len(request.names))
    return _on_reference(request, "base", lambda reference: reference.disable_lora())


def _switch_method(request: DrawRequest) -> list[Image.Image]:
    return _switch(request.pipe, request.names, request.switch_every, request.prompt, request.call)


def _composite(request: DrawRequest) -> list[Image.Image]:
    with composite(request.pipe, request.names):
        return _image(request)


def _regional(request: DrawRequest, own_trigger_tokens: bool = False) -> list[Image.Image]:
    if not request.triggers:
        raise MoLEError("regional routing needs each expert's trigger words: pass triggers")
    regional = request.pipe.mole.regional
    # enabled once for the run of regional images, like mole_constant's fusing
    if regional is None or regional.own_trigger_tokens != own_trigger_tokens:
        request.pipe.mole.set_experts(None)
        request.pipe.enable_regional_routing(request.triggers, own_trigger_tokens=own_trigger_tokens)
    return _image(request)


def one_hot(names: list[str], index: int) -> list[float]:
    return [1.0 if i == index else 0.0 for i in range(len(names))]


def _switch(pipe, names: list[str], every: int, prompt: str | list[str], kwargs) -> list[Image.Image]:
    """LoRA Switch: step i uses LoRA (i // every) mod N alone."""
    pipe.mole.set_experts(names, one_hot(names, 0))

    def next_step(pipeline, step: int, timestep, callback_kwargs):
        pipe.mole.set_experts(names, one_hot(names, ((step + 1) // every) % len(names)))
        return callback_kwargs

    return pipe(prompt, callback_on_step_end=next_step, **kwargs).images


@contextmanager
def composite(pipe, names: list[str]):
    """LoRA Composite: every UNet (or Flux transformer) call returns the mean of the N single-LoRA predictions."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    unet, mole = getattr(pipe, pipe.denoiser), pipe.mole
    output = UNet2DConditionOutput if pipe.denoiser == "unet" else Transformer2DModelOutput
    forward = unet.forward

    def mean_forward(*args, return_dict: bool = True, **kwargs):
        outputs = []
        for index in range(len(names)):
            mole.set_experts(names, one_hot(names, index))
            outputs.append(forward(*args, return_dict=False, **kwargs)[0])
        sample = torch.stack(outputs).mean(dim=0)
        return output(sample=sample) if return_dict else (sample,)

    unet.forward = mean_forward
    try:
        yield
    finally:
        del unet.forward  # back to the class's forward


def add_peft_merges(pipe, names: list[str], weights: list[float], combination_types: list[str], density: float = 0.5) -> None:
    """PEFT's ``add_weighted_adapter`` on diffusers' adapters: a merged adapter ``peft_<type>`` per type in the
    UNet and the text encoder. ``cat`` is exact (the weighted sum of deltas); ``svd`` truncates that sum to
    the largest rank; ``ties`` / ``dare_linear`` (density 0.5) combine the A's and the B's separately."""
    from peft import LoraModel

    torch.manual_seed(0)  # dare drops entries at random: the same merge on every run
    for model in lora_components(pipe).values():
        configs = getattr(model, "peft_config", {})
        if not combination_types or not all(n in configs for n in names):
            continue
        # a LoraModel over the adapters diffusers loaded; it adds one inactive zero adapter of its own
        with quiet_multiple_adapters():  # PEFT warns that the model already holds adapters: it is meant to
            tuner = LoraModel(model, {"merge_scratch": configs[names[0]]}, "merge_scratch")
        for kind in combination_types:
            extra = {"density": density} if kind in SAME_RANK_MERGES else {}
            tuner.add_weighted_adapter(names, weights, f"peft_{kind}", combination_type=kind, **extra)


def active_experts(method: str, names: list[str]) -> list[str]:
    """The concepts a method means to draw: all but the masked one (``<method>_without_<name>``, image folders
    too), the single LoRA's, none for the base."""
    if method == "base":
        return []
    if method.startswith("single_"):
        return [method.removeprefix("single_")]
    return [n for n in names if not method.endswith(f"_without_{n}")]

"""``GateConfig``: every setting of a MoLE model's gates in one place, checked once, recorded in gate files."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from .errors import MoLEError
from .gates import check_activation, check_sigmoid_prior, check_timestep_knots

GRANULARITIES = ("block", "layer", "network")


@dataclass(frozen=True)
class GateConfig:
    """How MoLE gates its experts (docs/method.md), as PEFT's ``LoraConfig`` says how a LoRA adapts.

    ``granularity``: "block" (the paper's: a gate per UNet transformer block, resnet block and CLIP encoder layer;
    Flux: per double and single block), "layer" (a gate per adapted module) or "network" (one per model, reading
    the prompt embedding, or the text encoder's token embeddings).

    ``activation``: "softmax" (the paper's gate: weights on the simplex), "sigmoid" (a weight in (0, 1) per
    expert, off the simplex) or "softplus" (a weight in (0, inf) per expert: a LoRA may act above its trained
    strength). None (the default): "softplus" at prior 1 per expert when ``triggers`` are given and
    ``prior_weights`` are not (the gates that compose, below), else "softmax"; decided when the config meets its
    experts (``for_experts``).

    ``per_position``: the denoiser's block gates also weigh each image position by its own feature (granularity
    "block" only).

    ``timestep_knots``: 0 (off), or K >= 2: the denoiser's gates also read the step's noise level, K learned logit
    offsets per expert at evenly spaced noise levels.

    ``prior_weights``: what the untrained gates return, one positive weight per expert in the order the experts
    are loaded (kept as a tuple), or {expert name: weight}; None: uniform. Untrained, every kind of gate is NLA
    with these weights; a sigmoid gate's must each be below 1.

    ``triggers``: {expert name: its trigger word or words}, or None. Given, a gate's weight for an expert is 0 in
    every image whose prompt lacks that expert's trigger words, and its output in the others: trained on each
    concept's own images, the gates then learn each LoRA's strength from its own concept's images only (the other
    LoRAs are off there), so a prompt naming several concepts gets each at the strength its own images taught.
    Without it, "this image is another concept's" is all such gates can learn, and they turn every LoRA but one
    down in a composition (docs/method.md). Kept as {name: tuple of lower-case words}.

    The default kind follows the measurements in docs/demo-world.md: with trigger words, ``GateConfig(triggers=...)``
    is softplus at prior 1, untrained each LoRA the prompt names at full strength (diffusers' ``set_adapters``
    with those LoRAs at 1) and, trained, composing as the plain sum does where the paper's gates draw no
    composition at all; without trigger words the paper's gate (softmax, uniform prior: untrained, NLA).

    Frozen, so it stays as checked; ``dataclasses.replace`` makes a changed copy, checked again.
    """

    granularity: str = "block"
    activation: str | None = None  # softplus with triggers, else softmax (see above)
    per_position: bool = False
    timestep_knots: int = 0
    prior_weights: Sequence[float] | Mapping[str, float] | None = None
    triggers: Mapping[str, str | Sequence[str]] | None = None

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise MoLEError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.activation is not None:
            check_activation(self.activation)
        if not isinstance(self.per_position, bool):  # a gate file records it as JSON true / false
            raise MoLEError(f"per_position must be True or False, got {self.per_position!r}")
        if self.per_position and self.granularity != "block":
            raise MoLEError(f"per-position gates read a block's feature map: granularity 'block', not {self.granularity!r}")
        check_timestep_knots(self.timestep_knots)
        if self.prior_weights is not None:
            prior = _checked_prior(self.prior_weights)
            if self.activation == "sigmoid":
                check_sigmoid_prior(list(prior.values() if isinstance(prior, dict) else prior))
            object.__setattr__(self, "prior_weights", prior)
        if self.triggers is not None:
            object.__setattr__(self, "triggers", _checked_triggers(self.triggers))

    def for_experts(self, names: Sequence[str]) -> GateConfig:
        """This config with ``prior_weights`` as one weight per expert of ``names``, in that order (a mapping is
        read by name), as a MoLE of these experts records it."""
        if self.triggers is not None and sorted(self.triggers) != sorted(names):
            raise MoLEError(f"triggers name the experts {sorted(self.triggers)}; the experts are {list(names)}")
        if self.activation is None:  # the default kind: with trigger words softplus at prior 1, else the paper's
            if self.triggers is not None and self.prior_weights is None:
                return replace(self, activation="softplus", prior_weights=(1.0,) * len(names)).for_experts(names)
            return replace(self, activation="softmax").for_experts(names)
        prior = self.prior_weights
        if prior is None:
            return self
        if isinstance(prior, Mapping):
            missing = [name for name in names if name not in prior]
            if missing:
                raise MoLEError(f"prior_weights has no weight for expert(s) {missing}; the experts are {list(names)}")
            prior = tuple(prior[name] for name in names)
        if len(prior) != len(names):
            raise MoLEError(f"prior_weights must be {len(names)} positive finite numbers (one per expert), got {list(prior)}")
        return replace(self, prior_weights=prior)


def _checked_prior(prior: Iterable[float] | Mapping[str, float]) -> tuple[float, ...] | dict[str, float]:
    """Positive finite floats: a tuple from a sequence (a list, a tensor...), a dict from a mapping."""
    if isinstance(prior, (str, bytes)) or not isinstance(prior, Iterable):
        raise MoLEError(f"prior_weights must be numbers, one per expert, or {{expert name: weight}}, got {prior!r}")
    given = list(prior.values() if isinstance(prior, Mapping) else prior)
    try:
        numbers = [float(w) for w in given]
    except (TypeError, ValueError):
        numbers = [math.nan]
    if not all(math.isfinite(w) and w > 0 for w in numbers):
        expected = "positive finite numbers, one per expert" if isinstance(prior, Mapping) else \
            f"{len(given)} positive finite numbers (one per expert)"
        raise MoLEError(f"prior_weights must be {expected}, got {prior}")
    return dict(zip(prior, numbers)) if isinstance(prior, Mapping) else tuple(numbers)


def _checked_triggers(triggers: Mapping[str, str | Sequence[str]]) -> dict[str, tuple[str, ...]]:
    """{name: lower-case words}, each expert with at least one word."""
    if not isinstance(triggers, Mapping):
        raise MoLEError(f"triggers must be {{expert name: trigger word(s)}}, got {triggers!r}")
    checked = {}
    for name, words in triggers.items():
        text = words if isinstance(words, str) else " ".join(w if isinstance(w, str) else "" for w in words)
        checked[name] = tuple(text_words(text))
        if not checked[name]:
            raise MoLEError(f"triggers: expert {name!r} needs a trigger word (e.g. \"sks\"), got {words!r}")
    return checked


def text_words(text: str) -> list[str]:
    """The lower-case words of a prompt, as trigger words are matched ("sks," is the word sks)."""
    return re.findall(r"[\w']+", text.lower())

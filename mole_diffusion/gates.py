"""The gate (docs/method.md): per-sample expert weights from a block's input hidden states."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MoLEError
from .layers import token_grid


def token_mean_direction(hidden_states: torch.Tensor) -> torch.Tensor:
    """f = mean_t(h_t / |h_t|): (B, L, C) or (B, C, H, W) or (B, C) -> (B, C), at any resolution or length."""
    h = hidden_states.float()
    if h.dim() == 4:  # feature maps: channels on dim 1, tokens are the pixels
        return F.normalize(h, dim=1).mean(dim=(2, 3))
    if h.dim() == 3:
        return F.normalize(h, dim=-1).mean(dim=1)
    return F.normalize(h, dim=-1)


ACTIVATIONS = ("softmax", "sigmoid", "softplus")


def check_activation(activation: str) -> None:
    """One of ``ACTIVATIONS``."""
    if activation not in ACTIVATIONS:
        raise MoLEError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def check_timestep_knots(knots: int) -> None:
    """A timestep-aware gate's knot count: 0 (off) or at least 2 (the ends of [0, 1], then evenly between)."""
    if not isinstance(knots, int) or knots == 1 or knots < 0:
        raise MoLEError(f"a timestep-aware gate needs at least 2 knots (0 for none), got {knots!r}")


def check_sigmoid_prior(prior: list[float]) -> None:
    """A sigmoid gate's prior weights: each below 1, as its bias is logit(prior)."""
    if not all(w < 1 for w in prior):
        raise MoLEError(f"sigmoid gates need prior weights below 1, got {prior} (one expert's default prior "
                        "is 1: pass prior_weights, e.g. [0.5])")


class Gate(nn.Module):
    """G = softmax((W_g f + b_g) / tau), tau = exp(log_tau); masked experts get logit -inf.

    Initialised with W_g = 0 and b_g = log(prior) (less its mean), so an untrained gate returns the prior
    weights for every input: an untrained MoLE is exactly NLA with those weights.

    Beyond the paper (docs/method.md): ``activation="sigmoid"`` gives each expert its own weight in (0, 1),
    sigmoid((W_g f + b_g) / tau) with b_g = logit(prior), off the simplex, so experts need not compete and the
    plain sum is reachable (untrained: still NLA with the prior); masked experts weigh 0. ``activation="softplus"``:
    softplus((W_g f + b_g) / tau) with b_g = softplus^-1(prior), a weight in (0, inf) per expert: a LoRA may act
    above its trained strength (untrained: NLA with the prior). ``per_position``:
    ``position_map`` also returns weights (B, N, H, W) from each position's own feature h_x / |h_x|, for the
    layers on image tokens (W_g = 0 gives the per-sample weights at every position). ``timestep_knots=K``
    (the denoiser's gates): the logits also get c(t), one offset per expert at K evenly spaced
    noise levels t in [0, 1] (t = 1: pure noise) interpolated linearly, so a LoRA can act early (layout) and
    another late (texture); c = 0 at start, the plain gate.
    """

    def __init__(self, num_experts: int, in_features: int, prior_weights: torch.Tensor | None = None,
                 activation: str = "softmax", per_position: bool = False, timestep_knots: int = 0):
        super().__init__()
        check_activation(activation)
        if prior_weights is None:
            prior_weights = torch.full((num_experts,), 1.0 / num_experts)
        prior = torch.as_tensor(prior_weights, dtype=torch.float32)
        if activation == "sigmoid":
            check_sigmoid_prior(prior.tolist())
        self.activation, self.per_position = activation, per_position
        self.weight = nn.Parameter(torch.zeros(num_experts, in_features))
        # softmax: log(prior) less its mean, the same weights (softmax ignores a shift), but a uniform prior's
        # logits are then exactly 0, so the temperature's gradient at the start is exactly 0 as in the math,
        # not rounding noise that Adam would blow up into a random first step
        log_prior = prior.log()
        centre = log_prior[log_prior.isfinite()].mean() if bool(log_prior.isfinite().any()) else 0.0
        bias = {"softmax": lambda: log_prior - centre, "sigmoid": lambda: torch.logit(prior),
                "softplus": lambda: prior.expm1().log()}[activation]()  # softplus(log(e^p - 1)) = p
        self.bias = nn.Parameter(bias)
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.set_timestep_knots(timestep_knots)
        self.register_buffer("mask", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        # Constant weights (1, N) that replace the gate in NLA / plain-sum mode (see MoLE.set_experts).
        self.register_buffer("constant", torch.zeros(1, num_experts), persistent=False)
        self.weights: torch.Tensor | None = None  # what the layers of this gate apply in the current forward
        # Per-position routing (docs/method.md): (B, N, h, w) weights over the image, or None. Layers on image
        # tokens apply them resampled to their own grid; layers on the prompt's tokens keep ``weights``.
        self.position_weights: torch.Tensor | None = None
        self._resampled: tuple[torch.Tensor | None, dict] = (None, {})  # position_weights per grid, for this forward
        # Flux's single blocks run the prompt's tokens in front of the image's: that many leading tokens of their
        # layers are not image positions and keep the per-sample weights (0 elsewhere)
        self.leading_tokens = 0
        # (B, T, N) for the layers on the prompt's tokens, each token its own weights (regional routing's
        # own_trigger_tokens), or None: ``weights`` for every token
        self.prompt_token_weights: torch.Tensor | None = None
        self.history: list[torch.Tensor] = []  # per-call weights, while recording

    def set_timestep_knots(self, knots: int) -> None:
        """Make the gate timestep-aware with ``knots`` (>= 2) offsets per expert, all 0, or plain (0)."""
        check_timestep_knots(knots)
        if "timestep_logits" in self._parameters:
            del self._parameters["timestep_logits"]
        self.timestep_logits = nn.Parameter(torch.zeros(len(self.bias), knots, device=self.bias.device)) if knots else None

    def timestep_offsets(self, t: torch.Tensor, batch: int) -> torch.Tensor:
        """c(t): (batch, N) logit offsets at noise levels ``t`` in [0, 1] (a number or (batch,))."""
        knots = self.timestep_logits.float()
        position = torch.as_tensor(t, dtype=torch.float32, device=knots.device).clamp(0, 1).expand(batch) * (knots.shape[1] - 1)
        left = position.floor().clamp(max=knots.shape[1] - 2).long()
        right_share = (position - left)[:, None]
        return knots[:, left].T * (1 - right_share) + knots[:, left + 1].T * right_share

    def forward(self, hidden_states: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """(B, ...) hidden states -> (B, N) weights; ``t``: the noise level in [0, 1] of a timestep-aware gate."""
        # fp32 whatever the model runs in: under autocast the logits would be half precision, and small trained
        # weight differences (or a near-tie in the softmax) would round away. The layers cast what they apply.
        device = hidden_states.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            features = token_mean_direction(hidden_states)
            logits = F.linear(features, self.weight.float(), self.bias.float())
            if t is not None and self.timestep_logits is not None:
                logits = logits + self.timestep_offsets(t, len(features))
            return self.activate(logits, dim=-1)

    def position_map(self, hidden_states: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) feature map -> (B, N, H, W): the gate applied to each position's unit feature."""
        device = hidden_states.device.type
        with torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext():
            features = F.normalize(hidden_states.float(), dim=1)
            logits = torch.einsum("bchw,nc->bnhw", features, self.weight.float()) + self.bias.float()[:, None, None]
            if t is not None and self.timestep_logits is not None:
                logits = logits + self.timestep_offsets(t, len(features))[..., None, None]
            return self.activate(logits, dim=1)

    def position_weights_on(self, size: tuple[int, int]) -> torch.Tensor:
        """``position_weights`` on an (H, W) grid (area-pooled down, nearest up), resampled once per forward for
        all the layers of this gate that share the grid."""
        source, cache = self._resampled
        if source is not self.position_weights:
            source, cache = self.position_weights, {}
            self._resampled = (source, cache)
        if size not in cache:
            if tuple(source.shape[-2:]) == size:
                cache[size] = source
            elif size[0] * size[1] <= source.shape[-2] * source.shape[-1]:
                cache[size] = F.adaptive_avg_pool2d(source, size)
            else:
                cache[size] = F.interpolate(source, size)
        return cache[size]

    def token_weights(self, tokens: int) -> torch.Tensor:
        """(B, tokens, N) for a layer on ``tokens`` tokens: each image position's weights on the layer's grid
        (a UNet level halves the finest grid; Flux's image tokens are one sequence, a 1 x L map), after any
        ``leading_tokens`` (the prompt's, in a Flux single block), which get the per-sample weights. Made once
        per forward for all the layers of this gate on as many tokens."""
        image_tokens = self.position_weights.shape[-2] * self.position_weights.shape[-1]
        lead = self.leading_tokens if self.leading_tokens and tokens == self.leading_tokens + image_tokens else 0
        grid = token_grid(tuple(self.position_weights.shape[-2:]), tokens - lead)
        on_grid = self.position_weights_on(grid)  # also renews the cache when the weights are new
        cache = self._resampled[1]
        if ("tokens", tokens) not in cache:
            weights = on_grid.flatten(2).transpose(1, 2)
            if lead:
                weights = torch.cat([self.weights[:, None].expand(-1, lead, -1).to(weights), weights], dim=1)
            cache[("tokens", tokens)] = weights
        return cache[("tokens", tokens)]

    def applied_weights(self) -> torch.Tensor:
        """(B, N): the weights of the last forward, averaged over positions for a per-position gate."""
        return self.weights if self.position_weights is None else self.position_weights.mean(dim=(2, 3))

    def activate(self, logits: torch.Tensor, dim: int) -> torch.Tensor:
        """Logits over experts (on ``dim``) -> weights: temperature, mask, then softmax, sigmoid or softplus."""
        logits = logits / self.log_temperature.float().exp()
        mask = self.mask.view(-1, *([1] * (logits.dim() - 1 - (dim % logits.dim()))))
        if self.activation == "softmax":
            return logits.masked_fill(~mask, float("-inf")).softmax(dim=dim)
        return (logits.sigmoid() if self.activation == "sigmoid" else F.softplus(logits)) * mask

    def _apply(self, fn, recurse=True):
        # Move with the model (.to(device), .cuda()) but never change dtype: pipe.to(torch.float16) or
        # unet.half() would round the trained gate to half precision, for good.
        def same_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(moved.device)

        return super()._apply(same_dtype, recurse)

    def extra_repr(self) -> str:
        extra = f", activation={self.activation}" + (", per_position=True" if self.per_position else "")
        extra += f", timestep_knots={self.timestep_logits.shape[1]}" if self.timestep_logits is not None else ""
        return f"num_experts={self.weight.shape[0]}, in_features={self.weight.shape[1]}{extra}"


def balance_loss(gate_weights: list[torch.Tensor], coverage: torch.Tensor | None = None) -> torch.Tensor:
    """L_balance = -sum_i log q_i, q = the mean expert weight over the gates and samples (docs/method.md).

    Computed from the live gate outputs, so it has a gradient (the official code detaches it). With every
    expert at every gate its minimum, N log N, is reached when the experts are used equally. ``coverage``:
    which experts act at which gate, see ``mean_expert_weights``.
    """
    return -mean_expert_weights(gate_weights, coverage).clamp_min(1e-12).log().sum()


def mean_expert_weights(gate_weights: list[torch.Tensor], coverage: torch.Tensor | None = None) -> torch.Tensor:
    """q: each expert's weight averaged over the samples and the gates, (N,).

    ``coverage`` (gates, N) booleans, one row per entry of ``gate_weights``: q_i averages only over the gates
    where expert i has a branch (``MoLE.gate_coverage``). Weight on an expert at a gate it does not act at
    does nothing, so counting it would reward the gate for wasting weight there (a UNet-only LoRA at a text
    encoder gate).
    """
    per_gate = torch.stack([w.float().mean(dim=0) for w in gate_weights])  # (gates, N)
    if coverage is None:
        return per_gate.mean(dim=0)
    coverage = coverage.to(per_gate.device, torch.bool)
    if coverage.shape != per_gate.shape:
        raise ValueError(f"coverage has shape {tuple(coverage.shape)}, expected (gates, experts) {tuple(per_gate.shape)}")
    return per_gate.where(coverage, 0.0).sum(dim=0) / coverage.sum(dim=0).clamp_min(1)

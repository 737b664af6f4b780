"""The gate of METHOD.md section 2: per-sample expert weights from a block's input hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def token_mean_direction(hidden_states: torch.Tensor) -> torch.Tensor:
    """f = mean_t(h_t / |h_t|): (B, L, C) or (B, C, H, W) or (B, C) -> (B, C), at any resolution or length."""
    h = hidden_states.float()
    if h.dim() == 4:  # feature maps: channels on dim 1, tokens are the pixels
        return F.normalize(h, dim=1).mean(dim=(2, 3))
    if h.dim() == 3:
        return F.normalize(h, dim=-1).mean(dim=1)
    return F.normalize(h, dim=-1)


class Gate(nn.Module):
    """G = softmax((W_g f + b_g) / tau), tau = exp(log_tau); masked experts get logit -inf.

    Initialised with W_g = 0 and b_g = log(prior), so an untrained gate returns the prior weights for every
    input: an untrained MoLE is exactly NLA with those weights.
    """

    def __init__(self, num_experts: int, in_features: int, prior_weights: torch.Tensor | None = None):
        super().__init__()
        if prior_weights is None:
            prior_weights = torch.full((num_experts,), 1.0 / num_experts)
        self.weight = nn.Parameter(torch.zeros(num_experts, in_features))
        self.bias = nn.Parameter(torch.as_tensor(prior_weights, dtype=torch.float32).log())
        self.log_temperature = nn.Parameter(torch.zeros(()))
        self.register_buffer("mask", torch.ones(num_experts, dtype=torch.bool), persistent=False)
        # Constant weights (1, N) that replace the gate in NLA / plain-sum mode (see MoLE.set_experts).
        self.register_buffer("constant", torch.zeros(1, num_experts), persistent=False)
        self.weights: torch.Tensor | None = None  # what the layers of this gate apply in the current forward
        self.history: list[torch.Tensor] = []  # per-call weights, while recording

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        features = token_mean_direction(hidden_states)
        logits = F.linear(features, self.weight.float(), self.bias.float()) / self.log_temperature.float().exp()
        return logits.masked_fill(~self.mask, float("-inf")).softmax(dim=-1)

    def extra_repr(self) -> str:
        return f"num_experts={self.weight.shape[0]}, in_features={self.weight.shape[1]}"


def balance_loss(gate_weights: list[torch.Tensor]) -> torch.Tensor:
    """L_balance = -sum_i log q_i, q = the mean expert weight over all gates and samples (METHOD.md section 5).

    Computed from the live gate outputs, so it has a gradient (the official code detaches it). Its minimum,
    N log N, is reached when the experts are used equally.
    """
    return -mean_expert_weights(gate_weights).clamp_min(1e-12).log().sum()


def mean_expert_weights(gate_weights: list[torch.Tensor]) -> torch.Tensor:
    """q: each expert's weight averaged over the gates and the samples, (N,)."""
    return torch.stack([w.float().mean(dim=0) for w in gate_weights]).mean(dim=0)

"""A frozen Linear/Conv2d plus N gated LoRA branches, computed as one low-rank product (METHOD.md section 3).

    y = W x + b + B_cat (g * (A_cat x)),   g = G[expert of each rank row] * s[expert]

Two matmuls per module whatever N is; no per-expert Python loop, no per-expert outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MoLELayer(nn.Module):
    """Wraps ``base_layer`` (kept as is, so unloading restores it bit for bit).

    ``lora_A``: (R, d_in) or (R, C_in, kh, kw); ``lora_B``: (d_out, R) or (C_out, R, 1, 1), the experts'
    factors concatenated along the rank; ``rank_expert[j]`` is the expert index of rank row j and
    ``rank_scale[j]`` its alpha / r. The gate whose weights apply is ``gate``; it runs before this layer
    (a forward pre-hook on its block) and leaves its (B, N) output, or its (1, N) constant, in ``gate.weights``.
    """

    def __init__(
        self,
        base_layer: nn.Linear | nn.Conv2d,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        rank_expert: torch.Tensor,
        rank_scale: torch.Tensor,
        gate: nn.Module,
    ):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        # Frozen expert factors travel with the model (.to) but stay out of its state_dict.
        self.register_buffer("lora_A", lora_A.to(weight.device, weight.dtype), persistent=False)
        self.register_buffer("lora_B", lora_B.to(weight.device, weight.dtype), persistent=False)
        self.register_buffer("rank_expert", rank_expert.to(weight.device), persistent=False)
        self.register_buffer("rank_scale", rank_scale.to(weight.device, torch.float32), persistent=False)
        object.__setattr__(self, "gate", gate)  # a reference, not a submodule: the gate belongs to its block
        self.fused = False

    def rank_weights(self, gate_weights: torch.Tensor) -> torch.Tensor:
        """(B or 1, R): each rank row's gate weight times its expert's alpha / r."""
        return gate_weights[:, self.rank_expert] * self.rank_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.fused:
            return y
        g = self.rank_weights(self.gate.weights).to(x.dtype)
        if isinstance(self.base_layer, nn.Conv2d):
            conv = self.base_layer
            u = F.conv2d(x, self.lora_A, None, conv.stride, conv.padding, conv.dilation)
            return y.add_(F.conv2d(u * g[:, :, None, None], self.lora_B))
        u = F.linear(x, self.lora_A)
        g = g.view(g.shape[0], *([1] * (u.dim() - 2)), g.shape[1])
        # In place where no gradient needs the unscaled u; addmm_ adds B u into y without a temporary.
        u = u * g if torch.is_grad_enabled() else u.mul_(g)
        y.view(-1, y.shape[-1]).addmm_(u.view(-1, u.shape[-1]), self.lora_B.t())
        return y

    @torch.no_grad()
    def constant_delta_weight(self) -> torch.Tensor:
        """B diag(g) A for the gate's constant weights: what ``fuse`` adds to the base weight."""
        g = self.rank_weights(self.gate.constant)[0].to(self.lora_A.dtype)
        if self.lora_A.dim() == 4:
            return torch.einsum("or,r,rihw->oihw", self.lora_B[:, :, 0, 0], g, self.lora_A)
        return (self.lora_B * g) @ self.lora_A

"""A frozen Linear/Conv2d plus N gated LoRA branches, computed as one low-rank product (METHOD.md section 3).

    y = W x + b + B_cat (g * (A_cat x)),   g = G[expert of each rank row] * s[expert]

Two matmuls per module whatever N is; no per-expert Python loop, no per-expert outputs. With per-position
routing (METHOD.md section 8) g is (B, L, R): each token's own weights, still in rank space.
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
        # cross-attention k/v and the text encoder read the prompt's tokens, not the image's: per-sample weights
        self.reads_prompt = False

    def rank_weights(self, gate_weights: torch.Tensor) -> torch.Tensor:
        """(B or 1, R) from (B or 1, N), or (B, L, R) from (B, L, N): each rank row's weight times its expert's alpha / r."""
        return gate_weights[..., self.rank_expert] * self.rank_scale


    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.fused:
            return y
        positional = None if self.reads_prompt else self.gate.position_weights
        if isinstance(self.base_layer, nn.Conv2d):
            conv = self.base_layer
            u = F.conv2d(x, self.lora_A, None, conv.stride, conv.padding, conv.dilation)
            if positional is None:
                g = self.rank_weights(self.gate.weights)[:, :, None, None]
            else:  # (B, R, H, W)
                g = self.gate.position_weights_on(tuple(u.shape[-2:]))[:, self.rank_expert] * self.rank_scale[:, None, None]
            return y.add_(F.conv2d(u * g.to(x.dtype), self.lora_B))
        u = F.linear(x, self.lora_A)
        if positional is not None and u.dim() == 3:  # (B, L, R): the image's tokens, row by row
            g = self.rank_weights(self.gate.token_weights(u.shape[1]))
        else:
            g = self.rank_weights(self.gate.weights)
            g = g.view(g.shape[0], *([1] * (u.dim() - 2)), g.shape[1])
        g = g.to(x.dtype)
        # In place where no gradient needs the unscaled u; addmm_ adds B u into y without a temporary.
        u = u * g if torch.is_grad_enabled() else u.mul_(g)
        # under autocast y is half precision while the factors stay as stored: add in y's dtype
        y.view(-1, y.shape[-1]).addmm_(u.view(-1, u.shape[-1]).to(y.dtype), self.lora_B.t().to(y.dtype))
        return y

    @torch.no_grad()
    def constant_delta_weight(self) -> torch.Tensor:
        """B diag(g) A for the gate's constant weights: what ``fuse`` adds to the base weight."""
        g = self.rank_weights(self.gate.constant)[0].to(self.lora_A.dtype)
        if self.lora_A.dim() == 4:
            return torch.einsum("or,r,rihw->oihw", self.lora_B[:, :, 0, 0], g, self.lora_A)
        return (self.lora_B * g) @ self.lora_A


def token_grid(size: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The (H, W) grid of ``tokens`` image tokens in a UNet whose finest grid is ``size``: each level halves the
    side (rounding up, as a stride-2 convolution with padding 1 does)."""
    height, width = size
    while height * width > tokens and height > 1:
        height, width = -(-height // 2), -(-width // 2)
    if height * width != tokens:
        raise ValueError(f"{tokens} tokens are not an image grid of the position weights' {tuple(size)} (halved)")
    return height, width

"""A frozen Linear/Conv2d plus N gated LoRA branches, computed as one low-rank product (docs/method.md).

    y = W x + b + B_cat (g * (A_cat x)),   g = G[expert of each rank row] * s[expert]

Two matmuls per module whatever N is; no per-expert Python loop, no per-expert outputs. With per-position
routing (docs/method.md) g is (B, L, R): each token's own weights, still in rank space.
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

    DoRA experts (``magnitude_offset``, (N, d_out), row k = s_k - 1 for a DoRA expert k, 0 for a LoRA expert)
    also rescale the base output per channel, y_k = (s_k - 1) W x + s_k B_k A_k x with s_k = m_k / ||W + B_k A_k||
    (their rows of ``lora_B`` hold s_k B_k): one more (B, N) x (N, d_out) product, still no per-expert pass.
    """

    def __init__(
        self,
        base_layer: nn.Linear | nn.Conv2d,
        lora_A: torch.Tensor,
        lora_B: torch.Tensor,
        rank_expert: torch.Tensor,
        rank_scale: torch.Tensor,
        gate: nn.Module,
        magnitude_offset: torch.Tensor | None = None,
    ):
        super().__init__()
        self.base_layer = base_layer
        weight = base_layer.weight
        # Frozen expert factors travel with the model (.to) but stay out of its state_dict.
        self.register_buffer("lora_A", lora_A.to(weight.device, weight.dtype), persistent=False)
        self.register_buffer("lora_B", lora_B.to(weight.device, weight.dtype), persistent=False)
        self.register_buffer("rank_expert", rank_expert.to(weight.device), persistent=False)
        self.register_buffer("rank_scale", rank_scale.to(weight.device, torch.float32), persistent=False)
        if magnitude_offset is not None:
            magnitude_offset = magnitude_offset.to(weight.device, torch.float32)
        self.register_buffer("magnitude_offset", magnitude_offset, persistent=False)
        # the rank rows of the active experts (None: all): masked experts are left out of the products, not
        # multiplied by 0, so nothing of theirs (not even an overflow to inf) reaches the output
        self.register_buffer("active_rows", None, persistent=False)
        object.__setattr__(self, "gate", gate)  # a reference, not a submodule: the gate belongs to its block
        self.fused = False
        # cross-attention k/v and the text encoder read the prompt's tokens, not the image's: per-sample weights
        self.reads_prompt = False

    def select_experts(self, active: torch.Tensor) -> None:
        """Keep the rank rows of the experts where ``active`` (N booleans) is True."""
        keep = active.to(self.rank_expert.device)[self.rank_expert]
        self.active_rows = None if bool(keep.all()) else keep.nonzero().flatten()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, rank_expert, rank_scale) of the active experts' rank rows."""
        rows = self.active_rows
        if rows is None:
            return self.lora_A, self.lora_B, self.rank_expert, self.rank_scale
        return self.lora_A[rows], self.lora_B[:, rows], self.rank_expert[rows], self.rank_scale[rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.fused:
            return y
        lora_A, lora_B, rank_expert, rank_scale = self.factors()
        if lora_A.shape[0] == 0:  # every expert of this layer is masked
            return y
        positional = None if self.reads_prompt else self.gate.position_weights
        offset = self.magnitude_offset
        if isinstance(self.base_layer, nn.Conv2d):
            conv = self.base_layer
            if positional is None:
                expert_weights = self.gate.weights  # (B, N)
                g = (expert_weights[:, rank_expert] * rank_scale)[:, :, None, None]
            else:  # (B, N, H, W)
                expert_weights = self.gate.position_weights_on(tuple(y.shape[-2:]))
                g = expert_weights[:, rank_expert] * rank_scale[:, None, None]
            if offset is not None:  # expert weights channels last: (B, 1, 1, N) or (B, H, W, N)
                per_channel = expert_weights[:, None, None, :] if positional is None else expert_weights.movedim(1, -1)
                y = self._rescale(y, per_channel, offset, channels_last=False)
            u = F.conv2d(x, lora_A, None, conv.stride, conv.padding, conv.dilation)
            return y.add_(F.conv2d(u * g.to(x.dtype), lora_B))
        u = F.linear(x, lora_A)
        prompt_tokens = self.gate.prompt_token_weights if self.reads_prompt else None
        if positional is not None and u.dim() == 3:  # (B, L, R): the image's tokens, row by row
            expert_weights = self.gate.token_weights(u.shape[1])
        elif prompt_tokens is not None and prompt_tokens.shape[:2] == u.shape[:2]:  # (B, T, N): the prompt's, each its own
            expert_weights = prompt_tokens
        else:
            expert_weights = self.gate.weights
            expert_weights = expert_weights.view(expert_weights.shape[0], *([1] * (u.dim() - 2)), expert_weights.shape[1])
        if offset is not None:
            y = self._rescale(y, expert_weights, offset, channels_last=True)
        g = (expert_weights[..., rank_expert] * rank_scale).to(x.dtype)
        # In place where no gradient needs the unscaled u; addmm_ adds B u into y without a temporary.
        u = u * g if torch.is_grad_enabled() else u.mul_(g)
        # under autocast y is half precision while the factors stay as stored: add in y's dtype
        y.view(-1, y.shape[-1]).addmm_(u.view(-1, u.shape[-1]).to(y.dtype), lora_B.t().to(y.dtype))
        return y

    def _rescale(self, y: torch.Tensor, expert_weights: torch.Tensor, offset: torch.Tensor, channels_last: bool) -> torch.Tensor:
        """y + (sum_k g_k (s_k - 1)) * W x: the DoRA experts' rescaling of the base output (without its bias)."""
        bias = self.base_layer.bias
        factor = (expert_weights @ offset).to(y.dtype)  # (..., d_out)
        if not channels_last:
            factor = factor.movedim(-1, 1)  # (B, C, 1, 1) or (B, C, H, W)
        base = y if bias is None else y - (bias if channels_last else bias[:, None, None])
        return y + factor * base

    @torch.no_grad()
    def constant_delta_weight(self) -> torch.Tensor:
        """B diag(g) A (plus the DoRA experts' rescaling of W) for the gate's constant weights: what ``fuse`` adds
        to the base weight."""
        lora_A, lora_B, rank_expert, rank_scale = self.factors()
        constant = self.gate.constant[0]
        g = (constant[rank_expert] * rank_scale).to(lora_A.dtype)
        if lora_A.dim() == 4:
            delta = torch.einsum("or,r,rihw->oihw", lora_B[:, :, 0, 0], g, lora_A)
        else:
            delta = (lora_B * g) @ lora_A
        if self.magnitude_offset is not None:
            factor = constant.to(self.magnitude_offset) @ self.magnitude_offset
            weight = self.base_layer.weight
            delta += factor.view(-1, *([1] * (weight.dim() - 1))).to(delta.dtype) * weight.to(delta.dtype)
        return delta


def token_grid(size: tuple[int, int], tokens: int) -> tuple[int, int]:
    """The (H, W) grid of ``tokens`` image tokens in a UNet whose finest grid is ``size``: each level halves the
    side (rounding up, as a stride-2 convolution with padding 1 does)."""
    height, width = size
    while height * width > tokens and height > 1:
        height, width = -(-height // 2), -(-width // 2)
    if height * width != tokens:
        raise ValueError(f"{tokens} tokens are not an image grid of the position weights' {tuple(size)} (halved)")
    return height, width

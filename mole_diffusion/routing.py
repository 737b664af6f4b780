"""Training-free regional routing (docs/method.md): each LoRA acts where its concept is in the image.

Where a concept is comes from the cross-attention maps of its trigger tokens ("sks" in "a photo of sks dog"),
read in the UNet's own pass by forward hooks on every cross-attention's ``to_q`` and ``to_k`` (no extra UNet
call, no LoRA-free pass). A denoising step routes by the maps of the step before it; the first step, which has
none, applies each expert named in the prompt everywhere (the plain sum with ``weights``).

Per map (CLoRA's recipe): the trigger tokens' attention probabilities, summed over the concept's tokens,
averaged over heads and over every cross-attention layer (each resampled to the latent grid), divided by
its maximum over the image and thresholded (``threshold``, 0.35 x max). Each expert's mask is its own, with no
softmax over experts at a position: an object and its style may both cover the same pixels. Under classifier-
free guidance the masks come from the prompt's half of the batch and apply to both halves.

Image-token layers apply ``weights[i] * mask_i(position)``; layers on the prompt's tokens (the text encoder,
cross-attention keys and values) apply ``weights[i]`` where the image's prompt names expert i, else 0: an expert
whose trigger a prompt lacks adds nothing to that image. All-ones masks with every trigger named are therefore the
constant weights exactly (all-ones weights: the plain sum, diffusers' ``set_adapters([1, ...])``).

With ``own_trigger_tokens``, a trigger word's own tokens take only their expert's weight in the layers on the
prompt's tokens (the other experts' text-encoder and key/value deltas leave that word alone), every other token
the weights above: one LoRA's text half no longer rewrites another concept's trigger. The text encoder finds the
triggers in the token ids of each of its calls (a negative prompt's too); the UNet's keys and values in the
prompts of ``set_prompts`` (the negative half of classifier-free guidance: no trigger).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import MoLEError
from .layers import token_grid


def rows_for_batch(rows: torch.Tensor, batch: int) -> torch.Tensor | None:
    """One row per image (``rows``, in the call's image order) for a model batch of ``batch`` samples: the images,
    or both guidance halves of them (rows repeated), or a text encoder's one sample per prompt (a prompt's images
    are consecutive); None when ``batch`` is neither."""
    images = len(rows)
    if batch % images == 0:
        return rows.repeat(batch // images, 1)
    if images % batch == 0:
        return rows[:: images // batch]
    return None


class RegionalRouting:
    def __init__(self, unet: nn.Module, tokenizer, expert_names: Sequence[str], triggers: Mapping[str, str | Sequence[str]],
                 weights: Sequence[float] | None, threshold: float, own_trigger_tokens: bool = False,
                 text_encoders: Sequence[nn.Module] = ()):
        missing = [n for n in expert_names if n not in triggers]
        if missing:
            raise MoLEError(f"regional routing needs a trigger word for every expert: none for {missing}")
        if not 0.0 <= threshold < 1.0:
            raise MoLEError(f"threshold is a fraction of each map's maximum, in [0, 1); got {threshold}")
        self.expert_names, self.threshold = list(expert_names), float(threshold)
        self.tokenizer = tokenizer
        self.trigger_ids = {}  # expert -> the token-id sequences of its trigger words
        for name in expert_names:
            words = [triggers[name]] if isinstance(triggers[name], str) else list(triggers[name])
            self.trigger_ids[name] = [tokenizer(w, add_special_tokens=False).input_ids for w in " ".join(words).split()]
            if not any(self.trigger_ids[name]):
                raise MoLEError(f"expert {name!r}: its trigger {triggers[name]!r} has no tokens to find in a prompt")
        weights = [1.0] * len(expert_names) if weights is None else [float(w) for w in weights]
        if len(weights) != len(expert_names):
            raise MoLEError(f"{len(weights)} weights for {len(expert_names)} experts {list(expert_names)}")
        self.weights = torch.tensor([weights])
        self.positions: torch.Tensor | None = None  # (B, N, T): which prompt tokens are each expert's trigger
        self.masks: torch.Tensor | None = None  # (UNet batch, N, H, W), for the next UNet call
        self.mask_history: list[torch.Tensor] = []  # the masks read from each UNet call of a pipeline call (prompt half)
        self.own_trigger_tokens = own_trigger_tokens
        self._text_positions: torch.Tensor | None = None  # (B, N, T), during a text-encoder call
        self._latent_size: tuple[int, int] | None = None
        self._maps: list[torch.Tensor] = []
        self._query: torch.Tensor | None = None
        cross_attentions = [m for name, m in unet.named_modules() if name.endswith("attn2")]  # BasicTransformerBlock's
        if not cross_attentions or not all(hasattr(m, "to_q") and hasattr(m, "to_k") for m in cross_attentions):
            raise MoLEError("regional routing reads the cross-attention (attn2.to_q / attn2.to_k) of a UNet's transformer "
                            "blocks; this UNet has none (or fused projections: unfuse_qkv_projections() first)")
        self._handles = [unet.register_forward_pre_hook(self._begin_unet_call, with_kwargs=True),
                         unet.register_forward_hook(self._end_unet_call, with_kwargs=True)]
        for module in cross_attentions:
            self._handles += [module.to_q.register_forward_hook(self._keep_query),
                              module.to_k.register_forward_hook(self._make_map_hook(module))]
        for text_encoder in text_encoders if own_trigger_tokens else ():
            self._handles += [text_encoder.register_forward_pre_hook(self._begin_text_call, with_kwargs=True),
                              text_encoder.register_forward_hook(self._end_text_call)]

    # -- per call ----------------------------------------------------------------------------------
    def set_prompts(self, prompts: Sequence[str]) -> None:
        """Find each expert's trigger tokens in the prompts (one per image of the call, in batch order)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        self.positions, self.masks, self.mask_history = self._find_triggers(ids), None, []

    def _find_triggers(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N, T): 1 at the tokens of each expert's trigger words in token ids (B, T)."""
        positions = torch.zeros(len(ids), len(self.expert_names), ids.shape[1])
        for b, row in enumerate(ids.tolist()):
            for n, name in enumerate(self.expert_names):
                for word in self.trigger_ids[name]:
                    for start in range(len(row) - len(word) + 1):
                        if row[start : start + len(word)] == word:
                            positions[b, n, start : start + len(word)] = 1.0
        return positions

    def _named(self) -> torch.Tensor:
        """(B, N): 1 where the image's prompt has the expert's trigger."""
        return (self.positions.sum(dim=-1) > 0).float()

    def reset(self) -> None:
        self.positions, self.masks = None, None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def sample_weights(self, gate_mask: torch.Tensor, batch: int) -> torch.Tensor:
        """(batch or 1, N): the constant weights, 0 for masked experts and for experts the image's prompt does not
        name (in a batch of ``batch`` samples: the images, or both halves of classifier-free guidance)."""
        weights = self.weights.to(gate_mask.device) * gate_mask
        if self.positions is None:
            return weights
        named = rows_for_batch(self._named().to(weights.device), batch)
        return weights if named is None else weights * named

    def prompt_token_weights(self, sample_weights: torch.Tensor) -> torch.Tensor | None:
        """(batch, T, N) for the layers on the prompt's tokens, with ``own_trigger_tokens``: a trigger's tokens
        keep only their own expert of ``sample_weights`` (batch, N), every other token all of them. None without
        ``own_trigger_tokens`` or prompts (the per-sample weights then apply to every token)."""
        positions = self._text_positions if self._text_positions is not None else self.positions
        if not self.own_trigger_tokens or positions is None:
            return None
        batch = len(sample_weights)
        if self._text_positions is None and batch == 2 * len(positions):  # the UNet under guidance: negative half first
            positions = torch.cat([torch.zeros_like(positions), positions])
        if len(positions) != batch:
            raise MoLEError(f"regional routing found triggers for {len(positions)} prompts in a batch of {batch}")
        owned = positions.to(sample_weights).transpose(1, 2)  # (batch, T, N)
        trigger = owned.sum(dim=-1, keepdim=True) > 0
        return torch.where(trigger, owned, torch.ones_like(owned)) * sample_weights[:, None, :]

    # -- hooks ------------------------------------------------------------------------------------
    def _begin_text_call(self, text_encoder, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        self._text_positions = None if ids is None else self._find_triggers(ids.cpu()).to(ids.device)

    def _end_text_call(self, text_encoder, args, output):
        self._text_positions = None

    def _begin_unet_call(self, unet, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        self._latent_size = tuple(sample.shape[-2:])
        self._maps.clear()
        if self.positions is not None:  # no masks before the first call has read its maps: the per-sample weights
            self.positions = self.positions.to(sample.device)  # (sample_weights) hold each expert named in its prompt

    def _keep_query(self, module, args, output):
        if self.positions is not None:
            self._query = output

    def _make_map_hook(self, attention):
        def hook(module, args, key):
            if self.positions is None or self._query is None or self._latent_size is None:
                return
            query, self._query = self._query, None
            prompts = len(self.positions)
            query, key = query[-prompts:].float(), key[-prompts:].float()  # the prompt's half under guidance
            heads = attention.heads
            q = query.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, L, d)
            k = key.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, heads, T, d)
            probabilities = (q @ k.transpose(-1, -2) * attention.scale).softmax(dim=-1).mean(dim=1)  # (B, L, T)
            per_expert = probabilities @ self.positions.transpose(1, 2)  # (B, L, N)
            grid = token_grid(self._latent_size, per_expert.shape[1])
            maps = per_expert.transpose(1, 2).unflatten(-1, grid)  # (B, N, h, w)
            self._maps.append(F.interpolate(maps, self._latent_size, mode="bilinear", align_corners=False))

        return hook

    def _end_unet_call(self, unet, args, kwargs, output):
        if self.positions is None:
            return
        if not self._maps:  # a processor that never called to_k: routing would silently be the plain sum
            raise MoLEError("regional routing read no cross-attention map in this UNet call (an attention processor "
                            "that does not call attn2.to_k?)")
        maps = torch.stack(self._maps).mean(dim=0)  # (B, N, H, W)
        peak = maps.flatten(2).amax(dim=-1)[..., None, None].clamp_min(1e-12)
        masks = (maps / peak >= self.threshold).float()
        masks = masks * self._named()[..., None, None]  # no trigger in the prompt: off
        self.mask_history.append(masks.cpu())
        sample = args[0] if args else kwargs["sample"]
        self.masks = masks.repeat(len(sample) // len(masks), 1, 1, 1)  # both guidance halves
        self._maps.clear()

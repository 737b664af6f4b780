"""``MoLEStableDiffusionPipeline``: diffusers' Stable Diffusion pipeline with gated LoRA experts."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
from diffusers import StableDiffusionPipeline

from ..experts import expert_paths, load_expert
from ..gate_file import load_gates, save_gates
from ..inject import MoLE, inject_experts


class MoLEStableDiffusionPipeline(StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` whose UNet and text encoder mix several LoRAs with learned gates.

    >>> pipe = MoLEStableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> pipe.load_experts({"dog": "dog.safetensors", "hat": "hat.safetensors"})
    >>> pipe.load_gates("gates.safetensors")
    >>> image = pipe("a photo of sks dog in a hat", experts=["dog", "hat"]).images[0]
    """

    @property
    def mole(self) -> MoLE | None:
        # Kept on the UNet, so a pipeline built from these components (`cls(**pipe.components)`) shares it.
        return self.unet.__dict__.get("_mole")

    def _require_mole(self) -> MoLE:
        if self.mole is None:
            raise RuntimeError("no experts are loaded: call load_experts(...) first")
        return self.mole

    @property
    def expert_names(self) -> list[str]:
        return [] if self.mole is None else self.mole.expert_names

    def _models(self) -> dict[str, torch.nn.Module]:
        models = {"unet": self.unet}
        if self.text_encoder is not None:
            models["text_encoder"] = self.text_encoder
        return models

    def load_experts(
        self,
        experts: dict[str, str | os.PathLike] | list[str | os.PathLike],
        granularity: str = "block",
        prior_weights: Sequence[float] | dict[str, float] | None = None,
    ) -> None:
        """Load LoRA files as experts (dict name -> path, or a list of paths named by their stems) and gate them.

        Every file is read and checked against the base model before any module is changed. Untrained gates
        return ``prior_weights`` (default uniform), so the result starts as NLA with those weights.
        """
        if self.mole is not None:
            raise RuntimeError(f"experts {self.expert_names} are already loaded: call unload_experts() first")
        named = expert_paths(experts)
        if isinstance(prior_weights, dict):
            prior_weights = [prior_weights[name] for name in named]
        loaded = [load_expert(name, path, self._models()) for name, path in named.items()]
        self.unet.__dict__["_mole"] = inject_experts(self._models(), loaded, granularity, prior_weights)

    def set_experts(
        self, names: Sequence[str] | None = None, weights: Sequence[float] | Mapping[str, Sequence[float]] | None = None
    ) -> None:
        """Which experts are active (None: all). ``weights`` means constant weights instead of gates: a sequence
        in the order of ``names`` (NLA with those weights, or the plain sum with all ones), or per-gate weights
        {gate name: one per expert} as ``export_block_weights`` returns."""
        self._require_mole().set_experts(names, weights)

    @torch.no_grad()
    def export_block_weights(self, prompts: Sequence[str], **kwargs) -> dict[str, list[float]]:
        """The learned gates' mean weights per gate over ``prompts`` (every denoising step, both guidance
        halves), as constant per-block weights for ``set_experts(weights=...)`` and ``fuse_experts()``
        (no gate cost), or for diffusers' ``set_adapters`` via ``mole_diffusion.block_weights_to_diffusers``.
        ``kwargs`` go to each pipeline call (steps, guidance, seed...)."""
        mole = self._require_mole()
        if mole.constant_weights is not None:
            raise RuntimeError("export_block_weights reads the learned gates: call set_experts() (no weights) first")
        sums: dict[str, torch.Tensor] = {}
        for prompt in prompts:
            self(prompt, **{"output_type": "latent", **kwargs})  # the gates are what counts, not the images
            for gate, history in self.gate_weights.items():
                sums[gate] = sums.get(gate, 0) + history.mean(dim=(0, 1))
        return {gate: (total / len(prompts)).tolist() for gate, total in sums.items()}

    def fuse_experts(self) -> None:
        """Fuse the constant weights into the base weights (``set_experts(names, weights)`` first)."""
        self._require_mole().fuse()

    def unfuse_experts(self) -> None:
        self._require_mole().unfuse()

    def unload_experts(self) -> None:
        """Back to the original modules, bit for bit."""
        if self.mole is not None:
            self.mole.remove()
            del self.unet.__dict__["_mole"]

    def save_gates(self, path: str | os.PathLike) -> None:
        save_gates(self._require_mole(), path, base_model=str(self.name_or_path or ""))

    def load_gates(self, path: str | os.PathLike) -> None:
        load_gates(self._require_mole(), path, base_model=str(self.name_or_path or ""))

    @property
    def gate_weights(self) -> dict[str, torch.Tensor]:
        """Gate weights of the last call: {gate name: (calls, batch, N)}, one call per denoising step for the
        UNet's gates (with classifier-free guidance the batch holds the unconditional half first)."""
        return {} if self.mole is None else self.mole.gate_history()

    def __call__(self, *args, experts: Sequence[str] | None = None, **kwargs):
        """Everything ``StableDiffusionPipeline.__call__`` takes, plus ``experts``: the names active for this
        call only (same meaning as ``set_experts(names)``)."""
        mole = self.mole
        if mole is None:
            return super().__call__(*args, **kwargs)
        saved = mole.active
        if experts is not None:
            mole.mask_experts(experts)
        mole.clear_history()
        mole.record = True
        try:
            return super().__call__(*args, **kwargs)
        finally:
            mole.record = False
            if experts is not None:
                mole.mask_experts(saved)

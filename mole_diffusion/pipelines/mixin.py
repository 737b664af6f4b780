"""The MoLE API shared by the pipelines: experts, gates, masking, constant weights, fusing, regional routing."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch

from ..config import GateConfig
from ..errors import MoLEError
from ..experts import expert_paths, load_expert, lora_components
from ..gate_file import load_gates, save_gates
from ..inject import MoLE, inject_experts
from ..routing import RegionalRouting


def _refuse_non_finite(denoiser, args, output) -> None:
    """Stop a run whose prediction holds NaN or inf (an fp16 overflow, say) at that step, instead of finishing it
    and writing a black image."""
    prediction = output[0] if isinstance(output, tuple) else output.sample
    if not bool(torch.isfinite(prediction).all()):
        raise MoLEError(f"the {type(denoiser).__name__}'s prediction holds NaN or inf: nothing was written. With "
                        "float16, try float32 or bfloat16; check the experts' weights and the gates")


class MoLEPipelineMixin:
    """The MoLE API of every pipeline here, mixed in before the diffusers pipeline class it extends.

    A pipeline class names its ``family`` (recorded in gate files) and ``denoiser`` ("unet" or "transformer");
    the components experts may adapt are diffusers' own list for that class (``_lora_loadable_modules``),
    so LoRA files are read with that class's ``lora_state_dict``, as its ``load_lora_weights`` reads them.
    """

    family: str
    denoiser: str = "unet"

    @classmethod
    def diffusers_class(cls) -> type:
        """The diffusers pipeline this one extends (the reference for diffusers' own LoRA loading)."""
        return cls.__mro__[cls.__mro__.index(MoLEPipelineMixin) + 1]

    @property
    def mole(self) -> MoLE | None:
        # Kept on the denoiser, so a pipeline built from these components (`cls(**pipe.components)`) shares it.
        return getattr(self, self.denoiser).__dict__.get("_mole")

    def _require_mole(self) -> MoLE:
        if self.mole is None:
            raise RuntimeError("no experts are loaded: call load_experts(...) first")
        return self.mole

    @property
    def expert_names(self) -> list[str]:
        return [] if self.mole is None else self.mole.expert_names

    def load_experts(
        self,
        experts: dict[str, str | os.PathLike] | list[str | os.PathLike],
        granularity: str | None = None,
        prior_weights: Sequence[float] | Mapping[str, float] | None = None,
        activation: str | None = None,
        per_position: bool | None = None,
        timestep_knots: int | None = None,
        *,
        triggers: Mapping[str, str | Sequence[str]] | None = None,
        gate_config: GateConfig | None = None,
    ) -> None:
        """Load LoRA files as experts (dict name -> path, or a list of paths named by their stems) and gate them.

        The gates are what ``gate_config`` says (``GateConfig``: granularity, activation, per position, timestep
        knots, prior weights, trigger words; default ``GateConfig()``), or what its fields given as keywords say,
        the others at their defaults: ``load_experts(files, activation="sigmoid")`` is
        ``load_experts(files, gate_config=GateConfig(activation="sigmoid"))``. Not both.

        With ``triggers`` ({expert name: its trigger word or words}) the default gates are gates with trigger words:
        untrained, each image gets the LoRAs its prompt names, each at full strength, as diffusers'
        ``set_adapters`` with those LoRAs at weight 1; ``train-gates`` trains them on each concept's own images.
        Without, the paper's gates: untrained, NLA with the prior weights (default uniform). Every file is read and
        checked against the base model before any module is changed. A gate file records its gates' config, and
        ``load_gates`` restores its kind (the granularity must match).
        """
        if self.mole is not None:
            raise RuntimeError(f"experts {self.expert_names} are already loaded: call unload_experts() first")
        settings = {"granularity": granularity, "prior_weights": prior_weights, "activation": activation,
                    "per_position": per_position, "timestep_knots": timestep_knots, "triggers": triggers}
        given = {name: value for name, value in settings.items() if value is not None}
        if gate_config is not None and given:
            raise MoLEError(f"the gate settings go in gate_config or as keywords, not both: gate_config and {sorted(given)} given")
        gate_config = GateConfig(**given) if gate_config is None else gate_config
        named = expert_paths(experts)
        models = lora_components(self)
        loaded = [load_expert(name, path, models, type(self)) for name, path in named.items()]
        getattr(self, self.denoiser).__dict__["_mole"] = inject_experts(models, loaded, gate_config)

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

    def enable_regional_routing(
        self, triggers: Mapping[str, str | Sequence[str]], weights: Sequence[float] | None = None, threshold: float = 0.35,
        own_trigger_tokens: bool = False,
    ) -> None:
        """Training-free regional routing (``mole_diffusion.routing``): each expert acts, with its constant weight
        (default 1: the plain sum), only where the cross-attention of its trigger word(s) points, read in the
        UNet's own pass. ``triggers``: {expert name: word or words of the prompt}, e.g. {"dog": "sks"}.
        Masking (``set_experts(names)``, ``experts=`` per call) still applies; learned gates are not used."""
        mole = self._require_mole()
        if self.denoiser != "unet":
            raise MoLEError(f"regional routing reads the UNet's cross-attention maps; {type(self).__name__} has none")
        if mole.fused:
            raise MoLEError("experts are fused into the base weights: call unfuse_experts() first")
        self.disable_regional_routing()
        mole.regional = RegionalRouting(self.unet, self.tokenizer, mole.expert_names, triggers, weights, threshold,
                                        own_trigger_tokens, [getattr(self, name) for name in ("text_encoder", "text_encoder_2")
                                                             if getattr(self, name, None) is not None])

    def disable_regional_routing(self) -> None:
        mole = self.mole
        if mole is not None and mole.regional is not None:
            mole.regional.remove()
            mole.regional = None

    @property
    def expert_masks(self) -> torch.Tensor | None:
        """Regional routing's masks of the last call, read after each UNet call: (calls, images, N, H, W) on the
        latent grid, for the prompt half of the batch (None without regional routing). Entry k is what UNet call
        k + 1 applied; the last one was read after the last step and never applied."""
        regional = None if self.mole is None else self.mole.regional
        return torch.stack(regional.mask_history) if regional is not None and regional.mask_history else None

    def fuse_experts(self) -> None:
        """Fuse the constant weights into the base weights (``set_experts(names, weights)`` first)."""
        self._require_mole().fuse()

    def unfuse_experts(self) -> None:
        self._require_mole().unfuse()

    def unload_experts(self) -> None:
        """Back to the original modules, bit for bit."""
        if self.mole is not None:
            self.mole.remove()
            del getattr(self, self.denoiser).__dict__["_mole"]

    def save_pretrained(self, *args, **kwargs) -> None:
        """diffusers' ``save_pretrained``, refused while experts are loaded: the wrapped modules would be written
        as ``base_layer`` / ``mole_gate`` keys that no diffusers pipeline loads."""
        if self.mole is not None:
            raise MoLEError("experts are loaded: save_pretrained would write MoLE's wrapped modules, which diffusers "
                            "cannot load. Save the gates with save_gates(path) (the LoRA files are the experts), and "
                            "call unload_experts() before save_pretrained to save the base model")
        super().save_pretrained(*args, **kwargs)

    def save_gates(self, path: str | os.PathLike) -> None:
        save_gates(self._require_mole(), path, base_model=str(self.name_or_path or ""), family=self.family)

    def load_gates(self, path: str | os.PathLike) -> None:
        load_gates(self._require_mole(), path, base_model=str(self.name_or_path or ""), family=self.family)

    @property
    def gate_weights(self) -> dict[str, torch.Tensor]:
        """Gate weights of the last call: {gate name: (calls, batch, N)}, one call per denoising step for the
        denoiser's gates (with classifier-free guidance the batch holds the unconditional half first)."""
        return {} if self.mole is None else self.mole.gate_history()

    def __call__(self, *args, experts: Sequence[str] | None = None, **kwargs):
        """Everything the diffusers pipeline's ``__call__`` takes, plus ``experts``: the names active for this
        call only (same meaning as ``set_experts(names)``)."""
        mole = self.mole
        if mole is None:
            return super().__call__(*args, **kwargs)
        # may refuse: before any change
        prompts = self._prompts_of_call(args, kwargs) if mole.regional is not None or mole.gate_config.triggers else None
        saved = mole.active
        if experts is not None:
            mole.mask_experts(experts)
        mole.clear_history()
        mole.record = True
        if prompts is not None and mole.regional is not None:
            mole.regional.set_prompts(prompts)
        mole.set_prompts(prompts)  # gates with trigger words weigh each expert by whether its prompt names it
        finite_check = getattr(self, self.denoiser).register_forward_hook(_refuse_non_finite)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            finite_check.remove()
            mole.record = False
            if mole.regional is not None:
                mole.regional.reset()
            mole.set_prompts(None)
            if experts is not None:
                mole.mask_experts(saved)

    @staticmethod
    def _prompts_of_call(args: tuple, kwargs: dict) -> list[str]:
        """One prompt per image of a call, in the pipeline's batch order (each prompt num_images_per_prompt times)."""
        prompt = args[0] if args else kwargs.get("prompt")
        if prompt is None:
            raise MoLEError("regional routing and gates with trigger words find each expert's trigger words in the "
                            "prompt: pass prompt=, not prompt_embeds=")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return [p for p in prompts for _ in range(kwargs.get("num_images_per_prompt") or 1)]

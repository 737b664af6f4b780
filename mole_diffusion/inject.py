"""Injection: wrap every module an expert adapts in a ``MoLELayer`` and put a ``Gate`` on every block.

``inject_experts`` is the one function that changes a model; ``MoLE`` (what it returns) switches experts on
and off, holds constant weights, fuses them, and restores the original modules.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.transformers.transformer_flux import (
    FluxSingleTransformerBlock,
    FluxTransformer2DModel,
    FluxTransformerBlock,
)
from torch import nn
from transformers.models.clip.modeling_clip import CLIPEncoderLayer

from .config import GateConfig, text_words
from .errors import MoLEError
from .experts import Expert
from .gates import Gate
from .layers import MoLELayer
from .routing import RegionalRouting, rows_for_batch

# Block granularity (docs/method.md): one gate per Transformer2DModel / CLIPEncoderLayer; LoRAs outside one (resnet convs)
# share their ResnetBlock2D's gate. Flux: one gate per double block (FluxTransformerBlock) and per single block
# (FluxSingleTransformerBlock), reading the block's image tokens (``hidden_states``; a single block concatenates
# the text tokens in front of them only inside its forward), so a gate sees the same kind of input in both.
# A module in none of these gets a gate of its own.
BLOCK_TYPES = (Transformer2DModel, CLIPEncoderLayer, ResnetBlock2D, FluxTransformerBlock, FluxSingleTransformerBlock)
DENOISERS = (UNet2DConditionModel, FluxTransformer2DModel)
FLUX_BLOCKS = (FluxTransformerBlock, FluxSingleTransformerBlock)
# Modules whose input is the prompt's tokens (the UNet's cross-attention keys and values, the text stream of
# Flux's double blocks): per-position routing leaves them per-sample, as there is no image position to route by.
PROMPT_TOKEN_MODULES = ("attn2.to_k", "attn2.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                        "attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2", "norm1_context.linear")


def _gate_scope(component: str, model: nn.Module, module_name: str, granularity: str) -> str:
    """Name (inside ``model``) of the module whose input the gate of ``module_name`` reads."""
    if granularity == "layer":
        return module_name
    if granularity == "network":
        # UNet / Flux transformer: the prompt embedding (encoder_hidden_states), known before any adapted module
        # runs. Text encoder: the token embeddings entering the encoder.
        if isinstance(model, DENOISERS):
            return ""
        return module_name[: module_name.index("encoder.layers.")] + "encoder"
    parts = module_name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        scope = ".".join(parts[:end])
        if isinstance(model.get_submodule(scope), BLOCK_TYPES):
            return scope
    return module_name


def _scope_input(scope: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """The hidden states a gate reads, from its scope module's forward arguments."""
    if isinstance(scope, DENOISERS):  # UNet (sample, timestep, prompt), Flux (image tokens, prompt, ...)
        position = 2 if isinstance(scope, UNet2DConditionModel) else 1
        return kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[position]
    for key in ("hidden_states", "input_tensor", "inputs_embeds"):
        if key in kwargs:
            return kwargs[key]
    return args[0]


def _scope_input_prompt(args: tuple, kwargs: dict) -> torch.Tensor:
    """A Flux block's prompt tokens (its second argument)."""
    return kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]


class MoLE:
    """The experts injected into a pipeline's models, their gates, and the switches over them."""

    def __init__(self, experts: list[Expert], gate_config: GateConfig):
        self.experts = experts
        self.gate_config = gate_config  # the gates' settings (any prior: a weight per expert, in order), saved with them
        # the denoiser call's noise level in [0, 1] (timestep / 1000 in a UNet, Flux's sigma), for timestep-aware gates
        self.noise_level: torch.Tensor | None = None
        self.gates: dict[str, Gate] = {}  # "unet.down_blocks.0.attentions.0" -> Gate
        self.layers: dict[str, MoLELayer] = {}  # "unet.down_blocks.0...to_q" -> MoLELayer
        self._originals: dict[str, tuple[nn.Module, str, nn.Module]] = {}  # name -> (parent, attr, original)
        self._gate_homes: dict[str, tuple[nn.Module, torch.utils.hooks.RemovableHandle]] = {}
        self._timestep_handles: list[torch.utils.hooks.RemovableHandle] = []
        self.active: list[str] = list(self.expert_names)
        # None: learned gates; a list: the same N weights at every gate; a dict: N weights per gate
        self.constant_weights: list[float] | dict[str, list[float]] | None = None
        self.fused = False
        self.record = False
        self.regional: RegionalRouting | None = None  # training-free routing by region (routing.py), when enabled
        # (prompts, N): 1 where a prompt of the current call names the expert's trigger (gates with triggers)
        self.prompt_experts: torch.Tensor | None = None
        self._named_by_batch: dict[tuple, torch.Tensor] = {}  # prompt_experts per model batch (_named_in)

    @property
    def expert_names(self) -> list[str]:
        return [e.name for e in self.experts]

    def set_prompts(self, prompts: Sequence[str] | None) -> None:
        """The prompts of the next calls, one per image in batch order (None: forget them), for gates with
        ``triggers``: each expert weighs 0 in an image whose prompt lacks its trigger words."""
        triggers = self.gate_config.triggers
        self.prompt_experts, self._named_by_batch = None, {}
        if prompts is None or not triggers:
            return
        words = [set(text_words(prompt)) for prompt in prompts]
        self.prompt_experts = torch.tensor([[float(all(w in row for w in triggers[n])) for n in self.expert_names] for row in words])

    def _named_in(self, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(batch, N) of ``prompt_experts`` for a model batch (``rows_for_batch``), on ``like``'s device and dtype:
        made once per call and batch size, not at every gate of every step."""
        if self.prompt_experts is None:
            raise MoLEError(f"these gates have trigger words ({dict(self.gate_config.triggers)}): they weigh each expert "
                            "by whether the prompt names it, so call the pipeline with prompt=, not prompt_embeds=")
        key = (batch, like.device, like.dtype)
        if key not in self._named_by_batch:
            named = rows_for_batch(self.prompt_experts, batch)
            if named is None:
                raise MoLEError(f"{len(self.prompt_experts)} prompts for a batch of {batch}")
            self._named_by_batch[key] = named.to(like)
        return self._named_by_batch[key]

    def gate_parameters(self) -> list[nn.Parameter]:
        return [p for gate in self.gates.values() for p in gate.parameters()]

    def gate_coverage(self) -> torch.Tensor:
        """(gates, experts) booleans, rows in ``gates`` order: True where a layer of the gate has rank rows of
        the expert. A UNet-only LoRA covers no text-encoder gate; the balance loss counts only covered pairs."""
        rows = {id(gate): row for row, gate in enumerate(self.gates.values())}
        coverage = torch.zeros(len(self.gates), len(self.experts), dtype=torch.bool)
        for layer in self.layers.values():
            coverage[rows[id(layer.gate)], layer.rank_expert.cpu()] = True
        return coverage

    # -- switching ------------------------------------------------------------------------------------
    def set_experts(
        self, names: Sequence[str] | None = None, weights: Sequence[float] | Mapping[str, Sequence[float]] | None = None
    ) -> None:
        """Active experts (None: all). With ``weights``, constant weights replace the gates: a sequence (in the
        order of ``names``) for every gate alike (NLA with those weights; all ones is the plain sum), or
        per-gate weights {gate name: one weight per expert, in ``expert_names`` order} as
        ``export_block_weights`` returns. Masked experts weigh 0."""
        names = self._checked(self.expert_names if names is None else names)
        if isinstance(weights, Mapping):
            weights = self._checked_block_weights(weights)
        elif weights is not None:
            weights = [float(w) for w in weights]
            if len(weights) != len(names):
                raise ValueError(f"{len(weights)} weights given for {len(names)} experts {names}")
            if not all(math.isfinite(w) for w in weights):
                raise MoLEError(f"weights must be finite numbers, got {weights}")
            by_name = dict(zip(names, weights))
            weights = [by_name.get(n, 0.0) for n in self.expert_names]
        self.constant_weights = weights
        self.mask_experts(names)

    def _checked_block_weights(self, weights: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
        if set(weights) != set(self.gates):
            raise ValueError(
                f"per-gate weights must name every gate of this MoLE ({self.gate_config.granularity} granularity): missing "
                f"{sorted(set(self.gates) - set(weights))[:3]}, unknown {sorted(set(weights) - set(self.gates))[:3]}"
            )
        checked = {}
        for gate, values in weights.items():
            values = [float(w) for w in values]
            if len(values) != len(self.experts) or not all(math.isfinite(w) for w in values):
                raise ValueError(f"gate {gate}: expected {len(self.experts)} numbers (one per expert {self.expert_names}), got {values}")
            checked[gate] = values
        return checked

    def mask_experts(self, names: Sequence[str]) -> None:
        """Switch experts on and off, keeping the mode: gates renormalise over ``names``; constant weights of
        masked experts count as 0 until they are switched on again."""
        self.active = names = self._checked(names)
        mask = torch.tensor([n in names for n in self.expert_names])
        for layer in self.layers.values():
            layer.select_experts(mask)
        for gate_name, gate in self.gates.items():
            gate.mask.copy_(mask)
            if self.constant_weights is not None:
                weights = self.constant_weights[gate_name] if isinstance(self.constant_weights, dict) else self.constant_weights
                gate.constant.copy_(torch.tensor([weights]) * mask)

    def _checked(self, names: Sequence[str]) -> list[str]:
        if self.fused:
            raise RuntimeError("experts are fused into the base weights: call unfuse_experts() first")
        unknown = [n for n in names if n not in self.expert_names]
        if unknown:
            raise ValueError(f"unknown expert(s) {unknown}; loaded experts are {self.expert_names}")
        if not names:
            raise ValueError("masking every expert leaves nothing to mix; pass at least one expert name")
        return list(names)

    def set_gate_config(self, config: GateConfig) -> None:
        """Turn every gate into the kind ``config`` says (all kinds share W_g, b_g and tau; timestep knots start at
        0), as ``load_gates`` does to restore what a gate file was trained as. The parameters are then the file's to
        set. The granularity, which decides where the gates are, cannot change."""
        if config.granularity != self.gate_config.granularity:
            raise MoLEError(f"these gates have granularity {self.gate_config.granularity!r}, not {config.granularity!r}: "
                            "load the experts again with that granularity")
        config = config.for_experts(self.expert_names)
        for name, gate in self.gates.items():
            gate.activation, gate.per_position = config.activation, config.per_position
            gate.set_timestep_knots(config.timestep_knots if reads_timestep(name) else 0)
        self.gate_config = config

    # -- fusing ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def fuse(self) -> None:
        """Add the constant-weight delta into each base weight (zero-overhead inference)."""
        if self.constant_weights is None:
            raise RuntimeError("only constant weights can be fused: call set_experts(names, weights) first")
        if self.regional is not None:
            raise RuntimeError("regional routing weighs each position: disable_regional_routing() before fusing")
        if self.fused:
            return
        try:
            for name, layer in self.layers.items():
                weight = layer.base_layer.weight
                delta = layer.constant_delta_weight().to(weight.dtype)
                if not torch.isfinite(delta).all():
                    raise MoLEError(f"{name}: the constant-weight delta holds NaN or inf in {weight.dtype}; nothing fused")
                layer.unfused_weight = weight.detach().to("cpu", copy=True)  # unfuse restores it bit for bit
                weight.add_(delta)
                layer.fused = True
        except BaseException:  # out of memory, a bad delta, Ctrl-C: the layers fused so far go back
            self.unfuse()
            raise
        self.fused = True

    @torch.no_grad()
    def unfuse(self) -> None:
        for layer in self.layers.values():
            if layer.fused:
                layer.base_layer.weight.copy_(layer.unfused_weight)
                del layer.unfused_weight
                layer.fused = False
        self.fused = False

    def remove(self) -> None:
        """Put every original module back and drop gates and hooks."""
        self.unfuse()
        if self.regional is not None:
            self.regional.remove()
            self.regional = None
        for parent, attr, original in self._originals.values():
            setattr(parent, attr, original)
        for home, handle in self._gate_homes.values():
            handle.remove()
            if hasattr(home, "mole_gate"):
                del home.mole_gate
        for handle in self._timestep_handles:
            handle.remove()
        self._timestep_handles = []
        self.gates, self.layers, self._originals, self._gate_homes = {}, {}, {}, {}

    # -- gate weights of the last run ----------------------------------------------------------------
    def clear_history(self) -> None:
        for gate in self.gates.values():
            gate.history = []

    def gate_history(self) -> dict[str, torch.Tensor]:
        """{gate name: (calls, batch, N)}: for UNet gates one call per denoising step."""
        return {name: torch.stack(g.history).cpu() for name, g in self.gates.items() if g.history}


def block_weights_to_diffusers(block_weights: Mapping[str, Sequence[float]], expert_names: Sequence[str]) -> list[dict]:
    """Per-gate constant weights (block granularity) as diffusers' ``set_adapters(names, adapter_weights)``
    per-block dicts, one per expert: {"unet": {"down": {"block_i": [...]}, "mid": w, "up": {...}},
    "text_encoder": w}.

    Exact for LoRAs on modules inside the UNet's transformer blocks. diffusers gives other UNet modules
    (resnet convs) weight 1 and the text encoder one scalar: here the mean over its layers' gates.
    """
    adapters = []
    for index, _ in enumerate(expert_names):
        unet: dict = {}
        text = []
        for gate, values in block_weights.items():
            component, _, scope = gate.partition(".")
            parts = scope.split(".")
            if component == "text_encoder":
                text.append(values[index])
            elif scope == "mid_block.attentions.0":
                unet["mid"] = values[index]
            elif len(parts) == 4 and parts[0] in ("down_blocks", "up_blocks") and parts[2] == "attentions":
                side = unet.setdefault(parts[0].removesuffix("_blocks"), {})
                side.setdefault(f"block_{parts[1]}", {})[int(parts[3])] = values[index]
            else:
                raise ValueError(f"gate {gate} has no place in diffusers' per-block weights (block granularity, "
                                 "transformer blocks only)")
        for side in unet.values():
            if isinstance(side, dict):
                for block, layers in side.items():
                    side[block] = [layers[i] for i in sorted(layers)]
        entry = {"unet": unet}
        if text:
            entry["text_encoder"] = sum(text) / len(text)
        adapters.append(entry)
    return adapters


def inject_experts(models: dict[str, nn.Module], experts: list[Expert], gate_config: GateConfig | None = None) -> MoLE:
    """Wrap the modules the experts adapt and attach the gates ``gate_config`` describes (default: ``GateConfig()``,
    the paper's block gates, uniform prior); ``models`` is {"unet": ..., "text_encoder": ...}. Untrained, every
    kind of gate is NLA with the prior weights.

    Experts must have been loaded against these models (``load_expert`` checks every shape first), so
    nothing here can fail half-way.
    """
    if gate_config is None:
        gate_config = GateConfig()
    elif not isinstance(gate_config, GateConfig):  # the granularity was once the third argument
        raise TypeError(f"gate_config must be a GateConfig, got {gate_config!r}")
    gate_config = gate_config.for_experts([e.name for e in experts])
    granularity, n = gate_config.granularity, len(experts)
    prior = torch.full((n,), 1.0 / n) if gate_config.prior_weights is None else torch.tensor(gate_config.prior_weights)
    mole = MoLE(experts, gate_config)

    module_names = sorted({m for e in experts for m in e.layers}, key=lambda m: (m.split(".")[0], m))
    for full_name in module_names:
        component, module_name = full_name.split(".", 1)
        model = models[component]
        base = model.get_submodule(module_name)
        covering = [(i, e.layers[full_name]) for i, e in enumerate(experts) if full_name in e.layers]
        lora_A = torch.cat([lora.down for _, lora in covering]).float()
        ups, magnitude_offset = _dora_ups(full_name, base, covering, n)
        lora_B = torch.cat(ups, dim=1)
        rank_expert = torch.cat([torch.full((lora.rank,), i) for i, lora in covering])
        rank_scale = torch.cat([torch.full((lora.rank,), lora.scale) for _, lora in covering])

        scope = _gate_scope(component, model, module_name, granularity)
        gate_name = f"{component}.{scope}" if scope else component
        if gate_name not in mole.gates:
            in_features = _gate_in_features(model, scope, base)
            knots = gate_config.timestep_knots if reads_timestep(gate_name) else 0
            mole.gates[gate_name] = Gate(n, in_features, prior, gate_config.activation, gate_config.per_position,
                                         knots).to(base.weight.device)
        layer = MoLELayer(base, lora_A, lora_B, rank_expert, rank_scale, mole.gates[gate_name], magnitude_offset)
        layer.reads_prompt = component.startswith("text_encoder") or module_name.endswith(PROMPT_TOKEN_MODULES)

        parent_name, _, attr = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, attr, layer)
        mole._originals[full_name] = (parent, attr, base)
        mole.layers[full_name] = layer

    for gate_name, gate in mole.gates.items():
        component, _, scope = gate_name.partition(".")
        home = models[component].get_submodule(scope)  # for "layer" this is the MoLELayer itself
        home.mole_gate = gate  # a submodule of its block, so .to(device/dtype) moves it along
        handle = home.register_forward_pre_hook(_make_gate_hook(mole, gate), with_kwargs=True)
        mole._gate_homes[gate_name] = (home, handle)
    for component, model in models.items():
        if isinstance(model, DENOISERS):
            mole._timestep_handles.append(model.register_forward_pre_hook(_make_timestep_hook(mole), with_kwargs=True))
    return mole


@torch.no_grad()
def _dora_ups(name: str, base: nn.Module, covering: list, n: int) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Each covering expert's B (float32), DoRA experts' rows times s_k = m_k / ||W + alpha/r B_k A_k|| (the norm per
    output channel, of the frozen weight: fixed, as in PEFT, which detaches it); and the (N, d_out) offsets s_k - 1
    of the DoRA experts (None where no expert here is DoRA)."""
    if all(lora.magnitude is None for _, lora in covering):
        return [lora.up.float() for _, lora in covering], None
    weight = base.weight.detach().float()
    offset = torch.zeros(n, weight.shape[0], device=weight.device)
    ups = []
    for index, lora in covering:
        up = lora.up.float().to(weight.device)
        if lora.magnitude is not None:
            delta = lora.scale * (up.flatten(1) @ lora.down.float().to(weight.device).flatten(1))
            norm = (weight.flatten(1) + delta).norm(dim=1)
            if not bool((norm > 0).all()):
                raise MoLEError(f"{name}: DoRA expert {index}: the adapted weight has a zero row, so its magnitude "
                                "cannot be applied")
            rescale = lora.magnitude.float().to(weight.device) / norm
            up = up * rescale.view(-1, *([1] * (up.dim() - 1)))
            offset[index] = rescale - 1
        ups.append(up)
    return ups, offset


def reads_timestep(gate_name: str) -> bool:
    """The denoiser's gates see the step's noise level; the text encoder runs once per prompt, before any step."""
    return not gate_name.startswith("text_encoder")


def _make_timestep_hook(mole: MoLE):
    def hook(denoiser: nn.Module, args: tuple, kwargs: dict) -> None:
        position = 1 if isinstance(denoiser, UNet2DConditionModel) else 3  # (sample, timestep, ...), Flux's 4th
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[position] if len(args) > position else None
        if timestep is None:
            mole.noise_level = None
            return
        timestep = torch.as_tensor(timestep).float().flatten()
        # a UNet's timestep counts 0..999 (every SD scheduler trains on 1000); Flux's is sigma in [0, 1] already
        mole.noise_level = timestep / 1000 if isinstance(denoiser, UNet2DConditionModel) else timestep

    return hook


def _gate_in_features(model: nn.Module, scope: str, base: nn.Module) -> int:
    if scope == "":  # the denoiser's network gate reads the prompt embedding
        return model.config.cross_attention_dim if isinstance(model, UNet2DConditionModel) else model.config.joint_attention_dim
    home = model.get_submodule(scope)
    if home is base:
        return base.in_features if isinstance(base, nn.Linear) else base.in_channels
    if isinstance(home, Transformer2DModel):
        return home.in_channels
    if isinstance(home, ResnetBlock2D):
        return home.in_channels
    if isinstance(home, (FluxTransformerBlock, FluxSingleTransformerBlock)):
        return home.attn.query_dim
    if hasattr(home, "layers"):  # a CLIP encoder (network gate)
        return home.layers[0].embed_dim
    return home.embed_dim  # CLIPEncoderLayer


def _make_gate_hook(mole: MoLE, gate: Gate):
    def hook(scope: nn.Module, args: tuple, kwargs: dict) -> None:
        regional = mole.regional
        gate.position_weights = gate.prompt_token_weights = None
        if regional is not None:  # constant weights per sample, times each expert's mask per position
            gate.weights = regional.sample_weights(gate.mask, len(_scope_input(scope, args, kwargs)))
            gate.position_weights = None if regional.masks is None else regional.masks * gate.weights[..., None, None]
            gate.prompt_token_weights = regional.prompt_token_weights(gate.weights)
        elif mole.constant_weights is not None:
            gate.weights = gate.constant
        else:
            hidden_states = _scope_input(scope, args, kwargs)
            t = mole.noise_level
            gate.weights = gate(hidden_states, t)
            if gate.per_position and hidden_states.dim() == 4:  # a UNet block's feature map (B, C, H, W)
                gate.position_weights = gate.position_map(hidden_states, t)
            elif gate.per_position and isinstance(scope, FLUX_BLOCKS):  # Flux's image tokens (B, L, C): a 1 x L map
                gate.position_weights = gate.position_map(hidden_states.transpose(1, 2).unsqueeze(2), t)
                single = isinstance(scope, FluxSingleTransformerBlock)
                gate.leading_tokens = _scope_input_prompt(args, kwargs).shape[1] if single else 0
            if mole.gate_config.triggers:  # an expert whose trigger the image's prompt lacks weighs 0
                named = mole._named_in(len(gate.weights), gate.weights)
                gate.weights = gate.weights * named
                if gate.position_weights is not None:
                    gate.position_weights = gate.position_weights * named[..., None, None]
        if mole.record:  # a copy: constant weights are a buffer that set_experts changes in place
            gate.history.append(gate.applied_weights().detach().clone())  # per position: their mean over the image

    return hook

"""Gate training (METHOD.md section 5): only the gates learn; the base model and every LoRA stay frozen.

    L = L_D + alpha * L_balance

L_D is the denoising loss of the MoLE model on each concept's reference images with its instance prompt
(plus prior-preservation images when given); batches mix concepts, so the gates learn to send each concept's
prompts and content to its expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..gates import balance_loss
from ..pipelines import MoLEStableDiffusionPipeline
from .common import (
    TrainingSettings,
    encode_examples,
    make_accelerator,
    prepare_pipeline,
    run_training,
    trainable_parameters,
)
from .concepts import load_concepts


@dataclass(kw_only=True)
class GateTrainingConfig(TrainingSettings):
    base: str
    concepts: Path
    granularity: str = "block"
    balance_weight: float = 0.5  # alpha of METHOD.md section 5 (the paper's value)
    learning_rate: float = 5e-3  # zero-initialised gates want a larger lr than the paper's 1e-5 (see README)


def train_gates(config: GateTrainingConfig, pipe: MoLEStableDiffusionPipeline | None = None) -> Path:
    """Train MoLE gates for the concepts file's LoRAs; returns the gate file (``output_dir/gates.safetensors``).

    ``pipe``: a pipeline with these concepts' experts already loaded (default: load ``config.base`` and the
    concepts' LoRAs); its gates are trained in place.
    """
    concepts = load_concepts(config.concepts)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(config)

    if pipe is None:
        pipe = MoLEStableDiffusionPipeline.from_pretrained(config.base)
        pipe.load_experts({c.name: c.lora for c in concepts}, granularity=config.granularity)
    elif pipe.expert_names != [c.name for c in concepts]:
        raise ValueError(f"the pipeline's experts {pipe.expert_names} are not the concepts {[c.name for c in concepts]}")
    prepare_pipeline(pipe, accelerator, config)
    mole = pipe.mole
    for gate in mole.gates.values():  # trainable parameters stay in fp32 whatever the model's dtype
        gate.float().requires_grad_(True)
    params = trainable_parameters(pipe)
    examples = encode_examples(concepts, pipe.vae, config.resolution, config.prior_loss_weight)

    def balance() -> tuple[torch.Tensor, dict[str, float]]:
        weights = [gate.weights for gate in mole.gates.values()]
        mean_weight = torch.stack([w.detach().float().mean(dim=0) for w in weights]).mean(dim=0)
        logs = {f"gate_{name}": float(q) for name, q in zip(mole.expert_names, mean_weight)}
        loss = balance_loss(weights)
        return config.balance_weight * loss, {"loss_balance": loss.item(), **logs}

    if not config.validation_prompts:
        config.validation_prompts = [c.prompt for c in concepts]
    run_training(config, accelerator, pipe, params, examples, balance)

    path = output_dir / "gates.safetensors"
    if accelerator.is_main_process:
        pipe.save_gates(path)
    return path


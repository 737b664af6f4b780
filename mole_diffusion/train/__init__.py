"""Training: MoLE gates on concept reference images (``train_gates``), and the concept LoRAs themselves
(``train_lora``, plain LoRA or MoSLoRA)."""

from .common import CheckpointError, TrainingSettings
from ..concepts import Concept, ConceptError, load_concepts
from .gates import GateTrainingConfig, train_gates
from .lora import LoRATrainingConfig, add_mixers, fold_mixers, train_lora

__all__ = [
    "CheckpointError",
    "Concept",
    "ConceptError",
    "GateTrainingConfig",
    "LoRATrainingConfig",
    "TrainingSettings",
    "add_mixers",
    "fold_mixers",
    "load_concepts",
    "train_gates",
    "train_lora",
]

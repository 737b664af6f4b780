"""``MoLEFluxPipeline``: diffusers' Flux pipeline with gated LoRA experts."""

from diffusers import FluxPipeline

from .mixin import MoLEPipelineMixin


class MoLEFluxPipeline(MoLEPipelineMixin, FluxPipeline):
    """A ``FluxPipeline`` whose transformer (and CLIP text encoder, where a LoRA covers it) mix several LoRAs
    with learned gates: one gate per double block (``FluxTransformerBlock``) and per single block
    (``FluxSingleTransformerBlock``). Every gate reads its block's image tokens; the text tokens of the block
    (the double block's text stream, the text part of a single block's joint sequence) get the same per-sample
    weights. LoRA files are read as diffusers reads Flux LoRAs: diffusers / PEFT, kohya, ai-toolkit, XLabs.
    The T5 encoder (``text_encoder_2``) takes no experts, as in diffusers.

    >>> pipe = MoLEFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16)
    >>> pipe.load_experts({"dog": "dog.safetensors", "hat": "hat.safetensors"})
    >>> pipe.load_gates("gates.safetensors")
    >>> image = pipe("a photo of sks dog in a hat").images[0]
    """

    family = "flux"
    denoiser = "transformer"

    def __call__(self, *args, **kwargs):
        """``FluxPipeline.__call__`` (plus ``experts=``), with ``max_sequence_length`` defaulting to the T5
        tokenizer's own length where it is below diffusers' 512 (FLUX.1's is 512; a small test tokenizer's less)."""
        kwargs.setdefault("max_sequence_length", min(512, self.tokenizer_2.model_max_length))
        return super().__call__(*args, **kwargs)

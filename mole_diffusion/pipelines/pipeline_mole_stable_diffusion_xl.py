"""``MoLEStableDiffusionXLPipeline``: diffusers' SDXL pipeline with gated LoRA experts."""

from diffusers import StableDiffusionXLPipeline

from .mixin import MoLEPipelineMixin


class MoLEStableDiffusionXLPipeline(MoLEPipelineMixin, StableDiffusionXLPipeline):
    """A ``StableDiffusionXLPipeline`` whose UNet and both text encoders mix several LoRAs with learned gates
    (a gate per UNet transformer / resnet block and per layer of each text encoder). LoRA files are read as
    diffusers reads SDXL LoRAs: diffusers / PEFT keys, kohya's ``lora_unet_`` / ``lora_te1_`` / ``lora_te2_``.

    >>> pipe = MoLEStableDiffusionXLPipeline.from_pretrained("stabilityai/stable-diffusion-xl-base-1.0")
    >>> pipe.load_experts({"dog": "dog.safetensors", "hat": "hat.safetensors"})
    >>> pipe.load_gates("gates.safetensors")
    >>> image = pipe("a photo of sks dog in a hat").images[0]
    """

    family = "sdxl"

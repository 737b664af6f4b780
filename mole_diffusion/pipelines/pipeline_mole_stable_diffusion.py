"""``MoLEStableDiffusionPipeline``: diffusers' Stable Diffusion pipeline with gated LoRA experts."""

from diffusers import StableDiffusionPipeline

from .mixin import MoLEPipelineMixin


class MoLEStableDiffusionPipeline(MoLEPipelineMixin, StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` (SD 1.x / 2.x) whose UNet and text encoder mix several LoRAs with learned gates.

    >>> pipe = MoLEStableDiffusionPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    >>> pipe.load_experts({"dog": "dog.safetensors", "hat": "hat.safetensors"})
    >>> pipe.load_gates("gates.safetensors")
    >>> image = pipe("a photo of sks dog in a hat", experts=["dog", "hat"]).images[0]
    """

    family = "sd"

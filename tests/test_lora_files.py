"""LoRA files as they are shared, read exactly: every layout x alpha x coverage, one expert against a reference.

The reference is diffusers' own ``load_lora_weights`` wherever diffusers applies the file exactly. Where it does
not, the reference is the merge by hand (``tiny_lora_deltas``: each module's ``alpha / r * B A`` from the factors
the file was written from, added to a plain pipeline's weights):

- kohya files with a different alpha (and rank) per module on SD and SDXL: diffusers 0.42 gives every module the
  file's most common alpha (its ``alpha_pattern`` keys do not match the module names);
- PEFT adapter folders, which diffusers does not read: the reference is PEFT's own ``merge_and_unload``.
"""

import re

import numpy as np
import pytest
import torch
from conftest import hand_merged, short_images
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from mole_diffusion import MoLEFluxPipeline, MoLEStableDiffusionPipeline, MoLEStableDiffusionXLPipeline
from mole_diffusion.testing import (
    FAMILY_LAYOUTS,
    UNET_ATTENTION_MODULES,
    make_tiny_lora,
    make_tiny_pipeline,
    tiny_lora_deltas,
)

PIPELINES = {"sd": (MoLEStableDiffusionPipeline, StableDiffusionPipeline),
             "sdxl": (MoLEStableDiffusionXLPipeline, StableDiffusionXLPipeline),
             "flux": (MoLEFluxPipeline, FluxPipeline)}
ALPHAS = {"alpha_is_rank": dict(rank=4), "alpha_below_rank": dict(rank=4, alpha=1.0),
          "per_module": dict(rank=4, alpha=1.0, per_module=True)}
PROJ_FF = UNET_ATTENTION_MODULES + ("proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
# (modules of the denoiser, text encoders too); kohya files with "convs" are LyCORIS/kohya LoCon files (lora_down/up on
# the resnets' 3x3 convs). Flux has no convolutions, and its attention is the fused q/k/v
COVERAGE = {
    "sd": {"attention": (UNET_ATTENTION_MODULES, False), "proj_ff": (PROJ_FF, False),
           "convs": (PROJ_FF + ("conv1", "conv2", "time_emb_proj"), False),
           "text": (PROJ_FF + ("conv1", "conv2", "time_emb_proj"), True)},
    "flux": {"attention": (("to_q", "to_out.0", "add_q_proj", "to_add_out"), False), "proj_ff": (None, False),
             "text": (None, True)},
}
COVERAGE["sdxl"] = COVERAGE["sd"]
DIFFUSERS_OFF = {("sd", "kohya", "per_module"), ("sdxl", "kohya", "per_module"), ("sdxl", "kohya-sgm", "per_module")}
CASES = [(family, layout, alphas, coverage) for family in PIPELINES for layout in FAMILY_LAYOUTS[family]
         for alphas in ALPHAS for coverage in COVERAGE[family]
         if not (layout == "xlabs" and alphas != "alpha_is_rank")  # XLabs files have no alpha
         and not (layout in ("peft", "xlabs") and coverage == "text")]  # nor text encoders, as PEFT folders


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """Per family: a tiny checkpoint, a MoLE pipeline and a plain diffusers one, reused (and restored) by each case;
    ``get(family, "plain")`` is the checkpoint's own image."""
    cache = {}

    def get(family, plain=None):
        if family not in cache:
            base = make_tiny_pipeline(tmp_path_factory.mktemp(family) / "base", family=family)
            pipes = [cls.from_pretrained(base) for cls in PIPELINES[family]]
            for pipe in pipes:
                pipe.set_progress_bar_config(disable=True)
            cache[family] = (base, *pipes)
            cache[family, "plain"] = short_images(pipes[0])
        return cache[family, plain] if plain else cache[family]

    return get






def peft_merged(pipe, folder, denoiser):
    from peft import PeftModel

    original = getattr(pipe, denoiser)
    state = {k: v.clone() for k, v in original.state_dict().items()}
    try:
        setattr(pipe, denoiser, PeftModel.from_pretrained(original, folder).merge_and_unload())
        return short_images(pipe)
    finally:
        setattr(pipe, denoiser, original)
        original.load_state_dict(state)


@pytest.mark.parametrize("family,layout,alphas,coverage", CASES)
def test_one_expert_equals_the_reference(pipelines, tmp_path, family, layout, alphas, coverage):
    base, mole, ref = pipelines(family)
    unet_modules, text_encoder = COVERAGE[family][coverage]
    spec = dict(ALPHAS[alphas], unet_modules=unet_modules, text_encoder=text_encoder, layout=layout, seed=1)
    path = make_tiny_lora(base, tmp_path / ("lora" if layout == "peft" else "lora.safetensors"), **spec)
    plain = pipelines(family, "plain")
    mole.load_experts({"lora": path})
    try:
        image = short_images(mole)
    finally:
        mole.unload_experts()
    assert np.abs(image - plain).max() > 1e-3  # the expert does something
    if layout == "peft":
        expected = peft_merged(ref, path, mole.denoiser)
    elif (family, layout, alphas) in DIFFUSERS_OFF:
        expected = hand_merged(ref, tiny_lora_deltas(base, **spec))
    else:
        ref.load_lora_weights(path, adapter_name="lora")
        try:
            expected = short_images(ref)
        finally:
            ref.unload_lora_weights()
    np.testing.assert_allclose(image, expected, atol=1e-4)


@pytest.mark.parametrize("family", list(PIPELINES))
@pytest.mark.parametrize("alphas", list(ALPHAS))
def test_kohya_files_and_their_twins_have_one_content_hash(pipelines, tmp_path, family, alphas):
    """The same LoRA in every layout that keeps its factors as trained (Flux's kohya files come back from diffusers
    with alpha folded into the factors, so they are not compared here)."""
    base, mole, _ = pipelines(family)
    layouts = [layout for layout in ("diffusers", "kohya", "kohya-sgm") if layout in FAMILY_LAYOUTS[family]]
    if family == "flux":
        layouts.remove("kohya")
    unet_modules = None if family == "flux" else PROJ_FF + ("conv1",)
    hashes = set()
    for layout in layouts:
        path = make_tiny_lora(base, tmp_path / f"{layout}.safetensors", layout=layout, unet_modules=unet_modules,
                              seed=1, **ALPHAS[alphas])
        mole.load_experts({"lora": path})
        hashes.add(mole.mole.experts[0].content_hash)
        mole.unload_experts()
    assert len(hashes) == 1, layouts


def test_rslora_adapter_folder_is_scaled_by_alpha_over_sqrt_rank(pipelines, tmp_path):
    base, mole, ref = pipelines("sd")
    path = make_tiny_lora(base, tmp_path / "rslora", layout="peft", rank=4, alpha=2.0, rslora=True, seed=1)
    mole.load_experts({"lora": path})
    try:
        assert {layer.scale for layer in mole.mole.experts[0].layers.values()} == {1.0}  # 2 / sqrt(4)
        image = short_images(mole)
    finally:
        mole.unload_experts()
    np.testing.assert_allclose(image, peft_merged(ref, path, "unet"), atol=1e-4)
    np.testing.assert_allclose(image, hand_merged(ref, tiny_lora_deltas(base, layout="peft", rank=4, alpha=2.0,
                                                                        rslora=True, seed=1)), atol=1e-4)


def test_a_peft_adapter_folder_of_the_text_encoder_adapts_the_text_encoder(pipelines, tmp_path):
    """A PEFT folder names no component: the one whose modules it names is the one it adapts. The reference is
    PEFT's own merge into the text encoder."""
    from peft import LoraConfig, get_peft_model

    base, mole, ref = pipelines("sd")
    text_encoder = type(ref.text_encoder).from_pretrained(base, subfolder="text_encoder")
    adapted = get_peft_model(text_encoder, LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    adapted.save_pretrained(tmp_path / "text_lora")
    mole.load_experts({"lora": tmp_path / "text_lora"})
    try:
        assert {name.split(".")[0] for name in mole.mole.layers} == {"text_encoder"}
        image = short_images(mole)
    finally:
        mole.unload_experts()
    assert np.abs(image - pipelines("sd", "plain")).max() > 1e-2  # the LoRA changes the images
    np.testing.assert_allclose(image, peft_merged(ref, tmp_path / "text_lora", "text_encoder"), atol=1e-5)


def test_a_file_without_component_prefixes_is_the_denoisers(pipelines, tmp_path):
    """A UNet LoRA saved without the "unet." prefix (a trainer that saves the UNet's adapter alone) adapts the UNet:
    the same expert as the prefixed file under diffusers' load_lora_weights (which skips unprefixed keys)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    base, mole, ref = pipelines("sd")
    prefixed = make_tiny_lora(base, tmp_path / "prefixed.safetensors", rank=4, alpha=2.0, seed=1, text_encoder=False)
    with safe_open(prefixed, "pt") as f:
        metadata = f.metadata()
    bare = tmp_path / "bare.safetensors"
    save_file({k.removeprefix("unet."): v for k, v in load_file(prefixed).items()}, bare, metadata=metadata)
    mole.load_experts({"lora": bare})
    try:
        image = short_images(mole)
    finally:
        mole.unload_experts()
    ref.load_lora_weights(prefixed)
    try:
        np.testing.assert_allclose(image, short_images(ref), atol=1e-5)
    finally:
        ref.unload_lora_weights()


@pytest.mark.parametrize("family", list(PIPELINES))
@pytest.mark.parametrize("text_encoder", [False, True])
def test_one_dora_expert_equals_the_reference(pipelines, tmp_path, family, text_encoder):
    """diffusers is the reference for DoRA on the denoiser. On text encoders diffusers 0.42 (with transformers 5)
    does not load the file's magnitudes (they stay at PEFT's initial ||W + BA||), so there it is the hand merge."""
    base, mole, ref = pipelines(family)
    unet_modules = None if family == "flux" else PROJ_FF + ("conv1",)
    spec = dict(rank=4, alpha=2.0, unet_modules=unet_modules, seed=1, dora=True, text_encoder=text_encoder)
    path = make_tiny_lora(base, tmp_path / "dora.safetensors", **spec)
    plain = make_tiny_lora(base, tmp_path / "plain.safetensors", **dict(spec, dora=False))
    mole.load_experts({"dora": path})
    try:
        image = short_images(mole)
    finally:
        mole.unload_experts()
    mole.load_experts({"plain": plain})
    try:
        assert np.abs(image - short_images(mole)).max() > 1e-3  # the magnitudes do something
    finally:
        mole.unload_experts()
    np.testing.assert_allclose(image, hand_merged(ref, tiny_lora_deltas(base, **spec)), atol=1e-4)
    if not text_encoder:
        ref.load_lora_weights(path, adapter_name="dora")
        try:
            np.testing.assert_allclose(image, short_images(ref), atol=1e-4)
        finally:
            ref.unload_lora_weights()


@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.3, 0.8]])
def test_dora_and_lora_mixed_equal_the_weighted_sum_of_their_deltas(pipelines, tmp_path, weights):
    """Each expert's delta at full strength (DoRA: m (W + dW) / ||W + dW|| - W), weighted by the constant gates."""
    base, mole, ref = pipelines("sd")
    dora = dict(rank=4, alpha=2.0, unet_modules=PROJ_FF + ("conv1",), seed=1, dora=True)
    lora = dict(rank=2, alpha=1.0, unet_modules=UNET_ATTENTION_MODULES + ("conv2",), seed=2)
    files = {"dora": make_tiny_lora(base, tmp_path / "dora.safetensors", **dora),
             "lora": make_tiny_lora(base, tmp_path / "lora.safetensors", **lora)}
    deltas = {}
    for spec, weight in ((dora, weights[0]), (lora, weights[1])):
        for name, delta in tiny_lora_deltas(base, **spec).items():
            deltas[name] = deltas.get(name, 0) + weight * delta
    mole.load_experts(files)
    try:
        mole.set_experts(["dora", "lora"], weights)
        unfused = short_images(mole)
        mole.fuse_experts()
        fused = short_images(mole)
        mole.unfuse_experts()
        mole.set_experts(["lora"], [weights[1]])  # masking the DoRA expert removes its rescaling too
        without = short_images(mole)
    finally:
        mole.unload_experts()
    expected = hand_merged(ref, deltas)
    np.testing.assert_allclose(unfused, expected, atol=1e-4)
    np.testing.assert_allclose(fused, expected, atol=1e-4)
    np.testing.assert_allclose(without, hand_merged(ref, {k: weights[1] * v for k, v in tiny_lora_deltas(base, **lora).items()}), atol=1e-4)


def test_kohya_dora_scales_that_cannot_be_read_are_refused_by_name(pipelines, tmp_path):
    """A magnitude must be one number per output channel, for a module the file has LoRA factors for; Flux's kohya
    files carry none (its DoRA comes in the PEFT layout)."""
    from safetensors.torch import load_file, save_file

    from mole_diffusion.experts import ExpertError

    base, mole, _ = pipelines("sd")
    path = make_tiny_lora(base, tmp_path / "kohya.safetensors", layout="kohya", text_encoder=False, seed=1)
    tensors = load_file(path)
    module = next(k for k in tensors if k.startswith("lora_unet_") and k.endswith(".lora_up.weight")).removesuffix(".lora_up.weight")
    out_channels = tensors[f"{module}.lora_up.weight"].shape[0]
    text_module = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    cases = {  # dora_scale key -> (its tensor, what the refusal says)
        f"{module}.dora_scale": (torch.ones(out_channels), rf"has shape \({out_channels},\): a DoRA magnitude per input channel"),
        f"{module}.dora_scale ": (torch.ones(out_channels, 2), rf"has shape \({out_channels}, 2\): a DoRA magnitude per input"),
        f"{text_module}.dora_scale": (torch.ones(32, 1), r"text_encoder\.encoder\.layers\.0\.self_attn\.q_proj has a "
                                                         "dora_scale but no LoRA weights"),
    }
    for key, (scale, message) in cases.items():
        save_file({**tensors, key.strip(): scale}, str(tmp_path / "bad.safetensors"))
        with pytest.raises(ExpertError, match=message):
            mole.load_experts({"bad": tmp_path / "bad.safetensors"})
        assert mole.mole is None
    base, mole, _ = pipelines("flux")
    flux = make_tiny_lora(base, tmp_path / "flux.safetensors", layout="kohya", text_encoder=False, seed=1)
    tensors = load_file(flux)
    module = next(k for k in tensors if k.endswith(".lora_up.weight")).removesuffix(".lora_up.weight")
    save_file({**tensors, f"{module}.dora_scale": torch.ones(tensors[f"{module}.lora_up.weight"].shape[0], 1)}, str(flux))
    with pytest.raises(ExpertError, match=re.escape(f"{flux}: {module}.dora_scale: kohya-style DoRA (dora_scale) is read for "
                                                    "SD and SDXL files; Flux DoRA is read in the diffusers/PEFT layout")):
        mole.load_experts({"bad": flux})


def test_a_kohya_file_adapting_some_text_encoder_projections_equals_its_diffusers_twin(pipelines, tmp_path):
    """kohya files whose text-encoder LoRA covers q and v only (diffusers' own loader cannot convert these keys: it
    recognises its old text-encoder layout by an out-projection key): the same expert, and the same images, as the
    same LoRA in diffusers' layout loaded by diffusers."""
    base, mole, plain = pipelines("sd")
    spec = dict(text_encoder=True, text_modules=("q_proj", "v_proj"), seed=1, alpha=2.0)
    kohya = make_tiny_lora(base, tmp_path / "kohya.safetensors", layout="kohya", **spec)
    twin = make_tiny_lora(base, tmp_path / "diffusers.safetensors", layout="diffusers", **spec)
    hashes = []
    for path in (kohya, twin):
        mole.load_experts({"lora": path})
        hashes.append(mole.mole.experts[0].content_hash)
        images = short_images(mole)
        mole.unload_experts()
    assert hashes[0] == hashes[1]
    plain.load_lora_weights(str(twin))
    try:
        np.testing.assert_allclose(images, short_images(plain), atol=1e-5)
    finally:
        plain.unload_lora_weights()


def test_kohya_dora_on_the_text_encoder_and_unet_equals_its_diffusers_twin(pipelines, tmp_path):
    """LyCORIS DoRA (``dora_scale``, one magnitude per output channel) on both models: the same expert as the same
    magnitudes and factors in diffusers' layout."""
    from safetensors.torch import load_file, save_file

    base, mole, _ = pipelines("sd")
    spec = dict(text_encoder=True, seed=1, alpha=2.0, unet_modules=PROJ_FF + ("conv1",))
    twin = make_tiny_lora(base, tmp_path / "diffusers.safetensors", layout="diffusers", dora=True, **spec)
    kohya = load_file(make_tiny_lora(base, tmp_path / "kohya.safetensors", layout="kohya", **spec))
    magnitudes = {k.removesuffix(".lora_magnitude_vector"): v for k, v in load_file(twin).items() if k.endswith("magnitude_vector")}
    assert {k.split(".")[0] for k in magnitudes} == {"unet", "text_encoder"}
    for module, magnitude in magnitudes.items():
        component, _, name = module.partition(".")
        prefix = "lora_unet_" if component == "unet" else "lora_te_text_model_"
        kohya[prefix + name.replace(".", "_") + ".dora_scale"] = magnitude.reshape(-1, *[1] * (kohya[
            prefix + name.replace(".", "_") + ".lora_up.weight"].dim() - 1))
    save_file(kohya, str(tmp_path / "kohya-dora.safetensors"))
    hashes = []
    for path in (twin, tmp_path / "kohya-dora.safetensors"):
        mole.load_experts({"dora": path})
        hashes.append(mole.mole.experts[0].content_hash)
        mole.unload_experts()
    assert hashes[0] == hashes[1]

"""Learned (input-dependent) gates against references outside the library: the gate formula of docs/method.md
written out here, plain diffusers replaying the recorded weights step by step, each prompt of a
batch run alone, and each guidance branch run alone."""

import pytest
import torch
from conftest import randomise_gates
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from transformers.models.clip.modeling_clip import CLIPEncoder, CLIPEncoderLayer

from mole_diffusion import block_weights_to_diffusers
from mole_diffusion.testing import make_tiny_lora

GRANULARITIES = ("block", "layer", "network")
PROMPT, OTHER_PROMPT = "a red circle on a blue background", "a green square on a yellow background"
NEGATIVE = "a blurry grey triangle"
RUN = dict(num_inference_steps=2, height=32, width=32)  # 32 px -> 16 x 16 latents (the tiny VAE halves)




def noise(batch, seed=0):
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def reference_gate(h, gate):
    """The gate of docs/method.md, written out in float64: f = mean_t(h_t / |h_t|), softmax((W f + b) / exp(log_tau))."""
    h = h.detach().double()
    if h.dim() == 4:  # (B, C, H, W): the tokens are the pixels, channels on dim 1
        f = (h / h.norm(dim=1, keepdim=True)).mean(dim=(2, 3))
    else:
        assert h.dim() == 3, h.shape
        f = (h / h.norm(dim=-1, keepdim=True)).mean(dim=1)
    logits = f @ gate.weight.detach().double().T + gate.bias.detach().double()
    return torch.softmax(logits / gate.log_temperature.detach().double().exp(), dim=-1)


def clip_encoder(text_encoder):
    """(name, module) of the CLIP encoder (transformers 5 has it at "encoder", 4 at "text_model.encoder")."""
    return next((n, m) for n, m in text_encoder.named_modules() if isinstance(m, CLIPEncoder))


def expected_gate_name(layer_name, models, granularity):
    """Which gate an adapted module should share (docs/method.md), derived here from the model alone."""
    component, module_name = layer_name.split(".", 1)
    if granularity == "layer":
        return layer_name
    if granularity == "network":
        return "unet" if component == "unet" else f"text_encoder.{clip_encoder(models[component])[0]}"
    parts = module_name.split(".")
    for end in range(len(parts) - 1, 0, -1):  # the innermost enclosing block
        scope = ".".join(parts[:end])
        if isinstance(models[component].get_submodule(scope), (Transformer2DModel, ResnetBlock2D, CLIPEncoderLayer)):
            return f"{component}.{scope}"
    raise AssertionError(f"{layer_name} is in no block")


def capture_gate_inputs(pipe, granularity):
    """Our own pre-hooks on each gate's home module, recording (per call) the tensor the gate must read."""
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    captured, handles = {}, []
    for gate_name in pipe.mole.gates:
        component, _, scope = gate_name.partition(".")
        if granularity == "network":
            home = models[component] if component == "unet" else clip_encoder(pipe.text_encoder)[1]
            key = "encoder_hidden_states" if component == "unet" else "inputs_embeds"
        elif granularity == "layer":
            home, key = pipe.mole.layers[gate_name].base_layer, None  # the wrapped Linear / Conv2d
        else:
            home, key = models[component].get_submodule(scope), None
            assert isinstance(home, (Transformer2DModel, ResnetBlock2D, CLIPEncoderLayer)), (gate_name, type(home))
        calls = captured[gate_name] = []

        def hook(module, args, kwargs, calls=calls, key=key):
            calls.append((kwargs[key] if key else args[0]).detach().clone())  # blocks and layers take it first

        handles.append(home.register_forward_pre_hook(hook, with_kwargs=True))
    return captured, handles


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_recorded_weights_equal_the_gate_formula_on_captured_inputs(world, mole_pipe, granularity):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"], "c": world["c"]}, granularity)  # c: resnet convs (4-D)
    randomise_gates(mole_pipe)
    mole = mole_pipe.mole
    models = {"unet": mole_pipe.unet, "text_encoder": mole_pipe.text_encoder}
    for layer_name, layer in mole.layers.items():
        assert layer.gate is mole.gates[expected_gate_name(layer_name, models, granularity)], layer_name
    captured, handles = capture_gate_inputs(mole_pipe, granularity)
    mole_pipe(PROMPT, negative_prompt=NEGATIVE, latents=noise(1), output_type="latent", **RUN)  # CFG: batch 2
    for handle in handles:
        handle.remove()

    recorded = mole_pipe.gate_weights
    assert set(recorded) == set(mole.gates)
    spread = 0.0
    for gate_name, history in recorded.items():
        inputs = captured[gate_name]
        assert len(inputs) == len(history), gate_name  # one recorded entry per call of the gate
        for call, (h, weights) in enumerate(zip(inputs, history)):
            torch.testing.assert_close(weights.double(), reference_gate(h, mole.gates[gate_name]), rtol=1e-5, atol=1e-6,
                                       msg=lambda m: f"{gate_name}, call {call}: {m}")
        spread = max(spread, float(history.max() - history.min()))
    assert spread > 0.3  # the gates are far from uniform, so the check is not vacuous


@pytest.fixture
def unet_attention_loras(world, tmp_path):
    """LoRAs only inside UNet transformer blocks, where diffusers' per-block weights express MoLE exactly."""
    modules = ("to_q", "to_k", "to_v", "to_out.0")
    specs = {"p": (4, 2.0, 11), "q": (2, 4.0, 12), "r": (3, 3.0, 13)}  # mixed ranks and alphas
    return {
        name: make_tiny_lora(world["base"], tmp_path / f"{name}.safetensors", rank=rank, alpha=alpha, seed=seed,
                             text_encoder=False, unet_modules=modules)
        for name, (rank, alpha, seed) in specs.items()
    }


def test_per_step_weights_replayed_with_diffusers_set_adapters(mole_pipe, ref_pipe, unet_attention_loras):
    names = list(unet_attention_loras)
    mole_pipe.load_experts(unet_attention_loras, "block")
    randomise_gates(mole_pipe)
    # batch 1, no CFG: each UNet gate has exactly one weight vector per denoising step
    args = dict(RUN, prompt=PROMPT, guidance_scale=1.0, latents=noise(1), output_type="latent", num_inference_steps=3)
    expected = mole_pipe(**args).images
    history = mole_pipe.gate_weights
    assert all(h.shape == (args["num_inference_steps"], 1, len(names)) for h in history.values())
    assert max(float((h - h[:1]).abs().max()) for h in history.values()) > 1e-3  # the weights move between steps

    def adapter_weights(step):
        return block_weights_to_diffusers({gate: h[step, 0].tolist() for gate, h in history.items()}, names)

    for name, path in unet_attention_loras.items():
        ref_pipe.load_lora_weights(path, adapter_name=name)

    def replay(step_of_call):
        ref_pipe.set_adapters(names, adapter_weights(step_of_call(0)))

        def before_next_step(pipe, i, t, callback_kwargs):  # runs after step i
            if i + 1 < args["num_inference_steps"]:
                pipe.set_adapters(names, adapter_weights(step_of_call(i + 1)))
            return callback_kwargs

        return ref_pipe(**args, callback_on_step_end=before_next_step).images

    torch.testing.assert_close(replay(lambda step: step), expected, rtol=1e-5, atol=1e-5)
    # the step matters: replaying the first step's weights throughout gives other latents
    assert (replay(lambda step: 0) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_batch_of_two_prompts_equals_each_prompt_alone(world, mole_pipe, granularity):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"], "c": world["c"]}, granularity)
    randomise_gates(mole_pipe)
    latents = noise(2)
    # final latents, not decoded images: the VAE decodes each sample on its own and MoLE does not touch it
    both = mole_pipe([PROMPT, OTHER_PROMPT], latents=latents, output_type="latent", **RUN).images
    both_gates = mole_pipe.gate_weights
    # the prompts route differently (else mixing them up would go unseen)
    assert max(float((h[:, -1] - h[:, -2]).abs().max()) for h in both_gates.values()) > 1e-2
    for i, prompt in enumerate([PROMPT, OTHER_PROMPT]):
        alone = mole_pipe(prompt, latents=latents[i : i + 1], output_type="latent", **RUN).images
        # 1e-4: the guided u + 7.5 (c - u) amplifies the UNet's batch-size-dependent float rounding (seen:
        # 1.3e-5 on latents; decoded images agree to 1e-5); the gate weights below agree to 1e-5
        torch.testing.assert_close(both[i : i + 1], alone, rtol=1e-5, atol=1e-4, msg=lambda m: f"{prompt}: {m}")
        for gate_name, history in mole_pipe.gate_weights.items():
            # text encoder: one call per branch, sample i at row i; UNet (CFG): rows [uncond..., cond...]
            rows = [i] if gate_name.startswith("text_encoder") else [i, 2 + i]
            torch.testing.assert_close(both_gates[gate_name][:, rows], history, rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"{prompt}, {gate_name}: {m}")


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_guidance_halves_equal_each_branch_alone(world, mole_pipe, granularity):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"], "c": world["c"]}, granularity)
    randomise_gates(mole_pipe)
    mole = mole_pipe.mole
    unet_calls = []  # (latent input, t, prompt embeddings, noise prediction) of every denoising step

    def record_unet_call(unet, args, kwargs, out):
        unet_calls.append(tuple(x.clone() for x in (args[0], args[1], kwargs["encoder_hidden_states"], out[0])))

    handle = mole_pipe.unet.register_forward_hook(record_unet_call, with_kwargs=True)
    mole_pipe(PROMPT, negative_prompt=NEGATIVE, guidance_scale=7.5, latents=noise(1), output_type="latent", **RUN)
    handle.remove()
    history = mole_pipe.gate_weights
    unet_gates = [name for name in mole.gates if name.startswith("unet")]
    text_gates = [name for name in mole.gates if name.startswith("text_encoder")]

    def gates_now(names):  # the weights each gate computed in the forward just run
        return {name: mole.gates[name].weights.clone() for name in names}

    with torch.no_grad():
        # diffusers puts the unconditional (negative prompt) half first: branch 0 = NEGATIVE, branch 1 = PROMPT
        for branch, prompt in ((0, NEGATIVE), (1, PROMPT)):
            embeds = mole_pipe.encode_prompt(prompt, "cpu", 1, False)[0]  # the branch's text encoder run alone
            alone_text = gates_now(text_gates)
            for name in text_gates:  # encode_prompt runs the prompt first, then the negative prompt
                torch.testing.assert_close(history[name][1 - branch], alone_text[name], rtol=1e-5, atol=1e-5)
            for step, (latent_input, t, cfg_embeds, cfg_noise) in enumerate(unet_calls):
                torch.testing.assert_close(cfg_embeds[branch : branch + 1], embeds, rtol=1e-5, atol=1e-5)
                alone_noise = mole_pipe.unet(latent_input[branch : branch + 1], t, encoder_hidden_states=embeds).sample
                torch.testing.assert_close(cfg_noise[branch : branch + 1], alone_noise, rtol=1e-5, atol=1e-5)
                alone_unet = gates_now(unet_gates)
                for name in unet_gates:
                    torch.testing.assert_close(history[name][step, branch : branch + 1], alone_unet[name], rtol=1e-5,
                                               atol=1e-5, msg=lambda m: f"branch {branch}, step {step}, {name}: {m}")
    # the branches route differently, far beyond the tolerance (else swapping them would go unseen; the
    # network gate reads the mean token direction of two 77-token prompts, which differs least)
    assert max(float((history[name][:, 0] - history[name][:, 1]).abs().max()) for name in unet_gates) > 1e-3

"""The composition methods by name (``eval.methods``) and ``draw``, the one way the evaluator and the app draw an
image of a method: what each method needs, what ``draw`` refuses, and the state it leaves for the next method."""

import re

import numpy as np
import pytest
import torch

from mole_diffusion.errors import MoLEError
from mole_diffusion.eval.methods import PEFT_MERGES, SAME_RANK_MERGES, draw, method_names, methods_for
from mole_diffusion.concepts import Concept

PROMPT = "a photo of sks and zwx"
TRIGGERS = {"a": ["sks"], "b": ["zwx"]}
CALL = dict(num_inference_steps=2, guidance_scale=7.5, height=32, width=32, output_type="np")


@pytest.fixture
def pipe(world, mole_pipe):
    mole_pipe.load_experts({"a": world["a"], "b": world["b"]})
    return mole_pipe


def image(pipe, method, **kwargs):
    return draw(pipe, method=method, prompt=PROMPT, names=["a", "b"], weights=[0.5, 0.5], **{"seed": 0, **CALL, **kwargs})


def test_each_method_says_what_it_needs():
    registry = methods_for(["a", "b"])
    peft = [f"peft_{m}" for m in PEFT_MERGES]
    assert {n for n, m in registry.items() if m.needs_gates} == {"mole", "mole_constant", "mole_without_a", "mole_without_b"}
    assert {n for n, m in registry.items() if m.uses_reference} == {"set_adapters", "base", *peft}
    assert {m.peft_merge for m in registry.values()} - {None} == set(PEFT_MERGES)
    assert {n for n, m in registry.items() if m.same_rank} == {f"peft_{m}" for m in SAME_RANK_MERGES}
    assert [n for n, m in registry.items() if m.needs_triggers or m.not_for_families] == ["regional", "regional_tokens"]
    assert all(m.name == n for n, m in registry.items())


def test_method_names_leave_out_what_cannot_run(tmp_path):
    concepts = [Concept(name=n, prompt=f"a photo of {t}", images=None, lora=tmp_path / f"{n}.safetensors")
                for n, t in (("a", "sks"), ("b", "zwx"))]
    every = method_names(concepts, has_gates=True)
    assert every == list(methods_for(["a", "b"]))  # the registry's order is the outputs' order
    assert [m for m in every if m not in method_names(concepts, has_gates=False)] == \
        ["mole", "mole_constant", "mole_without_a", "mole_without_b"]
    assert [m for m in every if m not in method_names(concepts, True, same_rank=False)] == ["peft_ties", "peft_dare_linear"]
    assert [m for m in every if m not in method_names(concepts, True, family="flux")] == ["regional", "regional_tokens"]
    bare = [Concept(name=c.name, prompt="", images=None, lora=c.lora) for c in concepts]  # LoRA files: no trigger words
    assert not {"regional", "regional_tokens"} & set(method_names(bare, True)) and "nla" in method_names(bare, True)


def test_a_seed_is_a_cpu_generator_with_that_seed(pipe):
    by_seed = image(pipe, "nla", seed=3)
    by_generator = image(pipe, "nla", seed=None, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(by_seed, by_generator)
    assert np.abs(image(pipe, "nla", seed=4) - by_seed).max() > 1e-3


def test_base_without_diffusers_pipeline_is_the_mole_pipeline_at_zero_weights(world, pipe, ref_pipe):
    """What the app draws for base (no second pipeline) is the evaluator's base, diffusers' own with LoRAs off."""
    ref_pipe.load_lora_weights(world["a"], adapter_name="a")
    ref_pipe.load_lora_weights(world["b"], adapter_name="b")
    ref_pipe.set_adapters(["a", "b"], [0.5, 0.5])
    with_reference = image(pipe, "base", reference_pipe=ref_pipe)
    np.testing.assert_allclose(image(pipe, "base"), with_reference, atol=1e-5)
    assert np.abs(image(pipe, "nla", reference_pipe=ref_pipe) - with_reference).max() > 1e-3
    assert ref_pipe.get_active_adapters() == ["a", "b"]  # set back to the NLA adapters for the next image


@pytest.mark.parametrize("method, kwargs, message", [
    ("fancy", {}, "unknown method 'fancy'; for experts ['a', 'b']"),
    ("set_adapters", {}, "set_adapters draws with diffusers' own pipeline"),
    ("peft_cat", {}, "peft_cat draws with diffusers' own pipeline"),
    ("regional", {}, "regional routing needs each expert's trigger words"),
    ("mole_constant", {}, "mole_constant draws with per-block weights"),
    ("nla", {"generator": torch.Generator()}, "give a seed or a generator, not both"),
])
def test_draw_refuses_what_a_method_cannot_draw_from(pipe, method, kwargs, message):
    with pytest.raises(MoLEError, match=re.escape(message)):
        image(pipe, method, **kwargs)


def test_runs_of_one_method_keep_their_state_and_the_next_method_drops_it(pipe):
    """regional routes and mole_constant fuses once for a run of their images; any other method undoes it, so its
    image is what it would be on a fresh pipeline."""
    nla = image(pipe, "nla")
    regional = image(pipe, "regional", triggers=TRIGGERS)
    routing = pipe.mole.regional
    assert routing is not None
    image(pipe, "regional", triggers=TRIGGERS, seed=1)
    assert pipe.mole.regional is routing  # enabled once for the run
    np.testing.assert_array_equal(image(pipe, "nla"), nla)
    assert pipe.mole.regional is None

    # the run of regional_tokens routes anew, with each trigger's tokens kept to their expert, and regional after it
    tokens = image(pipe, "regional_tokens", triggers=TRIGGERS)
    assert pipe.mole.regional.own_trigger_tokens
    np.testing.assert_array_equal(image(pipe, "regional", triggers=TRIGGERS), regional)
    assert not pipe.mole.regional.own_trigger_tokens and np.abs(tokens - regional).max() > 1e-4

    pipe.set_experts(None)  # the gates, read for the per-block weights as the evaluator does
    block_weights = pipe.export_block_weights([PROMPT], num_inference_steps=2, height=32, width=32)
    image(pipe, "mole_constant", block_weights=block_weights)
    assert pipe.mole.fused
    np.testing.assert_allclose(image(pipe, "nla"), nla, atol=1e-6)
    assert not pipe.mole.fused

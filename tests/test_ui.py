"""The app's logic (``mole_diffusion.ui.Studio``) on the shipped demo world, without Gradio or a browser:
rendering, masking, constant weights, regional routing, the comparison, and bad files and inputs as messages.
The page itself is driven in a real browser in test_ui_browser.py."""

import socket
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from mole_diffusion.cli import main
from mole_diffusion.demo.run import ASSETS
from mole_diffusion.errors import BaseModelError, MoLEError
from mole_diffusion.gate_file import GateFileError
from mole_diffusion.ui import Studio, import_gradio, parse_named

STEPS = 3
LORAS = {name: ASSETS / "loras" / f"{name}.safetensors" for name in ("star", "stripes", "checker")}


@pytest.fixture(scope="module")
def studio():
    return Studio.demo(device="cpu")


@pytest.fixture(scope="module")
def prompt(studio):
    return studio.prompts[0]


def pixels(image):
    return np.asarray(image.convert("RGB")).astype(int)


def test_demo_world_loads_with_gates_triggers_and_every_mode(studio):
    assert studio.expert_names == ["star", "stripes", "checker"]
    assert studio.triggers == {"star": "sks", "stripes": "zwx", "checker": "qkx"}
    assert [mode for _, mode in studio.modes()] == ["gates", "constant", "regional"]
    assert "learned gates" in studio.modes()[0][0] and "block granularity" in studio.describe()


def test_render_gives_image_and_heatmap_and_unchecking_an_expert_changes_the_image(studio, prompt):
    first = studio.render(prompt, seed=0, steps=STEPS)
    again = studio.render(prompt, seed=0, steps=STEPS)
    masked = studio.render(prompt, seed=0, steps=STEPS, experts=["star", "stripes"])
    assert first.image.size == (64, 64) and first.expert_map is None
    assert np.array_equal(pixels(first.image), pixels(again.image))  # same seed, same image
    assert np.abs(pixels(first.image) - pixels(masked.image)).max() > 8
    # the heatmap shows every gate's mean weights: the masked expert's are 0, the others' not (the shipped gates
    # weigh every expert the prompt names)
    assert first.heatmap.size[0] > 200 and first.heatmap.size[1] > 200
    means = torch.stack(list(masked.gate_means.values()))
    assert means.shape == (len(masked.gate_means), 3)
    assert bool((means[:, :2] > 0.1).all()) and means[:, 2].abs().max() < 1e-6
    assert "checker masked" in masked.summary and "learned gates" in masked.summary


def test_constant_weights_are_what_every_gate_applies(studio, prompt):
    result = studio.render(prompt, steps=STEPS, mode="constant", weights={"star": 1.0, "stripes": 0.5, "checker": 0.25})
    for gate, means in result.gate_means.items():
        assert torch.allclose(means, torch.tensor([1.0, 0.5, 0.25])), gate
    lighter = studio.render(prompt, steps=STEPS, mode="constant", weights=[1.0, 0.5, 1.5])
    assert np.abs(pixels(result.image) - pixels(lighter.image)).max() > 8
    assert "constant weights star 1, stripes 0.5, checker 0.25" in result.summary


def test_compare_draws_every_method_as_render_does(studio, prompt):
    results = studio.compare(prompt, seed=1, steps=STEPS)
    labels = [label for _, label in results]
    assert labels == ["base", "lora star", "lora stripes", "lora checker", "NLA (uniform)", "sum", "MoLE", "regional"]
    images = dict((label, pixels(image)) for image, label in results)
    same = {"MoLE": studio.render(prompt, seed=1, steps=STEPS), "sum": studio.render(prompt, seed=1, steps=STEPS, mode="constant"),
            "base": studio.render(prompt, seed=1, steps=STEPS, experts=[])}
    for label, result in same.items():
        assert np.array_equal(images[label], pixels(result.image)), label
    assert np.abs(images["base"] - images["MoLE"]).max() > 8  # the experts do something
    assert "base model" in same["base"].summary


def test_regional_routing_shows_where_each_expert_acts(studio, prompt):
    result = studio.render(prompt, steps=STEPS, mode="regional", weights=[1.0, 1.0, 0.5])
    assert result.expert_map is not None and result.expert_map.width > 4 * 96  # the image, then a mask per expert
    assert studio.pipe.mole.regional is None  # routing is switched off again after the call
    assert studio.render(prompt, steps=STEPS, mode="constant").expert_map is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=" "), "prompt is empty"),
    (dict(steps=0), "steps: expected at least 1"),
    (dict(steps=2.5), "steps: expected a whole number"),
    (dict(seed=None), "seed: expected a whole number"),
    (dict(guidance_scale=float("nan")), "guidance scale"),
    (dict(mode="fancy"), "unknown mode 'fancy'"),
    (dict(experts=["moon"]), r"unknown expert\(s\) \['moon'\]"),
    (dict(mode="constant", weights={"star": float("nan")}), "weight of 'star'"),
])
def test_bad_inputs_are_messages(studio, prompt, kwargs, message):
    with pytest.raises(MoLEError, match=message):
        studio.render(**{"prompt": prompt, "steps": STEPS, **kwargs})


def test_bad_files_are_named_and_what_was_loaded_stays(tmp_path, prompt):
    studio = Studio(ASSETS / "pipeline", LORAS, device="cpu")  # no gates, no triggers
    assert [mode for _, mode in studio.modes()] == ["gates", "constant"] and "untrained" in studio.modes()[0][0]
    with pytest.raises(MoLEError, match="regional routing needs a trigger word"):
        studio.render(prompt, steps=STEPS, mode="regional")
    missing = tmp_path / "moon.safetensors"
    with pytest.raises(MoLEError, match=f"{missing}: LoRA file not found"):
        studio.load(ASSETS / "pipeline", {**LORAS, "moon": missing})
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(MoLEError, match="junk.safetensors: not a readable safetensors LoRA file"):
        studio.load(ASSETS / "pipeline", {"junk": tmp_path / "junk.safetensors"})
    with pytest.raises(GateFileError, match="junk.safetensors: not a readable safetensors gate file"):
        studio.load(ASSETS / "pipeline", LORAS, gates=tmp_path / "junk.safetensors")
    with pytest.raises(BaseModelError, match="nowhere: cannot load"):
        studio.load(tmp_path / "nowhere", LORAS)
    with pytest.raises(MoLEError, match=r"trigger words for \['moon'\]"):
        studio.load(ASSETS / "pipeline", LORAS, triggers={"moon": "mnx"})
    with pytest.raises(MoLEError, match=r"needs a trigger word for every expert: none for \['checker'\]"):
        studio.load(ASSETS / "pipeline", LORAS, triggers={"star": "sks", "stripes": "zwx"})
    assert studio.expert_names == list(LORAS) and studio.gates is None and studio.triggers is None
    assert studio.render(prompt, steps=STEPS).image.size == (64, 64)  # still working


def test_parse_named():
    assert parse_named("a=x.safetensors\n\n  b = y.safetensors \nloras/c.safetensors", "LoRAs") == {
        "a": "x.safetensors", "b": "y.safetensors", "c": "loras/c.safetensors"}
    assert parse_named("", "trigger words", bare_is_path=False) == {}
    with pytest.raises(MoLEError, match="trigger words, line 1: expected NAME=VALUE, got 'sks'"):
        parse_named("sks", "trigger words", bare_is_path=False)
    with pytest.raises(MoLEError, match="LoRAs, line 2: the name 'a' is given twice"):
        parse_named("a=x\na=y", "LoRAs")


@pytest.mark.parametrize("argv, message", [
    (["ui", "--lora", "a=a.safetensors"], "--lora need --base"),
    (["ui", "--base", "tiny"], "--base needs at least one --lora"),
    (["ui", "--base", "tiny", "--lora", "a=x", "--lora", "a=y"], "--lora names must differ"),
    (["ui", "--base", "tiny", "--lora", "a=x", "--trigger", "sks"], "expected NAME=WORDS"),
    (["ui", "--port", "70000"], "--port must be from 0 to 65535"),
])
def test_ui_command_refuses_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_without_gradio_the_command_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    with pytest.raises(MoLEError, match=r'pip install -e "\.\[ui\]"'):
        import_gradio()
    assert main(["ui", "--base", "nowhere", "--lora", "a=a.safetensors"]) == 1  # said before any model loads
    assert 'mole-diffusion ui: error: the app needs Gradio: pip install -e ".[ui]"' in capsys.readouterr().err


def test_page_builds_offline(studio):
    gr = pytest.importorskip("gradio", reason="the page needs Gradio (pip install -e '.[ui]')")
    from mole_diffusion.ui import build_app, theme

    app = build_app(studio)
    assert isinstance(app, gr.Blocks) and app.analytics_enabled is False
    # system fonts only: no web font (Google's or Gradio's own) for the browser to fetch
    fonts = [*theme()._font, *theme()._font_mono]
    assert fonts and all(isinstance(font, str) or type(font) is gr.themes.Font for font in fonts)
    assert "@font-face" not in "".join(theme()._font_css) and theme()._stylesheets == []


def test_the_api_names_its_endpoints_and_inputs_as_the_page_does(studio, prompt):
    """gradio_client sees /generate, /compare and /load, each input named by the page's words (the weight sliders by
    position: weight_1 is the first loaded expert's), and /generate draws what Studio.render draws with those values."""
    pytest.importorskip("gradio", reason="the app needs Gradio (pip install -e '.[ui]')")
    gradio_client = pytest.importorskip("gradio_client", reason="gradio_client comes with Gradio")
    from mole_diffusion.ui import MAX_EXPERTS, launch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = launch(studio, port=port, block=False, quiet=True)
    try:
        client = gradio_client.Client(app.local_url, verbose=False)
        api = client.view_api(return_format="dict", print_info=False)
        endpoints = api["named_endpoints"]
        assert set(endpoints) == {"/generate", "/compare", "/load"} and not api["unnamed_endpoints"]
        inputs = {name: [(p["parameter_name"], p["label"]) for p in e["parameters"]] for name, e in endpoints.items()}
        controls = [("prompt", "prompt"), ("negative_prompt", "negative prompt"), ("seed", "seed"), ("steps", "steps"),
                    ("guidance_scale", "guidance scale")]
        routing = [("experts", "experts (unchecked: masked)"), ("routing", "routing")]
        weights = [(f"weight_{i}", f"weight of {name}") for i, name in enumerate(studio.expert_names, 1)]
        assert inputs["/generate"][:len(controls) + len(routing) + len(weights)] == [*controls, *routing, *weights]
        assert [name for name, _ in inputs["/generate"][len(controls) + len(routing):]] == \
            [f"weight_{i}" for i in range(1, MAX_EXPERTS + 1)]  # the hidden sliders too: a Load may show them
        assert inputs["/compare"] == controls
        assert [name for name, _ in inputs["/load"]] == ["base", "loras", "gates", "triggers"]
        assert [r["label"] for r in endpoints["/generate"]["returns"]] == ["image", "expert map", "gate heatmap", "status"]

        image, expert_map, heatmap, status = client.predict(prompt=prompt, seed=3, steps=2, routing="constant", weight_1=0.5,
                                                            weight_2=1.5, weight_3=0.0, api_name="/generate")
        expected = studio.render(prompt, seed=3, steps=2, guidance_scale=5.0, mode="constant", weights=[0.5, 1.5, 0.0])
        assert status == expected.summary
        np.testing.assert_array_equal(pixels(Image.open(image)), pixels(expected.image))
        assert expert_map is None and Image.open(heatmap).size == expected.heatmap.size
    finally:
        app.close()

"""``mole-diffusion ui``: compose LoRAs interactively in the browser (Gradio, an optional dependency).

The logic is plain Python and needs no Gradio: a ``Studio`` holds one MoLE pipeline with its experts;
``render`` draws one image (experts masked or not; learned gates, constant weights or regional routing) with
its gate heatmap and, for regional routing, where each expert acted; ``compare`` draws one seed through base,
each LoRA alone, NLA, the plain sum, MoLE and regional routing, as the demo does per method. ``build_app``
wires Gradio widgets to a Studio and ``launch`` serves it offline: no analytics, system fonts only (no font or
script from the internet), bound to 127.0.0.1 unless told otherwise.

    pip install -e ".[ui]"
    mole-diffusion ui                                   # the shipped demo world
    mole-diffusion ui --base BASE --lora dog=dog.safetensors --lora hat=hat.safetensors --gates gates.safetensors
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image

from .errors import MoLEError
from .eval.methods import draw
from .eval.report import gate_heatmap
from .experts import ExpertError

if TYPE_CHECKING:
    import gradio

logger = logging.getLogger(__name__)

MAX_EXPERTS = 8  # weight sliders the page holds: a Gradio layout is fixed, so the unused ones stay hidden
# the API's names of the sliders (gradio_client, the page's "Use via API"): by position, as a Load changes the experts
WEIGHT_INPUTS = tuple(f"weight_{i}" for i in range(1, MAX_EXPERTS + 1))
MODES = ("gates", "constant", "regional")
# CSS font stacks the browser resolves locally: a theme's default fonts may be fetched from the internet
SYSTEM_FONTS = ("ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "Helvetica", "Arial", "sans-serif")
SYSTEM_MONO_FONTS = ("ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Liberation Mono", "monospace")
# the demo world draws 64 x 64 images: shown enlarged to the frame, with hard pixel edges instead of a blur
CSS = """.mole-pixels img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"""


@dataclass
class Render:
    image: Image.Image
    heatmap: Image.Image  # gates x experts, each gate's mean weight over the steps
    gate_means: dict[str, torch.Tensor]  # what the heatmap shows: {gate name: (N,)}
    expert_map: Image.Image | None  # regional routing: where each expert acted at the last step; else None
    summary: str  # what ran, in words


class Studio:
    """One MoLE pipeline with its experts, for the app. Calls are serialised: Gradio runs events in threads
    and they share the pipeline."""

    def __init__(self, base: str | os.PathLike, loras: Mapping[str, str | os.PathLike], gates: str | os.PathLike | None = None,
                 triggers: Mapping[str, str] | None = None, prompts: Sequence[str] = (), scheduler: str | None = None,
                 device: str | None = None):
        self._lock = threading.Lock()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = None
        self.load(base, loras, gates, triggers, prompts, scheduler)

    @classmethod
    def demo(cls, assets: str | os.PathLike | None = None, device: str | None = None, scheduler: str = "ddim") -> Studio:
        """The shipped demo world: its base, three concept LoRAs, learned gates, trigger words and prompts
        (DDIM, as the demo draws them)."""
        from .demo.run import ASSETS, check_assets
        from .concepts import load_compositions, load_concepts, trigger_words

        assets = Path(assets) if assets is not None else ASSETS
        check_assets(assets)
        concepts = load_concepts(assets / "concepts.toml")
        return cls(assets / "pipeline", {c.name: c.lora for c in concepts}, assets / "gates.safetensors",
                   triggers={c.name: " ".join(trigger_words(c, concepts)) for c in concepts},
                   prompts=load_compositions(assets / "concepts.toml"), scheduler=scheduler, device=device)

    def load(self, base: str | os.PathLike, loras: Mapping[str, str | os.PathLike], gates: str | os.PathLike | None = None,
             triggers: Mapping[str, str] | None = None, prompts: Sequence[str] = (), scheduler: str | None = None) -> None:
        """Load a base model with its LoRAs (and gate file, and trigger words for regional routing). A bad file
        or value raises a ``MoLEError`` naming it, and what was loaded before stays loaded."""
        from .errors import load_base_pipeline
        from .gate_file import gate_kind
        from .pipelines import mole_pipeline_class
        from .schedulers import SCHEDULERS, use_scheduler

        loras = {str(name): str(path) for name, path in loras.items()}
        triggers = {str(name): str(words) for name, words in (triggers or {}).items()}
        if not loras:
            raise MoLEError("no LoRA given: at least one NAME=FILE")
        if len(loras) > MAX_EXPERTS:
            raise MoLEError(f"{len(loras)} LoRAs given; the app shows at most {MAX_EXPERTS}")
        unknown = [name for name in triggers if name not in loras]
        if unknown:
            raise MoLEError(f"trigger words for {unknown}, which are not among the LoRAs {list(loras)}")
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise MoLEError(f"unknown scheduler {scheduler!r}; choose from {sorted(SCHEDULERS)}")
        missing = [path for path in loras.values() if not Path(path).exists()]
        if missing:  # said at once, not after the base model has loaded
            raise ExpertError(f"{missing[0]}: LoRA file not found")
        kind = gate_kind(gates) if gates else None  # read before the base loads: a bad gate file fails fast
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        # a str: diffusers takes a Path it cannot find for a hub id and fails on it (AttributeError)
        pipe = load_base_pipeline(mole_pipeline_class(str(base)), str(base), dtype=dtype, safety_checker=None)
        if scheduler is not None:
            use_scheduler(pipe, scheduler)
        pipe.load_experts(loras, gate_config=kind)
        if gates:
            pipe.load_gates(gates)
        if triggers:  # checked now (a trigger for every expert, with tokens), not at the first regional image
            pipe.enable_regional_routing(triggers)
            pipe.disable_regional_routing()
        pipe.to(self.device)
        pipe.set_progress_bar_config(disable=True)
        with self._lock:
            self.pipe, self.base, self.loras, self.gates = pipe, str(base), loras, str(gates) if gates else None
            self.triggers, self.prompts = triggers or None, list(prompts)

    @property
    def expert_names(self) -> list[str]:
        return self.pipe.expert_names

    def modes(self) -> list[tuple[str, str]]:
        """(label, mode) for each way of mixing the experts this world allows."""
        gates = "learned gates (MoLE)" if self.gates else "untrained gates (uniform: NLA)"
        modes = [(gates, "gates"), ("constant weights (sliders)", "constant")]
        if self.triggers:
            modes.append(("regional routing (sliders weigh each expert where it acts)", "regional"))
        return modes

    def describe(self) -> str:
        """What is loaded, in Markdown."""
        mole = self.pipe.mole
        config = mole.gate_config
        gates = (f"`{_short(self.gates)}` ({config.granularity} granularity, {config.activation}"
                 f"{', per position' if config.per_position else ''})") if self.gates else "untrained (uniform)"
        triggers = ", ".join(f"{n}: *{w}*" for n, w in self.triggers.items()) if self.triggers else "none (no regional routing)"
        return (f"**base** `{_short(self.base)}` · **experts** {', '.join(self.expert_names)} · **gates** {gates} · "
                f"**triggers** {triggers}")

    # -- drawing -----------------------------------------------------------------------------------------
    def render(self, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 25, guidance_scale: float = 5.0,
               experts: Sequence[str] | None = None, mode: str = "gates",
               weights: Sequence[float] | Mapping[str, float] | None = None) -> Render:
        """One image. ``experts``: the active ones (None: all; none: the base model); ``mode``: "gates" (the
        learned or untrained gates, renormalised over the active experts), "constant" (``weights``, one per
        expert, as NLA / the plain sum) or "regional" (each expert with its weight where its trigger word's
        cross-attention points)."""
        with self._lock:
            pipe, names = self.pipe, self.expert_names
            kwargs = _call_kwargs(prompt, negative_prompt, seed, steps, guidance_scale)
            active = self._active(experts)
            weights = self._weights(weights)
            if mode not in MODES:
                raise MoLEError(f"unknown mode {mode!r}; choose from {list(MODES)}")
            if mode == "regional" and not self.triggers:
                raise MoLEError("regional routing needs a trigger word for every expert (NAME=WORDS), none were given")
            pipe.disable_regional_routing()
            try:
                if not active:  # zero weights add exactly nothing: the base model's own image
                    pipe.set_experts(names, [0.0] * len(names))
                elif mode == "gates":
                    pipe.set_experts(active)
                elif mode == "constant":
                    pipe.set_experts(active, [weights[n] for n in active])
                else:
                    pipe.set_experts(active)
                    pipe.enable_regional_routing(self.triggers, [weights[n] for n in names])
                image = pipe(**kwargs).images[0]
                # mean over the steps and both halves of classifier-free guidance, as the evaluator's heatmap
                means = {gate: history.mean(dim=(0, 1)) for gate, history in pipe.gate_weights.items()}
                expert_map = None
                if mode == "regional" and active and pipe.expert_masks is not None:
                    masks = pipe.expert_masks  # the last entry was read after the last step: the one before applied
                    expert_map = _expert_map(prompt, image, masks[-2 if len(masks) > 1 else -1, 0], names)
            finally:
                pipe.disable_regional_routing()
        return Render(image, gate_heatmap(means, names), means, expert_map, self._summary(active, mode, weights, kwargs))

    def compare(self, prompt: str, negative_prompt: str = "", seed: int = 0, steps: int = 25,
                guidance_scale: float = 5.0) -> list[tuple[Image.Image, str]]:
        """One seed through base, each LoRA alone, NLA (uniform), the plain sum, MoLE (with a gate file) and
        regional routing (with trigger words): [(image, label)], the demo's methods drawn as the demo draws them."""
        with self._lock:
            pipe, names = self.pipe, self.expert_names
            _call_kwargs(prompt, negative_prompt, seed, steps, guidance_scale)  # checked once, before any image
            methods = ["base", *(f"single_{n}" for n in names), "nla", "sum"]
            methods += (["mole"] if self.gates else []) + (["regional"] if self.triggers else [])
            uniform = [1.0 / len(names)] * len(names)
            results = []
            pipe.disable_regional_routing()
            try:
                for method in methods:
                    kwargs = _call_kwargs(prompt, negative_prompt, seed, steps, guidance_scale)  # a fresh generator each
                    del kwargs["prompt"]
                    # no second, diffusers pipeline here: base is the MoLE pipeline with zero weights (the same image)
                    image = draw(pipe, method=method, prompt=prompt, names=names, weights=uniform, triggers=self.triggers,
                                 **kwargs)
                    results.append((image, METHOD_LABELS.get(method, method.replace("single_", "lora "))))
            finally:
                pipe.disable_regional_routing()
        return results

    def _active(self, experts: Sequence[str] | None) -> list[str]:
        names = self.expert_names
        if experts is None:
            return names
        unknown = [n for n in experts if n not in names]
        if unknown:
            raise MoLEError(f"unknown expert(s) {unknown}; loaded experts are {names}")
        return [n for n in names if n in experts]  # the loaded order

    def _weights(self, weights: Sequence[float] | Mapping[str, float] | None) -> dict[str, float]:
        names = self.expert_names
        if weights is None:
            return dict.fromkeys(names, 1.0)
        if not isinstance(weights, Mapping):
            if len(weights) < len(names):
                raise MoLEError(f"{len(weights)} weights for {len(names)} experts {names}")
            weights = dict(zip(names, weights))
        checked = {}
        for name in names:
            value = weights.get(name, 1.0)
            if value is None or not math.isfinite(float(value)):
                raise MoLEError(f"weight of {name!r}: expected a number, got {value!r}")
            checked[name] = float(value)
        return checked

    def _summary(self, active: list[str], mode: str, weights: dict[str, float], kwargs: dict) -> str:
        masked = [n for n in self.expert_names if n not in active]
        if not active:
            what = "the base model (every expert unchecked)"
        elif mode == "gates":
            what = f"{'learned' if self.gates else 'untrained'} gates over {', '.join(active)}"
        else:
            kind = "constant weights" if mode == "constant" else "regional routing"
            what = f"{kind} " + ", ".join(f"{n} {weights[n]:g}" for n in active)
        if active and masked:
            what += f" ({', '.join(masked)} masked)"
        return (f"drew *{kwargs['prompt']}* with {what}; seed {kwargs['generator'].initial_seed()}, "
                f"{kwargs['num_inference_steps']} steps, guidance {kwargs['guidance_scale']:g}")


METHOD_LABELS = {"base": "base", "nla": "NLA (uniform)", "sum": "sum", "mole": "MoLE", "regional": "regional"}


def _call_kwargs(prompt: str, negative_prompt: str, seed: int, steps: int, guidance_scale: float) -> dict:
    """The pipeline's arguments from what a page sends (numbers may come as floats or None)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise MoLEError("the prompt is empty: write what to draw")
    for what, value in (("seed", seed), ("steps", steps)):
        if value is None or float(value) != int(float(value)):
            raise MoLEError(f"{what}: expected a whole number, got {value!r}")
    if int(steps) < 1:
        raise MoLEError(f"steps: expected at least 1, got {int(steps)}")
    if not 0 <= int(seed) < 2**63:
        raise MoLEError(f"seed: expected a whole number from 0, got {int(seed)}")
    if guidance_scale is None or not math.isfinite(float(guidance_scale)):
        raise MoLEError(f"guidance scale: expected a number, got {guidance_scale!r}")
    return dict(prompt=prompt, negative_prompt=negative_prompt or None, num_inference_steps=int(steps),
                guidance_scale=float(guidance_scale), generator=torch.Generator().manual_seed(int(seed)))


def _short(path: str) -> str:
    """A path under the working folder, relative to it (shorter to read); anything else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _expert_map(prompt: str, image: Image.Image, masks: torch.Tensor, names: list[str]) -> Image.Image:
    from .demo.run import expert_map_sheet

    return expert_map_sheet([(prompt, image, masks)], names)


def parse_named(text: str, what: str, bare_is_path: bool = True) -> dict[str, str]:
    """Lines of ``NAME=VALUE`` -> {name: value}, blank lines skipped; with ``bare_is_path`` a line without a
    name is a path named by its file stem (as ``--lora FILE``)."""
    named: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        name, sep, value = (part.strip() for part in line.partition("="))
        if not sep and bare_is_path:
            name, value = Path(line).stem, line
        if not name or not value:
            raise MoLEError(f"{what}, line {number}: expected NAME=VALUE, got {line!r}")
        if name in named:
            raise MoLEError(f"{what}, line {number}: the name {name!r} is given twice")
        named[name] = value
    return named


# -- the page ------------------------------------------------------------------------------------------------
def import_gradio():
    """Gradio, with its telemetry off before it loads (it reads the setting on import and at each Blocks)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        import gradio
    except ImportError as err:
        raise MoLEError("the app needs Gradio: pip install -e \".[ui]\" (or pip install gradio)") from err
    return gradio


def theme() -> gradio.themes.Base:
    gr = import_gradio()
    return gr.themes.Default(font=list(SYSTEM_FONTS), font_mono=list(SYSTEM_MONO_FONTS))


def _message(err: Exception) -> str:
    if isinstance(err, MoLEError):
        return f"**error:** {err}"
    logger.exception("mole-diffusion ui")  # a bug, not the user's input: the traceback goes to the terminal
    return f"**error** (unexpected; the traceback is in the terminal): {type(err).__name__}: {err}"


def build_app(studio: Studio) -> gradio.Blocks:
    """The page: model, prompt and routing controls on the left; the image, gate heatmap and expert map, or
    the comparison, on the right. Errors show in the status line; the app keeps working."""
    gr = import_gradio()
    names = studio.expert_names
    with gr.Blocks(title="mole-diffusion", analytics_enabled=False) as app:
        gr.Markdown("## mole-diffusion · mix LoRA experts with MoLE")
        # the labels of components the page shows without one name them in the API
        world = gr.Markdown(studio.describe(), label="world", elem_id="world")
        status = gr.Markdown("", label="status", elem_id="status")  # what the last click did, or what was wrong
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="prompt", value=(studio.prompts or [""])[0], elem_id="prompt")
                negative = gr.Textbox(label="negative prompt", value="", elem_id="negative")  # "": optional in the API
                with gr.Row():
                    seed = gr.Number(label="seed", value=0, precision=0, minimum=0, elem_id="seed")
                    steps = gr.Slider(1, 100, value=25, step=1, label="steps", elem_id="steps")
                    guidance = gr.Slider(0, 15, value=5.0, step=0.5, label="guidance scale", elem_id="guidance")
                experts = gr.CheckboxGroup(names, value=names, label="experts (unchecked: masked)", elem_id="experts")
                mode = gr.Radio(studio.modes(), value="gates", label="routing", elem_id="mode")
                sliders = [gr.Slider(0, 2, value=1.0, step=0.05, label=_weight_label(names, i), visible=i < len(names),
                                     elem_id=f"weight-{i}") for i in range(MAX_EXPERTS)]
                with gr.Row():
                    generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    compare_button = gr.Button("Compare methods", elem_id="compare")
                if studio.prompts:
                    gr.Examples([[p] for p in studio.prompts], inputs=[prompt], label="the world's composition prompts")
                with gr.Accordion("model: base, LoRAs, gates", open=False, elem_id="model"):
                    base = gr.Textbox(label="base model (diffusers folder or hub id)", value=studio.base, elem_id="base")
                    loras = gr.Textbox(label="LoRAs, one NAME=FILE a line", lines=3, elem_id="loras",
                                       value="\n".join(f"{n}={p}" for n, p in studio.loras.items()))
                    gates = gr.Textbox(label="gate file (empty: untrained gates)", value=studio.gates or "", elem_id="gates")
                    triggers = gr.Textbox(label="trigger words for regional routing, one NAME=WORDS a line (optional)", lines=3,
                                          value="\n".join(f"{n}={w}" for n, w in (studio.triggers or {}).items()), elem_id="triggers")
                    load_button = gr.Button("Load", elem_id="load")
            with gr.Column(scale=3):
                with gr.Tabs() as tabs:
                    with gr.Tab("image", id="image-tab"):
                        with gr.Row():
                            image = gr.Image(label="image", type="pil", format="png", height=400, elem_id="image",
                                             elem_classes="mole-pixels", interactive=False)
                            with gr.Column():  # a label chip would hide the heatmap's first row
                                gr.Markdown("gate heatmap: gates x experts, each gate's mean weight over the steps")
                                heatmap = gr.Image(label="gate heatmap", show_label=False, type="pil", format="png",
                                                   height=440, elem_id="heatmap", interactive=False)
                        with gr.Column(visible=False) as expert_box:  # a label chip would hide the sheet's own headers
                            gr.Markdown("where each expert acts (regional routing, at the last step; white: it acts there)")
                            expert_map = gr.Image(label="expert map", show_label=False, type="pil", format="png",
                                                  elem_id="expert-map", interactive=False)
                    with gr.Tab("compare", id="compare-tab"):
                        gallery = gr.Gallery(label="one seed, every method", columns=4, height="auto", format="png",
                                             elem_id="gallery", elem_classes="mole-pixels")

        # Gradio names an endpoint's parameters after its function's: the page's words, and weight_1, weight_2...
        @_named_parameters("prompt", "negative_prompt", "seed", "steps", "guidance_scale", "experts", "routing",
                           *WEIGHT_INPUTS)
        def on_generate(prompt, negative_prompt, seed, steps, guidance_scale, experts, routing, *weights):
            """One image with the page's settings: the image, where each expert acted (regional routing), the gate
            heatmap and what ran. ``experts``: the checked ones; ``routing``: gates, constant or regional;
            ``weight_<i>``: the i-th loaded expert's weight (constant and regional routing)."""
            try:
                result = studio.render(prompt, negative_prompt, seed, steps, guidance_scale, experts or [], routing,
                                       dict(zip(studio.expert_names, weights)))
            except Exception as err:  # the page says what is wrong and stays usable
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), _message(err), gr.skip()
            return (result.image, result.expert_map, gr.Column(visible=result.expert_map is not None), result.heatmap,
                    result.summary, gr.Tabs(selected="image-tab"))

        def on_compare(prompt, negative_prompt, seed, steps, guidance_scale):
            """One seed through base, each LoRA alone, NLA, the sum, MoLE and regional routing: labelled images."""
            try:
                results = studio.compare(prompt, negative_prompt, seed, steps, guidance_scale)
            except Exception as err:
                return gr.skip(), _message(err), gr.skip()
            return results, f"compared {', '.join(label for _, label in results)} on seed {int(seed)}", gr.Tabs(selected="compare-tab")

        def on_load(base, loras, gates, triggers):
            """Load another base model, LoRAs (NAME=FILE lines), gate file and trigger words (NAME=WORDS lines)."""
            try:
                studio.load(base.strip(), parse_named(loras, "LoRAs"), gates.strip() or None,
                            parse_named(triggers, "trigger words", bare_is_path=False), studio.prompts)
            except Exception as err:  # the world loaded before stays, and says so
                return (gr.skip(), f"{_message(err)} (still loaded: {', '.join(studio.expert_names)})",
                        *[gr.skip()] * (2 + MAX_EXPERTS))
            names = studio.expert_names
            updates = [gr.Slider(value=1.0, visible=i < len(names), label=_weight_label(names, i)) for i in range(MAX_EXPERTS)]
            return (studio.describe(), f"loaded {', '.join(names)}", gr.CheckboxGroup(choices=names, value=names),
                    gr.Radio(choices=studio.modes(), value="gates"), *updates)

        controls = [prompt, negative, seed, steps, guidance]
        generate_button.click(on_generate, [*controls, experts, mode, *sliders],
                              [image, expert_map, expert_box, heatmap, status, tabs], api_name="generate")
        compare_button.click(on_compare, controls, [gallery, status, tabs], api_name="compare")
        load_button.click(on_load, [base, loras, gates, triggers], [world, status, experts, mode, *sliders], api_name="load")
    return app


def _weight_label(names: list[str], index: int) -> str:
    return f"weight of {names[index]}" if index < len(names) else f"weight of expert {index + 1}"


def _named_parameters(*names: str):
    """Show a function of ``*values`` to Gradio as one of named parameters (it reads ``inspect.signature``; the call
    stays positional): its API then names each input, where ``*weights`` would give param_7, param_8..."""
    def name(fn):
        fn.__signature__ = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names])
        return fn

    return name


def launch(studio: Studio, host: str = "127.0.0.1", port: int = 7860, block: bool = True, quiet: bool = False) -> gradio.Blocks:
    """Serve the app on ``host:port`` (127.0.0.1: this machine only); ``block=False`` returns at once with the
    server running in a thread (``app.close()`` stops it)."""
    app = build_app(studio)
    app.queue(default_concurrency_limit=1)  # one pipeline: one drawing at a time, the others wait their turn
    try:
        app.launch(server_name=host, server_port=port, theme=theme(), css=CSS, ssr_mode=False, share=False,
                   inbrowser=False, prevent_thread_lock=True, quiet=True, show_error=True)
    except OSError as err:  # the port is taken, or the address is not this machine's
        raise MoLEError(f"cannot serve on {host}:{port} ({err}); pass another --port or --host") from err
    if not quiet:
        print(f"mole-diffusion ui: open {app.local_url} in a browser (Ctrl+C stops it)", flush=True)
    if block:
        app.block_thread()  # until Ctrl+C
    return app

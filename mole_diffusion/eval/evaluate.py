"""Compare composition methods on the same prompts and seeds, score every image with CLIP, and write a table,
plots and a short report (METHOD.md sections 6-7).

Methods (names as in the outputs):
- ``mole``: learned gates (the gate file); ``mole_without_<name>``: the same with one concept masked out;
- ``mole_constant``: the learned gates frozen into constant per-block weights (their mean over the
  evaluation prompts, ``export_block_weights``) and fused: what gates cost nothing would give up;
- ``nla``: constant weights summing to 1 (uniform unless given); ``sum``: the plain sum of the deltas;
- ``set_adapters``: diffusers' own ``load_lora_weights`` + ``set_adapters`` with the NLA weights (must
  give the same images as ``nla``);
- ``peft_cat``, ``peft_svd``, ``peft_ties``, ``peft_dare_linear``: PEFT's ``add_weighted_adapter`` merges with
  the NLA weights (cat is exact; svd truncates; ties and dare_linear combine A's and B's separately, not the
  weighted sum of deltas, and need LoRAs of one rank);
- ``switch``: LoRA Switch, one LoRA active per denoising step, cycling every ``switch_every`` steps;
- ``composite``: LoRA Composite, the guided noise prediction averaged over the LoRAs (classifier-free
  guidance is linear, so averaging each half of the UNet's batch over the LoRAs is exactly the mean of the
  per-LoRA guidances);
- ``regional``: training-free regional routing (``mole_diffusion.routing``): each LoRA at weight 1 where the
  cross-attention of its trigger word points (the trigger: the concepts file's ``trigger``, or the instance
  prompt's own word);
- ``single_<name>``: one LoRA alone; ``base``: no LoRA.
Images made elsewhere (another tool, a sampler of your own) join the table through ``image_folders`` (NAME -> a
folder of ``p{prompt index}-s{seed}.png``), scored by the same CLIP, references and presence judge, on the same
prompts and seeds; a name ending in ``_without_<concept>`` masks that concept, as ``mole_without_<concept>`` does.
A run keeps ``results.jsonl`` as it goes and skips what is done when started again.
"""

from __future__ import annotations

import hashlib
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..train.concepts import Concept, ConceptError, load_compositions, load_concepts, trigger_words
from ..errors import MoLEError, load_base_pipeline
from ..experts import lora_components
from ..gate_file import GateFileError, gate_kind
from ..quiet import quiet_adapter_loading, quiet_multiple_adapters
from .clip import ImageBackbone, load_clip
from .presence import judged_row, load_presence_judge
from .stats import bootstrap_interval, by_prompt, paired_difference, wilson_interval
from .scores import image_alignment, reference_embeddings, score_images


@dataclass(kw_only=True)
class EvaluationConfig:
    base: str
    concepts: Path | None  # None: ``loras`` instead, without reference images (text alignment only)
    output_dir: Path
    clip_model: str
    clip_pretrained: str | None = None
    image_model: str | None = None  # a second backbone for image alignment (DINO): a transformers folder or id
    presence_model: str | None = None  # a presence judge folder: the demo world's attribute judge, or OWL-ViT / OWLv2
    presence_threshold: float = 0.1  # a detector's box score from which a concept counts as present
    gates: Path | None = None
    loras: dict[str, str] = field(default_factory=dict)  # name -> LoRA file, when there is no concepts file
    prompts: list[str] = field(default_factory=list)  # default: templates over the concepts' instance prompts
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    methods: list[str] = field(default_factory=list)  # default: every method that applies
    image_folders: dict[str, str] = field(default_factory=dict)  # NAME -> folder of p{prompt}-s{seed}.png made elsewhere
    nla_weights: list[float] | None = None
    scheduler: str | None = None  # None: "ddpm" for SD / SDXL, Flux's own flow-matching scheduler
    steps: int = 50
    guidance_scale: float = 7.5
    resolution: int | None = None
    switch_every: int = 1
    device: str | None = None
    progress: bool = True


ID_COLUMNS = ("method", "prompt_index", "prompt", "seed", "image")
PROMPT_TEMPLATES = ("{}", "a picture of {}", "{}, high quality, detailed")


def default_prompts(concepts: list[Concept]) -> list[str]:
    joined = " and ".join(c.prompt for c in concepts)
    return [template.format(joined) for template in PROMPT_TEMPLATES]


PEFT_MERGES = ("cat", "svd", "ties", "dare_linear")  # add_weighted_adapter combination types
SAME_RANK_MERGES = ("ties", "dare_linear")  # these combine the A's and the B's separately: one rank for all


def method_names(concepts: list[Concept], has_gates: bool, same_rank: bool = True, family: str = "sd") -> list[str]:
    names = [c.name for c in concepts]
    learned = ["mole", "mole_constant", *(f"mole_without_{n}" for n in names)] if has_gates else []
    merges = [f"peft_{m}" for m in PEFT_MERGES if same_rank or m not in SAME_RANK_MERGES]
    # regional routing reads a UNet's cross-attention maps: not Flux's joint attention
    regional = ["regional"] if _triggers(concepts) and family != "flux" else []
    return [*learned, "nla", "sum", "set_adapters", *merges, "switch", "composite", *regional, *(f"single_{n}" for n in names), "base"]


def _triggers(concepts: list[Concept]) -> dict[str, list[str]] | None:
    """Each concept's trigger words (for ``regional``), or None when some concept has none (bare LoRA files)."""
    try:
        return {c.name: trigger_words(c, concepts) for c in concepts}
    except ConceptError:
        return None


def evaluate(config: EvaluationConfig) -> Path:
    """Generate, score and summarise; returns the output folder. Under ``accelerate launch`` each process
    takes every n-th image and the main process writes the summary."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    from ..schedulers import use_scheduler
    from ..pipelines import mole_pipeline_class

    if config.concepts is not None:
        concepts = load_concepts(config.concepts)
    elif config.loras and config.prompts:
        concepts = [Concept(name=name, prompt="", images=None, lora=Path(path)) for name, path in config.loras.items()]
    else:
        raise MoLEError("give a concepts file, or LoRAs (--lora) with the prompts to evaluate (--prompt)")
    names = [c.name for c in concepts]
    if config.gates is not None and not Path(config.gates).is_file():
        raise GateFileError(f"gate file {config.gates} not found")
    pipeline_class = mole_pipeline_class(config.base)  # reads model_index.json only: a bad base fails at once
    available = method_names(concepts, config.gates is not None, family=pipeline_class.family)
    if config.scheduler is None and pipeline_class.family != "flux":
        config = replace(config, scheduler="ddpm")
    methods = config.methods or available
    unknown = [m for m in methods if m not in available]
    if unknown:
        hint = " (mole methods need a gate file)" if any(m.startswith("mole") for m in unknown) else ""
        raise MoLEError(f"unknown method(s) {unknown}{hint}; available: {available}")
    clashes = [m for m in config.image_folders if m in available]
    if clashes:
        raise MoLEError(f"image folders named {clashes} clash with methods of the evaluator; name them otherwise")
    weights = config.nla_weights or [1.0 / len(names)] * len(names)
    if len(weights) != len(names):
        raise MoLEError(f"{len(weights)} NLA weights for {len(names)} concepts {names}")
    compositions = load_compositions(config.concepts) if config.concepts is not None else []
    prompts = config.prompts or compositions or default_prompts(concepts)
    made_elsewhere = {name: Path(folder) for name, folder in config.image_folders.items()}
    missing = next((folder / f"p{p}-s{s}.png" for folder in made_elsewhere.values() for p in range(len(prompts))
                    for s in config.seeds if not (folder / f"p{p}-s{s}.png").is_file()), None)
    if missing is not None:
        raise MoLEError(f"{missing}: not found; an image folder holds p<prompt index>-s<seed>.png for every one of the "
                         f"{len(prompts)} prompts and seeds {config.seeds}")
    methods = [*methods, *made_elsewhere]
    out = Path(config.output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    # as Accelerator does: ACCELERATE_USE_CPU=1 (with `accelerate launch --multi_gpu`) joins CPU processes
    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))
    _check_same_run(out / "run.json", config, prompts, state)
    # one process per device under accelerate launch; --device picks it for a single process
    device = str(state.device) if state.num_processes > 1 or not config.device else config.device
    clip = load_clip(config.clip_model, config.clip_pretrained, device=device)  # before any generation: fail early
    with_images = [c for c in concepts if c.images is not None]
    references = {c.name: reference_embeddings(clip, c.images, out / "cache") for c in with_images}
    backbone = ImageBackbone(config.image_model, device) if config.image_model else None
    backbone_references = {c.name: reference_embeddings(backbone, c.images, out / "cache") for c in with_images} if backbone else {}
    presence = load_presence_judge(config.presence_model, concepts, device, config.presence_threshold) if config.presence_model else None

    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    pipe = load_base_pipeline(pipeline_class, config.base, dtype=dtype, safety_checker=None)
    if config.scheduler is not None:
        use_scheduler(pipe, config.scheduler)
    # gates trained at layer or network granularity load as such (the gate file says which)
    kind = gate_kind(config.gates) if config.gates is not None else None
    pipe.load_experts({c.name: c.lora for c in concepts}, gate_config=kind)
    if config.gates is not None:
        pipe.load_gates(config.gates)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    ranks = {lora.rank for expert in pipe.mole.experts for lora in expert.layers.values()}
    if len(ranks) > 1:
        needs_one_rank = [m for m in methods if m.removeprefix("peft_") in SAME_RANK_MERGES]
        if config.methods and needs_one_rank:
            raise MoLEError(f"methods {needs_one_rank} need LoRAs of one rank (PEFT combines their A's and B's "
                             f"separately); these have ranks {sorted(ranks)}")
        methods = [m for m in methods if m not in needs_one_rank]
    reference_pipe = None
    if {"set_adapters", "base"} & set(methods) or any(m.startswith("peft_") for m in methods):
        # diffusers' own LoRA path on models of its own (the MoLE pipeline's are wrapped)
        reference_pipe = load_base_pipeline(pipeline_class.diffusers_class(), config.base, dtype=dtype, safety_checker=None)
        reference_pipe.scheduler = pipe.scheduler
        reference_pipe.to(device)
        for c in concepts:
            with quiet_adapter_loading(c.name):  # the 2nd adapter on lists the 1st as MISSING: benign
                reference_pipe.load_lora_weights(c.lora, adapter_name=c.name)
        add_peft_merges(reference_pipe, names, weights, [m.removeprefix("peft_") for m in methods if m.startswith("peft_")])
        reference_pipe.set_adapters(names, weights)
        reference_pipe.set_progress_bar_config(disable=True)

    block_weights = None
    if "mole_constant" in methods:
        with state.main_process_first():  # computed once, read by the others
            block_weights = _block_weights(pipe, out / "block_weights.json", prompts, config)
    triggers = _triggers(concepts)
    done = _read_rows(out / "results.jsonl")
    todo = [(m, p, s) for m in methods for p in range(len(prompts)) for s in config.seeds if (m, p, s) not in done]
    if state.num_processes > 1:
        state.print(f"evaluating on {state.num_processes} processes, every {state.num_processes}-th image on each")
    todo = todo[state.process_index :: state.num_processes]
    state.wait_for_everyone()  # every process has read what is done before any adds a row (else the shares shift)
    bar = tqdm(total=len(todo), disable=not (config.progress and state.is_local_main_process), desc="evaluating")
    for method, prompt_index, seed in todo:
        kwargs = dict(num_inference_steps=config.steps, guidance_scale=config.guidance_scale, height=config.resolution,
                      width=config.resolution, generator=torch.Generator().manual_seed(seed))
        if method in made_elsewhere:
            image = Image.open(made_elsewhere[method] / f"p{prompt_index}-s{seed}.png").convert("RGB")
        else:
            image = generate(pipe, reference_pipe, method, prompts[prompt_index], names, weights, config.switch_every,
                             kwargs, block_weights, triggers)
        path = out / "images" / method / f"p{prompt_index}-s{seed}.png"
        path.parent.mkdir(exist_ok=True)
        if method == "mole":  # gate weights (steps, batch, N), mean over steps and both CFG halves, for the heatmap
            means = {gate: history.mean(dim=(0, 1)).contiguous() for gate, history in pipe.gate_weights.items()}
            save_file(means, str(path.with_suffix(".gates.safetensors")))
        if method == "regional":  # where each expert acted at the last step, (N, H, W) on the latent grid
            masks = pipe.expert_masks  # the last entry was read after the last step: the one before is what it applied
            save_file({"masks": masks[-2 if len(masks) > 1 else -1, 0].contiguous()}, str(path.with_suffix(".masks.safetensors")))
        image.save(path)
        scores = score_images(clip, [image], [prompts[prompt_index]], references, [list(references)])[0]
        if backbone is not None:
            scores.update(image_alignment(backbone, [image], backbone_references, [list(references)], prefix="dino")[0])
        if presence is not None:
            composed = composed_concepts(prompts[prompt_index], triggers) or names
            scores.update(judged_row(presence, image, prompts[prompt_index], composed, active_experts(method, names)))
        row = {"method": method, "prompt_index": prompt_index, "prompt": prompts[prompt_index], "seed": seed,
               "image": str(path.relative_to(out)), **scores}
        with open(out / "results.jsonl", "a") as handle:  # one short append per row: processes do not interleave
            handle.write(json.dumps(row) + "\n")
        bar.update(1)
    bar.close()
    if pipe.mole.fused:
        pipe.mole.unfuse()
    pipe.disable_regional_routing()
    state.wait_for_everyone()
    if state.is_main_process:
        write_outputs(out, methods, prompts, config.seeds, names)
    return out


def _check_same_run(path: Path, config: EvaluationConfig, prompts: list[str], state) -> None:
    """A folder holds one run: resuming with other models, gates, prompts or sampler settings would mix results.
    (More methods or seeds are fine: they add rows.)"""
    settings = {
        "base": config.base, "concepts": str(config.concepts), "loras": config.loras, "gates": str(config.gates),
        "gates_hash": hashlib.sha256(Path(config.gates).read_bytes()).hexdigest() if config.gates else None,
        "clip_model": config.clip_model, "clip_pretrained": config.clip_pretrained, "image_model": config.image_model,
        "presence_model": config.presence_model, "presence_threshold": config.presence_threshold,
        "prompts": prompts, "nla_weights": config.nla_weights, "scheduler": config.scheduler, "steps": config.steps,
        "guidance_scale": config.guidance_scale, "resolution": config.resolution, "switch_every": config.switch_every,
    }
    if config.image_folders:  # only then: runs from before image folders resume
        settings["image_folders"] = {name: str(Path(folder).resolve()) for name, folder in config.image_folders.items()}
    with state.main_process_first():
        if path.is_file():
            saved = json.loads(path.read_text())
            changed = sorted(k for k in settings if saved.get(k) != settings[k])
            if changed:
                raise MoLEError(f"{path.parent} holds an evaluation run with other settings ({', '.join(changed)}); "
                                 "use another --out, or the same settings to resume it")
        elif state.is_main_process:
            path.write_text(json.dumps(settings, indent=1))


def add_peft_merges(pipe, names: list[str], weights: list[float], combination_types: list[str], density: float = 0.5) -> None:
    """PEFT's ``add_weighted_adapter`` on diffusers' adapters: a merged adapter ``peft_<type>`` per type in the
    UNet and the text encoder. ``cat`` is exact (the weighted sum of deltas); ``svd`` truncates that sum to
    the largest rank; ``ties`` / ``dare_linear`` (density 0.5) combine the A's and the B's separately."""
    from peft import LoraModel

    torch.manual_seed(0)  # dare drops entries at random: the same merge on every run
    for model in lora_components(pipe).values():
        configs = getattr(model, "peft_config", {})
        if not combination_types or not all(n in configs for n in names):
            continue
        # a LoraModel over the adapters diffusers loaded; it adds one inactive zero adapter of its own
        with quiet_multiple_adapters():  # PEFT warns that the model already holds adapters: it is meant to
            tuner = LoraModel(model, {"merge_scratch": configs[names[0]]}, "merge_scratch")
        for kind in combination_types:
            extra = {"density": density} if kind in SAME_RANK_MERGES else {}
            tuner.add_weighted_adapter(names, weights, f"peft_{kind}", combination_type=kind, **extra)


def _block_weights(pipe, path: Path, prompts: list[str], config: EvaluationConfig) -> dict[str, list[float]]:
    """Constant per-block weights from the learned gates over the evaluation prompts (first seed), kept on disk."""
    if not path.is_file():
        pipe.mole.set_experts(None)
        weights = pipe.export_block_weights(prompts, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                                            height=config.resolution, width=config.resolution,
                                            generator=torch.Generator().manual_seed(config.seeds[0]))
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(weights, indent=1))
        temporary.replace(path)
    return json.loads(path.read_text())


def generate(pipe, reference_pipe, method: str, prompt: str, names: list[str], weights: list[float], switch_every: int, kwargs,
             block_weights: dict[str, list[float]] | None = None, triggers: dict[str, list[str]] | None = None) -> Image.Image:
    mole = pipe.mole
    if method != "regional":
        pipe.disable_regional_routing()
    if method == "mole_constant":
        if not mole.fused:  # fused once for the run of mole_constant images (the work list is grouped by method)
            mole.set_experts(names, block_weights)
            mole.fuse()
        return pipe(prompt, **kwargs).images[0]
    if mole.fused:
        mole.unfuse()
    if method in ("base", "set_adapters") or method.startswith("peft_"):
        if method == "base":
            reference_pipe.disable_lora()
        elif method.startswith("peft_"):
            reference_pipe.set_adapters([method], [1.0])
        try:
            return reference_pipe(prompt, **kwargs).images[0]
        finally:
            reference_pipe.enable_lora()
            reference_pipe.set_adapters(names, weights)
    if method == "mole" or method.startswith("mole_without_"):
        mole.set_experts(None)  # learned gates
        active = [n for n in names if method != f"mole_without_{n}"]
        return pipe(prompt, experts=active, **kwargs).images[0]
    if method == "nla":
        mole.set_experts(names, weights)
    elif method == "sum":
        mole.set_experts(names, [1.0] * len(names))
    elif method.startswith("single_"):
        mole.set_experts([method.removeprefix("single_")], [1.0])
    elif method == "switch":
        return _switch(pipe, names, switch_every, prompt, kwargs)
    elif method == "regional":  # enabled once for the run of regional images, like mole_constant's fusing
        if mole.regional is None:
            mole.set_experts(None)
            pipe.enable_regional_routing(triggers)
        return pipe(prompt, **kwargs).images[0]
    elif method == "composite":
        with composite(pipe, names):
            return pipe(prompt, **kwargs).images[0]
    return pipe(prompt, **kwargs).images[0]


def composed_concepts(prompt: str, triggers: dict[str, list[str]] | None) -> list[str]:
    """The concepts a prompt asks for: those whose trigger words it contains (none known: [])."""
    words = set(re.findall(r"[\w']+", prompt.lower()))
    return [name for name, trigger in (triggers or {}).items() if all(w in words for w in trigger)]


def active_experts(method: str, names: list[str]) -> list[str]:
    """The concepts a method means to draw: all but the masked one (``<method>_without_<name>``), the single LoRA's,
    none for the base."""
    if method == "base":
        return []
    if method.startswith("single_"):
        return [method.removeprefix("single_")]
    return [n for n in names if not method.endswith(f"_without_{n}")]


def one_hot(names: list[str], index: int) -> list[float]:
    return [1.0 if i == index else 0.0 for i in range(len(names))]


def _switch(pipe, names: list[str], every: int, prompt: str, kwargs) -> Image.Image:
    """LoRA Switch: step i uses LoRA (i // every) mod N alone."""
    pipe.mole.set_experts(names, one_hot(names, 0))

    def next_step(pipeline, step: int, timestep, callback_kwargs):
        pipe.mole.set_experts(names, one_hot(names, ((step + 1) // every) % len(names)))
        return callback_kwargs

    return pipe(prompt, callback_on_step_end=next_step, **kwargs).images[0]


@contextmanager
def composite(pipe, names: list[str]):
    """LoRA Composite: every UNet (or Flux transformer) call returns the mean of the N single-LoRA predictions."""
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    unet, mole = getattr(pipe, pipe.denoiser), pipe.mole
    output = UNet2DConditionOutput if pipe.denoiser == "unet" else Transformer2DModelOutput
    forward = unet.forward

    def mean_forward(*args, return_dict: bool = True, **kwargs):
        outputs = []
        for index in range(len(names)):
            mole.set_experts(names, one_hot(names, index))
            outputs.append(forward(*args, return_dict=False, **kwargs)[0])
        sample = torch.stack(outputs).mean(dim=0)
        return output(sample=sample) if return_dict else (sample,)

    unet.forward = mean_forward
    try:
        yield
    finally:
        del unet.forward  # back to the class's forward


def _read_rows(path: Path) -> dict[tuple, dict]:
    if not path.is_file():
        return {}
    rows = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by an interrupted write: that image is redone
            continue
        if (path.parent / row["image"]).is_file():
            rows[(row["method"], row["prompt_index"], row["seed"])] = row
    return rows


def is_rate(metric: str) -> bool:
    """0/1 metrics (a concept seen or not), summarised as rates with Wilson intervals."""
    return metric.startswith("present_")


def summarise(rows: list[dict], methods: list[str]) -> list[dict]:
    """Mean and 95% interval (``<metric>_low``, ``<metric>_high``) per method and metric: for presence rates the
    Wilson interval over images, for scores a two-stage bootstrap over prompts and their seeds (images of one
    prompt are not independent draws)."""
    metrics = list(dict.fromkeys(k for r in rows for k in r if k not in ID_COLUMNS))  # not every method has every metric
    summary = []
    for method in methods:
        values = [r for r in rows if r["method"] == method]
        entry = {"method": method, "n": len(values)}
        for metric in metrics:
            xs = [r[metric] for r in values if metric in r]
            if not xs:  # e.g. no image alignment for a method without reference images
                continue
            entry[metric] = sum(xs) / len(xs)
            if is_rate(metric):
                entry[f"{metric}_low"], entry[f"{metric}_high"] = wilson_interval(sum(xs), len(xs))
            else:
                groups = [list(seeds.values()) for seeds in by_prompt(values, metric).values()]
                entry[f"{metric}_low"], entry[f"{metric}_high"] = bootstrap_interval(groups)
        summary.append(entry)
    return summary


def paired_reference(methods: list[str]) -> str:
    """The method the others are compared with, image by image: MoLE where it ran, else the first method."""
    return "mole" if "mole" in methods else methods[0]


def paired_table(rows: list[dict], methods: list[str], reference: str) -> list[dict]:
    """Per method and metric, reference minus method on the same (prompt, seed), with a two-stage bootstrap
    interval over prompts and seeds; ``apart``: the interval excludes 0."""
    mine = [r for r in rows if r["method"] == reference]
    metrics = list(dict.fromkeys(k for r in mine for k in r if k not in ID_COLUMNS))
    table = []
    for method in methods:
        if method == reference:
            continue
        theirs = [r for r in rows if r["method"] == method]
        for metric in metrics:
            difference = paired_difference(mine, theirs, metric)
            if difference is not None:
                table.append({"reference": reference, "method": method, "metric": metric, **difference})
    return table


def write_outputs(out: Path, methods: list[str], prompts: list[str], seeds: list[int], names: list[str]) -> None:
    import csv

    rows = [r for r in _read_rows(out / "results.jsonl").values() if r["method"] in methods and r["seed"] in seeds]
    rows.sort(key=lambda r: (methods.index(r["method"]), r["prompt_index"], r["seed"]))
    summary = summarise(rows, methods)
    paired = paired_table(rows, methods, paired_reference(methods))
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    for path, table in ((out / "results.csv", rows), (out / "summary.csv", summary), (out / "paired.csv", paired)):
        if not table:
            path.unlink(missing_ok=True)
            continue
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(k for entry in table for k in entry)))
            writer.writeheader()
            writer.writerows(table)
    _plots(out, summary, methods)
    _grid(out, methods, prompts, seeds[0])
    gate_files = sorted((out / "images" / "mole").glob("*.gates.safetensors"))
    if gate_files:
        per_image = [load_file(str(f)) for f in gate_files]
        _heatmap(out, {gate: torch.stack([g[gate] for g in per_image]).mean(dim=0) for gate in per_image[0]}, names)
    _report(out, rows, summary, paired, prompts, seeds, names)


def _plots(out: Path, summary: list[dict], methods: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for metric in summary_metrics(summary):
        figure, axis = plt.subplots(figsize=(max(4, 0.6 * len(methods)), 3.2))
        values = [s.get(metric, float("nan")) for s in summary]
        # asymmetric intervals; at 0 or above (a bootstrap mean of equal values can round past the mean)
        errors = [[max(0.0, v - s.get(f"{metric}_low", v)) for v, s in zip(values, summary)],
                  [max(0.0, s.get(f"{metric}_high", v) - v) for v, s in zip(values, summary)]]
        axis.bar([s["method"] for s in summary], values, yerr=errors, capsize=3, color="#4c72b0")
        axis.set_ylabel(metric)
        axis.tick_params(axis="x", rotation=60)
        figure.tight_layout()
        figure.savefig(out / f"plot_{metric}.png", dpi=100)
        plt.close(figure)


def _grid(out: Path, methods: list[str], prompts: list[str], seed: int) -> None:
    from diffusers.utils import make_image_grid

    images = [Image.open(out / "images" / m / f"p{p}-s{seed}.png") for m in methods for p in range(len(prompts))]
    make_image_grid(images, rows=len(methods), cols=len(prompts)).save(out / "grid.png")


def _heatmap(out: Path, gate_means: dict[str, torch.Tensor], names: list[str]) -> None:
    gate_heatmap(gate_means, names).save(out / "gate_heatmap.png")


def gate_heatmap(gate_means: dict[str, torch.Tensor], names: list[str]) -> Image.Image:
    """Gates x experts: each gate's mean weight per expert (rows in ``gate_means`` order); also the app's heatmap."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = list(gate_means)
    figure, axis = plt.subplots(figsize=(2 + 1.2 * len(names), 1 + 0.3 * len(blocks)))
    image = axis.imshow(torch.stack([gate_means[b] for b in blocks]).numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    axis.set_xticks(range(len(names)), names)
    axis.set_yticks(range(len(blocks)), blocks, fontsize=7)
    figure.colorbar(image, label="mean gate weight")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")  # the colour bar's label whole
    plt.close(figure)
    return Image.open(buffer).copy()  # loaded: independent of the buffer


def summary_metrics(summary: list[dict]) -> list[str]:
    """The metric columns of a summary, in order of first appearance (not their interval columns)."""
    metrics = []
    for entry in summary:
        metrics += [k for k in entry if k not in ("method", "n", *metrics) and not k.endswith(("_ci95", "_low", "_high"))]
    return metrics


def format_cell(entry: dict, metric: str) -> str:
    """``0.1234 [0.1010, 0.1420]`` for a score, ``43.8% [31.2-57.1]`` for a rate, ``-`` when absent."""
    if metric not in entry:
        return "-"
    if is_rate(metric):
        return f"{100 * entry[metric]:.1f}% [{100 * entry[metric + '_low']:.1f}-{100 * entry[metric + '_high']:.1f}]"
    if metric + "_ci95" in entry:  # a summary.csv written before intervals accounted for prompts
        return f"{entry[metric]:.4f} ± {entry[metric + '_ci95']:.4f}"
    return f"{entry[metric]:.4f} [{entry[metric + '_low']:.4f}, {entry[metric + '_high']:.4f}]"


def format_difference(entry: dict) -> str:
    """A paired difference: ``+12.5 pts [3.1, 21.9] *`` for a rate, ``+0.0312 [0.0101, 0.0533] *`` for a score;
    ``*`` when the interval excludes 0."""
    scale, unit, digits = (100, " pts", 1) if is_rate(entry["metric"]) else (1, "", 4)
    mean, low, high = (scale * entry[k] for k in ("mean", "low", "high"))
    return f"{mean:+.{digits}f}{unit} [{low:.{digits}f}, {high:.{digits}f}]" + (" *" if entry["apart"] else "")


def _report(out: Path, rows: list[dict], summary: list[dict], paired: list[dict], prompts: list[str], seeds: list[int],
            names: list[str]) -> None:
    metrics = summary_metrics(summary)
    lines = [
        "# Evaluation report", "",
        f"Concepts: {', '.join(names)}. {len(prompts)} prompts x {len(seeds)} seeds per method, the same for every method.", "",
        "| method | n | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics),
    ]
    for s in summary:
        lines.append(f"| {s['method']} | {s['n']} | " + " | ".join(format_cell(s, m) for m in metrics) + " |")
    lines.append("")
    for metric in ("present_all", "clip_text", "clip_image_min", "dino_image_min"):
        if metric in metrics:
            best = max((s for s in summary if metric in s), key=lambda s: s[metric])
            if is_rate(metric) and best[metric] == 0:
                lines.append(f"- Highest {metric}: none (0% for every method).")
                continue
            # a higher mean is a claim only where the paired interval against each other method excludes 0
            mine = [r for r in rows if r["method"] == best["method"]]
            tied = [s["method"] for s in summary if s["method"] != best["method"] and metric in s
                    and not (paired_difference(mine, [r for r in rows if r["method"] == s["method"]], metric) or {"apart": True})["apart"]]
            verdict = f"not apart (paired) from {', '.join(tied)}" if tied else "apart (paired) from every other method"
            lines.append(f"- Highest {metric}: **{best['method']}** ({format_cell(best, metric)}); {verdict}.")
    headline = [m for m in metrics if is_rate(m) or m in ("clip_text", "clip_image_min", "dino_image_min")]
    if paired:
        reference = paired[0]["reference"]
        cells = {(e["method"], e["metric"]): format_difference(e) for e in paired}
        others = list(dict.fromkeys(e["method"] for e in paired))
        lines += ["", f"Paired against `{reference}`: {reference} minus each method on the same prompt and seed, with a "
                  "95% two-stage bootstrap interval over prompts and their seeds; `*`: the interval excludes 0.", "",
                  "| method | " + " | ".join(headline) + " |", "|---|" + "---|" * len(headline)]
        lines += [f"| {m} | " + " | ".join(cells.get((m, k), "-") for k in headline) + " |" for m in others]
        lines.append("")
    lines += [
        "- Scores: mean [95% interval], a two-stage bootstrap over prompts and their seeds (images of one prompt are "
        "not independent). `clip_image_min` is the weakest concept's alignment.",
        "- `present_<concept>`: share of images in which the presence judge sees that concept; `present_all`: every "
        "concept of the prompt; `present_active`: every concept the method did not mask (a single LoRA: its own); "
        "`present_prompt`: the image keeps the rest of its prompt (the attribute judge: the object's colour); "
        "`present_all_faithful`: every concept and the prompt kept (a judge fooled into reading concepts in a texture "
        "loses the colour). Rates in %, with Wilson 95% intervals in brackets.",
        "- `nla`, `set_adapters` and `peft_cat` compute the same weighted sum of deltas (exact); `sum` is the "
        "unnormalised sum; `peft_svd` truncates that sum to the largest rank; `peft_ties` / `peft_dare_linear` combine "
        "the LoRAs' A's and B's separately (cross terms), so they are not the weighted sum.",
        "- `mole_constant` is `mole` with each gate frozen to its mean weight over these prompts and fused (no gate "
        "cost); its distance from `mole` is what that costs.",
        "- CLIP scores correlate weakly with human judgement of multi-concept images (ComposLoRA): look at `grid.png`.",
    ]
    (out / "report.md").write_text("\n".join(lines) + "\n")

"""Compare composition methods on the same prompts and seeds, score every image with CLIP, and write a table,
plots and a short report (docs/method.md). The methods are ``methods``' (each drawn by ``methods.draw``);
the outputs ``report``'s.

Images made elsewhere (another tool, a sampler of your own) join the table through ``image_folders`` (NAME -> a
folder of ``p{prompt index}-s{seed}.png``), scored by the same CLIP, references and presence judge, on the same
prompts and seeds; a name ending in ``_without_<concept>`` masks that concept, as ``mole_without_<concept>`` does.
A run keeps ``results.jsonl`` (``rows``) as it goes and skips what is done when started again.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import parse_flag_from_env
from PIL import Image
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..clip import ImageBackbone, load_clip
from ..concepts import Concept, composed_concepts, concept_triggers, load_compositions, load_concepts
from ..errors import MoLEError, load_base_pipeline
from ..gate_file import GateFileError, gate_kind
from ..pipelines import mole_pipeline_class
from ..quiet import quiet_adapter_loading
from ..schedulers import use_scheduler
from .methods import active_experts, add_peft_merges, draw_images, method_names, methods_for
from .presence import judged_row, load_presence_judge
from .report import write_outputs
from .rows import ROWS_FILE, append_row, read_rows
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
    # images of one method drawn in one pipeline call (each from its own seed's generator): faster, more memory
    batch_size: int = 1
    device: str | None = None
    progress: bool = True


PROMPT_TEMPLATES = ("{}", "a picture of {}", "{}, high quality, detailed")


def default_prompts(concepts: list[Concept]) -> list[str]:
    joined = " and ".join(c.prompt for c in concepts)
    return [template.format(joined) for template in PROMPT_TEMPLATES]


def evaluate(config: EvaluationConfig) -> Path:
    """Generate, score and summarise; returns the output folder. Under ``accelerate launch`` each process
    takes every n-th image and the main process writes the summary."""
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
    registry = methods_for(names)
    available = method_names(concepts, config.gates is not None, family=pipeline_class.family)
    if config.scheduler is None and pipeline_class.family != "flux":
        config = replace(config, scheduler="ddpm")
    methods = config.methods or available
    unknown = [m for m in methods if m not in available]
    if unknown:
        hint = " (mole methods need a gate file)" if any(m in registry and registry[m].needs_gates for m in unknown) else ""
        raise MoLEError(f"unknown method(s) {unknown}{hint}; available: {available}")
    clashes = [m for m in config.image_folders if m in available]
    if clashes:
        raise MoLEError(f"image folders named {clashes} clash with methods of the evaluator; name them otherwise")
    if config.batch_size < 1:
        raise MoLEError(f"batch size {config.batch_size}: expected at least 1 image per pipeline call")
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
        needs_one_rank = [m for m in methods if m in registry and registry[m].same_rank]
        if config.methods and needs_one_rank:
            raise MoLEError(f"methods {needs_one_rank} need LoRAs of one rank (PEFT combines their A's and B's "
                             f"separately); these have ranks {sorted(ranks)}")
        methods = [m for m in methods if m not in needs_one_rank]
    reference_pipe = None
    if any(m in registry and registry[m].uses_reference for m in methods):
        # diffusers' own LoRA path on models of its own (the MoLE pipeline's are wrapped)
        reference_pipe = load_base_pipeline(pipeline_class.diffusers_class(), config.base, dtype=dtype, safety_checker=None)
        reference_pipe.scheduler = pipe.scheduler
        reference_pipe.to(device)
        for c in concepts:
            with quiet_adapter_loading(c.name):  # the 2nd adapter on lists the 1st as MISSING: benign
                reference_pipe.load_lora_weights(c.lora, adapter_name=c.name)
        merges = [registry[m].peft_merge for m in methods if m in registry and registry[m].peft_merge]
        add_peft_merges(reference_pipe, names, weights, merges)
        reference_pipe.set_adapters(names, weights)
        reference_pipe.set_progress_bar_config(disable=True)

    block_weights = None
    if "mole_constant" in methods:
        with state.main_process_first():  # computed once, read by the others
            block_weights = _block_weights(pipe, out / "block_weights.json", prompts, config)
    triggers = concept_triggers(concepts)
    done = read_rows(out / ROWS_FILE)
    todo = [(m, p, s) for m in methods for p in range(len(prompts)) for s in config.seeds if (m, p, s) not in done]
    if state.num_processes > 1:
        state.print(f"evaluating on {state.num_processes} processes, every {state.num_processes}-th batch on each")
    todo = _batches(todo, config.batch_size)[state.process_index :: state.num_processes]
    state.wait_for_everyone()  # every process has read what is done before any adds a row (else the shares shift)
    bar = tqdm(total=sum(map(len, todo)), disable=not (config.progress and state.is_local_main_process), desc="evaluating")
    for batch in todo:
        method = batch[0][0]
        if method in made_elsewhere:
            images = [Image.open(made_elsewhere[method] / f"p{p}-s{s}.png").convert("RGB") for _, p, s in batch]
        else:
            images = draw_images(pipe, method=method, prompts=[prompts[p] for _, p, _ in batch], seeds=[s for _, _, s in batch],
                                 names=names, weights=weights, reference_pipe=reference_pipe, switch_every=config.switch_every,
                                 block_weights=block_weights, triggers=triggers, num_inference_steps=config.steps,
                                 guidance_scale=config.guidance_scale, height=config.resolution, width=config.resolution)
        # read once for the batch: gate weights (steps, model batch, N), regional masks (calls, images, N, H, W)
        histories = pipe.gate_weights if method == "mole" else {}
        masks = pipe.expert_masks if method == "regional" else None
        rows = score_images(clip, images, [prompts[p] for _, p, _ in batch], references, [list(references)] * len(batch))
        if backbone is not None:
            for scores, dino in zip(rows, image_alignment(backbone, images, backbone_references, [list(references)] * len(batch),
                                                           prefix="dino")):
                scores.update(dino)
        for index, ((_, prompt_index, seed), image, scores) in enumerate(zip(batch, images, rows)):
            path = out / "images" / method / f"p{prompt_index}-s{seed}.png"
            path.parent.mkdir(exist_ok=True)
            if histories:  # mole: this image's rows (both CFG halves), mean over steps, for the heatmap
                means = {gate: history[:, index :: len(batch)].mean(dim=(0, 1)).contiguous() for gate, history in histories.items()}
                save_file(means, str(path.with_suffix(".gates.safetensors")))
            if masks is not None:  # regional: where each expert acted at the last step, (N, H, W) on the latent grid
                # the last entry was read after the last step: the one before is what it applied
                save_file({"masks": masks[-2 if len(masks) > 1 else -1, index].contiguous()}, str(path.with_suffix(".masks.safetensors")))
            image.save(path)
            if presence is not None:
                composed = composed_concepts(prompts[prompt_index], triggers) or names
                scores.update(judged_row(presence, image, prompts[prompt_index], composed, active_experts(method, names)))
            row = {"method": method, "prompt_index": prompt_index, "prompt": prompts[prompt_index], "seed": seed,
                   "image": str(path.relative_to(out)), **scores}
            append_row(out / ROWS_FILE, row)
            bar.update(1)
    bar.close()
    if pipe.mole.fused:
        pipe.mole.unfuse()
    pipe.disable_regional_routing()
    state.wait_for_everyone()
    if state.is_main_process:
        write_outputs(out, methods, prompts, config.seeds, names)
    return out


def _batches(todo: list[tuple[str, int, int]], size: int) -> list[list[tuple[str, int, int]]]:
    """The work list in runs of at most ``size`` images of one method (the list is grouped by method)."""
    batches: list[list[tuple[str, int, int]]] = []
    for item in todo:
        if batches and len(batches[-1]) < size and batches[-1][0][0] == item[0]:
            batches[-1].append(item)
        else:
            batches.append([item])
    return batches


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

"""LyCORIS files read as LoRA: each conversion against the LyCORIS package's own modules (and PEFT's LoHa/LoKr).

The reference delta is the one LyCORIS' forward adds, which is what the adapter was trained with: for LoHa and
LoKr that is ``get_weight`` (scale alpha / dim once). The package's ``get_diff_weight`` / ``merge_to`` multiply
that by the scale a second time; A1111, ComfyUI and LyCORIS' own forward apply it once, as the conversion does.
"""

import re

import pytest
import torch
import torch.nn.functional as F

lycoris = pytest.importorskip("lycoris", reason="the reference is the lycoris-lora package (pip install lycoris-lora)")
from lycoris.modules import (  # noqa: E402
    ButterflyOFTModule, DiagOFTModule, FullModule, GLoRAModule, IA3Module, LoConModule, LohaModule, LokrModule, NormModule,
    TLoraModule,
)

from mole_diffusion.lycoris import conv_shaped, lycoris_algorithm, lycoris_to_lora  # noqa: E402

NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def linear():
    return torch.nn.Linear(24, 40)


def conv(kernel=3):
    return torch.nn.Conv2d(16, 24, kernel, padding=kernel // 2)


def wrapped(cls, base, rank=4, alpha=3.0, seed=0, **options):
    """A LyCORIS module on ``base`` with every parameter random (LyCORIS zero-initialises one factor)."""
    torch.manual_seed(seed)
    module = cls(NAME, base, 1.0, lora_dim=rank, alpha=alpha, **options)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 0.1)
    return module


def saved(module):
    """The module's keys as a LyCORIS network saves them: ``<lora_name>.<key>``."""
    return {f"{module.lora_name}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def reference_delta(module):
    """The weight delta LyCORIS' forward adds (multiplier 1)."""
    if isinstance(module, LoConModule):
        return module.get_diff_weight()[0].detach()
    return (module.get_weight(module.shape) * module.scalar).detach()


def converted(module):
    """(down, up, scale) of the converted LoRA, shaped for the module's weight, and the converted state dict."""
    sd = lycoris_to_lora(saved(module), "test.safetensors")
    down, up = sd[f"{NAME}.lora_down.weight"], sd[f"{NAME}.lora_up.weight"]
    rank = down.shape[0]
    alpha = sd.get(f"{NAME}.alpha")
    scale = 1.0 if alpha is None else float(alpha) / rank
    down, up = conv_shaped(down, up, module.org_module[0].weight.shape)
    return down, up, scale, sd


def lora_delta(down, up, scale, shape):
    return (scale * up.flatten(1) @ down.flatten(1)).reshape(shape)


def assert_close(actual, expected):
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max() / expected.abs().max()
    assert err < 1e-5, f"relative error {err:.2e}"


def check(module, rank):
    """The converted LoRA's delta, forward and rank against the package's."""
    base = module.org_module[0]
    weight = base.weight.detach().clone()
    down, up, scale, sd = converted(module)
    assert down.shape[0] == rank
    assert {k.partition(".")[2] for k in sd} <= {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"}
    assert_close(lora_delta(down, up, scale, weight.shape), reference_delta(module))

    x = torch.randn(2, 24) if isinstance(base, torch.nn.Linear) else torch.randn(2, 16, 6, 6)
    module.apply_to()
    with torch.no_grad():
        y = base(x)
        if isinstance(base, torch.nn.Linear):
            ours = F.linear(x, weight, base.bias) + scale * F.linear(F.linear(x, down), up)
        else:
            ours = F.conv2d(x, weight, base.bias, padding=base.padding) + scale * F.conv2d(F.conv2d(x, down, padding=base.padding), up)
    module.restore()
    assert_close(ours, y)
    return sd


LOHA_CASES = {  # name: (base, options, rank of the converted LoRA)
    "linear": (linear, {}, 16),
    "linear-rank3": (linear, {"rank": 3}, 9),
    "linear-rslora": (linear, {"rs_lora": True}, 16),
    "linear-scalar": (linear, {"use_scalar": True}, 16),
    "conv3x3": (conv, {}, 16),
    "conv3x3-tucker": (conv, {"use_tucker": True}, 16),
    "conv1x1": (lambda: conv(1), {"use_tucker": True}, 16),  # no Tucker for a 1x1 kernel: flattened, 2-D
    "linear-past-full-rank": (linear, {"rank": 6}, 24),  # 36 > min(40, 24): the dense delta, rank 24
    "linear-bypass": (linear, {"bypass_mode": True}, 16),  # the forward LyCORIS trains quantized models with
}


@pytest.mark.parametrize("case", LOHA_CASES)
def test_loha(case):
    make, options, rank = LOHA_CASES[case]
    module = wrapped(LohaModule, make(), **options)
    sd = check(module, rank)
    if case == "conv3x3-tucker":
        assert sd[f"{NAME}.lora_down.weight"].shape == (16, 16, 3, 3)  # Tucker keeps the kernel: a conv pair
    if case == "conv3x3":
        assert sd[f"{NAME}.lora_down.weight"].shape == (16, 16 * 9)  # flattened: 2-D until conv_shaped


# LoKr: (a, b) x (c, d) factors of out = a * c, in = b * d; rank(W1) * rank(W2), a full factor at min of its dims
LOKR_CASES = {
    # out 40 -> (5, 8), in 24 -> (4, 6): w1 (5, 4) full (rank 4), w2 factored (8, 2) (2, 6) (rank 2)
    "linear": (linear, {"rank": 2}, 8),
    # both full: w1 (5, 4), w2 (8, 6); alpha ignored (scale 1)
    "linear-both-full": (linear, {"rank": 4}, 4 * 6),
    "linear-full-matrix": (linear, {"rank": 2, "full_matrix": True}, 4 * 6),
    # factor 8: out (5, 8), in (3, 8); w1 (5, 2)(2, 3), w2 (8, 2)(2, 8)
    "linear-decompose-both": (linear, {"rank": 2, "factor": 8, "decompose_both": True}, 4),
    # unbalanced: out (8, 5), in (4, 6): w1 (8, 4) full, w2 (5, 2)(2, 6)
    "linear-unbalanced": (linear, {"rank": 2, "unbalanced_factorization": True}, 8),
    "linear-scalar": (linear, {"rank": 2, "use_scalar": True}, 8),
    # conv 16 -> 24, factor 2: out (2, 12), in (2, 8); w1 (2, 2), w2 (12, 4)(4, 8 * 9) flattened
    "conv3x3": (conv, {"factor": 2}, 2 * 4),
    "conv3x3-tucker": (conv, {"factor": 2, "use_tucker": True}, 2 * 4),
    # factor -1: out (4, 6), in (4, 4): w2 (6, 4, 3, 3) full (rank min(6, 36)), w1 (4, 4); both full: scale 1
    "conv3x3-full": (conv, {}, 4 * 6),
    "conv1x1": (lambda: conv(1), {"factor": 2}, 2 * 4),
    "conv3x3-bypass": (conv, {"factor": 2, "bypass_mode": True}, 2 * 4),
    "conv3x3-tucker-bypass": (conv, {"factor": 2, "use_tucker": True, "bypass_mode": True}, 2 * 4),
}


@pytest.mark.parametrize("case", LOKR_CASES)
def test_lokr(case):
    make, options, rank = LOKR_CASES[case]
    module = wrapped(LokrModule, make(), **options)
    sd = check(module, rank)
    if case in ("linear-both-full", "linear-full-matrix", "conv3x3-full"):
        assert module.use_w1 and module.use_w2 and module.scale == 1  # the package's rule, which the alpha follows
        assert float(sd[f"{NAME}.alpha"]) == rank
    if case in ("conv3x3-tucker", "conv3x3-full"):
        assert sd[f"{NAME}.lora_down.weight"].dim() == 4


def test_tucker_locon():
    module = wrapped(LoConModule, conv(), use_tucker=True)
    assert f"{NAME}.lora_mid.weight" in saved(module)
    sd = check(module, 4)
    assert sd[f"{NAME}.lora_down.weight"].shape == (4, 16, 3, 3)
    assert float(sd[f"{NAME}.alpha"]) == 3.0  # rank and alpha stay


def test_plain_lora_dora_and_other_keys_pass_through():
    plain = saved(wrapped(LoConModule, linear(), weight_decompose=True))
    extra = {"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.ones(2, 3), "something_else": torch.ones(1)}
    tensors = {**plain, **extra}
    out = lycoris_to_lora(tensors, "test.safetensors")
    assert out.keys() == tensors.keys() and all(out[k] is tensors[k] for k in tensors)
    assert lycoris_algorithm(tensors) is None

    loha = saved(wrapped(LohaModule, linear(), weight_decompose=True))
    out = lycoris_to_lora(loha, "test.safetensors")
    assert out[f"{NAME}.dora_scale"] is loha[f"{NAME}.dora_scale"]
    assert lycoris_algorithm(loha) == "LoHa"


REFUSED = {  # algorithm name in the message: (module class, the key named)
    "full (weight difference)": (FullModule, "diff"),
    "IA3": (IA3Module, "on_input"),
    "diagonal OFT": (DiagOFTModule, "oft_blocks"),
    "BOFT": (ButterflyOFTModule, "oft_blocks"),
    "GLoRA": (GLoRAModule, "a1.weight"),
    "T-LoRA": (TLoraModule, "lambda_layer"),
}


@pytest.mark.parametrize("algorithm", REFUSED)
def test_refused_algorithms(algorithm):
    cls, key = REFUSED[algorithm]
    tensors = saved(wrapped(cls, torch.nn.Linear(24, 32)))  # BOFT needs a power-of-two split of out
    assert f"{NAME}.{key}" in tensors  # the key name is the package's own
    message = f"x.safetensors: {NAME}.{key}: a LyCORIS {algorithm} module, which has no low-rank form; only LoRA/LoCon/LoHa/LoKr/DoRA"
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        lycoris_to_lora(tensors, "x.safetensors")
    assert lycoris_algorithm(tensors) == algorithm


def test_refused_norm():
    module = NormModule("lora_unet_norm", torch.nn.LayerNorm(8))
    tensors = {f"lora_unet_norm.{k}": v for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="lora_unet_norm.b_norm: a LyCORIS norm module"):
        lycoris_to_lora(tensors, "x.safetensors")


@pytest.mark.parametrize("cls, options, drop, algorithm", [
    (LohaModule, {}, "hada_w1_b", "LoHa"),
    (LohaModule, {"use_tucker": True}, "hada_t2", "LoHa"),
    (LokrModule, {"rank": 2}, "lokr_w2_b", "LoKr"),
    (LokrModule, {"rank": 4}, "lokr_w1", "LoKr"),
    (LoConModule, {"use_tucker": True}, "lora_down.weight", "Tucker LoCon"),
])
def test_incomplete_groups(cls, options, drop, algorithm):
    tensors = saved(wrapped(cls, conv() if options.get("use_tucker") else linear(), **options))
    del tensors[f"{NAME}.{drop}"]
    with pytest.raises(ValueError, match=rf"{NAME}\.{drop}: missing from this {algorithm} module"):
        lycoris_to_lora(tensors, "x.safetensors")


def test_peft_loha_and_lokr():
    """The same factors under PEFT's LoHa and LoKr give PEFT's delta (PEFT scales by alpha / r throughout)."""
    peft = pytest.importorskip("peft")
    for config, keys in ((peft.LoHaConfig(r=3, alpha=5, target_modules=["lin"]), ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")),
                         (peft.LoKrConfig(r=2, alpha=5, target_modules=["lin"]), ("lokr_w1", "lokr_w2_a", "lokr_w2_b"))):
        torch.manual_seed(0)
        model = peft.get_peft_model(torch.nn.ModuleDict({"lin": linear()}), config)
        layer = model.base_model.model["lin"]
        tensors = {f"{NAME}.alpha": torch.tensor(5.0)}
        for key in keys:
            parameter = getattr(layer, key)["default"]
            with torch.no_grad():
                parameter.copy_(torch.randn_like(parameter))
            tensors[f"{NAME}.{key}"] = parameter.detach().clone()
        sd = lycoris_to_lora(tensors, "peft.safetensors")
        down, up = sd[f"{NAME}.lora_down.weight"], sd[f"{NAME}.lora_up.weight"]
        scale = float(sd[f"{NAME}.alpha"]) / down.shape[0]
        assert_close(lora_delta(down, up, scale, (40, 24)), layer.get_delta_weight("default").detach())


TINY_FILES = {  # make_tiny_lycoris options: the package module's options
    "loha": {},
    "loha-tucker": {"use_tucker": True},
    "lokr": {},
    "lokr-decompose-both": {"factor": 4, "decompose_both": True, "rank": 2},
    "lokr-tucker": {"factor": 2, "use_tucker": True, "rank": 2},
    "lokr-full-matrix": {"full_matrix": True},
    "locon_tucker": {"use_tucker": True},
}


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory):
    from diffusers import UNet2DConditionModel

    from mole_diffusion.testing import TINY_UNET_CONFIG

    root = tmp_path_factory.mktemp("lycoris")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
    unet.save_pretrained(root / "unet")
    return root, unet


@pytest.mark.parametrize("case", TINY_FILES)
def test_make_tiny_lycoris_writes_what_the_package_writes(tiny_unet, case):
    from safetensors.torch import load_file

    from mole_diffusion.testing import make_tiny_lycoris

    root, unet = tiny_unet
    options = dict(TINY_FILES[case])
    rank = options.pop("rank", 4)
    algo = case.split("-")[0]
    tensors = load_file(make_tiny_lycoris(root, root / f"{case}.safetensors", algo=algo, rank=rank, alpha=2.0, **options))
    cls = {"loha": LohaModule, "lokr": LokrModule, "locon_tucker": LoConModule}[algo]
    prefixes = sorted({k.partition(".")[0] for k in tensors})
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules()}
    suffixes = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1")
    assert len(prefixes) == sum(n.endswith(suffixes) for n, _ in unet.named_modules())
    assert {"lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_attentions_0_proj_in", NAME} <= set(prefixes)
    for prefix in prefixes:
        package = cls(prefix, modules[prefix], 1.0, lora_dim=rank, alpha=2.0, **options).state_dict()
        ours = {k.partition(".")[2]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        assert {k: (v.shape, v.dtype) for k, v in ours.items()} == {k: (v.shape, v.dtype) for k, v in package.items()}, prefix
        assert float(ours["alpha"]) == float(package["alpha"])
    # converted, every module has a LoRA pair that fits its layer (as the loader checks it)
    lora = lycoris_to_lora(tensors, "tiny")
    for prefix in prefixes:
        weight = modules[prefix].weight
        down, up = conv_shaped(lora[f"{prefix}.lora_down.weight"], lora[f"{prefix}.lora_up.weight"], weight.shape)
        r, ones = down.shape[0], (1,) * (weight.dim() - 2)
        assert (down.shape, up.shape) == ((r, *weight.shape[1:]), (weight.shape[0], r, *ones)), prefix
    # the delta is the size of make_tiny_lora's (std 0.3): std 0.09 * sqrt(rank) * alpha / rank
    lora = lycoris_to_lora({k: v for k, v in tensors.items() if k.startswith(NAME + ".")}, "tiny")
    down, up = lora[f"{NAME}.lora_down.weight"], lora[f"{NAME}.lora_up.weight"]
    delta = float(lora[f"{NAME}.alpha"]) / down.shape[0] * up.flatten(1) @ down.flatten(1)
    assert float(delta.std()) == pytest.approx(0.09 * rank**0.5 * 2.0 / rank, rel=1e-4)


# --- On images: LyCORIS files as MoLE experts against the lycoris package's own forward -------------------------------
#
# The reference applies each file as the package does: every module rebuilt from the file by its loader
# (``lycoris.modules.get_module`` + ``make_module``, the loop of ``lycoris.kohya.create_network_from_weights``) and
# wrapped around its layer by ``apply_to()``, so the images come from LyCORIS' forward (not bypass mode; for LoHa and
# LoKr the delta is scaled once there, unlike ``merge_to``). ``create_network_from_weights`` itself is not called:
# in lycoris 4.1.3 its network constructor fails on a diffusers UNet ("duplicated lora name:
# lora_unet_time_embedding_linear_1": its targets hold both the TimestepEmbedding class and that module's name).

import numpy as np  # noqa: E402
from conftest import hand_merged, short_images, unet_output  # noqa: E402
from lycoris.modules import get_module, make_module  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from mole_diffusion.experts import ExpertError  # noqa: E402

PIPE_FILES = {  # make_tiny_lycoris arguments; each file covers attention, proj_in, ff.net.0.proj and resnet conv1
    "loha": dict(algo="loha"),
    "loha-tucker": dict(algo="loha", use_tucker=True),
    "lokr": dict(algo="lokr", rank=2, factor=2),  # w1 full (2, 2), w2 factored: rank 2 * 2
    # w1 factored where rank < max(a, c) / 2 (else full), w2 factored, Tucker cores on the 3x3 convs
    "lokr-decompose-both-tucker": dict(algo="lokr", rank=2, factor=8, decompose_both=True, use_tucker=True),
    "lokr-full-matrix": dict(algo="lokr", full_matrix=True),  # both factors full: alpha ignored, scale 1
    "locon_tucker": dict(algo="locon_tucker", use_tucker=True),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny pipelines run as fast on one thread and far faster when another process shares the cores (two
    processes of 2 OpenMP threads each on 2 cores made a 2-step image ~50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pipes(tmp_path_factory):
    """Per family: (checkpoint, MoLE pipeline, plain diffusers pipeline), built once and restored by every test."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from mole_diffusion import MoLEStableDiffusionPipeline, MoLEStableDiffusionXLPipeline
    from mole_diffusion.testing import make_tiny_pipeline

    classes = {"sd": (MoLEStableDiffusionPipeline, StableDiffusionPipeline),
               "sdxl": (MoLEStableDiffusionXLPipeline, StableDiffusionXLPipeline)}
    cache = {}

    def get(family):
        if family not in cache:
            base = make_tiny_pipeline(tmp_path_factory.mktemp(family) / "base", family=family)
            pipes = [cls.from_pretrained(base) for cls in classes[family]]
            for pipe in pipes:
                pipe.set_progress_bar_config(disable=True)
            cache[family] = (base, *pipes)
        return cache[family]

    return get


def kohya_names(unet):
    return {"lora_unet_" + name.replace(".", "_"): name for name, _ in unet.named_modules()}


def package_modules(unet, tensors, options=None):
    """{UNet module name: the LyCORIS module the package's loader rebuilds from the file's keys for it}.

    ``options`` (the file's make_tiny_lycoris arguments) are used only where the loader cannot rebuild a module:
    lycoris 4.1.3's ``LokrModule.make_module_from_state_dict`` takes a Tucker LoKr with a full w1 to have rank
    ``lokr_w2_a.shape[1]``, which with Tucker (w2_a is (rank, out factor)) is the out factor, then builds a
    full-matrix module and fails (AttributeError: no lokr_w2_a). That module is made by the class, with the file's
    options, and the file's tensors loaded into it."""
    names = kohya_names(unet)
    modules = {}
    for prefix in sorted({key.partition(".")[0] for key in tensors}):
        target = unet.get_submodule(names[prefix])
        cls, params = get_module(tensors, prefix)
        try:
            module = make_module(cls, params, prefix, target)
        except AttributeError:
            assert cls is LokrModule and f"{prefix}.lokr_t2" in tensors and f"{prefix}.lokr_w1" in tensors
            options = {k: v for k, v in options.items() if k in ("factor", "decompose_both", "use_tucker", "full_matrix")}
            module = cls(prefix, target, 1.0, lora_dim=tensors[f"{prefix}.lokr_w2_b"].shape[0],
                         alpha=float(tensors[f"{prefix}.alpha"]), **options)
            module.load_state_dict({k.partition(".")[2]: v for k, v in tensors.items() if k.startswith(prefix + ".")})
        assert module is not None and not module.bypass_mode, prefix
        modules[names[prefix]] = module
    return modules


def package_images(pipe, modules):
    """Images of ``pipe`` with the LyCORIS modules applied by the package (its forward), then removed."""
    for module in modules.values():
        module.apply_to()
    try:
        return short_images(pipe)
    finally:
        for module in modules.values():
            module.restore()


def package_deltas(modules, weight=1.0):
    """{"unet.<module>": weight * the delta LyCORIS' forward adds} (``reference_delta``: the scale applied once)."""
    return {f"unet.{name}": weight * reference_delta(module) for name, module in modules.items()}


def mole_images(pipe, files, weights=None):
    """MoLE's images with ``files`` as experts (constant ``weights`` if given) and the experts' layers."""
    pipe.load_experts(files)
    try:
        if weights is not None:
            pipe.set_experts(list(files), weights)
        return short_images(pipe), [expert.layers for expert in pipe.mole.experts]
    finally:
        pipe.unload_experts()


def formula_rank(group, weight_shape):
    """The rank the conversion gives a module, from the file's keys alone: LoHa r1 * r2, LoKr rank(W1) * rank(W2)
    (a factored W: its inner dim; a full one: the smaller side of its flattened matrix), Tucker LoCon / LoCon r;
    at most full rank (past it the conversion writes the dense delta)."""
    if "hada_w1_b" in group:
        rank = group["hada_w1_b"].shape[0] * group["hada_w2_b"].shape[0]
    elif "lora_down.weight" in group:
        rank = group["lora_down.weight"].shape[0]
    else:
        rank = min(group["lokr_w1"].shape) if "lokr_w1" in group else group["lokr_w1_b"].shape[0]
        rank *= min(group["lokr_w2"].flatten(1).shape) if "lokr_w2" in group else group["lokr_w2_b"].shape[0]
    return min(rank, weight_shape[0], int(np.prod(weight_shape[1:])))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
@pytest.mark.parametrize("case", PIPE_FILES)
def test_one_lycoris_expert_equals_the_package_forward(tiny_pipes, tmp_path, family, case):
    from mole_diffusion.testing import make_tiny_lycoris

    base, mole, ref = tiny_pipes(family)
    options = PIPE_FILES[case]
    path = make_tiny_lycoris(base, tmp_path / f"{case}.safetensors", alpha=2.0, seed=1, **options)
    tensors = load_file(path)
    if "tucker" in case:  # Tucker cores where the kernel is 3x3
        assert any(k.endswith(("hada_t1", "lokr_t2", "lora_mid.weight")) for k in tensors)
    if "decompose-both" in case:  # and w1 factored where it is small enough, full elsewhere
        assert any(k.endswith("lokr_w1_a") for k in tensors) and any(k.endswith("lokr_w1") for k in tensors)
    image, (layers,) = mole_images(mole, {"x": path})
    modules = package_modules(ref.unet, tensors, options)
    expected = package_images(ref, modules)
    assert np.abs(expected - short_images(ref)).max() > 1e-2  # the file does something (and the package let go of it)
    np.testing.assert_allclose(image, expected, atol=1e-4)

    assert {name.removeprefix("unet.") for name in layers} == set(modules)
    assert {"down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"} <= set(modules)
    groups = {}
    for key, tensor in tensors.items():
        prefix, _, suffix = key.partition(".")
        groups.setdefault(kohya_names(ref.unet)[prefix], {})[suffix] = tensor
    for name, module in modules.items():
        weight_shape = module.org_module[0].weight.shape
        rank = layers[f"unet.{name}"].rank
        assert rank == formula_rank(groups[name], weight_shape), name
        module.double()  # the delta's true rank, in float64: the converted pair is as small as it can be
        assert rank == torch.linalg.matrix_rank(reference_delta(module).flatten(1)), name


@pytest.mark.parametrize("weights", [[0.5, 0.8, 1.2]])
def test_lora_loha_and_lokr_mixed_equal_the_weighted_sum_of_their_deltas(tiny_pipes, tmp_path, weights):
    """LoRA + LoHa + LoKr under constant weights: the base plus sum_i w_i dW_i, unfused and fused."""
    from mole_diffusion.testing import UNET_ATTENTION_MODULES, make_tiny_lora, make_tiny_lycoris, tiny_lora_deltas

    base, mole, ref = tiny_pipes("sd")
    lora = dict(rank=4, alpha=2.0, unet_modules=UNET_ATTENTION_MODULES + ("conv2",), layout="kohya", seed=1)
    files = {"lora": make_tiny_lora(base, tmp_path / "lora.safetensors", **lora),
             "loha": make_tiny_lycoris(base, tmp_path / "loha.safetensors", algo="loha", alpha=2.0, seed=2),
             "lokr": make_tiny_lycoris(base, tmp_path / "lokr.safetensors", algo="lokr", rank=2, factor=2, alpha=2.0,
                                       seed=3, unet_modules=("to_v", "to_out.0", "ff.net.2", "conv2"))}
    deltas = {}
    parts = [{k: weights[0] * v for k, v in tiny_lora_deltas(base, **lora).items()}]  # text encoder too
    parts += [package_deltas(package_modules(ref.unet, load_file(files[name])), weight)
              for name, weight in zip(("loha", "lokr"), weights[1:])]
    for part in parts:
        for name, delta in part.items():
            deltas[name] = deltas.get(name, 0) + delta
    assert any(name.startswith("text_encoder.") for name in deltas)
    mole.load_experts(files)
    try:
        mole.set_experts(list(files), weights)
        unfused = short_images(mole)
        mole.fuse_experts()
        fused = short_images(mole)
        mole.unfuse_experts()
    finally:
        mole.unload_experts()
    expected = hand_merged(ref, deltas)
    assert np.abs(expected - short_images(ref)).max() > 1e-2
    np.testing.assert_allclose(unfused, expected, atol=1e-4)
    np.testing.assert_allclose(fused, expected, atol=1e-4)
    np.testing.assert_allclose(fused, unfused, atol=1e-4)


DORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1")


def write_package_file(unet, path, cls, std, seed=0, targets=DORA_TARGETS, **options):
    """A file as the package saves it (its modules' state dicts), every factor random (LyCORIS zero-initialises
    one) and, with weight decomposition, every dora_scale randomised away from the weight norms it starts at."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, target in unet.named_modules():
        if not name.endswith(targets) or not isinstance(target, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        module = cls("lora_unet_" + name.replace(".", "_"), target, 1.0, lora_dim=4, alpha=2.0, **options)
        with torch.no_grad():
            for key, p in module.named_parameters():
                if key == "dora_scale":
                    p.mul_(1 + 0.3 * torch.randn(p.shape, generator=generator))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=generator))
        tensors.update({f"{module.lora_name}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items()})
    save_file(tensors, str(path))
    return path


@pytest.mark.parametrize("cls, std", [(LoConModule, 0.3), (LohaModule, 0.45)], ids=["locon", "loha"])
def test_lycoris_dora_equals_the_package_forward(tiny_pipes, tmp_path, cls, std):
    """Output-side weight decomposition (dora_wd, wd_on_output): m * (W + dW) / ||W + dW|| per output channel."""
    base, mole, ref = tiny_pipes("sd")
    path = write_package_file(ref.unet, tmp_path / "dora.safetensors", cls, std, weight_decompose=True, wd_on_out=True)
    tensors = load_file(path)
    scales = {k: v for k, v in tensors.items() if k.endswith(".dora_scale")}
    assert len(scales) == len({k.partition(".")[0] for k in tensors}) and all(v.shape[1:].numel() == 1 for v in scales.values())
    names = kohya_names(ref.unet)
    for key, scale in scales.items():  # away from the norms LyCORIS initialises them to
        weight = ref.unet.get_submodule(names[key.partition(".")[0]]).weight.detach().flatten(1)
        assert (scale.flatten() / weight.norm(dim=1) - 1).abs().max() > 0.1, key
    image, (layers,) = mole_images(mole, {"dora": path})
    assert all(layer.magnitude is not None for layer in layers.values()) and len(layers) == len(scales)
    modules = package_modules(ref.unet, tensors)
    assert all(module.wd and module.wd_on_out for module in modules.values())
    np.testing.assert_allclose(image, package_images(ref, modules), atol=1e-4)
    plain = tmp_path / "plain.safetensors"
    save_file({k: v for k, v in tensors.items() if k not in scales}, str(plain))
    without, _ = mole_images(mole, {"plain": plain})
    assert np.abs(image - without).max() > 1e-3  # the magnitudes do something


def assert_refused_unchanged(pipe, files, message):
    """load_experts(files) raises ExpertError matching ``message`` and leaves the pipeline as it was, bit for bit."""
    before = unet_output(pipe)
    modules = {name: type(module) for name, module in pipe.unet.named_modules()}
    with pytest.raises(ExpertError, match=message) as raised:
        pipe.load_experts(files)
    assert pipe.mole is None
    assert {name: type(module) for name, module in pipe.unet.named_modules()} == modules
    assert torch.equal(unet_output(pipe), before)
    return str(raised.value)


def test_input_side_lycoris_dora_is_refused(tiny_pipes, tmp_path):
    base, mole, ref = tiny_pipes("sd")
    path = write_package_file(ref.unet, tmp_path / "dora-in.safetensors", LoConModule, 0.3, targets=("to_q", "conv1"),
                              weight_decompose=True, wd_on_out=False)
    tensors = load_file(path)
    message = assert_refused_unchanged(
        mole, {"in": path}, rf"^{re.escape(str(path))}: (lora_unet_\w+\.dora_scale) has shape \(1, \d+(, 1, 1)?\): a DoRA "
        r"magnitude per input channel \(LyCORIS wd_on_output=False\) has no per-output-channel form")
    key = re.search(r": (lora_unet_\w+\.dora_scale) ", message)[1]
    assert tuple(tensors[key].shape) in {(1, 32), (1, 32, 1, 1), (1, 64, 1, 1)}  # the key named is the file's


@pytest.mark.parametrize("cls, key, algorithm", [(FullModule, "diff", "full (weight difference)"),
                                                 (DiagOFTModule, "oft_blocks", "diagonal OFT")], ids=["full", "oft"])
def test_full_and_oft_files_are_refused_by_load_experts(tiny_pipes, tmp_path, cls, key, algorithm):
    """One module LyCORIS cannot express as LoRA (beside LoHa modules, and with a good expert in the same call):
    refused before anything changes."""
    from mole_diffusion.testing import make_tiny_lycoris

    base, mole, ref = tiny_pipes("sd")
    good = make_tiny_lycoris(base, tmp_path / "good.safetensors", algo="loha", seed=1, unet_modules=("to_q", "conv1"))
    bad_modules = write_package_file(ref.unet, tmp_path / "module.safetensors", cls, 0.01,
                                     targets=("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",))
    bad = tmp_path / "bad.safetensors"
    save_file({**load_file(good), **load_file(bad_modules)}, str(bad))
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert f"{prefix}.{key}" in load_file(bad)
    assert_refused_unchanged(mole, {"good": good, "bad": bad}, "^" + re.escape(
        f"{bad}: {prefix}.{key}: a LyCORIS {algorithm} module, which has no low-rank form; only LoRA/LoCon/LoHa/LoKr/DoRA"))


def test_a_stray_key_of_another_algorithm_in_a_loha_module_is_refused():
    prefix = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    tensors = {f"{prefix}.hada_w1_a": torch.randn(32, 4), f"{prefix}.hada_w1_b": torch.randn(4, 32),
               f"{prefix}.hada_w2_a": torch.randn(32, 4), f"{prefix}.hada_w2_b": torch.randn(4, 32),
               f"{prefix}.alpha": torch.tensor(2.0), f"{prefix}.diff": torch.randn(32, 32)}
    with pytest.raises(ValueError, match=f"x.safetensors: {prefix}.diff: a LyCORIS full \\(weight difference\\) module"):
        lycoris_to_lora(tensors, "x.safetensors")

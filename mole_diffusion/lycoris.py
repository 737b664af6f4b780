"""LyCORIS adapters (LoHa, LoKr, Tucker LoCon) read as plain LoRA pairs, exactly.

Every LyCORIS module whose delta has a low-rank form is rewritten at load time as kohya LoRA keys
(``<prefix>.lora_down.weight``, ``<prefix>.lora_up.weight``, ``<prefix>.alpha``) with
``alpha / rank * up @ down`` equal to the delta the module adds in LyCORIS' own forward, so everything
downstream stays two matmuls:

- LoHa, ``(w1a @ w1b) * (w2a @ w2b)``: an elementwise product of a rank-r1 and a rank-r2 matrix has rank
  r1 * r2; up is the row-wise Kronecker product of w1a and w2a, down the column-wise one of w1b and w2b.
- LoKr, ``kron(W1, W2)``: ``kron(U1 V1, U2 V2) = kron(U1, U2) kron(V1, V2)``; a full factor is written as
  identity times itself on its smaller side, so the rank is rank(W1) * rank(W2).
- Tucker forms (``hada_t1/t2``, ``lokr_t2``, ``lora_mid``): the core is folded into the down side.

Scales follow LyCORIS: ``alpha / dim`` (alpha 0 or absent: 1), and 1 for a LoKr whose factors are both full.
A conv module whose factors the file stores flattened (LoHa and factored LoKr, kernel other than Tucker) comes
back as a 2-D pair, down (R, in * kh * kw), up (out, R): the file does not say how ``in * kh * kw`` splits, the
target layer does (``conv_shaped``). Algorithms without a low-rank form are refused with a ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

READ = "only LoRA/LoCon/LoHa/LoKr/DoRA files are read"
# the key (after the module prefix) by which LyCORIS' own loader recognises each algorithm it cannot convert
REFUSED = {"diff": "full (weight difference)", "diff_b": "full (weight difference)", "on_input": "IA3",
           **dict.fromkeys(("a1.weight", "a2.weight", "b1.weight", "b2.weight", "bm.weight"), "GLoRA"),
           "w_norm": "norm", "b_norm": "norm", "lambda_layer": "T-LoRA"}
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def _algorithm(suffixes: set[str], tensors: Mapping[str, torch.Tensor], prefix: str) -> str | None:
    if suffixes & set(LOHA):
        return "LoHa"
    if any(s.startswith("lokr_") for s in suffixes):
        return "LoKr"
    if "lora_mid.weight" in suffixes:
        return "Tucker LoCon"
    if "oft_blocks" in suffixes:  # LyCORIS tells the two apart by the blocks' rank
        return "BOFT" if tensors[f"{prefix}.oft_blocks"].ndim == 4 else "diagonal OFT"
    return next((REFUSED[s] for s in sorted(suffixes) if s in REFUSED), None)


def _groups(keys: Iterable[str]) -> dict[str, set[str]]:
    """Kohya-style keys by module: ``prefix.suffix`` -> {prefix: {suffix, ...}}."""
    groups: dict[str, set[str]] = {}
    for key in keys:
        prefix, _, suffix = key.partition(".")
        groups.setdefault(prefix, set()).add(suffix)
    return groups


def lycoris_algorithm(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """The first LyCORIS algorithm other than plain LoRA/LoCon in a file's state dict, e.g. "LoHa"; None if none."""
    groups = sorted(_groups(tensors).items())
    return next((a for prefix, s in groups if (a := _algorithm(s, tensors, prefix)) is not None), None)


def _full(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full (m, n...) matrix as (identity, w) or (w, identity): rank min(m, n * kernel)."""
    flat = w.flatten(1)
    if flat.shape[0] <= flat.shape[1]:
        return torch.eye(flat.shape[0], dtype=w.dtype), w
    return flat, torch.eye(flat.shape[1], dtype=w.dtype).reshape(flat.shape[1], *w.shape[1:])


def _tucker_down(t: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS rebuilds a Tucker factor as ``einsum("i j ..., i p, j r -> p r ...", t, a, b)``: that is ``a.T``
    (out, R) times this fold of the core into ``b``, (R, in, kh, kw)."""
    return torch.einsum("i j ..., j r -> i r ...", t, b)


def _loha(g: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    if "hada_t1" in g:  # Tucker: w_a (R, out), w_b (R, in), t (R, R, kh, kw)
        u1, v1 = g["hada_w1_a"].T, _tucker_down(g["hada_t1"], g["hada_w1_b"])
        u2, v2 = g["hada_w2_a"].T, _tucker_down(g["hada_t2"], g["hada_w2_b"])
    else:  # w_a (out, R), w_b (R, in [* kh * kw])
        u1, v1, u2, v2 = g["hada_w1_a"], g["hada_w1_b"], g["hada_w2_a"], g["hada_w2_b"]
    up = (u1[:, :, None] * u2[:, None, :]).flatten(1)
    down = (v1.flatten(1)[:, None, :] * v2.flatten(1)[None, :, :]).flatten(0, 1)
    if up.shape[1] > min(up.shape[0], down.shape[1]):  # r1 * r2 past full rank: the dense delta is smaller
        up, down = _full(up @ down)
    return up, down.reshape(down.shape[0], *v1.shape[1:]), g["hada_w1_b"].shape[0]


def _lokr(g: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int | None]:
    u1, v1 = (g["lokr_w1_a"], g["lokr_w1_b"]) if "lokr_w1" not in g else _full(g["lokr_w1"])
    if "lokr_w2" in g:  # (c, d) or, for a conv, (c, d, kh, kw)
        u2, v2 = _full(g["lokr_w2"])
    elif "lokr_t2" in g:  # w2_a (R, c), w2_b (R, d), t2 (R, R, kh, kw)
        u2, v2 = g["lokr_w2_a"].T.contiguous(), _tucker_down(g["lokr_t2"], g["lokr_w2_b"])
    else:  # w2_a (c, R), w2_b (R, d [* kh * kw])
        u2, v2 = g["lokr_w2_a"], g["lokr_w2_b"]
    # kron(w1, w2) over (out, in, k...): in = i1 * d + i2, so kron of the flattened downs lays out (in, k...) too
    down = torch.kron(v1, v2.flatten(1))
    down = down.reshape(down.shape[0], v1.shape[1] * v2.shape[1], *v2.shape[2:])
    if "lokr_w1" in g and "lokr_w2" in g:
        return torch.kron(u1, u2), down, None  # LyCORIS ignores alpha: scale 1
    return torch.kron(u1, u2), down, (g["lokr_w1_b"] if "lokr_w1_b" in g else g["lokr_w2_b"]).shape[0]


REQUIRED = {"LoHa": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, LOHA),
            "LoKr": (set(), LOKR), "Tucker LoCon": ({"lora_down.weight", "lora_up.weight"}, ("lora_mid.weight",))}


def _check(path: str, prefix: str, algorithm: str, suffixes: set[str]) -> None:
    need, known = REQUIRED[algorithm]
    if algorithm == "LoHa" and ("hada_t1" in suffixes) != ("hada_t2" in suffixes):
        need = need | {"hada_t1", "hada_t2"}
    if algorithm == "LoKr":
        need = {"lokr_w1"} if "lokr_w1_a" not in suffixes and "lokr_w1_b" not in suffixes else {"lokr_w1_a", "lokr_w1_b"}
        need |= {"lokr_w2"} if not suffixes & {"lokr_w2_a", "lokr_w2_b", "lokr_t2"} else {"lokr_w2_a", "lokr_w2_b"}
    unknown = sorted(s for s in suffixes if s.startswith(("hada_", "lokr_")) or s == "lora_mid.weight")
    unknown = [s for s in unknown if s not in known]
    if unknown:
        raise ValueError(f"{path}: {prefix}.{unknown[0]}: a key LyCORIS' {algorithm} does not write; {READ}")
    missing = sorted(need - suffixes)
    if missing:
        raise ValueError(f"{path}: {prefix}.{missing[0]}: missing from this {algorithm} module (it has "
                         f"{', '.join(sorted(suffixes))}); {READ}")


def lycoris_to_lora(tensors: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """``tensors`` (a file's kohya-style state dict) with every LoHa, LoKr and Tucker LoCon module replaced by
    LoRA keys; all other keys (plain LoRA, ``dora_scale``, ...) unchanged. ``path`` names the file in errors."""
    out = dict(tensors)
    for prefix, suffixes in sorted(_groups(tensors).items()):
        algorithm = _algorithm(suffixes, tensors, prefix)
        if algorithm is None:
            continue
        stray = sorted(s for s in suffixes if s in REFUSED or s == "oft_blocks")
        if algorithm not in REQUIRED or stray:
            algorithm = _algorithm({stray[0]}, tensors, prefix)
            raise ValueError(f"{path}: {prefix}.{stray[0]}: a LyCORIS {algorithm} module, which has no low-rank form; {READ}")
        _check(path, prefix, algorithm, suffixes)
        own = {s for s in suffixes if s.startswith(("hada_", "lokr_")) or s == "lora_mid.weight"}
        dtype = torch.float64 if any(tensors[f"{prefix}.{s}"].dtype == torch.float64 for s in own) else torch.float32
        g = {s: tensors[f"{prefix}.{s}"].to(dtype) for s in suffixes if s != "alpha"}
        for s in own:
            del out[f"{prefix}.{s}"]
        if algorithm == "Tucker LoCon":  # rank and alpha stay; mid (R, R, kh, kw) folds into the 1x1 down
            down = torch.einsum("a b ..., b i -> a i ...", g["lora_mid.weight"], g["lora_down.weight"].flatten(1))
            out[f"{prefix}.lora_down.weight"], out[f"{prefix}.lora_up.weight"] = down.contiguous(), g["lora_up.weight"]
            continue
        up, down, dim = (_loha if algorithm == "LoHa" else _lokr)(g)
        alpha = tensors.get(f"{prefix}.alpha")
        scale = 1.0 if dim is None or alpha is None or float(alpha) == 0 else float(alpha) / dim
        rank = up.shape[1]
        out[f"{prefix}.lora_up.weight"] = up.reshape(*up.shape, *[1] * (down.dim() - 2)).contiguous()
        out[f"{prefix}.lora_down.weight"] = down.contiguous()
        out[f"{prefix}.alpha"] = torch.tensor(scale * rank, dtype=torch.float32)
    return out


def conv_shaped(down: torch.Tensor, up: torch.Tensor, weight_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2-D pair for a conv weight ``(out, in, kh, kw)`` as the conv pair (R, in, kh, kw), (out, R, 1, 1);
    a pair that already has the conv's rank of dims comes back unchanged."""
    if down.dim() == len(weight_shape):
        return down, up
    return down.reshape(down.shape[0], *weight_shape[1:]), up.reshape(*up.shape[:2], *[1] * (len(weight_shape) - 2))

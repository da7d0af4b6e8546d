"""Every method of spec/methods.md as a plain numpy float64 function, written from the spec and
never calling mmerge, each with the cases of its test vectors: make_vectors.py evaluates them to
write spec/vectors/<method>.json, and the unit tests use the functions as their reference.

Adding a method: its function here, decorated with `@reference(cases...)` (its test vectors).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from conformance.reference import (
    band_mask,
    elected_positive,
    keep_threshold,
    random_bits,
    ties_count,
    top_k_mask,
)
from conformance.vectors import SPHERICAL as SM
from conformance.vectors import case, family

METHODS: dict[str, Callable] = {}  # method name -> reference function
VECTORS: dict[str, list[dict]] = {}  # method name -> its vector cases


def reference(*cases: dict, name: str | None = None):
    """Register a reference function (under its own name, or `name`) with its vector cases."""

    def add(fn: Callable) -> Callable:
        key = name or fn.__name__
        METHODS[key], VECTORS[key] = fn, list(cases)
        return fn

    return add


# the inputs of the vector cases: smooth values for the spherical methods, grid values (exact
# in float32, many ties) elsewhere
(A, B), _ = family(1, (2, 8), 2, with_base=False, kind="smooth")
M3, B3 = family(2, (3, 4), 3, with_base=True, kind="smooth")
G3, _ = family(3, (3, 4), 3, with_base=False)
G2, GB = family(4, (2, 5), 1, with_base=True)
TWO, BASE2 = family(5, (4, 6), 2, with_base=True)
THREE, BASE3 = family(6, (3, 8), 3, with_base=True)
FLAT, BASE_FLAT = family(7, (40,), 2, with_base=True)


def _per_model(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def _norm(v: np.ndarray) -> float:
    return float(np.sqrt(np.sum(v * v)))


def _lerp(a, b, t):
    return (1 - t) * a + t * b


# -- interpolations --------------------------------------------------------------------------


@reference(
    case("equal_weights", G3, None, {}),
    case("weights", G3[:2], None, {"weight": [0.25, 0.75]}),
    case("unnormalized", G3[:2], None, {"weight": [1.0, -0.5], "normalize": False}),
    case("single", G3[:1], None, {"weight": 2.0}),
)
def linear(models, base, *, weight=1.0, normalize=True, **_):
    w = _per_model(weight, len(models))
    mixed = sum(wi * m for wi, m in zip(w, models))
    return mixed / sum(w) if normalize else mixed


@reference(
    case("midpoint", [A, B], None, {"t": 0.5}, SM),
    case("base_first", [B], A, {"t": 0.3}, SM),
    case("norm_interp", [A, 3 * B], None, {"t": 0.7, "magnitude": "norm_interp"}, SM),
    case("parallel_lerps", [A, 2 * A], None, {"t": 0.25}, SM),
    case("antipodal_lerps", [A, -A], None, {"t": 0.5}, SM),
    case("zero_lerps", [np.zeros_like(A), B], None, {"t": 0.6}, SM),
)
def slerp(models, base, *, t=0.5, dot_threshold=0.9995, magnitude="shoemake", **_):
    a, b = (models[0], models[1]) if base is None else (base, models[0])
    na, nb = _norm(a), _norm(b)
    if na <= 1e-8 or nb <= 1e-8:
        return _lerp(a, b, t)
    cos = float(np.sum(a * b)) / (na * nb)
    theta = math.acos(min(1.0, max(-1.0, cos)))
    if abs(cos) > dot_threshold or math.sin(theta) < 1e-3:
        return _lerp(a, b, t)
    c0 = math.sin((1 - t) * theta) / math.sin(theta)
    c1 = math.sin(t * theta) / math.sin(theta)
    if magnitude == "shoemake":
        return c0 * a + c1 * b
    return (c0 * a / na + c1 * b / nb) * ((1 - t) * na + t * nb)


def _slerp_vectors(v0: np.ndarray, v1: np.ndarray, t: float) -> np.ndarray:
    """Shoemake slerp of each row (last axis) of 2-D v0, v1; lerp where degenerate."""
    out = np.empty_like(v0)
    for r in range(v0.shape[0]):
        a, b = v0[r], v1[r]
        na, nb = _norm(a), _norm(b)
        theta = 0.0
        if na > 1e-8 and nb > 1e-8:
            theta = math.acos(min(1.0, max(-1.0, float(np.sum(a * b)) / (na * nb))))
        if na <= 1e-8 or nb <= 1e-8 or abs(math.sin(theta)) < 1e-3:
            out[r] = _lerp(a, b, t)
        else:
            s = math.sin(theta)
            out[r] = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / s
    return out


@reference(
    case("flat", [A, B], None, {"weight": [1.0, 3.0]}, SM),
    case("rows", M3[:2], None, {"nuslerp_flatten": False}, SM),
    case("row_wise", M3[:2], None, {"nuslerp_flatten": False, "nuslerp_row_wise": True}, SM),
    case("task_vectors", M3[:2], B3, {"weight": [2.0, 1.0]}, SM),
)
def nuslerp(models, base, *, weight=1.0, nuslerp_flatten=True, nuslerp_row_wise=False, **_):
    w = _per_model(weight, 2)
    t = 0.5 if abs(w[0] + w[1]) < 1e-6 else w[1] / (w[0] + w[1])
    v0, v1 = models if base is None else (models[0] - base, models[1] - base)
    if nuslerp_flatten or v0.ndim <= 1:
        out = _slerp_vectors(v0.reshape(1, -1), v1.reshape(1, -1), t).reshape(v0.shape)
    elif nuslerp_row_wise:  # vectors along the first axis
        moved = [np.moveaxis(v, 0, -1) for v in (v0, v1)]
        flat = [m.reshape(-1, m.shape[-1]) for m in moved]
        out = np.moveaxis(_slerp_vectors(*flat, t).reshape(moved[0].shape), -1, 0)
    else:
        flat = [v.reshape(-1, v.shape[-1]) for v in (v0, v1)]
        out = _slerp_vectors(*flat, t).reshape(v0.shape)
    return out if base is None else base + out


@reference(
    case("three", M3, None, {}, SM),
    case("weighted_task_vectors", M3, B3, {"weight": [0.5, 0.3, 0.2]}, SM),
    case("single", M3[:1], None, {}, SM),
)
def multislerp(models, base, *, weight=1.0, normalize_weights=True, **_):
    if len(models) == 1:
        return models[0]
    vs = models if base is None else [m - base for m in models]
    w = _per_model(weight, len(vs))
    if normalize_weights:
        w = [wi / sum(w) for wi in w]
    norms = [_norm(v) for v in vs]
    units = [v / (n + 1e-8) for v, n in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    if _norm(mean) < 1e-8:
        out = w[0] * vs[0] + w[1] * vs[1]
    else:
        mean = mean / _norm(mean)
        tangent = sum(wi * (u - float(np.sum(u * mean)) * mean) for wi, u in zip(w, units))
        s = _norm(tangent) + 1e-8
        out = (math.cos(s) * mean + math.sin(s) / s * tangent) * sum(
            wi * n for wi, n in zip(w, norms)
        )
    return out if base is None else out + base


@reference(
    case("three", M3, None, {}, SM),
    case("weighted_task_vectors", M3, B3, {"weight": [0.5, 0.3, 0.2], "max_iter": 3}, SM),
    case("two", [A, B], None, {"max_iter": 50, "tol": 1e-7}, SM),
    case("opposite", [A, -A, B], None, {"max_iter": 20}, SM),
    case("no_direction", [A * 1e-7, B * 1e-7], None, {"weight": [1.0, 3.0]}, SM),
)
def karcher(models, base, *, weight=1.0, max_iter=10, tol=1e-5, **_):
    if len(models) == 1:
        return models[0]
    vs = models if base is None else [m - base for m in models]
    w = _per_model(weight, len(vs))
    alpha = [wi / sum(w) for wi in w]
    norms = [_norm(v) for v in vs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:  # no direction anywhere: the weighted mean of the vectors
        out = sum(al * v for al, v in zip(alpha, vs))
        return out if base is None else out + base
    units = {i: vs[i] / norms[i] for i in valid}
    a = {i: w[i] / sum(w[j] for j in valid) for i in valid}
    mean = sum(a[i] * units[i] for i in valid)
    mean = units[valid[0]] if _norm(mean) < tol else mean / _norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for i in valid:
            cos = min(1.0, max(-1.0, float(np.sum(mean * units[i]))))
            theta = math.acos(cos)
            if theta < tol or (cos < 0 and math.sin(theta) < 1e-3):  # at or opposite the mean
                continue
            tangent = tangent + a[i] * theta / math.sin(theta) * (units[i] - cos * mean)
        size = _norm(tangent)
        if size < tol:
            break
        mean = math.cos(size) * mean + math.sin(size) * tangent / size
        if _norm(mean) > tol:
            mean = mean / _norm(mean)
    out = mean * sum(al * n for al, n in zip(alpha, norms))
    return out if base is None else out + base


@reference(
    case("pair", [G3[0], np.where(G3[1] > 0, G3[0], G3[1])], None, {"t": 0.1}),
    case("base_first", G2, GB, {"t": 0.05}),
)
def nearswap(models, base, *, t=0.0001, **_):
    a, b = (models[0], models[1]) if base is None else (base, models[0])
    diff = np.abs(a - b)
    with np.errstate(divide="ignore"):
        w = np.where(diff == 0, 1.0, np.clip(t / diff, 0.0, 1.0))
    return w * b + (1 - w) * a


@reference(
    case("copy", G3[:1], None, {}),
    case("scaled", G3[:1], None, {"scale": -0.5}),
)
def passthrough(models, base, *, scale=1.0, **_):
    return models[0] * _per_model(scale, 1)[0]


@reference(
    case("two", M3[:2], B3, {}, SM),
    case("three", M3, B3, {}, SM),
    case("filter_wise", M3, B3, {"filter_wise": True}, SM),
    case("tiny_copies", [B3 + 1e-5 * M3[0]] * 2, B3, {}, SM),
)
def model_stock(models, base, *, filter_wise=False, **_):
    k = len(models)

    def vectors(x):
        return x if filter_wise and x.ndim >= 2 else x.reshape(1, -1)

    def unit_scaled(o):  # each vector over a power of two near its largest entry: no underflow
        top = np.max(np.abs(o), axis=-1, keepdims=True)
        return np.ldexp(o, -np.frexp(top)[1])

    offsets = [unit_scaled(vectors(m - base)) for m in models]
    cosines = []
    for i in range(k):
        for j in range(i + 1, k):
            ni = np.sqrt(np.sum(offsets[i] ** 2, axis=-1, keepdims=True))
            nj = np.sqrt(np.sum(offsets[j] ** 2, axis=-1, keepdims=True))
            dot = np.sum(offsets[i] * offsets[j], axis=-1, keepdims=True)
            product = ni * nj
            safe = np.where(product > 0, product, 1.0)
            cosines.append(np.where(product > 0, np.clip(dot / safe, -1, 1), 0.0))
    cos = sum(cosines) / len(cosines)
    denominator = 1 + (k - 1) * cos
    t = np.where(denominator == 0, 0.0, k * cos / np.where(denominator == 0, 1, denominator))
    mean = sum(vectors(m) for m in models) / k
    return (t * mean + (1 - t) * vectors(base)).reshape(base.shape)


# -- task-vector methods ---------------------------------------------------------------------


def _rescale(delta, kept, rescale, p):
    if rescale == "none":
        return kept
    if rescale == "inverse_density":
        with np.errstate(divide="ignore", invalid="ignore"):  # p = 0 is never kept
            return np.where(kept != 0, kept / p, 0.0)
    before, after = float(np.sum(np.abs(delta))), float(np.sum(np.abs(kept)))
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def _combine(deltas, weights, *, election, normalize):
    if election is None:
        m = sum(w * d for w, d in zip(weights, deltas))
        W = sum(weights)
        return m / W if normalize and abs(W) >= 1e-8 else m
    votes = deltas if election == "sum" else [w * d for w, d in zip(weights, deltas)]
    positive = elected_positive(votes, election)
    agree = [np.where(positive, v > 0, v < 0) for v in votes]
    m = sum(np.where(a, w * d, 0.0) for a, w, d in zip(agree, weights, deltas))
    if normalize:
        divisor = sum(a * w for a, w in zip(agree, weights))
        m = np.where(divisor != 0, m / np.where(divisor != 0, divisor, 1.0), m)
    return m


def _della_probabilities(delta, density, epsilon):
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta
    n = rows.shape[1]
    if n == 1:
        return np.full(delta.shape, density)
    rank = np.argsort(np.argsort(np.abs(rows), axis=1, kind="stable"), axis=1, kind="stable")
    p = np.clip((density - epsilon) + (2 * rank / (n - 1)) * epsilon, 0, 1)
    return p.reshape(delta.shape)


def _task(sparsify, election, normalize_default, rescale_default):
    def method(
        models,
        base,
        *,
        weight=1.0,
        normalize=normalize_default,
        election=election,
        rescale=rescale_default,
        tensor_name="",
        seed=0,
        density=1.0,
        gamma=0.01,
        epsilon=0.15,
        **params,
    ):
        n = len(models)
        lam = params.get("lambda", 1.0)
        w = _per_model(weight, n)
        dens, gam, eps = (_per_model(v, n) for v in (density, gamma, epsilon))
        deltas = []
        for j, m in enumerate(models):
            d = m - base
            if sparsify != "none" and dens[j] < 1:
                kept, p = _sparsify(sparsify, d, dens[j], gam[j], eps[j], seed, tensor_name, j)
                d = _rescale(d, kept, rescale, p)
            deltas.append(d)
        return base + _combine(deltas, w, election=election, normalize=normalize) * lam

    return method


def _sparsify(kind, d, density, gamma, epsilon, seed, name, stream):
    """(kept entries, keep probability) of one task vector."""
    if kind == "top":
        return np.where(top_k_mask(d, ties_count(density, d.size)), d, 0.0), density
    if kind == "band":
        return np.where(band_mask(d, density, gamma), d, 0.0), density
    bits = random_bits(d.size, seed, name, stream).reshape(d.shape)
    p = density if kind == "drop" else _della_probabilities(d, density, epsilon)
    return np.where(bits < keep_threshold(p), d, 0.0), p


task_arithmetic = reference(
    case("weights_lambda", TWO, BASE2, {"weight": [0.7, -0.3], "lambda": 0.5}),
    case("normalized", THREE, BASE3, {"weight": [1.0, 2.0, 1.0], "normalize": True}),
    name="task_arithmetic",
)(_task("none", None, False, "none"))
ties = reference(
    case("density_half", THREE, BASE3, {"density": 0.5}),
    case("election_sum", THREE, BASE3, {"density": 0.4, "election": "sum"}),
    case("election_count", THREE, BASE3, {"density": 0.4, "election": "count"}),
    case("per_model", TWO, BASE2, {"density": [0.3, 0.6], "weight": [1.0, 0.5]}),
    case("unnormalized_l1", TWO, BASE2, {"density": 0.5, "normalize": False, "rescale": "l1"}),
    name="ties",
)(_task("top", "weighted_sum", True, "none"))
dare_linear = reference(
    case("density_half", TWO, BASE2, {"density": 0.5}),
    case(
        "inverse_density", THREE, BASE3, {"density": 0.3, "rescale": "inverse_density", "seed": 123}
    ),
    case("no_rescale", FLAT, BASE_FLAT, {"density": [0.2, 0.7], "rescale": "none", "seed": 9}),
    name="dare_linear",
)(_task("drop", None, False, "l1"))
dare_ties = reference(
    case("density_half", THREE, BASE3, {"density": 0.5, "seed": 4}),
    case("election_sum", THREE, BASE3, {"density": 0.6, "election": "sum", "seed": 5}),
    name="dare_ties",
)(_task("drop", "weighted_sum", False, "l1"))
breadcrumbs = reference(
    case("band", FLAT, BASE_FLAT, {"density": 0.5, "gamma": 0.1}),
    case("no_outliers", TWO, BASE2, {"density": 0.4, "gamma": 0.0}),
    case(
        "inverse_density",
        THREE,
        BASE3,
        {"density": 0.5, "gamma": 0.05, "rescale": "inverse_density"},
    ),
    name="breadcrumbs",
)(_task("band", None, False, "none"))
breadcrumbs_ties = reference(
    case("band", THREE, BASE3, {"density": 0.5, "gamma": 0.1}),
    case("normalized", TWO, BASE2, {"density": 0.6, "gamma": 0.05, "normalize": True}),
    name="breadcrumbs_ties",
)(_task("band", "weighted_sum", False, "none"))
della = reference(
    case("rows", THREE, BASE3, {"density": 0.5, "epsilon": 0.2, "seed": 1}),
    case(
        "flat_inverse",
        FLAT,
        BASE_FLAT,
        {"density": 0.6, "epsilon": 0.3, "rescale": "inverse_density"},
    ),
    name="della",
)(_task("della", "weighted_sum", True, "l1"))
della_linear = reference(
    case("rows", TWO, BASE2, {"density": 0.4, "epsilon": 0.1, "seed": 2}),
    case("flat_none", FLAT, BASE_FLAT, {"density": 0.5, "epsilon": 0.4, "rescale": "none"}),
    name="della_linear",
)(_task("della", None, False, "l1"))


@reference(
    case("all", THREE, BASE3, {}),
    case("select_half", THREE, BASE3, {"select_topk": 0.5}),
)
def sce(models, base, *, select_topk=1.0, **_):
    deltas = [m - base for m in models]
    k = len(deltas)
    if select_topk < 1:
        mean = sum(deltas) / k
        variance = sum((d - mean) ** 2 for d in deltas) / k
        keep = top_k_mask(variance, int(select_topk * int(np.count_nonzero(variance))))
        deltas = [np.where(keep, d, 0.0) for d in deltas]
    energy = [float(np.mean(d * d)) for d in deltas]
    total = sum(energy)
    weights = [1 / k] * k if total == 0 else [e / total for e in energy]
    return base + _combine(deltas, weights, election="sum", normalize=True)


# -- TIES over the whole model (spec section 2.5) ---------------------------------------------


def ties_whole_model(models, base, *, density, weight=1.0, election="sum", **params):
    """TIES as the paper's reference code computes it: each task vector flattened over all the
    tensors of `base` (a dict name -> array; `models` a list of such dicts), m = int(d N), the
    threshold the (N - m)-th smallest |tau|, keep |tau| >= threshold; elect by the summed vote,
    zeros to the sign of the sum of the elected signs; disjoint (weighted) mean; lambda."""
    names = list(base)
    n = len(models)
    lam = params.get("lambda", 1.0)
    dens, w = _per_model(density, n), _per_model(weight, n)
    flat_base = np.concatenate([np.asarray(base[k], np.float64).ravel() for k in names])
    taus = []
    for j, model in enumerate(models):
        tau = np.concatenate([np.asarray(model[k], np.float64).ravel() for k in names]) - flat_base
        if dens[j] < 1:
            keep = tau.size - int(dens[j] * tau.size)
            threshold = np.partition(np.abs(tau), keep - 1)[keep - 1]
            tau = np.where(np.abs(tau) >= threshold, tau, 0.0)
        taus.append(tau)
    votes = taus if election == "sum" else [wi * t for wi, t in zip(w, taus)]
    total = sum(np.sign(v) for v in votes) if election == "count" else sum(votes)
    sign = np.sign(total)
    sign[sign == 0] = np.sign(np.sign(total).sum())
    agree = [np.where(sign > 0, v > 0, v < 0) for v in votes]
    mixed = sum(a * wi * t for a, wi, t in zip(agree, w, taus))
    divisor = sum(a * wi for a, wi in zip(agree, w))
    merged = flat_base + lam * mixed / np.where(divisor == 0, 1.0, divisor)
    out, offset = {}, 0
    for k in names:
        size = np.asarray(base[k]).size
        out[k] = merged[offset : offset + size].reshape(np.shape(base[k]))
        offset += size
    return out

"""Plain float64 numpy references for the merge methods, written from spec/methods.md without
calling mmerge, plus the backend table the method tests share (numpy, torch, strict, mlx)."""

from __future__ import annotations

import hashlib
import importlib.util
import math

import numpy as np
import pytest

# ---------------------------------------------------------------------------------------------
# Backends: arrays of one library made from numpy, and read back.


def _mlx_reason() -> str | None:
    if importlib.util.find_spec("mlx") is None:
        return "mlx is not installed"
    if importlib.util.find_spec("mmerge.backend.mlx") is None:
        return "the MLX adapter (mmerge.backend.mlx) is not written yet"
    return None


def to_backend(name: str, a: np.ndarray):
    """`a` as an array of backend `name` (same dtype; mlx has no float64)."""
    if name == "numpy":
        return np.array(a)
    if name == "torch":
        import torch

        return torch.from_numpy(np.array(a))
    if name == "array_api_strict":
        import array_api_strict

        return array_api_strict.asarray(np.array(a))
    if name == "mlx":
        import mlx.core as mx

        return mx.array(a)
    raise ValueError(name)


def to_numpy(x) -> np.ndarray:
    """Any backend's array as a numpy array (bfloat16 widened to float32)."""
    module = type(x).__module__.split(".")[0]
    if module == "torch":
        import torch

        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    if module == "array_api_strict":
        return np.from_dlpack(x)
    if module == "mlx":
        import mlx.core as mx

        return np.array(x.astype(mx.float32) if x.dtype == mx.bfloat16 else x)
    return np.array(x)


def backend_params() -> list:
    """pytest params for every backend, skipped with a reason where unavailable."""
    out = [pytest.param("numpy", id="numpy")]
    for name in ("torch", "array_api_strict"):
        marks = () if importlib.util.find_spec(name) else pytest.mark.skip(f"{name} missing")
        out.append(pytest.param(name, id=name, marks=marks))
    reason = _mlx_reason()
    out.append(pytest.param("mlx", id="mlx", marks=pytest.mark.skip(reason) if reason else ()))
    return out


BACKENDS = backend_params()


def grid(rng: np.random.Generator, shape, scale: float = 1.0, step: float = 2.0**-10):
    """Random float32 values on a grid of `step`: sums and differences of them are exact in
    float32, so a float64 reference sees exactly the task vectors the library sees."""
    return (np.round(rng.standard_normal(shape) * scale / step) * step).astype(np.float32)


def assert_close(actual, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """|actual - expected| <= atol * max(1, max|expected|) + rtol * |expected|, elementwise."""
    actual = to_numpy(actual).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


# ---------------------------------------------------------------------------------------------
# The counter-based hash of spec/methods.md, in Python integers.

M31 = 2**31 - 1


def ref_keys(seed: int, name: str, stream: int) -> list[int]:
    data = seed.to_bytes(8, "little") + stream.to_bytes(4, "little") + name.encode()
    d = hashlib.blake2b(data, digest_size=12, person=b"mmerge-rng").digest()
    return [int.from_bytes(d[i : i + 4], "little") & M31 for i in (0, 4, 8)]


def _ref_mix(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x5BD1E995) & M31
    x ^= x >> 15
    x = (x * 0x045D9F3B) & M31
    return x ^ (x >> 16)


def ref_bits(seed: int, name: str, stream: int, indices) -> np.ndarray:
    k0, k1, k2 = ref_keys(seed, name, stream)
    out = []
    for i in indices:
        h = _ref_mix((int(i) & M31) ^ k0)
        out.append(_ref_mix(h ^ (int(i) >> 31) ^ k1) ^ k2)
    return np.array(out, dtype=np.int64)


def ref_keep(seed: int, name: str, stream: int, p, n: int) -> np.ndarray:
    """Keep mask: bits < floor(p * 2**31) (p a number or an array of n)."""
    cut = np.floor(np.asarray(p, dtype=np.float64) * 2.0**31)
    return ref_bits(seed, name, stream, range(n)) < cut


# ---------------------------------------------------------------------------------------------
# Selection by magnitude: rank by |x| descending, lower flat index first among equals.


def descending_order(x: np.ndarray) -> np.ndarray:
    flat = np.abs(np.asarray(x, dtype=np.float64).ravel())
    return np.lexsort((np.arange(flat.size), -flat))


def ref_top_mask(x: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(x.size, dtype=bool)
    mask[descending_order(x)[: max(k, 0)]] = True
    return mask.reshape(x.shape)


def ref_band_mask(x: np.ndarray, skip: int, keep: int) -> np.ndarray:
    mask = np.zeros(x.size, dtype=bool)
    mask[descending_order(x)[skip : skip + keep]] = True
    return mask.reshape(x.shape)


# ---------------------------------------------------------------------------------------------
# Sparsifiers and the combination step (float64).


def ref_rescale(delta, kept, rescale, prob):
    if rescale == "none":
        return kept
    if rescale == "inverse_density":
        return np.where(kept != 0, kept / prob, 0.0)
    before, after = np.abs(delta).sum(), np.abs(kept).sum()
    if before < 1e-7 or after < 1e-7:
        return kept
    return kept * (before / after)


def ref_magnitude(delta, density, rescale="none"):
    if density >= 1:
        return delta
    k = min(delta.size, max(1, int(density * delta.size)))
    return ref_rescale(delta, np.where(ref_top_mask(delta, k), delta, 0.0), rescale, density)


def ref_breadcrumbs(delta, density, gamma, rescale="none"):
    if density >= 1:
        return delta
    n = delta.size
    keep, top = int(density * n), int(gamma * n)
    bottom = n - keep - top
    if bottom < 0:
        top += bottom
    kept = np.where(ref_band_mask(delta, top, keep), delta, 0.0)
    return ref_rescale(delta, kept, rescale, density)


def ref_dare(delta, density, rescale, seed, name, stream):
    if density >= 1:
        return delta
    keep = ref_keep(seed, name, stream, density, delta.size).reshape(delta.shape)
    return ref_rescale(delta, np.where(keep, delta, 0.0), rescale, density)


def ref_della(delta, density, epsilon, rescale, seed, name, stream):
    if density >= 1:
        return delta
    rows = delta.reshape(1, -1) if delta.ndim < 2 else delta
    n = rows.shape[1]
    if n == 1:
        prob = np.full(rows.shape, density)
    else:
        rank = np.empty(rows.shape)
        for index in np.ndindex(*rows.shape[:1], *rows.shape[2:]):
            line = rows[(index[0], slice(None), *index[1:])]
            order = np.lexsort((np.arange(n), np.abs(line)))  # ascending, index breaks ties
            r = np.empty(n)
            r[order] = np.arange(n)
            rank[(index[0], slice(None), *index[1:])] = r
        prob = np.clip((density - epsilon) + 2 * epsilon * rank / (n - 1), 0, 1)
    prob = prob.reshape(delta.shape)
    keep = ref_keep(seed, name, stream, prob.ravel(), delta.size).reshape(delta.shape)
    return ref_rescale(delta, np.where(keep, delta, 0.0), rescale, prob)


def ref_combine(deltas, weights, election=None, normalize=False):
    """Weighted sum, or sign election + disjoint (weighted) mean."""
    deltas = [np.asarray(d, np.float64) for d in deltas]
    weighted = [d * w for d, w in zip(deltas, weights)]
    if election is None:
        mixed = sum(weighted)
        total = sum(weights)
        return mixed / total if normalize and abs(total) >= 1e-8 else mixed
    votes = deltas if election == "sum" else weighted
    score = sum(np.sign(v) for v in votes) if election == "count" else sum(votes)
    sign = np.where(score >= 0, 1.0, -1.0)
    agree = [np.sign(v) == sign for v in votes]
    mixed = sum(np.where(a, wd, 0.0) for a, wd in zip(agree, weighted))
    if not normalize:
        return mixed
    divisor = sum(a * w for a, w in zip(agree, weights))
    return mixed / np.where(divisor == 0, 1.0, divisor)


def ref_task_merge(models, base, weights, sparsify, election=None, normalize=False, lam=1.0):
    """base + lam * combine(sparsify_i(model_i - base))."""
    base = np.asarray(base, np.float64)
    deltas = [sparsify(i, np.asarray(m, np.float64) - base) for i, m in enumerate(models)]
    return base + lam * ref_combine(deltas, weights, election, normalize)


# ---------------------------------------------------------------------------------------------
# Interpolations and averages (float64).


def ref_linear(models, weights, normalize=True):
    mixed = sum(np.asarray(m, np.float64) * w for m, w in zip(models, weights))
    return mixed / sum(weights) if normalize else mixed


def ref_lerp(a, b, t):
    return (1 - t) * np.asarray(a, np.float64) + t * np.asarray(b, np.float64)


def ref_slerp(a, b, t, dot_threshold=0.9995, magnitude="shoemake"):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na <= 1e-8 or nb <= 1e-8:
        return ref_lerp(a, b, t)
    cos = np.clip(np.sum(a * b) / (na * nb), -1, 1)
    if abs(cos) > dot_threshold:
        return ref_lerp(a, b, t)
    theta = np.arccos(cos)
    c0 = np.sin((1 - t) * theta) / np.sin(theta)
    c1 = np.sin(t * theta) / np.sin(theta)
    if magnitude == "shoemake":
        return c0 * a + c1 * b
    return (c0 * a / na + c1 * b / nb) * ((1 - t) * na + t * nb)


def ref_slerp_vectors(v0, v1, t):
    """Row-by-row slerp of 2-D arrays (vectors along axis 1), lerp when degenerate."""
    out = np.empty_like(v0)
    for i in range(v0.shape[0]):
        a, b = v0[i], v1[i]
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        if na <= 1e-8 or nb <= 1e-8:
            out[i] = ref_lerp(a, b, t)
            continue
        theta = np.arccos(np.clip(a @ b / (na * nb), -1, 1))
        if abs(np.sin(theta)) < 1e-3:
            out[i] = ref_lerp(a, b, t)
        else:
            out[i] = (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)
    return out


def ref_nuslerp(models, weights, base=None, flatten=True, row_wise=False):
    v0, v1 = (np.asarray(m, np.float64) for m in models)
    if base is not None:
        base = np.asarray(base, np.float64)
        v0, v1 = v0 - base, v1 - base
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    shape = v0.shape
    if flatten or v0.ndim <= 1:
        out = ref_slerp_vectors(v0.reshape(1, -1), v1.reshape(1, -1), t).reshape(shape)
    else:
        a = np.swapaxes(v0, 0, -1) if row_wise else v0
        b = np.swapaxes(v1, 0, -1) if row_wise else v1
        r = ref_slerp_vectors(a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), t)
        r = r.reshape(a.shape)
        out = np.swapaxes(r, 0, -1) if row_wise else r
    return out if base is None else out + base


def ref_multislerp(models, weights, base=None, normalize_weights=True):
    vs = [np.asarray(m, np.float64) for m in models]
    if base is not None:
        vs = [v - base for v in vs]
    w = np.asarray(weights, np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = [np.linalg.norm(v) for v in vs]
    units = [v / (n + 1e-8) for v, n in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wi * (u - np.sum(u * mean) * mean) for wi, u in zip(w, units))
    size = np.linalg.norm(tangent) + 1e-8
    out = (np.cos(size) * mean + np.sin(size) / size * tangent) * np.dot(norms, w)
    return out if base is None else out + base


def ref_karcher(models, weights, iterations=200):
    """Weighted Frechet mean of the directions (iterated to convergence) times sum w_i |v_i|."""
    vs = [np.asarray(m, np.float64).ravel() for m in models]
    w = np.asarray(weights, np.float64) / np.sum(weights)
    norms = np.array([np.linalg.norm(v) for v in vs])
    units = [v / n for v, n in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean /= np.linalg.norm(mean)
    for _ in range(iterations):
        step = np.zeros_like(mean)
        for wi, u in zip(w, units):
            theta = np.arccos(np.clip(u @ mean, -1, 1))
            if theta > 1e-12:
                step += wi * theta / np.sin(theta) * (u - np.cos(theta) * mean)
        size = np.linalg.norm(step)
        if size < 1e-14:
            break
        mean = np.cos(size) * mean + np.sin(size) * step / size
        mean /= np.linalg.norm(mean)
    return (mean * np.dot(w, norms)).reshape(np.shape(models[0]))


def ref_model_stock(models, base, filter_wise=False):
    base = np.asarray(base, np.float64)
    ws = [np.asarray(m, np.float64) for m in models]
    shape = base.shape

    def vec(x):
        return x.reshape(1, -1) if not filter_wise or x.ndim < 2 else x

    offs = [vec(m - base) for m in ws]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            prod = np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1)
            c = np.sum(offs[i] * offs[j], axis=-1) / np.maximum(prod, 1e-6)
            cos.append(np.clip(c, -1, 1))
    c = np.mean(cos, axis=0)[..., None]
    k = len(ws)
    t = k * c / (1 + (k - 1) * c)
    return (t * vec(sum(ws) / k) + (1 - t) * vec(base)).reshape(shape)


def ref_sce(models, base, select_topk=1.0):
    base = np.asarray(base, np.float64)
    deltas = np.stack([np.asarray(m, np.float64) - base for m in models])
    if select_topk < 1:
        var = deltas.var(axis=0)
        k = int(select_topk * np.count_nonzero(var))
        deltas = deltas * ref_top_mask(var, k)
    energy = (deltas**2).reshape(len(models), -1).mean(axis=1)
    w = np.full(len(models), 1 / len(models)) if energy.sum() == 0 else energy / energy.sum()
    sign = np.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
    agree = np.sign(deltas) == sign
    wb = w.reshape((-1,) + (1,) * (deltas.ndim - 1))
    mixed = (deltas * agree * wb).sum(0)
    divisor = (agree * wb).sum(0)
    return base + mixed / np.where(divisor == 0, 1.0, divisor)


def ref_nearswap(a, b, t):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = np.abs(a - b)
    w = np.ones_like(diff)
    nz = diff > 0
    w[nz] = np.clip(t / diff[nz], 0, 1)
    return w * b + (1 - w) * a


def angle_between(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return math.acos(np.clip(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), -1, 1))

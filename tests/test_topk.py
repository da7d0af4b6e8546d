"""Exact top-k and band selection by magnitude (mmerge.backend.topk)."""

import numpy as np
import pytest
from references import BACKENDS, grid, ref_band_mask, ref_top_mask, to_backend, to_numpy

from mmerge import backend
from mmerge.backend import topk


def on(be, a):
    x = to_backend(be, a)
    return backend.namespace(x), x


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("step", [2.0**-3, 2.0**-12], ids=["many-ties", "few-ties"])
def test_top_mask_matches_reference(be, step):
    a = grid(np.random.default_rng(0), (24, 37), step=step)
    xp, x = on(be, a)
    for k in (1, 2, 100, 444, 887, 888):
        got = to_numpy(topk.top_mask(xp, x, k))
        assert got.shape == a.shape
        assert got.sum() == k
        assert np.array_equal(got, ref_top_mask(a, k)), k


@pytest.mark.parametrize("be", BACKENDS)
def test_ties_at_threshold_go_to_lower_index(be):
    xp, x = on(be, np.array([1, -3, 3, 2, -3, 3, 0], dtype=np.float32))
    got = to_numpy(topk.top_mask(xp, x, 2))
    assert got.tolist() == [False, True, True, False, False, False, False]
    got = to_numpy(topk.top_mask(xp, x, 5))
    assert got.tolist() == [False, True, True, True, True, True, False]


@pytest.mark.parametrize("be", BACKENDS)
def test_all_equal_magnitudes(be):
    xp, x = on(be, np.array([[2, -2, 2], [-2, 2, 2]], dtype=np.float32))
    assert to_numpy(topk.top_mask(xp, x, 4)).ravel().tolist() == [1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("be", BACKENDS)
def test_k_out_of_range(be):
    xp, x = on(be, np.arange(6, dtype=np.float32))
    assert not to_numpy(topk.top_mask(xp, x, 0)).any()
    assert to_numpy(topk.top_mask(xp, x, 6)).all()
    assert to_numpy(topk.top_mask(xp, x, 9)).all()


@pytest.mark.parametrize("be", BACKENDS)
def test_band_mask_matches_reference(be):
    a = grid(np.random.default_rng(1), (50, 20), step=2.0**-4)
    xp, x = on(be, a)
    for skip, keep in [(0, 10), (10, 500), (3, 0), (999, 1), (0, 1000)]:
        got = to_numpy(topk.band_mask(xp, x, skip, keep))
        assert np.array_equal(got, ref_band_mask(a, skip, keep)), (skip, keep)


@pytest.mark.parametrize("be", BACKENDS)
def test_kth_largest_fast_paths(be):
    """numpy partition, torch kthvalue, mlx partition and the generic sort agree."""
    a = np.abs(grid(np.random.default_rng(2), (3001,), step=2.0**-6))
    xp, x = on(be, a)
    want = np.sort(a)[::-1]
    for k in (1, 7, 1500, 3001):
        assert float(topk.kth_largest(xp, x, k)) == want[k - 1]


def test_top_count_follows_mergekit():
    assert topk.top_count(0.5, 10) == 5
    assert topk.top_count(0.01, 10) == 1  # at least one entry survives
    assert topk.top_count(0.29, 100) == 28  # int(0.29 * 100) in float64, as mergekit
    assert topk.top_count(1.0, 7) == 7


def test_top_mask_float64_stays_exact():
    a = np.array([1e-300, 3e-300, 2e-300], dtype=np.float64)
    xp, x = on("numpy", a)
    assert to_numpy(topk.top_mask(xp, x, 1)).tolist() == [False, True, False]


@pytest.mark.parametrize("kind", ["normal", "sorted", "periodic", "few_values", "spike"])
@pytest.mark.parametrize("density", [0.001, 0.3, 0.5, 0.999])
def test_bracketed_kth_is_exact_on_large_arrays(kind, density):
    """numpy's sample-bracketed selection (arrays >= 2**16) equals a full sort, including
    inputs built so the strided sample misses and the full partition fallback runs."""
    from mmerge.backend.topk import _bracketed_kth, kth_largest

    n = 200_003
    rng = np.random.default_rng(1)
    a = {
        "normal": rng.standard_normal(n),
        "sorted": np.sort(rng.standard_normal(n)),
        "periodic": np.tile(np.arange(12, dtype=np.float64), n // 12 + 1)[:n],
        "few_values": rng.integers(0, 3, n).astype(np.float64),
        "spike": np.where(np.arange(n) % 12 == 0, 0.0, rng.standard_normal(n) + 100),
    }[kind].astype(np.float32)
    a = np.abs(a)
    k = max(1, int(density * n))
    want = np.sort(a)[n - k]
    assert kth_largest(np, a, k) == want
    fast = _bracketed_kth(a, k)
    assert fast is None or fast == want

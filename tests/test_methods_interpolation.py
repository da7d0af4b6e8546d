"""Interpolations and averages against their float64 references, on every backend."""

import numpy as np
import pytest
from helpers import BACKENDS, REF, assert_close, grid, to_backend, to_numpy

import mmerge.methods as M


def models(seed=0, shape=(12, 20), n=3, spread=0.5):
    rng = np.random.default_rng(seed)
    base = grid(rng, shape)
    return [base + grid(rng, shape, spread) for _ in range(n)], base


def run(be, spec, tensors, base=None, **params):
    out = spec(
        [to_backend(be, m) for m in tensors],
        base=None if base is None else to_backend(be, base),
        **params,
    )
    return to_numpy(out)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear(be, normalize):
    ms, _ = models()
    w = [0.2, 0.5, 0.9]
    assert_close(
        run(be, M.linear, ms, weight=w, normalize=normalize),
        REF.linear(ms, None, weight=w, normalize=normalize),
    )


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("magnitude", ["shoemake", "norm_interp"])
def test_slerp(be, t, magnitude):
    (a, b), _ = models(1, n=2, spread=2.0)
    b = b * 3  # different norms make the magnitude modes differ
    got = run(be, M.slerp, [a, b], t=t, magnitude=magnitude)
    assert_close(got, REF.slerp([a, b], None, t=t, magnitude=magnitude))


@pytest.mark.parametrize("be", BACKENDS)
def test_slerp_with_base_starts_at_the_base(be):
    """slerp([other], base=base): t=0 is the base, as mergekit's (base, other) order."""
    (other,), base = models(2, n=1, spread=2.0)
    got = run(be, M.slerp, [other], base, t=0.25)
    assert_close(got, REF.slerp([other], base, t=0.25))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize(
    "flatten,row_wise", [(True, False), (False, False), (False, True)], ids=["flat", "rows", "cols"]
)
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(be, flatten, row_wise, with_base):
    ms, base = models(3, n=2, spread=1.0)
    w = [0.3, 0.9]
    got = run(
        be,
        M.nuslerp,
        ms,
        base if with_base else None,
        weight=w,
        nuslerp_flatten=flatten,
        nuslerp_row_wise=row_wise,
    )
    want = REF.nuslerp(
        ms,
        base if with_base else None,
        weight=w,
        nuslerp_flatten=flatten,
        nuslerp_row_wise=row_wise,
    )
    assert_close(got, want)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(be, with_base):
    ms, base = models(4, n=4, spread=1.0)
    w = [1.0, 2.0, 0.5, 1.5]
    got = run(be, M.multislerp, ms, base if with_base else None, weight=w)
    want = REF.multislerp(ms, base if with_base else None, weight=w)
    assert_close(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("be", BACKENDS)
def test_karcher_converges_to_frechet_mean(be):
    ms, _ = models(5, n=3, spread=1.5)
    w = [1.0, 2.0, 3.0]
    got = run(be, M.karcher, ms, weight=w, max_iter=100, tol=1e-7)
    assert_close(
        got, REF.karcher(ms, None, weight=w, max_iter=200, tol=1e-14), rtol=1e-4, atol=1e-5
    )


def test_karcher_defaults_close_to_the_mean():
    ms, _ = models(5, n=3, spread=1.5)
    want = REF.karcher(ms, None, max_iter=200, tol=1e-14)
    assert_close(M.karcher(ms), want, rtol=1e-3, atol=1e-4)


def test_karcher_two_models_is_the_slerp_midpoint():
    (a, b), _ = models(6, n=2, spread=3.0)
    b = b / np.linalg.norm(b) * np.linalg.norm(a)  # equal norms: the mean is slerp at 1/2
    want = REF.slerp([a, b], None, t=0.5)
    assert_close(M.karcher([a, b], max_iter=50, tol=1e-8), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(be, filter_wise):
    ms, base = models(7, n=3, spread=0.3)
    ms = [m + 0.2 for m in ms]  # a shared direction: positive cosines
    got = run(be, M.model_stock, ms, base, filter_wise=filter_wise)
    assert_close(got, REF.model_stock(ms, base, filter_wise=filter_wise))


def test_model_stock_ratio_for_two_models():
    """t = 2 cos / (1 + cos): for orthogonal task vectors the result is the base."""
    base = np.zeros(4, np.float32)
    a, b = np.array([1, 0, 0, 0], np.float32), np.array([0, 1, 0, 0], np.float32)
    assert np.array_equal(M.model_stock([a, b], base=base), base)
    c = np.array([1, 1, 0, 0], np.float32)  # cos 45 degrees with a
    cos = float(a @ c / (np.linalg.norm(a) * np.linalg.norm(c)))
    t = 2 * cos / (1 + cos)
    assert_close(M.model_stock([a, c], base=base), t * (a + c) / 2)


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("t", [1e-4, 0.01, 0.5])
def test_nearswap(be, t):
    (a, b), _ = models(8, n=2, spread=0.01)
    b = np.where(np.arange(b.size).reshape(b.shape) % 5 == 0, a, b)  # some equal entries
    want = REF.nearswap([a, b], None, t=t)
    assert_close(run(be, M.nearswap, [a, b], t=t), want)
    assert_close(run(be, M.nearswap, [b], a, t=t), want)


@pytest.mark.parametrize("be", BACKENDS)
def test_passthrough(be):
    (a,), _ = models(9, n=1)
    assert np.array_equal(run(be, M.passthrough, [a]), a)
    assert_close(run(be, M.passthrough, [a], scale=0.5), a.astype(np.float64) * 0.5)

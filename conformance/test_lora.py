"""LoRA math (spec/lora.md) on every backend, against float64 numpy references: deltas from
factors, DoRA's rescaling, exact recompression of stacked factors (Eckart-Young at any rank),
thin QR at any conditioning, randomized SVD recovering low-rank matrices (also far below the
asked rank), and the same balanced, sign-fixed factors as numpy.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from conformance.backends import REFERENCE
from conformance.profiles import PROFILE
from mmerge.backend.rng import gaussian
from mmerge.methods import lora

RTOL = 2e-4  # float32 linear algebra, relative to the largest magnitude involved
CANCELLING = 10.0  # |left| |right| / |left right| a float32-only backend's factors are held to


@st.composite
def stacked(draw):
    """Stacked factors left (m x k) and right (k x n) whose product U diag(s) V^T has rank
    min(m, n, k) and singular values a factor of 3 apart (so every truncation is unique), as
    float32 host arrays; for k above that rank the columns are redundant, as when adapters are
    stacked."""
    m = draw(st.integers(2, 40))
    n = draw(st.integers(2, 40))
    k = draw(st.integers(1, 12))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rank = min(m, n, k)
    u, _ = np.linalg.qr(rng.standard_normal((m, rank)))
    v, _ = np.linalg.qr(rng.standard_normal((n, rank)))
    s = rng.uniform(0.8, 1.0, rank) * 3.0 ** -np.arange(rank) * 10.0 ** draw(st.integers(-3, 2))
    mix = rng.standard_normal((rank, k))  # full row rank: mix @ pinv(mix) = I
    left = (u * s) @ mix
    right = np.linalg.pinv(mix) @ v.T
    return left.astype(np.float32), right.astype(np.float32)


def close(got, want, scale, what):
    np.testing.assert_allclose(
        np.asarray(got, np.float64), want, rtol=0, atol=RTOL * scale, err_msg=what
    )


def best_rank(product: np.ndarray, k: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(product)
    return (u[:, :k] * s[:k]) @ vt[:k]


@PROFILE
@given(factors=stacked())
def test_delta_rows_is_the_product_of_the_selected_rows(backend, factors):
    left, right = factors
    xp = backend.xp
    want = left.astype(np.float64) @ right
    rows = slice(left.shape[0] // 3, left.shape[0])
    got = backend.host(lora.delta_rows(xp, backend.put(left[rows]), backend.put(right)))
    close(got, want[rows], max(np.max(np.abs(want)), 1e-30), "delta rows")


@PROFILE
@given(factors=stacked(), cut=st.integers(1, 12))
def test_recompression_is_the_best_approximation_at_every_rank(backend, factors, cut):
    left, right = factors
    product = left.astype(np.float64) @ right
    scale = max(np.max(np.abs(product)), 1e-30)
    low = lora.recompress(backend.xp, backend.put(left), backend.put(right), cut)
    k = min(cut, left.shape[1], *product.shape)
    assert low.rank == k
    got = backend.host(low.left).astype(np.float64) @ backend.host(low.right)
    close(got, best_rank(product, k), scale, "rank-k product")
    s = np.linalg.svd(product, compute_uv=False)
    values = backend.host(low.singular_values)
    close(values[: s.shape[0]], s[: values.shape[0]], s[0] if s.size else 1.0, "singular values")


@PROFILE
@given(factors=stacked())
def test_factors_are_the_reference_backends_factors(backend, factors):
    """Balanced, sign-fixed factors: the same matrices on every backend, not only the same
    product (the singular values of the drawn products are separated by a factor of 3)."""
    left, right = factors
    if "float64" not in backend.floats:  # float32 QR of the factors: digits lost to cancelling
        product = np.linalg.norm(left.astype(np.float64) @ right, 2)
        assume(np.linalg.norm(left, 2) * np.linalg.norm(right, 2) <= CANCELLING * product)
    same_factors_as_the_reference(backend, left, right)


def same_factors_as_the_reference(backend, left, right):
    """`recompress` at full rank gives the reference backend's factors on `backend`."""
    k = min(left.shape[1], left.shape[0], right.shape[1])
    got = lora.recompress(backend.xp, backend.put(left), backend.put(right), k)
    ref = lora.recompress(REFERENCE.xp, left, right, k)
    scale = max(np.max(np.abs(ref.left)), np.max(np.abs(ref.right)), 1e-30)
    close(backend.host(got.left), ref.left.astype(np.float64), scale, "left factor")
    close(backend.host(got.right), ref.right.astype(np.float64), scale, "right factor")


def test_factors_of_stacks_that_cancel_are_the_reference_backends_factors(backend):
    """Stacked factors far worse conditioned than their product (adapters that cancel): float32
    QR of the factors loses digits in proportion; recompress works in float64 where it can."""
    if "float64" not in backend.floats:
        pytest.skip("float32 only: its QR of cancelling factors loses digits (spec/lora.md)")
    rng = np.random.default_rng(7)
    u, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    v, _ = np.linalg.qr(rng.standard_normal((12, 8)))
    mix = rng.standard_normal((8, 8))
    mix[:, 1] = mix[:, 0] + 1e-4 * mix[:, 1]  # condition number about 1e5
    left = ((u * 3.0 ** -np.arange(8)) @ mix).astype(np.float32)
    right = (np.linalg.pinv(mix) @ v.T).astype(np.float32)
    same_factors_as_the_reference(backend, left, right)


@PROFILE
@given(factors=stacked(), power=st.integers(0, 2), oversample=st.integers(0, 6))
def test_randomized_svd_recovers_a_low_rank_matrix(backend, factors, power, oversample):
    left, right = factors
    product = (left.astype(np.float64) @ right).astype(np.float32)
    m, n = product.shape
    rank = min(left.shape[1], m, n)
    width = lora.sketch_width(rank, oversample, (m, n))
    xp = backend.xp
    d = backend.put(product)
    omega = backend.put(gaussian((n, width), seed=1, name="conformance"))
    low = lora.randomized_svd(
        xp,
        lambda x: xp.matmul(d, x),
        lambda y: xp.matmul(xp.matrix_transpose(d), y),
        omega,
        rank,
        power_iters=power,
    )
    got = backend.host(low.left).astype(np.float64) @ backend.host(low.right)
    close(got, product.astype(np.float64), max(np.max(np.abs(product)), 1e-30), "recovered")


@st.composite
def tall(draw):
    """A tall float32 matrix (m x l) whose singular values span up to seven decades, exactly
    rank-deficient in some draws: zero rows below the first few (the sketch of a delta that
    changed a few rows) or a repeated column."""
    m = draw(st.integers(2, 64))
    width = draw(st.integers(1, min(m, 16)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    u, _ = np.linalg.qr(rng.standard_normal((m, width)))
    v, _ = np.linalg.qr(rng.standard_normal((width, width)))
    y = (u * np.logspace(0, -draw(st.integers(0, 7)), width)) @ v.T
    kind = draw(st.sampled_from(["full", "zero rows", "repeated column"]))
    if kind == "zero rows":
        y[draw(st.integers(1, width)) :] = 0.0
    elif kind == "repeated column" and width > 1:
        y[:, -1] = y[:, 0]
    return (y * 10.0 ** draw(st.integers(-3, 3))).astype(np.float32)


@PROFILE
@given(y=tall())
def test_thin_qr_is_orthonormal_and_exact_at_any_conditioning(backend, y):
    """q^T q = I to float32 precision and q r = y, with r upper triangular, whether CholeskyQR
    gets there in one pass (well-conditioned y), two (ill-conditioned) or gives way to
    Householder QR (exactly rank-deficient y, or a backend without float64)."""
    q, r = lora.thin_qr(backend.xp, backend.put(y))
    q, r = backend.host(q).astype(np.float64), backend.host(r).astype(np.float64)
    width = y.shape[1]
    assert q.shape == y.shape and r.shape == (width, width)
    close(q.T @ q, np.eye(width), 1e-5 / RTOL, "q^T q")
    assert np.array_equal(r, np.triu(r)), "r is not upper triangular"
    close(q @ r, y.astype(np.float64), np.max(np.abs(y)), "q r")


@PROFILE
@given(
    data=st.data(),
    kind=st.sampled_from(["product", "rows", "columns"]),
    power=st.integers(0, 2),
)
def test_randomized_svd_recovers_a_matrix_far_below_the_asked_rank(backend, data, kind, power):
    """Asked for a rank far above the matrix's, so that every sketch is rank-deficient: a
    rank-r product (rank-deficient up to float32 rounding) or a matrix with r nonzero rows or
    columns (exactly rank-deficient, as a delta of a few trained embedding rows is)."""
    m, n = data.draw(st.integers(24, 80)), data.draw(st.integers(24, 80))
    r = data.draw(st.integers(1, 4))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    d = np.zeros((m, n))
    if kind == "product":
        d = rng.standard_normal((m, r)) @ rng.standard_normal((r, n))
    elif kind == "rows":
        d[rng.choice(m, r, replace=False)] = rng.standard_normal((r, n))
    else:
        d[:, rng.choice(n, r, replace=False)] = rng.standard_normal((m, r))
    d = d.astype(np.float32)
    rank = data.draw(st.integers(4 * r, min(m, n) - 4))
    xp = backend.xp
    bd = backend.put(d)
    omega = backend.put(gaussian((n, rank + 4), seed=2, name="conformance"))
    low = lora.randomized_svd(
        xp,
        lambda x: xp.matmul(bd, x),
        lambda y: xp.matmul(xp.matrix_transpose(bd), y),
        omega,
        rank,
        power_iters=power,
    )
    got = backend.host(low.left).astype(np.float64) @ backend.host(low.right)
    close(got, d.astype(np.float64), np.max(np.abs(d)), "recovered")


@PROFILE
@given(factors=stacked(), axis=st.sampled_from([0, 1]))
def test_dora_rescales_each_output_unit_to_its_magnitude(backend, factors, axis):
    left, right = factors
    w = (left.astype(np.float64) @ right).astype(np.float32) + 1.0
    units = w.shape[0] if axis == 1 else w.shape[1]
    magnitude = np.linspace(0.5, 2.0, units).astype(np.float32)
    xp = backend.xp
    bw = backend.put(w)
    norms = lora.row_norms(xp, bw) if axis == 1 else xp.sqrt(lora.column_sumsq(xp, bw))
    got = backend.host(lora.dora_rescale(xp, bw, backend.put(magnitude), norms, axis))
    norm = np.linalg.norm(w.astype(np.float64), axis=axis)
    shape = (-1, 1) if axis == 1 else (1, -1)
    want = w * (magnitude / norm).reshape(shape)
    close(got, want, np.max(np.abs(want)), "dora")
    np.testing.assert_allclose(np.linalg.norm(got, axis=axis), magnitude, rtol=1e-4)

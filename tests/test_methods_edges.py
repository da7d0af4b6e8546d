"""Edge cases and properties of spec/methods.md: degenerate geometry, density limits, zero task
vectors, sign ties, non-finite inputs, identities, symmetries, dtypes."""

import itertools

import numpy as np
import pytest
from helpers import BACKENDS, REF, assert_close, grid, to_backend, to_numpy

import mmerge.methods as M
from mmerge.errors import InvalidInput

RNG = np.random.default_rng(42)


def lerp(a, b, t):
    return (1 - t) * a.astype(np.float64) + t * b.astype(np.float64)


BASE = grid(RNG, (10, 16))
A, B, C = (BASE + grid(RNG, (10, 16), 0.3) for _ in range(3))

# (method, models, base, params) for one ordinary call of every method
CALLS = {
    "linear": ([A, B], None, {}),
    "slerp": ([A, B], None, {"t": 0.3}),
    "nuslerp": ([A, B], BASE, {}),
    "multislerp": ([A, B, C], None, {}),
    "karcher": ([A, B, C], None, {}),
    "task_arithmetic": ([A, B], BASE, {}),
    "ties": ([A, B], BASE, {"density": 0.5}),
    "dare_linear": ([A, B], BASE, {"density": 0.5}),
    "dare_ties": ([A, B], BASE, {"density": 0.5}),
    "breadcrumbs": ([A, B], BASE, {"density": 0.5}),
    "breadcrumbs_ties": ([A, B], BASE, {"density": 0.5}),
    "della": ([A, B], BASE, {"density": 0.5}),
    "della_linear": ([A, B], BASE, {"density": 0.5}),
    "model_stock": ([A, B], BASE, {}),
    "sce": ([A, B, C], BASE, {"select_topk": 0.5}),
    "nearswap": ([A, B], None, {"t": 0.01}),
    "passthrough": ([A], None, {}),
}


def test_every_method_has_an_edge_call():
    assert set(CALLS) == {spec.name for spec in M.all_methods()}


# --- non-finite inputs -------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.parametrize("name", sorted(CALLS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_model_raises(name, bad):
    models, base, params = CALLS[name]
    models = [m.copy() for m in models]
    models[-1][3, 5] = bad
    with pytest.raises(InvalidInput, match=f"model {len(models) - 1} has NaN or inf"):
        M.get(name)(models, base=base, **params)


@pytest.mark.parametrize("name", sorted(n for n, c in CALLS.items() if c[1] is not None))
def test_non_finite_base_raises(name):
    models, base, params = CALLS[name]
    base = base.copy()
    base[0, 0] = np.nan
    with pytest.raises(InvalidInput, match="base model has NaN or inf"):
        M.get(name)(models, base=base, **params)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_overflow_from_finite_inputs_is_not_an_input_error():
    big = np.full(3, 3e38, np.float32)
    assert np.isinf(M.linear([big, big], normalize=False)).all()


@pytest.mark.parametrize("be", BACKENDS)
def test_the_finite_check_warns_of_nothing(be):
    import warnings

    from mmerge import backend

    big = to_backend(be, np.full(8, 3e38, np.float32))  # finite, with an infinite sum
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.of(big).all_finite(big)
        assert not backend.of(big).all_finite(to_backend(be, np.array([1.0, np.inf], np.float32)))


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("name", ["ties", "dare_ties", "slerp"])
def test_finite_inputs_whose_sum_overflows_are_finite(be, name):
    # the finite check adds the entries first: an infinite sum must not count as an input error
    models, base, params = CALLS[name]
    big = [
        np.where(np.arange(m.size).reshape(m.shape) % 2, 3e38, m).astype(np.float32) for m in models
    ]
    bad = [b.copy() for b in big]
    bad[0][0, 1] = np.nan
    on = [to_backend(be, m) for m in big]
    at = None if base is None else to_backend(be, base)
    M.get(name)(on, base=at, **params)
    with pytest.raises(InvalidInput, match="model 0 has NaN or inf"):
        M.get(name)([to_backend(be, m) for m in bad], base=at, **params)


# --- slerp geometry ----------------------------------------------------------------------------


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("magnitude", ["shoemake", "norm_interp"])
def test_slerp_endpoints_are_exact(be, magnitude):
    a, b = to_backend(be, A), to_backend(be, B * 2)
    assert np.array_equal(to_numpy(M.slerp([a, b], t=0.0, magnitude=magnitude)), A)
    assert np.array_equal(to_numpy(M.slerp([a, b], t=1.0, magnitude=magnitude)), B * 2)


@pytest.mark.parametrize(
    "b", [2.5 * A, -A, np.zeros_like(A)], ids=["parallel", "antipodal", "zero"]
)
@pytest.mark.parametrize("magnitude", ["shoemake", "norm_interp"])
def test_slerp_degenerate_pairs_lerp(b, magnitude):
    got = M.slerp([A, b], t=0.3, magnitude=magnitude)
    assert_close(got, lerp(A, b, 0.3))
    got = M.slerp([b, A], t=0.3, magnitude=magnitude)
    assert_close(got, lerp(b, A, 0.3))


@pytest.mark.parametrize("be", BACKENDS)
@pytest.mark.parametrize("magnitude", ["shoemake", "norm_interp"])
def test_slerp_nearly_antiparallel_pairs_lerp(be, magnitude):
    """cos about -0.9998: sin (0.02) is above the small-angle floor, so only |cos| >
    dot_threshold sends it to lerp; the arc formula would divide by that small sine."""
    noise = grid(np.random.default_rng(5), A.shape)
    b = -A + 0.02 * np.linalg.norm(A) / np.linalg.norm(noise) * noise
    cos = float(np.vdot(A, b) / (np.linalg.norm(A) * np.linalg.norm(b)))
    assert -0.99995 < cos < -0.9995 and np.sqrt(1 - cos * cos) > 1e-3
    got = to_numpy(M.slerp([to_backend(be, A), to_backend(be, b)], t=0.3, magnitude=magnitude))
    assert_close(got, lerp(A, b, 0.3))
    assert np.abs(got).max() <= np.abs(A).max() + np.abs(b).max()


def test_slerp_dot_threshold():
    b = A + 0.05 * grid(RNG, A.shape)  # nearly parallel: cos about 0.999
    assert_close(M.slerp([A, b], t=0.4), REF.slerp([A, b], None, t=0.4))
    assert_close(M.slerp([A, b], t=0.4, dot_threshold=0.9), lerp(A, b, 0.4))


def test_slerp_symmetry():
    assert_close(M.slerp([A, B], t=0.3), to_numpy(M.slerp([B, A], t=0.7)))


def test_slerp_norm_interp_has_the_interpolated_norm():
    b = 3 * B
    got = M.slerp([A, b], t=0.4, magnitude="norm_interp")
    want = 0.6 * np.linalg.norm(A) + 0.4 * np.linalg.norm(b)
    assert np.linalg.norm(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("b", [-A, np.zeros_like(A)], ids=["antipodal", "zero"])
def test_nuslerp_degenerate_pairs_lerp(b):
    got = M.nuslerp([A, b], weight=[0.7, 0.3])
    assert_close(got, lerp(A, b, 0.3))
    rows = M.nuslerp([A, b], weight=[0.7, 0.3], nuslerp_flatten=False)
    assert_close(rows, lerp(A, b, 0.3))


def test_nuslerp_zero_weight_sum_means_halfway():
    assert_close(M.nuslerp([A, B], weight=[1.0, -1.0]), to_numpy(M.nuslerp([A, B])))


def test_multislerp_cancelling_directions():
    with pytest.raises(InvalidInput, match="cancel out"):
        M.multislerp([A, -A, A, -A])
    assert_close(M.multislerp([A, -A]), np.zeros_like(A), atol=1e-6)  # two: the linear mean


def test_karcher_zero_vectors():
    zero = np.zeros_like(A)
    assert np.array_equal(M.karcher([zero, zero]), zero)
    # a zero model has no direction: the mean direction is A's, the norm the weighted mean
    assert_close(M.karcher([A, zero]), A / 2)


@pytest.mark.parametrize("weight", [[1.0, 1.0, 1.0], [1.0, 1.0, 2.0]])
@pytest.mark.parametrize("seed", [6, 11, 15])  # inputs where rounding leaves sin theta > 1e-8
def test_karcher_skips_a_float32_model_opposite_the_mean(seed, weight):
    """A task vector opposite the others: float32 rounding of model - base leaves it a hair off
    antipodal (sin theta ~ 1e-4, not < 1e-8), where the step divides by rounding noise; it is
    skipped as the float64 reference skips it."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((8, 16)).astype(np.float32)
    delta = (rng.standard_normal((8, 16)) * 0.01).astype(np.float32)
    models = [base + delta, base - delta, base - delta]
    got = M.karcher(models, base=base, weight=weight)
    want = REF.karcher(
        [m.astype(np.float64) for m in models], base.astype(np.float64), weight=weight
    )
    assert_close(got, want, rtol=1e-4)


# --- density limits, zero task vectors, sign ties ----------------------------------------------

SPARSE = [
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]


@pytest.mark.parametrize("name", SPARSE)
def test_density_one_keeps_everything(name):
    """At density 1 the linear variants are task arithmetic, the TIES ones a plain TIES."""
    consensus = name in ("ties", "dare_ties", "breadcrumbs_ties", "della")
    extra = {"normalize": True} if consensus else {}
    got = M.get(name)([A, B], base=BASE, density=1.0, **extra)
    want = (
        M.ties([A, B], base=BASE, density=1.0)
        if consensus
        else M.task_arithmetic([A, B], base=BASE)
    )
    assert np.array_equal(got, want)


@pytest.mark.parametrize("name", [*SPARSE, "task_arithmetic", "sce", "model_stock"])
def test_all_zero_task_vectors_give_the_base(name):
    params = {"density": 0.3} if name in SPARSE else {}
    got = M.get(name)([BASE, BASE], base=BASE, **params)
    assert np.array_equal(got, BASE)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.01])
def test_density_outside_0_1(density):
    with pytest.raises(InvalidInput, match=r"'density' must be in \(0, 1\]"):
        M.ties([A], base=BASE, density=density)


def test_tiny_density_keeps_one_entry():
    out = M.ties([A], base=BASE, density=1e-9)
    assert np.count_nonzero(out - BASE) == 1


def test_sign_tie_elects_plus():
    base = np.zeros(3, np.float32)
    a = np.array([1.0, 2.0, -1.0], np.float32)
    b = np.array([-1.0, -1.0, 1.0], np.float32)
    assert M.ties([a, b], base=base).tolist() == [1.0, 2.0, 1.0]
    assert M.ties([a, b], base=base, election="count").tolist() == [1.0, 2.0, 1.0]


def test_no_agreeing_model_gives_zero_delta():
    base = np.zeros(4, np.float32)
    a = np.array([1, 0, 0, 0], np.float32)
    assert M.ties([a], base=base, density=0.25).tolist() == [1, 0, 0, 0]


def test_election_modes_differ_with_weights():
    base = np.zeros(1, np.float32)
    a, b = np.array([3.0], np.float32), np.array([-2.0], np.float32)
    # weighted: 0.2*3 - 1*2 < 0 elects -, plain sum 3 - 2 > 0 elects +, count 1 - 1 = 0 elects +
    w = [0.2, 1.0]
    assert M.ties([a, b], base=base, weight=w).tolist() == [-2.0]
    assert M.ties([a, b], base=base, weight=w, election="sum").tolist() == [3.0]
    assert M.ties([a, b], base=base, weight=w, election="count").tolist() == [3.0]


# --- properties ---------------------------------------------------------------------------------


def test_ties_keeps_exactly_top_k_and_agrees_with_the_elected_sign():
    out = M.ties([A], base=BASE, density=0.25)
    assert np.count_nonzero(out - BASE) == int(0.25 * A.size)
    merged = M.ties([A, B, C], base=BASE, density=0.5, weight=[1.0, 0.5, 2.0]) - BASE
    trimmed = [M.ties([m], base=BASE, density=0.5) - BASE for m in (A, B, C)]
    score = trimmed[0] * 1.0 + trimmed[1] * 0.5 + trimmed[2] * 2.0
    elected = np.where(score >= 0, 1.0, -1.0)
    nonzero = merged != 0
    assert np.all(np.sign(merged[nonzero]) == elected[nonzero])


def test_ties_single_model_density_one_is_task_arithmetic():
    assert np.array_equal(M.ties([A], base=BASE), M.task_arithmetic([A], base=BASE))


def test_task_arithmetic_zero_weights_give_the_base():
    assert np.array_equal(M.task_arithmetic([A, B], base=BASE, weight=[0.0, 0.0]), BASE)


def test_task_arithmetic_negative_weight_negates_a_task():
    got = M.task_arithmetic([A], base=BASE, weight=[-1.0])
    assert np.array_equal(got, BASE - (A - BASE))


def test_linear_identity_weights():
    assert np.array_equal(M.linear([A, B], weight=[1.0, 0.0]), A)
    with pytest.raises(InvalidInput, match="weights sum to 0"):
        M.linear([A, B], weight=[1.0, -1.0])


@pytest.mark.parametrize("name", ["linear", "multislerp", "karcher", "ties", "model_stock"])
def test_self_merge_is_itself(name):
    base = BASE if M.get(name).needs_base else None
    assert_close(M.get(name)([A, A, A], base=base), A)


def test_two_model_self_merges():
    assert_close(M.slerp([A, A], t=0.3), A)
    assert_close(M.nuslerp([A, A]), A)
    assert np.array_equal(M.nearswap([A, A], t=0.5), A)


@pytest.mark.parametrize(("tiny", "dtype"), [(1e-40, np.float32), (1e-310, np.float64)])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_of_copies_with_subnormal_task_vectors_is_the_model(tiny, dtype, filter_wise):
    # their squares underflow to 0 (or to a few bits) in the compute dtype, float64 included
    base = np.zeros((3, 4), dtype)
    model = (np.arange(1, 13).reshape(3, 4) * tiny).astype(dtype)
    got = M.model_stock([model, model.copy()], base=base, filter_wise=filter_wise)
    assert np.allclose(got, model, rtol=1e-5, atol=0), got


def test_model_stock_cosine_of_subnormal_task_vectors():
    # cos of (1, 1) and (1, 0) is 1/sqrt(2): t = 2c / (1 + c) = 0.8284..., tiny or not
    base = np.zeros(2, np.float32)
    for scale in (1.0, 1e-40):
        a, b = (np.array(v, np.float64) * scale for v in ([1, 1], [1, 0]))
        got = M.model_stock([a.astype(np.float32), b.astype(np.float32)], base=base)
        t = 2 * 2**-0.5 / (1 + 2**-0.5)
        want = t * (a + b) / 2
        assert np.allclose(got / scale, want / scale, rtol=1e-3), (scale, got, want)


def test_linear_is_symmetric():
    assert_close(M.linear([A, B, C], weight=[1, 2, 3]), M.linear([C, A, B], weight=[3, 1, 2]))


def test_ties_is_symmetric():
    one = M.ties([A, B, C], base=BASE, density=0.4, weight=[1, 2, 3])
    two = M.ties([C, A, B], base=BASE, density=0.4, weight=[3, 1, 2])
    assert_close(one, two)


def test_l1_rescale_preserves_l1_norm():
    for name in ("dare_linear", "della_linear"):
        out = M.get(name)([A], base=BASE, density=0.3, tensor_name="w")
        delta = (out - BASE).astype(np.float64)
        assert np.abs(delta).sum() == pytest.approx(np.abs(A - BASE).sum(), rel=1e-5)


def test_dare_keep_rate_and_inverse_density_unbiased():
    rng = np.random.default_rng(3)
    base = np.zeros(20_000, np.float32)
    x = rng.standard_normal(20_000).astype(np.float32)
    out = M.dare_linear([x], base=base, density=0.3, rescale="inverse_density", tensor_name="w")
    kept = np.count_nonzero(out)
    assert abs(kept / x.size - 0.3) < 5 * np.sqrt(0.3 * 0.7 / x.size)
    assert np.allclose(out[out != 0], x[out != 0] / np.float32(0.3))
    mean = np.mean(
        [
            M.dare_linear(
                [x[:50]],
                base=base[:50],
                density=0.3,
                rescale="inverse_density",
                seed=s,
                tensor_name="w",
            )
            for s in range(2000)
        ],
        axis=0,
    )
    assert np.allclose(mean, x[:50], atol=5 * np.abs(x[:50]).max() * np.sqrt(0.7 / 0.3 / 2000))


def test_dare_seed_and_name_matter():
    one = M.dare_ties([A, B], base=BASE, density=0.3, seed=1, tensor_name="w")
    assert np.array_equal(one, M.dare_ties([A, B], base=BASE, density=0.3, seed=1, tensor_name="w"))
    assert not np.array_equal(
        one, M.dare_ties([A, B], base=BASE, density=0.3, seed=2, tensor_name="w")
    )
    assert not np.array_equal(
        one, M.dare_ties([A, B], base=BASE, density=0.3, seed=1, tensor_name="v")
    )


def test_dare_mask_depends_on_the_flat_index_only():
    flat = M.dare_linear([A.ravel()], base=BASE.ravel(), density=0.4, tensor_name="w")
    assert np.array_equal(
        flat.reshape(A.shape), M.dare_linear([A], base=BASE, density=0.4, tensor_name="w")
    )


# --- dtypes and shapes ---------------------------------------------------------------------------


@pytest.mark.parametrize("be", [p for p in BACKENDS if p.values[0] != "mlx"])
@pytest.mark.parametrize("name", sorted(CALLS))
def test_float64_stays_float64(be, name):
    models, base, params = CALLS[name]
    models = [to_backend(be, m.astype(np.float64)) for m in models]
    base = None if base is None else to_backend(be, base.astype(np.float64))
    out = M.get(name)(models, base=base, tensor_name="w", **params)
    assert to_numpy(out).dtype == np.float64
    assert tuple(out.shape) == A.shape


@pytest.mark.parametrize("name", sorted(CALLS))
def test_zero_dim_and_one_element_tensors(name):
    models, base, params = CALLS[name]
    for index in [(0, 0), (slice(0, 1), 0)]:
        small = [m[index] for m in models]
        out = M.get(name)(small, base=None if base is None else base[index], **params)
        assert np.shape(out) == np.shape(small[0])


def test_float64_matches_reference_to_1e12():
    a, b, base = (x.astype(np.float64) for x in (A, B, BASE))
    got = M.ties([a, b], base=base, density=0.4, weight=[0.3, 0.9])
    want = REF.ties([a, b], base, density=0.4, weight=[0.3, 0.9])
    assert_close(got, want, rtol=1e-12, atol=1e-12)
    want = REF.slerp([a, b], None, t=0.3)
    assert_close(M.slerp([a, b], t=0.3), want, rtol=1e-12, atol=1e-12)


def test_sce_splits_tied_variances_the_same_in_any_model_order():
    """Two entries whose task vectors are the same values in another order have one variance;
    keeping one of them keeps the lower index, whatever the models' order (float32 sums in
    model order would round the two variances differently)."""
    x, y, z = -2.32503080368042, -0.218791663646698, -1.2459110021591187
    models = [np.array(v, np.float32) for v in ([x, y], [y, z], [z, x])]
    base = np.zeros(2, np.float32)
    for order in itertools.permutations(range(3)):
        merged = M.sce([models[i] for i in order], base=base, select_topk=0.5)
        assert (merged != 0).tolist() == [True, False], order

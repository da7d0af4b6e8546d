"""The MLX adapter against numpy: every mapped name gives numpy's answer on the same input."""

import math

import numpy as np
import pytest

mx = pytest.importorskip("mlx.core")

from mmerge import backend  # noqa: E402
from mmerge.backend import mlx_namespace as mlx_backend  # noqa: E402
from mmerge.errors import InvalidInput  # noqa: E402

xp = mlx_backend.namespace()
RNG = np.random.default_rng(0)
A = RNG.standard_normal((3, 4)).astype(np.float32)
B = RNG.standard_normal((3, 4)).astype(np.float32)


def host(x):
    return np.array(x)


def close(got, want, **kw):
    got = host(got)
    assert got.shape == np.shape(want)
    np.testing.assert_allclose(got, want, rtol=kw.get("rtol", 1e-6), atol=kw.get("atol", 1e-6))


def test_namespace_is_cached_and_routed_from_backend():
    assert mlx_backend.namespace() is xp
    assert backend.namespace(mx.array(A)) is xp
    assert xp.__array_api_version__ == "2023.12"


def test_unknown_name_raises_attribute_error():
    with pytest.raises(AttributeError, match="no 'fft_magic'"):
        _ = xp.fft_magic


def test_dtypes_and_constants():
    assert xp.bool == mx.bool_ and xp.float32 == mx.float32 and xp.int64 == mx.int64
    assert xp.bfloat16 == mx.bfloat16 and xp.float64 == mx.float64
    assert xp.inf == math.inf and math.isnan(xp.nan) and xp.pi == math.pi and xp.newaxis is None


@pytest.mark.parametrize(
    "name",
    ["abs", "exp", "sqrt", "log1p", "cos", "tanh", "floor", "trunc", "square", "negative", "round"],
)
def test_unary_elementwise_match_numpy(name):
    x = np.abs(A) if name in ("sqrt", "log1p") else A
    ref = {"negative": np.negative, "round": np.round}.get(name, getattr(np, name))
    close(getattr(xp, name)(mx.array(x)), ref(x))


@pytest.mark.parametrize(
    "name",
    ["add", "subtract", "multiply", "divide", "maximum", "minimum", "atan2", "logaddexp"],
)
def test_binary_elementwise_match_numpy(name):
    ref = {"atan2": np.arctan2}.get(name, getattr(np, name, None))
    close(getattr(xp, name)(mx.array(A), mx.array(B)), ref(A, B))


def test_inverse_trig_names():
    x = np.clip(A, -1, 1)
    close(xp.acos(mx.array(x)), np.arccos(x))
    close(xp.asin(mx.array(x)), np.arcsin(x))


def test_pow_remainder_floor_divide():
    close(xp.pow(mx.array(np.abs(A)), 1.5), np.abs(A) ** 1.5, rtol=1e-5)
    ints = np.array([-7, -3, 3, 7])
    assert host(xp.remainder(mx.array(ints), 3)).tolist() == np.remainder(ints, 3).tolist()
    assert host(xp.floor_divide(mx.array(ints), 2)).tolist() == (ints // 2).tolist()


def test_sign_propagates_nan():
    x = np.array([-2.0, 0.0, 3.0, np.nan], np.float32)
    np.testing.assert_array_equal(host(xp.sign(mx.array(x))), np.sign(x))
    assert host(xp.sign(mx.array([-3, 0, 4]))).tolist() == [-1, 0, 1]


def test_signbit_and_copysign_see_negative_zero():
    x = np.array([-0.0, 0.0, -1.5, 2.0], np.float32)
    assert host(xp.signbit(mx.array(x))).tolist() == np.signbit(x).tolist()
    got = host(xp.copysign(mx.array([1.0, 1.0, 1.0, 1.0]), mx.array(x)))
    np.testing.assert_array_equal(got, np.copysign(1.0, x))
    half = mx.array(x, dtype=mx.bfloat16)
    assert host(xp.signbit(half)).tolist() == np.signbit(x).tolist()


def test_comparisons_logical_and_predicates():
    x = np.array([1.0, np.nan, np.inf, -np.inf, 0.0], np.float32)
    m = mx.array(x)
    assert host(xp.isnan(m)).tolist() == np.isnan(x).tolist()
    assert host(xp.isinf(m)).tolist() == np.isinf(x).tolist()
    assert host(xp.isfinite(m)).tolist() == np.isfinite(x).tolist()
    assert host(xp.less(m, 0.5)).tolist() == (x < 0.5).tolist()
    both = xp.logical_and(xp.isfinite(m), xp.greater_equal(m, 0.0))
    assert host(both).tolist() == (np.isfinite(x) & (x >= 0)).tolist()
    assert host(xp.logical_not(xp.equal(m, 0.0))).tolist() == (x != 0).tolist()


def test_bitwise_ops_and_shifts():
    a = np.array([1, 6, 255, 1 << 40], np.int64)
    b = np.array([3, 5, 1, 7], np.int64)
    ma, mb = mx.array(a), mx.array(b)
    assert host(xp.bitwise_xor(ma, mb)).tolist() == (a ^ b).tolist()
    assert host(xp.bitwise_and(ma, mb)).tolist() == (a & b).tolist()
    assert host(xp.bitwise_or(ma, mb)).tolist() == (a | b).tolist()
    assert host(xp.bitwise_left_shift(ma, 3)).tolist() == (a << 3).tolist()
    assert host(xp.bitwise_right_shift(ma, 2)).tolist() == (a >> 2).tolist()
    assert host(xp.bitwise_invert(ma)).tolist() == (~a).tolist()


def test_clip_takes_standard_keywords():
    m = mx.array(A)
    close(xp.clip(m, min=-0.5, max=0.5), np.clip(A, -0.5, 0.5))
    close(xp.clip(m, max=0.1), np.minimum(A, 0.1))
    close(xp.clip(m, min=0.1), np.maximum(A, 0.1))
    assert xp.clip(m) is m


def test_sum_and_prod_dtype_keyword_and_widening():
    m = mx.array(A)
    close(xp.sum(m, axis=1), A.sum(axis=1), rtol=1e-5)
    assert xp.sum(m, dtype=xp.float64).dtype == mx.float64
    assert xp.sum(mx.array([True, True, False])).dtype == mx.int64
    assert xp.sum(mx.array(np.array([100, 100], np.int8))).item() == 200
    assert xp.sum(mx.array(np.array([3], np.uint8))).dtype == mx.uint64
    close(xp.prod(m, axis=0, keepdims=True), A.prod(axis=0, keepdims=True), rtol=1e-5)
    assert xp.prod(mx.array(np.array([100, 100], np.int16))).item() == 10000


def test_float_sums_on_the_cpu_are_numpys_pairwise_sums():
    """The same bits as numpy's sum of the same memory, over any axes, views included."""
    big = RNG.standard_normal((7, 1 << 16)).astype(np.float32)
    m = mx.array(big)
    for axis, keepdims in ((None, False), (1, False), (0, True), ((0, 1), False), (-1, True)):
        got = host(xp.sum(m, axis=axis, keepdims=keepdims))
        want = np.sum(big, axis=axis, keepdims=keepdims)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert np.array_equal(got, want)
    assert np.array_equal(host(xp.sum(m[:, ::3], axis=1)), big[:, ::3].sum(axis=1))
    wide = xp.asarray(big.astype(np.float64))
    assert xp.sum(wide).dtype == mx.float64
    assert host(xp.sum(wide)) == big.astype(np.float64).sum()


def test_statistics_match_numpy():
    m = mx.array(A)
    close(xp.mean(m, axis=0), A.mean(axis=0))
    close(xp.max(m, axis=1, keepdims=True), A.max(axis=1, keepdims=True))
    close(xp.min(m), A.min())
    close(xp.var(m, axis=1), A.var(axis=1), rtol=1e-5)
    close(xp.var(m, correction=1), A.var(ddof=1), rtol=1e-5)
    close(xp.var(m, axis=(0, 1), correction=0.5), A.var() * 12 / 11.5, rtol=1e-5)
    close(xp.std(m, axis=0, correction=1), A.std(axis=0, ddof=1), rtol=1e-5)
    assert host(xp.any(m > 2.0)).item() == bool((A > 2).any())
    assert host(xp.all(m < 10.0, axis=0)).tolist() == (A < 10).all(axis=0).tolist()


def test_cumulative_sum_and_prod():
    v = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    close(xp.cumulative_sum(mx.array(v)), np.cumsum(v))
    close(xp.cumulative_sum(mx.array(v), include_initial=True), np.r_[0.0, np.cumsum(v)])
    close(xp.cumulative_sum(mx.array(A), axis=1), np.cumsum(A, axis=1), rtol=1e-5)
    close(xp.cumulative_prod(mx.array(v), include_initial=True), np.r_[1.0, np.cumprod(v)])
    assert xp.cumulative_sum(mx.array(np.array([1, 2], np.int32))).dtype == mx.int64
    with pytest.raises(InvalidInput, match="axis"):
        xp.cumulative_sum(mx.array(A))


def test_vector_norm_is_the_flattened_norm_not_the_matrix_norm():
    m = mx.array(A)
    close(xp.linalg.vector_norm(m), np.sqrt((A.astype(np.float64) ** 2).sum()), rtol=1e-6)
    assert not np.isclose(host(mx.linalg.norm(m)), np.linalg.norm(A, 2))  # sanity of the premise
    close(xp.linalg.vector_norm(m, axis=1, keepdims=True), np.linalg.norm(A, axis=1, keepdims=True))
    for ord_ in (1, 3, 0.5, math.inf, -math.inf, 0):
        want = np.linalg.norm(A.reshape(-1), ord=ord_)
        close(xp.linalg.vector_norm(m, ord=ord_), want, rtol=1e-5)
    close(xp.linalg.vector_norm(m, axis=(0, 1)), np.linalg.norm(A.reshape(-1)))
    close(xp.linalg.vector_norm(mx.array(np.float32(-3.0))), 3.0)


def test_vecdot_broadcasts():
    v = RNG.standard_normal(4).astype(np.float32)
    close(xp.vecdot(mx.array(A), mx.array(v)), A @ v, rtol=1e-5)
    close(xp.linalg.vecdot(mx.array(A), mx.array(B), axis=0), (A * B).sum(axis=0), rtol=1e-5)
    close(xp.matmul(mx.array(A), mx.array(B.T)), A @ B.T, rtol=1e-5)
    close(xp.linalg.matrix_transpose(mx.array(A)), A.T)


def test_sort_and_argsort_descending_and_int64():
    x = np.array([3.0, 1.0, 2.0, 1.0, 3.0, 0.5], np.float32)
    m = mx.array(x)
    np.testing.assert_array_equal(host(xp.sort(m)), np.sort(x))
    np.testing.assert_array_equal(host(xp.sort(m, descending=True)), np.sort(x)[::-1])
    idx = xp.argsort(m)
    assert idx.dtype == mx.int64
    assert host(idx).tolist() == np.argsort(x, kind="stable").tolist()
    # descending and stable: equal values keep their input order
    want = np.argsort(-x, kind="stable").tolist()
    assert host(xp.argsort(m, descending=True, stable=True)).tolist() == want
    two = mx.array(A)
    got = host(xp.argsort(two, axis=0, descending=True))
    assert got.tolist() == np.argsort(-A, axis=0, kind="stable").tolist()


def test_searching_functions_return_int64():
    m = mx.array(A)
    assert xp.argmax(m).dtype == mx.int64 and xp.argmax(m).item() == int(A.argmax())
    assert host(xp.argmin(m, axis=1)).tolist() == A.argmin(axis=1).tolist()
    s = np.array([1.0, 2.0, 4.0], np.float32)
    got = xp.searchsorted(mx.array(s), mx.array([2.0, 3.0]), side="right")
    assert got.dtype == mx.int64 and host(got).tolist() == [2, 2]
    unsorted = mx.array([4.0, 1.0, 2.0])
    order = xp.argsort(unsorted)
    assert host(xp.searchsorted(unsorted, mx.array([3.0]), sorter=order)).tolist() == [2]
    rows, cols = xp.nonzero(m > 0)
    want_rows, want_cols = np.nonzero(A > 0)
    assert rows.dtype == mx.int64
    assert host(rows).tolist() == want_rows.tolist() and host(cols).tolist() == want_cols.tolist()
    with pytest.raises(InvalidInput, match="nonzero"):
        xp.nonzero(mx.array(1.0))
    assert xp.count_nonzero(m > 0).item() == int((A > 0).sum())
    close(xp.where(m > 0, m, 0.0), np.where(A > 0, A, 0.0))


def test_take_and_take_along_axis():
    m = mx.array(A)
    idx = mx.array(np.array([2, 0], np.int64))
    close(xp.take(m, idx, axis=0), A[[2, 0]])
    order = xp.argsort(m, axis=1)
    close(xp.take_along_axis(m, order, axis=1), np.sort(A, axis=1))


def test_manipulation_functions():
    m = mx.array(A)
    close(xp.reshape(m, (4, 3), copy=None), A.reshape(4, 3))
    close(xp.expand_dims(m, axis=1), A[:, None, :])
    close(xp.expand_dims(m), A[None])
    close(xp.stack((m, m), axis=1), np.stack([A, A], axis=1))
    close(xp.concat((m, m)), np.concatenate([A, A]))
    close(xp.concat([m, m], axis=None), np.concatenate([A.ravel(), A.ravel()]))
    close(xp.flip(m, axis=1), A[:, ::-1])
    close(xp.roll(m, 1, axis=1), np.roll(A, 1, axis=1))
    close(xp.roll(m, 2), np.roll(A, 2))
    close(xp.permute_dims(m, (1, 0)), A.T)
    close(xp.squeeze(xp.expand_dims(m, axis=0), axis=0), A)
    close(xp.repeat(m, 2, axis=0), np.repeat(A, 2, axis=0))
    close(xp.repeat(m, mx.array(2), axis=1), np.repeat(A, 2, axis=1))
    with pytest.raises(InvalidInput, match="repeat"):
        xp.repeat(m, mx.array([1, 2, 3]), axis=0)
    parts = xp.unstack(m, axis=1)
    assert isinstance(parts, tuple) and len(parts) == 4
    close(parts[2], A[:, 2])
    x, y = xp.broadcast_arrays(mx.array([1.0, 2.0]), mx.array([[1.0], [2.0]]))
    assert x.shape == y.shape == (2, 2)
    close(xp.broadcast_to(mx.array([1.0, 2.0]), (3, 2)), np.broadcast_to([1.0, 2.0], (3, 2)))
    close(xp.tile(mx.array([1.0, 2.0]), (2,)), np.tile([1.0, 2.0], 2))
    close(xp.moveaxis(m, 0, 1), A.T)


def test_creation_defaults_and_device_keyword():
    assert xp.arange(5).dtype == mx.int64 and host(xp.arange(5)).tolist() == list(range(5))
    assert host(xp.arange(2, 10, 3, dtype=xp.int64)).tolist() == [2, 5, 8]
    assert xp.arange(0.0, 1.0, 0.25).dtype == mx.float32
    assert xp.zeros((2, 3), device=None).dtype == mx.float32
    assert xp.empty((2,)).shape == (2,)
    assert xp.ones(3, dtype=xp.int32, device="cpu").dtype == mx.int32
    assert xp.full((2,), 7).dtype == mx.int64 and xp.full((2,), 0.5).dtype == mx.float32
    assert xp.full((2,), True).dtype == mx.bool_
    m = mx.array(A, dtype=mx.float16)
    assert xp.zeros_like(m).dtype == mx.float16 and xp.ones_like(m, dtype=xp.float32).shape == (
        3,
        4,
    )
    assert host(xp.full_like(m, 2.0)).tolist() == np.full((3, 4), 2.0).tolist()
    assert xp.empty_like(m).shape == (3, 4)
    close(xp.linspace(0.0, 1.0, 5, endpoint=False), np.linspace(0, 1, 5, endpoint=False))
    close(xp.eye(3, 4, k=1), np.eye(3, 4, k=1))
    close(xp.tril(mx.array(A), k=1), np.tril(A, k=1))
    close(xp.triu(mx.array(A)), np.triu(A))
    gx, gy = xp.meshgrid(mx.array([1.0, 2.0]), mx.array([3.0, 4.0, 5.0]), indexing="ij")
    assert gx.shape == gy.shape == (2, 3)
    assert xp.zeros(2, device=mx.cpu).shape == (2,)
    assert xp.zeros(2, device=mx.Device(mx.cpu)).shape == (2,)
    with pytest.raises(InvalidInput, match="device"):
        xp.zeros(2, device="cuda")


def test_asarray_keeps_float64_and_exact_dtypes():
    x64 = np.array([0.1, 1e-300, 1e300], np.float64)
    got = xp.asarray(x64)
    assert got.dtype == mx.float64
    np.testing.assert_array_equal(host(got), x64)
    assert xp.asarray(np.float64(0.1)).dtype == mx.float64
    assert xp.asarray(np.zeros(2, np.float16)).dtype == mx.float16
    assert xp.asarray([1.5, 2.0]).dtype == mx.float32
    assert xp.asarray([1, 2]).dtype == mx.int64
    assert xp.asarray(3).dtype == mx.int64 and xp.asarray(True).dtype == mx.bool_
    assert xp.asarray(1.0, dtype=xp.float16).dtype == mx.float16
    # a Python float with an explicit dtype is converted once, from its exact value
    assert host(xp.asarray(0.1, dtype=xp.float64)).item() == 0.1
    assert host(xp.asarray([0.1, 1e300], dtype=xp.float64)).tolist() == [0.1, 1e300]
    assert xp.asarray(x64, dtype=xp.float32).dtype == mx.float32


def test_asarray_of_mlx_arrays_and_copy():
    m = mx.array(A)
    assert xp.asarray(m) is m
    assert xp.asarray(m, copy=False) is m
    copied = xp.asarray(m, copy=True)
    copied[0, 0] = 100.0
    assert host(m)[0, 0] == A[0, 0]
    assert xp.asarray(m, dtype=xp.float16).dtype == mx.float16
    with pytest.raises(InvalidInput, match="copy=False"):
        xp.asarray(m, dtype=xp.float16, copy=False)
    with pytest.raises(InvalidInput, match="copy=False"):
        xp.asarray(A, copy=False)


def test_float64_refused_with_a_clear_error_off_the_cpu(monkeypatch):
    monkeypatch.setattr(mx, "default_device", lambda: mx.Device(mx.gpu))
    with pytest.raises(InvalidInput, match="float64 only on the CPU"):
        xp.asarray(np.zeros(2))
    with pytest.raises(InvalidInput, match="float64 only on the CPU"):
        xp.astype(mx.array(A), xp.float64)
    assert xp.asarray(np.zeros(2, np.float32)).dtype == mx.float32


def test_astype_copy_keyword():
    m = mx.array(A)
    assert xp.astype(m, xp.float32, copy=False) is m
    copied = xp.astype(m, xp.float32)
    assert copied is not m
    copied[0, 0] = 5.0
    assert host(m)[0, 0] == A[0, 0]
    bf = xp.astype(m, xp.bfloat16)
    assert bf.dtype == mx.bfloat16
    assert xp.astype(bf, xp.float32).dtype == mx.float32


def test_dtype_functions():
    assert xp.isdtype(xp.float32, "real floating") and xp.isdtype(xp.bfloat16, "real floating")
    assert xp.isdtype(xp.int8, ("bool", "integral")) and not xp.isdtype(xp.bool, "numeric")
    f = xp.finfo(xp.float32)
    assert f.eps == np.finfo(np.float32).eps and f.bits == 32
    assert f.smallest_normal == np.finfo(np.float32).smallest_normal
    assert xp.finfo(mx.array(A)).max == np.finfo(np.float32).max
    i = xp.iinfo(xp.int64)
    assert (i.bits, i.max, i.min) == (64, 2**63 - 1, -(2**63)) and i.dtype == mx.int64
    assert xp.iinfo(mx.array([1], dtype=mx.uint8)).max == 255
    assert xp.result_type(xp.float16, xp.float32) == mx.float32
    assert xp.result_type(mx.array([1], dtype=mx.int8), xp.int16) == mx.int16
    assert xp.can_cast(xp.float32, xp.float64)


def test_namespace_info():
    info = xp.__array_namespace_info__()
    assert info.capabilities()["boolean indexing"] is False
    assert info.default_device() == "cpu" and info.devices() == ["cpu"]
    assert info.default_dtypes()["integral"] == mx.int64
    assert info.default_dtypes(device="cpu")["real floating"] == mx.float32
    floats = info.dtypes(kind="real floating")
    assert set(floats) == {"float16", "bfloat16", "float32", "float64"}
    assert "bool" in info.dtypes()


def test_backend_helpers_work_on_mlx_arrays():
    m = mx.array(A, dtype=mx.bfloat16)
    assert backend.library_name(m) == "mlx" and backend.device_of(m) is None
    assert backend.compute_dtype(xp, m.dtype) == mx.float32
    assert backend.as_compute(xp, m).dtype == mx.float32
    with pytest.raises(InvalidInput, match="mixed array libraries"):
        backend.namespace(m, np.zeros(2))


@pytest.mark.parametrize(
    ("name", "ref"),
    [("sin", np.sin), ("cos", np.cos), ("exp", np.exp), ("logaddexp", np.logaddexp)],
)
def test_float64_transcendentals_are_float64_accurate(name, ref):
    x = np.random.default_rng(1).uniform(-40, 40, 2000)
    args = (x, np.ascontiguousarray(x[::-1])) if name == "logaddexp" else (x,)
    got = getattr(xp, name)(*(mx.array(a, dtype=mx.float64) for a in args))
    assert got.dtype == mx.float64
    np.testing.assert_allclose(host(got), ref(*args), rtol=4e-16, atol=0)
    low = getattr(xp, name)(*(mx.array(a.astype(np.float32)) for a in args))
    assert low.dtype == mx.float32


def test_float64_transcendentals_keep_nan_and_inf():
    x = mx.array(np.array([np.nan, np.inf, -np.inf]), dtype=mx.float64)
    np.testing.assert_array_equal(host(xp.exp(x)), np.exp(np.array([np.nan, np.inf, -np.inf])))
    assert np.isnan(host(xp.sin(x))).all()


def test_booleans_convert_as_mlx_converts_them():
    """Booleans become numbers through their uint8 bytes (faster on MLX's CPU): the same values
    and dtypes as MLX's own cast, contiguous or not."""
    mask = mx.array(A > 0)
    for view in (mask, mask.T, mask[:, ::2]):
        for dtype in (xp.float32, xp.float16, xp.int64, xp.int8, xp.uint8, xp.bool):
            got, want = xp.astype(view, dtype), mx.astype(view, dtype)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(host(got), host(want))


def test_mask_logic_is_mlx_logic():
    """logical_and / or / not of masks run on their bytes (faster on MLX's CPU): MLX's own
    answers, for contiguous, strided and broadcast masks, and for non-boolean inputs."""
    p, q = mx.array(A > 0), mx.array(B > 0)
    for x, y in ((p, q), (p.T, q.T), (p[:, ::2], q[:, 1::2]), (p, q[0])):
        for name in ("logical_and", "logical_or"):
            got, want = getattr(xp, name)(x, y), getattr(mx, name)(x, y)
            assert got.dtype == mx.bool_
            np.testing.assert_array_equal(host(got), host(want))
        assert xp.logical_not(x).dtype == mx.bool_
        np.testing.assert_array_equal(host(xp.logical_not(x)), host(mx.logical_not(x)))
    numbers = mx.array(A)
    np.testing.assert_array_equal(
        host(xp.logical_and(numbers, q)), host(mx.logical_and(numbers, q))
    )

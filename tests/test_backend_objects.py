"""Backend objects: availability, resolution, exact host round trips, bfloat16 as bits, and the
chunk data path (stored bytes widened on the device, staging buffers reused)."""

import importlib.util
import warnings

import ml_dtypes
import numpy as np
import pytest

from mmerge import backend as B
from mmerge.errors import InvalidInput
from mmerge.io.dtypes import DTYPES

LOCAL = [
    b
    for b, module in [
        ("numpy", "numpy"),
        ("torch", "torch"),
        ("mlx", "mlx.core"),
        ("array_api_strict", "array_api_strict"),
    ]
    if b == "numpy" or importlib.util.find_spec(module.split(".")[0]) is not None
]

SPECIAL = np.array([0.0, -0.0, 1e-40, -3.5, 65504.0, 1e38, np.inf, -np.inf, np.nan], np.float32)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(f"u{a.dtype.itemsize}")


def to_backend(host, name, device=None):
    return B.get(name, device).from_host(host)


def test_numpy_is_always_available_and_shares_memory():
    assert B.available("numpy") == (True, "")
    host = np.arange(4.0)
    assert to_backend(host, "numpy") is host
    assert B.to_host(host) is host


def test_unknown_backend_is_named():
    ok, reason = B.available("tensorflow")
    assert not ok and "unknown backend 'tensorflow'" in reason
    with pytest.raises(InvalidInput, match="tensorflow"):
        B.resolve("tensorflow")


def test_missing_library_says_how_to_install(monkeypatch):
    from mmerge.backend.base import Backend

    monkeypatch.setattr(Backend, "library", classmethod(lambda cls: None))
    ok, reason = B.available("torch")
    assert not ok and 'pip install "mmerge[torch]"' in reason
    with pytest.raises(InvalidInput, match=r"mmerge\[mlx\]"):
        B.resolve("mlx")


def test_numpy_refuses_a_gpu_device():
    assert B.available("numpy", "cuda") == (False, "numpy computes only on cpu")
    with pytest.raises(InvalidInput, match="not usable"):
        B.resolve("numpy", "cuda")


def test_resolve_defaults_and_spelling():
    assert B.resolve() == ("numpy", "cpu")
    assert B.resolve("NumPy") == ("numpy", "cpu")
    if "array_api_strict" in LOCAL:
        assert B.resolve("array-api-strict", "no_float64") == (
            "array_api_strict",
            "no_float64",
        )
        ok, reason = B.available("array_api_strict", "tpu")
        assert not ok and "tpu" in reason


def test_auto_picks_numpy_without_a_gpu(monkeypatch):
    real = B.available
    monkeypatch.setattr(
        B, "available", lambda b, d=None: (False, "no") if b != "numpy" else real(b, d)
    )
    assert B.resolve("auto") == ("numpy", "cpu")
    assert B.resolve("auto", "cuda:1") == ("numpy", "cpu")


def test_auto_prefers_torch_then_cupy_on_a_gpu(monkeypatch):
    monkeypatch.setattr(B, "available", lambda b, d=None: (b == "torch", ""))
    assert B.resolve("auto") == ("torch", "cuda")
    monkeypatch.setattr(B, "available", lambda b, d=None: (b in ("cupy", "numpy"), ""))
    assert B.resolve("auto", "cuda:0") == ("cupy", "cuda:0")


def test_cuda_index_parsing():
    from mmerge.backend.torch_backend import cuda_index

    assert cuda_index("cuda") == 0
    assert cuda_index("cuda:3") == 3
    assert cuda_index("cpu") is None and cuda_index("cuda:x") is None


def test_to_backend_needs_a_numpy_array():
    with pytest.raises(InvalidInput, match="numpy array, got list"):
        to_backend([1.0, 2.0], "numpy")


def test_to_host_takes_numpy_scalars_as_0d_arrays():
    back = B.to_host(np.float16(1.5))
    assert isinstance(back, np.ndarray) and back.shape == () and back.dtype == np.float16


def test_to_host_rejects_unknown_objects():
    with pytest.raises(InvalidInput, match="cannot move"):
        B.to_host(object())


SAMPLES = {
    "float32": SPECIAL,
    "float64": SPECIAL.astype(np.float64) * 1e10,
    "float16": np.array([0.0, -0.0, 6e-8, -3.5, 65504.0, np.inf, np.nan], np.float16),
    "int64": np.array([0, -1, 2**62, -(2**63)], np.int64),
    "bool": np.array([True, False, True]),
}
ROUND_TRIPS = [
    (b, d) for b in LOCAL for d in SAMPLES if not (b == "array_api_strict" and d == "float16")
]


@pytest.mark.parametrize(("backend", "dtype"), ROUND_TRIPS)
def test_round_trip_is_exact(backend, dtype):
    host = SAMPLES[dtype]
    back = B.to_host(to_backend(host, backend))
    assert isinstance(back, np.ndarray) and back.dtype == host.dtype and back.shape == host.shape
    np.testing.assert_array_equal(bits(back), bits(host))


@pytest.mark.parametrize("backend", [b for b in LOCAL if b != "array_api_strict"])
def test_bfloat16_travels_as_bits(backend):
    host = SPECIAL.astype(ml_dtypes.bfloat16)
    on = to_backend(host, backend)
    assert "bfloat16" in str(on.dtype)
    back = B.to_host(on)
    assert back.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bits(back), bits(host))


@pytest.mark.parametrize("backend", LOCAL)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_zero_d_and_empty_arrays(backend, dtype):
    for host in (np.full((), 2.5, dtype), np.zeros((0, 3), dtype)):
        on = to_backend(host, backend)
        assert tuple(on.shape) == host.shape
        back = B.to_host(on)
        assert back.shape == host.shape
        np.testing.assert_array_equal(back.astype(np.float32), host.astype(np.float32))


def test_torch_shares_memory_and_accepts_read_only_arrays():
    torch = pytest.importorskip("torch")
    host = np.arange(6, dtype=np.float32)
    t = to_backend(host, "torch")
    host[0] = 42.0
    assert t[0].item() == 42.0
    frozen = np.arange(3, dtype=np.float32)
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not writable" warning for memory-mapped inputs
        got = to_backend(frozen, "torch")
    assert got.dtype == torch.float32 and got.tolist() == [0.0, 1.0, 2.0]


def test_torch_bfloat16_and_cuda_reason():
    torch = pytest.importorskip("torch")
    t = to_backend(np.ones(2, ml_dtypes.bfloat16), "torch")
    assert t.dtype == torch.bfloat16
    if not torch.cuda.is_available():
        ok, reason = B.available("torch", "cuda:0")
        assert not ok and "no CUDA device" in reason
    ok, reason = B.available("torch", "tpu")
    assert not ok and "unknown device" in reason


def test_mlx_keeps_float64_and_names_the_gpu():
    mx = pytest.importorskip("mlx.core")
    x = to_backend(np.array([0.1]), "mlx")
    assert x.dtype == mx.float64
    ok, reason = B.available("mlx", "tpu")
    assert not ok and "unknown device" in reason
    assert B.available("mlx", "gpu")[0] == mx.is_available(mx.gpu)


def test_strict_widens_16_bit_floats_and_honours_its_devices():
    xp = pytest.importorskip("array_api_strict")
    half = to_backend(np.array([1.5], np.float16), "array_api_strict")
    assert half.dtype == xp.float32
    bf = to_backend(np.array([1.5], ml_dtypes.bfloat16), "array_api_strict")
    assert bf.dtype == xp.float32 and B.to_host(bf).tolist() == [1.5]
    on = to_backend(np.array([1.0], np.float32), "array_api_strict", "no_float64")
    assert on.device == xp.Device("no_float64")
    assert B.to_host(on).tolist() == [1.0]
    with pytest.raises(InvalidInput, match="no_float64.*float64"):
        to_backend(np.array([1.0]), "array_api_strict", "no_float64")


def test_cupy_and_jax_report_why_they_are_unavailable():
    for backend in ("cupy", "jax"):
        ok, reason = B.available(backend)
        if not ok:
            assert "install" in reason or "device" in reason


# -- the chunk data path: stored bytes -> compute dtype on the device -----------------------------

STORED = {
    "BF16": SPECIAL.astype(ml_dtypes.bfloat16),
    "F16": SPECIAL.astype(np.float16),
    "F32": SPECIAL,
    "F64": SPECIAL.astype(np.float64),
    "F8_E4M3": np.array([0.0, -0.0, 1.5, -448.0, 0.015625], ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.array([0.0, -2.0, 57344.0, np.inf, 1.5e-5], ml_dtypes.float8_e5m2),
}


@pytest.mark.parametrize("name", LOCAL)
@pytest.mark.parametrize("code", sorted(STORED))
@pytest.mark.parametrize("compute", ["float32", "float64"])
def test_from_stored_widens_exactly(name, code, compute):
    """Stored bytes as a checkpoint holds them (BF16 as uint16 bits, F8 as uint8) arrive as the
    compute dtype with exactly the stored values, on every backend."""
    on = B.get(name)
    values = STORED[code]
    raw = np.ascontiguousarray(values).view(DTYPES[code].storage)
    got = B.to_host(on.from_stored(raw, DTYPES[code], compute))
    assert got.dtype == np.dtype(compute)
    np.testing.assert_array_equal(got, values.astype(compute))


def test_numpy_widens_into_reused_staging_buffers():
    on = B.get("numpy")
    raw = np.arange(10, dtype=np.uint16)
    first = on.from_stored(raw, DTYPES["BF16"], "float32", slot=0)
    again = on.from_stored(raw[:6], DTYPES["BF16"], "float32", slot=0)
    other = on.from_stored(raw, DTYPES["BF16"], "float32", slot=1)
    assert np.shares_memory(first, again)  # one buffer per slot and thread, reused
    assert not np.shares_memory(first, other)


def test_torch_widens_on_the_device_from_the_stored_bits():
    torch = pytest.importorskip("torch")
    on = B.get("torch")
    bits = STORED["BF16"].view(np.uint16)
    t = on.from_stored(bits, DTYPES["BF16"], "float32")
    assert t.dtype == torch.float32 and t.device.type == "cpu"
    np.testing.assert_array_equal(t.numpy(), STORED["BF16"].astype(np.float32))
    assert on.chunk_elements == B.get("numpy").chunk_elements  # the CPU's cache-sized chunks


def test_gpu_backends_ask_for_large_chunks():
    from mmerge.backend.cupy_backend import CupyBackend
    from mmerge.backend.torch_backend import TorchBackend

    assert TorchBackend("cuda:0").chunk_elements > TorchBackend("cpu").chunk_elements
    assert CupyBackend("cuda").chunk_elements > TorchBackend("cpu").chunk_elements


@pytest.mark.parametrize("name", LOCAL)
def test_of_finds_the_backend_object_of_an_array(name):
    x = to_backend(np.zeros(3, np.float32), name)
    assert B.of(x).name == name
    assert B.of(x) is B.get(name)


@pytest.mark.parametrize("name", LOCAL)
def test_float_bits_and_bincount(name):
    on = B.get(name)
    host = np.array([0.0, 1.0, 2.0, 1.0, 0.5], np.float32)
    bits = B.to_host(on.float_bits(on.from_host(host)))
    np.testing.assert_array_equal(bits, host.view(np.int32))
    counts = on.bincount(on.from_host(np.array([0, 3, 3, 1], np.int32)), 5)
    assert counts.tolist() == [1, 1, 0, 2, 0]
    where = on.from_host(np.array([True, False, True, True]))
    idx = on.from_host(np.array([0, 3, 3, 1], np.int32))
    assert on.bincount(idx, 5, where=where).tolist() == [1, 1, 0, 1, 0]


@pytest.mark.parametrize("name", LOCAL)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_digits_are_the_16_bit_parts_of_the_bits(name, dtype):
    on = B.get(name)
    host = np.array([0.0, 1.0, 3.5e-30, np.finfo(dtype).max, 0.1], dtype)
    bits = on.float_bits(on.from_host(host))
    ints = host.view(np.int32 if dtype == np.float32 else np.int64).astype(np.int64)
    for shift in range(0, 8 * host.itemsize, 16):
        got = np.asarray(B.to_host(on.digits(bits, shift)), np.int64)
        np.testing.assert_array_equal(got, (ints >> shift) & 0xFFFF, err_msg=str(shift))


@pytest.mark.parametrize("name", LOCAL)
def test_compress_and_kth_largest(name):
    on = B.get(name)
    host = np.array([5, 1, 7, 7, 2, 9], np.int32)
    values, index = on.compress(on.from_host(host), on.from_host(host > 4))
    assert B.to_host(values).tolist() == [5, 7, 7, 9]
    assert B.to_host(index).tolist() == [0, 2, 3, 5]
    for k, want in [(1, (9, 0, 1)), (2, (7, 1, 2)), (3, (7, 1, 2)), (4, (5, 3, 1)), (6, (1, 5, 1))]:
        assert on.kth_largest(on.from_host(host.copy()), k) == want
    floats = np.array([0.5, 2.5, 1.0, 1.0, 0.5], np.float32)
    assert on.kth_largest(on.from_host(floats), 3) == (1.0, 1, 2)
    ties = np.repeat(np.arange(50, dtype=np.int32), 7)[::-1].copy()  # partition meets many ties
    for k in (1, 100, 175, 350):
        t = 49 - (k - 1) // 7
        assert on.kth_largest(on.from_host(ties.copy()), k) == (t, 7 * (49 - t), 7)


@pytest.mark.parametrize("name", LOCAL)
# rows of 40 and 9 are inverted at once on numpy, rows of 300 and 200 row by row (LONG_ROW)
@pytest.mark.parametrize("shape", [(3, 40), (2, 9, 4), (1, 1), (3, 300), (2, 200, 3)])
def test_ranks_are_the_stable_argsort_of_the_stable_argsort(name, shape):
    host = np.abs(np.round(np.random.default_rng(4).standard_normal(shape) * 4) / 4)
    host = host.astype(np.float32)  # a quarter grid: many ties
    on = B.get(name)
    got = B.to_host(on.ranks(on.from_host(host), axis=1))
    order = np.argsort(host, axis=1, kind="stable")
    np.testing.assert_array_equal(got, np.argsort(order, axis=1, kind="stable"))


def test_torch_namespace_converts_booleans_as_array_api_compat_does():
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as compat

    mask = torch.tensor([[True, False, True], [False, False, True]])
    xp = B.namespace(mask)
    assert xp is not compat and xp.sum is compat.sum  # everything else is array-api-compat's
    for view in (mask, mask.T, mask[:, ::2]):  # contiguous or not
        for dtype in (torch.float32, torch.float64, torch.int64, torch.uint8):
            got = xp.astype(view, dtype)
            want = compat.astype(view, dtype)
            assert got.dtype == dtype and torch.equal(got, want)
            assert got.data_ptr() != view.data_ptr()  # a new tensor, as copy=True asks
    assert torch.equal(xp.astype(torch.tensor([1.5, -2.0]), torch.int64), torch.tensor([1, -2]))


def test_torch_namespace_compares_counts_and_joins_as_torch_does():
    """Comparisons, counts and concatenations of CPU tensors run as numpy's on their memory:
    the same values and dtypes as torch's own, on every kind of tensor (torch's own where numpy
    has no view: bfloat16, tensors needing gradients)."""
    torch = pytest.importorskip("torch")
    import array_api_compat.torch as compat

    values = torch.from_numpy(SPECIAL.copy())
    xp = B.namespace(values)
    tensors = [
        values,
        values.to(torch.float64),
        values.to(torch.bfloat16),
        values.clone().requires_grad_(True),
        values[::2],
        torch.arange(-4, 5, dtype=torch.int32),
    ]
    for x in tensors:
        for name in ("greater", "greater_equal", "less", "less_equal", "equal"):
            for other in (0.0, -3.5, x.detach()):
                got, want = getattr(xp, name)(x, other), getattr(compat, name)(x, other)
                assert got.dtype == torch.bool and torch.equal(got, want), (name, x, other)
        mask = x.detach() > 0
        assert int(xp.count_nonzero(mask)) == int(compat.count_nonzero(mask))
        assert int(xp.count_nonzero(x.detach())) == int(compat.count_nonzero(x.detach()))
        pieces = [x.detach(), x.detach()[:3], x.detach()[:0]]
        joined, want = xp.concat(pieces), compat.concat(pieces)
        assert joined.dtype == want.dtype
        np.testing.assert_array_equal(bits(B.to_host(joined)), bits(B.to_host(want)))
    big = torch.tensor([16777217], dtype=torch.int32)  # torch compares it in float32 here
    for other in (16777216.5, torch.tensor([16777216.5], dtype=torch.float64)):
        assert torch.equal(xp.greater(big, other), compat.greater(big, other))
    rows = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(xp.concat([rows, rows], axis=1), torch.cat([rows, rows], dim=1))
    assert torch.equal(xp.concat([rows, rows], axis=None), torch.cat([rows.ravel()] * 2))


def test_torch_threads_share_the_cores_while_the_engine_runs(tmp_path):
    """During a streamed merge on CPU torch, torch's intra-op pool gets the cores divided
    among the engine's workers; the caller's setting comes back afterwards."""
    torch = pytest.importorskip("torch")
    import os

    on = B.get("torch", "cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(os.cpu_count() or 1)
        with on.threads(2):
            assert torch.get_num_threads() == max(1, (os.cpu_count() or 1) // 2)
        assert torch.get_num_threads() == (os.cpu_count() or 1)
        with pytest.raises(RuntimeError), on.threads(1):
            assert torch.get_num_threads() == (os.cpu_count() or 1)
            raise RuntimeError("a failing merge")
        assert torch.get_num_threads() == (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)

"""Host <-> backend transfer: availability, resolution, exact round trips, bfloat16 as bits."""

import importlib.util
import warnings

import ml_dtypes
import numpy as np
import pytest

from mmerge.backend import transfer
from mmerge.errors import InvalidInput

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


def test_numpy_is_always_available_and_shares_memory():
    assert transfer.available("numpy") == (True, "")
    host = np.arange(4.0)
    assert transfer.to_backend(host, "numpy") is host
    assert transfer.to_host(host) is host


def test_unknown_backend_is_named():
    ok, reason = transfer.available("tensorflow")
    assert not ok and "unknown backend 'tensorflow'" in reason
    with pytest.raises(InvalidInput, match="tensorflow"):
        transfer.resolve("tensorflow")


def test_missing_library_says_how_to_install(monkeypatch):
    monkeypatch.setattr(transfer, "_import", lambda backend: None)
    ok, reason = transfer.available("torch")
    assert not ok and 'pip install "mmerge[torch]"' in reason
    with pytest.raises(InvalidInput, match=r"mmerge\[mlx\]"):
        transfer.resolve("mlx")


def test_numpy_refuses_a_gpu_device():
    assert transfer.available("numpy", "cuda") == (False, "numpy computes only on cpu")
    with pytest.raises(InvalidInput, match="not usable"):
        transfer.resolve("numpy", "cuda")


def test_resolve_defaults_and_spelling():
    assert transfer.resolve() == ("numpy", "cpu")
    assert transfer.resolve("NumPy") == ("numpy", "cpu")
    if "array_api_strict" in LOCAL:
        assert transfer.resolve("array-api-strict", "no_float64") == (
            "array_api_strict",
            "no_float64",
        )
        ok, reason = transfer.available("array_api_strict", "tpu")
        assert not ok and "tpu" in reason


def test_auto_picks_numpy_without_a_gpu(monkeypatch):
    real = transfer.available
    monkeypatch.setattr(
        transfer, "available", lambda b, d=None: (False, "no") if b != "numpy" else real(b, d)
    )
    assert transfer.resolve("auto") == ("numpy", "cpu")
    assert transfer.resolve("auto", "cuda:1") == ("numpy", "cpu")


def test_auto_prefers_torch_then_cupy_on_a_gpu(monkeypatch):
    monkeypatch.setattr(transfer, "available", lambda b, d=None: (b == "torch", ""))
    assert transfer.resolve("auto") == ("torch", "cuda")
    monkeypatch.setattr(transfer, "available", lambda b, d=None: (b in ("cupy", "numpy"), ""))
    assert transfer.resolve("auto", "cuda:0") == ("cupy", "cuda:0")


def test_cuda_index_parsing():
    assert transfer._cuda_index("cuda") == 0
    assert transfer._cuda_index("cuda:3") == 3
    assert transfer._cuda_index("cpu") is None and transfer._cuda_index("cuda:x") is None


def test_to_backend_needs_a_numpy_array():
    with pytest.raises(InvalidInput, match="numpy array, got list"):
        transfer.to_backend([1.0, 2.0], "numpy")


def test_to_host_takes_numpy_scalars_as_0d_arrays():
    back = transfer.to_host(np.float16(1.5))
    assert isinstance(back, np.ndarray) and back.shape == () and back.dtype == np.float16


def test_to_host_rejects_unknown_objects():
    with pytest.raises(InvalidInput, match="cannot move"):
        transfer.to_host(object())


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
    back = transfer.to_host(transfer.to_backend(host, backend))
    assert isinstance(back, np.ndarray) and back.dtype == host.dtype and back.shape == host.shape
    np.testing.assert_array_equal(bits(back), bits(host))


@pytest.mark.parametrize("backend", [b for b in LOCAL if b != "array_api_strict"])
def test_bfloat16_travels_as_bits(backend):
    host = SPECIAL.astype(ml_dtypes.bfloat16)
    on = transfer.to_backend(host, backend)
    assert "bfloat16" in str(on.dtype)
    back = transfer.to_host(on)
    assert back.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(bits(back), bits(host))


@pytest.mark.parametrize("backend", LOCAL)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_zero_d_and_empty_arrays(backend, dtype):
    for host in (np.full((), 2.5, dtype), np.zeros((0, 3), dtype)):
        on = transfer.to_backend(host, backend)
        assert tuple(on.shape) == host.shape
        back = transfer.to_host(on)
        assert back.shape == host.shape
        np.testing.assert_array_equal(back.astype(np.float32), host.astype(np.float32))


def test_torch_shares_memory_and_accepts_read_only_arrays():
    torch = pytest.importorskip("torch")
    host = np.arange(6, dtype=np.float32)
    t = transfer.to_backend(host, "torch")
    host[0] = 42.0
    assert t[0].item() == 42.0
    frozen = np.arange(3, dtype=np.float32)
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not writable" warning for memory-mapped inputs
        got = transfer.to_backend(frozen, "torch")
    assert got.dtype == torch.float32 and got.tolist() == [0.0, 1.0, 2.0]


def test_torch_bfloat16_and_cuda_reason():
    torch = pytest.importorskip("torch")
    t = transfer.to_backend(np.ones(2, ml_dtypes.bfloat16), "torch")
    assert t.dtype == torch.bfloat16
    if not torch.cuda.is_available():
        ok, reason = transfer.available("torch", "cuda:0")
        assert not ok and "no CUDA device" in reason
    ok, reason = transfer.available("torch", "tpu")
    assert not ok and "unknown device" in reason


def test_mlx_keeps_float64_and_names_the_gpu():
    mx = pytest.importorskip("mlx.core")
    x = transfer.to_backend(np.array([0.1]), "mlx")
    assert x.dtype == mx.float64
    ok, reason = transfer.available("mlx", "tpu")
    assert not ok and "unknown device" in reason
    assert transfer.available("mlx", "gpu")[0] == mx.is_available(mx.gpu)


def test_strict_widens_16_bit_floats_and_honours_its_devices():
    xp = pytest.importorskip("array_api_strict")
    half = transfer.to_backend(np.array([1.5], np.float16), "array_api_strict")
    assert half.dtype == xp.float32
    bf = transfer.to_backend(np.array([1.5], ml_dtypes.bfloat16), "array_api_strict")
    assert bf.dtype == xp.float32 and transfer.to_host(bf).tolist() == [1.5]
    on = transfer.to_backend(np.array([1.0], np.float32), "array_api_strict", "no_float64")
    assert on.device == xp.Device("no_float64")
    assert transfer.to_host(on).tolist() == [1.0]
    with pytest.raises(InvalidInput, match="no_float64.*float64"):
        transfer.to_backend(np.array([1.0]), "array_api_strict", "no_float64")


def test_cupy_and_jax_report_why_they_are_unavailable():
    for backend in ("cupy", "jax"):
        ok, reason = transfer.available(backend)
        if not ok:
            assert "install" in reason or "device" in reason

"""Moving host (numpy) arrays onto a backend and device, and back.

The engine reads host arrays from memory-mapped checkpoints, computes on the chosen backend,
and writes host arrays; the conformance suite uses the same two moves. bfloat16 travels as
bits (no float32 detour) to backends that have it; libraries without a 16-bit float dtype
(cupy has no bfloat16, array-api-strict has neither) receive float32, the compute dtype, and
the caller rounds to the output dtype on the host.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import numpy as np

from mmerge.backend import (
    BACKENDS,
    host_bfloat16_to_float32,
    is_numpy_bfloat16,
    library_name,
)
from mmerge.errors import InvalidInput

Array = Any

_MODULE = {
    "numpy": "numpy",
    "torch": "torch",
    "cupy": "cupy",
    "mlx": "mlx.core",
    "array_api_strict": "array_api_strict",
    "jax": "jax",
}

_INSTALL = {
    "torch": 'pip install "mmerge[torch]"',
    "cupy": 'pip install "mmerge[cupy]"',
    "mlx": 'pip install "mmerge[mlx]"',
    "array_api_strict": "pip install array-api-strict",
    "jax": "pip install jax",
}

_STRICT_DEVICES = ("CPU_DEVICE", "device1", "device2", "no_float64", "no_x64")


def _import(backend: str):
    """The backend's module, or None when it is not installed or fails to import."""
    try:
        return importlib.import_module(_MODULE[backend])
    except Exception:  # a broken install (missing CUDA libraries, ...) counts as unavailable
        return None


def _cuda_index(device: str) -> int | None:
    """The device index of 'cuda' / 'cuda:N' (0 for plain 'cuda'); None for other names."""
    if device == "cuda":
        return 0
    head, _, index = device.partition(":")
    return int(index) if head == "cuda" and index.isdigit() else None


def _torch_device_ok(torch, device: str) -> tuple[bool, str]:
    if device == "cpu":
        return True, ""
    if device == "mps":
        if torch.backends.mps.is_available():
            return True, ""
        return False, "no Apple GPU (mps) available"
    index = _cuda_index(device)
    if index is None:
        return False, f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if index >= count:
        return False, f"no CUDA device {device!r} (found {count})"
    return True, ""


def _cupy_device_ok(cupy, device: str) -> tuple[bool, str]:
    index = _cuda_index(device)
    if index is None:
        return False, f"unknown device {device!r} (use cuda or cuda:N)"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no driver, no GPU
        count = 0
    if index >= count:
        return False, f"no CUDA device {device!r} (found {count})"
    return True, ""


def _mlx_device_ok(mx, device: str) -> tuple[bool, str]:
    if device == "cpu":
        return True, ""
    if device == "gpu":
        return (True, "") if mx.is_available(mx.gpu) else (False, "no MLX GPU available")
    return False, f"unknown device {device!r} (use cpu or gpu)"


def _jax_device_ok(jax, device: str) -> tuple[bool, str]:
    platform = "gpu" if device.startswith("cuda") else device
    try:
        jax.devices(platform)
    except RuntimeError:
        return False, f"no jax device {device!r}"
    return True, ""


def _default_device(backend: str) -> str:
    return "cuda" if backend == "cupy" else "cpu"


def available(backend: str, device: str | None = None) -> tuple[bool, str]:
    """Whether `backend` can compute on `device` here: (True, '') or (False, the reason)."""
    if backend not in _MODULE:
        return False, f"unknown backend {backend!r} (one of: {', '.join(BACKENDS)})"
    device = device or _default_device(backend)
    module = _import(backend)
    if module is None:
        return False, f"{backend} is not installed (install it with: {_INSTALL[backend]})"
    if backend == "numpy":
        return (True, "") if device == "cpu" else (False, "numpy computes only on cpu")
    if backend == "torch":
        return _torch_device_ok(module, device)
    if backend == "cupy":
        return _cupy_device_ok(module, device)
    if backend == "mlx":
        return _mlx_device_ok(module, device)
    if backend == "jax":
        return _jax_device_ok(module, device)
    if device == "cpu" or device in _STRICT_DEVICES:
        return True, ""
    return (
        False,
        f"unknown array_api_strict device {device!r} (cpu or {', '.join(_STRICT_DEVICES)})",
    )


def resolve(backend: str = "numpy", device: str | None = None) -> tuple[str, str]:
    """The (backend, device) to compute on; 'auto' picks a GPU when one is usable, else numpy."""
    backend = backend.strip().lower().replace("-", "_")
    if backend == "auto":
        gpu = device or "cuda"
        if _cuda_index(gpu) is not None:
            for candidate in ("torch", "cupy"):
                if available(candidate, gpu)[0]:
                    return candidate, gpu
            device = None
        backend = "numpy"
    device = device or _default_device(backend)
    ok, reason = available(backend, device)
    if not ok:
        raise InvalidInput(f"backend {backend!r} on {device!r} is not usable: {reason}")
    return backend, device


def _widen_if_bfloat16(host: np.ndarray) -> np.ndarray:
    """float32 for a bfloat16 host array (exact), the array itself otherwise."""
    return host_bfloat16_to_float32(host) if is_numpy_bfloat16(host) else host


def _to_torch(host: np.ndarray, device: str):
    import torch

    with warnings.catch_warnings():
        # memory-mapped checkpoints are read-only; methods never write into their inputs
        warnings.filterwarnings("ignore", "The given NumPy array is not writable")
        if is_numpy_bfloat16(host):
            bits = np.ascontiguousarray(host).view(np.int16).reshape(host.shape)
            x = torch.from_numpy(bits).view(torch.bfloat16)
        else:
            x = torch.from_numpy(host)
    return x if device == "cpu" else x.to(device)


def _to_cupy(host: np.ndarray, device: str):
    import cupy

    with cupy.cuda.Device(_cuda_index(device)):
        return cupy.asarray(_widen_if_bfloat16(host))


def _to_mlx(host: np.ndarray):
    import mlx.core as mx

    if is_numpy_bfloat16(host):
        bits = np.ascontiguousarray(host).view(np.uint16).reshape(host.shape)
        return mx.array(bits).view(mx.bfloat16)
    from mmerge.backend import mlx

    return mlx.asarray(host)


def _to_strict(host: np.ndarray, device: str):
    import array_api_strict as xp

    name = "CPU_DEVICE" if device == "cpu" else device
    wanted = _widen_if_bfloat16(host)
    if wanted.dtype == np.float16:
        wanted = wanted.astype(np.float32)
    where = xp.Device(name)
    if wanted.dtype.name not in xp.__array_namespace_info__().dtypes(device=where):
        raise InvalidInput(f"array_api_strict device {name!r} has no {wanted.dtype} dtype")
    return xp.asarray(wanted, device=where)


def _to_jax(host: np.ndarray, device: str):
    import jax
    import jax.numpy as jnp

    if host.dtype == np.float64 and not jax.config.jax_enable_x64:
        raise InvalidInput("jax keeps float64 only with jax_enable_x64 set (or use float32)")
    platform = "gpu" if device.startswith("cuda") else device
    index = _cuda_index(device) or 0
    return jax.device_put(jnp.asarray(host), jax.devices(platform)[index])


def to_backend(host: np.ndarray, backend: str, device: str | None = None) -> Array:
    """`host` as an array of `backend` on `device` (numpy: the same array, no copy)."""
    if not isinstance(host, np.ndarray):
        raise InvalidInput(f"to_backend takes a numpy array, got {type(host).__name__}")
    backend, device = resolve(backend, device)
    if backend == "numpy":
        return host
    if backend == "torch":
        return _to_torch(host, device)
    if backend == "cupy":
        return _to_cupy(host, device)
    if backend == "mlx":
        return _to_mlx(host)
    if backend == "jax":
        return _to_jax(host, device)
    return _to_strict(host, device)


def _bfloat16_bits_to_host(bits: np.ndarray) -> np.ndarray:
    import ml_dtypes

    return bits.view(ml_dtypes.bfloat16)


def to_host(x: Array) -> np.ndarray:
    """`x` as a numpy array on the host; backend bfloat16 comes back as ml_dtypes bfloat16."""
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, np.generic):  # numpy gives scalars for arithmetic on 0-d arrays
        return np.asarray(x)
    library = library_name(x)
    if library == "mlx":
        import mlx.core as mx

        if x.dtype == mx.bfloat16:
            return _bfloat16_bits_to_host(np.array(x.view(mx.uint16)))
        return np.array(x)
    if library == "torch":
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return _bfloat16_bits_to_host(x.view(torch.int16).numpy())
        return x.numpy()
    if library == "cupy":
        import cupy

        return cupy.asnumpy(x)
    if library == "array_api_strict":
        import array_api_strict

        return np.asarray(x.to_device(array_api_strict.Device("CPU_DEVICE")))
    if library in ("jax", "jaxlib"):
        return np.asarray(x)
    raise InvalidInput(f"cannot move a {type(x).__module__}.{type(x).__name__} to the host")

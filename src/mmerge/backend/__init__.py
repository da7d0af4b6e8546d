"""Array libraries: the one place that knows which library holds an array.

Methods call `namespace(*arrays)` and then use only standard array-API names on the result; for
what the standard lacks (the bits of a float, counting, fast selection, random bits) they ask
the array's backend object, `of(x)`. The engine asks `get(name, device)` for a backend object
(one class per library, in `*_backend.py`) to move stored bytes onto the device and results back.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mmerge.errors import InvalidInput

Array = Any  # an array of any supported library

if TYPE_CHECKING:
    from mmerge.backend.base import Backend

_CLASSES = {
    "numpy": "numpy_backend.NumpyBackend",
    "torch": "torch_backend.TorchBackend",
    "cupy": "cupy_backend.CupyBackend",
    "mlx": "mlx_backend.MlxBackend",
    "array_api_strict": "strict_backend.StrictBackend",
    "jax": "jax_backend.JaxBackend",
}
BACKENDS = tuple(_CLASSES)


def backend_class(name: str) -> type[Backend]:
    """The backend class of library `name`; InvalidInput for an unknown name."""
    if name not in _CLASSES:
        raise InvalidInput(f"unknown backend {name!r} (one of: {', '.join(BACKENDS)})")
    module, cls = _CLASSES[name].split(".")
    return getattr(importlib.import_module(f"mmerge.backend.{module}"), cls)


def available(name: str, device: str | None = None) -> tuple[bool, str]:
    """Whether backend `name` can compute on `device` here: (True, '') or (False, the reason)."""
    if name not in _CLASSES:
        return False, f"unknown backend {name!r} (one of: {', '.join(BACKENDS)})"
    return backend_class(name).available(device)


def resolve(name: str = "numpy", device: str | None = None) -> tuple[str, str]:
    """The (backend, device) to compute on; 'auto' picks a GPU when one is usable, else numpy."""
    name = name.strip().lower().replace("-", "_")
    if name == "auto":
        gpu = device or "cuda"
        if gpu.startswith("cuda"):
            for candidate in ("torch", "cupy"):
                if available(candidate, gpu)[0]:
                    return candidate, gpu
            device = None
        name = "numpy"
    device = device or (backend_class(name).default_device if name in _CLASSES else "cpu")
    ok, reason = available(name, device)
    if not ok:
        raise InvalidInput(f"backend {name!r} on {device!r} is not usable: {reason}")
    return name, device


def get(name: str = "numpy", device: str | None = None) -> Backend:
    """The backend object of library `name` on `device` (checked; one shared object each)."""
    return _instance(*resolve(name, device))


@functools.cache
def _instance(name: str, device: str) -> Backend:
    return backend_class(name)(device)


_HOLDING: dict[tuple[str, str | None], Backend] = {}  # (library, device) -> its object


def of(x: Array) -> Backend:
    """The backend object of the library and device holding `x` (looked up once per library and
    device: an array's library is usable by definition, and methods ask on every chunk)."""
    lib = library_name(x)
    if lib == "torch":
        device = x.device.type if x.device.index is None else f"{x.device.type}:{x.device.index}"
    elif lib == "cupy":
        device = f"cuda:{x.device.id}"
    elif lib == "array_api_strict":
        device = "cpu" if x.device._device == "CPU_DEVICE" else x.device._device
    else:
        device = None
    found = _HOLDING.get((lib, device))
    if found is None:
        found = _HOLDING[(lib, device)] = get(lib, device)
    return found


def to_host(x: Array) -> np.ndarray:
    """`x` (an array of any backend, or a numpy scalar) as a numpy array."""
    if isinstance(x, (np.ndarray, np.generic)):
        return np.asarray(x)
    lib = library_name(x)
    if lib not in _CLASSES:
        raise InvalidInput(f"cannot move a {type(x).__module__}.{type(x).__name__} to the host")
    return of(x).to_host(x)


def is_mlx_array(x: object) -> bool:
    """True for an `mlx.core.array`, checked without importing mlx."""
    mx = sys.modules.get("mlx.core")
    return mx is not None and isinstance(x, mx.array)


def is_numpy_bfloat16(x: object) -> bool:
    """True for numpy arrays of ml_dtypes' bfloat16, which array-API code must never see."""
    return isinstance(x, np.ndarray) and x.dtype.name == "bfloat16"


def library_name(x: object) -> str:
    """The short name of the library holding `x` ('numpy', 'torch', 'mlx', ...)."""
    if is_mlx_array(x):
        return "mlx"
    module = type(x).__module__.split(".")[0]
    return "jax" if module == "jaxlib" else module


def namespace(*arrays: Array):
    """The array-API namespace shared by `arrays`; a clear error for mixed libraries or devices."""
    present = [a for a in arrays if a is not None]
    if not present:
        raise InvalidInput("no arrays given")
    libs = sorted({library_name(a) for a in present})
    if len(libs) > 1:
        raise InvalidInput(f"mixed array libraries: {', '.join(libs)}; pass arrays of one library")
    if libs == ["mlx"]:
        from mmerge.backend import mlx_namespace

        return mlx_namespace.namespace()
    import array_api_compat

    try:
        xp = array_api_compat.array_namespace(*present)
    except TypeError as exc:
        raise InvalidInput(f"unsupported array type: {exc}") from None
    devices = {str(array_api_compat.device(a)) for a in present}
    if len(devices) > 1:
        raise InvalidInput(f"arrays on different devices: {', '.join(sorted(devices))}")
    if libs == ["torch"]:
        from mmerge.backend import torch_namespace

        return torch_namespace
    return xp


def device_of(x: Array):
    """The device of `x` (None for MLX, whose arrays live in unified memory)."""
    if is_mlx_array(x):
        return None
    import array_api_compat

    return array_api_compat.device(x)


def is_low_precision(xp, dtype) -> bool:
    """float16 and bfloat16 are computed in float32 and rounded once at the end."""
    names = {"float16", "bfloat16"}
    return any(getattr(xp, n, None) is not None and dtype == getattr(xp, n) for n in names)


def compute_dtype(xp, dtype):
    """The dtype a method computes in for inputs of `dtype`: float32 for 16-bit floats."""
    if is_low_precision(xp, dtype):
        return xp.float32
    if not xp.isdtype(dtype, "real floating"):
        raise InvalidInput(f"merge methods need floating-point tensors, got {dtype}")
    return dtype


def as_compute(xp, x: Array) -> Array:
    """`x` in its compute dtype (a new float32 array for 16-bit floats, `x` itself otherwise)."""
    target = compute_dtype(xp, x.dtype)
    return x if x.dtype == target else xp.astype(x, target)


def host_bfloat16_to_float32(x: np.ndarray) -> np.ndarray:
    """Widen an ml_dtypes bfloat16 numpy array to float32 exactly (a 16-bit shift)."""
    bits = np.ascontiguousarray(x).view(np.uint16).astype(np.uint32) << 16
    return bits.view(np.float32).reshape(x.shape)  # ascontiguousarray makes 0-d arrays 1-d


def host_float32_to_bfloat16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Round float32 to bfloat16 (nearest-even, via ml_dtypes) into `out` when given."""
    import ml_dtypes

    if out is None:
        return x.astype(ml_dtypes.bfloat16)
    np.copyto(out, x, casting="unsafe")
    return out


def same_shapes(arrays: Sequence[Array], what: str = "tensors") -> tuple[int, ...]:
    """The common shape of `arrays`, or a clear error naming the mismatch."""
    shapes = [tuple(a.shape) for a in arrays]
    if len(set(shapes)) > 1:
        listed = ", ".join(str(s) for s in shapes)
        raise InvalidInput(f"{what} have mismatched shapes: {listed}")
    return shapes[0]

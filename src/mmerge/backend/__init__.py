"""Array namespaces, devices and dtypes: the one place that knows which library holds an array.

Methods call `namespace(*arrays)` and then use only standard array-API names on the result.
The engine moves host (numpy) arrays onto a backend with `to_backend` and back with `to_host`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from mmerge.errors import InvalidInput

Array = Any  # an array of any supported library

BACKENDS = ("numpy", "torch", "cupy", "mlx", "array_api_strict", "jax")


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
    return type(x).__module__.split(".")[0]


def namespace(*arrays: Array):
    """The array-API namespace shared by `arrays`; a clear error for mixed libraries or devices."""
    present = [a for a in arrays if a is not None]
    if not present:
        raise InvalidInput("no arrays given")
    libs = sorted({library_name(a) for a in present})
    if len(libs) > 1:
        raise InvalidInput(f"mixed array libraries: {', '.join(libs)}; pass arrays of one library")
    if libs == ["mlx"]:
        from mmerge.backend import mlx

        return mlx.namespace()
    import array_api_compat

    try:
        xp = array_api_compat.array_namespace(*present)
    except TypeError as exc:
        raise InvalidInput(f"unsupported array type: {exc}") from None
    devices = {str(array_api_compat.device(a)) for a in present}
    if len(devices) > 1:
        raise InvalidInput(f"arrays on different devices: {', '.join(sorted(devices))}")
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

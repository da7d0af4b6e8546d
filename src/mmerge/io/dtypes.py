"""The safetensors dtype table: storage form on disk, value form in numpy, and float32 widening."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from mmerge.errors import InvalidInput, MmergeError


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: `storage` is how raw bytes are viewed (little-endian), `value` is
    the numpy dtype of its numbers (ml_dtypes types for BF16 and F8); `saturate` is the largest
    magnitude a format without infinity clamps to when written."""

    code: str
    storage: np.dtype
    value: np.dtype
    saturate: float | None = None

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    @property
    def needs_widening(self) -> bool:
        """True when the storage view is not the value (BF16, F8): numbers need a conversion."""
        return self.storage != self.value


def _entry(
    code: str, storage: str, value: object = None, saturate: float | None = None
) -> tuple[str, DType]:
    s = np.dtype(storage)
    return code, DType(code, s, np.dtype(value) if value is not None else s, saturate)


DTYPES: dict[str, DType] = dict(
    [
        _entry("F64", "<f8"),
        _entry("F32", "<f4"),
        _entry("F16", "<f2"),
        _entry("BF16", "<u2", ml_dtypes.bfloat16),
        _entry("F8_E4M3", "u1", ml_dtypes.float8_e4m3fn, 448.0),
        _entry("F8_E5M2", "u1", ml_dtypes.float8_e5m2),
        _entry("F8_E8M0", "u1", ml_dtypes.float8_e8m0fnu),  # power-of-two scales (ue8m0)
        _entry("I64", "<i8"),
        _entry("I32", "<i4"),
        _entry("I16", "<i2"),
        _entry("I8", "i1"),
        _entry("U64", "<u8"),
        _entry("U32", "<u4"),
        _entry("U16", "<u2"),
        _entry("U8", "u1"),
        _entry("BOOL", "?"),
    ]
)


def dtype_info(code: str) -> DType:
    """The table entry for a safetensors dtype code; InvalidInput names unknown codes."""
    try:
        return DTYPES[code]
    except (KeyError, TypeError):
        known = ", ".join(DTYPES)
        raise InvalidInput(f"unknown safetensors dtype {code!r} (known: {known})") from None


def widen_to_float32(raw: np.ndarray, dt: DType, out: np.ndarray) -> np.ndarray:
    """Convert raw storage elements of dtype `dt` to float32 into `out` (same length).

    BF16 goes through ml_dtypes' cast, which is exact (a 16-bit shift) and the fastest path
    measured; F8 likewise; every other dtype is a plain numpy cast.
    """
    src = raw.view(dt.value) if dt.needs_widening else raw
    np.copyto(out, src, casting="unsafe")
    return out


def check_fits(values: np.ndarray, dt: DType, name: str) -> None:
    """MmergeError naming tensor `name` when a finite value of `values` would become infinite
    in `dt` (float16's 65504, say): a merge result is written as it is or refused, never as inf.
    Formats that saturate (F8_E4M3) and integers are not checked."""
    if dt.saturate is not None or values.dtype.kind != "f" or dt.value.kind not in "fV":
        return
    if dt.code not in ("F16", "BF16", "F8_E5M2") or values.size == 0:
        return
    limit = float(ml_dtypes.finfo(dt.value).max)
    hi, lo = float(values.max()), float(values.min())
    if max(hi, -lo) < limit:
        return
    with np.errstate(over="ignore"):
        converted = values.astype(dt.value)
    bad = np.isinf(converted) & np.isfinite(values)
    if bad.any():
        worst = float(values[bad][np.argmax(np.abs(values[bad]))])
        raise MmergeError(
            f"tensor {name!r}: the merged value {worst:.6g} does not fit {dt.code} (largest "
            f"{limit:.6g}); choose a wider output dtype (--out-dtype float32)"
        )


def to_storage(values: np.ndarray, dt: DType, scratch: np.ndarray | None = None) -> np.ndarray:
    """`values` as contiguous storage elements of `dt`: a view when nothing needs converting,
    else converted into `scratch` (a uint8 buffer of at least the result's bytes) when given.

    An array already in the storage dtype is taken as raw bits (what `TensorRef.raw` returns),
    so BF16 and F8 tensors copy through unchanged; anything else is cast by value (float32 to
    BF16 rounds to nearest even; F8_E4M3, which has no infinity, saturates as PyTorch does).
    """
    if values.dtype == dt.storage:
        return np.ascontiguousarray(values)
    nbytes = values.size * dt.itemsize
    if scratch is None or scratch.size < nbytes:
        scratch = np.empty(nbytes, np.uint8)
    out = scratch[:nbytes].view(dt.value)
    with np.errstate(over="ignore", invalid="ignore"):  # +-inf and NaN are the IEEE answers
        if dt.saturate is not None:
            values = np.clip(values.astype(np.float32, copy=False), -dt.saturate, dt.saturate)
        np.copyto(out, values, casting="unsafe")
    return out.view(dt.storage)

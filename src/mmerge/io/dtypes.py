"""The project's one dtype table: each safetensors dtype's storage form on disk, its value form in
numpy, its name in array libraries and configs, the spellings users type, and float32 widening.

Plan, execute, the backends, analyze and the test helpers all read dtypes from here."""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from mmerge.errors import InvalidInput, MmergeError


@dataclass(frozen=True)
class DType:
    """One safetensors dtype: `storage` is how raw bytes are viewed (little-endian), `value` is
    the numpy dtype of its numbers (ml_dtypes types for BF16 and F8); `name` is the dtype's name
    in array libraries (torch.bfloat16, mx.float16, ...) and in a config's `torch_dtype`;
    `spellings` are the other names a user may type; `saturate` is the largest magnitude a format
    without infinity clamps to when written."""

    code: str
    storage: np.dtype
    value: np.dtype
    name: str
    spellings: tuple[str, ...] = ()
    saturate: float | None = None

    @property
    def is_float(self) -> bool:
        """True for the floating-point dtypes, the ones merge methods compute on."""
        return self.value.kind == "f" or self.code in _ML_FLOATS

    @property
    def itemsize(self) -> int:
        return self.storage.itemsize

    @property
    def needs_widening(self) -> bool:
        """True when the storage view is not the value (BF16, F8): numbers need a conversion."""
        return self.storage != self.value


_ML_FLOATS = ("BF16", "F8_E4M3", "F8_E5M2")  # floats whose numpy type comes from ml_dtypes


def _entry(
    code: str,
    storage: str,
    name: str,
    spellings: tuple[str, ...] = (),
    value: object = None,
    saturate: float | None = None,
) -> tuple[str, DType]:
    s = np.dtype(storage)
    v = np.dtype(value) if value is not None else s
    return code, DType(code, s, v, name, spellings, saturate)


DTYPES: dict[str, DType] = dict(
    [
        _entry("F64", "<f8", "float64", ("fp64", "double")),
        _entry("F32", "<f4", "float32", ("fp32", "float")),
        _entry("F16", "<f2", "float16", ("fp16", "half")),
        _entry("BF16", "<u2", "bfloat16", ("bf16",), ml_dtypes.bfloat16),
        _entry("F8_E4M3", "u1", "float8_e4m3fn", (), ml_dtypes.float8_e4m3fn, 448.0),
        _entry("F8_E5M2", "u1", "float8_e5m2", (), ml_dtypes.float8_e5m2),
        # power-of-two scales (ue8m0): read as scales, never merged or written as a float dtype
        _entry("F8_E8M0", "u1", "float8_e8m0fnu", (), ml_dtypes.float8_e8m0fnu),
        _entry("I64", "<i8", "int64"),
        _entry("I32", "<i4", "int32"),
        _entry("I16", "<i2", "int16"),
        _entry("I8", "i1", "int8"),
        _entry("U64", "<u8", "uint64"),
        _entry("U32", "<u4", "uint32"),
        _entry("U16", "<u2", "uint16"),
        _entry("U8", "u1", "uint8"),
        _entry("BOOL", "?", "bool"),
    ]
)
FLOAT_CODES = tuple(code for code, dt in DTYPES.items() if dt.is_float)
_BY_SPELLING = {
    spelling: code
    for code, dt in DTYPES.items()
    if dt.is_float
    for spelling in (code.lower(), dt.name, *dt.spellings)
}


def dtype_code(name: str | None) -> str | None:
    """A float dtype's safetensors code ('BF16') from a user's spelling ('bfloat16', 'bf16',
    'BF16'); None stays None. InvalidInput names spellings that are no float dtype."""
    if name is None:
        return None
    try:
        return _BY_SPELLING[name.strip().lower()]
    except (KeyError, AttributeError):
        raise InvalidInput(
            f"unknown dtype {name!r} (use bfloat16, float16, float32 or float64)"
        ) from None


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

"""How close is close enough: the comparisons spec/methods.md states, with readable failures.

`assert_identical` is for what the spec makes bit-exact (elementwise float arithmetic, integer
masks). `assert_close` is the one tolerance check of the project's tests (unit tests, spec
vectors, properties); `assert_as_specified` states the suite's tolerance with it.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from conformance.strategies import HOST_DTYPES, as_f64

UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-24, "float64": 2.0**-53}


def rtol_for(dtype: str, rtol32: float) -> float:
    """The relative tolerance for a computation in `dtype` (16-bit floats compute in float32)."""
    return rtol32 * 1e-7 if dtype == "float64" else rtol32


def _where(mask: np.ndarray, got: np.ndarray, want: np.ndarray) -> str:
    i = int(np.flatnonzero(mask.reshape(-1))[0])
    return (
        f"{int(mask.sum())} of {mask.size} entries differ; first at flat index {i}: "
        f"got {got.reshape(-1)[i]!r}, expected {want.reshape(-1)[i]!r}"
    )


def assert_identical(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    """Same shape, dtype and bits (the sign of zero included; any NaN equals any NaN)."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    g = np.ascontiguousarray(got).view(f"u{got.dtype.itemsize}")
    w = np.ascontiguousarray(want).view(f"u{want.dtype.itemsize}")
    nan = np.isnan(as_f64(got)) & np.isnan(as_f64(want))
    differ = (g != w) & ~nan
    assert not differ.any(), f"{what}: not bit-identical: {_where(differ, got, want)}"


def assert_equal_values(got: np.ndarray, want: np.ndarray, what: str = "") -> None:
    """Same shape and equal values (so -0.0 equals 0.0), NaN equal to NaN."""
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    g, w = as_f64(got), as_f64(want)
    differ = ~((g == w) | (np.isnan(g) & np.isnan(w)))
    assert not differ.any(), f"{what}: values differ: {_where(differ, g, w)}"


def assert_close(
    got: np.ndarray,
    want: np.ndarray,
    *,
    rtol: float = 1e-5,
    atol: float = 1e-6,
    scale: float | None = None,
    what: str = "",
) -> None:
    """|got - want| <= atol * scale + rtol * |want| for every entry, where `scale` is the
    magnitude errors are relative to (default max(1, max|want|)); NaN matches NaN."""
    g, w = as_f64(got), as_f64(want)
    assert g.shape == w.shape, f"{what}: shape {g.shape} != {w.shape}"
    if scale is None:
        scale = max(1.0, float(np.max(np.abs(w), initial=0.0)))
    allowed = atol * scale + rtol * np.abs(w)
    same = (g == w) | (np.isnan(g) & np.isnan(w))
    differ = ~(same | (np.abs(g - w) <= allowed))
    assert not differ.any(), f"{what}: beyond atol {atol:g} x {scale:g} + rtol {rtol:g}: " + (
        _where(differ, g, w)
    )


def assert_as_specified(
    got: np.ndarray, want: np.ndarray, dtype: str, scale: float, rtol32: float, what: str = ""
) -> None:
    """The suite's comparison: an error of `rtol * scale` (scale: the largest input magnitude,
    since cancellation makes errors relative to the operands; at least the dtype's smallest
    normal number, below which it has only absolute precision: every operation on subnormals
    rounds to a multiple of the smallest) plus two units of rounding of the output dtype at each
    expected value."""
    rtol = 2 * UNIT_ROUNDOFF[dtype]
    scale = max(scale, float(ml_dtypes.finfo(HOST_DTYPES[dtype]).smallest_normal))
    assert_close(got, want, rtol=rtol, atol=rtol_for(dtype, rtol32), scale=scale, what=what)

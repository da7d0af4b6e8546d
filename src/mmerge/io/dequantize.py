"""A quantized tensor read as the numbers it stands for: each fp8 value times the scale of its
block, computed in float32 one chunk at a time, so a merge streams it like any tensor."""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from mmerge.errors import InvalidInput
from mmerge.io.dtypes import DTYPES, to_storage
from mmerge.io.scale_layout import Layout, matrix_shape
from mmerge.io.tensor_ref import CHUNK_ELEMENTS, TensorRef

# fp8 code -> float32 value: one table lookup per element, five times faster than a cast
_DECODE = {
    code: np.arange(256, dtype=np.uint8).view(DTYPES[code].value).astype(np.float32)
    for code in ("F8_E4M3", "F8_E5M2")
}
OUT_DTYPE = "BF16"


class QuantizedRef:
    """An fp8 tensor and its scale tensor (possibly in another shard), presented as one tensor
    ref of the dequantized values: `read_float32` gives fp8 x scale exactly as float32, `dtype`
    is BF16, the dtype such a tensor is written in unless another is asked for."""

    __slots__ = ("name", "shape", "values_ref", "scale_ref", "layout", "_block", "_grid")

    def __init__(self, values: TensorRef, scale: TensorRef, layout: Layout):
        self.name = values.name
        self.shape = tuple(values.shape)
        self.values_ref = values
        self.scale_ref = scale
        self.layout = layout
        self._block = layout.block(self.shape)
        self._grid: np.ndarray | None = None

    @property
    def dtype(self) -> str:
        """BF16: the dtype of the dequantized tensor in a merge's output by default."""
        return OUT_DTYPE

    @property
    def stored_dtype(self) -> str:
        """The dtype of the stored values (F8_E4M3 or F8_E5M2)."""
        return self.values_ref.dtype

    @property
    def file(self):
        return self.values_ref.file

    @property
    def nbytes(self) -> int:
        """Bytes on disk: the fp8 values and their scales."""
        return self.values_ref.nbytes + self.scale_ref.nbytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return (
            f"QuantizedRef({self.name!r}, {self.stored_dtype} x {self.scale_ref.name!r} "
            f"({self.layout.describe()}), {self.shape})"
        )

    def grid(self) -> np.ndarray:
        """The scales as float32, one row per block row of every leading index: shape
        (leading x block rows, block columns); (1, 1) for one scale."""
        grid = self._grid
        if grid is None:
            scales = self.scale_ref.read_float32().copy()
            columns = 1 if self.layout.kind == "tensor" else self.layout.grid(self.shape)[-1]
            grid = self._grid = scales.reshape(-1, columns)
        return grid

    def read_float32(
        self, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Elements [start, stop) dequantized, as flat float32 (written into `out` when given):
        decoded and scaled chunk by chunk, dropping each chunk's file pages once read."""
        raw = self.values_ref.raw(start, stop)
        n = raw.size
        if out is None:
            out = np.empty(n, np.float32)
        elif out.dtype != np.float32 or out.shape != (n,) or not out.flags.c_contiguous:
            raise InvalidInput(
                f"{self.name}: out must be a contiguous float32 array of shape ({n},), "
                f"got {out.dtype} {out.shape}"
            )
        table = _DECODE[self.stored_dtype]
        for s in range(0, n, CHUNK_ELEMENTS):
            e = min(s + CHUNK_ELEMENTS, n)
            np.take(table, raw[s:e], out=out[s:e])
            self.values_ref.release(start + s, start + e)
        self._scale(out, start)
        return out

    def _scale(self, flat: np.ndarray, start: int) -> None:
        """Multiply `flat`, elements [start, start + len) of the tensor, by their scales."""
        grid = self.grid()
        if self.layout.kind == "tensor":
            flat *= grid[0, 0]
            return
        rows, cols = matrix_shape(self.shape)[-2:]
        b0, b1 = self._block
        per_lead = -(-rows // b0)

        def scales(first_row: int, k: int) -> np.ndarray:
            g = np.arange(first_row, first_row + k)
            return grid[(g // rows) * per_lead + (g % rows) // b0]

        stop, pos = start + flat.size, start
        while pos < stop:
            row, col = divmod(pos, cols)
            if col or stop - pos < cols:  # part of one row
                end = min(stop, pos - col + cols)
                expanded = np.repeat(scales(row, 1)[0], b1)[col : col + end - pos]
                flat[pos - start : end - start] *= expanded
            else:  # whole rows
                k = (stop - pos) // cols
                end = pos + k * cols
                _multiply_rows(flat[pos - start : end - start].reshape(k, cols), scales(row, k), b1)
            pos = end

    def raw(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements [start, stop) dequantized and rounded to BF16, as its storage bits (a new
        array): what a copy of this tensor into a BF16 output writes."""
        return to_storage(self.read_float32(start, stop), DTYPES[OUT_DTYPE])

    def values(self) -> DequantizedView:
        """All elements as a flat, lazily dequantized sequence, for code that reads them chunk
        by chunk (slices give float32 arrays)."""
        return DequantizedView(self)

    def to_numpy(self) -> np.ndarray:
        """The shaped float32 array of the dequantized values."""
        return self.read_float32().reshape(self.shape)

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Drop the pages of elements [start, stop); releasing all of them (the default) also
        drops the scales."""
        self.values_ref.release(start, stop)
        if start == 0 and stop in (None, self.numel):
            self.scale_ref.release()
            self._grid = None


def _multiply_rows(x: np.ndarray, scales: np.ndarray, b1: int) -> None:
    """x (k rows, cols) *= each row's block scales (k, block columns), b1 columns a block."""
    k, cols = x.shape
    if scales.shape[1] == 1:
        x *= scales
        return
    full = cols // b1
    if full:
        item = x.itemsize
        blocks = as_strided(x, (k, full, b1), (x.strides[0], b1 * item, item))
        blocks *= scales[:, :full, None]
    if full * b1 < cols:  # the ragged last block
        x[:, full * b1 :] *= scales[:, full : full + 1]


class DequantizedView:
    """The flat dequantized values of a QuantizedRef, read only when sliced."""

    def __init__(self, ref: QuantizedRef):
        self.ref = ref
        self.size = ref.numel
        self.shape = (ref.numel,)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key: slice) -> np.ndarray:
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise InvalidInput(f"{self.ref.name}: dequantized values are read by plain slices")
        start, stop, _ = key.indices(self.size)
        return self.ref.read_float32(start, max(start, stop))

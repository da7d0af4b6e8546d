"""fp8 output: merged float32 values quantized to F8_E4M3 with a fresh float32 scale per block
(amax / 448; a power of two at least that large for ue8m0), written beside each weight as
`X_scale_inv` (the DeepSeek / Hugging Face fine-grained fp8 layout)."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np
from numpy.lib.stride_tricks import as_strided

from mmerge.errors import InvalidInput
from mmerge.io.layout import TensorSpec
from mmerge.io.quantization import SCALE_INV

FP8_MAX = 448.0  # the largest F8_E4M3 magnitude
CODE = "F8_E4M3"
_TINY = np.finfo(np.float32).tiny


def scale_name(name: str) -> str:
    """The name of the scale tensor written beside fp8 tensor `name`."""
    return name + SCALE_INV


def scale_spec(name: str, shape: tuple[int, ...], block: tuple[int, int]) -> TensorSpec:
    """The float32 scale tensor of a 2-D fp8 tensor: one value per block, ragged edges included."""
    rows, cols = shape
    return TensorSpec(scale_name(name), "F32", (-(-rows // block[0]), -(-cols // block[1])))


def block_scales(amax: np.ndarray, ue8m0: bool) -> np.ndarray:
    """The scale of each block from its largest magnitude: amax / 448 (rounded up to a power of
    two for ue8m0), so every value fits F8_E4M3; 1 for an all-zero block."""
    scales = np.maximum(amax.astype(np.float32) / np.float32(FP8_MAX), _TINY)
    if ue8m0:
        mantissa, exponent = np.frexp(scales)
        scales = np.where(mantissa == 0.5, scales, np.ldexp(np.float32(1.0), exponent))
    return np.where(amax > 0, scales, np.float32(1.0)).astype(np.float32)


def quantize_rows(x: np.ndarray, b1: int, ue8m0: bool, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One band of whole rows (k, cols), all in one block row: the F8_E4M3 bits (k * cols uint8)
    and the band's scales (block columns,). InvalidInput names a tensor with inf or NaN."""
    k, cols = x.shape
    full = cols // b1
    amax = np.empty(-(-cols // b1), np.float32)
    magnitude = np.abs(x)
    if full:
        amax[:full] = _blocks(magnitude, b1, full).max(axis=(0, 2))
    if full < amax.size:
        amax[full] = magnitude[:, full * b1 :].max()
    if not np.isfinite(amax).all():
        raise InvalidInput(f"{name}: merged values are not finite (inf or NaN); cannot write fp8")
    scales = block_scales(amax, ue8m0)
    q = magnitude  # reuse the buffer for the quotient
    if full:
        np.divide(_blocks(x, b1, full), scales[:full, None], out=_blocks(q, b1, full))
    if full < amax.size:
        np.divide(x[:, full * b1 :], scales[full], out=q[:, full * b1 :])
    np.clip(q, -FP8_MAX, FP8_MAX, out=q)
    return q.astype(ml_dtypes.float8_e4m3fn).view(np.uint8).reshape(-1), scales


def _blocks(x: np.ndarray, b1: int, full: int) -> np.ndarray:
    """The first `full` column blocks of x (k, cols) as a (k, full, b1) view."""
    item = x.itemsize
    return as_strided(x, (x.shape[0], full, b1), (x.strides[0], b1 * item, item))


class BlockQuantizer:
    """Stands in for the writer during a merge: chunks of the fp8 tensors, in any order, are
    gathered into bands of one block row; each complete band is quantized and written with
    its row of scales and its buffer freed. Every other tensor passes straight through."""

    def __init__(
        self,
        writer,
        shapes: Mapping[str, tuple[int, int]],
        block: tuple[int, int],
        ue8m0: bool = False,
    ):
        self.writer = writer
        self.shapes = dict(shapes)
        self.block = block
        self.ue8m0 = ue8m0
        self._bands: dict[tuple[str, int], list] = {}  # (name, band) -> [buffer, filled]
        self._lock = threading.Lock()

    def pending(self) -> list[str]:
        """The writer's unfinished tensors, scale tensors stood for by their fp8 tensors."""
        left = self.writer.pending()
        scales = {scale_name(n): n for n in self.shapes}
        redo = {scales[n] for n in left if n in scales}
        return [n for n in left if n not in scales] + sorted(redo - set(left))

    def write(self, name: str, array, start: int = 0) -> None:
        """Write elements [start, start + size) of `name` (values, not stored bits)."""
        if name not in self.shapes:
            self.writer.write(name, array, start)
            return
        values = np.asarray(array).reshape(-1)
        rows, cols = self.shapes[name]
        band_size = self.block[0] * cols
        stop = start + values.size
        if start < 0 or stop > rows * cols:
            raise InvalidInput(f"{name}: writing {values.size} elements at {start} runs outside")
        for band in range(start // band_size, -(-stop // band_size)):
            lo, hi = band * band_size, min((band + 1) * band_size, rows * cols)
            a, b = max(start, lo), min(stop, hi)
            part = values[a - start : b - start]
            if (a, b) == (lo, hi):
                self._flush(name, band, part.astype(np.float32, copy=False))
                continue
            key = (name, band)
            with self._lock:
                entry = self._bands.get(key)
                if entry is None:
                    entry = self._bands[key] = [np.empty(hi - lo, np.float32), 0]
            entry[0][a - lo : b - lo] = part
            with self._lock:
                entry[1] += b - a
                done = entry[1] == hi - lo
                if done:
                    del self._bands[key]
            if done:
                self._flush(name, band, entry[0])

    def _flush(self, name: str, band: int, flat: np.ndarray) -> None:
        cols = self.shapes[name][1]
        q, scales = quantize_rows(flat.reshape(-1, cols), self.block[1], self.ue8m0, name)
        self.writer.write(name, q, band * self.block[0] * cols)
        self.writer.write(scale_name(name), scales, band * scales.size)

    def finish_tensor(self, name: str) -> None:
        """Mark `name` (and for an fp8 tensor, its scales) completely written."""
        if name in self.shapes:
            with self._lock:
                open_bands = [band for (n, band) in self._bands if n == name]
            if open_bands:
                raise InvalidInput(f"{name}: finished with block row {open_bands[0]} incomplete")
            self.writer.finish_tensor(name)
            self.writer.finish_tensor(scale_name(name))
            return
        self.writer.finish_tensor(name)


def fp8_specs(
    specs: Iterable[TensorSpec], names: Iterable[str], block: tuple[int, int]
) -> list[TensorSpec]:
    """The output's tensors with each fp8 tensor's scale tensor right after it."""
    fp8 = set(names)
    out = []
    for spec in specs:
        out.append(spec)
        if spec.name in fp8:
            out.append(scale_spec(spec.name, tuple(spec.shape), block))
    return out

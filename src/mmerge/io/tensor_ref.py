"""Lazy tensors over a read-only memory map: nothing is read until an array is asked for."""

from __future__ import annotations

import contextlib
import math
import mmap
import os
from pathlib import Path

import numpy as np

from mmerge.errors import InvalidInput
from mmerge.io.dtypes import DType, widen_to_float32
from mmerge.io.header import Entry

CHUNK_ELEMENTS = 1 << 20  # elements converted between page releases in read_float32


class MappedFile:
    """One read-only mmap of a whole safetensors file, shared by all of its tensor refs."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            self._map: mmap.mmap | None = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def __reduce__(self):
        """Pickled as its absolute path, mapped again where it is loaded (a Ray worker reads the
        same file on storage every node can see)."""
        return (MappedFile, (Path(os.path.abspath(self.path)),))

    @property
    def buffer(self) -> mmap.mmap:
        if self._map is None:
            raise InvalidInput(f"{self.path}: checkpoint is closed")
        return self._map

    def release(self, start: int, end: int) -> None:
        """Drop the process's pages over bytes [start, end), widened to whole pages."""
        if self._map is None or end <= start or not hasattr(self._map, "madvise"):
            return
        page = mmap.PAGESIZE
        lo = start - start % page
        hi = min(-(-end // page) * page, self.size)
        self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        """Unmap, unless arrays still view the map; then it is unmapped when they are freed."""
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None


class TensorRef:
    """A tensor in a checkpoint file: name, dtype code, shape and its absolute byte range."""

    __slots__ = ("name", "shape", "start", "end", "_dtype", "_file")

    def __init__(self, entry: Entry, mapped: MappedFile):
        self.name = entry.name
        self.shape = entry.shape
        self.start = entry.start
        self.end = entry.end
        self._dtype: DType = entry.dtype
        self._file = mapped

    @property
    def dtype(self) -> str:
        """The safetensors dtype code ("BF16", "F32", ...)."""
        return self._dtype.code

    @property
    def file(self) -> Path:
        return self._file.path

    @property
    def identity(self) -> tuple[str, int]:
        """What the values are read from (file and offset): equal for refs of the same bytes."""
        return str(self._file.path), self.start

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return f"TensorRef({self.name!r}, {self.dtype}, {self.shape}, {self.file.name})"

    def _span(self, start: int, stop: int | None) -> tuple[int, int]:
        n = self.numel
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise InvalidInput(f"{self.name}: element range [{start}, {stop}) outside [0, {n})")
        return start, stop

    def raw(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements [start, stop) as a flat read-only view of the file in the storage dtype
        (BF16 as uint16, F8 as uint8): zero-copy, the pages are read as they are touched."""
        start, stop = self._span(start, stop)
        return np.frombuffer(
            self._file.buffer,
            dtype=self._dtype.storage,
            count=stop - start,
            offset=self.start + start * self._dtype.itemsize,
        )

    def transfer(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, DType]:
        """Elements [start, stop) as they travel to a compute device, and their dtype: the
        stored bits (widened on the device)."""
        return self.raw(start, stop), self._dtype

    def values(self) -> np.ndarray:
        """All elements as a flat read-only view of the file in their number type (BF16 and F8
        as ml_dtypes types): zero-copy, for code that widens them chunk by chunk."""
        return self.raw().view(self._dtype.value)

    def to_numpy(self) -> np.ndarray:
        """The shaped host array in its compute form: a zero-copy read-only view for dtypes numpy
        holds natively; a new float32 array for BF16 and F8."""
        if self._dtype.needs_widening:
            return self.read_float32().reshape(self.shape)
        return self.raw().reshape(self.shape)

    def read_float32(
        self, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Elements [start, stop) as flat float32, written into `out` when given.

        Without `out`, an F32 tensor comes back as a read-only view of the file (no copy);
        every other dtype is converted chunk by chunk, dropping each chunk's file pages once
        converted, so the float32 result is the only memory a conversion holds.
        """
        raw = self.raw(start, stop)
        if out is None:
            if raw.dtype == np.float32:
                return raw
            out = np.empty(raw.size, dtype=np.float32)
        elif out.dtype != np.float32 or out.shape != (raw.size,) or not out.flags.c_contiguous:
            raise InvalidInput(
                f"{self.name}: out must be a contiguous float32 array of shape ({raw.size},), "
                f"got {out.dtype} {out.shape}"
            )
        item = self._dtype.itemsize
        first = self.start + start * item
        for s in range(0, raw.size, CHUNK_ELEMENTS):
            e = min(s + CHUNK_ELEMENTS, raw.size)
            widen_to_float32(raw[s:e], self._dtype, out[s:e])
            self._file.release(first + s * item, first + e * item)
        return out

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Drop the pages of elements [start, stop) (default: all) from the process; they stay
        in the page cache, so resident memory does not creep up over a long merge and later
        reads fault them back in."""
        start, stop = self._span(start, stop)
        item = self._dtype.itemsize
        self._file.release(self.start + start * item, self.start + stop * item)

"""The backend object: everything the engine and the methods need from one array library on one
device, with portable array-API defaults that each library's subclass replaces by its fast path.

- `from_stored(raw, dtype)`: stored bytes (BF16, F16, F8 bits as read from a checkpoint) to a
  compute-dtype array on the device, widened there; `from_host` / `to_host` move numpy arrays.
- `float_bits`, `digits`, `bincount`, `compress`, `kth_largest`: the integer view of floats,
  its 16-bit digits, counting them, gathering entries, and the k-th value with the counts
  around it, for exact selections; `ranks` for rank-based ones.
- `keep_mask`: the counter-based random bits of `backend.rng`.
- `settle`: a measurement computed in the thread that made it (lazy libraries); `all_finite`;
  `threads`: the library's own thread pool sized beside the engine's.
- `chunk_elements`: how many entries per input a chunk should hold on this device, and
  `tile_elements`: how many a method should work on at once within it (None: the whole chunk).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
from collections.abc import Iterator
from typing import Any, ClassVar

import numpy as np

from mmerge.backend import rng
from mmerge.errors import InvalidInput
from mmerge.io.dtypes import DType, widen_to_float32

Array = Any


class Backend:
    """One array library on one device. Subclasses set the class attributes and replace the
    portable methods where the library has something faster or more direct."""

    name: ClassVar[str]
    module: ClassVar[str]  # what to import
    install: ClassVar[str] = ""  # how to install it, for the error message
    default_device: ClassVar[str] = "cpu"
    chunk_elements: int = 1 << 19  # 2 MiB of float32 per input: few reads, few calls
    tile_elements: int | None = None

    def __init__(self, device: str | None = None) -> None:
        self.device = device or self.default_device
        self._local = threading.local()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.device!r})"

    def __reduce__(self):
        """Pickled as library name and device: the process it is loaded in uses its own."""
        return (_shared, (self.name, self.device))

    # -- availability ---------------------------------------------------------------------------

    @classmethod
    def library(cls):
        """The library's module, or None when it is not installed or fails to import."""
        try:
            return importlib.import_module(cls.module)
        except Exception:  # a broken install (missing CUDA libraries, ...) counts as unavailable
            return None

    @classmethod
    def available(cls, device: str | None = None) -> tuple[bool, str]:
        """Whether this library can compute on `device` here: (True, '') or (False, why not)."""
        lib = cls.library()
        if lib is None:
            return False, f"{cls.name} is not installed (install it with: {cls.install})"
        reason = cls.device_problem(lib, device or cls.default_device)
        return (not reason), reason

    @classmethod
    def device_problem(cls, lib, device: str) -> str:
        """Why `device` cannot be used ('' when it can)."""
        return "" if device == "cpu" else f"{cls.name} computes only on cpu"

    # -- moving arrays --------------------------------------------------------------------------

    @functools.cached_property
    def xp(self):
        """The array-API namespace of this library's arrays."""
        from mmerge.backend import namespace

        return namespace(self.from_host(np.zeros(1, np.float32)))

    def from_host(self, host: np.ndarray) -> Array:
        """`host` as an array of this library on the device, dtype kept where it exists."""
        raise NotImplementedError

    def to_host(self, x: Array) -> np.ndarray:
        """`x` as a numpy array; bfloat16 comes back as ml_dtypes bfloat16."""
        return np.asarray(x)

    def from_stored(
        self, raw: np.ndarray, dtype: DType, compute: str = "float32", slot: int = 0
    ) -> Array:
        """Stored elements `raw` (a flat array in `dtype.storage`, as `TensorRef.raw` gives)
        as a flat `compute`-dtype array on the device, using this thread's buffer `slot` (one
        per input of a chunk). Portable form: widen on the host."""
        return self.from_host(self.widen(raw, dtype, compute, slot))

    def widen(self, raw: np.ndarray, dtype: DType, compute: str, slot: int) -> np.ndarray:
        """`raw` widened on the host into this thread's reusable buffer number `slot`."""
        out = self.staging(slot, raw.size, np.dtype(compute))
        if compute == "float32":
            return widen_to_float32(raw, dtype, out)
        values = raw.view(dtype.value) if dtype.needs_widening else raw
        np.copyto(out, values, casting="unsafe")
        return out

    def staging(self, slot: int, n: int, dtype: np.dtype) -> np.ndarray:
        """A host buffer of `n` elements owned by this thread, reused from chunk to chunk (the
        engine's memory then stays flat, and no page is faulted in twice)."""
        buffers = getattr(self._local, "buffers", None)
        if buffers is None:
            buffers = self._local.buffers = {}
        buf = buffers.get((slot, dtype))
        if buf is None or buf.size < n:
            buf = buffers[(slot, dtype)] = self.new_staging(max(n, self.chunk_elements), dtype)
        return buf[:n]

    def new_staging(self, n: int, dtype: np.dtype) -> np.ndarray:
        """A fresh host buffer for `staging` (pinned memory where the device wants it)."""
        return np.empty(n, dtype)

    def all_finite(self, x: Array) -> bool:
        """Whether every entry of the float array `x` is finite. A NaN or infinity makes the
        sum non-finite, so a finite sum settles it at once (torch and MLX test entries many
        times more slowly than they add them); an overflowing sum is checked entry by entry."""
        xp = self.xp
        with np.errstate(over="ignore"):  # an overflowing sum is expected, not worth a warning
            return bool(xp.isfinite(xp.sum(x))) or bool(xp.all(xp.isfinite(x)))

    @contextlib.contextmanager
    def threads(self, workers: int) -> Iterator[None]:
        """While `workers` engine threads compute: a library with its own thread pool shares
        the cores among them rather than each taking all. Nothing to do by default."""
        yield

    def settle(self, value: Any) -> Any:
        """`value` (a measurement: arrays in tuples, lists and dicts) computed now, in this
        thread, so another thread may combine or reuse it. Eager libraries have nothing to do."""
        return value

    # -- selection and counting -----------------------------------------------------------------

    def float_bits(self, x: Array) -> Array:
        """The bit patterns of float32/float64 `x` as int32/int64: for non-negative floats they
        order exactly as the values do. Portable form: through the host."""
        host = self.to_host(x)
        return self.from_host(host.view(np.int32 if host.itemsize == 4 else np.int64))

    def digits(self, bits: Array, shift: int) -> Array:
        """Bits shift .. shift+15 (shift a multiple of 16) of the non-negative integers `bits`,
        as integers 0 .. 65535, for `bincount`."""
        return (bits >> shift) & 0xFFFF

    def bincount(self, x: Array, length: int, where: Array | None = None) -> np.ndarray:
        """Counts (int64, on the host) of each value 0 .. length-1 in the integer array `x`
        (only where `where` is True, when given)."""
        values = np.asarray(self.to_host(x), np.int64).reshape(-1)
        if where is not None:
            values = values[np.asarray(self.to_host(where)).reshape(-1)]
        return np.bincount(values, minlength=length)

    def compress(self, x: Array, where: Array) -> tuple[Array, Array]:
        """The entries of the flat `x` where `where` is True, and their indices (int64): a
        shape that depends on the data, which the standard leaves optional. Portable form:
        on the host."""
        index = np.flatnonzero(self.to_host(where))
        return self.from_host(self.to_host(x)[index]), self.from_host(index)

    def kth_largest(self, a: Array, k: int) -> tuple[int | float, int, int]:
        """The k-th largest value t (1 <= k <= n) of the flat array `a` (integers or floats),
        as a Python number, with how many entries lie above t and how many equal it. `a` is
        scratch: it may be reordered."""
        xp = self.xp
        value = xp.sort(a)[a.shape[0] - k]
        above = int(xp.count_nonzero(a > value))
        equal = int(xp.count_nonzero(a == value))
        number = int(value) if xp.isdtype(value.dtype, "integral") else float(value)
        return number, above, equal

    def ranks(self, a: Array, axis: int) -> Array:
        """The ascending rank (0 .. n-1, int64) of each entry of the non-negative float array
        `a` among the n entries along `axis`, equal values ranked by position. Portable form:
        a stable argsort of the stable argsort."""
        xp = self.xp
        return xp.argsort(xp.argsort(a, axis=axis, stable=True), axis=axis, stable=True)

    # -- random bits ----------------------------------------------------------------------------

    def keep_mask(self, n: int, threshold, keys: tuple[int, int], start: int = 0) -> Array:
        """The boolean keep mask of flat indices start .. start+n-1 (see `backend.rng`)."""
        return rng.keep_mask(self.xp, n, threshold, keys, start, self.array_device())

    def array_device(self):
        """The device argument this library's array constructors take (None: none)."""
        return None


def partitioned_kth(xp, a: Array, k: int) -> tuple[int | float, int, int]:
    """`Backend.kth_largest` of `a` partitioned at n - k: the entries after it are >= it and
    those before <= it, so the counts take one comparison per entry, not two."""
    n = a.shape[0]
    t = a[n - k]
    above = int(xp.count_nonzero(a[n - k + 1 :] > t))
    below = int(xp.count_nonzero(a[: n - k] < t))
    return t.item(), above, n - above - below


def check_host(host: Any) -> np.ndarray:
    """`host` itself when it is a numpy array; a clear error otherwise."""
    if not isinstance(host, np.ndarray):
        raise InvalidInput(f"expected a numpy array, got {type(host).__name__}")
    return host


def _shared(name: str, device: str) -> Backend:
    """The backend object of `name` on `device` in this process (for unpickling)."""
    from mmerge.backend import get

    return get(name, device)

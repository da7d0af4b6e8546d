"""A base checkpoint seen through LoRA adapters: every tensor an adapter changes becomes an
adapted tensor ref, which computes W + sum_i w_i (T_i(W) - W) for the rows it is asked for.

T_i is adapter i's weight for that tensor: W + s_i B_i A_i for LoRA (rows of the product only),
DoRA's magnitude / norm times that (row norms from the same block; column norms, for embeddings
and fan_in_fan_out layers, from one pass over the rows on first use), W + s_i b_i for a lora_B
bias, or the adapter's whole tensor (modules_to_save). Plain LoRA terms are summed in one product
of stacked factors; everything is float32 and rounded once, to the output dtype, by the writer.
The refs read and release like checkpoint tensor refs, so the engine streams them unchanged: they
compute on a backend object and send the engine their adapted float32 values.
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmerge.errors import InvalidInput
from mmerge.io.adapter import Adapter, TensorChange, bind
from mmerge.io.dtypes import DTYPES, DType, dtype_info, to_storage
from mmerge.methods import lora as math_lora

if TYPE_CHECKING:
    from mmerge.backend.base import Backend

GRID_ELEMENTS = 1 << 17  # elements per row block of the fixed grid every read is computed on
RECENT_BLOCKS = 4  # grid blocks kept for the next chunk, which often starts inside the last one


def _rows_and_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor as a matrix of rows: (shape[0], the rest) for 2-D and up, one row otherwise."""
    n = math.prod(shape)
    if len(shape) >= 2 and shape[0] > 0:
        return shape[0], n // shape[0]
    return 1, n


@dataclass
class _Term:
    """One adapter's change to this tensor, on the backend."""

    weight: float
    full: Any = None  # TensorRef replacing W for this adapter
    left: Any = None  # (rows, r), scale folded in
    right: Any = None  # (r, cols)
    vector: Any = None  # lora_B bias times scale
    magnitude: Any = None  # DoRA
    column_norms: Any = None  # DoRA over columns (embeddings, fan_in_fan_out), after a pass


class _Prepared:
    """The arrays a read needs, loaded on first use and dropped by `release`."""

    def __init__(self, plain_left: Any, plain_right: Any, terms: list[_Term], direct: bool):
        self.plain_left = plain_left
        self.plain_right = plain_right
        self.terms = terms
        self.direct = direct  # one term of weight 1 and nothing else: the result is T itself


class AdaptedTensorRef:
    """A base tensor with adapters applied on read, computed on the backend object `on`; name,
    dtype and shape are the base's."""

    def __init__(self, base_ref, changes: Sequence[tuple[float, TensorChange]], on: Backend):
        self.base = base_ref
        self.name = base_ref.name
        self.shape = tuple(base_ref.shape)
        self.changes = list(changes)
        self.on = on
        self._rows, self._cols = _rows_and_cols(self.shape)
        self._grid = max(1, GRID_ELEMENTS // max(self._cols, 1))
        self._recent: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self._prepared: _Prepared | None = None
        self._column_norms: dict[int, Any] = {}

    def __getstate__(self) -> dict:
        """Picklable state: the lock and the caches of loaded factors stay behind."""
        state = dict(self.__dict__)
        for key in ("_lock", "_recent", "_prepared", "_column_norms"):
            del state[key]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._recent = OrderedDict()
        self._lock = threading.Lock()
        self._prepared = None
        self._column_norms = {}

    # -- what the engine reads ----------------------------------------------------------------

    @property
    def dtype(self) -> str:
        return self.base.dtype

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def file(self) -> Path:
        return self.base.file

    @property
    def identity(self) -> tuple:
        """What the values are computed from: the base tensor, and each adapter's weight and
        stored tensors (equal for two refs only when they compute the same values)."""
        changes = tuple(
            (w, *(ref.identity for ref in _refs_of(change))) for w, change in self.changes
        )
        return (self.base.identity, changes)

    def __repr__(self) -> str:
        return f"AdaptedTensorRef({self.name!r}, {self.dtype}, {self.shape}, {len(self.changes)})"

    def read_float32(
        self, start: int = 0, stop: int | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """Elements [start, stop) of the adapted tensor as flat float32 (into `out` when given).

        Values are computed on a fixed grid of whole-row blocks, each always as one product of
        the same shape, so an element has the same bits however the tensor is chunked.
        """
        n = self.numel
        stop = n if stop is None else stop
        if not 0 <= start <= stop <= n:
            raise InvalidInput(f"{self.name}: element range [{start}, {stop}) outside [0, {n})")
        if out is None:
            out = np.empty(stop - start, np.float32)
        elif out.dtype != np.float32 or out.shape != (stop - start,):
            raise InvalidInput(f"{self.name}: out must be float32 of shape ({stop - start},)")
        if stop == start:
            return out
        prepared = self._prepare()
        span = self._grid * self._cols
        for g in range(start // span, -(-stop // span)):
            block = self._grid_block(prepared, g)
            lo, hi = max(start, g * span), min(stop, g * span + block.size)
            out[lo - start : hi - start] = block[lo - g * span : hi - g * span]
        return out

    def _grid_block(self, prepared: _Prepared, g: int) -> np.ndarray:
        """Grid block g (rows g * grid ...) as flat host float32, from the recent ones if there."""
        with self._lock:
            block = self._recent.get(g)
        if block is not None:
            return block
        r0 = g * self._grid
        r1 = min(self._rows, r0 + self._grid)
        block = self.on.to_host(self._block(prepared, r0, r1)).reshape(-1)
        with self._lock:
            self._recent[g] = block
            while len(self._recent) > RECENT_BLOCKS:
                self._recent.popitem(last=False)
        return block

    def transfer(self, start: int = 0, stop: int | None = None) -> tuple[np.ndarray, DType]:
        """Elements [start, stop) as they travel to a compute device, and their dtype: the
        adapted float32 values (never the base's stored bits, nor a rounding of the result)."""
        return self.read_float32(start, stop), DTYPES["F32"]

    def raw(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Elements [start, stop) rounded once to the base's dtype, as its storage elements."""
        return to_storage(self.read_float32(start, stop), dtype_info(self.dtype))

    def values(self) -> np.ndarray:
        """All elements in the base's number type (flat)."""
        dt = dtype_info(self.dtype)
        return self.raw().view(dt.value)

    def to_numpy(self) -> np.ndarray:
        """The shaped adapted tensor: float32 for BF16/F8 bases, the base's dtype otherwise."""
        dt = dtype_info(self.dtype)
        if dt.needs_widening:
            return self.read_float32().reshape(self.shape)
        return self.values().reshape(self.shape)

    def release(self, start: int = 0, stop: int | None = None) -> None:
        """Drop the loaded factors and the pages of every file this tensor was read from (a
        later read loads them again)."""
        with self._lock:
            self._prepared = None
            self._recent.clear()
        self.base.release()
        for _, change in self.changes:
            for ref in _refs_of(change):
                ref.release()

    # -- computing ----------------------------------------------------------------------------

    def _prepare(self) -> _Prepared:
        single_threaded_blas()
        with self._lock:
            if self._prepared is None:
                self._prepared = self._load()
            return self._prepared

    def _load(self) -> _Prepared:
        plain_left, plain_right, terms = [], [], []
        for k, (weight, change) in enumerate(self.changes):
            lora, bias_of = change.lora, change.bias_of
            dora = lora is not None and lora.magnitude is not None
            if lora is not None and change.full is None and not dora:
                left, right = lora.factors()
                plain_left.append(left * np.float32(weight * lora.scale))
                plain_right.append(right)
                continue
            term = _Term(weight=weight, full=change.full.ref if change.full else None)
            if lora is not None:
                left, right = lora.factors()
                term.left = self.on.from_host(left * np.float32(lora.scale))
                term.right = self.on.from_host(right)
                if dora:
                    magnitude = lora.magnitude.read_float32()
                    term.magnitude = self.on.from_host(magnitude)
            if bias_of is not None:
                vector = bias_of.bias.read_float32() * np.float32(bias_of.scale)
                if change.full is None and lora is None:  # a bias is one row: 1 x (w s b)
                    plain_left.append(np.ones((1, 1), np.float32))
                    plain_right.append((vector * np.float32(weight)).reshape(1, -1))
                    continue
                term.vector = self.on.from_host(vector.reshape(1, -1))
            terms.append((k, term))
        left = right = None
        if plain_left:
            left = self.on.from_host(np.concatenate(plain_left, 1))
            right = self.on.from_host(np.concatenate(plain_right, 0))
        only = [t for _, t in terms]
        direct = left is None and len(only) == 1 and only[0].weight == 1.0
        for k, term in terms:
            if term.magnitude is not None and self.changes[k][1].lora.stored_transposed:
                term.column_norms = self._column_norm_pass(k, term)
        return _Prepared(left, right, only, direct)

    def _column_norm_pass(self, k: int, term: _Term):
        """L2 norm of each column of T = (replacement or W) + delta over all rows, summed in
        float64 on the host block by block (DoRA over the output units of an embedding or a
        fan_in_fan_out layer, whose units are the stored columns)."""
        if k in self._column_norms:
            return self._column_norms[k]
        xp = self.on.xp
        total = np.zeros(self._cols, np.float64)
        for r0 in range(0, self._rows, self._grid):
            r1 = min(self._rows, r0 + self._grid)
            adapted = self._adapted_term(xp, term, self._base_rows(r0, r1), r0, r1)
            total += self.on.to_host(math_lora.column_sumsq(xp, adapted)).astype(np.float64)
        norms = self.on.from_host(np.sqrt(total).astype(np.float32))
        self._column_norms[k] = norms
        return norms

    def _base_rows(self, r0: int, r1: int):
        cols = self._cols
        host = self.base.read_float32(r0 * cols, r1 * cols).reshape(r1 - r0, cols)
        return self.on.from_host(host)

    def _adapted_term(self, xp, term: _Term, w_rows, r0: int, r1: int):
        """T's rows [r0, r1) before DoRA's rescaling: the replacement (or W) plus the delta."""
        cols = self._cols
        if term.full is not None:
            host = term.full.read_float32(r0 * cols, r1 * cols).reshape(r1 - r0, cols)
            rows = self.on.from_host(host)
        else:
            rows = w_rows
        if term.left is not None:
            rows = rows + math_lora.delta_rows(xp, term.left[r0:r1, :], term.right)
        if term.vector is not None:
            rows = rows + term.vector
        return rows

    def _block(self, prepared: _Prepared, r0: int, r1: int):
        """Rows [r0, r1) of the adapted tensor as a (r1 - r0, cols) float32 backend array."""
        w = self._base_rows(r0, r1)
        xp = self.on.xp
        result = w
        if prepared.plain_left is not None:
            result = math_lora.delta_rows(xp, prepared.plain_left[r0:r1, :], prepared.plain_right)
            result += w  # into the fresh product (libraries without in-place ops rebind)
        for term in prepared.terms:
            adapted = self._adapted_term(xp, term, w, r0, r1)
            if term.magnitude is not None:
                if term.column_norms is not None:
                    adapted = math_lora.dora_rescale(
                        xp, adapted, term.magnitude, term.column_norms, axis=0
                    )
                else:
                    norms = math_lora.row_norms(xp, adapted)
                    magnitude = term.magnitude[r0:r1]
                    adapted = math_lora.dora_rescale(xp, adapted, magnitude, norms, axis=1)
            if prepared.direct:
                return adapted
            result = result + (adapted - w) * term.weight
        return result


@functools.cache
def single_threaded_blas() -> None:
    """One BLAS thread for this process, once: the engine's workers are the parallelism, and
    the thin products of a LoRA delta (a few rows times rank r) run several times slower on
    more BLAS threads than on one (measured: 1.7 against 0.1 G elements/s on 2 cores)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def _refs_of(change: TensorChange) -> Iterator:
    if change.full is not None:
        yield change.full.ref
    for module in (change.lora, change.bias_of):
        if module is not None:
            yield module.a
            yield module.b
            for ref in (module.bias, module.magnitude):
                if ref is not None:
                    yield ref


class AdaptedCheckpoint(Mapping):
    """A base checkpoint with adapters applied on read: tensor name -> ref (adapted refs for the
    tensors an adapter changes, the base's own refs for the others)."""

    def __init__(
        self,
        base,
        adapters: Sequence[Adapter],
        weights: Sequence[float] | None = None,
        *,
        backend: str = "numpy",
        device: str | None = None,
        owns_base: bool = False,
    ):
        from mmerge import backend as backends

        on = backends.get(backend, device)
        weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
        if not adapters:
            raise InvalidInput("no adapters given")
        if len(weights) != len(adapters):
            raise InvalidInput(f"{len(weights)} weights for {len(adapters)} adapters")
        for w in weights:
            if not math.isfinite(w):
                raise InvalidInput(f"adapter weight {w} is not a finite number")
        self.base = base
        self.adapters = list(adapters)
        self.weights = weights
        self.path = base.path
        self.files = list(base.files) + [a.checkpoint.path for a in adapters]
        self.is_folder = base.is_folder
        self.metadata = dict(base.metadata)
        self.label = "+".join([str(base.path), *(str(a.path) for a in adapters)])
        self._owns_base = owns_base
        per_tensor: dict[str, list[tuple[float, TensorChange]]] = {}
        for adapter, w in zip(self.adapters, weights):
            for name, change in bind(adapter, base).items():
                per_tensor.setdefault(name, []).append((w, change))
        self.changed = list(per_tensor)
        self._refs = {
            name: (AdaptedTensorRef(ref, per_tensor[name], on) if name in per_tensor else ref)
            for name, ref in base.items()
        }

    def __getitem__(self, name: str):
        return self._refs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"AdaptedCheckpoint({self.label!r}, {len(self.changed)} adapted tensors)"

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    @property
    def quantization(self):
        """The base's fp8 scheme, if any (its adapted tensors are read as dequantized values)."""
        return getattr(self.base, "quantization", None)

    def header_digest(self) -> str:
        """sha256 over the base's and each adapter's header digests and the weights."""
        h = hashlib.sha256(self.base.header_digest().encode())
        for adapter, w in zip(self.adapters, self.weights):
            h.update(b"\0" + adapter.header_digest().encode() + repr(w).encode())
            h.update(adapter.path.joinpath("adapter_config.json").read_bytes())
        return h.hexdigest()

    def close(self) -> None:
        for adapter in self.adapters:
            adapter.close()
        if self._owns_base:
            self.base.close()

    def __enter__(self) -> AdaptedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

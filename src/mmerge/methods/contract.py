"""The streaming contract between a merge method and whatever runs it.

A method computes one output tensor from chunks of its inputs: runs of flat entries, one array
per model (and the base), in the compute dtype, on one backend. It is written once, as

- `passes(job)`: the statistics it needs from whole tensors, as `Pass`es yielded in order (a
  later pass may read what earlier ones found in `job.stats`);
- `apply(job, chunk)`: the merged entries of one chunk, given those statistics;
- `check(name, params)` (optional): parameters each in bounds but invalid together, refused
  when they are resolved, that is when a plan is built, so a dry run refuses what a run would
  and no method body raises about its parameters after the output is reserved.

A pass measures every chunk, the measurements are combined exactly (counts add; float sums are
kept per fixed block and added with `math.fsum`, so no chunking changes a bit), and `finish`
turns the total into `job.stats[pass.name]`. Its scope is the tensor, or the whole model: every
tensor whose pass has the same `population` key contributes to one total, stored in each.

The engine runs passes and applies over the chunks of a checkpoint with bounded memory; a
library call on whole arrays runs the same code on one chunk (`run_whole`), so a chunked merge
equals an in-memory one. Chunks hold whole blocks (`Job.block` entries), so blocks, and any
per-row work within a granule, never straddle two chunks. A tensor's passes and its apply see
the same chunks, so a pass may hand the apply what it found per chunk (keyed by `Chunk.start`)
where `Job.holds` allows it.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mmerge.methods.registry import MethodSpec

Array = Any
BLOCK = 1 << 16  # entries per block of the exact sums (rounded to whole granules)


def add(a: Any, b: Any) -> Any:
    """The default combination of two measurements: elementwise over tuples, lists and dicts,
    None for what was not measured, `+` otherwise (exact for integers, integer arrays and
    `Blocks`)."""
    if a is None or b is None:
        return a if b is None else b
    if isinstance(a, dict):
        return {k: add(a[k], b[k]) for k in a}
    if isinstance(a, (tuple, list)):
        return type(a)(add(x, y) for x, y in zip(a, b))
    return a + b


def _total(job: Job, value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Pass:
    """One sweep computing a statistic: `measure(job, chunk)` on each chunk, folded with `combine`
    (in chunk order, then plan order across tensors), then `job.stats[name] = finish(job, total)`.

    `population` None: the tensor's own chunks. Otherwise the pass spans the model: every tensor
    whose pass has an equal `population` (and name) is measured, and the finished value is
    stored in each of them (tensors read from the same stored bytes count once)."""

    name: str
    measure: Callable[[Job, Chunk], Any]
    finish: Callable[[Job, Any], Any] = _total
    combine: Callable[[Any, Any], Any] = add
    population: Hashable | None = None

    @property
    def scope(self) -> str:
        return "tensor" if self.population is None else "model"


class Blocks:
    """Float statistics kept per block, so that chunks combine exactly: float64 rows, one per
    block in flat order (each row one value per quantity). Chunks hold whole blocks, so the
    combined rows are the same however a tensor was chunked, and `total()` adds them up once."""

    __slots__ = ("rows",)

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows

    def __add__(self, other: Blocks) -> Blocks:
        return Blocks(np.concatenate([self.rows, other.rows]))

    def total(self) -> np.ndarray:
        """The sum over blocks of each quantity (float64, in block order)."""
        return self.rows.sum(axis=0)


@dataclass
class Job:
    """One output tensor's merge: the method, its resolved parameters, the tensor's shape and
    name, the statistics its passes found so far, and how many bytes it may hold between
    passes (whole arrays in memory: no limit; the engine: its memory budget)."""

    method: MethodSpec
    params: dict[str, Any]
    shape: tuple[int, ...]
    n_models: int
    has_base: bool
    tensor_name: str = ""
    compute: str = "float32"  # the compute dtype's name
    stats: dict[str, Any] = field(default_factory=dict)
    hold: int | None = None  # bytes a method may keep between passes (None: no limit)

    def holds(self, nbytes: int) -> bool:
        """Whether the method may keep `nbytes` from one pass to the next (a statistic of the
        whole tensor, masks for the apply) rather than find them again, pass by pass."""
        return self.hold is None or nbytes <= self.hold

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @functools.cached_property
    def granule(self) -> int:
        """Entries that must stay in one chunk (whole rows, for row-wise methods)."""
        return max(1, self.method.granule(self)) if self.method.granule else 1

    @functools.cached_property
    def block(self) -> int:
        """Entries per block of exact sums: whole granules, about BLOCK entries."""
        g = self.granule
        return g * max(1, BLOCK // g)

    def passes(self) -> Iterator[Pass]:
        """The method's passes for this tensor, in order (read `stats` between them)."""
        return iter(self.method.passes(self) if self.method.passes else ())


@dataclass
class Chunk:
    """Flat entries start .. start+size-1 of one tensor: one compute-dtype array per model and
    the base (or None), all of namespace `xp` on one device."""

    xp: Any
    models: list[Array]
    base: Array | None
    start: int = 0
    memo: dict[Hashable, Any] = field(default_factory=dict)  # found once, used again on it

    @property
    def size(self) -> int:
        return self.models[0].shape[0]

    @property
    def stop(self) -> int:
        return self.start + self.size

    @functools.cached_property
    def deltas(self) -> list[Array]:
        """The task vectors model_i - base of this chunk."""
        return [x - self.base for x in self.models]

    def part(self, start: int, stop: int) -> Chunk:
        """Entries [start, stop) of this chunk (offsets within it) as a chunk of their own."""
        base = None if self.base is None else self.base[start:stop]
        return Chunk(self.xp, [x[start:stop] for x in self.models], base, self.start + start)

    @property
    def inputs(self) -> list[Array]:
        return self.models + ([self.base] if self.base is not None else [])

    def rows(self, x: Array, width: int) -> Array:
        """`x` seen as rows of `width` entries (the chunk holds whole rows)."""
        return self.xp.reshape(x, (-1, width))


def block_rows(xp, x: Array, block: int) -> tuple[Array | None, Array | None]:
    """The flat `x` as (whole blocks as rows, the partial last block or None)."""
    n = x.shape[0]
    whole = n - n % block
    rows = xp.reshape(x[:whole], (-1, block)) if whole else None
    tail = x[whole:] if whole < n else None
    return rows, tail


def block_dots(xp, pairs: Sequence[tuple[Array, Array]], block: int) -> Blocks:
    """sum(x * y) for each (x, y) pair of flat arrays, per block of `block` entries (library
    reductions in the compute dtype), as `Blocks` rows."""
    columns = []
    for x, y in pairs:
        rows, tail = block_rows(xp, x * y, block)
        parts = []
        if rows is not None:
            parts.append(np.asarray(_host(xp.sum(rows, axis=1)), np.float64))
        if tail is not None:
            parts.append(np.asarray([float(xp.sum(tail))]))
        columns.append(np.concatenate(parts) if parts else np.zeros(0))
    return Blocks(np.stack(columns, axis=1))


def halving_sums(xp, x: Array, block: int) -> Blocks:
    """sum(x) per block by pairwise halving: elementwise additions in a fixed order only, so the
    same bits on every backend (library reductions add in their own orders)."""
    rows, tail = block_rows(xp, x, block)
    parts = []
    if rows is not None:
        parts.append(np.asarray(_host(_halve(xp, rows)), np.float64))
    if tail is not None:
        parts.append(np.asarray(_host(_halve(xp, xp.reshape(tail, (1, -1)))), np.float64))
    values = np.concatenate(parts) if parts else np.zeros(0)
    return Blocks(values.reshape(-1, 1))


def _halve(xp, rows: Array) -> Array:
    """Each row's sum by repeated halving (odd leftovers carried, added at the end)."""
    n = rows.shape[1]
    if n == 0:
        return xp.zeros((rows.shape[0],), dtype=rows.dtype)
    carry = None
    while n > 1:
        half = n // 2
        if n % 2:
            tail = rows[:, 2 * half :]
            carry = tail if carry is None else carry + tail
        rows = rows[:, :half] + rows[:, half : 2 * half]
        n = half
    if carry is not None:
        rows = rows + carry
    return rows[:, 0]


def _host(x: Array) -> np.ndarray:
    from mmerge import backend

    return backend.to_host(x)


def run_model_passes(
    jobs: Sequence[Job | None],
    measure: Callable[[dict[int, Pass]], dict[int, Any]],
    identity: Callable[[int], Hashable],
) -> tuple[list, list]:
    """The leading model-scope passes of all jobs, in rounds. A round takes each job's next pass
    that has a population, asks `measure` for the parts of the jobs whose tensor comes first in
    its population (`{job index: pass}`, all at once, so a caller may fan them out), combines
    each population's parts in job order, and stores the finished value in every member. Returns
    each job's pass iterator and its next pass (a tensor-scope one, or None)."""
    iterators = [None if job is None else job.passes() for job in jobs]
    pending = [None if it is None else next(it, None) for it in iterators]
    while True:
        groups: dict[tuple, list[int]] = {}
        for i, p in enumerate(pending):
            if p is not None and p.population is not None:
                groups.setdefault((p.name, p.population), []).append(i)
        if not groups:
            return iterators, pending
        asked: dict[int, Pass] = {}
        for members in groups.values():
            seen: set = set()
            for i in members:
                if identity(i) not in seen:
                    seen.add(identity(i))
                    asked[i] = pending[i]
        parts = measure(asked)
        for members in groups.values():
            p, total = pending[members[0]], None
            for i in members:
                if i in parts:
                    total = parts[i] if total is None else p.combine(total, parts[i])
            value = p.finish(jobs[members[0]], total)
            for i in members:
                jobs[i].stats[p.name] = value
                pending[i] = next(iterators[i], None)


def run_passes(
    jobs: Sequence[Job | None],
    measure: Callable[[int, Pass], Any],
    ready: Callable[[int], None],
    identity: Callable[[int], Hashable] = lambda i: i,
    wanted: Callable[[int], bool] = lambda i: True,
    overlap: int = 1,
) -> None:
    """Every pass of every wanted job, then `ready(i)` for each in order (None jobs, copies, are
    ready at once).

    `measure(i, p)` is pass `p` measured over all chunks of job i and combined. The leading
    model-scope passes of all jobs (wanted or not: a resumed merge still needs the whole model)
    run first: each over every job of its population (jobs of equal `identity`, the same stored
    tensor, once), finished once and stored in each; then, job by job, its tensor-scope passes,
    and `ready`. With `overlap` > 1 the tensor-scope passes of that many successive jobs run at
    once on threads of their own (`measure` must then be thread-safe), so one job's `finish`
    (a k-th value, say) overlaps the chunk work of the next; `ready` still runs in job order on
    the calling thread.
    """
    iterators, pending = run_model_passes(
        jobs, lambda asked: {i: measure(i, p) for i, p in asked.items()}, identity
    )

    def tensor_passes(i: int) -> None:
        job, p = jobs[i], pending[i]
        while p is not None:
            if p.population is not None:
                raise RuntimeError(f"{job.method.name}: a model-scope pass after a tensor pass")
            job.stats[p.name] = p.finish(job, measure(i, p))
            p = next(iterators[i], None)

    order = [i for i in range(len(jobs)) if wanted(i)]
    if overlap <= 1:
        for i in order:
            tensor_passes(i)
            ready(i)
        return
    running: collections.deque[tuple[int, _Background]] = collections.deque()

    def first_ready() -> None:
        i, background = running.popleft()
        background.result()
        ready(i)

    for i in order:
        running.append((i, _Background(tensor_passes, i)))
        if len(running) == overlap:
            first_ready()
    while running:
        first_ready()


class _Background:
    """`fn(*args)` on a daemon thread of its own; `result()` joins it and raises what it raised.
    Plain threads, not an executor: an executor's clean-up callback runs when it is collected,
    and a Ctrl-C landing in it is lost (printed as ignored) while the merge goes on."""

    def __init__(self, fn: Callable[..., None], *args: Any) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(
            target=self._run, args=(fn, args), name="mmerge-passes", daemon=True
        )
        self.thread.start()

    def _run(self, fn: Callable[..., None], args: tuple) -> None:
        try:
            fn(*args)
        except BaseException as exc:  # raised again in the thread that asks for the result
            self.error = exc

    def result(self) -> None:
        self.thread.join()
        if self.error is not None:
            raise self.error


def run_whole(job: Job, chunk: Chunk) -> Array:
    """Every pass of `job` over the single `chunk`, then its apply: a method on whole arrays."""
    run_passes([job], lambda i, p: p.measure(job, chunk), lambda i: None)
    return job.method.apply(job, chunk)

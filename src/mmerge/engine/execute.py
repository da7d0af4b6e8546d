"""Run a plan: read, merge and write tensor by tensor with bounded memory and overlapped work.

Work is cut into tasks: a chunk of an elementwise merge, a whole tensor for methods that need
whole-tensor statistics, or a byte copy. Tasks run on a small thread pool (numpy, file reads
and writes release the GIL), so reading the next tensor overlaps merging the current one.
A byte budget bounds the memory of the tasks in flight; a tensor's pages are released and its
name journaled as soon as its last task is written.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from mmerge.engine.allocator import keep_chunk_memory
from mmerge.engine.plan import Plan, PlanItem
from mmerge.io.dtypes import DTYPES, check_fits
from mmerge.methods._common import SUM_BLOCK

CHUNK_ELEMENTS = 1 << 19  # 2 MiB of float32 per input per chunk: stays in cache
MEMORY_BUDGET = 640 << 20  # bytes of working memory the tasks in flight may hold together


@dataclass(frozen=True)
class Execution:
    """How to compute: backend and device, compute dtype, threads, progress callback."""

    backend: str = "numpy"
    device: str | None = None
    compute_dtype: str = "float32"
    workers: int = 2
    on_progress: Callable[[int], None] | None = None  # called with bytes written
    chunk_elements: int = CHUNK_ELEMENTS


@dataclass(frozen=True)
class _Task:
    item: PlanItem
    start: int
    stop: int
    whole: bool  # the method needs the whole tensor at once
    prepared: list | None = None  # per-model survivors decided from whole task vectors

    def cost(self) -> int:
        """Working bytes this task holds: its inputs and a few temporaries in compute dtype."""
        n_in = len(self.item.inputs())
        per_element = (2 * n_in + 4) * 4 if self.whole else (n_in + 2) * 4
        return (self.stop - self.start) * per_element


def tasks_for(item: PlanItem, chunk: int = CHUNK_ELEMENTS) -> list[_Task]:
    """The tasks that compute `item`: chunks for copies, elementwise methods and (once
    prepared) trim methods on large tensors; else one whole-tensor task."""
    n = item.numel
    if item.is_copy or item.method.elementwise or _gathered_first(item, chunk):
        bounds = list(range(0, n, chunk)) or [0]
        return [_Task(item, s, min(s + chunk, n), False) for s in bounds]
    return [_Task(item, 0, n, True)]


def _gathered_first(item: PlanItem, chunk: int) -> bool:
    """Large tensors of methods whose whole-tensor statistics can be gathered first."""
    if item.numel <= chunk:
        return False
    if item.method.sums is not None:
        return chunk % SUM_BLOCK == 0  # sums are exact only over whole blocks
    return item.method.prepare is not None and item.base is not None


def prepare_cost(item: PlanItem) -> int:
    """Bytes held while preparing: one task vector and one |task vector| scratch (sums need
    only chunk buffers)."""
    return 0 if item.method.sums is not None else 2 * 4 * item.numel


def estimate_peak(plan: Plan) -> int:
    """Working memory the executor may hold at once (tasks in flight), for --dry-run."""
    costs = [t.cost() for item in plan.items for t in tasks_for(item)]
    costs += [prepare_cost(i) for i in plan.items if _gathered_first(i, CHUNK_ELEMENTS)]
    biggest = max(costs, default=0)
    return max(biggest, min(MEMORY_BUDGET, sum(sorted(costs)[-2:])))


class _Budget:
    """Counts bytes held by tasks in flight; a task waits until it fits (or nothing runs)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def acquire(self, n: int) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.used == 0 or self.used + n <= self.limit)
            self.used += n

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


def _host_dtype(compute_dtype: str):
    return np.float64 if compute_dtype == "float64" else np.float32


_scratch = threading.local()


def _buffer(slot: int, n: int) -> np.ndarray:
    """A float32 buffer of `n` elements owned by this thread, reused across chunks.

    Reusing it spares a fresh allocation (and its page faults) per chunk per input.
    """
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(slot)
    if buf is None or buf.size < n:
        buf = buffers[slot] = np.empty(max(n, CHUNK_ELEMENTS), np.float32)
    return buf[:n]


def _read(ref, task: _Task, dtype, slot: int) -> np.ndarray:
    n = task.stop - task.start
    out = None if task.whole else _buffer(slot, n)
    flat = ref.read_float32(task.start, task.stop, out=out)
    if dtype is np.float64:
        flat = flat.astype(np.float64)
    return flat if not task.whole else flat.reshape(task.item.shape)


def _inputs(task: _Task, run: Execution) -> tuple[list, object]:
    """The task's slice of each model (and of the base) as arrays of the chosen backend."""
    from mmerge.backend.transfer import to_backend

    item = task.item
    dtype = _host_dtype(run.compute_dtype)
    arrays = [
        to_backend(_read(r, task, dtype, i), run.backend, run.device)
        for i, r in enumerate(item.inputs())
    ]
    base = arrays.pop() if item.base is not None else None
    return arrays, base


def _compute(task: _Task, run: Execution) -> np.ndarray:
    """Merge one task's slice of inputs on the chosen backend; a host array comes back."""
    from mmerge.backend.transfer import to_host

    tensors, base = _inputs(task, run)
    merged = task.item.method(
        tensors,
        base=base,
        tensor_name=task.item.name,
        prepared=task.prepared,
        start=task.start,
        **task.item.params,
    )
    return to_host(merged)


def gather(item: PlanItem, run: Execution):
    """What a chunked merge of `item` needs from its whole tensors: additive sums, chunk by
    chunk, or each model's survivors."""
    if item.method.sums is None:
        return prepare(item, run)
    from mmerge.backend import namespace

    params = item.method.resolve(len(item.sources), item.params)
    totals = None
    for s in range(0, item.numel, run.chunk_elements):
        tensors, base = _inputs(_Task(item, s, min(s + run.chunk_elements, item.numel), False), run)
        part = item.method.sums(namespace(*tensors), tensors, base=base, **params)
        totals = part if totals is None else tuple(a + b for a, b in zip(totals, part))
    return totals


def prepare(item: PlanItem, run: Execution) -> list:
    """Each model's survivors (trim rule, rescale factor) from its whole task vector, one model
    at a time: the task vector is assembled chunk by chunk into a single reused buffer."""
    from mmerge.backend import namespace
    from mmerge.backend.transfer import to_backend

    n, chunk = item.numel, run.chunk_elements
    delta = np.empty(n, _host_dtype(run.compute_dtype))
    params = item.method.resolve(len(item.sources), item.params)
    params["tensor_name"] = item.name
    survivors = []
    for i, ref in enumerate(item.sources):
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            piece = _Task(item, s, e, False)
            dtype = delta.dtype.type
            np.subtract(
                _read(ref, piece, dtype, 0), _read(item.base, piece, dtype, 1), out=delta[s:e]
            )
        d = to_backend(delta, run.backend, run.device)
        survivors.append(item.method.prepare(namespace(d), d, i, **params))
    for ref in item.inputs():
        ref.release()
    return survivors


_BIT_VIEWS = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _typed(ref, start: int, stop: int) -> np.ndarray:
    """Stored elements as a typed host array (ml_dtypes views for BF16/F8), without copying."""
    data = ref.raw(start, stop)
    if ref.dtype in _BIT_VIEWS:
        import ml_dtypes

        data = data.view(getattr(ml_dtypes, _BIT_VIEWS[ref.dtype]))
    return data


def _run_task(task: _Task, writer, run: Execution) -> None:
    if task.item.is_copy:
        writer.write(
            task.item.name, _typed(task.item.sources[0], task.start, task.stop), start=task.start
        )
    else:
        merged = _compute(task, run)
        check_fits(merged, DTYPES[task.item.out_dtype], task.item.name)
        writer.write(task.item.name, merged, start=task.start)


def execute(plan: Plan, writer, run: Execution = Execution()) -> None:
    """Compute every pending tensor of `plan` into `writer` (which knows what is done)."""
    keep_chunk_memory()
    pending = set(writer.pending())
    items = [item for item in plan.items if item.name in pending]
    remaining = {}
    lock = threading.Lock()
    budget = _Budget(MEMORY_BUDGET)

    def finish(task: _Task) -> None:
        item = task.item
        with lock:
            remaining[item.name] -= 1
            done = remaining[item.name] == 0
        if done:
            for ref in item.inputs():
                ref.release()
            writer.finish_tensor(item.name)
        if run.on_progress is not None:
            from mmerge.io import DTYPES

            run.on_progress((task.stop - task.start) * DTYPES[item.out_dtype].itemsize)

    def job(task: _Task) -> None:
        try:
            _run_task(task, writer, run)
            finish(task)
        finally:
            budget.release(task.cost())

    def all_tasks() -> Iterator[_Task]:
        for item in items:
            ts = tasks_for(item, run.chunk_elements)
            if _gathered_first(item, run.chunk_elements):
                cost = prepare_cost(item)
                budget.acquire(cost)
                try:
                    survivors = gather(item, run)
                finally:
                    budget.release(cost)
                ts = [_Task(t.item, t.start, t.stop, False, survivors) for t in ts]
            remaining[item.name] = len(ts)
            yield from ts

    in_flight: set[Future] = set()
    with ThreadPoolExecutor(max_workers=max(1, run.workers), thread_name_prefix="mmerge") as pool:
        try:
            for task in all_tasks():
                budget.acquire(task.cost())
                in_flight.add(pool.submit(job, task))
                if len(in_flight) > 2 * run.workers:
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
            for f in in_flight:
                f.result()
        except BaseException:
            for f in in_flight:
                f.cancel()
            raise

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

from mmerge.engine.plan import Plan, PlanItem

CHUNK_ELEMENTS = 1 << 21  # 8 MiB of float32 per input per chunk
MEMORY_BUDGET = 640 << 20  # bytes of working memory the tasks in flight may hold together


@dataclass(frozen=True)
class Execution:
    """How to compute: backend and device, compute dtype, threads, progress callback."""

    backend: str = "numpy"
    device: str | None = None
    compute_dtype: str = "float32"
    workers: int = 2
    on_progress: Callable[[int], None] | None = None  # called with bytes written


@dataclass(frozen=True)
class _Task:
    item: PlanItem
    start: int
    stop: int
    whole: bool  # the method needs the whole tensor at once

    def cost(self) -> int:
        """Working bytes this task holds: its inputs and a few temporaries in compute dtype."""
        n_in = len(self.item.inputs())
        per_element = (2 * n_in + 4) * 4 if self.whole else (n_in + 2) * 4
        return (self.stop - self.start) * per_element


def tasks_for(item: PlanItem, chunk: int = CHUNK_ELEMENTS) -> list[_Task]:
    """The tasks that compute `item`: chunks for copies and elementwise methods, else one."""
    n = item.numel
    if item.is_copy or item.method.elementwise:
        bounds = list(range(0, n, chunk)) or [0]
        return [_Task(item, s, min(s + chunk, n), False) for s in bounds]
    return [_Task(item, 0, n, True)]


def estimate_peak(plan: Plan) -> int:
    """Working memory the executor may hold at once (tasks in flight), for --dry-run."""
    costs = [t.cost() for item in plan.items for t in tasks_for(item)]
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


def _read(ref, task: _Task, dtype) -> np.ndarray:
    flat = ref.read_float32(task.start, task.stop)
    if dtype is np.float64:
        flat = flat.astype(np.float64)
    return flat if not task.whole else flat.reshape(task.item.shape)


def _compute(task: _Task, run: Execution) -> np.ndarray:
    """Merge one task's slice of inputs on the chosen backend; a host array comes back."""
    from mmerge.backend.transfer import to_backend, to_host

    item = task.item
    dtype = _host_dtype(run.compute_dtype)
    tensors = [to_backend(_read(r, task, dtype), run.backend, run.device) for r in item.sources]
    base = None
    if item.base is not None:
        base = to_backend(_read(item.base, task, dtype), run.backend, run.device)
    merged = item.method(tensors, base=base, tensor_name=item.name, **item.params)
    return to_host(merged)


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
        writer.write(task.item.name, _compute(task, run), start=task.start)


def execute(plan: Plan, writer, run: Execution = Execution()) -> None:
    """Compute every pending tensor of `plan` into `writer` (which knows what is done)."""
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
            ts = tasks_for(item)
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

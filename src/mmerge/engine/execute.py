"""Run a plan: copy tensors, and for merged ones run the method's passes and its apply over
chunks, with bounded memory and overlapped work.

The engine knows plan items and the contract of `methods.contract` (jobs, passes, chunks), and
nothing of any method: it cuts a tensor into chunks of whole blocks (the method's granule), moves
each input's stored bytes to the backend (widened there), measures chunks for every pass (passes
whose scope is the whole model first, over every tensor of their population), applies, and
writes. Chunk tasks run on a small thread pool (numpy, file reads and writes release the GIL);
a byte budget bounds the memory of the tasks in flight, and a tensor's pages are released as
soon as a chunk has been read.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from mmerge import backend as backends
from mmerge.engine.allocator import keep_chunk_memory
from mmerge.engine.plan import Plan, PlanItem
from mmerge.io.dtypes import DTYPES, check_fits
from mmerge.methods.contract import Chunk, Job, Pass, run_passes

MEMORY_BUDGET = 640 << 20  # bytes of working memory the tasks in flight may hold together
HOLD = 128 << 20  # bytes a tensor's merge may keep between its passes (see Job.holds)
TEMPORARIES = 6  # chunk-sized arrays a method holds besides its inputs (a generous count)
OVERLAP = 2  # tensors whose passes run at once: one's finish overlaps the next one's chunks


@dataclass(frozen=True)
class Execution:
    """How to compute: backend and device, compute dtype, threads, progress callback, the
    entries per chunk and per tile (None: what the backend suits), the bytes a tensor's merge
    may keep between its passes, and the executor that runs the plan (`local`: this process;
    `ray`: one task per output shard on the Ray cluster at `address`, None for Ray's default:
    $RAY_ADDRESS, a cluster started on this machine, or a new one)."""

    backend: str = "numpy"
    device: str | None = None
    compute_dtype: str = "float32"
    workers: int = 2
    on_progress: Callable[[int, int], None] | None = None  # (bytes written, bytes to write)
    chunk_elements: int | None = None
    tile_elements: int | None = None
    hold: int = HOLD
    executor: str = "local"
    address: str | None = None


def job_for(item: PlanItem, compute: str, hold: int = HOLD) -> Job:
    """The method's job for a merged plan item."""
    has_base = item.base is not None
    job = item.method.job(item.shape, len(item.sources), has_base, item.params, item.name)
    job.compute, job.hold = compute, hold
    return job


def chunk_bounds(numel: int, block: int, target: int) -> list[tuple[int, int]]:
    """[start, stop) of each chunk: whole blocks, about `target` entries (at least one block)."""
    step = max(1, target // block) * block
    return [(s, min(s + step, numel)) for s in range(0, numel, step)] or [(0, 0)]


def stored_identity(item: PlanItem) -> tuple:
    """Which stored values an item reads: items with equal identities are the same tensor."""
    return tuple(ref.identity for ref in item.inputs())


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


class Runner:
    """One execution of plan items into a writer."""

    def __init__(self, items: Sequence[PlanItem], writer, run: Execution) -> None:
        self.items, self.writer, self.run = list(items), writer, run
        self.backend = backends.get(run.backend, run.device)
        self.target = run.chunk_elements or self.backend.chunk_elements
        self.tile = run.tile_elements or self.backend.tile_elements
        self.budget = _Budget(MEMORY_BUDGET)
        self.lock = threading.Lock()
        self.remaining: dict[str, int] = {}
        self.done, self.total = 0, 0  # output bytes written and to write
        self.in_flight: set[Future] = set()
        self.pool: ThreadPoolExecutor | None = None

    # -- reading ----------------------------------------------------------------------------------

    def chunks(self, item: PlanItem, job: Job | None) -> list[tuple[int, int]]:
        return chunk_bounds(item.numel, job.block if job else 1, self.target)

    def cost(self, item: PlanItem, start: int, stop: int) -> int:
        """Working bytes of one chunk task: its inputs and temporaries in the compute dtype."""
        width = 8 if self.run.compute_dtype == "float64" else 4
        return (stop - start) * width * (len(item.inputs()) + TEMPORARIES)

    def load(self, item: PlanItem, start: int, stop: int) -> Chunk:
        """Entries [start, stop) of every input, as stored bytes widened on the backend (a
        quantized input as its dequantized float32 values)."""
        arrays = []
        for slot, ref in enumerate(item.inputs()):
            data, dtype = ref.transfer(start, stop)
            arrays.append(self.backend.from_stored(data, dtype, self.run.compute_dtype, slot))
            ref.release(start, stop)
        base = arrays.pop() if item.base is not None else None
        return Chunk(self.backend.xp, arrays, base, start)

    def tiles(self, chunk: Chunk, job: Job) -> Iterator[Chunk]:
        """`chunk` in tiles of whole blocks, as large as the backend wants a method's work
        (views: read and widened once, worked on where it stays in cache)."""
        if self.tile is None or chunk.size <= self.tile:
            yield chunk
            return
        for start, stop in chunk_bounds(chunk.size, job.block, self.tile):
            yield chunk.part(start, stop)

    # -- tasks ------------------------------------------------------------------------------------

    def submit(self, fn, cost: int, *args) -> Future:
        """Run `fn(*args)` on the pool once `cost` bytes fit the budget; they are given back
        when it ends, or when it is cancelled before it ran (after an error elsewhere: a pass
        thread may still be waiting for room)."""
        self.budget.acquire(cost)
        try:
            future = self.pool.submit(fn, *args)
        except BaseException:
            self.budget.release(cost)
            raise
        future.add_done_callback(lambda _: self.budget.release(cost))
        return future

    def ordered(self, calls: Iterable[tuple[Callable, int, tuple]]) -> Iterator:
        """Results of `calls` (fn, cost, args) in order, with a few of them running at once."""
        window = 2 * max(1, self.run.workers)
        queue: list[Future] = []
        for fn, cost, args in calls:
            queue.append(self.submit(fn, cost, *args))
            if len(queue) > window:
                yield queue.pop(0).result()
        for f in queue:
            yield f.result()

    def measure(self, item: PlanItem, job: Job, p: Pass):
        """`p` measured on every chunk of `item`, combined in chunk order."""

        def one(start: int, stop: int):
            total = None
            for tile in self.tiles(self.load(item, start, stop), job):
                part = p.measure(job, tile)
                total = part if total is None else p.combine(total, part)
            return self.backend.settle(total)

        calls = ((one, self.cost(item, s, e), (s, e)) for s, e in self.chunks(item, job))
        total = None
        for part in self.ordered(calls):
            total = part if total is None else p.combine(total, part)
        return total

    def write_chunk(self, item: PlanItem, job: Job | None, start: int, stop: int) -> None:
        """Compute (or copy) entries [start, stop) of `item` and write them."""
        if job is None:
            ref = item.sources[0]
            data, dtype = ref.transfer(start, stop)  # bits copy through; values are converted
            if dtype.code != item.out_dtype:
                data = data.view(dtype.value)
            self.writer.write(item.name, data, start=start)
            ref.release(start, stop)
        else:
            for tile in self.tiles(self.load(item, start, stop), job):
                result = self.backend.to_host(job.method.apply(job, tile))
                check_fits(result, DTYPES[item.out_dtype], item.name)
                self.writer.write(item.name, result, start=tile.start)
        self.finished(item, start, stop)

    def finished(self, item: PlanItem, start: int, stop: int) -> None:
        with self.lock:
            self.remaining[item.name] -= 1
            done = self.remaining[item.name] == 0
        if done:
            self.writer.finish_tensor(item.name)
        if self.run.on_progress is not None:
            with self.lock:
                self.done += (stop - start) * DTYPES[item.out_dtype].itemsize
                done = self.done
            self.run.on_progress(done, self.total)

    def apply(self, item: PlanItem, job: Job | None) -> None:
        """Submit the chunks of `item`; they write themselves (no waiting here)."""
        bounds = self.chunks(item, job)
        self.remaining[item.name] = len(bounds)
        for start, stop in bounds:
            self.in_flight.add(
                self.submit(write_chunk, self.cost(item, start, stop), self, item, job, start, stop)
            )
            if len(self.in_flight) > 2 * self.run.workers:
                done, self.in_flight = wait(self.in_flight, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """The thread pool chunk tasks run on, open for the block (tasks cancelled on error)."""
        workers = max(1, self.run.workers)
        with (
            self.backend.threads(workers),
            ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mmerge") as pool,
        ):
            self.pool = pool
            try:
                yield
                for f in self.in_flight:
                    f.result()
            except BaseException:
                for f in self.in_flight:
                    f.cancel()
                raise

    def execute(self, jobs: Sequence[Job | None] | None = None) -> None:
        """Run every pass and apply of the pending items; `jobs` (one per item, None for a copy)
        when some of their passes were already measured elsewhere."""
        pending = set(self.writer.pending())
        items = self.items
        self.total = sum(i.numel * DTYPES[i.out_dtype].itemsize for i in items if i.name in pending)
        if self.run.on_progress is not None:
            self.run.on_progress(0, self.total)
        if jobs is None:
            run = self.run
            jobs = [None if i.is_copy else job_for(i, run.compute_dtype, run.hold) for i in items]

        def measure(i: int, p: Pass):
            return self.measure(items[i], jobs[i], p)

        def ready(i: int) -> None:
            self.apply(items[i], jobs[i])

        with self.working():
            run_passes(
                list(jobs),
                measure,
                ready,
                identity=lambda i: stored_identity(items[i]),
                wanted=lambda i: items[i].name in pending,
                overlap=OVERLAP if self.run.workers > 1 else 1,
            )


def write_chunk(runner: Runner, item: PlanItem, job: Job | None, start: int, stop: int) -> None:
    """One chunk task (a module-level hook, so tests can interrupt a merge between chunks)."""
    runner.write_chunk(item, job, start, stop)


def estimate_peak(plan: Plan, run: Execution = Execution()) -> int:
    """Working memory the executor may hold at once (chunk tasks in flight, and what merges
    with passes keep between them: see items_peak), for --dry-run."""
    return items_peak(plan.items, run)


def items_peak(items: Sequence[PlanItem], run: Execution) -> int:
    """Working memory of executing `items` (chunk tasks in flight, and what merges with passes
    keep between them: OVERLAP tensors in their passes, each twice while its parts are joined,
    and one applying): the whole plan's for --dry-run, one Ray task's hint."""
    target = run.chunk_elements or backends.get(run.backend, run.device).chunk_elements
    width = 8 if run.compute_dtype == "float64" else 4
    costs = [min(item.numel, target) * width * (len(item.inputs()) + TEMPORARIES) for item in items]
    tasks = min(MEMORY_BUDGET, (2 * run.workers + 1) * max(costs, default=0))
    held = [
        min(run.hold, item.numel * len(item.sources) * width)
        for item in items
        if not item.is_copy and item.method.passes
    ]
    return tasks + (2 * OVERLAP + 1) * max(held, default=0)


def execute(plan: Plan, writer, run: Execution = Execution()) -> None:
    """Compute every pending tensor of `plan` into `writer` (which knows what is done)."""
    keep_chunk_memory()
    Runner(plan.items, writer, run).execute()

"""Shard-parallel execution on Ray: one task per output shard, the same bits as a local run.

The driver (this process) holds the output writer. Passes whose scope is the whole model run
first as map-reduce rounds: a task per shard measures its tensors, the driver combines the
parts in plan order (as a local run does) and finishes them. Then each shard's task reads its
inputs (memory-mapped: a path every node can read), runs the remaining passes and applies,
writes the shard under a temporary name, fsyncs and renames it into the partial output, and
returns its tensor names, byte count and sha256. The driver records each in the journal, and
the writer commits the index, config and provenance last, as in a local run. spec/distributed.md
is the protocol.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmerge.engine.allocator import keep_chunk_memory
from mmerge.engine.execute import Execution, Runner, items_peak, job_for, stored_identity
from mmerge.engine.plan import Plan, PlanItem
from mmerge.errors import InvalidInput, MmergeError
from mmerge.io.flusher import Flusher
from mmerge.io.layout import Slot
from mmerge.io.output_path import fsync_dir
from mmerge.io.writer import CHUNK_BYTES, pwrite_all, write_slot
from mmerge.methods.contract import Job, run_model_passes

MAX_RETRIES = 3  # attempts Ray makes again at a task lost with its worker
TMP_SUFFIX = ".tmp"  # a shard being written: .<shard name>.<pid>-<random>.tmp beside it


def import_ray():
    """The ray module, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise InvalidInput(
            "the ray executor needs Ray: install it with pip install 'mmerge[ray]'"
        ) from None
    return ray


@dataclass
class ContinuedJob(Job):
    """A job whose first `skip` passes were measured elsewhere (their results are in stats)."""

    skip: int = 0

    def passes(self) -> Iterator:
        return itertools.islice(super().passes(), self.skip, None)


def continued_jobs(
    items: Sequence[PlanItem], stats: Sequence[dict], skips: Sequence[int], run: Execution
) -> list[Job | None]:
    """The items' jobs, given the statistics of their first `skips` passes."""
    jobs: list[Job | None] = []
    for item, given, skip in zip(items, stats, skips):
        if item.is_copy:
            jobs.append(None)
            continue
        job = job_for(item, run.compute_dtype, run.hold)
        values = {f.name: getattr(job, f.name) for f in dataclasses.fields(Job)}
        values["stats"] = dict(given)
        jobs.append(ContinuedJob(**values, skip=skip))
    return jobs


@dataclass(frozen=True)
class ShardTask:
    """What one shard's task needs: its items, their model-scope statistics (and how many
    passes those were), and where its file goes (absolute path, header, size, slots)."""

    index: int
    path: str
    header: bytes
    size: int
    slots: list[Slot]
    items: list[PlanItem]
    stats: list[dict]
    skips: list[int]


@dataclass(frozen=True)
class ShardResult:
    """What a shard's task returns once its file is in place under its final name."""

    index: int
    names: list[str]
    nbytes: int
    sha256: str


class _ShardSink:
    """The writer interface of the Runner over one shard file being written."""

    def __init__(self, fd: int, slots: Sequence[Slot], flusher: Flusher) -> None:
        self.fd, self.flusher = fd, flusher
        self.slots = {s.spec.name: s for s in slots}
        self.written = dict.fromkeys(self.slots, 0)
        self.lock = threading.Lock()
        self.local = threading.local()  # per-thread conversion buffer

    def write(self, name: str, array: np.ndarray, start: int = 0) -> None:
        scratch = getattr(self.local, "buffer", None)
        if scratch is None:
            scratch = self.local.buffer = np.empty(CHUNK_BYTES, np.uint8)
        slot = self.slots[name]
        n = write_slot(self.fd, slot, array, start, scratch)
        with self.lock:
            self.written[name] += n
        self.flusher.wrote(0, n * slot.dtype.itemsize)

    def finish_tensor(self, name: str) -> None:
        if self.written[name] < self.slots[name].spec.numel:
            raise InvalidInput(f"{name}: finished after only {self.written[name]} elements")

    def pending(self) -> list[str]:
        return list(self.slots)


def _local(run: Execution) -> Execution:
    """The execution inside one task: this process, one thread (Ray runs tasks in parallel)."""
    return dataclasses.replace(run, on_progress=None, workers=1, executor="local", address=None)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            h.update(block)
    return h.hexdigest()


def write_shard(task: ShardTask, run: Execution) -> ShardResult:
    """One shard's task: compute its tensors into a temporary file, fsync, rename into place."""
    keep_chunk_memory()
    final = Path(task.path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    flusher = None
    try:
        flusher = Flusher([fd])
        os.ftruncate(fd, task.size)
        pwrite_all(fd, memoryview(task.header), 0)
        jobs = continued_jobs(task.items, task.stats, task.skips, run)
        Runner(task.items, _ShardSink(fd, task.slots, flusher), _local(run)).execute(jobs)
        flusher.close()
        os.fsync(fd)
    except BaseException:
        if flusher is not None:
            flusher.stop()
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    digest = file_sha256(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    names = [s.spec.name for s in task.slots]
    return ShardResult(task.index, names, task.size, digest)


def measure_shard(
    items: list[PlanItem], stats: list[dict], skips: list[int], run: Execution
) -> list[Any]:
    """One map task of a model-scope round: each item's next pass (a model-scope one) measured
    over its chunks, the parts in item order."""
    keep_chunk_memory()
    jobs = continued_jobs(items, stats, skips, run)
    runner = Runner(items, None, _local(run))
    parts = []
    with runner.working():
        for item, job in zip(items, jobs):
            parts.append(runner.measure(item, job, next(job.passes())))
    return parts


class _Driver:
    """The driver's side of one distributed execution of a plan into a writer."""

    def __init__(self, plan: Plan, writer, run: Execution) -> None:
        self.ray = import_ray()
        if not self.ray.is_initialized():
            self.ray.init(address=run.address, log_to_driver=False, logging_level=logging.WARNING)
        self.items, self.writer, self.run = plan.items, writer, run
        self.layout = writer.shards()
        where = {s.spec.name: k for k, (_, _, slots) in enumerate(self.layout) for s in slots}
        index = {item.name: i for i, item in enumerate(self.items)}
        self.members = [[] for _ in self.layout]  # item indices of each shard, in plan order
        for name, k in where.items():
            self.members[k].append(index[name])
        for m in self.members:
            m.sort()
        self.jobs = [
            None if i.is_copy else job_for(i, run.compute_dtype, run.hold) for i in self.items
        ]

    def result(self, ref) -> Any:
        """A task's return value; an mmerge error raised in the task as itself (one line)."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, MmergeError):
                raise err.cause from None
            raise

    def options(self, items: Sequence[PlanItem]) -> dict:
        """Resource hints of a task over `items`: one CPU and its working memory."""
        peak = items_peak(items, _local(self.run)) + CHUNK_BYTES
        return {"num_cpus": 1, "memory": peak, "max_retries": MAX_RETRIES}

    def model_passes(self) -> None:
        """The leading model-scope passes of every job, as map-reduce rounds (see run_passes:
        the same populations, tensors of equal identity once, combined in plan order)."""
        ray = self.ray
        remote = ray.remote(measure_shard)

        def measure(asked: dict[int, Any]) -> dict[int, Any]:
            futures = []
            for members in self.members:
                ask = [i for i in members if i in asked]
                if ask:
                    items = [self.items[i] for i in ask]
                    stats = [self.jobs[i].stats for i in ask]
                    args = (items, stats, [self.done(i) for i in ask], _local(self.run))
                    futures.append((ask, remote.options(**self.options(items)).remote(*args)))
            parts: dict[int, Any] = {}
            try:
                for ask, future in futures:  # shards in plan order
                    parts.update(zip(ask, self.result(future)))
            except BaseException:
                for _, future in futures:
                    ray.cancel(future, force=True)
                raise
            return parts

        run_model_passes(self.jobs, measure, lambda i: stored_identity(self.items[i]))

    def done(self, i: int) -> int:
        """How many passes of item i the driver has run (each stored one statistic)."""
        return 0 if self.jobs[i] is None else len(self.jobs[i].stats)

    def done_already(self, k: int) -> bool:
        """True when shard k was written whole by an earlier run and its file still matches."""
        path, _, slots = self.layout[k]
        recorded = self.writer.shard_digest(k)
        pending = set(self.writer.pending())
        if recorded is None or any(s.spec.name in pending for s in slots):
            return False
        return file_sha256(path) == recorded

    def task(self, k: int) -> ShardTask:
        """Shard k's task, with the statistics the model-scope passes found."""
        path, shard, slots = self.layout[k]
        ask = self.members[k]
        return ShardTask(
            index=k,
            path=str(Path(os.path.abspath(path))),
            header=shard.header,
            size=shard.size,
            slots=slots,
            items=[self.items[i] for i in ask],
            stats=[{} if self.jobs[i] is None else self.jobs[i].stats for i in ask],
            skips=[self.done(i) for i in ask],
        )

    def execute(self) -> None:
        ray = self.ray
        progress = self.run.on_progress
        todo = [k for k in range(len(self.layout)) if not self.done_already(k)]
        total = sum(self.layout[k][1].size - len(self.layout[k][1].header) for k in todo)
        if progress is not None:
            progress(0, total)
        self.model_passes()
        tasks = [self.task(k) for k in todo]
        remote = ray.remote(write_shard)
        futures = {
            remote.options(**self.options(t.items)).remote(t, _local(self.run)): t for t in tasks
        }
        done = 0
        try:
            while futures:
                ready, _ = ray.wait(list(futures), num_returns=1)
                task = futures.pop(ready[0])
                result: ShardResult = self.result(ready[0])
                self.writer.finish_shard(result.index, result.sha256)
                done += task.size - len(task.header)
                if progress is not None:
                    progress(done, total)
        except BaseException:
            for f in futures:
                ray.cancel(f, force=True)
            raise
        finally:
            remove_strays(self.layout)


def remove_strays(layout: Sequence[tuple[Path, Any, Any]]) -> None:
    """Delete temporary shard files left by task attempts that died (never a finished shard)."""
    for path, _, _ in layout:
        for stray in path.parent.glob(f".{path.name}.*{TMP_SUFFIX}"):
            stray.unlink(missing_ok=True)


def execute_shards(plan: Plan, writer, run: Execution) -> None:
    """Compute every shard of `writer` not yet verified complete, one Ray task each."""
    _Driver(plan, writer, run).execute()

"""One streaming pass over a base and its fine-tunes: worker processes measure a tensor of
every checkpoint straight from the memory maps, chunk by chunk; the sums make the report."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from multiprocessing.context import BaseContext
from pathlib import Path

from threadpoolctl import threadpool_limits

from mmerge.analyze.figures import figures
from mmerge.analyze.groups import group_of, group_order
from mmerge.analyze.result import AnalysisResult
from mmerge.analyze.stats import Stats, add_trimmed, exact_sums
from mmerge.analyze.verdicts import assess
from mmerge.engine.allocator import keep_chunk_memory
from mmerge.errors import InvalidInput, PlanError
from mmerge.io import Checkpoint, open_checkpoint
from mmerge.io.dtypes import FLOAT_CODES

Progress = Callable[[int, int, str], None]
SMALL = 1 << 25  # entries per checkpoint below which one process measures everything


def labels_for(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Short unique names for checkpoints: the file stem or folder name, numbered if repeated."""
    stems = [Path(p).stem if Path(p).suffix == ".safetensors" else Path(p).name for p in paths]
    return [s if stems.count(s) == 1 else f"{s}#{i + 1}" for i, s in enumerate(stems)]


def check_densities(densities: Sequence[float]) -> tuple[float, ...]:
    """Densities sorted and deduplicated; each must lie in (0, 1]."""
    out = []
    for d in densities:
        try:
            value = float(d)
        except (TypeError, ValueError):
            raise InvalidInput(f"density must be a number in (0, 1], got {d!r}") from None
        if not 0 < value <= 1:
            raise InvalidInput(f"density must be in (0, 1], got {d!r}")
        out.append(value)
    if not out:
        raise InvalidInput("give at least one density in (0, 1]")
    return tuple(sorted(set(out)))


def tensor_names(checkpoints: Sequence[Mapping], labels: Sequence[str]) -> list[str]:
    """The base's floating-point tensor names, after checking every fine-tune has the same
    names and shapes (PlanError naming the first tensor that differs)."""
    base = checkpoints[0]
    for ckpt, label in zip(checkpoints[1:], labels[1:], strict=True):
        missing = [n for n in base if n not in ckpt]
        if missing:
            raise PlanError(f"{label} has no tensor {missing[0]!r}, which the base has")
        extra = [n for n in ckpt if n not in base]
        if extra:
            raise PlanError(f"{label} has a tensor {extra[0]!r} that the base does not have")
        for name, ref in base.items():
            if tuple(ckpt[name].shape) != tuple(ref.shape):
                raise PlanError(
                    f"tensor {name!r} has shape {list(ckpt[name].shape)} in {label} "
                    f"but {list(ref.shape)} in the base"
                )
    names = [n for n, ref in base.items() if ref.dtype in FLOAT_CODES]
    for name in names:
        for ckpt, label in zip(checkpoints[1:], labels[1:], strict=True):
            if ckpt[name].dtype not in FLOAT_CODES:
                raise PlanError(f"tensor {name!r} is {ckpt[name].dtype} in {label}, not a float")
    if not names:
        raise PlanError(f"{labels[0]} has no floating-point tensors to analyze")
    return names


def analyze(
    base: str | os.PathLike,
    finetunes: Sequence[str | os.PathLike],
    *,
    densities: Sequence[float] = (0.1, 0.3, 0.5),
    progress: Progress | None = None,
    workers: int | None = None,
) -> AnalysisResult:
    """Measure how well `finetunes` of `base` will merge, in one streaming pass.

    Returns per-tensor, per-layer and whole-model figures, findings and a recommendation.
    Tensors are measured by `workers` processes (default: one per core; one, in this process,
    for small models); each holds a few chunks and one sample, never a whole tensor.
    """
    if isinstance(finetunes, (str, os.PathLike)) or not finetunes:
        raise InvalidInput("analyze needs a base and at least one fine-tune (a list of paths)")
    densities = check_densities(densities)
    if workers is not None and workers < 1:
        raise InvalidInput(f"workers must be at least 1, got {workers}")
    paths = [str(p) for p in (base, *finetunes)]
    labels = labels_for(paths)
    checkpoints = []
    try:
        for p in paths:
            checkpoints.append(open_checkpoint(p))
        names = tensor_names(checkpoints, labels)
        per_tensor = _stream(checkpoints, paths, names, densities, progress, workers)
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    ft_labels = labels[1:]
    per_group: dict[int | str, Stats] = {}
    for name, st in per_tensor.items():
        per_group.setdefault(group_of(name), Stats.empty(len(ft_labels), densities)).add(st)
    total = Stats.empty(len(ft_labels), densities)
    for st in per_group.values():
        total.add(st)
    overall = figures(total, ft_labels)
    layers = [
        {"layer": g, **figures(per_group[g], ft_labels)} for g in sorted(per_group, key=group_order)
    ]
    tensors = [
        {"name": name, "layer": group_of(name), **figures(st, ft_labels)}
        for name, st in per_tensor.items()
    ]
    findings, recommendation = assess(overall, layers, densities)
    return AnalysisResult(
        base=str(base),
        models=[
            {"model": lab, "path": str(p)} for lab, p in zip(ft_labels, finetunes, strict=True)
        ],
        densities=densities,
        overall=overall,
        layers=layers,
        tensors=tensors,
        findings=findings,
        recommendation=recommendation,
    )


def default_workers(entries: int) -> int:
    """One process per usable core; just this one below SMALL entries per checkpoint, where
    starting workers would cost more than they save."""
    if entries < SMALL:
        return 1
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _stream(
    checkpoints: Sequence[Checkpoint],
    paths: Sequence[str],
    names: Sequence[str],
    densities: tuple[float, ...],
    progress: Progress | None,
    workers: int | None,
) -> dict[str, Stats]:
    """Statistics of every tensor, in `names` order: measured with the open `checkpoints` in
    this process, or by `workers` processes that open `paths` themselves.

    Processes, not threads: numpy's many short calls per chunk hold the GIL often enough that
    threads measured no faster than one. Largest tensors go first, so workers end together.
    """
    numels = {name: checkpoints[0][name].numel for name in names}
    if workers is None:
        workers = default_workers(sum(numels.values()))
    workers = min(workers, len(names))
    order = sorted(names, key=lambda name: -numels[name])
    if workers <= 1:
        measure = _Measurer(checkpoints, densities)
        with threadpool_limits(1, user_api="blas"):
            return _collect(map(measure, order), names, progress)
    with warnings.catch_warnings():
        # Python 3.12+ warns of every fork once numpy's BLAS has started its own idle
        # threads; BLAS libraries reset those across fork, so the warning does not apply
        warnings.filterwarnings("ignore", "This process .* is multi-threaded", DeprecationWarning)
        pool = _pool_context().Pool(workers, _start_worker, (paths, densities))
    with pool:
        return _collect(pool.imap_unordered(_measure_in_worker, order), names, progress)


def _collect(
    results: Iterable[tuple[str, Stats]], names: Sequence[str], progress: Progress | None
) -> dict[str, Stats]:
    """Each tensor's statistics as they are done, reported to `progress`, in `names` order."""
    measured: dict[str, Stats] = {}
    for done, (name, st) in enumerate(results, 1):
        measured[name] = st
        if progress is not None:
            progress(done, len(names), name)
    return {name: measured[name] for name in names}


def _pool_context() -> BaseContext:
    """fork where it is cheap and safe: on Linux, while this process runs no other Python
    thread (a thread could hold a lock the child would wait on forever); spawn elsewhere."""
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


class _Measurer:
    """Open `checkpoints`, measured one tensor at a time."""

    def __init__(self, checkpoints: Sequence[Checkpoint], densities: tuple[float, ...]):
        keep_chunk_memory()
        self.densities = densities
        self.checkpoints = checkpoints

    def __call__(self, name: str) -> tuple[str, Stats]:
        refs = [ckpt[name] for ckpt in self.checkpoints]

        def release(lo: int, hi: int) -> None:
            for ref in refs:
                ref.release(lo, hi)

        st, sample = exact_sums([ref.values() for ref in refs], self.densities, release=release)
        add_trimmed(st, sample)
        return name, st


_worker: _Measurer | None = None  # a worker process's own, set by _start_worker


def _start_worker(paths: Sequence[str], densities: tuple[float, ...]) -> None:
    """Open the checkpoints in a new worker process (they stay open until it ends), with BLAS
    limited to its one thread."""
    global _worker
    threadpool_limits(1, user_api="blas")
    _worker = _Measurer([open_checkpoint(p) for p in paths], densities)


def _measure_in_worker(name: str) -> tuple[str, Stats]:
    """One tensor, measured with this worker's open checkpoints."""
    assert _worker is not None, "_start_worker runs first in every worker"
    return _worker(name)

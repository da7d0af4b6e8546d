"""One streaming pass over a base and its fine-tunes: measure a tensor of every checkpoint
straight from the memory maps, chunk by chunk, sum its statistics into its layer's, go on."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from threadpoolctl import threadpool_limits

from mmerge.analyze.figures import figures
from mmerge.analyze.groups import group_of, group_order
from mmerge.analyze.result import AnalysisResult
from mmerge.analyze.stats import Stats, add_trimmed, exact_sums
from mmerge.analyze.verdicts import assess
from mmerge.engine.allocator import keep_chunk_memory
from mmerge.errors import InvalidInput, PlanError
from mmerge.io import open_checkpoint

Progress = Callable[[int, int, str], None]


def _is_float(code: str) -> bool:
    """Whether a safetensors dtype code is a floating-point one (F64 ... F8_E5M2, BF16)."""
    return code.startswith(("F", "BF"))


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
    names = [n for n, ref in base.items() if _is_float(ref.dtype)]
    for name in names:
        for ckpt, label in zip(checkpoints[1:], labels[1:], strict=True):
            if not _is_float(ckpt[name].dtype):
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
) -> AnalysisResult:
    """Measure how well `finetunes` of `base` will merge, in one streaming pass.

    Returns per-tensor, per-layer and whole-model figures, findings and a recommendation.
    Memory stays near a few copies of the largest tensor per model.
    """
    if isinstance(finetunes, (str, os.PathLike)) or not finetunes:
        raise InvalidInput("analyze needs a base and at least one fine-tune (a list of paths)")
    densities = check_densities(densities)
    paths = [base, *finetunes]
    labels = labels_for(paths)
    checkpoints = []
    try:
        for p in paths:
            checkpoints.append(open_checkpoint(p))
        names = tensor_names(checkpoints, labels)
        per_tensor, per_group = _stream(checkpoints, names, densities, progress)
    finally:
        for ckpt in checkpoints:
            ckpt.close()
    ft_labels = labels[1:]
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


def _stream(
    checkpoints: Sequence[Mapping],
    names: Sequence[str],
    densities: tuple[float, ...],
    progress: Progress | None,
) -> tuple[dict[str, Stats], dict[int | str, Stats]]:
    """Statistics of every tensor and their sums per layer group.

    Each tensor is read straight from the files' memory maps, a chunk at a time, by one thread
    per core over spans of it; meanwhile another thread measures top-k trimming on the sample of
    the tensor before (small and in cache, so it barely competes with the reading).
    """
    n = len(checkpoints) - 1
    per_tensor: dict[str, Stats] = {}
    keep_chunk_memory()
    workers = os.cpu_count() or 1
    # BLAS threads of their own would only contend with the measuring threads
    with (
        threadpool_limits(1, user_api="blas"),
        ThreadPoolExecutor(workers) as pool,
        ThreadPoolExecutor(1) as trimmer,
    ):
        pending = None
        for i, name in enumerate(names):
            refs = [ckpt[name] for ckpt in checkpoints]

            def release(lo: int, hi: int, refs=refs) -> None:
                for ref in refs:
                    ref.release(lo, hi)

            rows = [ref.values() for ref in refs]
            st, sample = exact_sums(
                rows, densities, parts=workers, mapper=pool.map, release=release
            )
            del rows
            if pending is not None:
                pending.result()  # one sample waiting at a time bounds memory
            pending = trimmer.submit(add_trimmed, st, sample)
            per_tensor[name] = st
            if progress is not None:
                progress(i + 1, len(names), name)
        if pending is not None:
            pending.result()
    per_group: dict[int | str, Stats] = {}
    for name, st in per_tensor.items():
        per_group.setdefault(group_of(name), Stats.empty(n, densities)).add(st)
    return per_tensor, per_group

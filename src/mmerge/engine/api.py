"""The library API, mirroring the command line: merge checkpoints on disk or arrays in memory."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmerge.engine.execute import Execution, estimate_peak
from mmerge.engine.layers import layer_count, layer_index
from mmerge.engine.output import OutputOptions, write_plan
from mmerge.engine.plan import MISMATCH_HINT, Plan, Source, _per_tensor_params, build_plan
from mmerge.engine.quantized_output import plan_dtype, requantize, wants_fp8
from mmerge.errors import InvalidInput, MergeWarning, PlanError
from mmerge.methods.registry import get

PathLike = str | os.PathLike


@dataclass
class MergeResult:
    """What a merge did (or, for a dry run, would do)."""

    output: Path | None
    plan: Plan
    peak_bytes: int
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Tensors, bytes to read and write, estimated working memory: the dry-run report."""
        return {
            "method": self.plan.method.name,
            "tensors": len(self.plan.items),
            "copied": sum(1 for i in self.plan.items if i.is_copy),
            "bytes_read": self.plan.bytes_read(),
            "bytes_written": self.plan.bytes_written(),
            "estimated_peak_bytes": self.peak_bytes,
        }


def default_method(n_models: int, has_base: bool) -> str:
    """slerp (t=0.5) for two models, linear for more; task_arithmetic when a base is given."""
    if has_base:
        return "task_arithmetic"
    return "slerp" if n_models == 2 else "linear"


def merge(
    inputs: Sequence[PathLike],
    output: PathLike,
    *,
    method: str | None = None,
    base: PathLike | None = None,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    backend: str = "numpy",
    device: str | None = None,
    compute_dtype: str = "float32",
    out_dtype: str | None = None,
    shard_size: int | None = None,
    resume: bool = False,
    allow_mismatch: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    on_progress=None,
    executor: str = "local",
    ray_address: str | None = None,
    **params: Any,
) -> MergeResult:
    """Merge checkpoints (files or HF folders) into `output`, streaming tensor by tensor.

    `params` are the method's global parameters (scalars, gradients or filter lists);
    `model_params` gives per-model ones (e.g. `[{"weight": 0.3}, {"weight": 0.7}]`).
    An existing non-empty `output` is refused unless `overwrite`; then it is replaced once the
    new output is complete. `executor="ray"` computes each output shard as a Ray task on the
    cluster at `ray_address` ("auto", "HOST:PORT"; None: Ray's default), same bits.
    """
    from mmerge.io import open_checkpoint

    if not inputs:
        raise InvalidInput("no input checkpoints given")
    run = _execution(backend, device, compute_dtype, on_progress, executor, ray_address)
    with contextlib.ExitStack() as opened:  # every checkpoint opened here is closed on return
        models = [opened.enter_context(open_checkpoint(p)) for p in inputs]
        base_ckpt = opened.enter_context(open_checkpoint(base)) if base is not None else None
        per_model = list(model_params or [{} for _ in models])
        if len(per_model) != len(models):
            raise InvalidInput(
                f"{len(per_model)} per-model parameter sets for {len(models)} models"
            )
        sources = [Source(c, dict(p), label=str(c.path)) for c, p in zip(models, per_model)]
        base_src = Source(base_ckpt, {}, label=str(base_ckpt.path)) if base_ckpt else None
        name = method or default_method(len(models), base_ckpt is not None)
        plan = build_plan(
            sources,
            method=name,
            base=base_src,
            params=params,
            out_dtype=plan_dtype(out_dtype),
            allow_mismatch=allow_mismatch,
        )
        folder = (base_ckpt or models[0]).path
        checkpoints = [*models, *([base_ckpt] if base_ckpt else [])]
        if wants_fp8(out_dtype):
            requantize(plan, checkpoints, folder)
        return execute_plan(
            plan,
            checkpoints,
            output,
            copy_files_from=folder if folder.is_dir() else None,
            run=run,
            shard_size=shard_size,
            resume=resume,
            overwrite=overwrite,
            dry_run=dry_run,
        )


def _execution(
    backend: str,
    device: str | None,
    compute_dtype: str,
    on_progress,
    executor: str = "local",
    ray_address: str | None = None,
) -> Execution:
    from mmerge.backend import resolve

    if compute_dtype not in ("float32", "float64"):
        raise InvalidInput(f"compute dtype must be float32 or float64, got {compute_dtype!r}")
    check_executor(executor, ray_address)
    backend, device = resolve(backend, device)
    return Execution(
        backend=backend,
        device=device,
        compute_dtype=compute_dtype,
        on_progress=on_progress,
        executor=executor,
        address=ray_address,
    )


EXECUTORS = ("local", "ray")


def check_executor(executor: str, ray_address: str | None) -> None:
    """Refuse an unknown executor, an address without Ray, and Ray when it is not installed."""
    if executor not in EXECUTORS:
        raise InvalidInput(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor != "ray" and ray_address is not None:
        raise InvalidInput("a Ray address needs the ray executor (--executor ray)")
    if executor == "ray":
        from mmerge.engine.distributed import import_ray

        import_ray()


def execute_plan(
    plan: Plan,
    checkpoints: Sequence,
    output: PathLike,
    *,
    copy_files_from: Path | None,
    run: Execution,
    shard_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
) -> MergeResult:
    """Write a validated plan (or only describe it, for a dry run, which also checks that the
    output may be written)."""
    from mmerge.io.output_path import check_replaceable

    peak = estimate_peak(plan, run)
    check_replaceable(Path(output), overwrite)
    if run.executor == "ray" and plan.requantization is not None:
        raise InvalidInput(
            "the ray executor does not write fp8 output (a weight and its scales may fall in "
            "different shards); use the local executor"
        )
    if dry_run:
        return MergeResult(None, plan, peak, plan.warnings)
    options = OutputOptions(
        path=Path(output),
        shard_size=shard_size,
        resume=resume,
        copy_files_from=copy_files_from,
        overwrite=overwrite,
    )
    final = write_plan(plan, checkpoints, options, run)
    return MergeResult(final, plan, peak, plan.warnings)


def merge_tensors(
    models: Sequence[Mapping[str, Any]],
    *,
    method: str,
    base: Mapping[str, Any] | None = None,
    model_params: Sequence[Mapping[str, Any]] | None = None,
    allow_mismatch: bool = False,
    **params: Any,
) -> dict[str, Any]:
    """Merge state dicts held in memory (name -> array of any supported library).

    Same rules as `merge`: gradients and filters in `params`, per-model `model_params` (one
    mapping per model); a tensor that some models lack or hold in another shape is an error,
    or with `allow_mismatch` copied from the base (or first model) with a `MergeWarning`;
    integer and boolean tensors (step counters) are copied from the base (or first model),
    with a warning when the models disagree about them. Passes over the whole model (`scope:
    model`) span every merged tensor, as in a streamed merge.
    """
    from mmerge.methods.contract import run_passes

    spec = get(method)
    spec.check_count(len(models), base is not None)
    per_model = list(model_params) if model_params is not None else [{} for _ in models]
    if len(per_model) != len(models):
        raise InvalidInput(f"{len(per_model)} per-model parameter sets for {len(models)} models")
    labels = [f"model {i}" for i in range(len(models))]
    sources = [Source(m, dict(p), label=lb) for m, p, lb in zip(models, per_model, labels)]
    everyone = list(zip([*models, *([base] if base is not None else [])], [*labels, "the base"]))
    reference, ref_label = (base, "the base") if base is not None else (models[0], labels[0])
    names = dict.fromkeys(reference)
    for state, _ in everyone:
        names.update(dict.fromkeys(n for n in state if n not in names))
    n_layers = layer_count(reference)
    out: dict[str, Any] = {}
    merged: list[tuple[str, Any]] = []  # (name, (job, chunk, finish)) of the tensors to merge
    for name in names:
        holders = [(state[name], label) for state, label in everyone if name in state]
        problem = _mismatch(name, everyone, holders)
        if problem:
            if not allow_mismatch:
                raise PlanError(f"{problem} ({MISMATCH_HINT})")
            if name in reference:
                out[name] = reference[name]
                _warn(f"{problem}; copied from {ref_label}")
            else:
                _warn(f"{problem}; left out (not in {ref_label})")
            continue
        if not _is_float(reference[name]):
            if any(not _equal(reference[name], x) for x, _ in holders):
                _warn(f"integer tensor {name!r} differs between the models; kept {ref_label}'s")
            out[name] = reference[name]
            continue
        values = _per_tensor_params(spec, params, sources, name, layer_index(name), n_layers)
        tensors = [s.checkpoint[name] for s in sources]
        at_base = None if base is None else base[name]
        with _naming(name):
            merged.append((name, spec.prepared(tensors, at_base, name, values)))
        out[name] = None  # filled below, in this order

    def measure(i: int, p):
        job, chunk, _ = merged[i][1]
        with _naming(merged[i][0]):
            return p.measure(job, chunk)

    def ready(i: int) -> None:
        name, (job, chunk, finish) = merged[i]
        with _naming(name):
            out[name] = finish(spec.apply(job, chunk))

    run_passes([job for _, (job, _, _) in merged], measure, ready)
    return out


@contextlib.contextmanager
def _naming(name: str):
    """InvalidInput raised inside, with the tensor's name added."""
    try:
        yield
    except InvalidInput as exc:
        raise InvalidInput(f"{exc} (tensor {name!r})") from None


def _mismatch(name: str, everyone, holders) -> str:
    """Why tensor `name` cannot be merged as it is (missing somewhere, shapes differ), or ''."""
    missing = [label for state, label in everyone if name not in state]
    if missing:
        return f"tensor {name!r} is missing from {', '.join(missing)}"
    shapes = {tuple(x.shape) for x, _ in holders}
    if len(shapes) > 1:
        listed = ", ".join(f"{label} {tuple(x.shape)}" for x, label in holders)
        return f"tensor {name!r} has mismatched shapes: {listed}"
    return ""


def _is_float(x: Any) -> bool:
    from mmerge import backend

    if backend.is_numpy_bfloat16(x):
        return True
    xp = backend.namespace(x)
    return bool(xp.isdtype(x.dtype, "real floating"))


def _equal(a: Any, b: Any) -> bool:
    from mmerge import backend

    if backend.library_name(a) != backend.library_name(b) or a.dtype != b.dtype:
        return False
    xp = backend.namespace(a, b)
    return bool(xp.all(a == b))


def _warn(message: str) -> None:
    warnings.warn(message, MergeWarning, stacklevel=3)


def run_recipe(
    recipe: PathLike | Mapping[str, Any],
    output: PathLike,
    *,
    backend: str = "numpy",
    device: str | None = None,
    compute_dtype: str = "float32",
    shard_size: int | None = None,
    resume: bool = False,
    allow_mismatch: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    on_progress=None,
    executor: str = "local",
    ray_address: str | None = None,
) -> MergeResult:
    """Run a mergekit-style recipe (a YAML path or the same structure as a dict); options as
    in `merge`."""
    from mmerge.engine.recipe import load_recipe, plan_recipe

    data, root = load_recipe(recipe)
    run = _execution(backend, device, compute_dtype, on_progress, executor, ray_address)
    with contextlib.ExitStack() as opened:  # every checkpoint opened here is closed on return
        plan, checkpoints, copy_from = plan_recipe(
            data, root, opened, allow_mismatch=allow_mismatch
        )
        return execute_plan(
            plan,
            checkpoints,
            output,
            copy_files_from=copy_from,
            run=run,
            shard_size=shard_size,
            resume=resume,
            overwrite=overwrite,
            dry_run=dry_run,
        )

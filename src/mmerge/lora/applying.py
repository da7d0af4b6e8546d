"""`lora apply`: a base checkpoint with adapters merged in, streamed like any merge."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from mmerge.engine.api import MergeResult, execute_plan
from mmerge.engine.execute import Execution
from mmerge.engine.plan import Source, build_plan
from mmerge.engine.quantized_output import plan_dtype, requantize, wants_fp8

PathLike = str | os.PathLike


def open_adapted(
    base: PathLike,
    adapters: Sequence[PathLike],
    weights: Sequence[float] | None = None,
    *,
    backend: str = "numpy",
    device: str | None = None,
):
    """The base checkpoint with `adapters` applied on read (validated from headers)."""
    from mmerge.io import open_checkpoint
    from mmerge.io.adapted import AdaptedCheckpoint
    from mmerge.io.adapter import open_adapter

    base_ckpt = open_checkpoint(base)
    opened = []
    try:
        for path in adapters:
            opened.append(open_adapter(path))
        return AdaptedCheckpoint(
            base_ckpt, opened, weights, backend=backend, device=device, owns_base=True
        )
    except BaseException:
        for adapter in opened:
            adapter.close()
        base_ckpt.close()
        raise


def apply(
    base: PathLike,
    adapters: Sequence[PathLike],
    output: PathLike,
    *,
    weights: Sequence[float] | None = None,
    backend: str = "numpy",
    device: str | None = None,
    out_dtype: str | None = None,
    shard_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
    on_progress=None,
    executor: str = "local",
    ray_address: str | None = None,
) -> MergeResult:
    """Write `base` with `adapters` merged in: W + sum_i w_i s_i B_i A_i per row block in float32,
    rounded once to the output dtype (DoRA, embedding LoRA, lora_B biases and modules_to_save
    as PEFT merges them). An fp8 base is read as its dequantized values; `out_dtype="fp8"`
    requantizes its quantized weights with fresh block scales. The output is a checkpoint like
    the base: a folder with its config and tokenizer files, or one file for a name ending in
    .safetensors; an existing one is replaced only with `overwrite`."""
    from mmerge.backend import resolve
    from mmerge.engine.api import check_executor

    check_executor(executor, ray_address)
    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    backend, device = resolve(backend, device)
    adapted = open_adapted(base, adapters, weights, backend=backend, device=device)
    plan = build_plan(
        [Source(adapted, {}, label=adapted.label)],
        method="passthrough",
        out_dtype=plan_dtype(out_dtype),
    )
    plan.parameters = {
        "lora_adapters": [str(a.path) for a in adapted.adapters],
        "weights": adapted.weights,
    }
    folder = Path(base)
    try:
        if wants_fp8(out_dtype):
            requantize(plan, [adapted], folder)
        return execute_plan(
            plan,
            [adapted, *(a.checkpoint for a in adapted.adapters)],
            output,
            copy_files_from=folder if folder.is_dir() else None,
            run=Execution(
                backend=backend,
                device=device,
                on_progress=on_progress,
                executor=executor,
                address=ray_address,
            ),
            shard_size=shard_size,
            resume=resume,
            overwrite=overwrite,
            dry_run=dry_run,
        )
    finally:
        adapted.close()

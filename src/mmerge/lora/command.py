"""The `mmerge lora` commands: apply, combine and extract PEFT LoRA adapters."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from mmerge.cli import (
    _Group,
    _numbers,
    _param_value,
    _Progress,
    debug_option,
    device_options,
    executor_options,
    human,
    parse_size,
    with_options,
)


def _weights(text: str | None, count: int) -> list[float] | None:
    if text is None:
        return None
    values = _numbers(text, "--weights")
    values = values if isinstance(values, list) else [values]
    if len(values) != count:
        raise click.BadParameter(
            f"{len(values)} weights for {count} adapters", param_hint="--weights"
        )
    return values


def common_options(f):
    """Options every `lora` command takes."""
    options = [
        click.option(
            "-o", "--output", required=True, type=click.Path(path_type=Path), help="Output path."
        ),
        *device_options,
        click.option(
            "--out-dtype",
            default=None,
            help="Output dtype (bfloat16, float16, float32; for apply on an fp8 base also fp8, "
            "which requantizes its fp8 weights with fresh block scales).",
        ),
        click.option(
            "--resume", is_flag=True, help="Continue an interrupted run from what it wrote."
        ),
        click.option(
            "--dry-run",
            is_flag=True,
            help="Validate and print what would be written; write nothing.",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary."),
        debug_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


overwrite_option = click.option(
    "--overwrite", is_flag=True, help="Replace an existing adapter folder at OUTPUT."
)
report_option = click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the per-module report as JSON.",
)


@click.group("lora", cls=_Group)
def lora() -> None:
    """Apply, combine and extract PEFT LoRA adapters (adapter_config.json plus
    adapter_model.safetensors), exactly and streamed.

    \b
    Examples:
      mmerge lora apply base/ adapter/ -o merged/
      mmerge lora combine ad1/ ad2/ --weights 0.5,-0.5 -o combined/
      mmerge lora combine ad1/ ad2/ --method ties --density 0.5 --rank 32 -o combined/
      mmerge lora extract base/ finetuned/ --rank 64 -o adapter/
    """


@lora.command("apply")
@click.argument("base", type=click.Path(exists=True, path_type=Path))
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-w", "--weights", default=None, help="Per-adapter weights, e.g. 1,0.5 (default 1).")
@click.option("--shard-size", default=None, metavar="SIZE", help="Maximum shard size (5GB, 500MB).")
@click.option(
    "--overwrite", is_flag=True, help="Replace an existing checkpoint at OUTPUT once done."
)
@common_options
@with_options(executor_options)
def apply_command(
    base,
    adapters,
    weights,
    shard_size,
    overwrite,
    executor,
    ray_address,
    output,
    backend,
    device,
    out_dtype,
    resume,
    dry_run,
    quiet,
):
    """Merge ADAPTERS into BASE: W + sum_i w_i s_i B_i A_i, computed per row block in float32
    and rounded once (DoRA, embedding LoRA, lora_B biases and modules_to_save included).

    The output is a checkpoint like BASE: a folder with its config and tokenizer files, or one
    file for a name ending in .safetensors.

    \b
    Examples:
      mmerge lora apply base/ adapter/ -o merged/
      mmerge lora apply base/ math/ code/ --weights 0.7,0.3 -o merged.safetensors
    """
    from mmerge.io.adapted import AdaptedTensorRef
    from mmerge.lora.applying import apply

    kwargs = dict(
        weights=_weights(weights, len(adapters)),
        backend=backend,
        device=device,
        out_dtype=out_dtype,
        shard_size=parse_size(shard_size) if shard_size else None,
        resume=resume,
        overwrite=overwrite,
        executor=executor,
        ray_address=ray_address,
    )

    started = time.perf_counter()
    bar = None
    if not dry_run and not quiet and sys.stderr.isatty():
        bar = _Progress()  # its total comes from the merge itself: the plan is built once
    try:
        result = apply(base, list(adapters), output, dry_run=dry_run, on_progress=bar, **kwargs)
    finally:
        if bar is not None:
            bar.close()
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if quiet:
        return
    adapted = sum(1 for item in result.plan.items if isinstance(item.sources[0], AdaptedTensorRef))
    s = result.summary()
    what = f"{adapted} of {s['tensors']} tensors adapted by {len(adapters)} adapter(s)"
    if dry_run:
        click.echo(what)
        click.echo(f"bytes to read   {human(s['bytes_read'])}")
        click.echo(f"bytes to write  {human(s['bytes_written'])}")
        click.echo("dry run: nothing written")
        return
    secs = time.perf_counter() - started
    click.echo(f"{what} in {secs:.1f} s ({human(s['bytes_written'])} written) -> {result.output}")


@lora.command("combine")
@click.argument("adapters", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("-w", "--weights", default=None, help="Per-adapter weights, e.g. 0.5,-0.5.")
@click.option(
    "--rank",
    type=click.IntRange(min=1),
    default=None,
    help="Output rank: recompress (linear) or re-extract (other methods). "
    "[default: the sum of the ranks]",
)
@click.option(
    "-m",
    "--method",
    default="linear",
    show_default=True,
    help="linear (exact sum of the deltas) or a task-vector method: ties, dare_ties, "
    "dare_linear, breadcrumbs, della, ...",
)
@click.option("--density", default=None, help="Fraction of each delta kept (trimming methods).")
@click.option(
    "--seed", default=0, show_default=True, type=int, help="Seed of random drops and sketches."
)
@click.option(
    "-p", "--param", "extra", multiple=True, metavar="KEY=VALUE", help="Other method parameters."
)
@report_option
@overwrite_option
@common_options
def combine_command(
    adapters,
    weights,
    rank,
    method,
    density,
    seed,
    extra,
    report,
    overwrite,
    output,
    backend,
    device,
    out_dtype,
    resume,
    dry_run,
    quiet,
):
    """Combine ADAPTERS (of one base) into one PEFT adapter at OUTPUT.

    By default the sum of w_i times each adapter's delta, exactly (the factors are stacked:
    the rank is the sum of the ranks). --rank K recompresses it to the best rank-K adapter
    without forming the delta, and reports the share of each module's energy kept. A
    task-vector --method merges the deltas themselves, module by module, and re-extracts the
    result at rank K.

    \b
    Examples:
      mmerge lora combine ad1/ ad2/ --weights 0.5,-0.5 -o combined/
      mmerge lora combine ad1/ ad2/ ad3/ --rank 16 -o combined/
      mmerge lora combine ad1/ ad2/ --method ties --density 0.5 --rank 32 -o combined/
    """
    from mmerge.lora.combining import combine

    params = {}
    if density is not None:
        params["density"] = _numbers(density, "--density")
    for item in extra:
        key, value = _param_value(item)
        params[key] = value
    if method != "linear":
        from mmerge.methods.registry import get

        if any(p.name == "seed" for p in get(method).params):
            params.setdefault("seed", seed)
    started = time.perf_counter()
    result = combine(
        list(adapters),
        output,
        weights=_weights(weights, len(adapters)),
        rank=rank,
        method=method,
        params=params,
        seed=seed,
        backend=backend,
        device=device,
        out_dtype=out_dtype,
        resume=resume,
        overwrite=overwrite,
        dry_run=dry_run,
    )
    _adapter_report(result, "combined", quiet, dry_run, started, report)


@lora.command("extract")
@click.argument("base", type=click.Path(exists=True, path_type=Path))
@click.argument("finetuned", type=click.Path(exists=True, path_type=Path))
@click.option(
    "-r", "--rank", required=True, type=click.IntRange(min=1), help="Largest rank per module."
)
@click.option(
    "--rank-rule",
    type=click.Choice(["fixed", "epsilon", "energy"]),
    default="fixed",
    show_default=True,
    help="fixed: RANK everywhere; epsilon: singular values >= EPSILON x the largest; "
    "energy: the fewest components holding ENERGY of the delta's squared norm.",
)
@click.option(
    "--epsilon", default=0.01, show_default=True, type=float, help="For --rank-rule epsilon."
)
@click.option(
    "--energy", default=0.99, show_default=True, type=float, help="For --rank-rule energy."
)
@click.option(
    "--embed",
    is_flag=True,
    help="LoRA on the embeddings and output head too (else modules_to_save).",
)
@click.option("--include", default=None, metavar="REGEX", help="Only tensors whose name matches.")
@click.option(
    "--exclude", default=None, metavar="REGEX", help="Leave out tensors whose name matches."
)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random sketch.")
@click.option(
    "--oversample",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="Extra sketch columns.",
)
@click.option(
    "--power-iters",
    default=1,
    show_default=True,
    type=click.IntRange(min=0),
    help="Power iterations.",
)
@report_option
@overwrite_option
@common_options
def extract_command(
    base,
    finetuned,
    rank,
    rank_rule,
    epsilon,
    energy,
    embed,
    include,
    exclude,
    seed,
    oversample,
    power_iters,
    report,
    overwrite,
    output,
    backend,
    device,
    out_dtype,
    resume,
    dry_run,
    quiet,
):
    """Extract a PEFT LoRA adapter from a fine-tune: FINETUNED ~ BASE + B A per weight matrix.

    Randomized SVD of each delta, formed a row block at a time (the models are never held);
    the result is the same on every backend up to rounding. Changed norms and biases go to
    modules_to_save, or are reported when their module is a LoRA layer.

    \b
    Examples:
      mmerge lora extract base/ finetuned/ --rank 64 -o adapter/
      mmerge lora extract base/ ft/ --rank 128 --rank-rule energy --energy 0.9 -o adapter/
      mmerge lora extract base/ ft/ --rank 16 --include 'self_attn' --embed -o adapter/
    """
    from mmerge.lora.extracting import extract

    started = time.perf_counter()
    bar = None
    on_progress = None
    if not quiet and not dry_run and sys.stderr.isatty():
        from tqdm import tqdm

        from mmerge.io import open_checkpoint

        with open_checkpoint(finetuned) as ft:
            total = 2 * ft.nbytes
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="extracting", leave=False)
        on_progress = bar.update
    try:
        result = extract(
            base,
            finetuned,
            output,
            rank=rank,
            rank_rule=rank_rule,
            epsilon=epsilon,
            energy=energy,
            embed=embed,
            include=include,
            exclude=exclude,
            oversample=oversample,
            power_iters=power_iters,
            seed=seed,
            backend=backend,
            device=device,
            out_dtype=out_dtype,
            resume=resume,
            overwrite=overwrite,
            dry_run=dry_run,
            on_progress=on_progress,
        )
    finally:
        if bar is not None:
            bar.close()
    _adapter_report(result, "extracted", quiet, dry_run, started, report)


def _adapter_report(result, verb: str, quiet: bool, dry_run: bool, started: float, report) -> None:
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if report is not None and not dry_run:
        rows = {m: {"rank": r.rank, "energy_kept": r.energy} for m, r in result.modules.items()}
        report.write_text(json.dumps({"modules": rows, "summary": result.summary()}, indent=2))
    if quiet:
        return
    s = result.summary()
    if dry_run:
        click.echo(f"modules         {s['modules']} (rank {s['rank_min']}..{s['rank_max']})")
        click.echo(f"bytes to write  {human(s['bytes_written'])}")
        click.echo("dry run: nothing written")
        return
    secs = time.perf_counter() - started
    saved = f", {s['modules_to_save']} modules saved whole" if s["modules_to_save"] else ""
    click.echo(
        f"{verb} {s['modules']} LoRA modules (rank {s['rank_min']}..{s['rank_max']}; energy "
        f"kept min {s['energy_min']:.4f} at {s['energy_min_module'] or '-'}, mean "
        f"{s['energy_mean']:.4f}){saved} in {secs:.1f} s -> {result.output}"
    )

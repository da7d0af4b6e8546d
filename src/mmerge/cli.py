"""The `mmerge` command: parses, prints, and hands everything else to the library."""

from __future__ import annotations

import importlib
import json
import re
import sys
import time
from pathlib import Path

import click

from mmerge.errors import InvalidInput, MmergeError
from mmerge.units import human

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '2GiB' -> 2**31, '1000' -> 1000 bytes."""
    m = _SIZE.match(text)
    if not m:
        raise click.BadParameter(f"{text!r} is not a size such as 5GB, 500MB or 2GiB")
    unit = (m.group(2) or "").lower().removesuffix("b")
    return int(float(m.group(1)) * _UNITS[unit])


def _numbers(text: str, what: str) -> float | list[float]:
    """'0.5' -> 0.5; '0,0.5,1' -> [0.0, 0.5, 1.0] (a gradient over layers, or per-model values)."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{what} must be a number or comma-separated numbers") from None
    return values[0] if len(values) == 1 else values


def _param_value(text: str):
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise click.BadParameter(f"{text!r}: expected KEY=VALUE, e.g. gamma=0.01")
    return key.strip(), yaml.safe_load(value)


INTERRUPTED = 130  # the shell's exit status for a process ended by Ctrl-C


class _Group(click.Group):
    """Turns library errors into one clear line; a traceback only with --debug. Subcommands in
    `lazy` ("name": "module:attribute") are imported when used or listed, so each command loads
    only its own modules and those modules may import this one."""

    lazy: dict[str, str] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, attribute = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MmergeError as exc:
            if ctx.meta.get("mmerge.debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2 if isinstance(exc, InvalidInput) else 1)
        except KeyboardInterrupt:
            hint = "; run the same command with --resume to continue" if _resumable(ctx) else ""
            click.echo(f"interrupted{hint}", err=True)
            ctx.exit(INTERRUPTED)
        except OSError as exc:
            if ctx.meta.get("mmerge.debug"):
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


def _resumable(ctx: click.Context) -> bool:
    """True when the interrupted subcommand takes --resume."""
    name = ctx.invoked_subcommand
    command = ctx.command.get_command(ctx, name) if name else None  # type: ignore[attr-defined]
    return command is not None and any(p.name == "resume" for p in command.params)


def _set_debug(ctx: click.Context, _param, value: bool) -> bool:
    if value:
        ctx.meta["mmerge.debug"] = True
    return value


debug_option = click.option(
    "--debug",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_set_debug,
    help="Show a full traceback on errors.",
)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmerge", prog_name="mmerge")
@debug_option
def cli() -> None:
    """Merge fine-tuned checkpoints of one base model, tensor by tensor, on any array library.

    \b
    Examples:
      mmerge stream a.safetensors b.safetensors -o merged.safetensors
      mmerge stream ft1/ ft2/ --base base/ --method ties --density 0.5 -o out/
      mmerge run recipe.yaml -o out/
      mmerge inspect out/
      mmerge methods ties
    """


device_options = (
    click.option(
        "--backend",
        default="numpy",
        show_default=True,
        type=click.Choice(["numpy", "torch", "cupy", "mlx", "auto"]),
        help="Array library that computes; auto picks a GPU library when present.",
    ),
    click.option("--device", default=None, help="cpu or cuda (default: the backend's own)."),
)

executor_options = (
    click.option(
        "--executor",
        default="local",
        show_default=True,
        type=click.Choice(["local", "ray"]),
        help="Who computes: this process, or one Ray task per output shard (mmerge[ray]; "
        "inputs and output on storage every node can read).",
    ),
    click.option(
        "--ray-address",
        default=None,
        metavar="auto|HOST:PORT",
        help="The Ray cluster to run on (default: $RAY_ADDRESS, one running on this "
        "machine, or a new one here).",
    ),
)


def with_options(options):
    """A decorator adding `options` (click options, first listed first in --help)."""

    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def execution_options(f):
    """Options shared by `stream` and `run`: where to compute and how to write."""
    options = [
        click.option(
            "-o",
            "--output",
            required=True,
            type=click.Path(path_type=Path),
            help="Output: NAME.safetensors for one file, any other name for an HF "
            "folder with shards and index.",
        ),
        *device_options,
        *executor_options,
        click.option(
            "--compute-dtype",
            default="float32",
            show_default=True,
            type=click.Choice(["float32", "float64"]),
            help="Precision of the arithmetic; 16-bit inputs are widened once.",
        ),
        click.option(
            "--shard-size",
            default=None,
            metavar="SIZE",
            help="Maximum shard size (5GB, 500MB, 2GiB); implies a folder output.",
        ),
        click.option(
            "--resume",
            is_flag=True,
            help="Continue an interrupted merge from the tensors already written.",
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Replace an existing OUTPUT (only once the new one is complete).",
        ),
        click.option(
            "--allow-mismatch",
            is_flag=True,
            help="Copy from the base/first model the tensors that other models lack or hold "
            "in another shape (e.g. a resized vocabulary), with a warning.",
        ),
        click.option(
            "--dry-run",
            is_flag=True,
            help="Validate and print the plan (tensors, bytes, memory); write nothing.",
        ),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary."),
        debug_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


class _Progress:
    """A byte progress bar on the terminal, opened at the merge's first report (which carries
    the total), so the plan is built once."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="merging", leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _report(result, quiet: bool, dry_run: bool, started: float) -> None:
    for w in result.warnings:
        click.echo(f"warning: {w}", err=True)
    if quiet:
        return
    s = result.summary()
    if dry_run:
        click.echo(f"method          {s['method']}")
        click.echo(f"tensors         {s['tensors']} ({s['copied']} copied unchanged)")
        click.echo(f"bytes to read   {human(s['bytes_read'])}")
        click.echo(f"bytes to write  {human(s['bytes_written'])}")
        click.echo(f"peak memory     ~{human(s['estimated_peak_bytes'])} working set (estimate)")
        click.echo("dry run: nothing written")
        return
    secs = time.perf_counter() - started
    click.echo(
        f"merged {s['tensors']} tensors with {s['method']} in {secs:.1f} s "
        f"({human(s['bytes_written'])} written) -> {result.output}"
    )


def _run_with_progress(fn, quiet: bool, dry_run: bool, **kwargs):
    """Run a merge function, with a progress bar on a terminal."""
    started = time.perf_counter()
    progress = None
    if not dry_run and not quiet and sys.stderr.isatty():
        progress = kwargs["on_progress"] = _Progress()
    try:
        result = fn(dry_run=dry_run, **kwargs)
    finally:
        if progress is not None:
            progress.close()
    _report(result, quiet, dry_run, started)
    return result


@cli.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option(
    "-m",
    "--method",
    default=None,
    help="Merge method (see `mmerge methods`). Default: slerp for two models, linear "
    "for more, task_arithmetic with --base.",
)
@click.option(
    "-b",
    "--base",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    help="Base model the fine-tunes were trained from (task vectors = model - base).",
)
@click.option(
    "-t",
    "t",
    default=None,
    help="Interpolation factor (slerp, nearswap); "
    "comma-separated values spread over the layers, e.g. 0,0.5,1.",
)
@click.option(
    "-w", "--weights", default=None, help="Per-model weights, comma-separated, e.g. 0.3,0.7."
)
@click.option(
    "--density",
    default=None,
    help="Fraction of each task vector kept "
    "(ties, dare, breadcrumbs, della); one value or one per model.",
)
@click.option(
    "--lambda", "lambda_", default=None, type=float, help="Scale of the merged task vector."
)
@click.option("--seed", default=None, type=int, help="Seed of DARE/DELLA's random drops.")
@click.option(
    "-p",
    "--param",
    "extra",
    multiple=True,
    metavar="KEY=VALUE",
    help="Any other method parameter, e.g. -p gamma=0.01 -p rescale=none "
    "(YAML values: lists are gradients).",
)
@click.option(
    "--out-dtype",
    default=None,
    help="Output dtype (bfloat16, float16, float32; fp8 requantizes quantized inputs with "
    "fresh block scales); default: the inputs' dtype, or one that holds every input dtype "
    "when they differ (float32 for float16 with bfloat16); bfloat16 for dequantized fp8.",
)
@execution_options
def stream(
    models,
    method,
    base,
    t,
    weights,
    density,
    lambda_,
    seed,
    extra,
    out_dtype,
    allow_mismatch,
    output,
    backend,
    device,
    executor,
    ray_address,
    compute_dtype,
    shard_size,
    resume,
    overwrite,
    dry_run,
    quiet,
):
    """Merge MODELS (files or HF folders) tensor by tensor into OUTPUT.

    Memory stays near the size of the largest tensor, and nothing appears under OUTPUT until
    the merge is complete.

    \b
    Examples:
      mmerge stream a.safetensors b.safetensors -o merged.safetensors
      mmerge stream a b -t 0,0.5,1 -o out/                  # slerp, t over the layers
      mmerge stream ft1 ft2 --base base --method ties --density 0.5 -o out/
      mmerge stream ft1 ft2 --base base --method dare_ties --density 0.3 --seed 7 -o out/
      mmerge stream a b c --method linear --weights 0.5,0.3,0.2 -o soup.safetensors
    """
    from mmerge.engine.api import merge

    params = {}
    if t is not None:
        params["t"] = _numbers(t, "-t")
    if density is not None:
        d = _numbers(density, "--density")
        params["density"] = d
    if lambda_ is not None:
        params["lambda"] = lambda_
    if seed is not None:
        params["seed"] = seed
    for item in extra:
        key, value = _param_value(item)
        params[key] = value
    model_params = None
    if isinstance(params.get("density"), list) and len(params["density"]) == len(models):
        model_params = [{"density": d} for d in params.pop("density")]
    if weights is not None:
        w = _numbers(weights, "--weights")
        w = w if isinstance(w, list) else [w]
        if len(w) != len(models):
            raise click.BadParameter(
                f"{len(w)} weights for {len(models)} models", param_hint="--weights"
            )
        model_params = [
            {**(model_params[i] if model_params else {}), "weight": w[i]}
            for i in range(len(models))
        ]
    size = parse_size(shard_size) if shard_size else None
    kwargs = dict(
        method=method,
        base=base,
        model_params=model_params,
        backend=backend,
        device=device,
        executor=executor,
        ray_address=ray_address,
        compute_dtype=compute_dtype,
        out_dtype=out_dtype,
        shard_size=size,
        resume=resume,
        overwrite=overwrite,
        allow_mismatch=allow_mismatch,
        **params,
    )

    _run_with_progress(lambda **kw: merge(list(models), output, **kw), quiet, dry_run, **kwargs)


@cli.command()
@click.argument("recipe", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@execution_options
def run(
    recipe,
    output,
    backend,
    device,
    executor,
    ray_address,
    compute_dtype,
    shard_size,
    resume,
    overwrite,
    allow_mismatch,
    dry_run,
    quiet,
):
    """Run a mergekit-style YAML RECIPE into OUTPUT.

    Supported keys: merge_method, models (with per-model parameters), base_model, parameters
    (numbers, gradients such as [0, 0.5, 1], and filter lists), dtype, out_dtype, slices with
    layer_range, tokenizer_source: base. Any other key is reported, never ignored.

    \b
    Example recipe:
      merge_method: ties
      base_model: base/
      models:
        - model: ft1/
          parameters: {weight: 0.5, density: 0.5}
        - model: ft2/
          parameters: {weight: 0.5, density: 0.5}
      dtype: bfloat16
    """
    from mmerge.engine.api import run_recipe

    size = parse_size(shard_size) if shard_size else None
    kwargs = dict(
        backend=backend,
        device=device,
        executor=executor,
        ray_address=ray_address,
        compute_dtype=compute_dtype,
        shard_size=size,
        resume=resume,
        overwrite=overwrite,
        allow_mismatch=allow_mismatch,
    )

    _run_with_progress(lambda **kw: run_recipe(recipe, output, **kw), quiet, dry_run, **kwargs)


@cli.command()
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
@debug_option
def inspect(path, as_json):
    """Show the tensors, dtypes, shapes, sizes, metadata and provenance of a checkpoint.

    \b
    Examples:
      mmerge inspect merged.safetensors
      mmerge inspect out/ --json
    """
    from mmerge.describe import describe, render

    info = describe(path)
    click.echo(json.dumps(info, indent=2) if as_json else render(info))


@cli.command()
@click.argument("name", required=False)
@debug_option
def methods(name):
    """List the merge methods, or describe one (parameters, ranges, defaults).

    \b
    Examples:
      mmerge methods
      mmerge methods dare_ties
    """
    from mmerge.methods.registry import all_methods, get

    if name:
        spec = get(name)
        click.echo(f"{spec.name}: {spec.description}")
        click.echo(
            f"  needs base: {'yes' if spec.needs_base else 'no'}; models: "
            f"{spec.min_models}..{spec.max_models or 'any'}"
        )
        if spec.reference:
            click.echo(f"  reference: {spec.reference}")
        for p in spec.params:
            rng = f" in {p.range_text()}" if p.range_text() else ""
            per = " (per model)" if p.per_model else ""
            click.echo(f"  {p.name} = {p.default!r}{rng}{per}: {p.help}")
        return
    rows = [
        (
            s.name,
            "yes" if s.needs_base else "no",
            ", ".join(f"{p.name}={p.default}" for p in s.params) or "-",
            s.description,
        )
        for s in all_methods()
    ]
    head = ("method", "base", "parameters (defaults)", "description")
    widths = [max(len(r[i]) for r in [*rows, head]) for i in range(3)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(head, widths)) + head[3])
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)) + r[3])


cli.lazy = {
    "analyze": "mmerge.analyze.command:analyze",
    "evolve": "mmerge.evolve.command:evolve",
    "lora": "mmerge.lora.command:lora",
}


def run_cli(args: list[str] | None = None) -> int:
    """Run the command line and return its exit status; every error is one line."""
    try:
        status = cli.main(args=args, prog_name="mmerge", standalone_mode=False)
    except click.exceptions.Abort:  # Ctrl-C inside a click prompt or parser
        click.echo("interrupted", err=True)
        return INTERRUPTED
    except click.ClickException as exc:
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see '{ctx.command_path} --help')"
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        return exc.exit_code
    return status if isinstance(status, int) else 0

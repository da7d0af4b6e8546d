"""The `mmerge analyze` command: parse, run the analysis, print and plot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click


class _ProgressBar:
    """A stderr progress bar, made at the first update: tqdm starts a monitor thread, and
    the worker processes are forked, more cheaply, while this process has no other thread."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="tensor", file=sys.stderr, leave=False)
        self.bar.set_postfix_str(name[-40:], refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@click.command(
    "analyze",
    epilog="""\b
Example:
  mmerge analyze base.safetensors math.safetensors code.safetensors \\
      --plot layers.png --density 0.2 --density 0.5
""",
)
@click.argument("base", type=click.Path(exists=True))
@click.argument("finetunes", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print only JSON (every figure) to stdout.")
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False, writable=True),
    help="Write per-layer curves to this PNG file (needs matplotlib: mmerge[plot]).",
)
@click.option(
    "--density",
    "densities",
    type=float,
    multiple=True,
    help="Top-k density for trimming figures; repeat for several. [default: 0.1, 0.3, 0.5]",
)
@click.option("--quiet", "-q", is_flag=True, help="No summary and no progress bar.")
def analyze(
    base: str,
    finetunes: tuple[str, ...],
    as_json: bool,
    plot_path: str | None,
    densities: tuple[float, ...],
    quiet: bool,
) -> None:
    """Measure how well fine-tunes of BASE will merge, before merging them.

    Streams every checkpoint once (files or Hugging Face folders) and reports, per layer and
    for the whole model: task-vector norms and their ratios, task-vector cosines, the angle
    between the full weights, sign conflicts (all entries and those top-k trimming keeps),
    how much of each task vector the top entries hold, and whether each fine-tune really
    shares BASE. Ends with a recommended merge method.
    """
    if plot_path:  # fail before the long pass, not after it
        from mmerge.analyze.plot import pyplot

        pyplot()
        if not Path(plot_path).resolve().parent.is_dir():
            raise click.BadParameter(f"folder of {plot_path} does not exist", param_hint="--plot")
    from mmerge.analyze.scan import analyze as run_analysis  # numpy: not for `mmerge --help`

    bar = _ProgressBar() if not quiet and sys.stderr.isatty() else None
    try:
        result = run_analysis(
            base, list(finetunes), densities=densities or (0.1, 0.3, 0.5), progress=bar
        )
    finally:
        if bar is not None:
            bar.close()
    if plot_path:
        from mmerge.analyze.plot import plot

        plot(result, plot_path)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1, allow_nan=False))
    elif not quiet:
        from mmerge.analyze.report import render

        click.echo(render(result))
        if plot_path:
            click.echo(f"Plot: {plot_path}")

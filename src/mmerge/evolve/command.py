"""The `mmerge evolve` command: parse, show progress, print the summary. Imports no Optuna
until it runs, so `mmerge --help` stays fast and works without the evolve extra."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import click

from mmerge.errors import InvalidInput


def _weights(text: str | None) -> dict[str, float] | None:
    """'acc=1,f1=0.5' -> {'acc': 1.0, 'f1': 0.5}."""
    if not text:
        return None
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            key = ""
        if not sep or not key.strip():
            raise click.BadParameter(
                f"{item!r}: expected METRIC=WEIGHT, e.g. acc=1,f1=0.5",
                param_hint="--metric-weights",
            )
    return out


class _Progress:
    """A bar on a terminal (trials, best, last); one line per trial otherwise."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.tty, self.bar = quiet, sys.stderr.isatty(), None

    def __call__(self, e) -> None:
        if self.quiet:
            return
        last = f"{e.score:.6g}" if e.score is not None else f"failed ({e.failure})"
        best = f"{e.best_score:.6g} (trial {e.best_number})" if e.best_number is not None else "-"
        if not self.tty:
            click.echo(f"trial {e.number}: {last}; best {best}; {e.finished}/{e.total}", err=True)
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=e.total, unit="trial", desc="evolve", leave=False)
        self.bar.set_postfix_str(f"best {best}, last {last[:40]}", refresh=False)
        self.bar.update(e.finished - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stop_on_sigterm() -> None:
    """SIGTERM ends the search as Ctrl-C does: running trials are released for a resume."""

    def handler(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


@click.command(
    "evolve",
    epilog="""\b
Examples:
  mmerge evolve search.yaml --eval-cmd 'python eval.py {model}' --trials 100 -o runs/a
  mmerge evolve search.yaml --evaluator mypkg.scores:score --workers 4 --trials 200 -o runs/b
  mmerge evolve search.yaml --eval-cmd 'CUDA_VISIBLE_DEVICES={worker} lm_eval ... {model}' \\
      --workers 2 --storage postgresql://me@db/evolve --study ties-7b --trials 500 -o runs/c
  mmerge evolve --report runs/a --plot runs/a/study.png
""",
)
@click.argument("search", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option(
    "--eval-cmd",
    help="Shell command scoring a merged model; {model} is its path ({trial}, {worker} also "
    "replaced). Its last output line: a number, or JSON {metric: value}.",
)
@click.option(
    "--evaluator",
    "evaluator_spec",
    metavar="MODULE:FUNCTION",
    help="Python callable given the merged model's path (or its tensors with --in-memory).",
)
@click.option(
    "--in-memory",
    is_flag=True,
    help="Give --evaluator the merged tensors {name: numpy array}; nothing is written "
    "(small models).",
)
@click.option("--trials", type=int, help="Total trials of the study (a rerun resumes up to it).")
@click.option(
    "--sampler",
    type=click.Choice(["cmaes", "tpe", "random"]),
    default="cmaes",
    show_default=True,
)
@click.option(
    "--storage",
    metavar="URL",
    help="Optuna storage: sqlite:///F, postgresql://..., journal:PATH. Default: OUT/study.db.",
)
@click.option("--study", "study_name", default="evolve", show_default=True, help="Study name.")
@click.option("--workers", type=int, default=1, show_default=True, help="Trials run at once.")
@click.option(
    "--keep-top",
    type=int,
    default=None,
    help="Merged models kept (the best K; default 1); the others are deleted once scored. "
    "With --report: how many top trials to list.",
)
@click.option("--seed", type=int, default=None, help="Seed of the sampler.")
@click.option(
    "--direction",
    type=click.Choice(["maximize", "minimize"]),
    default="maximize",
    show_default=True,
    help="Whether a higher or a lower score is better.",
)
@click.option(
    "--metric-weights",
    metavar="M=W,...",
    help="Combine JSON metrics into one score, e.g. acc=1,f1=0.5.",
)
@click.option(
    "--eval-timeout",
    type=float,
    metavar="SECONDS",
    help="A command running longer is killed; the trial fails.",
)
@click.option(
    "--final-eval-cmd",
    help="Held-out command re-scoring the top K at the end (guards against fitting noise).",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    help="PNG: score over trials and the best parameters per layer group (mmerge[plot]).",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Print the summary of the study in this output folder, and exit.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output folder (OUT).")
@click.option(
    "--backend",
    default="numpy",
    show_default=True,
    type=click.Choice(["numpy", "torch", "cupy", "mlx", "auto"]),
    help="Array library that merges.",
)
@click.option("--device", default=None, help="cpu or cuda (default: the backend's own).")
@click.option(
    "--heartbeat",
    type=int,
    default=20,
    show_default=True,
    metavar="SECONDS",
    help="Workers beat this often; a trial silent for 3 beats is failed and queued again.",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress and no summary.")
def evolve(
    search,
    eval_cmd,
    evaluator_spec,
    in_memory,
    trials,
    sampler,
    storage,
    study_name,
    workers,
    keep_top,
    seed,
    direction,
    metric_weights,
    eval_timeout,
    final_eval_cmd,
    plot_path,
    report_dir,
    as_json,
    output,
    backend,
    device,
    heartbeat,
    quiet,
):
    """Search the ranges of a recipe for the merge your evaluator scores best.

    SEARCH is an `mmerge run` recipe in which any number may be a range {search: [low, high]};
    a top-level `search: {layer_groups: G}` spreads each range over G groups of layers. The
    recipe's midpoint, uniform weights and each fine-tune alone run first, as baselines. OUT
    gets best.yaml (rewritten on every improvement, runnable by `mmerge run`), trials.csv, the
    top K merged models under trials/, and each evaluation's output under logs/. Running the
    same command again resumes the study; trials of killed workers are run again.
    """
    try:
        from mmerge.evolve import api
    except ImportError as exc:  # optuna or cmaes missing
        need = exc.name or "optuna"
        raise InvalidInput(f"mmerge evolve needs {need}: pip install 'mmerge[evolve]'") from None
    if report_dir is not None:
        if search is not None:
            raise click.UsageError("give either SEARCH or --report OUT, not both")
        summary = api.report(
            report_dir,
            storage=storage,
            study=study_name if storage else None,
            keep_top=keep_top,
            plot=plot_path,
        )
        _print(summary, as_json, quiet=False)
        return
    if search is None:
        raise click.UsageError("missing SEARCH (a recipe with {search: [low, high]} ranges)")
    if (eval_cmd is None) == (evaluator_spec is None):
        raise click.UsageError("give exactly one of --eval-cmd and --evaluator")
    if trials is None:
        raise click.UsageError("missing --trials (the study's total)")
    if output is None:
        raise click.UsageError("missing -o OUT (best.yaml, trials.csv and kept models go there)")
    folder = Path(plot_path).resolve().parent if plot_path else None
    if folder is not None and not folder.is_dir() and folder != output.resolve():
        raise click.BadParameter(f"folder of {plot_path} does not exist", param_hint="--plot")
    if evaluator_spec is not None:
        from mmerge.evolve.evaluate import load_callable

        evaluator = load_callable(evaluator_spec)
    else:
        evaluator = eval_cmd
    progress = _Progress(quiet)
    _stop_on_sigterm()
    try:
        summary = api.evolve(
            search,
            evaluator,
            trials=trials,
            out=output,
            storage=storage,
            study=study_name,
            sampler=sampler,
            workers=workers,
            keep_top=1 if keep_top is None else keep_top,
            seed=seed,
            direction=direction,
            metric_weights=_weights(metric_weights),
            eval_timeout=eval_timeout,
            final_evaluator=final_eval_cmd,
            in_memory=in_memory,
            backend=backend,
            device=device,
            heartbeat=heartbeat,
            on_trial=progress,
            plot=plot_path,
        )
    except KeyboardInterrupt:
        progress.close()
        click.echo("interrupted; run the same command again to continue the study", err=True)
        click.get_current_context().exit(130)
    progress.close()
    _print(summary, as_json, quiet)


def _print(summary, as_json: bool, quiet: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary.to_dict(), indent=1, default=str))
    elif not quiet:
        click.echo(summary.text())

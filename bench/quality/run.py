"""Score every registered merge method on the digits multi-task experiment: table and plot.

For each seed: pretrain a base body, fine-tune one copy per task, then merge the fine-tunes
with every method in mmerge's registry, choosing each method's parameters on the validation
split and scoring the choice on the held-out test split. Methods that take at most two models
are scored in a second table, on pairs of tasks, next to every other method that takes two.
The multi-task table also gets an `mmerge evolve` row: a CMA-ES search on the validation split
over one task-arithmetic weight per fine-tune and per layer, its best recipe scored on test.

    python bench/quality/run.py                       # the full run: table, results, plot
    python bench/quality/run.py --seeds 0 --out /tmp/q # one seed, elsewhere

Writes OUT/table.md (the printed tables), OUT/results.json (every score) and OUT/quality.png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from experiment import TASKS, Config, Experiment, experiment  # noqa: E402

from mmerge.errors import MmergeError  # noqa: E402
from mmerge.methods.registry import MethodSpec, all_methods  # noqa: E402

# The values tried for a parameter, by its registered name: the knobs the papers tune on a
# validation split (task-vector scale, kept fraction) and the methods' few other choices.
# Every other parameter keeps its registered default; weights stay equal (a common weight is
# lambda's job, unequal weights are a search's).
GRID: dict[str, tuple[Any, ...]] = {
    "lambda": (0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0),
    "density": (0.1, 0.2, 0.3, 0.5, 0.7, 0.9),
    "select_topk": (0.1, 0.3, 0.5, 1.0),
    "filter_wise": (False, True),
    "t": (0.3, 0.4, 0.5, 0.6, 0.7),
}
# Where one name means another scale: nearswap's t is a distance, not a fraction.
GRID_FOR = {("nearswap", "t"): (1e-4, 1e-3, 1e-2, 1e-1)}
SHORT = {"lambda": "λ", "density": "d", "select_topk": "k", "filter_wise": "fw"}
# The `mmerge evolve` row of the multi-task table: task arithmetic with one weight per fine-tune
# and per layer of the body (the per-layer weights of Sakana's evolutionary merge), searched by
# CMA-ES on the validation split, the found recipe scored once on test.
SEARCH_METHOD = "task_arithmetic"
SEARCH_RANGE = (0.0, 1.0)
SEARCH_TRIALS = 500


@dataclass(frozen=True)
class Setting:
    """One way to run a method: with or without the base, and its non-default parameters."""

    base: bool
    params: tuple[tuple[str, Any], ...] = ()  # global
    model_params: tuple[tuple[str, Any], ...] = ()  # the same for every model

    def label(self, spec: MethodSpec) -> str:
        """The parameters that differ from the registered defaults, e.g. 'd=0.2 λ=0.5'."""
        parts = [f"{SHORT.get(k, k)}={v:g}" for k, v in self.model_params + self.params]
        if self.base and not spec.needs_base:
            parts.append("on task vectors")
        return " ".join(parts) or "defaults"


def settings(spec: MethodSpec, grid: dict[str, tuple[Any, ...]] = GRID) -> list[Setting]:
    """The registered defaults first, then the grid over the method's tunable parameters.

    Methods that do not need a base are tried without and with it (on task vectors).
    """
    bases = (True,) if spec.needs_base else (False, True)
    tuned = [p for p in spec.params if p.name in grid]
    values = [GRID_FOR.get((spec.name, p.name), grid[p.name]) for p in tuned]
    out = [Setting(base=spec.needs_base)]
    for base in bases:
        for combo in itertools.product(*values):
            pairs = [(p.name, v) for p, v in zip(tuned, combo) if v != p.default]
            per_model = tuple((n, v) for n, v in pairs if spec.param(n).per_model)
            global_ = tuple((n, v) for n, v in pairs if not spec.param(n).per_model)
            setting = Setting(base, global_, per_model)
            if setting not in out:
                out.append(setting)
    return out


@dataclass
class Scored:
    """A method's result on one seed: the choice made on val and its scores."""

    chosen: str
    val: float  # mean over the groups of the chosen setting's mean val accuracy
    test: dict[str, float]  # task -> test accuracy (averaged over the task's groups)
    defaults_test: float | None  # mean test accuracy at the registered defaults
    tried: int
    refused: list[str] = field(default_factory=list)  # settings mmerge refused, with why


def groups_for(spec: MethodSpec, tasks: list[str], pairwise: bool) -> list[list[str]] | str:
    """The task groups a method merges, or why it cannot run in this table."""
    n = 2 if pairwise else len(tasks)
    if spec.max_models is not None and spec.max_models < 2:
        return f"merges at most {spec.max_models} model: copies, no merge to score"
    if spec.max_models is not None and n > spec.max_models:
        return f"takes at most {spec.max_models} models: scored on pairs below"
    if n < spec.min_models:
        return f"needs at least {spec.min_models} models"
    return pairs(tasks) if pairwise else [tasks]


def pairs(tasks: list[str]) -> list[list[str]]:
    """Neighbouring tasks two by two (the last with the first when their number is odd)."""
    return [[tasks[i], tasks[(i + 1) % len(tasks)]] for i in range(0, len(tasks), 2)]


def run_setting(ex: Experiment, spec: MethodSpec, s: Setting, groups, split: str):
    """task -> accuracy on `split`, averaged over the groups containing the task."""
    per_task: dict[str, list[float]] = {}
    for group in groups:
        recipe = ex.recipe(
            spec.name,
            group,
            base=s.base,
            params=dict(s.params),
            model_params=dict(s.model_params),
        )
        for task, acc in ex.score_recipe(recipe, split).items():
            per_task.setdefault(task, []).append(acc)
    return {t: float(np.mean(v)) for t, v in per_task.items()}


def tune(ex: Experiment, spec: MethodSpec, groups, grid: dict[str, tuple[Any, ...]]) -> Scored:
    """Try every setting on val, keep the best mean (the earlier on a tie), score it on test."""
    best: tuple[float, Setting] | None = None
    refused, tried = [], 0
    candidates = settings(spec, grid)
    for s in candidates:
        try:
            val = run_setting(ex, spec, s, groups, "val")
        except MmergeError as exc:
            refused.append(f"{s.label(spec)}: {exc}")
            continue
        tried += 1
        mean = float(np.mean(list(val.values())))
        if best is None or mean > best[0]:
            best = (mean, s)
    if best is None:
        raise RuntimeError(f"{spec.name}: mmerge refused every setting: {refused[0]}")
    try:
        defaults = run_setting(ex, spec, candidates[0], groups, "test")
        at_defaults = float(np.mean(list(defaults.values())))
    except MmergeError:
        at_defaults = None
    test = run_setting(ex, spec, best[1], groups, "test")
    return Scored(best[1].label(spec), best[0], test, at_defaults, tried, refused)


def search(ex: Experiment, trials: int) -> dict[str, Any]:
    """Search per-fine-tune, per-layer weights on val with `mmerge.evolve`; score the best on test.

    The search merges in memory; the recipe it finds is merged again by mmerge's streaming
    engine, as a user would run it, for the val and test scores reported.
    """
    import mmerge

    recipe = ex.recipe(SEARCH_METHOD, model_params={"weight": {"search": list(SEARCH_RANGE)}})
    recipe["search"] = {"layer_groups": ex.cfg.hidden + 1}  # one group per layer of the body
    summary = mmerge.evolve(
        recipe, ex.evaluator("val"), trials=trials, in_memory=True, seed=ex.cfg.seed
    )
    if summary.best_recipe is None:
        raise RuntimeError(f"mmerge evolve scored no trial: {summary.failures}")
    val = ex.score_recipe(summary.best_recipe, "val")
    return asdict(
        Scored(
            chosen=f"CMA-ES, {trials} trials",
            val=float(np.mean(list(val.values()))),
            test=ex.score_recipe(summary.best_recipe, "test"),
            defaults_test=None,
            tried=summary.counted,
            refused=[f"{n} x {reason}" for reason, n in summary.failures.items()],
        )
    ) | {
        "search_val": summary.best_score,
        "best_trial": summary.best_trial,
        "weights": summary.best_params,
        "baselines_val": {b["label"]: b["score"] for b in summary.baselines},
    }


def references(ex: Experiment, split: str) -> dict[str, dict[str, float]]:
    """The fine-tunes (each on its own task) and the base body (with the tasks' heads)."""
    finetuned = {t: ex.score_file(p, split, [t])[t] for t, p in ex.finetune_paths.items()}
    return {"fine-tuned": finetuned, "base": ex.score_file(ex.base_path, split)}


def run_seed(
    cfg: Config,
    log,
    grid: dict[str, tuple[Any, ...]] = GRID,
    search_trials: int = SEARCH_TRIALS,
) -> dict[str, Any]:
    """Everything one seed measures, as plain data (no `mmerge evolve` row when
    `search_trials` is 0)."""
    started = time.perf_counter()
    with experiment(cfg) as ex:
        trained = time.perf_counter() - started
        log(f"seed {cfg.seed}: trained base and {len(ex.tasks)} fine-tunes in {trained:.1f} s")
        out: dict[str, Any] = {
            "seed": cfg.seed,
            "chance": ex.chance("test"),
            "reference": {s: references(ex, s) for s in ("val", "test")},
            "multi": {},
            "pairwise": {},
            "seconds": {"train": trained},
        }
        tasks = list(cfg.tasks)
        for table in ("multi", "pairwise"):
            clock = time.perf_counter()
            for spec in all_methods():
                groups = groups_for(spec, tasks, pairwise=table == "pairwise")
                if isinstance(groups, str):
                    out[table][spec.name] = {"n/a": groups}
                    continue
                t0 = time.perf_counter()
                scored = tune(ex, spec, groups, grid)
                out[table][spec.name] = asdict(scored)
                mean = np.mean(list(scored.test.values()))
                log(
                    f"  {table:8s} {spec.name:17s} {scored.tried:3d} settings "
                    f"({len(scored.refused)} refused), chose {scored.chosen:18s} "
                    f"val {scored.val:.3f} test {mean:.3f} ({time.perf_counter() - t0:.1f} s)"
                )
            out["seconds"][table] = time.perf_counter() - clock
        if search_trials:
            clock = time.perf_counter()
            found = out["multi"]["evolve"] = search(ex, search_trials)
            out["seconds"]["evolve"] = time.perf_counter() - clock
            log(
                f"  multi    evolve            {found['tried']:3d} trials, best trial "
                f"{found['best_trial']}, val {found['val']:.3f} "
                f"test {np.mean(list(found['test'].values())):.3f} "
                f"({out['seconds']['evolve']:.1f} s)"
            )
        out["merges"] = ex.merges
    return out


def table(results: list[dict[str, Any]], kind: str, tasks: list[str]) -> str:
    """The markdown table of one kind ('multi' or 'pairwise'), averaged over seeds.

    gap: mean minus the fine-tunes' mean; kept: the share of the fine-tuning gain over the
    base that the merge keeps; sd: the spread of the mean over seeds.
    """

    def avg(dicts: list[dict[str, float]]) -> dict[str, float]:
        return {t: float(np.mean([d[t] for d in dicts])) for t in tasks}

    def mean_of(d: dict[str, float]) -> float:
        return float(np.mean([d[t] for t in tasks]))

    refs = [r["reference"]["test"] for r in results]
    ft_mean = float(np.mean([mean_of(r["fine-tuned"]) for r in refs]))
    base_mean = float(np.mean([mean_of(r["base"]) for r in refs]))
    head = ["method", "chosen on val", *tasks, "mean", "sd", "gap", "kept", "val", "defaults"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, chosen, per_seed, val=None, defaults=None):
        means = [mean_of(d) for d in per_seed]
        mean = float(np.mean(means))
        cells = [name, chosen, *(f"{100 * v:.1f}" for v in avg(per_seed).values())]
        cells += [f"{100 * mean:.1f}", f"{100 * float(np.std(means)):.1f}"]
        cells += [f"{100 * (mean - ft_mean):+.1f}"]
        cells += [f"{100 * (mean - base_mean) / (ft_mean - base_mean):.0f}%"]
        cells += ["" if val is None else f"{100 * val:.1f}"]
        cells += ["" if defaults is None else f"{100 * defaults:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")

    row("fine-tuned, each its own", "", [r["fine-tuned"] for r in refs])
    row("base, tasks' heads", "", [r["base"] for r in refs])
    names = list(results[0][kind])
    scored = [n for n in names if "n/a" not in results[0][kind][n]]
    order = {n: -np.mean([mean_of(r[kind][n]["test"]) for r in results]) for n in scored}
    for name in sorted(scored, key=order.__getitem__):
        entries = [r[kind][name] for r in results]
        defaults = [e["defaults_test"] for e in entries]
        row(
            name,
            " / ".join(e["chosen"] for e in entries),
            [e["test"] for e in entries],
            val=float(np.mean([e["val"] for e in entries])),
            defaults=None if None in defaults else float(np.mean(defaults)),
        )
    for name in names:
        if name not in scored:
            reason = results[0][kind][name]["n/a"]
            lines.append(f"| {name} | n/a: {reason} |" + " |" * (len(head) - 2))
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], tasks: list[str], path: Path) -> None:
    """Mean test accuracy per method, multi-task and pairwise, against base and fine-tunes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    lows: list[float] = []
    for ax, kind, title in (
        (axes[0], "multi", f"all {len(tasks)} fine-tunes merged into one body"),
        (axes[1], "pairwise", "two fine-tunes at a time (mean over pairs)"),
    ):
        names = [n for n in results[0][kind] if "n/a" not in results[0][kind][n]]
        per_seed = np.array(
            [[np.mean(list(r[kind][n]["test"].values())) for n in names] for r in results]
        )
        order = np.argsort(-per_seed.mean(axis=0))
        x = np.arange(len(names))
        ax.bar(x, 100 * per_seed.mean(axis=0)[order], color="tab:blue", alpha=0.8)
        if len(results) > 1:
            ax.errorbar(
                x,
                100 * per_seed.mean(axis=0)[order],
                yerr=100 * per_seed.std(axis=0)[order],
                fmt="none",
                ecolor="black",
            )
        for seed_row in per_seed:
            ax.plot(x, 100 * seed_row[order], "k.", markersize=4)
        defaults = [
            np.mean([r[kind][names[i]]["defaults_test"] or np.nan for r in results]) for i in order
        ]
        ax.plot(x, 100 * np.array(defaults), "x", color="tab:orange", label="at defaults")
        lows.append(np.nanmin(defaults))
        for ref, style in (("fine-tuned", "tab:green"), ("base", "tab:red")):
            level = np.mean([np.mean(list(r["reference"]["test"][ref].values())) for r in results])
            ax.axhline(100 * level, color=style, linestyle="--", label=f"{ref}: {100 * level:.1f}")
            lows.append(level)
        ax.set_xticks(x, [names[i] for i in order], rotation=60, ha="right")
        ax.set_title(title)
        ax.legend(loc="upper right", ncol=3, fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("mean test accuracy over tasks (%)")
    axes[0].set_ylim(max(0, 100 * min(lows) - 3), 101)
    n = len(results)
    fig.suptitle(
        f"mmerge on digits: {len(tasks)} tasks, parameters chosen on validation, "
        f"test accuracy ({n} seed{'s' * (n > 1)}; dots: seeds; x: registered defaults)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument(
        "--search-trials",
        type=int,
        default=SEARCH_TRIALS,
        help=f"trials of the mmerge evolve row (default {SEARCH_TRIALS}; 0: no search)",
    )
    ap.add_argument("--quiet", action="store_true", help="print only the tables")
    args = ap.parse_args(argv)
    log = (lambda *_: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    started = time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = [run_seed(Config(seed=s), log, search_trials=args.search_trials) for s in seeds]
    wall = time.perf_counter() - started
    tasks = list(Config().tasks)
    args.out.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(
        [
            f"Multi-task: the {len(tasks)} fine-tuned bodies merged into one body; test"
            f" accuracy (%) of each task with its own head, averaged over seeds {args.seeds}."
            " chosen on val: the parameters picked on the validation split, per seed (others"
            " at their registered defaults). sd: spread of the mean over seeds. gap: mean"
            " minus the fine-tunes' mean. kept: share of the fine-tuning gain over the base"
            " kept. val: the chosen setting's validation mean. defaults: test mean at the"
            " registered defaults. evolve: `mmerge.evolve` (CMA-ES) searching one"
            f" {SEARCH_METHOD} weight per fine-tune and per layer in {list(SEARCH_RANGE)} on"
            " the validation split; its best recipe scored on test. Tasks: "
            + "; ".join(f"{t} ({TASKS[t].description})" for t in tasks)
            + ".",
            table(results, "multi", tasks),
            "Pairwise: the tasks merged two at a time ("
            + ", ".join(" + ".join(g) for g in pairs(tasks))
            + "); each task scored in its pair, parameters chosen on the pairs' mean val.",
            table(results, "pairwise", tasks),
            f"{sum(r['merges'] for r in results)} merges by mmerge; wall time {wall:.0f} s.",
        ]
    )
    print(text)
    (args.out / "table.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, tasks, args.out / "quality.png")
    log(f"wrote {args.out}/table.md, results.json, quality.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

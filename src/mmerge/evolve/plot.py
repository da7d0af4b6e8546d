"""`--plot FILE.png`: the score over trials, and the best trial's parameters per layer group."""

from __future__ import annotations

import itertools
from pathlib import Path

from optuna.study import StudyDirection
from optuna.trial import TrialState

from mmerge.errors import InvalidInput
from mmerge.evolve import books
from mmerge.evolve.space import SearchSpace


def plot(study, space: SearchSpace, path: str | Path) -> Path:
    """Write the figure to `path` (PNG); needs matplotlib (mmerge[plot])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InvalidInput("--plot needs matplotlib: pip install 'mmerge[plot]'") from None
    trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    scored = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t.number for t in trials if books.FAILURE in t.user_attrs]
    maximize = study.direction == StudyDirection.MAXIMIZE
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if scored:
        xs, ys = [t.number for t in scored], [t.value for t in scored]
        ax1.scatter(xs, ys, s=12, color="tab:blue", label="trial score")
        best = list(itertools.accumulate(ys, max if maximize else min))
        ax1.step(xs, best, where="post", color="tab:orange", label="best so far")
        base = [t for t in scored if books.BASELINE in t.user_attrs]
        if base:
            ax1.scatter(
                [t.number for t in base],
                [t.value for t in base],
                marker="s",
                s=30,
                facecolors="none",
                edgecolors="black",
                label="baselines",
            )
        if failed:
            low = min(ys) if maximize else max(ys)
            ax1.scatter(failed, [low] * len(failed), marker="x", color="tab:red", label="failed")
    ax1.set_xlabel("trial")
    ax1.set_ylabel("score")
    ax1.set_title(f"study {study.study_name!r}")
    ax1.legend(loc="best", fontsize=8)
    winner = books.best_trial(trials, study.direction)
    if winner is not None:
        values = space.values(winner.params)
        spread = [r for r in space.ranges if r.groups > 1]
        single = [r for r in space.ranges if r.groups == 1]
        for r in spread:
            ax2.plot(range(r.groups), [values[d] for d in r.dimensions()], marker="o", label=r.name)
        if spread:
            ax2.set_xticks(range(space.layer_groups))
            ax2.set_xlabel("layer group (first layers to last)")
            ax2.legend(loc="best", fontsize=8)
        if single:  # one number each: bars, placed after the groups
            x0 = space.layer_groups if spread else 0
            xs = range(x0, x0 + len(single))
            ax2.bar(xs, [values[r.name] for r in single], color="tab:gray")
            ax2.set_xticks(list(xs), [r.name for r in single], rotation=30, ha="right")
        ax2.set_ylabel("value")
        ax2.set_title(f"best parameters (trial {winner.number})")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out

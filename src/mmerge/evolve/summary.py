"""The study summary: counts, the best recipe, baselines, the top K with held-out scores, the
reasons trials failed, and the pace; as text for `mmerge evolve --report` or as a dict."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from optuna.study import StudyDirection
from optuna.trial import TrialState

from mmerge.evolve import books
from mmerge.evolve.space import SearchSpace


@dataclass
class StudySummary:
    """What a study found; `best_recipe` runs with `mmerge.engine.api.run_recipe`."""

    study: str
    storage: str
    direction: str
    target: int | None  # the total asked for by the latest run
    counted: int  # trials that count toward the total
    states: dict[str, int]  # scored, failed, running, queued, released (worker died: re-queued)
    best_trial: int | None
    best_score: float | None
    best_params: dict[str, float]  # each searched dimension's value in recipe units
    best_recipe: dict | None
    best_recipe_path: Path | None
    baselines: list[dict[str, Any]] = field(default_factory=list)
    top: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    trials_per_minute: float | None = None
    mean_merge_s: float | None = None
    mean_eval_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["best_recipe_path"] = str(self.best_recipe_path) if self.best_recipe_path else None
        for row in d["top"]:
            row["model"] = str(row["model"]) if row["model"] else None
        return d

    def gain(self) -> tuple[float, str] | None:
        """How much the best trial beats the best scored baseline, and which baseline."""
        scored = [b for b in self.baselines if b["score"] is not None]
        if self.best_score is None or not scored:
            return None
        sign = 1.0 if self.direction == "maximize" else -1.0
        ref = max(scored, key=lambda b: sign * b["score"])
        return sign * (self.best_score - ref["score"]), ref["label"]

    def text(self) -> str:
        s = self.states
        lines = [f"study {self.study!r} in {self.storage} ({self.direction})"]
        target = f" of {self.target}" if self.target else ""
        if self.target and self.counted > self.target:  # resumed asking for fewer than it held
            target = f" ({self.target} asked for; the study held more already)"
        lines.append(
            f"trials: {self.counted}{target}: {s['scored']} scored, {s['failed']} failed, "
            f"{s['running']} running, {s['queued']} queued"
            + (f"; {s['released']} released by dead workers" if s["released"] else "")
        )
        if self.best_trial is None:
            lines.append("best: no trial scored yet")
        else:
            where = f" -> {self.best_recipe_path}" if self.best_recipe_path else ""
            lines.append(f"best: {_fmt(self.best_score)} at trial {self.best_trial}{where}")
            lines += [f"  {k} = {v:.6g}" for k, v in self.best_params.items()]
        if self.baselines:
            lines.append("baselines:")
            width = max(len(b["label"]) for b in self.baselines)
            for b in self.baselines:
                result = _fmt(b["score"]) if b["score"] is not None else b["failure"] or b["state"]
                lines.append(f"  {b['label']:<{width}}  trial {b['trial']:<4} {result}")
            gain = self.gain()
            if gain is not None:
                lines.append(
                    f"  the search gained {gain[0]:+.6g} over the best baseline ({gain[1]})"
                )
        if self.top:
            held = any(r["final_score"] is not None or r["final_failure"] for r in self.top)
            title = " (search score, held-out score):" if held else ":"
            lines.append(f"top {len(self.top)}{title}")
            for r in self.top:
                final = ""
                if held:
                    final = _fmt(r["final_score"]) if r["final_score"] is not None else "-"
                    final = f"  {final}" if not r["final_failure"] else f"  ({r['final_failure']})"
                model = f"  {r['model']}" if r["model"] else ""
                lines.append(f"  trial {r['trial']:<4} {_fmt(r['score'])}{final}{model}")
        if self.failures:
            lines.append("failures:")
            for reason, n in sorted(self.failures.items(), key=lambda kv: -kv[1]):
                lines.append(f"  {n:>4} x {reason}")
        if self.trials_per_minute:
            pace = f"pace: {self.trials_per_minute:.3g} trials per minute"
            if self.mean_merge_s is not None and self.mean_eval_s is not None:
                pace += (
                    f" (per trial: merge {self.mean_merge_s:.3g} s, "
                    f"evaluation {self.mean_eval_s:.3g} s)"
                )
            lines.append(pace)
        return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def summarize(
    study, space: SearchSpace, storage: str, out: Path | None, keep_top: int
) -> StudySummary:
    """The summary of a study as its storage holds it now."""
    trials = study.get_trials(deepcopy=False)
    direction = "maximize" if study.direction == StudyDirection.MAXIMIZE else "minimize"
    state = Counter(
        "scored"
        if t.state == TrialState.COMPLETE
        else "failed"
        if t.state == TrialState.FAIL and books.FAILURE in t.user_attrs
        else "running"
        if t.state == TrialState.RUNNING
        else "queued"
        if t.state == TrialState.WAITING
        else "released"
        if t.state == TrialState.FAIL
        else t.state.name.lower()
        for t in trials
    )
    states = {k: state.get(k, 0) for k in ("scored", "failed", "running", "queued", "released")}
    order = books.ranked(trials, study.direction)
    best = order[0] if order else None
    attrs = study.user_attrs
    top = []
    for t in order[: max(keep_top, 1)]:
        final = attrs.get(f"{books.FINAL}{t.number}") or {}
        top.append(
            {
                "trial": t.number,
                "score": t.value,
                "final_score": final.get("score"),
                "final_failure": final.get("failure"),
                "model": books.kept(out, t.number) if out is not None else None,
            }
        )
    baselines = [
        {
            "label": t.user_attrs[books.BASELINE],
            "trial": t.number,
            "state": t.state.name.lower(),
            "score": t.value if t.state == TrialState.COMPLETE else None,
            "failure": t.user_attrs.get(books.FAILURE),
        }
        for t in trials
        if books.BASELINE in t.user_attrs
        and t.state != TrialState.WAITING
        and not (t.state == TrialState.FAIL and books.FAILURE not in t.user_attrs)
    ]
    failures = Counter(t.user_attrs[books.FAILURE] for t in trials if books.FAILURE in t.user_attrs)
    best_path = out / "best.yaml" if out is not None and (out / "best.yaml").exists() else None
    return StudySummary(
        study=study.study_name,
        storage=storage,
        direction=direction,
        target=attrs.get("mmerge:trials"),
        counted=sum(map(books.counts, trials)),
        states=states,
        best_trial=best.number if best else None,
        best_score=best.value if best else None,
        best_params=space.values(best.params) if best else {},
        best_recipe=space.recipe(best.params) if best else None,
        best_recipe_path=best_path,
        baselines=baselines,
        top=top,
        failures=dict(failures),
        **_pace(trials),
    )


def _pace(trials) -> dict[str, float | None]:
    finished = [
        t
        for t in trials
        if books.counts(t) and t.state.is_finished() and t.datetime_start and t.datetime_complete
    ]
    if len(finished) < 2:
        return {"trials_per_minute": None, "mean_merge_s": None, "mean_eval_s": None}
    span = max(t.datetime_complete for t in finished) - min(t.datetime_start for t in finished)
    minutes = span.total_seconds() / 60

    def mean(key: str) -> float | None:
        values = [t.user_attrs[key] for t in finished if key in t.user_attrs]
        return sum(values) / len(values) if values else None

    return {
        "trials_per_minute": len(finished) / minutes if minutes > 0 else None,
        "mean_merge_s": mean("merge_s"),
        "mean_eval_s": mean("eval_s"),
    }

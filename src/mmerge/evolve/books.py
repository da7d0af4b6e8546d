"""The study's books in OUT: best.yaml, trials.csv, the kept top-K models, evaluator logs.

Every file is replaced atomically, and processes sharing OUT take turns through a file lock.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from mmerge.evolve.space import SearchSpace

FAILURE = "failure"  # user attribute: why a trial has no score (it counts toward the total)
BASELINE = "baseline"  # user attribute: which baseline an enqueued trial is
FINAL = "mmerge:final:"  # study attribute prefix: a top trial's held-out score, by number


def counts(t: FrozenTrial) -> bool:
    """Whether a trial counts toward the total: scored, failed with a reason, or running."""
    return t.state in (TrialState.COMPLETE, TrialState.RUNNING) or (
        t.state == TrialState.FAIL and FAILURE in t.user_attrs
    )


def ranked(trials: Sequence[FrozenTrial], direction: StudyDirection) -> list[FrozenTrial]:
    """Scored trials, best first (ties: the earlier trial first)."""
    sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    return sorted(done, key=lambda t: (sign * t.value, t.number))


def best_trial(trials: Sequence[FrozenTrial], direction: StudyDirection) -> FrozenTrial | None:
    order = ranked(trials, direction)
    return order[0] if order else None


def trial_dir(work: Path, number: int) -> Path:
    return work / "trials" / f"trial-{number:05d}"


def log_path(work: Path, number: int) -> Path:
    return work / "logs" / f"trial-{number:05d}.log"


def remove_trial(work: Path, number: int) -> None:
    shutil.rmtree(trial_dir(work, number), ignore_errors=True)


def kept(work: Path, number: int) -> Path | None:
    """The kept merged model of a trial, if it is in this folder."""
    model = trial_dir(work, number) / "model"
    return model if model.exists() else None


def tidy(study, work: Path, keep_top: int, trials: Sequence[FrozenTrial] | None = None) -> None:
    """Delete the merged models of finished trials outside the top `keep_top`; a folder whose
    trial is running, or unknown to this snapshot of the study, is left alone."""
    folder = work / "trials"
    if not folder.is_dir():
        return
    trials = study.get_trials(deepcopy=False) if trials is None else trials
    keep = {t.number for t in ranked(trials, study.direction)[:keep_top]}
    finished = {t.number for t in trials if t.state.is_finished()}
    for entry in folder.iterdir():
        number = entry.name.removeprefix("trial-")
        if entry.name.startswith("trial-") and number.isdigit():
            n = int(number)
            if n in finished and n not in keep:
                shutil.rmtree(entry, ignore_errors=True)


@contextlib.contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Mutual exclusion between processes writing the same OUT (POSIX; a no-op elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(folder / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def best_header(study_name: str, best: FrozenTrial) -> str:
    return f"# mmerge evolve: best of study {study_name!r}: trial {best.number}, score {best.value}"


def best_yaml(study_name: str, space: SearchSpace, best: FrozenTrial) -> str:
    """The best recipe, runnable by `mmerge run`, with where it came from in comments."""
    import yaml

    lines = [best_header(study_name, best)]
    lines += [f"#   {name} = {value:.6g}" for name, value in space.values(best.params).items()]
    body = yaml.safe_dump(space.recipe(best.params), sort_keys=False)
    return "\n".join(lines) + "\n" + body


def write_best(out: Path, study, space: SearchSpace, best: FrozenTrial | None) -> None:
    """Rewrite OUT/best.yaml when the study's best trial changed."""
    if best is None:
        return
    path = out / "best.yaml"
    with contextlib.suppress(OSError):
        if path.read_text().split("\n", 1)[0] == best_header(study.study_name, best):
            return
    write_atomic(path, best_yaml(study.study_name, space, best))


def table(space: SearchSpace, trials: Sequence[FrozenTrial], work: Path | None) -> str:
    """trials.csv: one row per trial with its parameters in recipe units, score or failure."""
    metrics = sorted({k for t in trials for k in t.user_attrs.get("metrics", {})})
    dims = space.dimensions
    head = ["trial", "state", "score", "baseline", "failure", *dims]
    head += [f"metric:{m}" for m in metrics]
    head += ["merge_s", "eval_s", "worker", "host", "started", "finished", "model"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    for t in sorted(trials, key=lambda t: t.number):
        values = space.values(t.params) if set(dims) <= set(t.params) else {}
        owner = t.system_attrs.get("mmerge:owner") or {}
        model = kept(work, t.number) if work is not None else None
        row: list[Any] = [
            t.number,
            t.state.name,
            "" if t.value is None else t.value,
            t.user_attrs.get(BASELINE, ""),
            t.user_attrs.get(FAILURE, ""),
        ]
        row += [_num(values.get(d)) for d in dims]
        row += [_num(t.user_attrs.get("metrics", {}).get(m)) for m in metrics]
        row += [t.user_attrs.get("merge_s", ""), t.user_attrs.get("eval_s", "")]
        row += [t.user_attrs.get("worker", ""), owner.get("host", "")]
        row += [_time(t.datetime_start), _time(t.datetime_complete), model or ""]
        w.writerow(row)
    return buf.getvalue()


def write_table(out: Path, space: SearchSpace, trials, work: Path | None) -> None:
    write_atomic(out / "trials.csv", table(space, trials, work))


def _num(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else value


def _time(value: Any) -> str:
    return value.isoformat(timespec="seconds") if value is not None else ""

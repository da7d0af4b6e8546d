"""The search loop: ask Optuna for a point, merge its recipe, score it, tell Optuna, keep books.

`workers` threads run trials at once; several processes (on several machines) may share one
study through its storage. `trials` is the study's total: finished trials (scored or failed
with a reason) and trials running in live workers count; trials of dead workers do not, and
are queued again. A process whose share is done waits for the trials other processes still
run, so that its books name the study's final best.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mmerge.errors import MmergeError
from mmerge.evolve import books
from mmerge.evolve.evaluate import TrialFailed
from mmerge.evolve.space import SearchSpace
from mmerge.evolve.storage import Liveness

FAILURES_IN_A_ROW = 5  # this many failed trials in a row stop the search: something is broken
WAIT_POLL_S = 0.5  # how often a finished process looks whether other processes' trials ended

optuna.logging.set_verbosity(optuna.logging.WARNING)


class Stopped(Exception):
    """The search was asked to stop while a trial ran."""


class EvolveError(MmergeError):
    """The search cannot go on (e.g. every trial fails)."""


@dataclass(frozen=True)
class TrialEvent:
    """What a progress display needs after each trial."""

    number: int
    score: float | None
    failure: str | None
    finished: int  # trials counted toward the total, study-wide
    total: int
    best_number: int | None
    best_score: float | None


@dataclass
class Options:
    trials: int
    workers: int = 1
    keep_top: int = 1
    backend: str = "numpy"
    device: str | None = None
    heartbeat: int = 20


def enqueue_baselines(study: optuna.Study, space: SearchSpace) -> None:
    """Queue the baselines first (once per study, whoever starts it)."""
    for b in space.baselines():
        study.enqueue_trial(b.unit, user_attrs={books.BASELINE: b.label}, skip_if_exists=True)


class Search:
    """One process's share of a study."""

    def __init__(
        self,
        study: optuna.Study,
        space: SearchSpace,
        evaluator,
        options: Options,
        *,
        out: Path | None,
        work: Path,
        on_trial: Callable[[TrialEvent], None] | None = None,
    ) -> None:
        self.study, self.space, self.evaluator, self.options = study, space, evaluator, options
        self.out, self.work, self.on_trial = out, work, on_trial
        self.liveness = Liveness(study, options.heartbeat)
        self.lock = threading.Lock()  # one worker at a time talks to the study
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.in_a_row: list[str] = []
        self.memory = InMemoryModels() if evaluator.in_memory else None

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> None:
        """Run trials until the study holds `trials`, then wait for trials still running in
        other processes, so that the books name the study's final best; Ctrl-C releases the
        running ones."""
        with self.lock:
            self.liveness.recover()
        with books.folder_lock(self.work):
            books.tidy(self.study, self.work, self.options.keep_top)
        while True:
            self._run_workers()
            if not self._wait_for_others():
                return

    def _run_workers(self) -> None:
        threads = [
            threading.Thread(target=self._worker, args=(w,), name=f"worker-{w}", daemon=True)
            for w in range(self.options.workers)
        ]
        for t in threads:
            t.start()
        try:
            # sleep, not join: a join cut short by Ctrl-C can leave the thread looking finished
            while any(t.is_alive() for t in threads):
                time.sleep(0.2)
        except KeyboardInterrupt:
            self.stop.set()
            self.evaluator.stop()
            for t in threads:
                t.join(10)
            raise
        if self.error is not None:
            raise self.error

    def _wait_for_others(self) -> bool:
        """Wait until no trial of the study runs; True when trials of dead workers were queued
        again meanwhile and the study is short of `trials` (this process runs them)."""
        while True:
            with self.lock:
                self.liveness.recover()
                trials = self.study.get_trials(deepcopy=False)
            if not self._full(trials):
                return True
            if not any(t.state == TrialState.RUNNING for t in trials):
                return False
            time.sleep(WAIT_POLL_S)

    def _worker(self, worker: int) -> None:
        try:
            while not self.stop.is_set():
                trial = self._next()
                if trial is None:
                    return
                self._run(trial, worker)
        except BaseException as exc:  # the first error stops every worker; run() raises it
            if self.error is None:
                self.error = exc
            self.stop.set()

    def _full(self, trials) -> bool:
        """Whether the study holds its `trials` (finished ones and those running count)."""
        return sum(map(books.counts, trials)) >= self.options.trials

    def _next(self) -> optuna.Trial | None:
        with self.lock:
            self.liveness.recover()
            trials = self.study.get_trials(deepcopy=False)
            if self._full(trials):
                return None
            trial = self.study.ask()
            self.liveness.claim(trial)
            return trial

    def _run(self, trial: optuna.Trial, worker: int) -> None:
        unit = {d: trial.suggest_float(d, 0.0, 1.0) for d in self.space.dimensions}
        recipe = self.space.recipe(unit)
        trial.set_user_attr("worker", worker)
        score = failure = None
        metrics, timing = {}, {}
        try:
            with self.liveness.beating(trial):
                score, metrics, timing = self._score(recipe, trial.number, worker)
        except TrialFailed as exc:
            failure = str(exc)
        except Stopped:
            with self.lock:
                self.liveness.release(trial)
            books.remove_trial(self.work, trial.number)
            return
        try:
            self._tell(trial, score, failure, metrics, timing)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another worker saw no heartbeat for the grace period (this machine paused or cut
            # off), failed the trial and queued its point again: this result is not recorded.
            books.remove_trial(self.work, trial.number)
            return
        self._after(trial.number, score, failure)

    def _tell(self, trial: optuna.Trial, score, failure, metrics, timing) -> None:
        with self.lock:
            for key, value in timing.items():
                trial.set_user_attr(key, round(value, 3))
            if metrics:
                trial.set_user_attr("metrics", metrics)
            if failure is None:
                self.study.tell(trial, score)
            else:
                trial.set_user_attr(books.FAILURE, failure)
                self.study.tell(trial, state=TrialState.FAIL)

    def _score(self, recipe: dict, number: int, worker: int):
        """(score, metrics, timings) of one recipe, or TrialFailed."""
        started = time.perf_counter()
        if self.memory is not None:
            model = self.memory.merge(recipe)
        else:
            model = books.trial_dir(self.work, number) / "model"
            self._merge(recipe, model)
        merged = time.perf_counter()
        if self.stop.is_set():
            raise Stopped
        try:
            score, metrics = self.evaluator(
                model, trial=number, worker=worker, log=books.log_path(self.work, number)
            )
        except TrialFailed:
            if self.stop.is_set():
                raise Stopped from None
            raise
        timing = {"merge_s": merged - started, "eval_s": time.perf_counter() - merged}
        return score, metrics, timing

    def final(self, evaluator) -> None:
        """Score the top K once each on a held-out evaluator; the scores live with the study."""
        trials = self.study.get_trials(deepcopy=False)
        for t in books.ranked(trials, self.study.direction)[: max(self.options.keep_top, 1)]:
            key = f"{books.FINAL}{t.number}"
            if key in self.study.user_attrs:
                continue
            recipe = self.space.recipe(t.params)
            try:
                if evaluator.in_memory:
                    self.memory = self.memory or InMemoryModels()
                    model = self.memory.merge(recipe)
                else:
                    model = books.kept(self.work, t.number)
                    if model is None:
                        model = books.trial_dir(self.work, t.number) / "model"
                        self._merge(recipe, model)
                log = self.work / "logs" / f"final-{t.number:05d}.log"
                score, metrics = evaluator(model, trial=t.number, worker=0, log=log)
                result: dict[str, Any] = {"score": score, "metrics": metrics}
            except TrialFailed as exc:
                result = {"failure": str(exc)}
            self.study.set_user_attr(key, result)
        with books.folder_lock(self.work):
            books.tidy(self.study, self.work, self.options.keep_top)

    def _merge(self, recipe: dict, model: Path) -> None:
        from mmerge.engine.api import run_recipe

        shutil.rmtree(model.parent, ignore_errors=True)
        model.parent.mkdir(parents=True)

        def check_stop(_done: int, _total: int) -> None:
            if self.stop.is_set():
                raise Stopped

        try:
            run_recipe(
                recipe,
                model,
                backend=self.options.backend,
                device=self.options.device,
                on_progress=check_stop,
            )
        except Stopped:
            raise
        except (MmergeError, OSError, ValueError) as exc:
            raise TrialFailed(f"merge failed: {exc}".splitlines()[0]) from exc

    def _after(self, number: int, score: float | None, failure: str | None) -> None:
        """Books after a trial: best recipe, kept models, table, progress; stop on a broken run."""
        if failure is None:
            self.in_a_row.clear()
        else:
            self.in_a_row.append(failure)
        with self.lock:
            trials = self.study.get_trials(deepcopy=False)
        best = books.best_trial(trials, self.study.direction)
        with books.folder_lock(self.work):
            books.tidy(self.study, self.work, self.options.keep_top, trials)
            if self.out is not None:
                books.write_best(self.out, self.study, self.space, best)
                books.write_table(self.out, self.space, trials, self.work)
        if self.on_trial is not None:
            self.on_trial(
                TrialEvent(
                    number,
                    score,
                    failure,
                    sum(1 for t in trials if t.state.is_finished() and books.counts(t)),
                    self.options.trials,
                    best.number if best else None,
                    best.value if best else None,
                )
            )
        if len(self.in_a_row) >= FAILURES_IN_A_ROW:
            raise EvolveError(
                f"{len(self.in_a_row)} trials in a row failed, the last: {self.in_a_row[-1]}"
            )


class InMemoryModels:
    """Checkpoints read once into host arrays, for evaluators that take merged tensors."""

    def __init__(self) -> None:
        self.loaded: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    def _load(self, path: str) -> dict[str, Any]:
        from mmerge.io import open_checkpoint

        with self.lock:
            if path not in self.loaded:
                ckpt = open_checkpoint(path)
                self.loaded[path] = {name: ref.to_numpy() for name, ref in ckpt.items()}
            return self.loaded[path]

    def merge(self, recipe: Mapping[str, Any]) -> dict[str, Any]:
        from mmerge.engine.api import merge_tensors

        base = recipe.get("base_model")
        entries = [e for e in recipe["models"] if e.get("model") != base]
        try:
            return merge_tensors(
                [self._load(e["model"]) for e in entries],
                method=recipe["merge_method"],
                base=self._load(base) if base else None,
                model_params=[dict(e.get("parameters") or {}) for e in entries],
                **dict(recipe.get("parameters") or {}),
            )
        except (MmergeError, ValueError) as exc:
            raise TrialFailed(f"merge failed: {exc}".splitlines()[0]) from exc

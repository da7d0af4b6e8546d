"""The library calls: `evolve` runs (or resumes) a search; `report` summarizes one."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna

from mmerge.errors import InvalidInput, MmergeError
from mmerge.evolve import books
from mmerge.evolve.evaluate import Command, PythonEvaluator
from mmerge.evolve.search import Options, Search, TrialEvent, enqueue_baselines
from mmerge.evolve.space import SearchSpace, load_search
from mmerge.evolve.storage import default_url, open_storage, redact
from mmerge.evolve.summary import StudySummary, summarize

SAMPLERS = ("cmaes", "tpe", "random")
STUDY_FILE = "evolve.json"  # in OUT: which storage and study it belongs to


def evolve(
    search: str | os.PathLike | Mapping[str, Any],
    evaluator: str | Callable[[Any], Any],
    *,
    trials: int,
    out: str | os.PathLike | None = None,
    storage: str | None = None,
    study: str = "evolve",
    sampler: str = "cmaes",
    workers: int = 1,
    keep_top: int = 1,
    seed: int | None = None,
    direction: str = "maximize",
    metric_weights: Mapping[str, float] | None = None,
    eval_timeout: float | None = None,
    final_evaluator: str | Callable[[Any], Any] | None = None,
    in_memory: bool = False,
    backend: str = "numpy",
    device: str | None = None,
    heartbeat: int = 20,
    on_trial: Callable[[TrialEvent], None] | None = None,
    plot: str | os.PathLike | None = None,
) -> StudySummary:
    """Search the ranges of a recipe for the merge that `evaluator` scores best.

    `search` is a recipe (YAML path or dict) whose numbers may be `{search: [low, high]}`.
    `evaluator` is a shell command containing `{model}` (its last output line a number or a JSON
    object of metrics), or a callable given the merged model's path, or with `in_memory=True`
    its tensors {name: numpy array} (nothing written). `trials` is the study's total: calling
    again with the same `out`/`storage` and `study` resumes. With `out`, the study lives in
    OUT/study.db unless `storage` (a database URL or journal:PATH) says otherwise, and OUT holds
    best.yaml, trials.csv, the top `keep_top` merged models and the evaluator logs. Without
    `out` or `storage` the study lives in memory. Returns the summary; `.best_recipe` is the
    best recipe as a dict. `plot` writes a PNG of the scores and the best parameters.
    """
    _check_counts(trials, workers, keep_top, heartbeat)
    if sampler not in SAMPLERS:
        raise InvalidInput(f"sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    if direction not in ("maximize", "minimize"):
        raise InvalidInput(f"direction must be maximize or minimize, got {direction!r}")
    space = load_search(search)
    ev = make_evaluator(evaluator, metric_weights, eval_timeout, in_memory)
    final_ev = (
        None
        if final_evaluator is None
        else make_evaluator(final_evaluator, metric_weights, eval_timeout, in_memory)
    )
    check_space(space, in_memory)
    out_path = Path(out) if out is not None else None
    url = storage or (default_url(out_path) if out_path is not None else None)
    if out_path is not None:
        _check_folder(out_path, url, study)
        out_path.mkdir(parents=True, exist_ok=True)  # the study's file may go there
    the_study = _open_study(url, study, direction, _sampler(sampler, seed), heartbeat)
    _check_same_search(the_study, space, url)
    if out_path is not None:  # claimed once the study opened: a refused command leaves OUT free
        _claim_folder(out_path, url, study)
    the_study.set_user_attr("mmerge:trials", trials)
    the_study.set_user_attr("mmerge:keep_top", keep_top)
    with tempfile.TemporaryDirectory(prefix="mmerge-evolve-") as tmp:
        work = out_path if out_path is not None else Path(tmp)
        with books.folder_lock(work):
            if not the_study.get_trials(deepcopy=False):
                enqueue_baselines(the_study, space)
        options = Options(trials, workers, keep_top, backend, device, heartbeat)
        run = Search(the_study, space, ev, options, out=out_path, work=work, on_trial=on_trial)
        run.run()
        if final_ev is not None:
            run.final(final_ev)
        if out_path is not None:
            with books.folder_lock(work):
                trials_now = the_study.get_trials(deepcopy=False)
                best = books.best_trial(trials_now, the_study.direction)
                books.write_best(out_path, the_study, space, best)
                books.write_table(out_path, space, trials_now, work)
        _plot(the_study, space, plot)
        return summarize(the_study, space, _shown(url), out_path, keep_top)


def report(
    out: str | os.PathLike | None = None,
    *,
    storage: str | None = None,
    study: str | None = None,
    keep_top: int | None = None,
    plot: str | os.PathLike | None = None,
) -> StudySummary:
    """The summary of a study: from OUT (its evolve.json names the storage and study), or from
    `storage` and `study` directly. `keep_top` trials are listed (default: as the run kept)."""
    out_path = Path(out) if out is not None else None
    if out_path is not None and (storage is None or study is None):
        try:
            saved = json.loads((out_path / STUDY_FILE).read_text())
        except FileNotFoundError:
            raise InvalidInput(
                f"{out_path} holds no {STUDY_FILE}: not the output of `mmerge evolve` "
                "(or give --storage and --study)"
            ) from None
        storage, study = storage or saved["storage"], study or saved["study"]
    if storage is None or study is None:
        raise InvalidInput("report needs OUT, or a storage URL and a study name")
    the_study = load_study(storage, study)
    space = study_space(the_study)
    _plot(the_study, space, plot)
    if keep_top is None:
        keep_top = int(the_study.user_attrs.get("mmerge:keep_top", 1))
    return summarize(the_study, space, _shown(storage), out_path, keep_top)


def load_study(storage: str, study: str) -> optuna.Study:
    """An existing study, with a clear error when there is none by that name."""
    try:
        return optuna.load_study(study_name=study, storage=open_storage(storage, 20))
    except KeyError:
        raise InvalidInput(f"no study {study!r} in {redact(storage)}") from None


def study_space(study: optuna.Study) -> SearchSpace:
    """The search space a study was created with."""
    raw = study.user_attrs.get("mmerge:search")
    if raw is None:
        raise InvalidInput(f"study {study.study_name!r} was not made by mmerge evolve")
    return SearchSpace.from_description(json.loads(raw))


def make_evaluator(
    evaluator: Any,
    metric_weights: Mapping[str, float] | None,
    timeout: float | None,
    in_memory: bool,
):
    """A Command for a string, a PythonEvaluator for a callable."""
    if isinstance(evaluator, (Command, PythonEvaluator)):
        return evaluator
    if isinstance(evaluator, str):
        if in_memory:
            raise InvalidInput("in-memory evaluation needs a Python callable, not a command")
        return Command(evaluator, timeout=timeout, metric_weights=metric_weights)
    if timeout is not None:
        raise InvalidInput(
            "an evaluation timeout applies to commands only: a Python call cannot be "
            "interrupted (run the evaluator as a command to bound its time)"
        )
    return PythonEvaluator(evaluator, in_memory=in_memory, metric_weights=metric_weights)


def check_space(space: SearchSpace, in_memory: bool) -> None:
    """Plan the recipe with every range at its low end, midpoint and high end (headers only):
    a range outside what the method accepts is refused before any trial runs."""
    from mmerge.engine.recipe import plan_recipe

    if in_memory and space.template.get("slices") is not None:
        raise InvalidInput("in-memory evaluation supports 'models' recipes, not 'slices'")
    for unit, where in ((0.0, "low end"), (0.5, "midpoint"), (1.0, "high end")):
        try:
            with contextlib.ExitStack() as closer:
                plan_recipe(space.recipe(space.corner(unit)), Path.cwd(), closer)
        except (MmergeError, OSError) as exc:
            raise InvalidInput(f"with every range at its {where}: {exc}") from None


def _check_counts(trials: int, workers: int, keep_top: int, heartbeat: int) -> None:
    for name, value, least in (
        ("trials", trials, 1),
        ("workers", workers, 1),
        ("keep_top", keep_top, 0),
        ("heartbeat", heartbeat, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise InvalidInput(f"{name} must be a whole number >= {least}, got {value!r}")


def _sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def _open_study(url, name, direction, sampler, heartbeat) -> optuna.Study:
    store = open_storage(url, heartbeat) if url is not None else None
    study = optuna.create_study(
        storage=store, study_name=name, direction=direction, sampler=sampler, load_if_exists=True
    )
    if study.direction.name.lower() != direction:
        raise InvalidInput(
            f"study {name!r} was created to {study.direction.name.lower()}, not to {direction}"
        )
    return study


def _check_same_search(study: optuna.Study, space: SearchSpace, url: str | None) -> None:
    stored = study.user_attrs.get("mmerge:search")
    if stored is None:
        study.set_user_attr("mmerge:search", space.signature())
    elif json.loads(stored) != json.loads(space.signature()):
        raise InvalidInput(
            f"study {study.study_name!r} in {_shown(url)} was made from a different search "
            "recipe: give a new --study (or -o) to search this one"
        )


def _check_folder(out: Path, url: str, study: str) -> None:
    """OUT belongs to one study: refuse to mix another study's models and books into it."""
    path = out / STUDY_FILE
    if path.exists():
        saved = json.loads(path.read_text())
        if saved != {"storage": url, "study": study}:
            raise InvalidInput(
                f"{out} holds study {saved['study']!r} in {redact(saved['storage'])}: "
                "use another output folder, or the same --storage and --study"
            )


def _claim_folder(out: Path, url: str, study: str) -> None:
    """Record in OUT which storage and study it belongs to (once)."""
    path = out / STUDY_FILE
    if not path.exists():
        books.write_atomic(path, json.dumps({"storage": url, "study": study}, indent=2) + "\n")


def _plot(study: optuna.Study, space: SearchSpace, path: str | os.PathLike | None) -> None:
    if path is not None:
        from mmerge.evolve.plot import plot

        plot(study, space, path)


def _shown(url: str | None) -> str:
    return redact(url) if url else "memory"

"""`mmerge evolve` studies: books in OUT, resume, failures, dead workers, parallel workers and
processes sharing one storage, held-out scores, the report, and the command line."""

import csv
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")

from evolve_case import cli, make_case, scorer  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

import mmerge  # noqa: E402
from mmerge.errors import InvalidInput  # noqa: E402
from mmerge.evolve import EvolveError  # noqa: E402
from mmerge.evolve.storage import OWNER, Liveness, open_storage  # noqa: E402
from mmerge.io import open_checkpoint  # noqa: E402


@pytest.fixture
def case(family_files, tmp_path):
    return make_case(family_files, tmp_path / "case")


def states(db):
    with sqlite3.connect(db) as c:
        try:
            return dict(c.execute("select state, count(*) from trials group by state").fetchall())
        except sqlite3.OperationalError:  # the tables are not made yet
            return {}


def numbers(db):
    with sqlite3.connect(db) as c:
        return [n for (n,) in c.execute("select number from trials order by number")]


def test_in_memory_library_call_writes_nothing(case, tmp_path, monkeypatch):
    score = scorer(case)
    seen = []

    def evaluate(tensors):
        seen.append(type(tensors))
        return score(tensors)

    monkeypatch.chdir(tmp_path / "case")
    before = sorted(os.listdir("."))
    summary = mmerge.evolve(
        case["search"], evaluate, trials=6, in_memory=True, sampler="random", seed=1
    )
    assert sorted(os.listdir(".")) == before
    assert seen == [dict] * 6
    assert summary.states["scored"] == 6 and summary.storage == "memory"
    weights = [m["parameters"]["weight"] for m in summary.best_recipe["models"]]
    assert summary.best_params == {"models[0].weight": weights[0], "models[1].weight": weights[1]}
    assert summary.best_score >= max(b["score"] for b in summary.baselines)
    assert summary.best_score == pytest.approx(scorer(case)(summary_model(summary)))


def summary_model(summary):
    """The best recipe merged in memory, as the evaluator saw it."""
    from mmerge.evolve.search import InMemoryModels

    return InMemoryModels().merge(summary.best_recipe)


def test_books_in_out_best_recipe_runs_and_top_k_kept(case, tmp_path):
    out = tmp_path / "out"
    summary = mmerge.evolve(
        case["search"], scorer(case), trials=8, out=out, keep_top=2, sampler="random", seed=0
    )
    kept = sorted(p.name for p in (out / "trials").iterdir())
    top2 = [r["trial"] for r in summary.top[:2]]
    assert kept == [f"trial-{n:05d}" for n in sorted(top2)]
    best = out / "best.yaml"
    assert f"trial {summary.best_trial}," in best.read_text().splitlines()[0]
    r = subprocess.run(
        [sys.executable, "-m", "mmerge", "run", str(best), "-o", str(tmp_path / "again"), "-q"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    again = open_checkpoint(tmp_path / "again")
    kept_model = open_checkpoint(out / "trials" / f"trial-{summary.best_trial:05d}" / "model")
    for name in again:
        np.testing.assert_array_equal(again[name].to_numpy(), kept_model[name].to_numpy())
    assert scorer(case)(tmp_path / "again") == pytest.approx(summary.best_score)
    rows = list(csv.DictReader((out / "trials.csv").read_text().splitlines()))
    assert [int(r["trial"]) for r in rows] == list(range(8))
    assert {r["state"] for r in rows} == {"COMPLETE"}
    assert rows[0]["baseline"].startswith("midpoint")
    assert float(rows[summary.best_trial]["score"]) == summary.best_score


def test_resume_counts_the_study_total(case, tmp_path):
    out = tmp_path / "out"
    run = dict(out=out, sampler="cmaes", seed=3)
    assert mmerge.evolve(case["search"], scorer(case), trials=4, **run).counted == 4
    summary = mmerge.evolve(case["search"], scorer(case), trials=7, **run)
    assert summary.counted == 7 and summary.target == 7
    assert mmerge.evolve(case["search"], scorer(case), trials=7, **run).counted == 7
    fewer = mmerge.evolve(case["search"], scorer(case), trials=5, **run)  # runs nothing
    assert fewer.counted == 7 and "trials: 7 of 7" in summary.text()
    assert "trials: 7 (5 asked for; the study held more already)" in fewer.text()
    assert numbers(out / "study.db") == list(range(7))
    assert states(out / "study.db") == {"COMPLETE": 7}


def test_failed_trials_keep_their_reason_and_count(case, tmp_path):
    score = scorer(case)

    def flaky(path):
        w = open_checkpoint(path)  # noqa: F841 (reads the merged model)
        if len(calls) % 2:
            calls.append(1)
            raise ValueError("evaluation diverged")
        calls.append(0)
        return score(path)

    calls = []
    out = tmp_path / "out"
    summary = mmerge.evolve(case["search"], flaky, trials=6, out=out, sampler="random", seed=0)
    assert summary.counted == 6 and summary.states["failed"] == 3
    assert summary.failures == {"evaluator raised ValueError: evaluation diverged": 3}
    rows = list(csv.DictReader((out / "trials.csv").read_text().splitlines()))
    failed = [r for r in rows if r["state"] == "FAIL"]
    assert len(failed) == 3 and all(r["score"] == "" for r in failed)
    assert {r["failure"] for r in failed} == {"evaluator raised ValueError: evaluation diverged"}
    assert "evaluation diverged" in summary.text()


def test_a_broken_evaluator_stops_the_search(case, tmp_path):
    with pytest.raises(EvolveError, match="5 trials in a row failed, the last: evaluator exited"):
        mmerge.evolve(case["search"], "exit 1 #{model}", trials=50, out=tmp_path / "out")
    assert states(tmp_path / "out" / "study.db")["FAIL"] == 5


def test_changed_search_or_foreign_out_is_refused(case, tmp_path, family_files):
    out = tmp_path / "out"
    mmerge.evolve(case["search"], scorer(case), trials=1, out=out)
    other = case["search"].read_text().replace("[0.0, 1.0]", "[0.0, 2.0]", 1)
    changed = tmp_path / "changed.yaml"
    changed.write_text(other)
    with pytest.raises(InvalidInput, match="different search recipe"):
        mmerge.evolve(changed, scorer(case), trials=2, out=out)
    with pytest.raises(InvalidInput, match="holds study 'evolve'"):
        mmerge.evolve(case["search"], scorer(case), trials=2, out=out, study="another")


def _orphan_trial(url, heartbeat, owner):
    """A running trial left behind by a worker described by `owner`."""
    study = optuna.load_study(study_name="evolve", storage=open_storage(url, heartbeat))
    study.enqueue_trial({"models[0].weight": 0.25, "models[1].weight": 0.75})
    trial = study.ask()
    for d in ("models[0].weight", "models[1].weight"):
        trial.suggest_float(d, 0.0, 1.0)
    study._storage.set_trial_system_attr(trial._trial_id, OWNER, {**owner, "number": trial.number})
    return study, trial.number


def _dead_pid():
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("where", ["this machine", "another machine"])
@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_trials_of_dead_workers_are_failed_and_run_again(case, tmp_path, kind, where):
    from mmerge.evolve.storage import BEAT, Liveness

    out = tmp_path / "out"
    url = f"sqlite:///{out}/study.db" if kind == "sqlite" else f"journal:{tmp_path}/study.log"
    run = dict(out=out, storage=url, heartbeat=1)
    mmerge.evolve(case["search"], scorer(case), trials=2, **run)
    if where == "this machine":
        me = Liveness(optuna.load_study(study_name="evolve", storage=open_storage(url, 1)), 1).me
        study, lost = _orphan_trial(url, 1, {**me, "pid": _dead_pid(), "start": None})
    else:
        owner = {"host": "elsewhere", "boot": "x", "pid": 1, "start": None}
        study, lost = _orphan_trial(url, 1, owner)
        trial_id = study.get_trials(deepcopy=False)[lost]._trial_id
        if kind == "sqlite":
            study._storage.record_heartbeat(trial_id)  # Optuna's heartbeat, then silence
        else:
            study._storage.set_trial_system_attr(trial_id, BEAT, time.time())
        time.sleep(4.5)  # past the grace period (3 beats of 1 s) on SQLite's whole-second clock
    summary = mmerge.evolve(case["search"], scorer(case), trials=4, **run)
    trials = study.get_trials(deepcopy=False)
    assert trials[lost].state.name == "FAIL" and "failure" not in trials[lost].user_attrs
    rerun = [t for t in trials if t.system_attrs.get("failed_trial") == lost]
    assert len(rerun) == 1 and rerun[0].state.name == "COMPLETE"
    assert rerun[0].params == trials[lost].params
    assert summary.counted == 4 and summary.states["released"] == 1
    assert sorted(t.number for t in trials) == list(range(len(trials)))


def test_workers_run_trials_at_once(case, tmp_path):
    stamps = tmp_path / "stamps"
    cmd = f"echo start $(date +%s.%N) >> {stamps}; sleep 0.7; echo end $(date +%s.%N) >> {stamps}"
    cmd += "; echo 1 #{model}"
    mmerge.evolve(case["search"], cmd, trials=4, workers=2, out=tmp_path / "out")
    events = sorted(
        (float(t), 1 if k == "start" else -1)
        for k, t in (line.split() for line in stamps.read_text().splitlines())
    )
    running = peak = 0
    for _t, d in events:
        running += d
        peak = max(peak, running)
    assert peak == 2 and len(events) == 8


def _ask_enqueued(url):
    study = optuna.load_study(study_name="race", storage=open_storage(url, 20))
    return [study.ask().number for _ in range(15)]


def test_processes_popping_queued_trials_at_once_never_share_one(tmp_path):
    # SQLite has no SELECT ... FOR UPDATE: without BEGIN IMMEDIATE two processes read the same
    # queued trial as waiting and both run it (then one crashed telling a finished trial).
    import multiprocessing

    url = f"sqlite:///{tmp_path}/race.db"
    study = optuna.create_study(study_name="race", storage=open_storage(url, 20))
    for k in range(45):
        study.enqueue_trial({"x": float(k)})
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        asked = [n for got in pool.map(_ask_enqueued, [url] * 3) for n in got]
    assert sorted(asked) == list(range(45))
    assert all(t.state.name == "RUNNING" for t in study.get_trials())


def test_a_trial_failed_by_another_worker_meanwhile_is_dropped_not_fatal(case, tmp_path):
    out = tmp_path / "out"
    score, seen = scorer(case), []

    def evaluate(model):
        if not seen:  # another worker judges this one dead: fails the trial, queues it again
            other = optuna.load_study(study_name="evolve", storage=open_storage(url, 20))
            (running,) = other.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            assert Liveness(other, 20).release(running)
        seen.append(model)
        return score(model)

    url = f"sqlite:///{out}/study.db"
    summary = mmerge.evolve(case["search"], evaluate, trials=3, out=out)
    trials = optuna.load_study(study_name="evolve", storage=open_storage(url, 20)).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    (rerun,) = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert rerun.params == trials[0].params
    assert summary.counted == 3 and summary.states["released"] == 1 and len(seen) == 4
    assert not (out / "trials" / "00000").exists()


def test_a_process_done_first_waits_for_the_others_best(case, tmp_path):
    # Two searches share a study (as two machines would). B's trial runs long and scores best;
    # A's share is done first. A's best.yaml must name the study's final best, B's trial, not
    # the best A saw when its own last trial ended.
    import threading

    url = f"sqlite:///{tmp_path}/study.db"
    b_running, a_scored, release = threading.Event(), threading.Event(), threading.Event()

    def slow_best(model):
        b_running.set()
        assert release.wait(60)
        return 10.0

    def fast_worse(model):
        a_scored.set()
        return 0.0

    def search(evaluator, name):
        mmerge.evolve(case["search"], evaluator, trials=2, storage=url, out=tmp_path / name)

    b = threading.Thread(target=search, args=(slow_best, "b"))
    b.start()
    assert b_running.wait(60)
    a = threading.Thread(target=search, args=(fast_worse, "a"))
    a.start()
    assert a_scored.wait(60)
    a.join(3)  # without waiting for B, A has written its books and returned by now
    release.set()
    a.join(60)
    b.join(60)
    study = optuna.load_study(study_name="evolve", storage=open_storage(url, 20))
    best = study.best_trial
    assert best.value == 10.0 and sum(t.state.name == "COMPLETE" for t in study.trials) == 2
    for name in "ab":
        head = (tmp_path / name / "best.yaml").read_text().splitlines()[0]
        assert f"trial {best.number}, score 10.0" in head, (name, head)


@pytest.mark.parametrize("storage", ["sqlite", "journal"])
def test_two_processes_share_one_study(case, tmp_path, storage):
    out = tmp_path / "out"
    url = f"sqlite:///{out}/study.db" if storage == "sqlite" else f"journal:{tmp_path}/s.log"
    args = ["evolve", case["search"], "--evaluator", case["scorer"], "--trials", 12]
    args += ["--storage", url, "-o", out, "--quiet"]
    procs = [cli(*args, cwd=case["folder"]) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    study = optuna.load_study(study_name="evolve", storage=open_storage(url, 20))
    trials = study.get_trials()
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert 12 <= len(done) <= 13 and len(trials) == len(done)  # racing ends may add one
    assert sorted(t.number for t in trials) == list(range(len(trials)))
    workers = {t.system_attrs[OWNER]["pid"] for t in trials}
    assert len(workers) == 2  # both processes ran trials


def test_sigterm_releases_the_running_trial_for_the_next_run(case, tmp_path):
    out = tmp_path / "out"
    slow = ["evolve", case["search"], "--eval-cmd", "sleep 60; echo 1 #{model}", "--trials", 3]
    p = cli(*slow, "-o", out, cwd=case["folder"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (out / "logs").exists():
        if (out / "study.db").exists() and states(out / "study.db").get("RUNNING"):
            break
        time.sleep(0.2)
    time.sleep(0.5)
    p.send_signal(signal.SIGTERM)
    _stdout, stderr = p.communicate(timeout=30)
    assert p.returncode == 130 and "run the same command again" in stderr
    assert states(out / "study.db").get("RUNNING") is None
    fast = ["evolve", case["search"], "--eval-cmd", "echo 1 #{model}", "--trials", 3, "-o", out]
    q = cli(*fast, "-q", cwd=case["folder"])
    assert q.wait(timeout=120) == 0, q.stderr.read()
    s = states(out / "study.db")
    assert s == {"COMPLETE": 3, "FAIL": 1}
    study = optuna.load_study(study_name="evolve", storage=f"sqlite:///{out}/study.db")
    first = study.trials[0]
    again = [t for t in study.trials if t.system_attrs.get("failed_trial") == first.number]
    assert first.state.name == "FAIL" and again[0].params == first.params


def test_cli_held_out_scores_report_json_and_plot(case, tmp_path):
    out = tmp_path / "out"
    args = ["evolve", case["search"], "--evaluator", case["scorer"], "--trials", 5]
    args += ["--keep-top", 2, "--final-eval-cmd", "echo 0.25 #{model}", "-o", out]
    p = cli(*args, "--plot", tmp_path / "s.png", "--sampler", "tpe", cwd=case["folder"])
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr
    assert "trial 0: " in stderr and "best" in stderr  # one line per trial off a terminal
    assert "top 2 (search score, held-out score):" in stdout and "  0.25  " in stdout
    assert "baselines:" in stdout and "the search gained" in stdout
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    r = cli("evolve", "--report", out, "--json", cwd=case["folder"])
    report = json.loads(r.communicate(timeout=60)[0])
    assert report["study"] == "evolve" and report["counted"] == 5
    assert [t["final_score"] for t in report["top"][:2]] == [0.25, 0.25]
    assert report["best_recipe"]["merge_method"] == "task_arithmetic"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trials", "3", "-o", "out"], "exactly one of --eval-cmd and --evaluator"),
        (["--eval-cmd", "echo 1 {model}", "-o", "out"], "missing --trials"),
        (["--eval-cmd", "echo 1 {model}", "--trials", "3"], "missing -o OUT"),
        (["--eval-cmd", "echo 1", "--trials", "3", "-o", "out"], "must contain {model}"),
        (["--evaluator", "nope:f", "--trials", "3", "-o", "out"], "cannot import 'nope'"),
        (["--eval-cmd", "x {model}", "--trials", "3", "-o", "o", "--storage", "db"], "URL"),
        (["--eval-cmd", "x {model}", "--trials", "0", "-o", "out"], "trials must be"),
        (["--eval-cmd", "x {model}", "--trials", "3", "-o", "o", "--metric-weights", "a"], "M"),
    ],
)
def test_cli_usage_errors_are_one_line(case, args, message, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mmerge.cli import cli as main

    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["evolve", str(case["search"]), *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not list(tmp_path.glob("*/evolve.json"))  # OUT is not claimed by a refused command


def test_a_storage_that_cannot_open_leaves_out_free_for_the_corrected_command(case, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(InvalidInput, match="cannot open storage"):
        mmerge.evolve(case["search"], scorer(case), trials=1, out=out, storage="sqlite:////no/x.db")
    assert not (out / "evolve.json").exists()
    assert mmerge.evolve(case["search"], scorer(case), trials=1, out=out).counted == 1


def test_import_mmerge_does_not_import_optuna_and_evolve_stays_callable():
    code = (
        "import sys, mmerge, mmerge.cli; assert 'optuna' not in sys.modules; "
        "import mmerge.evolve; assert callable(mmerge.evolve); assert 'optuna' not in sys.modules"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_bundled_example_search_runs(tmp_path):
    root = Path(__file__).resolve().parents[1]
    cmd = f"{sys.executable} {root / 'examples' / 'evolve_eval.py'} {{model}}"
    args = ["evolve", root / "examples" / "evolve_search.yaml", "--eval-cmd", cmd]
    p = cli(*args, "--metric-weights", "ft1=1,ft2=1", "--trials", 4, "-o", tmp_path / "o", cwd=root)
    stdout, stderr = p.communicate(timeout=180)
    assert p.returncode == 0, stderr
    assert "midpoint = uniform weights" in stdout and "ft1 alone" in stdout
    best = (tmp_path / "o" / "best.yaml").read_text()
    assert "density:\n  - " in best or "density:\n- " in best  # a gradient over 2 layer groups

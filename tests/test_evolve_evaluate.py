"""Evaluators: every way a score is read, and every way an evaluation fails (never a score)."""

import math
import os
import time

import pytest

pytest.importorskip("optuna")

from mmerge.errors import InvalidInput  # noqa: E402
from mmerge.evolve.api import make_evaluator  # noqa: E402
from mmerge.evolve.evaluate import Command, PythonEvaluator, TrialFailed, combine  # noqa: E402


def run(cmd, tmp_path, **kw):
    return Command(cmd, **kw)(tmp_path / "my model", trial=7, worker=1, log=tmp_path / "log.txt")


def test_score_from_a_number_or_json(tmp_path):
    assert run("echo noise; echo 0.75 #{model}", tmp_path) == (0.75, {})
    score, metrics = run("""echo '{"acc": 0.5}' #{model}""", tmp_path)
    assert score == 0.5 and metrics == {"acc": 0.5}
    weights = {"acc": 1.0, "f1": 0.5}
    score, _ = run("""echo '{"acc": 0.5, "f1": 0.2}' #{model}""", tmp_path, metric_weights=weights)
    assert score == pytest.approx(0.6)


def test_placeholders_quoting_and_environment(tmp_path):
    cmd = 'test -n "$MMERGE_TRIAL"; printf "[%s] " {model} >&2; '
    cmd += "echo {trial} {worker} $MMERGE_WORKER >&2; echo 1"
    run(cmd, tmp_path)
    log = (tmp_path / "log.txt").read_text()
    assert f"[{tmp_path / 'my model'}] 7 1 1" in log  # a path with a space stays one word


@pytest.mark.parametrize(
    "cmd, reason",
    [
        ("echo half-done; echo boom >&2; exit 3 #{model}", "exited with status 3: boom"),
        ("kill -9 $$ #{model}", "killed by signal 9"),
        ("echo 'score: high' #{model}", "not a number or JSON: score: high"),
        ("true #{model}", "printed nothing"),
        ("echo '{\"acc\": 0.5' #{model}", "not valid JSON"),
        ("echo nan #{model}", "not a finite number"),
        ("echo '[0.5]' #{model}", "not a number or JSON"),
        ("""echo '{"acc": 0.5, "f1": 0.2}' #{model}""", "several metrics (acc, f1)"),
        ("""echo '{"acc": "high"}' #{model}""", "metric 'acc' is not a number"),
    ],
)
def test_command_failures_are_reasons_not_scores(tmp_path, cmd, reason):
    with pytest.raises(TrialFailed) as err:
        run(cmd, tmp_path)
    assert reason in str(err.value)
    assert "\n" not in str(err.value)


def test_timeout_kills_the_command_and_all_it_started(tmp_path):
    marker = tmp_path / "late"
    started = time.monotonic()
    with pytest.raises(TrialFailed, match="timed out after 0.5 s"):
        run(f"(sleep 2; touch {marker}) & sleep 30 #{{model}}", tmp_path, timeout=0.5)
    assert time.monotonic() - started < 5
    time.sleep(2.5)
    assert not marker.exists()  # the background child was killed with the group
    assert "timed out" in (tmp_path / "log.txt").read_text()


def test_metric_weights_name_a_missing_metric(tmp_path):
    with pytest.raises(TrialFailed, match="no metric 'f1' .it has: acc"):
        run("""echo '{"acc": 0.5}' #{model}""", tmp_path, metric_weights={"f1": 1.0})
    with pytest.raises(TrialFailed, match="one number"):
        run("echo 0.5 #{model}", tmp_path, metric_weights={"f1": 1.0})


def test_command_needs_model_placeholder():
    with pytest.raises(InvalidInput, match=r"must contain \{model\}"):
        Command("python eval.py")


def test_python_evaluator_failures():
    def boom(_path):
        raise RuntimeError("CUDA out of memory\nmore lines")

    with pytest.raises(TrialFailed, match="^evaluator raised RuntimeError: CUDA out of memory$"):
        PythonEvaluator(boom)("m", trial=0, worker=0)
    for bad in (None, "0.5", True, {"acc": math.inf}, {}):
        with pytest.raises(TrialFailed):
            PythonEvaluator(lambda _p, b=bad: b)("m", trial=0, worker=0)
    assert PythonEvaluator(lambda p: {"x": 2})("m", trial=0, worker=0) == (2.0, {"x": 2.0})


def test_combine_single_metric_needs_no_weights():
    assert combine({"loss": 1.5}, None) == (1.5, {"loss": 1.5})


def test_timeout_is_for_commands_only():
    with pytest.raises(InvalidInput, match="commands only"):
        make_evaluator(lambda p: 1.0, None, 10.0, False)
    with pytest.raises(InvalidInput, match="needs a Python callable"):
        make_evaluator("echo 1 {model}", None, None, True)


def test_load_callable(tmp_path, monkeypatch):
    from mmerge.evolve.evaluate import load_callable

    (tmp_path / "my_scores.py").write_text("def score(path):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(os.fspath(tmp_path))
    assert load_callable("my_scores:score")("x") == 1.0
    with pytest.raises(InvalidInput, match="package.module:function"):
        load_callable("my_scores.score")
    with pytest.raises(InvalidInput, match="has no 'nope'"):
        load_callable("my_scores:nope")
    with pytest.raises(InvalidInput, match="cannot import"):
        load_callable("no_such_module_xyz:f")

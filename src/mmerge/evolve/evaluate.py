"""Evaluators: a shell command or a Python callable that scores a merged model.

Whatever goes wrong (a non-zero exit, a timeout, an exception, output that is not a score)
becomes a `TrialFailed` with a one-line reason, recorded with the trial and never a score.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from numbers import Real
from pathlib import Path
from typing import Any

from mmerge.errors import InvalidInput

PLACEHOLDERS = ("{model}", "{trial}", "{worker}")


class TrialFailed(Exception):
    """A trial that produced no score; the message is the reason recorded with it."""


def combine(result: Any, weights: Mapping[str, float] | None) -> tuple[float, dict[str, float]]:
    """(score, metrics) from an evaluator's result: a number, or {metric: value} combined by
    `weights` (one metric needs no weights)."""
    if isinstance(result, Real) and not isinstance(result, bool):
        if weights:
            raise TrialFailed(
                f"evaluator gave one number ({result}) but --metric-weights names metrics "
                f"({', '.join(weights)})"
            )
        return _finite(float(result), "score"), {}
    if not isinstance(result, Mapping) or not result:
        raise TrialFailed(f"evaluator result is not a number or {{metric: value}}: {result!r:.80}")
    metrics = {}
    for key, value in result.items():
        if not isinstance(value, Real) or isinstance(value, bool):
            raise TrialFailed(f"metric {key!r} is not a number: {value!r:.40}")
        metrics[str(key)] = _finite(float(value), f"metric {key!r}")
    if not weights:
        if len(metrics) > 1:
            raise TrialFailed(
                f"evaluator gave several metrics ({', '.join(metrics)}): say how to combine them "
                "with --metric-weights"
            )
        return next(iter(metrics.values())), metrics
    missing = [k for k in weights if k not in metrics]
    if missing:
        raise TrialFailed(
            f"evaluator output has no metric {missing[0]!r} (it has: {', '.join(metrics)})"
        )
    return sum(w * metrics[k] for k, w in weights.items()), metrics


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise TrialFailed(f"{what} is not a finite number: {value}")
    return value


def parse_output(stdout: str) -> Any:
    """The last non-empty line of an evaluator's standard output: a number or a JSON object."""
    lines = [line.strip() for line in stdout.splitlines() if line.strip()]
    if not lines:
        raise TrialFailed("evaluator printed nothing (expected a number or JSON on its last line)")
    last = lines[-1]
    if last.startswith("{"):
        try:
            return json.loads(last)
        except json.JSONDecodeError as exc:
            raise TrialFailed(
                f"last output line is not valid JSON ({exc.msg}): {last:.80}"
            ) from None
    try:
        return float(last)
    except ValueError:
        raise TrialFailed(f"last output line is not a number or JSON: {last:.80}") from None


class Command:
    """A shell command with `{model}` (and optionally `{trial}`, `{worker}`) in it."""

    in_memory = False

    def __init__(
        self,
        template: str,
        *,
        timeout: float | None = None,
        metric_weights: Mapping[str, float] | None = None,
    ) -> None:
        if "{model}" not in template:
            raise InvalidInput(f"evaluator command must contain {{model}}: {template!r}")
        if timeout is not None and timeout <= 0:
            raise InvalidInput(f"evaluator timeout must be positive, got {timeout}")
        self.template, self.timeout, self.weights = template, timeout, metric_weights
        self._running: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"command {self.template!r}"

    def command_line(self, model: Path, trial: int, worker: int) -> str:
        import shlex

        line = self.template.replace("{model}", shlex.quote(str(model)))
        return line.replace("{trial}", str(trial)).replace("{worker}", str(worker))

    def __call__(
        self, model: Any, *, trial: int, worker: int, log: Path | None = None
    ) -> tuple[float, dict[str, float]]:
        line = self.command_line(Path(model), trial, worker)
        env = {**os.environ, "MMERGE_TRIAL": str(trial), "MMERGE_WORKER": str(worker)}
        proc = subprocess.Popen(
            line,
            shell=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,  # its own process group: a timeout ends all it started
        )
        with self._lock:
            self._running[proc.pid] = proc
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            stdout, stderr = proc.communicate()
            _write_log(log, line, stdout, stderr, "timed out")
            raise TrialFailed(f"evaluator timed out after {self.timeout:g} s") from None
        except BaseException:  # Ctrl-C here: the command is in its own group, so end it too
            _kill_group(proc)
            raise
        finally:
            with self._lock:
                self._running.pop(proc.pid, None)
        _write_log(log, line, stdout, stderr, f"exit status {proc.returncode}")
        if proc.returncode != 0:
            how = (
                f"was killed by signal {-proc.returncode}"
                if proc.returncode < 0
                else f"exited with status {proc.returncode}"
            )
            tail = _last_line(stderr) or _last_line(stdout)
            raise TrialFailed(f"evaluator {how}" + (f": {tail}" if tail else ""))
        return combine(parse_output(stdout), self.weights)

    def stop(self) -> None:
        """End every evaluation still running (on interrupt)."""
        with self._lock:
            running = list(self._running.values())
        for proc in running:
            _kill_group(proc)


class PythonEvaluator:
    """A callable given the merged model's path, or (in_memory) its tensors {name: array}."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        in_memory: bool = False,
        metric_weights: Mapping[str, float] | None = None,
    ) -> None:
        if not callable(fn):
            raise InvalidInput(f"evaluator must be callable, got {fn!r}")
        self.fn, self.in_memory, self.weights = fn, in_memory, metric_weights

    def __repr__(self) -> str:
        return f"callable {getattr(self.fn, '__qualname__', self.fn)!r}"

    def __call__(
        self, model: Any, *, trial: int, worker: int, log: Path | None = None
    ) -> tuple[float, dict[str, float]]:
        try:
            result = self.fn(model)
        except Exception as exc:  # the evaluator's own failure is the trial's, not ours
            text = str(exc).splitlines()[0] if str(exc) else ""
            reason = f"evaluator raised {type(exc).__name__}: {text}".rstrip(": ")
            raise TrialFailed(reason) from exc
        return combine(result, self.weights)

    def stop(self) -> None:
        """A Python call cannot be interrupted; it finishes on its own."""


def load_callable(spec: str) -> Callable[[Any], Any]:
    """`package.module:function` -> the function (the current folder is importable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidInput(f"evaluator {spec!r}: expected package.module:function")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInput(f"evaluator {spec!r}: cannot import {module_name!r}: {exc}") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise InvalidInput(f"evaluator {spec!r}: {module_name} has no {attr!r}")
    if not callable(fn):
        raise InvalidInput(f"evaluator {spec!r} is not callable")
    return fn


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def _write_log(log: Path | None, line: str, stdout: str, stderr: str, end: str) -> None:
    if log is None:
        return
    with contextlib.suppress(OSError):
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(
            f"$ {line}\n--- stdout\n{stdout or ''}\n--- stderr\n{stderr or ''}\n--- {end}\n"
        )

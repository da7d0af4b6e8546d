"""A search problem with a known optimum for the `mmerge evolve` tests: task-arithmetic weights
(0.3, 0.8) rebuild a target checkpoint; the score is minus the relative distance to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from mmerge.io import open_checkpoint
from mmerge.io.layout import TensorSpec
from mmerge.io.writer import StreamingWriter

OPTIMUM = (0.3, 0.8)
SCORER = """import numpy as np
from mmerge.io import open_checkpoint
TARGET = {target!r}
BASE = {base!r}

def _arrays(path):
    return {{k: v.to_numpy() for k, v in open_checkpoint(path).items()}}

_t, _b = _arrays(TARGET), _arrays(BASE)

def score(model):
    m = model if isinstance(model, dict) else _arrays(model)
    num = sum(float(np.sum((np.asarray(m[k]) - _t[k]) ** 2)) for k in _t)
    den = sum(float(np.sum((_t[k] - _b[k]) ** 2)) for k in _t)
    return -float(np.sqrt(num / den))
"""


def make_case(family: dict, folder: Path) -> dict:
    """Write target.safetensors, scorer.py and search.yaml into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    b, f1, f2 = (open_checkpoint(family[n]) for n in ("base", "ft1", "ft2"))
    target = folder / "target.safetensors"
    specs = [TensorSpec(k, "F32", b[k].shape) for k in b]
    with StreamingWriter(target, specs) as w:
        for k in b:
            tb = b[k].to_numpy()
            t = tb + OPTIMUM[0] * (f1[k].to_numpy() - tb) + OPTIMUM[1] * (f2[k].to_numpy() - tb)
            w.write(k, t.astype(np.float32))
            w.finish_tensor(k)
    (folder / "scorer.py").write_text(SCORER.format(target=str(target), base=str(family["base"])))
    search = folder / "search.yaml"
    search.write_text(
        f"""merge_method: task_arithmetic
base_model: {family["base"]}
models:
  - model: {family["ft1"]}
    parameters: {{weight: {{search: [0.0, 1.0]}}}}
  - model: {family["ft2"]}
    parameters: {{weight: {{search: [0.0, 1.0]}}}}
dtype: float32
"""
    )
    return {"folder": folder, "search": search, "target": target, "scorer": "scorer:score"}


def scorer(case: dict):
    """The case's score function, imported in this process."""
    import importlib.util

    path = case["folder"] / "scorer.py"
    spec = importlib.util.spec_from_file_location("evolve_case_scorer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.score


def cli(*args, cwd: Path, **kw) -> subprocess.Popen:
    """`mmerge ARGS` as a separate process (its own Python), run in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.Popen(
        [sys.executable, "-m", "mmerge", *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )

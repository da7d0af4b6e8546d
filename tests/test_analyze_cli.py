"""The `mmerge analyze` command object: JSON for scripts, the summary, the PNG plot, errors."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from test_analyze import FLAG_WORDS, family, gaussian, make_base, write

from mmerge.analyze.command import analyze
from mmerge.errors import MmergeError, PlanError


def run(*args):
    return CliRunner().invoke(analyze, [str(a) for a in args])


def numbers(obj, want, path=()):
    """Numbers in a JSON tree whose key path satisfies `want` (as scripts find them)."""
    if isinstance(obj, dict):
        return [x for k, v in obj.items() for x in numbers(v, want, (*path, str(k)))]
    if isinstance(obj, list):
        return [x for v in obj for x in numbers(v, want, path)]
    ok = isinstance(obj, (int, float)) and not isinstance(obj, bool)
    return [float(obj)] if ok and path and want(path) else []


def task_cos(p):
    return re.search("cos", p[-1]) and any("task" in k for k in p)


def conflict(p):
    return "conflict" in p[-1]


@pytest.fixture
def opposite(tmp_path):
    d = gaussian(1)
    base, fts, _, _ = family(tmp_path, [d, {n: -v for n, v in d.items()}])
    return base, fts


def test_json_is_the_only_stdout(opposite):
    base, fts = opposite
    res = run(base, *fts, "--json", "--density", "0.2", "--density", "0.4")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["densities"] == [0.2, 0.4]
    assert min(numbers(out, task_cos)) < -0.999
    assert max(numbers(out, conflict)) == 1.0
    assert set(out["overall"]["pairs"][0]["sign_conflict_top"]) == {"0.2", "0.4"}


def test_orthogonal_and_stranger_through_json(tmp_path):
    d1, d2 = gaussian(1), gaussian(2)
    for v1, v2 in zip(d1.values(), d2.values(), strict=True):
        v1.ravel()[1::2] = 0
        v2.ravel()[0::2] = 0
    base, fts, _, _ = family(tmp_path, [d1, d2])
    orth = json.loads(run(base, *fts, "--json").output)
    assert max(abs(x) for x in numbers(orth, task_cos)) == 0.0
    assert not any(w in json.dumps(orth).lower() for w in FLAG_WORDS)
    other = write(tmp_path / "ft9.safetensors", make_base(seed=5))
    mixed = json.loads(run(base, fts[0], other, "--json").output)
    assert "does not share a base" in json.dumps(mixed)


def test_nan_weights_give_null_figures_not_invalid_json(tmp_path):
    d = gaussian(1)
    d["lm_head.weight"][0, 0] = np.nan
    base, fts, _, _ = family(tmp_path, [d, gaussian(2)])
    res = run(base, *fts, "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["overall"]["pairs"][0]["task_cos"] is None
    assert out["layers"][0]["pairs"][0]["task_cos"] is not None  # embed is untouched
    assert "ft1 has NaN or infinite weights" in run(base, *fts).output


def test_summary_has_layers_findings_and_recommendation(opposite):
    base, fts = opposite
    res = run(base, *fts)
    assert res.exit_code == 0, res.output
    text = res.output
    for part in ("Fine-tunes", "Pairs", "Layers, worst first", "Findings", "Recommendation: ties"):
        assert part in text
    assert "opposing" in text


def test_quiet_prints_nothing(opposite):
    res = run(*opposite[:1], *opposite[1], "--quiet")
    assert res.exit_code == 0 and res.output == ""


def test_plot_writes_a_png(opposite, tmp_path):
    base, fts = opposite
    png = tmp_path / "layers.png"
    res = run(base, *fts, "--plot", png, "--quiet")
    assert res.exit_code == 0, res.output
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_with_many_pairs_and_one_fine_tune(tmp_path):
    base, fts, _, _ = family(tmp_path, [gaussian(k) for k in range(1, 6)])  # 10 pairs: heatmaps
    for args, name in ((fts, "many.png"), (fts[:1], "one.png")):
        res = run(base, *args, "--plot", tmp_path / name, "--quiet")
        assert res.exit_code == 0, res.output
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_plot_without_matplotlib_says_what_to_install(opposite, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr("mmerge.analyze.scan.analyze", None)  # fails before reading
    res = run(*opposite[:1], *opposite[1], "--plot", tmp_path / "p.png")
    assert isinstance(res.exception, MmergeError)
    assert 'pip install "mmerge[plot]"' in str(res.exception)


def test_plot_into_a_missing_folder_fails_before_reading(opposite, tmp_path, monkeypatch):
    monkeypatch.setattr("mmerge.analyze.scan.analyze", None)  # must not be reached
    res = run(*opposite[:1], *opposite[1], "--plot", tmp_path / "no" / "p.png")
    assert res.exit_code == 2 and "does not exist" in res.output


def test_mismatched_models_fail_clearly(tmp_path):
    base, _, arrays, _ = family(tmp_path, [gaussian(1)])
    bad = write(tmp_path / "bad.safetensors", {**arrays, "lm_head.weight": np.zeros(3, np.float32)})
    res = run(base, bad)
    assert isinstance(res.exception, PlanError)
    assert "'lm_head.weight'" in str(res.exception)


def test_needs_at_least_one_fine_tune(opposite):
    res = run(opposite[0])
    assert res.exit_code == 2 and "Missing argument" in res.output


def test_the_help_lists_every_command_without_importing_numpy():
    """`mmerge --help` loads each command to list it; analyze reads checkpoints with numpy
    only when it runs (the help took 0.44 s with numpy and the reader, 0.14 s without)."""
    code = (
        "import sys\nfrom mmerge.cli import run_cli\nrun_cli(['--help'])\n"
        "print('numpy' in sys.modules)\n"
        "from mmerge.analyze import AnalysisResult, analyze\nprint(analyze.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert any(line.strip().startswith("analyze") for line in lines)
    assert lines[-2:] == ["False", "mmerge.analyze.scan"]

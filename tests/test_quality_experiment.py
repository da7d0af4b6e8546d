"""The quality experiment of bench/quality, reduced: a fraction of the digits, two tasks.

What must hold whatever the method: every merge mmerge writes loads into the network and
scores; each fine-tune beats chance on its own task; a merge of a fine-tune with itself scores
exactly as that fine-tune. No ordering of methods is asserted.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from safetensors.torch import load_file  # noqa: E402

from mmerge.methods.registry import all_methods  # noqa: E402

QUALITY = Path(__file__).resolve().parents[1] / "bench" / "quality"


def _load(name: str):
    """A module of bench/quality, imported from its file (bench is not a package)."""
    spec = importlib.util.spec_from_file_location(f"quality_{name}", QUALITY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


quality = _load("experiment")
bench = _load("run")

REDUCED = quality.Config(
    tasks=("up:parity", "rot90:digit"),
    fraction=0.5,
    width=64,
    features=16,
    pretrain_epochs=15,
    probe_steps=100,
    finetune_epochs=10,
    finetune_lr=1e-3,
)


@pytest.fixture(scope="module")
def ex(tmp_path_factory):
    return quality.Experiment(REDUCED, tmp_path_factory.mktemp("quality"))


def _self_merge(ex, spec, task):
    """A recipe merging the fine-tune of `task` with itself, at parameters that keep it."""
    keep = {"normalize": True, "density": 1.0, "lambda": 1.0}
    mine = {p.name: keep[p.name] for p in spec.params if p.name in keep}
    per_model = {k: v for k, v in mine.items() if spec.param(k).per_model}
    global_ = {k: v for k, v in mine.items() if not spec.param(k).per_model}
    copies = 1 if spec.max_models == 1 else 2
    return ex.recipe(
        spec.name,
        [task] * copies,
        base=spec.needs_base,
        params=global_,
        model_params=per_model,
    )


def test_evaluator_is_the_mean_accuracy_over_tasks(ex, tmp_path):
    from mmerge.engine.api import run_recipe
    from mmerge.io import open_checkpoint

    path = ex.finetune_paths["up:parity"]
    scores = ex.score_file(path, "val")
    mean = sum(scores.values()) / len(scores)
    assert ex.evaluator("val")(str(path)) == pytest.approx(mean)
    # what `mmerge evolve` gives it: a merged model's folder, or its tensors in memory
    run_recipe(ex.recipe("linear", ["up:parity"] * 2, base=False), tmp_path / "model")
    assert ex.evaluator("val")(tmp_path / "model") == pytest.approx(mean)
    tensors = {k: v.to_numpy() for k, v in open_checkpoint(path).items()}
    assert ex.evaluator("val")(tensors) == pytest.approx(mean)


def test_each_finetune_beats_chance_on_its_task(ex):
    chance = ex.chance("test")
    for task, path in ex.finetune_paths.items():
        score = ex.score_file(path, "test", [task])[task]
        assert score > chance[task] + 0.1, (task, score, chance[task])


@pytest.mark.parametrize("spec", all_methods(), ids=lambda s: s.name)
def test_merged_model_loads_and_scores(ex, spec, tmp_path):
    from mmerge.engine.api import run_recipe

    tasks = list(REDUCED.tasks)[: 1 if spec.max_models == 1 else 2]
    out = tmp_path / "merged.safetensors"
    run_recipe(ex.recipe(spec.name, tasks, base=spec.needs_base), out)
    merged, base = load_file(out), load_file(ex.base_path)
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}
    scores = ex.score_state(merged, "test", tasks)
    assert set(scores) == set(tasks)
    assert all(0.0 <= s <= 1.0 for s in scores.values())


@pytest.mark.parametrize("spec", all_methods(), ids=lambda s: s.name)
def test_merging_a_finetune_with_itself_keeps_its_scores(ex, spec):
    for task, path in ex.finetune_paths.items():
        alone = ex.score_file(path, "test", REDUCED.tasks)
        merged = ex.score_recipe(_self_merge(ex, spec, task), "test", REDUCED.tasks)
        assert merged == alone, (spec.name, task)


def test_experiment_is_deterministic(ex, tmp_path):
    again = quality.Experiment(REDUCED, tmp_path)
    for task in REDUCED.tasks:
        first = load_file(ex.finetune_paths[task])
        second = load_file(again.finetune_paths[task])
        assert all((first[k] == second[k]).all() for k in first), task


def test_splits_are_disjoint(ex):
    """Test images are held out: none of them is pretrained, fine-tuned or chosen on."""
    rows = [set(ex.data.index[s].tolist()) for s in quality.SPLITS]
    assert sum(map(len, rows)) == len(set().union(*rows))


def test_bench_writes_tables_and_plot_for_every_method(tmp_path):
    small = quality.Config(**{**REDUCED.__dict__, "pretrain_epochs": 2, "finetune_epochs": 2})
    grid = {"lambda": (0.5,), "density": (0.5,)}
    results = [bench.run_seed(small, lambda _msg: None, grid, search_trials=6)]
    tasks = list(small.tasks)
    for kind in ("multi", "pairwise"):
        text = bench.table(results, kind, tasks)
        for spec in all_methods():
            assert f"| {spec.name} |" in text, (kind, spec.name)
    assert "| evolve | CMA-ES, 6 trials" in bench.table(results, "multi", tasks)
    found = results[0]["multi"]["evolve"]
    assert found["tried"] == 6 and set(found["test"]) == set(tasks)
    # the recipe found in memory, merged again by the streaming engine, scores as in the search
    assert found["val"] == pytest.approx(found["search_val"])
    assert found["search_val"] >= max(found["baselines_val"].values())
    bench.plot(results, tasks, tmp_path / "quality.png")
    assert (tmp_path / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

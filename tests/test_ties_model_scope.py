"""TIES over the whole model (`scope: model`, spec/methods.md section 2.5) against an
independent float64 implementation of the paper's reference code, on small models whose task
vectors are exact in float32: the same kept entries, the same merged values up to rounding; and
different from trimming each tensor alone."""

import dataclasses
import itertools

import numpy as np
import pytest
from helpers import REF

import mmerge
from mmerge.engine.api import run_recipe
from mmerge.engine.execute import Execution
from mmerge.engine.output import OutputOptions, write_plan
from mmerge.engine.plan import Source, build_plan
from mmerge.io import StreamingWriter, TensorSpec, open_checkpoint
from mmerge.testing import llama_shapes

SHAPES = llama_shapes(hidden=24, intermediate=40, layers=2, vocab=64)
_RUNS = itertools.count()  # a fresh output name per merge


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A float32 base and three fine-tunes on a grid; each tensor moved by its own power of two,
    so the whole-model threshold differs from every tensor's own."""
    out = tmp_path_factory.mktemp("ties_global")
    rng = np.random.default_rng(3)
    base = {n: rng.integers(-64, 65, s).astype(np.float32) / 128 for n, s in SHAPES.items()}
    paths = {"base": _write(out / "base.safetensors", base)}
    for t in range(3):
        ft = {}
        for j, (name, b) in enumerate(base.items()):
            scale = np.float32(2.0 ** -(7 + (j * 3 + t) % 5))
            ft[name] = b + rng.integers(-16, 17, b.shape).astype(np.float32) * scale
        paths[f"ft{t + 1}"] = _write(out / f"ft{t + 1}.safetensors", ft)
    return paths


def _write(path, tensors):
    specs = [TensorSpec(n, "F32", a.shape) for n, a in tensors.items()]
    with StreamingWriter(path, specs, layout="file") as w:
        for n, a in tensors.items():
            w.write(n, a)
            w.finish_tensor(n)
        w.commit()
    return path


def load(path):
    with open_checkpoint(path) as ckpt:
        return {n: np.array(r.to_numpy()) for n, r in ckpt.items()}


def merge(family, names, tmp_path, **params):
    """Merge the models `names` with TIES; a list `weight` is per model (a list of a global
    parameter would be a gradient over layers)."""
    out = tmp_path / f"{'-'.join(names)}-{next(_RUNS)}.safetensors"
    weight = params.pop("weight", 1.0)
    per_model = [{"weight": w} for w in weight] if isinstance(weight, list) else None
    if per_model is None:
        params["weight"] = weight
    mmerge.merge(
        [family[n] for n in names],
        out,
        base=family["base"],
        method="ties",
        model_params=per_model,
        **params,
    )
    return load(out)


@pytest.mark.parametrize("density", [0.2, 0.5, [0.1, 0.3, 0.6]])
def test_each_models_kept_entries_are_the_papers(family, tmp_path, density):
    """Merged alone, a model's result minus the base is its trimmed task vector: the mask."""
    base = load(family["base"])
    for t, name in enumerate(("ft1", "ft2", "ft3")):
        d = density[t] if isinstance(density, list) else density
        got = merge(family, [name], tmp_path, density=d, scope="model")
        want = REF.ties_whole_model([load(family[name])], base, density=d)
        for k in base:
            np.testing.assert_array_equal(got[k] != base[k], want[k] != base[k], err_msg=k)
            np.testing.assert_array_equal(got[k], want[k].astype(np.float32), err_msg=k)


@pytest.mark.parametrize("election", ["sum", "weighted_sum", "count"])
def test_three_models_equal_the_papers_algorithm(family, tmp_path, election):
    base = load(family["base"])
    models = [load(family[n]) for n in ("ft1", "ft2", "ft3")]
    params = dict(density=0.2, election=election, weight=[1.0, 0.5, 2.0])
    got = merge(family, ["ft1", "ft2", "ft3"], tmp_path, scope="model", **params)
    want = REF.ties_whole_model(models, base, **params)
    for k in base:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
    per_tensor = merge(family, ["ft1", "ft2", "ft3"], tmp_path, **params)
    assert any(not np.array_equal(per_tensor[k], got[k]) for k in base)


def test_a_tensor_read_twice_counts_once(family, tmp_path):
    """A plan that writes one stored tensor twice (layer stacking does) trims as if once."""
    ckpts = {n: open_checkpoint(family[n]) for n in ("base", "ft1", "ft2")}
    plan = build_plan(
        [Source(ckpts["ft1"], {}, "ft1"), Source(ckpts["ft2"], {}, "ft2")],
        method="ties",
        base=Source(ckpts["base"], {}, "base"),
        params={"density": 0.2, "scope": "model"},
    )
    embed = next(i for i in plan.items if i.name == "model.embed_tokens.weight")
    plan.items.append(dataclasses.replace(embed, name="model.embed_tokens.copy"))
    out = write_plan(
        plan, list(ckpts.values()), OutputOptions(tmp_path / "x.safetensors"), Execution()
    )
    got = load(out)
    want = merge(family, ["ft1", "ft2"], tmp_path, density=0.2, scope="model")
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    np.testing.assert_array_equal(got["model.embed_tokens.copy"], want["model.embed_tokens.weight"])
    for c in ckpts.values():
        c.close()


def test_a_recipe_takes_scope_model(family, tmp_path):
    recipe = {
        "merge_method": "ties",
        "base_model": str(family["base"]),
        "models": [{"model": str(family["ft1"])}, {"model": str(family["ft2"])}],
        "parameters": {"density": 0.2, "scope": "model"},
    }
    out = run_recipe(recipe, tmp_path / "r.safetensors").output
    want = merge(family, ["ft1", "ft2"], tmp_path, density=0.2, scope="model")
    got = load(out)
    for k, v in want.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)

"""mergekit's own recipes run unchanged: the recipes of its examples/ folder and configs shaped
like the ones its tests use, pointed at generated Llama-shaped models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import mmerge
from mmerge.engine.api import run_recipe
from mmerge.errors import InvalidInput, UnknownMethod
from mmerge.io import open_checkpoint
from mmerge.testing import write_model_family

LAYERS = 4


def load(path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as ckpt:
        return {name: np.array(ref.to_numpy()) for name, ref in ckpt.items()}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Three fine-tunes of one base (a, b, c), as Hugging Face folders in bfloat16."""
    paths = write_model_family(
        tmp_path_factory.mktemp("mk"),
        hidden=16,
        intermediate=32,
        layers=LAYERS,
        vocab=32,
        n_finetunes=3,
    )
    return {"base": paths["base"], "a": paths["ft1"], "b": paths["ft2"], "c": paths["ft3"]}


def run(models, tmp_path, text: str, name: str = "out"):
    """Run a YAML recipe whose model names are keys of `models`."""
    for key in ("base", "a", "b", "c"):
        text = text.replace(f"<{key}>", str(models[key]))
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text)
    out = tmp_path / name
    result = run_recipe(recipe, out)
    return load(out), result


def assert_equal(got, want, dtype):
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], np.asarray(want[name]).astype(dtype), name)


# -- the examples/ folder ----------------------------------------------------------------------


def test_example_bio_merge_ties(models, tmp_path):
    got, result = run(
        models,
        tmp_path,
        """
models:
  - model: <a>
    parameters: {density: 0.5, weight: 0.5}
  - model: <b>
    parameters: {density: 0.5, weight: 0.5}
merge_method: ties
base_model: <base>
parameters:
  normalize: false
  int8_mask: true
dtype: float16
""",
    )
    assert any("int8_mask" in w for w in result.warnings)
    want = mmerge.merge_tensors(
        [load(models["a"]), load(models["b"])],
        method="ties",
        base=load(models["base"]),
        density=0.5,
        weight=0.5,
        normalize=False,
    )
    assert_equal(got, want, np.float16)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == "float16"


GRADIENT_T = """
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
"""


def test_example_gradient_slerp_equals_its_models_form(models, tmp_path):
    sliced, _ = run(
        models,
        tmp_path,
        f"""
slices:
  - sources:
      - model: <a>
        layer_range: [0, {LAYERS}]
      - model: <b>
        layer_range: [0, {LAYERS}]
merge_method: slerp
base_model: <a>
parameters:
  t:{GRADIENT_T}dtype: float16
""",
        "sliced",
    )
    plain, _ = run(
        models,
        tmp_path,
        f"""
models:
  - model: <a>
  - model: <b>
merge_method: slerp
base_model: <a>
parameters:
  t:{GRADIENT_T}dtype: float16
""",
        "plain",
    )
    assert_equal(sliced, plain, np.float16)
    a, b = load(models["a"]), load(models["b"])
    q0 = "model.layers.0.self_attn.q_proj.weight"  # t = 0 on the first layer: model a
    np.testing.assert_array_equal(sliced[q0], a[q0].astype(np.float16))
    up0 = "model.layers.0.mlp.up_proj.weight"  # t = 1 there for the mlp: model b
    np.testing.assert_array_equal(sliced[up0], b[up0].astype(np.float16))


def test_example_linear(models, tmp_path):
    got, _ = run(
        models,
        tmp_path,
        """
models:
  - model: <a>
    parameters: {weight: 1.0}
  - model: <b>
    parameters: {weight: 0.3}
  - model: <c>
    parameters: {weight: 0.5}
merge_method: linear
dtype: float16
""",
    )
    states = [load(models[k]) for k in "abc"]
    want = mmerge.merge_tensors(
        states, method="linear", model_params=[{"weight": w} for w in (1.0, 0.3, 0.5)]
    )
    assert_equal(got, want, np.float16)


def test_example_layer_stacking_passthrough(models, tmp_path):
    got, result = run(
        models,
        tmp_path,
        """
slices:
  - sources:
    - model: <a>
      layer_range: [0, 3]
  - sources:
    - model: <b>
      layer_range: [1, 4]
merge_method: passthrough
dtype: float16
""",
    )
    assert result.plan.layer_sources == [0, 1, 2, 1, 2, 3]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    b = load(models["b"])
    w = "model.layers.5.mlp.down_proj.weight"
    np.testing.assert_array_equal(got[w], b["model.layers.3.mlp.down_proj.weight"].astype("f2"))


def test_example_ties_with_gradients_and_filters(models, tmp_path):
    got, _ = run(
        models,
        tmp_path,
        """
models:
  - model: <a>
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: <b>
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: <c>
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: <base>
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    )
    a, b, c, base = (load(models[k]) for k in ("a", "b", "c", "base"))
    name = "model.layers.3.mlp.up_proj.weight"  # last layer: density 0.1 / weight 1 / mlp 0.5
    want = mmerge.merge_tensors(
        [{name: a[name]}, {name: b[name]}, {name: c[name]}],
        method="ties",
        base={name: base[name]},
        model_params=[
            {"density": 0.1, "weight": 1.0},
            {"density": 0.5, "weight": 1.0},
            {"density": 0.33, "weight": 0.5},
        ],
    )
    np.testing.assert_array_equal(got[name], np.asarray(want[name]).astype(np.float16))


def test_example_arcee_fusion_is_refused_by_name(models, tmp_path):
    with pytest.raises(UnknownMethod, match="unknown merge method 'arcee_fusion'"):
        run(
            models,
            tmp_path,
            "models:\n  - model: <a>\n  - model: <b>\nmerge_method: arcee_fusion\n"
            "base_model: <a>\ndtype: bfloat16\n",
        )


# -- configs shaped like mergekit's tests (two models, weights 0.6 / 0.4, bfloat16) -------------


def two_models(method: str, base: str | None = None, params: dict | None = None, pair="ab"):
    recipe = {
        "merge_method": method,
        "models": [
            {"model": f"<{pair[0]}>", "parameters": {"weight": 0.6}},
            {"model": f"<{pair[1]}>", "parameters": {"weight": 0.4}},
        ],
        "dtype": "bfloat16",
    }
    if base:
        recipe["base_model"] = f"<{base}>"
    if params:
        recipe["parameters"] = params
    return yaml.safe_dump(recipe)


MERGEKIT_TEST_CONFIGS = {
    "linear": two_models("linear"),
    "slerp": two_models("slerp", "a", {"t": 0.35}),
    "nuslerp": two_models("nuslerp", None, {"nuslerp_row_wise": False, "nuslerp_flatten": True}),
    "nuslerp_row_wise_base": two_models(
        "nuslerp", "c", {"nuslerp_row_wise": True, "nuslerp_flatten": False}
    ),
    "task_arithmetic": two_models("task_arithmetic", "c"),
    "breadcrumbs": two_models("breadcrumbs", "c"),
    "ties": two_models("ties", "c", {"density": 0.3}),
    "sce": two_models("sce", "c", {"select_topk": 0.5}),
    "multislerp": two_models("multislerp", "c"),
    "dare_ties": two_models("dare_ties", "c", {"density": 0.66}),
    "model_stock": two_models("model_stock", "a", pair="bc"),
    "model_stock_filter_wise": two_models("model_stock", "a", {"filter_wise": True}, pair="bc"),
    "nearswap": two_models("nearswap", "a", {"t": 0.0001}),
    "della": two_models("della", "c", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    "karcher": two_models("karcher", "c", {"max_iter": 5, "tol": 1e-5}),
}


@pytest.mark.parametrize("case", list(MERGEKIT_TEST_CONFIGS))
def test_mergekit_test_configs_run(models, tmp_path, case):
    got, _ = run(models, tmp_path, MERGEKIT_TEST_CONFIGS[case])
    assert got.keys() == load(models["a"]).keys()
    assert all(np.isfinite(v).all() for v in got.values())
    with open_checkpoint(tmp_path / "out") as ckpt:
        assert {ref.dtype for ref in ckpt.values()} == {"BF16"}
    assert (tmp_path / "out" / "config.json").exists()


def test_della_with_an_invalid_epsilon_is_refused(models, tmp_path):
    text = two_models("della", "c", {"density": 0.66, "epsilon": 1.35, "lambda": 0.5})
    with pytest.raises(InvalidInput, match="epsilon"):
        run(models, tmp_path, text)
    assert not (tmp_path / "out").exists()


def test_passthrough_scale_with_a_filter_zeroes_o_proj(models, tmp_path):
    got, _ = run(
        models,
        tmp_path,
        """
merge_method: passthrough
models:
  - model: <a>
    parameters:
      scale:
        - filter: o_proj
          value: 0
        - value: 1
""",
    )
    a = load(models["a"])
    for name, value in got.items():
        if "o_proj" in name:
            assert not value.astype("f4").any()
        else:
            np.testing.assert_array_equal(value, a[name])


def test_stacking_a_model_on_itself_doubles_its_layer_count(models, tmp_path):
    run(
        models,
        tmp_path,
        f"""
merge_method: passthrough
slices:
  - sources:
    - model: <a>
      layer_range: [0, {LAYERS}]
  - sources:
    - model: <a>
      layer_range: [0, {LAYERS}]
dtype: bfloat16
""",
    )
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 * LAYERS


@pytest.mark.parametrize("method", ["ram", "ramplus_tl", "arcee_fusion"])
def test_methods_mmerge_lacks_are_refused_by_name(models, tmp_path, method):
    with pytest.raises(UnknownMethod, match=f"unknown merge method '{method}'"):
        run(models, tmp_path, two_models(method, "c"))

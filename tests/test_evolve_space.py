"""`mmerge evolve` search spaces: range syntax, layer groups, filters, baselines, corner checks."""

import numpy as np
import pytest

pytest.importorskip("optuna")

from mmerge.engine.api import run_recipe  # noqa: E402
from mmerge.errors import InvalidInput  # noqa: E402
from mmerge.evolve.api import check_space  # noqa: E402
from mmerge.evolve.space import SearchError, load_search  # noqa: E402
from mmerge.io import open_checkpoint  # noqa: E402


def recipe(family, method="linear", weight=None, **extra):
    weight = weight if weight is not None else {"search": [0.0, 1.0]}
    out = {
        "merge_method": method,
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": weight}},
            {"model": str(family["ft2"]), "parameters": {"weight": weight}},
        ],
        "dtype": "float32",
    }
    out.update(extra)
    return out


def test_ranges_become_dimensions_and_points_become_recipes(family_files):
    space = load_search(recipe(family_files, weight={"search": [0.2, 0.6]}))
    assert space.dimensions == ["models[0].weight", "models[1].weight"]
    point = {"models[0].weight": 0.0, "models[1].weight": 0.5}
    assert space.values(point) == {"models[0].weight": 0.2, "models[1].weight": pytest.approx(0.4)}
    r = space.recipe(point)
    assert r["models"][0]["parameters"]["weight"] == 0.2
    assert r["models"][1]["parameters"]["weight"] == pytest.approx(0.4)
    assert "search" not in str(r)


def test_yaml_search_paths_resolve_beside_the_recipe(family_files, tmp_path):
    text = f"""merge_method: linear
models:
  - model: {family_files["ft1"].name}
    parameters: {{weight: {{search: [0, 1]}}}}
  - model: {family_files["ft2"].name}
    parameters: {{weight: 0.5}}
"""
    path = family_files["ft1"].parent / "search-rel.yaml"
    path.write_text(text)
    space = load_search(path)
    assert space.template["models"][0]["model"] == str(family_files["ft1"].resolve())


@pytest.mark.parametrize(
    "bad, needle",
    [
        ({"search": [1.0, 0.0]}, "low < high"),
        ({"search": [0.5, 0.5]}, "low < high"),
        ({"search": [0.0]}, "[low, high]"),
        ({"search": [0.0, 1.0, 2.0]}, "[low, high]"),
        ({"search": "0..1"}, "[low, high]"),
        ({"search": [0.0, float("inf")]}, "finite"),
        ({"search": [False, True]}, "[low, high]"),
        ({"search": [0, 1], "step": 0.1}, "unexpected key 'step'"),
    ],
)
def test_bad_ranges_are_refused_with_their_place(family_files, bad, needle):
    with pytest.raises(SearchError) as err:
        load_search(recipe(family_files, weight=bad))
    msg = str(err.value)
    assert "models[0].weight" in msg and needle in msg and "\n" not in msg


@pytest.mark.parametrize(
    "block, needle",
    [
        ({"layer_groups": 0}, "layer_groups must be a whole number"),
        ({"layer_groups": "2"}, "layer_groups must be a whole number"),
        ({"layer_groups": True}, "layer_groups must be a whole number"),
        ({"groups": 2}, "unsupported key 'groups'"),
        ([2], "expected a mapping"),
    ],
)
def test_bad_search_block_is_refused(family_files, block, needle):
    with pytest.raises(SearchError, match=needle):
        load_search(recipe(family_files, search=block))


def test_a_recipe_without_ranges_is_refused(family_files):
    with pytest.raises(SearchError, match="nothing to search"):
        load_search(recipe(family_files, weight=0.5))


def test_layer_groups_spread_each_range_as_a_gradient(family_files, tmp_path):
    space = load_search(recipe(family_files, search={"layer_groups": 2}))
    assert space.dimensions == [
        "models[0].weight@0",
        "models[0].weight@1",
        "models[1].weight@0",
        "models[1].weight@1",
    ]
    point = {
        "models[0].weight@0": 1.0,
        "models[0].weight@1": 0.0,
        "models[1].weight@0": 0.0,
        "models[1].weight@1": 1.0,
    }
    r = space.recipe(point)
    assert r["models"][0]["parameters"]["weight"] == [1.0, 0.0]
    r["parameters"] = {"normalize": False}
    out = tmp_path / "m.safetensors"
    run_recipe(r, out)
    merged, ft1, ft2 = (open_checkpoint(p) for p in (out, family_files["ft1"], family_files["ft2"]))
    # first layer: all ft1; last layer (2 of 0..2): all ft2; the middle layer: half and half
    name = "model.layers.{}.mlp.up_proj.weight"
    np.testing.assert_allclose(merged[name.format(0)].to_numpy(), ft1[name.format(0)].to_numpy())
    np.testing.assert_allclose(merged[name.format(2)].to_numpy(), ft2[name.format(2)].to_numpy())
    mid = 0.5 * (ft1[name.format(1)].to_numpy() + ft2[name.format(1)].to_numpy())
    np.testing.assert_allclose(merged[name.format(1)].to_numpy(), mid, rtol=1e-6)


def test_filters_take_ranges_and_layer_groups(family_files, tmp_path):
    r = {
        "merge_method": "slerp",
        "base_model": str(family_files["ft1"]),
        "models": [{"model": str(family_files["ft1"])}, {"model": str(family_files["ft2"])}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": {"search": [0.0, 1.0]}},
                {"filter": "mlp", "value": {"search": [0.2, 0.8]}},
                {"value": 0.5},
            ]
        },
        "search": {"layer_groups": 3},
    }
    space = load_search(r)
    assert space.dimensions == [f"t[self_attn]@{g}" for g in range(3)] + [
        f"t[mlp]@{g}" for g in range(3)
    ]
    out = space.recipe(space.corner(1.0))
    assert out["parameters"]["t"][0]["value"] == [1.0, 1.0, 1.0]
    assert out["parameters"]["t"][1]["value"] == [0.8, 0.8, 0.8]
    assert out["parameters"]["t"][2] == {"value": 0.5}
    run_recipe(out, tmp_path / "s.safetensors")  # runs as an ordinary recipe


def test_a_range_inside_a_gradient_is_one_dimension(family_files):
    r = recipe(family_files, weight=[0.0, {"search": [0.0, 1.0]}, 1.0])
    space = load_search(r)
    assert space.dimensions == ["models[0].weight[1]", "models[1].weight[1]"]
    assert space.recipe(space.corner(0.5))["models"][0]["parameters"]["weight"] == [0.0, 0.5, 1.0]
    r["search"] = {"layer_groups": 2}
    with pytest.raises(SearchError, match="inside a gradient list"):
        load_search(r)


def test_baselines_midpoint_uniform_and_each_model_alone(family_files):
    space = load_search(recipe(family_files, weight={"search": [0.0, 2.0]}))
    got = {b.label: space.values(b.unit) for b in space.baselines()}
    ft1, ft2 = family_files["ft1"].name, family_files["ft2"].name
    assert list(got) == ["midpoint", "uniform weights", f"{ft1} alone", f"{ft2} alone"]
    assert got["midpoint"] == {"models[0].weight": 1.0, "models[1].weight": 1.0}
    assert got["uniform weights"] == {"models[0].weight": 0.5, "models[1].weight": 0.5}
    assert got[f"{ft1} alone"] == {"models[0].weight": 1.0, "models[1].weight": 0.0}
    assert got[f"{ft2} alone"] == {"models[0].weight": 0.0, "models[1].weight": 1.0}


def test_baselines_share_a_trial_when_they_are_the_same_point(family_files):
    labels = [b.label for b in load_search(recipe(family_files)).baselines()]
    assert labels[0] == "midpoint = uniform weights" and len(labels) == 3


def test_no_alone_baselines_when_a_weight_cannot_be_zero(family_files):
    space = load_search(recipe(family_files, weight={"search": [0.1, 1.0]}))
    assert [b.label for b in space.baselines()] == ["midpoint", "uniform weights"]


def test_ranges_outside_what_the_method_accepts_are_refused_before_any_trial(family_files):
    r = {
        "merge_method": "ties",
        "base_model": str(family_files["base"]),
        "models": [
            {"model": str(family_files["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
            {
                "model": str(family_files["ft2"]),
                "parameters": {"weight": 0.5, "density": {"search": [0.5, 1.5]}},
            },
        ],
    }
    with pytest.raises(InvalidInput, match="high end.*density"):
        check_space(load_search(r), in_memory=False)

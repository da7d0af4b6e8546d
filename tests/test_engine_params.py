"""Per-tensor parameter settings: scalars, gradients over layers, name filters."""

import pytest

from mmerge.engine.layers import layer_count, layer_index, rename_layer
from mmerge.engine.params import evaluate, evaluate_all, validate_setting
from mmerge.errors import InvalidInput


@pytest.mark.parametrize(
    ("name", "index"),
    [
        ("model.layers.12.mlp.up_proj.weight", 12),
        ("transformer.h.3.attn.c_attn.weight", 3),
        ("blocks.0.norm.weight", 0),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("model.layers_norm.weight", None),
    ],
)
def test_layer_index_from_name(name, index):
    assert layer_index(name) == index


def test_layer_count_and_rename():
    names = ["model.layers.0.a", "model.layers.7.b", "lm_head.weight"]
    assert layer_count(names) == 8
    assert rename_layer("model.layers.7.mlp.w", 2) == "model.layers.2.mlp.w"
    assert rename_layer("lm_head.weight", 2) == "lm_head.weight"


def test_scalar_is_the_same_everywhere():
    assert evaluate(0.3, "model.layers.5.x", 5, 10) == 0.3


def test_gradient_spreads_linearly_over_layers():
    grad = [0.0, 0.5, 1.0]
    assert evaluate(grad, "l.layers.0.w", 0, 5) == 0.0
    assert evaluate(grad, "l.layers.1.w", 1, 5) == pytest.approx(0.25)
    assert evaluate(grad, "l.layers.2.w", 2, 5) == pytest.approx(0.5)
    assert evaluate(grad, "l.layers.4.w", 4, 5) == pytest.approx(1.0)
    # tensors outside layers take the first value
    assert evaluate(grad, "model.embed_tokens.weight", None, 5) == 0.0


def test_filters_pick_the_first_match_and_nest_gradients():
    setting = [
        {"filter": "self_attn", "value": [0.0, 1.0]},
        {"filter": "mlp", "value": 0.7},
        {"value": 0.5},
    ]
    assert evaluate(setting, "model.layers.3.self_attn.q_proj.weight", 3, 4) == 1.0
    assert evaluate(setting, "model.layers.0.mlp.up_proj.weight", 0, 4) == 0.7
    assert evaluate(setting, "model.norm.weight", None, 4) == 0.5


def test_filter_without_match_leaves_the_default():
    out = evaluate_all({"t": [{"filter": "mlp", "value": 0.2}]}, "model.norm.weight", None, 4)
    assert out == {}


@pytest.mark.parametrize("bad", [[], [{"filter": "x"}], [1, "a"], {"a": 1}, [{"value": 1, "x": 2}]])
def test_malformed_settings_are_rejected(bad):
    with pytest.raises(InvalidInput, match="parameter 'p'"):
        validate_setting("p", bad)

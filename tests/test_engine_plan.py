"""Plans are built from headers and validated completely before anything is written."""

from dataclasses import dataclass

import numpy as np
import pytest

from mmerge.engine.plan import Slice, Source, build_plan, build_slice_plan, dtype_code
from mmerge.errors import InvalidInput, PlanError


@dataclass(frozen=True)
class Ref:
    """A header-only stand-in for a tensor ref."""

    name: str
    shape: tuple
    dtype: str = "BF16"
    fill: int = 0

    @property
    def nbytes(self) -> int:
        n = 2
        for d in self.shape:
            n *= d
        return n

    def raw(self):
        return np.full(self.shape, self.fill, np.int64)


def model(label, layers=3, vocab=32, hidden=8, extra=()):
    names = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        names[f"model.layers.{i}.mlp.up_proj.weight"] = (16, hidden)
        names[f"model.layers.{i}.self_attn.q_proj.weight"] = (hidden, hidden)
    names["model.norm.weight"] = (hidden,)
    names["lm_head.weight"] = (vocab, hidden)
    names.update(dict(extra))
    ckpt = {n: Ref(n, s) for n, s in names.items()}
    return Source(ckpt, {}, label=label)


def test_plan_covers_every_tensor_in_the_reference_order():
    a, b = model("a"), model("b")
    plan = build_plan([a, b], method="linear")
    assert [i.name for i in plan.items] == list(a.checkpoint)
    assert all(i.out_dtype == "BF16" for i in plan.items)
    assert plan.bytes_read() == 2 * plan.bytes_written()


def test_gradients_and_filters_resolve_per_tensor():
    a, b = model("a"), model("b")
    t = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]
    plan = build_plan([a, b], method="slerp", params={"t": t})
    by_name = {i.name: i.params for i in plan.items}
    assert by_name["model.layers.0.self_attn.q_proj.weight"]["t"] == 0.0
    assert by_name["model.layers.1.self_attn.q_proj.weight"]["t"] == pytest.approx(0.5)
    assert by_name["model.layers.2.self_attn.q_proj.weight"]["t"] == pytest.approx(1.0)
    assert by_name["model.layers.2.mlp.up_proj.weight"]["t"] == 0.5


def test_per_model_parameters_become_lists():
    a = Source(model("a").checkpoint, {"weight": 0.3}, "a")
    b = Source(model("b").checkpoint, {"weight": [0.0, 1.0]}, "b")
    plan = build_plan([a, b], method="linear")
    first = {i.name: i.params for i in plan.items}["model.layers.0.mlp.up_proj.weight"]
    assert first["weight"] == [0.3, 0.0]


def test_missing_tensor_is_an_error_naming_it():
    a = model("a")
    b = model("b", extra={"extra.weight": (3,)})
    with pytest.raises(PlanError, match="'extra.weight' is missing from a"):
        build_plan([a, b], method="linear")


def test_shape_mismatch_is_an_error_or_a_copy_with_a_warning():
    a, b = model("a", vocab=32), model("b", vocab=40)
    with pytest.raises(PlanError, match="embed_tokens.weight' has mismatched shapes"):
        build_plan([a, b], method="linear")
    plan = build_plan([a, b], method="linear", allow_mismatch=True)
    embed = next(i for i in plan.items if i.name == "model.embed_tokens.weight")
    assert embed.is_copy and embed.sources[0] is a.checkpoint["model.embed_tokens.weight"]
    assert any("copied from a" in w for w in plan.warnings)


def test_bad_parameter_values_fail_at_plan_time_naming_the_tensor():
    a, b = model("a"), model("b")
    with pytest.raises(InvalidInput, match="'t'.*tensor 'model.layers.2"):
        build_plan([a, b], method="slerp", params={"t": [0.0, 2.0]})


def test_method_needing_a_base_and_unknown_parameters():
    a, b = model("a"), model("b")
    with pytest.raises(InvalidInput, match="needs a base"):
        build_plan([a, b], method="ties")
    with pytest.raises(InvalidInput, match="unknown parameter 'densty'"):
        build_plan([a, b], method="ties", base=model("base"), params={"densty": 0.5})


def test_integer_tensors_are_copied_and_out_dtype_applies_to_floats():
    a = model("a", extra={"pos_ids": (4,)})
    a.checkpoint["pos_ids"] = Ref("pos_ids", (4,), "I64")
    b = model("b", extra={"pos_ids": (4,)})
    b.checkpoint["pos_ids"] = Ref("pos_ids", (4,), "I64")
    plan = build_plan([a, b], method="linear", out_dtype="float32")
    kinds = {i.name: (i.is_copy, i.out_dtype) for i in plan.items}
    assert kinds["pos_ids"] == (True, "I64")
    assert kinds["lm_head.weight"] == (False, "F32")
    assert plan.warnings == []


def test_integer_tensors_that_differ_are_taken_from_the_base_with_a_warning():
    a, b, base = model("a"), model("b"), model("base")
    for src, fill in ((a, 7), (b, 9), (base, 3)):
        src.checkpoint["steps"] = Ref("steps", (), "I64", fill)
    plan = build_plan([a, b], method="task_arithmetic", base=base)
    item = next(i for i in plan.items if i.name == "steps")
    assert item.is_copy and item.sources[0] is base.checkpoint["steps"]
    assert plan.warnings == ["I64 tensor 'steps' differs between the models; kept the base model's"]
    plan = build_plan([a, b], method="linear")
    item = next(i for i in plan.items if i.name == "steps")
    assert item.sources[0] is a.checkpoint["steps"]
    assert plan.warnings == ["I64 tensor 'steps' differs between the models; kept the one of a"]


def test_float_and_integer_of_one_name_is_an_error():
    a, b = model("a"), model("b")
    b.checkpoint["model.norm.weight"] = Ref("model.norm.weight", (8,), "I64")
    with pytest.raises(PlanError, match="'model.norm.weight' is a float in some models"):
        build_plan([a, b], method="linear")


@pytest.mark.parametrize(
    ("dtypes", "expected"),
    [
        (("F16", "F16"), "F16"),
        (("F16", "BF16"), "F32"),
        (("BF16", "F32"), "F32"),
        (("F16", "F64"), "F64"),
        (("F8_E4M3", "BF16"), "BF16"),
        (("F8_E4M3", "F16"), "F16"),
        (("F8_E4M3", "F8_E5M2"), "BF16"),
    ],
)
def test_mixed_input_dtypes_give_one_that_holds_them_all(dtypes, expected):
    a, b = model("a"), model("b")
    for name, ref in list(b.checkpoint.items()):
        b.checkpoint[name] = Ref(name, ref.shape, dtypes[1])
    for name, ref in list(a.checkpoint.items()):
        a.checkpoint[name] = Ref(name, ref.shape, dtypes[0])
    plan = build_plan([a, b], method="linear")
    assert {i.out_dtype for i in plan.items} == {expected}
    if len(set(dtypes)) > 1:
        assert len(plan.warnings) == 1 and "--out-dtype" in plan.warnings[0]
    plan = build_plan([a, b], method="linear", out_dtype="bfloat16")
    assert {i.out_dtype for i in plan.items} == {"BF16"}


def test_a_global_value_is_the_default_of_models_without_their_own():
    base = model("base")
    a = Source(model("a").checkpoint, {"density": 0.2}, "a")
    b = Source(model("b").checkpoint, {}, "b")
    plan = build_plan([a, b], method="ties", base=base, params={"density": 0.5})
    for item in plan.items:
        assert item.params["density"] == [0.2, 0.5], item.name
    item = plan.items[0]
    assert item.method.resolve(2, item.params)["density"] == (0.2, 0.5)


def test_dtype_spellings():
    assert dtype_code("bfloat16") == dtype_code("bf16") == dtype_code("BF16") == "BF16"
    with pytest.raises(InvalidInput, match="unknown dtype 'int3'"):
        dtype_code("int3")


def test_slices_stack_layers_and_renumber():
    a, b = model("a", layers=4), model("b", layers=4)
    plan = build_slice_plan([Slice(((a, 0, 3),)), Slice(((b, 2, 4),))], method="passthrough")
    names = [i.name for i in plan.items]
    assert "model.layers.4.mlp.up_proj.weight" in names
    assert "model.layers.5.mlp.up_proj.weight" not in names
    l3 = next(i for i in plan.items if i.name == "model.layers.3.mlp.up_proj.weight")
    assert l3.sources[0] is b.checkpoint["model.layers.2.mlp.up_proj.weight"]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"


def test_slices_with_mismatched_ranges_are_rejected():
    a, b = model("a"), model("b")
    with pytest.raises(PlanError, match="different layer_range lengths"):
        build_slice_plan([Slice(((a, 0, 2), (b, 0, 3)))], method="linear")

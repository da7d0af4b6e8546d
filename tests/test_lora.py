"""LoRA without PEFT in the loop: adapters written here in PEFT's format, checked against numpy
references; the refusals, resume, dry runs and output protection of the `lora` commands."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import mmerge.lora
from mmerge.cli import cli
from mmerge.engine.api import run_recipe
from mmerge.errors import InvalidInput
from mmerge.io import QuantizedRef, open_checkpoint
from mmerge.io.adapted import AdaptedTensorRef
from mmerge.io.adapter import parse_config, pattern_key
from mmerge.lora import applying, combining, extracting
from mmerge.testing import (
    random_adapter,
    write_adapter,
    write_fp8_model_family,
    write_model_family,
)

P = "base_model.model."


def load(path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as ckpt:
        return {n: np.asarray(r.to_numpy(), np.float64) for n, r in ckpt.items()}


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def ok(*args):
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base/ft1/ft2 float32 folders (hidden 16, intermediate 24, 2 layers, vocab 40)."""
    return write_model_family(
        tmp_path_factory.mktemp("lora"),
        hidden=16,
        intermediate=24,
        layers=2,
        vocab=40,
        dtype="F32",
        layout="folder",
    )


@pytest.fixture(scope="module")
def adapter(family, tmp_path_factory):
    return random_adapter(
        family["base"], tmp_path_factory.mktemp("ad") / "ad", rank=4, alpha=8, scale=0.2
    )


def lora_delta(folder: Path, module: str) -> np.ndarray:
    """s B A of `module` in an adapter folder (plain LoRA, alpha / r)."""
    ad = load(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    b, a = ad[f"{P}{module}.lora_B.weight"], ad[f"{P}{module}.lora_A.weight"]
    return config["lora_alpha"] / a.shape[0] * b @ a


# -- reading and refusing ---------------------------------------------------------------------


def test_rank_and_alpha_patterns_match_as_peft_matches_them():
    patterns = {"proj": 1, "v_proj": 2, r"layers\.1\.mlp\.down_proj": 6, "layers.0.*q_proj": 7}
    assert pattern_key(patterns, "model.layers.0.self_attn.v_proj") == "v_proj"
    assert pattern_key(patterns, "model.layers.1.mlp.down_proj") == r"layers\.1\.mlp\.down_proj"
    assert pattern_key(patterns, "model.layers.11.mlp.down_proj") is None
    assert pattern_key(patterns, "model.layers.0.self_attn.q_proj") == "layers.0.*q_proj"
    assert pattern_key(patterns, "model.proj") == "proj"
    config = parse_config(
        {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 1}},
        "cfg",
    )
    assert config.scale_of("model.layers.0.self_attn.v_proj") == 0.5
    assert config.scale_of("model.layers.0.self_attn.q_proj") == 2.0
    rs = parse_config({"r": 16, "lora_alpha": 8, "use_rslora": True}, "cfg")
    assert rs.scale_of("x.q_proj") == 2.0


def test_targets_follow_peft_rules():
    cfg = parse_config(
        {"r": 2, "target_modules": ["q_proj", "mlp.up_proj"], "layers_to_transform": [1]}, "c"
    )
    assert cfg.targets("model.layers.1.self_attn.q_proj")
    assert not cfg.targets("model.layers.0.self_attn.q_proj")
    assert cfg.targets("model.layers.1.mlp.up_proj")
    assert not cfg.targets("model.layers.1.self_attn.k_proj")
    regex = parse_config({"r": 2, "target_modules": r".*\.(q|v)_proj"}, "c")
    assert regex.targets("model.layers.3.self_attn.v_proj")
    assert not regex.targets("model.layers.3.self_attn.o_proj")
    everything = parse_config({"r": 2, "target_modules": "all-linear"}, "c")
    assert everything.targets("model.layers.0.mlp.up_proj") and not everything.targets("lm_head")
    excluded = parse_config(
        {"r": 2, "target_modules": ["q_proj"], "exclude_modules": ["q_proj"]}, "c"
    )
    assert not excluded.targets("a.q_proj")


@pytest.mark.parametrize(
    ("change", "message", "code"),
    [
        ({"peft_type": "LOHA"}, "peft_type 'LOHA' is not supported", 2),
        ({"target_parameters": ["experts.gate_up_proj"]}, "target_parameters", 2),
        ({"trainable_token_indices": [1, 2]}, "trainable tokens", 2),
        ({"use_qalora": True}, "QA-LoRA", 2),
        ({"r": 3}, "rank 4, but the config gives it r=3", 1),
        ({"target_modules": ["k_proj"]}, "its config does not target it", 2),
        ({"use_dora": True}, "no lora_magnitude_vector", 1),
    ],
)
def test_unsupported_or_inconsistent_adapters_are_refused(
    family, adapter, tmp_path, change, message, code
):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes(
        (adapter / "adapter_model.safetensors").read_bytes()
    )
    config = json.loads((adapter / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**config, **change}))
    result = invoke("lora", "apply", family["base"], bad, "-o", tmp_path / "out")
    assert result.exit_code == code, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


class _Marker:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "UNPICKLED",))


def test_pickled_adapters_are_refused_and_never_unpickled(family, tmp_path):
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Marker()))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    result = invoke("lora", "apply", family["base"], folder, "-o", tmp_path / "out")
    assert result.exit_code == 2
    assert "pickled adapters are not read" in result.output
    assert not (Path(__file__).parent / "UNPICKLED").exists()


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        (
            {f"{P}model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((4, 17))},
            "does not fit the base tensor",
        ),
        ({f"{P}model.layers.9.self_attn.q_proj.lora_A.weight": np.ones((4, 16))}, "no base tensor"),
        ({f"{P}model.layers.0.self_attn.q_proj.lora_E": np.ones((4, 1))}, "not a LoRA tensor"),
        ({f"{P}lm_head.weight": np.ones((3, 16))}, "does not fit the base tensor"),
    ],
)
def test_adapter_tensors_are_checked_against_the_base_headers(family, tmp_path, tensors, message):
    module = "model.layers.0.self_attn.q_proj"
    full = {
        f"{P}{module}.lora_A.weight": np.ones((4, 16)),
        f"{P}{module}.lora_B.weight": np.ones((16, 4)),
    }
    for key, value in tensors.items():
        full[key] = value
        if key.endswith("lora_A.weight") and module not in key:
            full[key.replace("lora_A", "lora_B")] = np.ones((16, 4))
    bad = write_adapter(
        tmp_path / "bad",
        {k: v.astype(np.float32) for k, v in full.items()},
        {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj"]},
    )
    result = invoke("lora", "apply", family["base"], bad, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


# -- apply ------------------------------------------------------------------------------------


def test_apply_weights_dora_bias_and_modules_to_save_follow_the_spec(family, tmp_path):
    """W + w (T - W) per adapter, with T from DoRA (row norms), a replacement, or W + s B A."""
    base = load(family["base"])
    rng = np.random.default_rng(0)
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"
    a, b = rng.standard_normal((2, 16)), rng.standard_normal((16, 2))
    magnitude = rng.uniform(0.5, 1.5, 16)
    head = rng.standard_normal(base["lm_head.weight"].shape)
    dora = write_adapter(
        tmp_path / "dora",
        {
            f"{P}{q}.lora_A.weight": a.astype(np.float32),
            f"{P}{q}.lora_B.weight": b.astype(np.float32),
            f"{P}{q}.lora_magnitude_vector": magnitude.astype(np.float32),
            f"{P}lm_head.modules_to_save.default.weight": head.astype(np.float32),
        },
        {
            "r": 2,
            "lora_alpha": 1,
            "use_dora": True,
            "target_modules": ["q_proj"],
            "modules_to_save": ["lm_head"],
        },
    )
    a2, b2 = rng.standard_normal((3, 24)), rng.standard_normal((16, 3))
    plain = write_adapter(
        tmp_path / "plain",
        {
            f"{P}{down}.lora_A.weight": a2.astype(np.float32),
            f"{P}{down}.lora_B.weight": b2.astype(np.float32),
        },
        {"r": 3, "lora_alpha": 6, "target_modules": ["down_proj"]},
    )
    mmerge.lora.apply(family["base"], [dora, plain], tmp_path / "out", weights=[0.5, -2.0])
    got = load(tmp_path / "out")
    w = base[q + ".weight"]
    t = w + 0.5 * (b @ a)
    t = t * (magnitude / np.linalg.norm(t, axis=1))[:, None]
    np.testing.assert_allclose(got[q + ".weight"], w + 0.5 * (t - w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        got["lm_head.weight"],
        base["lm_head.weight"] + 0.5 * (head - base["lm_head.weight"]),
        rtol=1e-5,
        atol=1e-6,
    )
    want = base[down + ".weight"] - 2.0 * 2.0 * (b2 @ a2)
    np.testing.assert_allclose(got[down + ".weight"], want, rtol=1e-5, atol=1e-6)
    for name in base:
        if name not in (q + ".weight", down + ".weight", "lm_head.weight"):
            np.testing.assert_array_equal(got[name], base[name])


def test_adapted_refs_read_any_element_range_like_the_whole(family, adapter):
    with mmerge.lora.applying.open_adapted(family["base"], [adapter]) as adapted:
        ref = adapted["model.layers.1.mlp.down_proj.weight"]
        assert isinstance(ref, AdaptedTensorRef)
        whole = ref.read_float32().copy()
        for start, stop in [(0, 5), (7, 100), (23, 24), (5, whole.size)]:
            np.testing.assert_array_equal(ref.read_float32(start, stop), whole[start:stop])
        ref.release()
        np.testing.assert_array_equal(ref.read_float32(), whole)


def test_adapted_refs_send_their_float32_values_to_the_device(tmp_path):
    """The engine moves an adapted ref's values, not the base's stored bits nor their rounding
    to the base's dtype: a float32 output of a BF16 base holds W + s B A unrounded."""
    paths = write_model_family(
        tmp_path, hidden=16, intermediate=24, layers=1, vocab=40, n_finetunes=0, dtype="BF16"
    )
    adapter = random_adapter(paths["base"], tmp_path / "ad", rank=4, alpha=8, scale=0.2)
    out = tmp_path / "out.safetensors"
    mmerge.lora.apply(paths["base"], [adapter], out, out_dtype="float32")
    name = "model.layers.0.mlp.down_proj.weight"
    with applying.open_adapted(paths["base"], [adapter]) as adapted, open_checkpoint(out) as got:
        ref = adapted[name]
        values, dtype = ref.transfer(3, 50)
        assert dtype.code == "F32"
        np.testing.assert_array_equal(values, ref.read_float32(3, 50))
        want = ref.read_float32()
        assert not np.array_equal(want, ref.raw().view(np.uint16).astype(np.uint32) << 16)
        np.testing.assert_array_equal(got[name].read_float32(), want)


def test_recipes_tell_adapted_models_of_one_base_apart(family, tmp_path):
    """Model-scope passes count a stored tensor once: a tensor of BASE+A1 is not BASE+A2's nor
    the base's, so TIES over the whole model on adapted models equals it on their applied
    float32 copies."""
    a1 = random_adapter(family["base"], tmp_path / "a1", rank=2, seed=3, scale=0.3)
    a2 = random_adapter(family["base"], tmp_path / "a2", rank=3, seed=4, scale=0.3)
    with (
        applying.open_adapted(family["base"], [a1]) as one,
        applying.open_adapted(family["base"], [a2]) as two,
        applying.open_adapted(family["base"], [a1]) as again,
    ):
        name = "model.layers.0.self_attn.q_proj.weight"
        ids = {one[name].identity, two[name].identity, one.base[name].identity}
        assert len(ids) == 3 and again[name].identity == one[name].identity
    for k, a in enumerate((a1, a2)):
        mmerge.lora.apply(family["base"], [a], tmp_path / f"applied{k}")

    def ties(models, out):
        recipe = {
            "merge_method": "ties",
            "base_model": str(family["base"]),
            "parameters": {"density": 0.3, "scope": "model"},
            "models": [{"model": m} for m in models],
        }
        run_recipe(recipe, out)
        return load(out)

    adapted = ties([f"{family['base']}+{a1}", f"{family['base']}+{a2}"], tmp_path / "x")
    applied = ties([str(tmp_path / "applied0"), str(tmp_path / "applied1")], tmp_path / "y")
    for name, value in applied.items():
        np.testing.assert_array_equal(adapted[name], value, err_msg=name)


def test_apply_resumes_after_an_interruption(family, adapter, tmp_path, monkeypatch):
    clean = tmp_path / "clean.safetensors"
    mmerge.lora.apply(family["base"], [adapter], clean)
    real, calls = AdaptedTensorRef.read_float32, []

    def crashing(self, *args, **kwargs):
        calls.append(self.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    out = tmp_path / "out.safetensors"
    monkeypatch.setattr(AdaptedTensorRef, "read_float32", crashing)
    with pytest.raises(KeyboardInterrupt):
        mmerge.lora.apply(family["base"], [adapter], out)
    monkeypatch.setattr(AdaptedTensorRef, "read_float32", real)
    assert not out.exists()
    mmerge.lora.apply(family["base"], [adapter], out, resume=True)
    assert out.read_bytes() == clean.read_bytes()


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_apply_on_other_backends_matches_numpy(family, adapter, tmp_path, backend):
    from mmerge.backend import available

    if not available(backend)[0]:
        pytest.skip(f"{backend} is not usable here")
    mmerge.lora.apply(family["base"], [adapter], tmp_path / "np.safetensors")
    mmerge.lora.apply(family["base"], [adapter], tmp_path / "o.safetensors", backend=backend)
    a, b = load(tmp_path / "np.safetensors"), load(tmp_path / "o.safetensors")
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=0, atol=1e-6 * np.max(np.abs(a[name])))


def test_apply_dry_run_and_out_dtype(family, adapter, tmp_path):
    result = ok("lora", "apply", family["base"], adapter, "-o", tmp_path / "out", "--dry-run")
    assert "dry run: nothing written" in result.output
    assert not (tmp_path / "out").exists()
    ok(
        "lora",
        "apply",
        family["base"],
        adapter,
        "-o",
        tmp_path / "o.safetensors",
        "--out-dtype",
        "bfloat16",
        "-q",
    )
    with open_checkpoint(tmp_path / "o.safetensors") as out:
        assert {r.dtype for r in out.values()} == {"BF16"}
    again = invoke("lora", "apply", family["base"], adapter, "-o", tmp_path / "o.safetensors")
    assert again.exit_code == 2 and "--overwrite" in again.output
    ok("lora", "apply", family["base"], adapter, "-o", tmp_path / "o.safetensors", "--overwrite")


@pytest.fixture(scope="module")
def fp8_family(tmp_path_factory):
    """A DeepSeek-style fp8 base (128x128 block scales), a rank-4 adapter on its linears and a
    dense fp8 fine-tune of the base."""
    root = tmp_path_factory.mktemp("lora-fp8")
    paths = write_fp8_model_family(root, hidden=128, intermediate=256, layers=2, n_finetunes=1)
    adapter = random_adapter(paths["base"], root / "adapter", rank=4, alpha=8)
    return paths["base"], adapter, paths["ft1"]


def adapted_reference(base, adapter) -> dict[str, np.ndarray]:
    """The dequantized base plus (alpha / r) B A of every adapted module, in float64."""
    want = load(base)
    config = json.loads((adapter / "adapter_config.json").read_text())
    factors = load(adapter)
    for key, a in factors.items():
        if key.endswith(".lora_A.weight"):
            b = factors[key.replace("lora_A", "lora_B")]
            name = key.removeprefix(P).replace(".lora_A.weight", ".weight")
            want[name] = want[name] + config["lora_alpha"] / config["r"] * (b @ a)
    return want


def test_adapter_on_an_fp8_base_applies_to_the_dequantized_values(fp8_family, tmp_path):
    base, adapter, _ = fp8_family
    want = adapted_reference(base, adapter)
    ok("lora", "apply", base, adapter, "-o", tmp_path / "out", "-q")
    got = load(tmp_path / "out")
    assert set(got) == set(want)
    for name, value in got.items():
        bound = 2.0**-8 * np.abs(want[name]) * (1 + 1e-4) + 1e-30
        assert np.all(np.abs(value - want[name]) <= bound), name
    with open_checkpoint(tmp_path / "out") as out:
        assert {r.dtype for r in out.values()} == {"BF16"}
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in config


def test_adapter_on_an_fp8_base_requantizes_with_out_dtype_fp8(fp8_family, tmp_path):
    """--out-dtype fp8: the quantized weights, adapted or not, written as fp8 with fresh block
    scales (within one fp8 rounding of the adapted values); a recipe BASE+ADAPTER gives the
    same bytes."""
    base, adapter, _ = fp8_family
    want = adapted_reference(base, adapter)
    ok("lora", "apply", base, adapter, "-o", tmp_path / "out", "--out-dtype", "fp8", "-q")
    with open_checkpoint(tmp_path / "out", dequantize=False) as raw, open_checkpoint(base) as b:
        quantized = [n for n, r in b.items() if isinstance(r, QuantizedRef)]
        assert quantized and all(raw[n].dtype == "F8_E4M3" for n in quantized)
        assert all(n + "_scale_inv" in raw for n in quantized)
    got = load(tmp_path / "out")
    changed = 0
    for name in quantized:
        floor = np.abs(want[name]).max() / 448 * 2.0**-9
        err = np.abs(got[name] - want[name])
        assert np.all(err <= 2.0**-4 * np.abs(want[name]) + floor), name
        changed += "proj" in name
    assert changed == 14
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8"
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "out_dtype": "fp8",
                "models": [{"model": f"{base}+{adapter}"}],
            }
        )
    )
    ok("run", recipe, "-o", tmp_path / "via-recipe", "-q")
    with (
        open_checkpoint(tmp_path / "out", dequantize=False) as a,
        open_checkpoint(tmp_path / "via-recipe", dequantize=False) as b,
    ):
        assert {n: r.dtype for n, r in a.items()} == {n: r.dtype for n, r in b.items()}
        for name, ref in a.items():
            np.testing.assert_array_equal(ref.raw(), b[name].raw(), err_msg=name)


def test_extract_from_fp8_models_reads_their_dequantized_values(fp8_family, tmp_path):
    """At full rank (128) the adapter holds the whole delta: applied, it restores the fp8
    fine-tune within one bf16 rounding. Adapters themselves are not written in fp8."""
    base, adapter, ft = fp8_family
    ok("lora", "extract", base, ft, "--rank", 128, "-o", tmp_path / "ad", "-q")
    ok("lora", "apply", base, tmp_path / "ad", "-o", tmp_path / "back", "-q")
    want, got = load(ft), load(tmp_path / "back")
    for name, value in want.items():
        err = np.max(np.abs(got[name] - value))
        assert err <= 2.0**-8 * np.max(np.abs(value)), (name, err)
    for command in (("combine", adapter), ("extract", base, ft, "--rank", 2)):
        result = invoke("lora", *command, "-o", tmp_path / "o", "--out-dtype", "fp8")
        assert result.exit_code == 2
        assert "not fp8 (fp8 output is for `lora apply`" in result.output
        assert not (tmp_path / "o").exists()


def test_recipe_base_plus_adapter_errors_name_the_problem(family, adapter, tmp_path):
    recipe = tmp_path / "r.yml"
    for model, message in [
        (f"{family['base']}+{tmp_path / 'nope'}", "no split into an existing BASE and ADAPTER"),
        (f"{family['base']}+{family['ft1']}", "no adapter_model.safetensors"),
    ]:
        recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": model}]}))
        result = invoke("run", recipe, "-o", tmp_path / "out")
        assert result.exit_code != 0
        assert message in result.output


# -- combine ----------------------------------------------------------------------------------


def test_combine_rank_k_is_the_best_rank_k_approximation(family, tmp_path):
    a1 = random_adapter(family["base"], tmp_path / "a1", rank=4, alpha=8, seed=1, scale=0.3)
    a2 = random_adapter(family["base"], tmp_path / "a2", rank=4, alpha=4, seed=2, scale=0.3)
    result = mmerge.lora.combine([a1, a2], tmp_path / "c", weights=[1.0, 0.5], rank=5)
    module = "model.layers.0.mlp.up_proj"
    delta = lora_delta(a1, module) + 0.5 * lora_delta(a2, module)
    s = np.linalg.svd(delta, compute_uv=False)
    got = lora_delta(tmp_path / "c", module)
    best_residual = np.sqrt(np.sum(s[5:] ** 2))
    assert np.linalg.norm(delta - got) == pytest.approx(best_residual, rel=1e-4)
    assert result.modules[module].energy == pytest.approx(
        np.sum(s[:5] ** 2) / np.sum(s**2), rel=1e-5
    )
    assert result.modules[module].rank == 5
    config = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    assert config["r"] == 5 and config["lora_alpha"] == 5


def test_combine_with_a_task_vector_method_trims_the_deltas_not_the_factors(family, tmp_path):
    a1 = random_adapter(family["base"], tmp_path / "a1", rank=2, seed=3, scale=0.3)
    a2 = random_adapter(family["base"], tmp_path / "a2", rank=3, seed=4, scale=0.3)
    mmerge.lora.combine([a1, a2], tmp_path / "t", method="ties", params={"density": 0.5}, rank=16)
    from mmerge.methods import ties

    module = "model.layers.1.self_attn.o_proj"
    d1, d2 = lora_delta(a1, module), lora_delta(a2, module)
    want = ties([d1, d2], base=np.zeros_like(d1), density=0.5)
    got = lora_delta(tmp_path / "t", module)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.max(np.abs(want)))


def test_combine_refuses_dora_and_trained_whole_tensors(family, tmp_path):
    q = "model.layers.0.self_attn.q_proj"
    dora = write_adapter(
        tmp_path / "dora",
        {
            f"{P}{q}.lora_A.weight": np.ones((1, 16), np.float32),
            f"{P}{q}.lora_B.weight": np.ones((16, 1), np.float32),
            f"{P}{q}.lora_magnitude_vector": np.ones(16, np.float32),
        },
        {"r": 1, "use_dora": True, "target_modules": ["q_proj"]},
    )
    mts = write_adapter(
        tmp_path / "mts",
        {f"{P}lm_head.weight": np.ones((40, 16), np.float32)},
        {"r": 1, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
    )
    for bad, message in ((dora, "DoRA adapters cannot be combined"), (mts, "cannot be weighted")):
        result = invoke("lora", "combine", bad, "-o", tmp_path / "out")
        assert result.exit_code == 2 and message in result.output
        assert not (tmp_path / "out").exists()


def test_combine_resumes_and_protects_existing_outputs(family, tmp_path, monkeypatch):
    a1 = random_adapter(family["base"], tmp_path / "a1", rank=2, seed=5)
    a2 = random_adapter(family["base"], tmp_path / "a2", rank=2, seed=6)
    mmerge.lora.combine([a1, a2], tmp_path / "clean", rank=3)
    real, calls = combining._combine_module, []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(combining, "_combine_module", crashing)
    with pytest.raises(KeyboardInterrupt):
        mmerge.lora.combine([a1, a2], tmp_path / "out", rank=3)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(combining, "_combine_module", real)
    mmerge.lora.combine([a1, a2], tmp_path / "out", rank=3, resume=True)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    result = invoke("lora", "combine", a1, a2, "-o", tmp_path / "out")
    assert result.exit_code == 2 and "--overwrite" in result.output
    ok("lora", "combine", a1, a2, "-o", tmp_path / "out", "--overwrite", "-q")
    result = invoke("lora", "combine", a1, "-o", family["ft1"], "--overwrite")
    assert result.exit_code == 2 and "not a LoRA adapter folder" in result.output
    result = invoke("lora", "combine", a1, "-o", a1, "--overwrite")
    assert result.exit_code == 2 and "input" in result.output


# -- extract ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def low_rank_family(family, tmp_path_factory):
    """ft = base + a rank-2 delta on every layer matrix, a changed norm and a changed bias."""
    from mmerge.io import StreamingWriter, TensorSpec

    base = load(family["base"])
    rng = np.random.default_rng(7)
    ft = {}
    for name, w in base.items():
        if w.ndim == 2 and ".layers." in name:
            m, n = w.shape
            w = w + rng.standard_normal((m, 2)) @ rng.standard_normal((2, n)) * 0.05
        elif name == "model.norm.weight":
            w = w * 1.1
        ft[name] = w
    path = tmp_path_factory.mktemp("lowrank") / "ft.safetensors"
    specs = [TensorSpec(n, "F32", v.shape) for n, v in ft.items()]
    with StreamingWriter(path, specs) as writer:
        for n, v in ft.items():
            writer.write(n, v.astype(np.float32))
            writer.finish_tensor(n)
    return path, ft


def test_extract_then_apply_restores_a_low_rank_finetune(family, low_rank_family, tmp_path):
    ft_path, ft = low_rank_family
    result = mmerge.lora.extract(family["base"], ft_path, tmp_path / "ad", rank=2)
    assert result.modules_to_save == ["model.norm"]
    assert min(r.energy for r in result.modules.values()) > 1 - 1e-6
    mmerge.lora.apply(family["base"], [tmp_path / "ad"], tmp_path / "back.safetensors")
    back = load(tmp_path / "back.safetensors")
    for name, w in ft.items():
        np.testing.assert_allclose(back[name], w, rtol=0, atol=2e-6 * np.max(np.abs(w)))


def test_rank_rules_pick_the_rank_of_the_delta(family, low_rank_family, tmp_path):
    ft_path, _ = low_rank_family
    for rule, extra in (("energy", {"energy": 0.999}), ("epsilon", {"epsilon": 1e-3})):
        result = mmerge.lora.extract(
            family["base"], ft_path, tmp_path / rule, rank=8, rank_rule=rule, **extra
        )
        assert {r.rank for r in result.modules.values()} == {2}, rule
    fixed = mmerge.lora.extract(family["base"], ft_path, tmp_path / "fixed", rank=8)
    assert {r.rank for r in fixed.modules.values()} == {8}


def test_extract_options_include_exclude_and_reports(family, low_rank_family, tmp_path):
    ft_path, _ = low_rank_family
    report = tmp_path / "report.json"
    ok(
        "lora",
        "extract",
        family["base"],
        ft_path,
        "--rank",
        "2",
        "--include",
        "layers\\.0\\.",
        "--exclude",
        "mlp",
        "-o",
        tmp_path / "ad",
        "--report",
        report,
        "-q",
    )
    modules = json.loads(report.read_text())["modules"]
    assert sorted(modules) == [f"model.layers.0.self_attn.{p}_proj" for p in "koqv"]
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None


def test_extract_resumes_after_an_interruption(family, low_rank_family, tmp_path, monkeypatch):
    ft_path, _ = low_rank_family
    mmerge.lora.extract(family["base"], ft_path, tmp_path / "clean", rank=3, workers=1)
    real, calls = extracting._extract_matrix, []

    def crashing(*args):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(extracting, "_extract_matrix", crashing)
    with pytest.raises(KeyboardInterrupt):
        mmerge.lora.extract(family["base"], ft_path, tmp_path / "out", rank=3, workers=1)
    assert not (tmp_path / "out").exists()
    calls.clear()
    monkeypatch.setattr(extracting, "_extract_matrix", lambda *a: (calls.append(1), real(*a))[1])
    mmerge.lora.extract(family["base"], ft_path, tmp_path / "out", rank=3, workers=1, resume=True)
    assert 0 < len(calls) < 14 - 4
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_extract_gives_the_same_adapter_on_other_backends(family, tmp_path, backend):
    from mmerge.backend import available

    if not available(backend)[0]:
        pytest.skip(f"{backend} is not usable here")
    mmerge.lora.extract(family["base"], family["ft1"], tmp_path / "np", rank=4)
    mmerge.lora.extract(family["base"], family["ft1"], tmp_path / "other", rank=4, backend=backend)
    a = load(tmp_path / "np" / "adapter_model.safetensors")
    b = load(tmp_path / "other" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=2e-4 * np.max(np.abs(a[key])))


def test_extract_dry_run_writes_nothing_and_mismatches_are_refused(family, tmp_path):
    result = ok(
        "lora",
        "extract",
        family["base"],
        family["ft1"],
        "-r",
        "4",
        "-o",
        tmp_path / "a",
        "--dry-run",
    )
    assert "dry run" in result.output and not (tmp_path / "a").exists()
    other = write_model_family(
        tmp_path / "other",
        hidden=8,
        intermediate=24,
        layers=2,
        vocab=40,
        n_finetunes=0,
        dtype="F32",
    )
    result = invoke(
        "lora", "extract", family["base"], other["base"], "-r", "4", "-o", tmp_path / "b"
    )
    assert result.exit_code == 1 and "has shape" in result.output
    assert not (tmp_path / "b").exists()


def test_importing_mmerge_and_mmerge_lora_imports_no_framework():
    code = (
        "import sys, mmerge, mmerge.lora, mmerge.cli; mmerge.lora.apply; "
        "print(sorted(m for m in ('torch', 'peft', 'transformers', 'mlx') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("group", ["lora", "evolve", "analyze"])
def test_a_command_module_imports_first_and_the_command_line_loads_none(group):
    """Command modules import the command line's helpers; the command line imports them only
    when their command is used or listed, so either may be imported first."""
    code = (
        f"import sys, mmerge.{group}.command, mmerge.cli\n"
        "del sys.modules['mmerge.cli']\n"
        "for m in [m for m in sys.modules if m.endswith('.command')]: del sys.modules[m]\n"
        "import mmerge.cli\n"
        "print(sorted(m for m in sys.modules if m.endswith('.command')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_invalid_library_arguments_are_clear(family, adapter, tmp_path):
    with pytest.raises(InvalidInput, match="2 weights for 1 adapters"):
        mmerge.lora.apply(family["base"], [adapter], tmp_path / "o", weights=[1, 2])
    with pytest.raises(InvalidInput, match="does not merge task vectors"):
        mmerge.lora.combine([adapter], tmp_path / "o", method="slerp")
    with pytest.raises(InvalidInput, match="rank rule"):
        mmerge.lora.extract(family["base"], family["ft1"], tmp_path / "o", rank=2, rank_rule="x")


@pytest.mark.parametrize("command", ["apply", "combine", "extract"])
def test_ctrl_c_in_a_lora_command_hints_at_resume(family, adapter, command, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    module = {"apply": applying, "combine": combining, "extract": extracting}[command]
    monkeypatch.setattr(module, command, interrupted)
    args = {
        "apply": (family["base"], adapter),
        "combine": (adapter,),
        "extract": (family["base"], family["ft1"], "--rank", 2),
    }[command]
    result = invoke("lora", command, *args, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 130
    assert result.output == "interrupted; run the same command with --resume to continue\n"

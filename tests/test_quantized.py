"""Quantized checkpoints: fp8 with scales merged as the numbers they stand for, into bf16 or
requantized fp8; everything else refused with nothing written (spec/format.md section 6)."""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner
from quantized_models import (
    DEEPSEEK,
    F8,
    SHAPES,
    compressed_tensors,
    dequantize,
    expand,
    family_values,
    is_quantized,
    load_output,
    write_file,
    write_folder,
    write_quantized,
)

import mmerge
from mmerge.cli import cli
from mmerge.errors import InvalidInput, QuantizationError
from mmerge.io import QuantizedRef, open_checkpoint
from mmerge.methods.registry import all_methods

BF16_STEP = 2.0**-8  # half a bf16 step, relative
FP8_STEP = 2.0**-4  # half an e4m3 step, relative


def task_arithmetic(models: dict[str, dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """base + 0.5 (ft1 - base) + 0.5 (ft2 - base), in float64."""
    b, f1, f2 = models["base"], models["ft1"], models["ft2"]
    return {n: b[n] + 0.5 * (f1[n] - b[n]) + 0.5 * (f2[n] - b[n]) for n in b}


def assert_within(got: np.ndarray, want: np.ndarray, rel: float, name: str, floor: float = 0.0):
    """|got - want| within `rel` of |want| (plus float32 noise and an absolute floor)."""
    slack = rel * np.abs(want) + 2.0**-22 * np.abs(want).max() + floor
    worst = np.max(np.abs(got - want) - slack)
    assert worst <= 0, f"{name}: off by {worst:.3g} beyond one rounding"


def stream(*args: str) -> object:
    return CliRunner().invoke(cli, ["stream", *args, "-q"])


def family(tmp_path, **kw):
    """base, ft1, ft2 quantized the same way; returns paths and the exact dequantized values."""
    values = family_values()
    paths, exact = {}, {}
    for model, vals in values.items():
        paths[model], exact[model] = write_quantized(tmp_path / model, vals, **kw)
    return paths, exact


def merge_task_arithmetic(paths, out, *extra):
    r = stream(
        str(paths["ft1"]),
        str(paths["ft2"]),
        "--base",
        str(paths["base"]),
        "-m",
        "task_arithmetic",
        "-w",
        "0.5,0.5",
        "-o",
        str(out),
        *extra,
    )
    assert r.exit_code == 0, r.output
    return r


LAYOUTS = {
    "deepseek-128": dict(config=DEEPSEEK),
    "deepseek-64x32": dict(size=(64, 32), config={**DEEPSEEK, "weight_block_size": [64, 32]}),
    "deepseek-ue8m0-e8m0-scales": dict(
        ue8m0=True, scale_code="F8_E8M0", config={**DEEPSEEK, "scale_fmt": "ue8m0"}
    ),
    "names-only-128": dict(config=None),
    "ct-tensor-bf16-scale": dict(
        kind="tensor", suffix="_scale", scale_code="BF16", config=compressed_tensors("tensor")
    ),
    "ct-channel": dict(kind="channel", suffix="_scale", config=compressed_tensors("channel")),
    "ct-group-32": dict(
        kind="group",
        size=(1, 32),
        suffix="_scale",
        config=compressed_tensors("group", group_size=32),
    ),
    "ct-block-64": dict(
        size=(64, 64), suffix="_scale", config=compressed_tensors("block", block_structure=[64, 64])
    ),
    "fbgemm-channel": dict(kind="channel", suffix="_scale", config={"quant_method": "fbgemm_fp8"}),
    "per-tensor-names-only": dict(kind="tensor", suffix="_scale", config=None),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_merge_equals_dequantize_then_merge(layout, tmp_path):
    paths, exact = family(tmp_path, **LAYOUTS[layout])
    out = tmp_path / "out"
    merge_task_arithmetic(paths, out)
    got, stored = load_output(out)
    want = task_arithmetic(exact)
    assert set(got) == set(want)
    assert not [n for n in stored if "scale" in n]
    for name in want:
        code = stored[name][0]
        assert code == ("BF16" if is_quantized(name) else "F32"), name
        rel = BF16_STEP if code == "BF16" else 2.0**-23
        assert_within(got[name], want[name], rel, name)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("layout", ["deepseek-128", "deepseek-64x32", "ct-channel"])
def test_fp8_output_dequantizes_back_within_fp8_rounding(layout, tmp_path):
    paths, exact = family(tmp_path, **LAYOUTS[layout])
    out = tmp_path / "out"
    r = merge_task_arithmetic(paths, out, "--out-dtype", "fp8")
    config = json.loads((out / "config.json").read_text())
    block = tuple(config["quantization_config"]["weight_block_size"])
    want = task_arithmetic(exact)
    _, stored = load_output(out, block)
    assert not [n for n in stored if n.endswith("_scale") or "input_scale" in n]
    for name, target in want.items():
        code, arr = stored[name]
        if not is_quantized(name):
            assert code == "F32"
            continue
        assert code == "F8_E4M3", name
        scale_code, scale = stored[name + "_scale_inv"]
        grid = (-(-target.shape[0] // block[0]), -(-target.shape[1] // block[1]))
        assert scale_code == "F32" and scale.shape == grid, name
        got = dequantize(arr, scale, block)
        subnormal = 2.0**-10 * expand(scale, target.shape, block)  # e4m3's smallest step
        assert_within(got, target, FP8_STEP, name, floor=subnormal)
        amax = np.array(
            [
                [
                    np.abs(target[i : i + block[0], j : j + block[1]]).max()
                    for j in range(0, target.shape[1], block[1])
                ]
                for i in range(0, target.shape[0], block[0])
            ]
        )
        expected = np.where(amax > 0, amax / 448, 1.0)
        np.testing.assert_allclose(scale, expected, rtol=1e-5, err_msg=name)
    if layout.startswith("deepseek"):
        assert config["quantization_config"] == LAYOUTS[layout]["config"]
        assert "warning" not in r.output
    else:
        assert config["quantization_config"]["quant_method"] == "fp8"
        assert block == (128, 128)
        assert "lm_head" not in config["quantization_config"]["modules_to_not_convert"]
        assert "model.embed_tokens" in config["quantization_config"]["modules_to_not_convert"]


def test_ue8m0_fp8_output_has_power_of_two_scales(tmp_path):
    paths, exact = family(tmp_path, **LAYOUTS["deepseek-ue8m0-e8m0-scales"])
    out = tmp_path / "out"
    merge_task_arithmetic(paths, out, "--out-dtype", "fp8")
    _, stored = load_output(out)
    want = task_arithmetic(exact)
    for name, target in want.items():
        if not is_quantized(name):
            continue
        scale = stored[name + "_scale_inv"][1]
        mantissa, _ = np.frexp(scale)
        assert np.all(mantissa == 0.5), name
        got = dequantize(stored[name][1], scale, (128, 128))
        floor = 2.0**-10 * expand(scale, target.shape, (128, 128))
        assert_within(got, target, FP8_STEP, name, floor=floor)
    assert (
        json.loads((out / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    )


def test_quantized_and_bf16_models_of_one_architecture_merge(tmp_path):
    values = family_values()
    q, exact = write_quantized(tmp_path / "q", values["ft1"], config=DEEPSEEK)
    plain = {n: ("BF16", x.astype(ml_dtypes.bfloat16)) for n, x in values["ft2"].items()}
    write_folder(tmp_path / "plain", [plain])
    out = tmp_path / "out.safetensors"
    r = stream(str(q), str(tmp_path / "plain"), "-m", "linear", "-w", "0.5,0.5", "-o", str(out))
    assert r.exit_code == 0, r.output
    got, stored = load_output(out)
    for name, x in exact.items():
        other = values["ft2"][name].astype(ml_dtypes.bfloat16).astype(np.float64)
        want = 0.5 * x + 0.5 * other
        rel = BF16_STEP if stored[name][0] == "BF16" else 2.0**-23
        assert_within(got[name], want, rel, name)


def test_chunked_reads_equal_the_whole_dequantized_tensor(tmp_path):
    """Any element range (partial rows, ragged blocks, leading dimensions) dequantizes to the
    same values as the whole tensor."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 70, 50)).astype(np.float32)
    scales = rng.uniform(0.5, 2, (3, 3, 2)).astype(np.float32)  # 32x32 blocks, ragged
    bits = w.astype(F8).view(np.uint8)
    write_file(tmp_path / "m.safetensors", {"x": ("F8_E4M3", bits), "x_scale_inv": ("F32", scales)})
    with pytest.raises(QuantizationError, match=r"needs \[3, 1, 1\]"):
        open_checkpoint(tmp_path / "m.safetensors")  # no config: 128x128 blocks
    folder = write_folder(
        tmp_path / "f",
        [{"x": ("F8_E4M3", bits), "x_scale_inv": ("F32", scales)}],
        {**DEEPSEEK, "weight_block_size": [32, 32]},
    )
    exact = np.stack([dequantize(bits[k], scales[k], (32, 32)) for k in range(3)]).reshape(-1)
    want = exact.astype(np.float32)  # fp8 x float32 scale is exact in float64, so one rounding
    with open_checkpoint(folder) as ckpt:
        ref = ckpt["x"]
        assert isinstance(ref, QuantizedRef) and ref.dtype == "BF16" and ref.shape == (3, 70, 50)
        np.testing.assert_array_equal(ref.read_float32(), want)
        for start, stop in [(0, 1), (7, 49), (49, 51), (45, 2000), (3499, 3501), (0, 10500)]:
            out = np.empty(stop - start, np.float32)
            np.testing.assert_array_equal(ref.read_float32(start, stop, out=out), want[start:stop])
            np.testing.assert_array_equal(ref.values()[start:stop], want[start:stop])
        bf16 = ref.raw(10, 20).view(ml_dtypes.bfloat16).astype(np.float64)
        np.testing.assert_array_equal(bf16, want[10:20].astype(ml_dtypes.bfloat16))
        assert "x_scale_inv" not in ckpt and ref.nbytes == bits.nbytes + scales.nbytes


def test_block_quantizer_takes_chunks_in_any_order(tmp_path):
    """Chunks written out of order, across block rows, give the bytes of one whole write."""
    from mmerge.io import StreamingWriter, TensorSpec
    from mmerge.io.requantize import BlockQuantizer, fp8_specs

    x = np.random.default_rng(1).standard_normal((300, 70)).astype(np.float32)
    specs = fp8_specs([TensorSpec("w", "F8_E4M3", x.shape)], ["w"], (128, 32))
    outputs = []
    for order in ("whole", "shuffled"):
        path = tmp_path / f"{order}.safetensors"
        with StreamingWriter(path, specs) as writer:
            q = BlockQuantizer(writer, {"w": x.shape}, (128, 32))
            assert q.pending() == ["w"]
            flat = x.reshape(-1)
            cuts = [(0, flat.size)]
            if order == "shuffled":
                bounds = [0, 5, 999, 8960, 9000, 17920, 17921, 20000, flat.size]
                cuts = list(zip(bounds[:-1], bounds[1:]))[::-1]
            for a, b in cuts:
                q.write("w", flat[a:b], a)
            q.finish_tensor("w")
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1]
    _, stored = load_output(tmp_path / "whole.safetensors")
    assert stored["w_scale_inv"][1].shape == (3, 3)


def test_unfinished_block_row_is_an_error(tmp_path):
    from mmerge.io import StreamingWriter, TensorSpec
    from mmerge.io.requantize import BlockQuantizer, fp8_specs

    specs = fp8_specs([TensorSpec("w", "F8_E4M3", (200, 10))], ["w"], (128, 128))
    writer = StreamingWriter(tmp_path / "o.safetensors", specs)
    q = BlockQuantizer(writer, {"w": (200, 10)}, (128, 128))
    q.write("w", np.ones(1000, np.float32), 0)
    with pytest.raises(InvalidInput, match="block row 0 incomplete"):
        q.finish_tensor("w")
    writer.abort()


def test_fp8_output_resumes_identically_after_a_crash(tmp_path, monkeypatch):
    import mmerge.engine.execute as execute_module

    paths, _ = family(tmp_path, config=DEEPSEEK)
    kw = dict(base=paths["base"], method="task_arithmetic", out_dtype="fp8")
    inputs = [paths["ft1"], paths["ft2"]]
    clean = mmerge.merge(inputs, tmp_path / "clean.safetensors", **kw).output
    out = tmp_path / "out.safetensors"
    real, calls = execute_module._run_task, []

    def crashing(task, writer, run):
        calls.append(task.item.name)
        if len(calls) == 4:
            raise KeyboardInterrupt
        real(task, writer, run)

    monkeypatch.setattr(execute_module, "_run_task", crashing)
    with pytest.raises(KeyboardInterrupt):
        mmerge.merge(inputs, out, **kw)
    monkeypatch.setattr(execute_module, "_run_task", real)
    assert not out.exists()
    mmerge.merge(inputs, out, resume=True, **kw)
    assert clean.read_bytes() == out.read_bytes()


def test_fp8_output_needs_a_quantized_input(family_files, tmp_path):
    out = tmp_path / "o.safetensors"
    r = stream(
        str(family_files["ft1"]), str(family_files["ft2"]), "--out-dtype", "fp8", "-o", str(out)
    )
    assert r.exit_code == 2 and "no input is quantized" in r.output
    assert not out.exists()


def test_other_output_dtypes_and_recipes(tmp_path):
    paths, exact = family(tmp_path, config=DEEPSEEK)
    out = tmp_path / "f32"
    merge_task_arithmetic(paths, out, "--out-dtype", "float32")
    got, stored = load_output(out)
    want = task_arithmetic(exact)
    for name in want:
        assert stored[name][0] == "F32"
        assert_within(got[name], want[name], 2.0**-22, name)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and "quantization_config" not in config
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: task_arithmetic\nbase_model: {paths['base']}\nout_dtype: fp8\n"
        f"models:\n  - model: {paths['ft1']}\n    parameters: {{weight: 0.5}}\n"
        f"  - model: {paths['ft2']}\n    parameters: {{weight: 0.5}}\n"
    )
    r = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(tmp_path / "r"), "-q"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "r").is_dir()
    merge_task_arithmetic(paths, tmp_path / "s", "--out-dtype", "fp8")
    recipe_out, _ = load_output(tmp_path / "r")
    stream_out, _ = load_output(tmp_path / "s")
    for name in want:
        np.testing.assert_array_equal(recipe_out[name], stream_out[name])


def test_activation_scales_are_left_out(tmp_path):
    config = compressed_tensors("tensor")
    extra = {
        "model.layers.0.self_attn.q_proj.input_scale": ("BF16", np.ones(1, ml_dtypes.bfloat16))
    }
    path, _ = write_quantized(
        tmp_path / "m",
        family_values()["base"],
        kind="tensor",
        suffix="_scale",
        config=config,
        extra=extra,
    )
    with open_checkpoint(path) as ckpt:
        assert not [n for n in ckpt if "scale" in n]
        assert ckpt.quantization.dropped == ("model.layers.0.self_attn.q_proj.input_scale",)
        assert ckpt.quantization.layouts == {"per-tensor": 4}


def test_plain_fp8_without_scales_and_plain_scale_names_still_merge(tmp_path):
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    write_file(tmp_path / "a.safetensors", {"w": ("F8_E4M3", x.astype(F8).view(np.uint8))})
    with open_checkpoint(tmp_path / "a.safetensors") as ckpt:
        assert ckpt.quantization is None and ckpt["w"].dtype == "F8_E4M3"
    write_file(tmp_path / "b.safetensors", {"norm.scale": ("F32", x[0]), "w": ("F32", x)})
    with open_checkpoint(tmp_path / "b.safetensors") as ckpt:
        assert set(ckpt) == {"norm.scale", "w"}


def _one(tmp_path, tensors: dict, config: dict | None = None):
    """A folder with `tensors` (and a config); what opening it raises."""
    folder = write_folder(tmp_path / "m", [tensors], config)
    with pytest.raises(QuantizationError) as info:
        open_checkpoint(folder)
    return str(info.value)


W = np.zeros((130, 64), np.uint8)
S = np.ones((2, 1), np.float32)
U8 = np.zeros((4, 4), np.uint8)
I32 = np.zeros((4, 4), np.int32)


@pytest.mark.parametrize(
    ("tensors", "config", "message"),
    [
        (
            {
                "a.weight": ("F8_E4M3", W),
                "a.weight_scale_inv": ("F32", np.ones((5, 5), np.float32)),
            },
            None,
            "needs [2, 1] (128x128 blocks) or [1] (per-tensor)",
        ),
        (
            {"a.weight": ("F8_E4M3", W), "a.weight_scale": ("F32", np.ones((2, 2), np.float32))},
            None,
            "needs [1] (per-tensor) or [130, 1] (per-channel)",
        ),
        (
            {
                "a.weight": ("F8_E4M3", W),
                "a.weight_scale_inv": ("F32", np.ones((1, 1), np.float32)),
                "a.scales": ("F32", S),
            },
            None,
            "scale-like tensor 'a.scales' sits next to fp8 tensors",
        ),
        (
            {
                "a.weight": ("F8_E4M3", W),
                "a.weight_scale_inv": ("F32", S),
                "b.weight": ("F8_E4M3", W),
            },
            None,
            "fp8 tensor 'b.weight' has no scale",
        ),
        ({"a.weight": ("F8_E4M3", W)}, DEEPSEEK, "fp8 tensor 'a.weight' has no scale"),
        (
            {
                "a.weight": ("F8_E4M3", W),
                "a.weight_scale_inv": ("F32", S),
                "a.weight_scale": ("F32", S),
            },
            None,
            "has two scales",
        ),
        (
            {"a.weight": ("F8_E4M3", W), "a.weight_scale_inv": ("I32", np.ones((2, 1), np.int32))},
            None,
            "is I32; scales must be F32, BF16",
        ),
        (
            {
                "a.weight": ("F32", np.zeros((4, 4), np.float32)),
                "a.weight_scale": ("F32", np.ones(1, np.float32)),
            },
            None,
            "belongs to 'a.weight', which is F32, not fp8",
        ),
        (
            {"a.qweight": ("I32", I32), "a.scales": ("F16", np.ones((1, 4), np.float16))},
            None,
            "GPTQ/AWQ",
        ),
        (
            {"a.qweight": ("I32", I32)},
            {"quant_method": "gptq", "bits": 4},
            "GPTQ (integer weights packed",
        ),
        ({"a.qweight": ("I32", I32)}, {"quant_method": "awq", "bits": 4}, "AWQ"),
        (
            {
                "a.weight_packed": ("I32", I32),
                "a.weight_scale": ("F16", np.ones((4, 1), np.float16)),
            },
            None,
            "compressed-tensors pack-quantized",
        ),
        (
            {"a.weight": ("F32", np.zeros((4, 4), np.float32))},
            {**compressed_tensors("group", group_size=128), "format": "pack-quantized"},
            "compressed-tensors pack-quantized",
        ),
        (
            {"a.weight": ("F32", np.zeros((4, 4), np.float32))},
            {**compressed_tensors("channel"), "format": "int-quantized"},
            "int-quantized (int8 weights)",
        ),
        (
            {"a.weight": ("U8", U8), "a.weight.absmax": ("F32", np.ones(4, np.float32))},
            None,
            "bitsandbytes",
        ),
        (
            {"a.weight": ("U8", U8)},
            {"quant_method": "bitsandbytes", "load_in_4bit": True},
            "bitsandbytes",
        ),
        (
            {
                "a.weight": ("U8", U8),
                "a.weight_scale": ("F8_E4M3", U8),
                "a.weight_scale_2": ("F32", np.ones(1, np.float32)),
            },
            None,
            "NVFP4",
        ),
        (
            {
                "a.weight_packed": ("U8", U8),
                "a.weight_global_scale": ("F32", np.ones(1, np.float32)),
            },
            None,
            "NVFP4",
        ),
        (
            {"a.weight": ("U8", U8)},
            {**compressed_tensors("tensor_group"), "format": "nvfp4-pack-quantized"},
            "NVFP4",
        ),
        (
            {"a.gate_up_proj_blocks": ("U8", U8), "a.gate_up_proj_scales": ("U8", U8)},
            None,
            "MXFP4 tensor",
        ),
        ({"a.gate_up_proj_blocks": ("U8", U8)}, {"quant_method": "mxfp4"}, "MXFP4 (4-bit floats"),
        (
            {"a.weight": ("U8", U8)},
            {"quant_method": "modelopt", "quant_algo": "NVFP4"},
            "ModelOpt NVFP4",
        ),
        (
            {"a.weight": ("U8", U8)},
            {"quant_method": "frobnicate"},
            "quantization method 'frobnicate'",
        ),
        ({"a.weight": ("F8_E4M3", W)}, {**DEEPSEEK, "scale_fmt": "e5m2"}, "scale_fmt 'e5m2'"),
        (
            {"a.weight": ("F8_E4M3", W)},
            {**DEEPSEEK, "weight_block_size": [128]},
            "is not two positive integers",
        ),
        (
            {"a.weight": ("F8_E4M3", W)},
            compressed_tensors("channel", symmetric=False),
            "asymmetric",
        ),
        ({"a.weight": ("F8_E4M3", W), "a.weight_zero_point": ("F32", S)}, None, "zero points"),
        (
            {"a.weight": ("I8", U8.view(np.int8))},
            {
                "quant_method": "compressed-tensors",
                "format": "int-quantized",
                "config_groups": {"g": {"weights": {"num_bits": 8, "type": "int"}}},
            },
            "int-quantized",
        ),
        (
            {"a.weight": ("F8_E4M3", W)},
            {
                **compressed_tensors("tensor"),
                "config_groups": {"g": {"weights": {"num_bits": 4, "type": "float"}}},
            },
            "4-bit float weights",
        ),
        (
            {"a.weight": ("F8_E4M3", W)},
            {"quant_method": "compressed-tensors", "sparsity_config": {"format": "sparse-bitmask"}},
            "sparse-bitmask",
        ),
    ],
)
def test_refusals_name_the_problem(tmp_path, tensors, config, message):
    text = _one(tmp_path, tensors, config)
    assert message in text
    assert "\n" not in text


def test_refusal_from_the_command_line_writes_nothing(tmp_path):
    folder = write_folder(tmp_path / "m", [{"a.qweight": ("I32", I32)}], {"quant_method": "gptq"})
    out = tmp_path / "out.safetensors"
    r = stream(str(folder), str(folder), "-m", "linear", "-o", str(out))
    assert r.exit_code == 1
    assert (
        r.output.startswith("error: ")
        and "GPTQ" in r.output
        and "merge the unquantized" in r.output
    )
    assert "Traceback" not in r.output and not out.exists()
    assert not list(tmp_path.glob("out*"))


def test_inspect_shows_the_quantization_and_dequantized_parameters(tmp_path):
    paths, _ = family(tmp_path, config=DEEPSEEK)
    r = CliRunner().invoke(cli, ["inspect", str(paths["base"])])
    assert r.exit_code == 0, r.output
    quantized = sum(np.prod(s) for n, s in SHAPES.items() if is_quantized(n))
    assert "quantization: fp8, 4 fp8 tensors with scales (4 with 128x128 blocks)" in r.output
    assert "F8_E4M3 + scale (128x128 blocks)" in r.output
    info = json.loads(CliRunner().invoke(cli, ["inspect", "--json", str(paths["base"])]).output)
    assert info["quantization"]["dequantized_parameters"] == quantized
    assert info["total_parameters"] == sum(int(np.prod(s)) for s in SHAPES.values())
    assert not [t for t in info["tensors"] if "scale_inv" in t["name"]]
    folder = write_folder(tmp_path / "g", [{"a.qweight": ("I32", I32)}], {"quant_method": "gptq"})
    r = CliRunner().invoke(cli, ["inspect", str(folder)])
    assert (
        r.exit_code == 0
        and "quantization: cannot be merged:" in r.output
        and "a.qweight" in r.output
    )


def test_analyze_measures_the_dequantized_values(tmp_path):
    from mmerge.analyze.scan import analyze

    paths, exact = family(tmp_path, config=DEEPSEEK)
    plain = {}
    for model, vals in exact.items():
        tensors = {n: ("F32", x.astype(np.float32)) for n, x in vals.items()}
        plain[model] = write_folder(tmp_path / "plain" / model, [tensors])
    got = analyze(paths["base"], [paths["ft1"], paths["ft2"]], workers=1)
    want = analyze(plain["base"], [plain["ft1"], plain["ft2"]], workers=1)
    assert got.overall == want.overall
    assert got.tensors == want.tensors


def test_block_layouts_that_agree_on_the_scale_shape_agree_on_values():
    """With no config, `_scale_inv` means 128x128 blocks; for power-of-two blocks below that, a
    scale shape that also fits 128x128 assigns every row the same scale either way."""
    from mmerge.io.scale_layout import Layout

    for rows in range(1, 400, 7):
        for b in (32, 64, 128):
            fits = Layout("block", (b, b)).fits((-(-rows // 128), 1), (rows, 10))
            assert fits == (-(-rows // b) == -(-rows // 128))
            if fits:
                assert np.array_equal(
                    expand(np.arange(-(-rows // b)), (rows, 1), (b, 1)),
                    expand(np.arange(-(-rows // 128)), (rows, 1), (128, 1)),
                )


@pytest.fixture(scope="module")
def quantized_and_plain(tmp_path_factory):
    """The DeepSeek-style family and float32 copies of its dequantized values."""
    tmp = tmp_path_factory.mktemp("qp")
    paths, exact = family(tmp / "q", config=DEEPSEEK)
    plain = {}
    for model, vals in exact.items():
        tensors = {n: ("F32", x.astype(np.float32)) for n, x in vals.items()}
        plain[model] = write_folder(tmp / "plain" / model, [tensors])
    return paths, plain


def _run(paths, spec, params, out, out_dtype, chunk):
    """`spec` over a family through the engine with `chunk`-element tasks."""
    from mmerge.engine.api import execute_plan
    from mmerge.engine.execute import Execution
    from mmerge.engine.plan import Source, build_plan
    from mmerge.engine.quantized_output import plan_dtype, requantize, wants_fp8

    n = spec.max_models if spec.max_models is not None else max(2, spec.min_models)
    ckpts = {k: open_checkpoint(paths[k]) for k in ("base", "ft1", "ft2")}
    sources = [Source(ckpts[m], {}, label=m) for m in ("ft1", "ft2")[: min(n, 2)]]
    base = Source(ckpts["base"], {}, label="base") if spec.needs_base else None
    plan = build_plan(
        sources, method=spec, base=base, params=params, out_dtype=plan_dtype(out_dtype)
    )
    if wants_fp8(out_dtype):
        requantize(plan, list(ckpts.values()))
    run = Execution(chunk_elements=chunk)
    execute_plan(plan, list(ckpts.values()), out, copy_files_from=None, run=run)
    return load_output(out)


@pytest.mark.parametrize("spec", all_methods(), ids=lambda s: s.name)
def test_every_method_merges_the_dequantized_values(
    spec, quantized_and_plain, tmp_path, monkeypatch
):
    """Whole-tensor, gathered and chunked merges all see exactly the float32 dequantized
    values: the quantized family merges bit for bit like its float32 copy; fp8 output from
    small chunks (block rows gathered across them) equals fp8 output from whole tensors."""
    monkeypatch.setattr("mmerge.methods._common.SUM_BLOCK", 32)
    monkeypatch.setattr("mmerge.engine.execute.SUM_BLOCK", 32)
    paths, plain = quantized_and_plain
    known = {p.name for p in spec.params}
    params = {"density": 0.5, "seed": 3, "t": 0.3, "epsilon": 0.1, "gamma": 0.1}
    params = {k: v for k, v in params.items() if k in known}
    got, _ = _run(paths, spec, params, tmp_path / "q.safetensors", "float32", 4096)
    want, _ = _run(plain, spec, params, tmp_path / "p.safetensors", "float32", 4096)
    for tensor in want:
        np.testing.assert_array_equal(got[tensor], want[tensor], err_msg=tensor)
    _, chunked = _run(paths, spec, params, tmp_path / "c.safetensors", "fp8", 4096)
    _, whole = _run(paths, spec, params, tmp_path / "w.safetensors", "fp8", 1 << 19)
    assert chunked.keys() == whole.keys()
    for tensor, (code, arr) in whole.items():
        assert chunked[tensor][0] == code
        np.testing.assert_array_equal(chunked[tensor][1], arr, err_msg=tensor)


def test_copies_of_quantized_tensors_are_dequantized(tmp_path):
    """A copied tensor (passthrough into its own dtype) is the dequantized values in BF16,
    never the fp8 bytes."""
    paths, exact = family(tmp_path, config=DEEPSEEK)
    out = tmp_path / "copy.safetensors"
    r = stream(str(paths["ft1"]), "-m", "passthrough", "-o", str(out))
    assert r.exit_code == 0, r.output
    got, stored = load_output(out)
    for name, want in exact["ft1"].items():
        if is_quantized(name):
            assert stored[name][0] == "BF16"
            np.testing.assert_array_equal(got[name], want.astype(ml_dtypes.bfloat16), err_msg=name)


def test_generated_fp8_family_is_the_family_within_fp8_rounding(tmp_path):
    from mmerge.testing import llama_shapes, model_tensor, write_fp8_model_family

    paths = write_fp8_model_family(tmp_path, hidden=160, intermediate=200, layers=2, vocab=64)
    shapes = llama_shapes(160, 200, 2, 64)
    with open_checkpoint(paths["ft1"]) as ckpt:
        assert ckpt.quantization.layouts == {"128x128 blocks": 14}
        assert ckpt.quantization.config["weight_block_size"] == [128, 128]
        for name, shape in shapes.items():
            want = model_tensor(0, "ft1", name, shape).astype(np.float64)
            got = ckpt[name].to_numpy()
            if isinstance(ckpt[name], QuantizedRef):
                scale = expand(ckpt[name].grid(), shape, (128, 128))
                assert_within(got, want, FP8_STEP, name, floor=2.0**-10 * scale)
            else:
                assert ckpt[name].dtype == "BF16"
                assert_within(got, want, BF16_STEP, name)


def test_an_unreadable_config_declares_nothing(tmp_path):
    """A config.json that is not JSON neither blocks a merge nor hides a quantization: the
    names still decide (128x128 blocks for `_scale_inv`)."""
    paths, exact = family(tmp_path, config=DEEPSEEK)
    (paths["ft1"] / "config.json").write_text("{not json")
    with open_checkpoint(paths["ft1"]) as ckpt:
        assert ckpt.quantization.method == "fp8" and ckpt.quantization.config is None
        name = "model.layers.0.mlp.down_proj.weight"
        np.testing.assert_array_equal(ckpt[name].to_numpy(), exact["ft1"][name].astype(np.float32))


def test_modelopt_per_tensor_and_e5m2_values(tmp_path):
    """ModelOpt's hf_quant_config.json declares the scheme; scalar scales; E5M2 values decode
    by their own dtype; KV-cache scales are left out."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    e4, e5 = w.astype(F8).view(np.uint8), w.astype(ml_dtypes.float8_e5m2).view(np.uint8)
    tensors = {
        "a.weight": ("F8_E4M3", e4),
        "a.weight_scale": ("F32", np.array(0.5, np.float32)),
        "a.input_scale": ("F32", np.array(2.0, np.float32)),
        "b.weight": ("F8_E5M2", e5),
        "b.weight_scale": ("F32", np.array(0.25, np.float32)),
        "attn.k_scale": ("F32", np.array(1.0, np.float32)),
    }
    folder = write_folder(tmp_path / "m", [tensors])
    (folder / "hf_quant_config.json").write_text(
        json.dumps({"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8"}})
    )
    with open_checkpoint(folder) as ckpt:
        assert sorted(ckpt) == ["a.weight", "b.weight"]
        assert ckpt.quantization.method == "modelopt"
        assert sorted(ckpt.quantization.dropped) == ["a.input_scale", "attn.k_scale"]
        want_a = e4.view(F8).astype(np.float32) * np.float32(0.5)
        want_b = e5.view(ml_dtypes.float8_e5m2).astype(np.float32) * np.float32(0.25)
        np.testing.assert_array_equal(ckpt["a.weight"].to_numpy(), want_a)
        np.testing.assert_array_equal(ckpt["b.weight"].to_numpy(), want_b)

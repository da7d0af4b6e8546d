"""End to end: every method through `mmerge stream` and `mmerge run`, against the in-memory
method applied to the loaded inputs; folders, shards, resume, errors that write nothing."""

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

import mmerge
from mmerge.cli import cli
from mmerge.engine import execute as execute_module
from mmerge.io import open_checkpoint
from mmerge.methods.registry import all_methods

# Parameters that make every method do real work on the test models.
EXTRA = {
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5, "seed": 3},
    "dare_linear": {"density": 0.5, "seed": 3},
    "breadcrumbs": {"density": 0.8, "gamma": 0.1},
    "breadcrumbs_ties": {"density": 0.8, "gamma": 0.1},
    "della": {"density": 0.5, "epsilon": 0.1, "seed": 3},
    "della_linear": {"density": 0.5, "epsilon": 0.1, "seed": 3},
    "slerp": {"t": 0.3},
    "nearswap": {"t": 0.001},
}


def load(path):
    with open_checkpoint(path) as ckpt:
        return {name: np.array(ref.to_numpy()) for name, ref in ckpt.items()}


def models_for(spec, family):
    n = spec.min_models if spec.max_models == spec.min_models else max(2, spec.min_models)
    if spec.max_models is not None:
        n = min(n, spec.max_models)
    models = [family["ft1"], family["ft2"]][:n]
    base = family["base"] if spec.needs_base else None
    return models, base


def params_for(spec):
    known = {p.name for p in spec.params}
    return {k: v for k, v in EXTRA.get(spec.name, {}).items() if k in known}


def expected(spec, models, base, params):
    arrays = [load(m) for m in models]
    base_arrays = load(base) if base is not None else None
    return mmerge.merge_tensors(arrays, method=spec.name, base=base_arrays, **params)


def cli_args(params):
    out = []
    for k, v in params.items():
        out += ["-p", f"{k}={v}"]
    return out


def assert_same(out_path, want, exact=True):
    got = load(out_path)
    assert list(got) == list(want)
    for name in want:
        if exact:
            np.testing.assert_array_equal(got[name], np.asarray(want[name]), err_msg=name)
        else:
            np.testing.assert_allclose(got[name], np.asarray(want[name]), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("spec", all_methods(), ids=lambda s: s.name)
def test_every_method_through_stream_equals_in_memory(spec, family_files, tmp_path):
    models, base = models_for(spec, family_files)
    params = params_for(spec)
    out = tmp_path / "out.safetensors"
    args = ["stream", *map(str, models), "--method", spec.name, "-o", str(out), "--quiet"]
    if base is not None:
        args += ["--base", str(base)]
    result = CliRunner().invoke(cli, args + cli_args(params))
    assert result.exit_code == 0, result.output
    assert_same(out, expected(spec, models, base, params))
    meta = open_checkpoint(out).metadata
    assert meta["mmerge.method"] == spec.name and "mmerge.inputs_digest" in meta


@pytest.mark.parametrize("spec", all_methods(), ids=lambda s: s.name)
def test_every_method_through_a_recipe(spec, family_files, tmp_path):
    models, base = models_for(spec, family_files)
    params = params_for(spec)
    recipe = {"merge_method": spec.name, "models": [{"model": str(m)} for m in models]}
    if base is not None:
        recipe["base_model"] = str(base)
    if params:
        recipe["parameters"] = params
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out.safetensors"
    result = CliRunner().invoke(cli, ["run", str(path), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    assert_same(out, expected(spec, models, base, params))


def test_default_is_slerp_at_half(family_files, tmp_path):
    out = tmp_path / "m.safetensors"
    r = CliRunner().invoke(
        cli, ["stream", str(family_files["ft1"]), str(family_files["ft2"]), "-o", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "with slerp" in r.output
    want = expected(
        mmerge.methods.get("slerp"), [family_files["ft1"], family_files["ft2"]], None, {"t": 0.5}
    )
    assert_same(out, want)


def test_folders_give_a_sharded_folder_with_config_and_bf16(family_folders, tmp_path):
    out = tmp_path / "merged"
    args = [
        "stream",
        str(family_folders["ft1"]),
        str(family_folders["ft2"]),
        "--base",
        str(family_folders["base"]),
        "--method",
        "ties",
        "--density",
        "0.5",
        "--shard-size",
        "6000",
        "-o",
        str(out),
        "-q",
    ]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    assert (out / "config.json").is_file() and (out / "tokenizer_config.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert {ref.dtype for ref in open_checkpoint(out).values()} == {"BF16"}
    got = load(out)  # bf16 widened to float32
    want = expected(
        mmerge.methods.get("ties"),
        [family_folders["ft1"], family_folders["ft2"]],
        family_folders["base"],
        {"density": 0.5},
    )
    for name, value in want.items():  # computed in float32, rounded to bf16 once
        rounded = np.asarray(value).astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(got[name], rounded, err_msg=name)


def test_out_dtype_rewrites_config(family_folders, tmp_path):
    out = tmp_path / "f32"
    r = CliRunner().invoke(
        cli,
        [
            "stream",
            str(family_folders["ft1"]),
            str(family_folders["ft2"]),
            "--method",
            "linear",
            "--out-dtype",
            "float32",
            "-o",
            str(out),
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert {ref.dtype for ref in open_checkpoint(out).values()} == {"F32"}


def test_resume_after_a_crash_gives_an_identical_file(family_files, tmp_path, monkeypatch):
    inputs = [family_files["ft1"], family_files["ft2"]]
    kw = dict(base=family_files["base"], method="ties", density=0.5)
    clean = mmerge.merge(inputs, tmp_path / "clean.safetensors", **kw).output
    out = tmp_path / "out.safetensors"
    real, calls = execute_module.write_chunk, []

    def crashing(runner, item, *args):
        calls.append(item.name)
        if len(calls) == 7:
            raise KeyboardInterrupt
        real(runner, item, *args)

    monkeypatch.setattr(execute_module, "write_chunk", crashing)
    with pytest.raises(KeyboardInterrupt):
        mmerge.merge(inputs, out, **kw)
    monkeypatch.setattr(execute_module, "write_chunk", real)
    assert not out.exists()
    resumed = []
    monkeypatch.setattr(
        execute_module,
        "write_chunk",
        lambda runner, item, *args: (resumed.append(item.name), real(runner, item, *args)),
    )
    mmerge.merge(inputs, out, resume=True, **kw)
    assert 0 < len(resumed) < len(load(clean))
    assert Path(clean).read_bytes() == out.read_bytes()


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        (["--method", "nope"], "unknown merge method 'nope'", 2),
        (["--method", "ties"], "ties needs a base model", 2),
        (["--method", "slerp", "-t", "1.5"], "'t' must be in [0, 1]", 2),
        (["--method", "linear", "-p", "gamma=0.1"], "unknown parameter 'gamma'", 2),
        (["--method", "ties", "--base", "BASE", "--density", "0"], "density", 2),
    ],
)
def test_bad_arguments_are_one_clear_line_and_write_nothing(
    family_files, tmp_path, args, message, code
):
    out = tmp_path / "out.safetensors"
    args = [str(family_files["base"]) if a == "BASE" else a for a in args]
    r = CliRunner().invoke(
        cli, ["stream", str(family_files["ft1"]), str(family_files["ft2"]), "-o", str(out), *args]
    )
    assert r.exit_code == code, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "della", "--base", "BASE", "--density", "0.1"], "density - epsilon > 0"),
        (
            ["--method", "della_linear", "--base", "BASE", "--density", "0.5", "-p", "epsilon=0.6"],
            "epsilon <= 1",
        ),
        (["--method", "linear", "--base", "BASE"], "linear does not use a base model"),
        (["--method", "slerp", "--base", "BASE"], "slerp takes 2 models, or 1 and a base"),
        (["--method", "linear", "--weights", "1,-1"], "weights sum to 0"),
        (["--method", "multislerp", "--weights", "1,-1"], "weights sum to 0"),
        (["--method", "karcher", "--weights", "2,-2"], "weights sum to 0"),
    ],
)
def test_a_dry_run_refuses_what_the_merge_refuses(family_files, tmp_path, args, message):
    """Parameters invalid only together are refused when the plan is built: the dry run and
    the real run give the same one line, and the run reserves nothing (no partial file or
    journal left behind)."""
    out = tmp_path / "out.safetensors"
    args = [str(family_files["base"]) if a == "BASE" else a for a in args]
    stream = ["stream", str(family_files["ft1"]), str(family_files["ft2"]), "-o", str(out)]
    dry = CliRunner().invoke(cli, [*stream, *args, "--dry-run"])
    real = CliRunner().invoke(cli, [*stream, *args])
    assert dry.exit_code == real.exit_code == 2, (dry.output, real.output)
    assert dry.output == real.output and len(real.output.strip().splitlines()) == 1
    assert message in real.output and "Traceback" not in real.output
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_is_refused_before_anything_is_written(family_files, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "merge_method": "della",
                "base_model": str(family_files["base"]),
                "models": [{"model": str(family_files[k])} for k in ("ft1", "ft2")],
                "parameters": {"density": 0.2, "epsilon": 0.2},
            }
        )
    )
    out = tmp_path / "out.safetensors"
    dry = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(out), "--dry-run"])
    real = CliRunner().invoke(cli, ["run", str(recipe), "-o", str(out)])
    assert dry.exit_code == real.exit_code == 2 and dry.output == real.output
    assert "density - epsilon > 0" in real.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_missing_tensor_and_shape_mismatch(tmp_path):
    from mmerge.io import StreamingWriter, TensorSpec

    def write(path, tensors):
        specs = [TensorSpec(n, "F32", a.shape) for n, a in tensors.items()]
        with StreamingWriter(path, specs) as w:
            for n, a in tensors.items():
                w.write(n, a)
                w.finish_tensor(n)
            w.commit()

    a = {"w": np.ones((2, 3), np.float32), "v": np.ones(3, np.float32)}
    write(tmp_path / "a.safetensors", a)
    write(tmp_path / "b.safetensors", {"w": np.ones((2, 3), np.float32)})
    write(tmp_path / "c.safetensors", {"w": np.ones((3, 3), np.float32), "v": a["v"]})
    runner = CliRunner()
    for other, message in (("b", "'v' is missing from"), ("c", "'w' has mismatched shapes")):
        out = tmp_path / f"out-{other}.safetensors"
        r = runner.invoke(
            cli,
            [
                "stream",
                str(tmp_path / "a.safetensors"),
                str(tmp_path / f"{other}.safetensors"),
                "-o",
                str(out),
            ],
        )
        assert r.exit_code == 1 and message in r.output, r.output
        assert not out.exists()
    out = tmp_path / "copied.safetensors"
    r = runner.invoke(
        cli,
        [
            "stream",
            str(tmp_path / "a.safetensors"),
            str(tmp_path / "c.safetensors"),
            "--method",
            "linear",
            "--allow-mismatch",
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0 and "warning:" in r.output, r.output
    np.testing.assert_array_equal(load(out)["w"], a["w"])


@pytest.mark.parametrize(
    ("recipe", "message"),
    [
        (
            {"merge_method": "linear", "models": [{"model": "FT1"}], "tokenizer": {}},
            "unsupported key 'tokenizer'",
        ),
        ({"models": [{"model": "FT1"}]}, "'merge_method' is required"),
        ({"merge_method": "linear", "models": [{"model": "org/hub-model"}]}, "not found"),
        (
            {"merge_method": "linear", "models": [{"model": "FT1", "lora": 1}]},
            "unsupported key 'lora'",
        ),
        ({"merge_method": "ties", "models": [{"model": "FT1"}]}, "needs a base model"),
        (
            {"merge_method": "linear", "models": [{"model": "FT1"}], "tokenizer_source": "union"},
            "tokenizer_source 'union' is not supported",
        ),
    ],
)
def test_bad_recipes_are_reported(family_files, tmp_path, recipe, message):
    text = yaml.safe_dump(recipe).replace("FT1", str(family_files["ft1"]))
    (tmp_path / "r.yaml").write_text(text)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["run", str(tmp_path / "r.yaml"), "-o", str(out)])
    assert r.exit_code in (1, 2) and message in r.output, r.output
    assert not out.exists()


def test_recipe_gradient_and_per_model_parameters(family_files, tmp_path):
    recipe = {
        "merge_method": "slerp",
        "base_model": str(family_files["ft1"]),
        "models": [{"model": str(family_files["ft1"])}, {"model": str(family_files["ft2"])}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 1]}, {"value": 0.25}]},
        "dtype": "float32",
    }
    out = tmp_path / "g.safetensors"
    mmerge.engine.api.run_recipe(recipe, out)
    got = load(out)
    ft1, ft2 = load(family_files["ft1"]), load(family_files["ft2"])
    q0 = "model.layers.0.self_attn.q_proj.weight"
    q2 = "model.layers.2.self_attn.q_proj.weight"
    np.testing.assert_array_equal(got[q0], ft1[q0])
    np.testing.assert_array_equal(got[q2], ft2[q2])


def test_passthrough_slices_stack_layers(family_files, tmp_path):
    ft1, ft2 = str(family_files["ft1"]), str(family_files["ft2"])
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": ft1, "layer_range": [0, 2]}]},
            {"sources": [{"model": ft2, "layer_range": [1, 3]}]},
        ],
    }
    out = tmp_path / "stack.safetensors"
    mmerge.engine.api.run_recipe(recipe, out)
    got, a, b = load(out), load(ft1), load(ft2)
    up = "model.layers.{}.mlp.up_proj.weight"
    np.testing.assert_array_equal(got[up.format(1)], a[up.format(1)])
    np.testing.assert_array_equal(got[up.format(2)], b[up.format(1)])
    np.testing.assert_array_equal(got[up.format(3)], b[up.format(2)])
    # as in mergekit: embeddings from the first slice, final norm and head from the last
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["lm_head.weight"], b["lm_head.weight"])
    np.testing.assert_array_equal(got["model.norm.weight"], b["model.norm.weight"])
    layers = [mmerge.engine.layers.layer_index(n) for n in got]
    inside = [i for i in layers if i is not None]
    assert inside == sorted(inside) and layers[0] is None and layers[-1] is None


def test_dry_run_writes_nothing_and_reports(family_files, tmp_path):
    out = tmp_path / "x.safetensors"
    r = CliRunner().invoke(
        cli,
        [
            "stream",
            str(family_files["ft1"]),
            str(family_files["ft2"]),
            "--method",
            "linear",
            "-o",
            str(out),
            "--dry-run",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "bytes to read" in r.output and "peak memory" in r.output
    assert not out.exists()


def test_inspect_and_methods(family_files, tmp_path):
    out = tmp_path / "m.safetensors"
    mmerge.merge([family_files["ft1"], family_files["ft2"]], out, method="linear")
    r = CliRunner().invoke(cli, ["inspect", str(out), "--json"])
    info = json.loads(r.output)
    assert info["provenance"]["method"] == "linear"
    assert info["total_parameters"] == sum(np.prod(t["shape"]) for t in info["tensors"])
    r = CliRunner().invoke(cli, ["inspect", str(out)])
    assert "made by mmerge" in r.output and "lm_head.weight" in r.output
    r = CliRunner().invoke(cli, ["methods"])
    for spec in all_methods():
        assert spec.name in r.output
    r = CliRunner().invoke(cli, ["methods", "ties"])
    assert "density" in r.output and "needs base: yes" in r.output


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_other_backends_give_the_same_linear_merge(backend, family_files, tmp_path):
    pytest.importorskip("mlx.core" if backend == "mlx" else backend)
    inputs = [family_files["ft1"], family_files["ft2"]]
    a = mmerge.merge(inputs, tmp_path / "np.safetensors", method="linear").output
    b = mmerge.merge(
        inputs, tmp_path / f"{backend}.safetensors", method="linear", backend=backend
    ).output
    assert_same(b, load(a))


def test_merge_and_recipes_close_every_checkpoint_they_open(family_files, tmp_path, monkeypatch):
    import mmerge.io
    from mmerge.engine.api import run_recipe

    opened = []
    real = mmerge.io.open_checkpoint

    def recording(path, *args, **kwargs):
        opened.append(real(path, *args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(mmerge.io, "open_checkpoint", recording)
    mmerge.merge([family_files["ft1"], family_files["ft2"]], tmp_path / "a.safetensors")
    recipe = {
        "merge_method": "ties",
        "base_model": str(family_files["base"]),
        "models": [{"model": str(family_files["ft1"])}, {"model": str(family_files["ft2"])}],
        "parameters": {"density": 0.5},
    }
    run_recipe(recipe, tmp_path / "b.safetensors")
    assert len(opened) == 5
    for ckpt in opened:
        ref = next(iter(ckpt.values()))
        with pytest.raises(mmerge.errors.InvalidInput, match="closed"):
            ref.to_numpy()


_COUNT_PLANS = """
import sys
from mmerge.engine import api, recipe
from mmerge.lora import applying
built = []
for module, name in ((api, "build_plan"), (recipe, "plan_recipe"), (applying, "build_plan")):
    def counted(*args, _real=getattr(module, name), **kwargs):
        built.append(1)
        return _real(*args, **kwargs)
    setattr(module, name, counted)
from mmerge.__main__ import main
code = main(sys.argv[1:])
print(len(built))
sys.exit(code)
"""


@pytest.mark.parametrize("command", ["stream", "run", "lora apply"])
def test_a_terminal_merge_builds_its_plan_once(command, family_files, tmp_path):
    """With a progress bar (stderr a terminal) the bar's total comes from the merge itself,
    not from a dry run that opens and plans everything a second time."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios
    import threading

    if command == "stream":
        args = ["stream", str(family_files["ft1"]), str(family_files["ft2"])]
    elif command == "lora apply":
        from mmerge.testing import random_adapter

        adapter = random_adapter(family_files["base"], tmp_path / "ad", rank=4, alpha=8, scale=0.2)
        args = ["lora", "apply", str(family_files["base"]), str(adapter)]
    else:
        path = tmp_path / "r.yaml"
        path.write_text(
            yaml.safe_dump(
                {
                    "merge_method": "linear",
                    "models": [{"model": str(family_files[k])} for k in ("ft1", "ft2")],
                }
            )
        )
        args = ["run", str(path)]
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # 80 columns
    shown = []
    drain = threading.Thread(target=lambda: _read_all(leader, shown), daemon=True)
    drain.start()
    done = subprocess.run(
        [sys.executable, "-c", _COUNT_PLANS, *args, "-o", str(tmp_path / "out.safetensors")],
        stdout=subprocess.PIPE,
        stderr=follower,
        text=True,
        timeout=120,
    )
    os.close(follower)
    drain.join(10)
    assert done.returncode == 0
    assert "merging" in "".join(shown)  # the bar was drawn
    assert done.stdout.split()[-1] == "1"


def _read_all(fd: int, into: list) -> None:
    import os

    while True:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return
        if not data:
            return
        into.append(data.decode(errors="replace"))

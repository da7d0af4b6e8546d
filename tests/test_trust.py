"""What a user must be able to trust: their files are never replaced unasked, every result is
right or refused, stacked models load as what they are, and faults end with one clear line."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import mmerge
from mmerge.__main__ import main
from mmerge.engine.api import run_recipe
from mmerge.errors import InvalidInput, MergeWarning, MmergeError, PlanError
from mmerge.io import StreamingWriter, TensorSpec, open_checkpoint
from mmerge.testing import write_model_family


def load(path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as ckpt:
        return {name: np.array(ref.to_numpy()) for name, ref in ckpt.items()}


def cli(*args: str, capsys=None) -> tuple[int, str]:
    """Run the `mmerge` entry point in this process: (exit status, what it printed to stderr)."""
    status = main([str(a) for a in args])
    err = capsys.readouterr().err if capsys is not None else ""
    return status, err


def write(path, tensors: dict[str, np.ndarray], dtype: str) -> Path:
    specs = [TensorSpec(n, dtype, v.shape) for n, v in tensors.items()]
    with StreamingWriter(path, specs) as w:
        for n, v in tensors.items():
            w.write(n, v)
            w.finish_tensor(n)
    return path


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return write_model_family(
        tmp_path_factory.mktemp("family"), hidden=16, intermediate=32, layers=4, vocab=32
    )


# -- 1. a user's files -----------------------------------------------------------------------


def test_an_existing_model_folder_is_never_replaced_unasked(family, tmp_path, capsys):
    user = tmp_path / "my-model"
    mmerge.merge([family["ft1"], family["ft2"]], user)
    (user / "README.md").write_text("my notes")
    (user / "LICENSE").write_text("mine")
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    for command in (
        ("stream", family["ft1"], family["ft2"], "-o", user),
        ("stream", family["ft1"], family["ft2"], "-o", user, "--dry-run"),
    ):
        status, err = cli(*command, capsys=capsys)
        assert status == 2
        assert err.count("\n") == 1 and "already exists" in err and "--overwrite" in err
    with pytest.raises(InvalidInput, match="already exists"):
        mmerge.merge([family["ft1"], family["ft2"]], user, method="linear")
    with pytest.raises(InvalidInput, match="already exists"):
        run_recipe({"merge_method": "linear", "models": [{"model": str(family["ft1"])}]}, user)
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["my-model"]
    status, _ = cli(
        "stream", family["ft1"], family["ft2"], "-m", "linear", "-o", user, "--overwrite", "-q"
    )
    assert status == 0 and not (user / "README.md").exists()
    assert load(user).keys() == load(family["ft1"]).keys()


def test_recipes_take_overwrite_and_allow_mismatch(family, tmp_path, capsys):
    small = tmp_path / "small.safetensors"
    tensors = load(family["ft2"])
    tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:20]
    write(small, tensors, "BF16")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"merge_method: linear\nmodels:\n  - model: {family['ft1']}\n  - model: {small}\n"
    )
    out = tmp_path / "out"
    status, err = cli("run", recipe, "-o", out, "-q", capsys=capsys)
    assert status == 1 and "mismatched shapes" in err and "--allow-mismatch" in err
    status, err = cli("run", recipe, "-o", out, "-q", "--allow-mismatch", capsys=capsys)
    assert status == 0 and "copied from" in err
    status, err = cli("run", recipe, "-o", out, "-q", "--allow-mismatch", capsys=capsys)
    assert status == 2 and "--overwrite" in err
    status, _ = cli("run", recipe, "-o", out, "-q", "--allow-mismatch", "--overwrite")
    assert status == 0


# -- 2. layer stacking -------------------------------------------------------------------------


def qwen2(path: Path, seed: int) -> Path:
    """A tiny Qwen2 saved by transformers itself: per-layer `layer_types` in its config."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=2,
        layer_types=["full_attention", "sliding_attention"] * 2,
    )
    torch.manual_seed(seed)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path)
    return path


def test_a_stacked_model_loads_in_transformers_as_what_it_is(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    a, b = qwen2(tmp_path / "a", 0), qwen2(tmp_path / "b", 1)
    recipe = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
        ],
    }
    out = tmp_path / "stacked"
    run_recipe(recipe, out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    kinds = ["full_attention", "sliding_attention"]
    assert config["layer_types"] == [kinds[i % 2] for i in (0, 1, 2, 1, 2, 3)]
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()
    got, ta, tb = load(out), load(a), load(b)
    q = "model.layers.{}.self_attn.q_proj.weight"
    for out_layer, (src, layer) in enumerate(
        [(ta, 0), (ta, 1), (ta, 2), (tb, 1), (tb, 2), (tb, 3)]
    ):
        np.testing.assert_array_equal(got[q.format(out_layer)], src[q.format(layer)])
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], ta["model.embed_tokens.weight"])
    np.testing.assert_array_equal(got["lm_head.weight"], tb["lm_head.weight"])
    np.testing.assert_array_equal(got["model.norm.weight"], tb["model.norm.weight"])


def test_a_gradient_restarts_in_each_slice(family):
    from mmerge.engine.recipe import plan_recipe

    ft1, ft2 = str(family["ft1"]), str(family["ft2"])
    recipe = {
        "merge_method": "slerp",
        "base_model": ft1,
        "parameters": {"t": [0, 1]},
        "slices": [
            {
                "sources": [
                    {"model": ft1, "layer_range": [0, 2]},
                    {"model": ft2, "layer_range": [0, 2]},
                ]
            },
            {
                "sources": [
                    {"model": ft1, "layer_range": [2, 4]},
                    {"model": ft2, "layer_range": [2, 4]},
                ]
            },
        ],
    }
    with contextlib.ExitStack() as opened:
        plan, _, _ = plan_recipe(recipe, Path.cwd(), opened)
    t = {
        i.name.split(".")[2]: i.params["t"]
        for i in plan.items
        if i.name.endswith("mlp.up_proj.weight")
    }
    assert t == {"0": 0, "1": 1, "2": 0, "3": 1}
    assert plan.layer_sources == [0, 1, 2, 3]
    names = [i.name for i in plan.items]
    assert names[0] == "model.embed_tokens.weight" and names[-2:] == [
        "model.norm.weight",
        "lm_head.weight",
    ]


# -- 3. recipes as mergekit reads them ---------------------------------------------------------


def test_filter_star_and_a_lone_filter_entry_apply(family, tmp_path):
    ft1, ft2 = str(family["ft1"]), str(family["ft2"])

    def merged(t):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}.safetensors"
        recipe = {"merge_method": "slerp", "models": [{"model": ft1}, {"model": ft2}]}
        run_recipe({**recipe, "parameters": {"t": t}}, out)
        return load(out)

    star = merged([{"filter": "mlp", "value": 0.0}, {"filter": "*", "value": 1.0}])
    a, b = load(ft1), load(ft2)
    for name in a:
        want = a[name] if ".mlp." in name else b[name]
        np.testing.assert_array_equal(star[name], want, err_msg=name)
    lone = merged({"filter": "*", "value": 1.0})
    for name in a:
        np.testing.assert_array_equal(lone[name], b[name], err_msg=name)


@pytest.mark.parametrize(("given", "meant"), [(True, "l1"), (False, "none")])
def test_mergekit_rescale_booleans_map_to_l1_and_none(family, tmp_path, given, meant):
    def recipe(rescale):
        return {
            "merge_method": "dare_ties",
            "base_model": str(family["base"]),
            "models": [{"model": str(family["ft1"])}, {"model": str(family["ft2"])}],
            "parameters": {"density": 0.5, "rescale": rescale},
        }

    run_recipe(recipe(given), tmp_path / "a.safetensors")
    run_recipe(recipe(meant), tmp_path / "b.safetensors")
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    if given:  # and the mapping matters: l1 differs from none
        run_recipe(recipe("none"), tmp_path / "c.safetensors")
        c = load(tmp_path / "c.safetensors")
        assert any(not np.array_equal(a[n], c[n]) for n in a)


@pytest.mark.parametrize("method", ["slerp", "sce", "nearswap", "model_stock"])
def test_weight_on_a_method_without_weights_is_ignored_with_a_warning(family, tmp_path, method):
    needs_base = method in ("sce", "model_stock")
    recipe = {
        "merge_method": method,
        "models": [
            {"model": str(family["ft1"]), "parameters": {"weight": 0.6}},
            {"model": str(family["ft2"]), "parameters": {"weight": 0.4}},
        ],
        **({"base_model": str(family["base"])} if needs_base else {}),
    }
    with_weights = run_recipe(recipe, tmp_path / "w.safetensors")
    assert sum("does not use parameter 'weight'" in w for w in with_weights.warnings) == 2
    plain = {**recipe, "models": [{"model": m["model"]} for m in recipe["models"]]}
    run_recipe(plain, tmp_path / "p.safetensors")
    a, b = load(tmp_path / "w.safetensors"), load(tmp_path / "p.safetensors")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    typo = {**recipe, "parameters": {"wieght": 1}}
    with pytest.raises(InvalidInput, match="unknown parameter 'wieght'"):
        run_recipe(typo, tmp_path / "typo.safetensors")


def test_a_recipe_global_value_is_the_default_of_the_other_models(family, tmp_path):
    base, ft1, ft2 = (str(family[k]) for k in ("base", "ft1", "ft2"))
    recipe = {
        "merge_method": "ties",
        "base_model": base,
        "parameters": {"density": 0.5},
        "models": [{"model": ft1, "parameters": {"density": 0.2}}, {"model": ft2}],
    }
    run_recipe(recipe, tmp_path / "r.safetensors")
    got = load(tmp_path / "r.safetensors")
    models, base_state = [load(ft1), load(ft2)], load(base)
    want = mmerge.merge_tensors(
        models, method="ties", base=base_state, model_params=[{"density": 0.2}, {"density": 0.5}]
    )
    for name in got:
        rounded = np.asarray(want[name]).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got[name], rounded, err_msg=name)
    untrimmed = mmerge.merge_tensors(
        models, method="ties", base=base_state, model_params=[{"density": 0.2}, {}]
    )
    assert any(not np.array_equal(got[n], np.asarray(untrimmed[n])) for n in got)


# -- 4. mixed input dtypes ---------------------------------------------------------------------


def test_float16_and_bfloat16_inputs_merge_into_float32_without_overflow(tmp_path, capsys):
    big = np.full((4, 4), 2e5, np.float32)  # fits bfloat16, not float16
    a = write(tmp_path / "a.safetensors", {"w": big.astype(ml_dtypes.bfloat16)}, "BF16")
    b = write(tmp_path / "b.safetensors", {"w": np.ones((4, 4), np.float16)}, "F16")
    out = tmp_path / "out.safetensors"
    status, err = cli("stream", a, b, "-m", "linear", "-o", out, "-q", capsys=capsys)
    assert status == 0 and "writing float32" in err
    got = load(out)["w"]
    assert got.dtype == np.float32 and np.isfinite(got).all()
    np.testing.assert_array_equal(got, np.float32((np.float32(ml_dtypes.bfloat16(2e5)) + 1) / 2))
    status, err = cli(
        "stream",
        a,
        b,
        "-m",
        "linear",
        "--out-dtype",
        "float16",
        "-o",
        tmp_path / "h",
        "-q",
        capsys=capsys,
    )
    assert status == 1 and "tensor 'w'" in err and "does not fit F16" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "h").exists()


def test_a_merge_that_overflows_float16_is_refused(tmp_path):
    x = np.full((8,), 40000, np.float16)
    a = write(tmp_path / "a.safetensors", {"w": x, "ok": np.ones(3, np.float16)}, "F16")
    b = write(tmp_path / "b.safetensors", {"w": x, "ok": np.ones(3, np.float16)}, "F16")
    with pytest.raises(MmergeError, match=r"tensor 'w': the merged value 80000"):
        mmerge.merge([a, b], tmp_path / "o.safetensors", method="linear", normalize=False)
    assert not (tmp_path / "o.safetensors").exists()


# -- 5. merge_tensors --------------------------------------------------------------------------


def test_merge_tensors_never_drops_models_tensors_or_buffers():
    a = {"w": np.ones(3, np.float32), "steps": np.array(5, np.int64)}
    b = {"w": np.full(3, 3, np.float32), "steps": np.array(7, np.int64), "extra": np.ones(2)}
    with pytest.raises(InvalidInput, match="1 per-model parameter sets for 2 models"):
        mmerge.merge_tensors([a, b], method="linear", model_params=[{"weight": 1.0}])
    with (
        pytest.raises(PlanError, match="'extra' is missing from model 0"),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore", MergeWarning)
        mmerge.merge_tensors([a, b], method="linear")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = mmerge.merge_tensors([a, b], method="linear", allow_mismatch=True)
    messages = [str(w.message) for w in caught if issubclass(w.category, MergeWarning)]
    assert any("'extra'" in m and "left out" in m for m in messages)
    assert any("'steps' differs" in m and "model 0" in m for m in messages)
    np.testing.assert_array_equal(out["w"], np.full(3, 2, np.float32))
    assert out["steps"] == 5 and "extra" not in out
    same = {"w": a["w"], "steps": np.array(5, np.int64)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mmerge.merge_tensors([a, same], method="linear")["steps"] == 5


def test_merge_tensors_copies_integer_buffers_from_the_base():
    base = {"w": np.zeros(3, np.float32), "n": np.array(1, np.int64)}
    a = {"w": np.ones(3, np.float32), "n": np.array(2, np.int64)}
    with pytest.warns(MergeWarning, match="kept the base's"):
        out = mmerge.merge_tensors([a], method="task_arithmetic", base=base)
    assert out["n"] == 1
    np.testing.assert_array_equal(out["w"], a["w"])


def test_merge_tensors_errors_name_the_tensor():
    a = {"w": np.ones(3, np.float32)}
    b = {"w": np.ones(3, np.float64)}
    with pytest.raises(InvalidInput, match="tensor 'w'"):
        mmerge.merge_tensors([a, b], method="linear")


# -- 6. resume never mixes inputs --------------------------------------------------------------


def test_resume_refuses_an_input_replaced_under_the_same_name(family, tmp_path, capsys):
    src = tmp_path / "ft.safetensors"
    write(src, load(family["ft1"]), "BF16")
    other = {n: v * 2 for n, v in load(family["ft1"]).items()}
    out = tmp_path / "out.safetensors"
    spec = mmerge.merge([src, family["ft2"]], out, method="linear", dry_run=True).plan
    names = [i.name for i in spec.items]
    # an interrupted run: the first tensor finished, then the process died
    from mmerge.engine import execute as execute_module

    real = execute_module.write_chunk
    calls = {"n": 0}

    def dies(*args):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        real(*args)

    execute_module.write_chunk = dies
    try:
        with pytest.raises(KeyboardInterrupt):
            mmerge.merge([src, family["ft2"]], out, method="linear")
    finally:
        execute_module.write_chunk = real
    assert names and (tmp_path / "out.safetensors.mmerge-journal").exists()
    write(tmp_path / "swap.safetensors", other, "BF16")
    os.replace(tmp_path / "swap.safetensors", src)
    status, err = cli(
        "stream", src, family["ft2"], "-m", "linear", "-o", out, "--resume", "-q", capsys=capsys
    )
    assert status == 2 and "cannot resume" in err and "ft.safetensors changed" in err
    status, _ = cli("stream", src, family["ft2"], "-m", "linear", "-o", out, "-q")
    assert status == 0
    want = mmerge.merge_tensors([other, load(family["ft2"])], method="linear")
    got = load(out)
    for name in got:
        rounded = np.asarray(want[name]).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got[name], rounded, err_msg=name)


# -- 7. faults end with one line ---------------------------------------------------------------


def test_a_missing_path_and_a_config_file_get_one_line(family, tmp_path, capsys):
    status, err = cli(
        "stream", tmp_path / "nothere", family["ft1"], "-o", tmp_path / "x", capsys=capsys
    )
    assert status == 2 and err.count("\n") == 1 and "does not exist" in err
    config = family["base"] / "config.json"
    status, err = cli("stream", config, family["ft1"], "-o", tmp_path / "x", capsys=capsys)
    assert status == 1 and err.count("\n") == 1 and "not a safetensors file" in err
    assert not (tmp_path / "x").exists()


def test_ctrl_c_while_the_command_line_is_loading_is_one_line(tmp_path):
    script = (
        "import sys\n"
        "class Stop:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'click':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Stop())\n"
        "from mmerge.__main__ import main\n"
        "sys.exit(main(['methods']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 130
    assert done.stderr == "interrupted\n"


def _wait_for_numpy(pid: int, timeout: float = 30.0) -> None:
    """Return once process `pid` has loaded numpy: its mmerge code (and the entry point's
    Ctrl-C handling) is running by then; a signal earlier lands in CPython's own start-up."""
    maps = Path(f"/proc/{pid}/maps")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if "_multiarray_umath" in maps.read_text():
                return
        except OSError:
            return  # the process has ended
        time.sleep(0.005)


def _as_at_a_terminal() -> None:
    """In the child: Ctrl-C's default action, as a shell at a terminal gives it. A test run
    started in the background inherits SIGINT ignored, and so would the command."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux's /proc")
def test_ctrl_c_at_any_moment_is_one_line_and_status_130(tmp_path):
    family = write_model_family(tmp_path / "m", hidden=512, intermediate=1024, layers=6, vocab=2048)
    exe = Path(sys.executable).with_name("mmerge")
    interrupted = 0
    for k, delay in enumerate((0.0, 0.05, 0.2, 0.4, 0.8)):
        out = tmp_path / f"out{k}"
        cmd = [str(exe), "stream", str(family["ft1"]), str(family["ft2"]), "-o", str(out), "-q"]
        proc = subprocess.Popen(
            cmd, stderr=subprocess.PIPE, text=True, preexec_fn=_as_at_a_terminal
        )
        _wait_for_numpy(proc.pid)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err, err
        if proc.returncode == 0:
            continue  # finished before the signal
        assert proc.returncode == 130, (proc.returncode, err)
        assert err.count("\n") == 1 and err.startswith("interrupted"), err
        assert not out.exists()
        interrupted += 1
    assert interrupted  # not every run finished before its signal


def test_ctrl_c_after_the_command_finished_changes_nothing():
    """A Ctrl-C landing once the program's command is over (say, while Python shuts down)
    neither kills the exit nor prints anything: the result stands with the command's status."""
    code = (
        "import os, signal, sys, time\n"
        "from mmerge.__main__ import program\n"
        "sys.argv = ['mmerge', 'methods']\n"
        "status = program()\n"
        "os.kill(os.getpid(), signal.SIGINT)\n"
        "time.sleep(0.2)\n"
        "sys.exit(status)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert "ties" in proc.stdout


def test_main_in_a_library_process_leaves_its_signals_alone(capsys):
    """Only the console program owns its process: `main` called in-process (tests, notebooks)
    keeps the caller's Ctrl-C handling, which child processes would otherwise inherit."""
    before = signal.getsignal(signal.SIGINT)
    assert main(["methods"]) == 0
    assert signal.getsignal(signal.SIGINT) is before


# -- 8. passthrough scale ----------------------------------------------------------------------


def test_passthrough_scale_is_applied_not_copied(family, tmp_path):
    out = tmp_path / "x2.safetensors"
    result = mmerge.merge([family["ft1"]], out, method="passthrough", scale=2.0)
    assert not any(i.is_copy for i in result.plan.items if i.out_dtype == "BF16")
    got, src = load(out), load(family["ft1"])
    for name in got:
        want = (src[name].astype(np.float32) * 2).astype(ml_dtypes.bfloat16)
        np.testing.assert_array_equal(got[name], want, err_msg=name)
    same = mmerge.merge([family["ft1"]], tmp_path / "x1.safetensors", method="passthrough")
    assert all(i.is_copy for i in same.plan.items)

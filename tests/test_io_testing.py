"""mmerge.testing (generated Llama-shaped families) and the bundled examples it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import safetensors.torch

from mmerge.io import open_checkpoint
from mmerge.testing import llama_shapes, model_tensor, write_model_family

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = {"hidden": 32, "intermediate": 48, "layers": 2, "vocab": 40}


def test_llama_shapes():
    shapes = llama_shapes(hidden=8, intermediate=12, layers=3, vocab=20)
    assert len(shapes) == 2 + 3 * 9 + 1
    assert list(shapes)[0] == "model.embed_tokens.weight" and list(shapes)[-1] == "lm_head.weight"
    assert shapes["model.layers.2.mlp.down_proj.weight"] == (8, 12)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (12, 8)
    assert shapes["model.layers.1.input_layernorm.weight"] == (8,)
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (20, 8)


def test_folder_family(tmp_path):
    paths = write_model_family(tmp_path, **SMALL, n_finetunes=3, shard_size=10_000)
    assert list(paths) == ["base", "ft1", "ft2", "ft3"]
    for path in paths.values():
        names = {p.name for p in path.iterdir()}
        assert {"config.json", "tokenizer_config.json", "generation_config.json"} <= names
        assert "model.safetensors.index.json" in names
        config = json.loads((path / "config.json").read_text())
        assert config["hidden_size"] == 32 and config["num_hidden_layers"] == 2
        assert config["torch_dtype"] == "bfloat16"
        with open_checkpoint(path) as c:
            assert len(c.files) > 1
            assert list(c) == list(llama_shapes(32, 48, 2, 40))
            assert {r.dtype for r in c.values()} == {"BF16"}


def test_file_family_values(tmp_path):
    paths = write_model_family(tmp_path, **SMALL, dtype="F32", layout="file", delta_scale=0.05)
    assert paths["base"] == tmp_path / "base.safetensors"
    base = safetensors.torch.load_file(paths["base"])
    ft1 = safetensors.torch.load_file(paths["ft1"])
    ft2 = safetensors.torch.load_file(paths["ft2"])
    w = "model.layers.0.mlp.up_proj.weight"
    assert abs(base[w].std().item() - 0.02) < 0.002
    assert abs(base["model.norm.weight"].mean().item() - 1) < 0.01
    delta = (ft1[w] - base[w]).numpy()
    assert abs(delta.std() - 0.05) < 0.005
    assert not np.allclose(ft1[w].numpy(), ft2[w].numpy())


def test_values_are_deterministic_per_tensor(tmp_path):
    a = write_model_family(tmp_path / "a", **SMALL, layout="file", seed=3)
    b = write_model_family(tmp_path / "b", **SMALL, layout="file", seed=3)
    c = write_model_family(tmp_path / "c", **SMALL, layout="file", seed=4)
    assert a["ft2"].read_bytes() == b["ft2"].read_bytes()
    assert a["ft2"].read_bytes() != c["ft2"].read_bytes()
    name, shape = "model.layers.1.self_attn.k_proj.weight", (32, 32)
    alone = model_tensor(3, "ft2", name, shape)
    with open_checkpoint(a["ft2"]) as ckpt:
        bf16 = alone.astype(ml_dtypes.bfloat16).astype(np.float32)
        np.testing.assert_array_equal(ckpt[name].to_numpy(), bf16)


def _make_examples_module():
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bundled_examples_match_their_script(tmp_path):
    fresh = _make_examples_module().make(tmp_path)
    committed = EXAMPLES / "tiny"
    if not committed.exists():
        pytest.skip("examples/tiny not generated in this checkout")
    total = 0
    for name, path in fresh.items():
        with open_checkpoint(path) as new, open_checkpoint(committed / name) as old:
            assert new.header_digest() == old.header_digest(), name
            total += old.nbytes
            for f in ("config.json", "tokenizer_config.json", "generation_config.json"):
                assert (path / f).read_text() == (committed / name / f).read_text()
    assert 100_000 < total < 1_000_000  # a few hundred KB

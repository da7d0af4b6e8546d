"""LoRA against PEFT itself: adapters written by PEFT on tiny random Llama and GPT-2 models (built
from configs, nothing downloaded); `lora apply` against PEFT's merge_and_unload, `lora combine`
and `lora extract` outputs loaded back by PEFT, and `base+adapter` recipes against `lora apply`."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from mmerge.cli import cli  # noqa: E402
from mmerge.io import open_checkpoint  # noqa: E402

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BF16_ROUNDING = 2.0**-8  # one rounding to bfloat16 moves a value by at most this share of it


def llama_config():
    return transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attention_bias=True,
    )


def save_model(model, path):
    model.save_pretrained(path, safe_serialization=True)
    return path


def load(path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as ckpt:
        return {n: np.asarray(r.to_numpy(), np.float64) for n, r in ckpt.items()}


def state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().double().numpy() for k, v in model.state_dict().items()}


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def llama_bf16(tmp_path_factory):
    """A random tiny Llama saved in bfloat16 (the base of the apply tests)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).to(torch.bfloat16)
    return save_model(model, tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="module")
def llama_f32(tmp_path_factory):
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(llama_config())
    return save_model(model, tmp_path_factory.mktemp("llama32") / "base")


def base_model(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path).float()


def peft_adapter(base_path, out, seed=0, **config):
    """A PEFT adapter with every trainable tensor random (B not zero, DoRA magnitudes, biases
    and modules_to_save copies moved off their initial values); returns PEFT's merged state."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(
        base_model(base_path), peft.LoraConfig(init_lora_weights=False, **config)
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_A" not in name and "lora_B.weight" not in name:
                p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(out)
    return state(model.merge_and_unload())


def assert_one_rounding(got: dict, want: dict, base: dict, changed: list[str]):
    for name, value in got.items():
        ref = want[name]
        err = np.abs(value - ref)
        bound = BF16_ROUNDING * np.abs(ref) * (1 + 1e-4) + 1e-30
        assert np.all(err <= bound), f"{name}: {np.max(err / (np.abs(ref) + 1e-30)):.3g} relative"
    for name in changed:
        moved = np.max(np.abs(got[name] - base[name]))
        assert moved > 0.01 * max(np.max(np.abs(base[name])), 0.01), f"{name} did not change"


APPLY_CASES = {
    "plain": ({"r": 4, "lora_alpha": 8, "target_modules": LINEAR}, ["mlp.down_proj.weight"]),
    "rslora": (
        {"r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": ["q_proj", "v_proj"]},
        ["self_attn.v_proj.weight"],
    ),
    "dora": (
        {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "down_proj"]},
        ["self_attn.q_proj.weight", "mlp.down_proj.weight"],
    ),
    "embedding": (
        {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj"]},
        ["embed_tokens.weight"],
    ),
    "embedding_dora": (
        {"r": 3, "lora_alpha": 8, "use_dora": True, "target_modules": ["embed_tokens"]},
        ["embed_tokens.weight"],
    ),
    "modules_to_save": (
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj"],
            "modules_to_save": ["lm_head", "post_attention_layernorm"],
        },
        ["lm_head.weight", "post_attention_layernorm.weight"],
    ),
    "patterns": (
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj", "down_proj"],
            "rank_pattern": {"v_proj": 2, "layers.1.mlp.down_proj": 6},
            "alpha_pattern": {"q_proj": 3, "layers.0.mlp.down_proj": 20},
        },
        ["self_attn.v_proj.weight", "mlp.down_proj.weight"],
    ),
    "lora_bias": (
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_bias": True},
        ["self_attn.q_proj.bias", "self_attn.v_proj.bias"],
    ),
}


@pytest.mark.parametrize("case", sorted(APPLY_CASES))
def test_apply_equals_peft_merge_within_one_bf16_rounding(llama_bf16, tmp_path, case):
    config, changed = APPLY_CASES[case]
    merged = peft_adapter(llama_bf16, tmp_path / "adapter", **config)
    run("lora", "apply", llama_bf16, tmp_path / "adapter", "-o", tmp_path / "out", "--quiet")
    got, base = load(tmp_path / "out"), load(llama_bf16)
    assert set(got) == set(base)
    full = [n for n in got if any(n.endswith(c) for c in changed)]
    assert full, changed
    assert_one_rounding(got, merged, base, full)
    with open_checkpoint(tmp_path / "out") as out:
        assert {r.dtype for r in out.values()} == {"BF16"}
    assert (tmp_path / "out" / "config.json").exists()


def test_apply_fan_in_fan_out_and_dora_over_columns_match_peft(tmp_path):
    """GPT-2 stores its Conv1D weights as (in, out): the delta is (B A)^T and DoRA's norms run
    over the stored columns."""
    torch.manual_seed(2)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=32)
    base = save_model(transformers.GPT2LMHeadModel(config), tmp_path / "gpt2")
    for use_dora in (False, True):
        adapter = tmp_path / f"ad{use_dora}"
        merged = peft_adapter(
            base,
            adapter,
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_fc"],
            fan_in_fan_out=True,
            use_dora=use_dora,
        )
        out = tmp_path / f"out{use_dora}.safetensors"
        run("lora", "apply", base, adapter, "-o", out, "--quiet")
        got = load(out)
        for name, value in got.items():
            scale = np.max(np.abs(merged[name]))
            np.testing.assert_allclose(value, merged[name], rtol=0, atol=1e-6 * scale)
        assert not np.allclose(
            got["transformer.h.0.attn.c_attn.weight"],
            load(base)["transformer.h.0.attn.c_attn.weight"],
        )


def test_weighted_apply_of_two_adapters_sums_their_deltas(llama_f32, tmp_path):
    m1 = peft_adapter(llama_f32, tmp_path / "a1", seed=1, r=4, lora_alpha=8, target_modules=LINEAR)
    m2 = peft_adapter(
        llama_f32, tmp_path / "a2", seed=2, r=2, lora_alpha=4, target_modules=["q_proj"]
    )
    run(
        "lora",
        "apply",
        llama_f32,
        tmp_path / "a1",
        tmp_path / "a2",
        "--weights",
        "0.7,-0.4",
        "-o",
        tmp_path / "out",
        "--quiet",
    )
    base, got = load(llama_f32), load(tmp_path / "out")
    for name, b in base.items():
        want = b + 0.7 * (m1[name] - b) - 0.4 * (m2[name] - b)
        np.testing.assert_allclose(got[name], want, rtol=0, atol=2e-6 * np.max(np.abs(want)))


def test_combine_with_weights_loads_in_peft_and_has_no_cross_terms(llama_f32, tmp_path):
    m1 = peft_adapter(llama_f32, tmp_path / "a1", seed=3, r=4, lora_alpha=8, target_modules=LINEAR)
    m2 = peft_adapter(
        llama_f32,
        tmp_path / "a2",
        seed=4,
        r=6,
        lora_alpha=3,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "embed_tokens"],
    )
    run(
        "lora",
        "combine",
        tmp_path / "a1",
        tmp_path / "a2",
        "--weights",
        "0.5,-0.5",
        "-o",
        tmp_path / "comb",
        "--quiet",
    )
    loaded = peft.PeftModel.from_pretrained(base_model(llama_f32), tmp_path / "comb")
    got = state(loaded.merge_and_unload())
    base = load(llama_f32)
    for name, b in base.items():
        want = b + 0.5 * (m1[name] - b) - 0.5 * (m2[name] - b)
        np.testing.assert_allclose(got[name], want, rtol=0, atol=2e-6 * np.max(np.abs(want)))
    # the deltas are large next to that tolerance: a cross term such as 0.5 * B1 A2 would show
    name = "model.layers.0.self_attn.q_proj.weight"
    for merged in (m1, m2):
        assert np.max(np.abs(merged[name] - base[name])) > 0.05 * np.max(np.abs(base[name]))


def test_extract_of_a_low_rank_finetune_restores_it_through_peft(llama_f32, tmp_path):
    rng = np.random.default_rng(5)
    ft_model = base_model(llama_f32)
    with torch.no_grad():
        for name, p in ft_model.named_parameters():
            if p.ndim == 2 and ".layers." in name:
                m, n = p.shape
                delta = rng.standard_normal((m, 3)) @ rng.standard_normal((3, n)) * 0.01
                p.add_(torch.from_numpy(delta).float())
            elif name.endswith("model.norm.weight"):
                p.mul_(1.5)
        want = state(ft_model)
    ft = save_model(ft_model, tmp_path / "ft")
    run("lora", "extract", llama_f32, ft, "--rank", "3", "-o", tmp_path / "ad", "--quiet")
    restored = state(
        peft.PeftModel.from_pretrained(base_model(llama_f32), tmp_path / "ad").merge_and_unload()
    )
    for name, w in want.items():
        np.testing.assert_allclose(restored[name], w, rtol=0, atol=1e-5 * np.max(np.abs(w)))
    config = yaml.safe_load((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["model.norm"]
    assert config["r"] == 3


def test_extract_with_embed_restores_embedding_and_head_through_peft(llama_f32, tmp_path):
    rng = np.random.default_rng(6)
    ft_model = base_model(llama_f32)
    with torch.no_grad():
        for name, p in ft_model.named_parameters():
            if name.endswith(("embed_tokens.weight", "lm_head.weight", "q_proj.weight")):
                m, n = p.shape
                delta = rng.standard_normal((m, 2)) @ rng.standard_normal((2, n)) * 0.02
                p.add_(torch.from_numpy(delta).float())
    want = state(ft_model)
    ft = save_model(ft_model, tmp_path / "ft")
    run("lora", "extract", llama_f32, ft, "--rank", "2", "--embed", "-o", tmp_path / "ad", "-q")
    with open_checkpoint(tmp_path / "ad" / "adapter_model.safetensors") as ad:
        assert "base_model.model.model.embed_tokens.lora_embedding_A" in ad
        assert "base_model.model.lm_head.lora_A.weight" in ad
    restored = state(
        peft.PeftModel.from_pretrained(base_model(llama_f32), tmp_path / "ad").merge_and_unload()
    )
    for name, w in want.items():
        np.testing.assert_allclose(restored[name], w, rtol=0, atol=1e-5 * np.max(np.abs(w)))


def test_base_plus_adapter_recipe_equals_lora_apply(llama_bf16, tmp_path):
    peft_adapter(
        llama_bf16,
        tmp_path / "ad",
        r=4,
        lora_alpha=8,
        use_dora=True,
        target_modules=LINEAR,
        modules_to_save=["lm_head"],
    )
    run("lora", "apply", llama_bf16, tmp_path / "ad", "-o", tmp_path / "applied", "-q")
    recipe = {
        "merge_method": "linear",
        "models": [{"model": f"{llama_bf16}+{tmp_path / 'ad'}", "parameters": {"weight": 1.0}}],
    }
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    run("run", tmp_path / "r.yml", "-o", tmp_path / "viarecipe", "-q")
    a, b = load(tmp_path / "applied"), load(tmp_path / "viarecipe")
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])

"""Generated Llama-shaped checkpoints (a base and its fine-tunes) for tests, examples and
benchmarks; written tensor by tensor through the streaming writer, numpy only."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

import numpy as np

from mmerge.io import StreamingWriter, TensorSpec


def llama_shapes(hidden: int, intermediate: int, layers: int, vocab: int) -> dict[str, tuple]:
    """Tensor names and shapes of a Llama model (untied embeddings, full-size key/value heads)."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _rng(seed: int, model: str, name: str) -> np.random.Generator:
    """A generator that depends only on (seed, model, tensor name): any tensor can be made
    alone, in any order, with the same values."""
    digest = hashlib.sha256(f"{seed}/{model}/{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def _base_tensor(seed: int, name: str, shape: tuple[int, ...]) -> np.ndarray:
    x = _rng(seed, "base", name).standard_normal(shape, dtype=np.float32)
    x *= 0.02
    if name.endswith("norm.weight"):
        x += 1.0
    return x


def model_tensor(
    seed: int, model: str, name: str, shape: tuple[int, ...], delta_scale: float = 0.01
) -> np.ndarray:
    """One float32 tensor of the family: the base ~ N(0, 0.02) (norm weights ~ 1), or for a
    fine-tune `model` the base plus N(0, delta_scale)."""
    x = _base_tensor(seed, name, shape)
    if model != "base":
        delta = _rng(seed, model, name).standard_normal(shape, dtype=np.float32)
        x += delta * np.float32(delta_scale)
    return x


def _config_files(hidden: int, intermediate: int, layers: int, vocab: int, dtype: str):
    heads = hidden // 16 if hidden % 16 == 0 else 1
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": {"BF16": "bfloat16", "F16": "float16"}.get(dtype, "float32"),
    }
    tokenizer = {"tokenizer_class": "LlamaTokenizer", "model_max_length": 2048}
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    return {
        "config.json": config,
        "tokenizer_config.json": tokenizer,
        "generation_config.json": generation,
    }


def write_model_family(
    out_dir: str | Path,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 4,
    vocab: int = 256,
    n_finetunes: int = 2,
    dtype: str = "BF16",
    layout: str = "folder",
    shard_size: int | None = None,
    seed: int = 0,
    delta_scale: float = 0.01,
) -> dict[str, Path]:
    """Write a base model and `n_finetunes` fine-tunes into `out_dir`; returns
    {"base": path, "ft1": path, ...}. Folders (`layout="folder"`) are Hugging Face style with
    config.json, tokenizer_config.json and generation_config.json; files are NAME.safetensors."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(hidden, intermediate, layers, vocab)
    specs = [TensorSpec(name, dtype, shape) for name, shape in shapes.items()]
    models = ["base"] + [f"ft{k + 1}" for k in range(n_finetunes)]
    paths = {}
    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        if layout == "folder":
            for fname, obj in _config_files(hidden, intermediate, layers, vocab, dtype).items():
                (Path(tmp) / fname).write_text(json.dumps(obj, indent=2) + "\n")
                extra.append(Path(tmp) / fname)
        for model in models:
            path = out_dir / (model if layout == "folder" else f"{model}.safetensors")
            with StreamingWriter(path, specs, shard_size=shard_size, layout=layout) as w:
                for spec in specs:
                    values = model_tensor(seed, model, spec.name, spec.shape, delta_scale)
                    w.write(spec.name, values)
                    w.finish_tensor(spec.name)
                for f in extra:
                    w.add_file(f)
            paths[model] = path
    return paths


LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(
    path: str | Path,
    tensors: dict[str, np.ndarray],
    config: dict,
    dtype: str = "F32",
) -> Path:
    """Write a PEFT-format adapter folder: `tensors` under their adapter keys, `config` as
    adapter_config.json (peft_type LORA added when missing)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    specs = [TensorSpec(k, dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamingWriter(path / "adapter_model.safetensors", specs, layout="file") as w:
        for key, value in tensors.items():
            w.write(key, value)
            w.finish_tensor(key)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return path


def random_adapter(
    base: str | Path,
    path: str | Path,
    *,
    rank: int = 16,
    alpha: float = 32,
    modules: tuple[str, ...] = LINEAR_MODULES,
    seed: int = 0,
    scale: float = 0.01,
) -> Path:
    """A random LoRA adapter of rank `rank` on every 2-D `<module>.weight` of the checkpoint
    `base` whose module name ends with one of `modules` (B not zero, as after training)."""
    from mmerge.io import open_checkpoint

    tensors = {}
    with open_checkpoint(base) as ckpt:
        for name, ref in ckpt.items():
            module = name.removesuffix(".weight")
            if len(ref.shape) != 2 or module == name or module.split(".")[-1] not in modules:
                continue
            rng = _rng(seed, "adapter", name)
            out_dim, in_dim = ref.shape
            a = rng.standard_normal((rank, in_dim), dtype=np.float32) * np.float32(scale)
            b = rng.standard_normal((out_dim, rank), dtype=np.float32) * np.float32(scale)
            tensors[f"base_model.model.{module}.lora_A.weight"] = a
            tensors[f"base_model.model.{module}.lora_B.weight"] = b
    config = {"r": rank, "lora_alpha": alpha, "target_modules": list(modules)}
    return write_adapter(path, tensors, config)


def write_fp8_model_family(
    out_dir: str | Path,
    *,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 4,
    vocab: int = 256,
    n_finetunes: int = 2,
    seed: int = 0,
    delta_scale: float = 0.01,
    shard_size: int | None = None,
) -> dict[str, Path]:
    """Like `write_model_family` (folders), quantized as DeepSeek-V3 publishes its weights:
    every 2-D layer weight F8_E4M3 with a float32 `_scale_inv` per 128x128 block, the other
    tensors BF16, and config.json declaring the fp8 quantization_config."""
    from mmerge.io.requantize import BlockQuantizer, fp8_specs

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shapes = llama_shapes(hidden, intermediate, layers, vocab)
    quantized = {n: s for n, s in shapes.items() if ".layers." in n and len(s) == 2}
    specs = [TensorSpec(n, "F8_E4M3" if n in quantized else "BF16", s) for n, s in shapes.items()]
    specs = fp8_specs(specs, quantized, (128, 128))
    files = _config_files(hidden, intermediate, layers, vocab, "BF16")
    files["config.json"]["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    }
    paths = {}
    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        for fname, obj in files.items():
            (Path(tmp) / fname).write_text(json.dumps(obj, indent=2) + "\n")
            extra.append(Path(tmp) / fname)
        for model in ["base"] + [f"ft{k + 1}" for k in range(n_finetunes)]:
            path = out_dir / model
            with StreamingWriter(path, specs, shard_size=shard_size, layout="folder") as w:
                sink = BlockQuantizer(w, quantized, (128, 128))
                for name, shape in shapes.items():
                    sink.write(name, model_tensor(seed, model, name, shape, delta_scale))
                    sink.finish_tensor(name)
                for f in extra:
                    w.add_file(f)
            paths[model] = path
    return paths

"""Quantized checkpoints for tests, written byte by byte with their own quantizer and read back
with their own dequantizer: an independent reference for mmerge's quantized profile."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import ml_dtypes
import numpy as np

F8 = ml_dtypes.float8_e4m3fn
NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


def block_of(kind: str, shape: tuple[int, int], size=(128, 128)) -> tuple[int, int]:
    """Rows and columns sharing one scale, for a layout kind."""
    rows, cols = shape
    return {"tensor": (rows, cols), "channel": (1, cols), "group": (1, size[1])}.get(kind, size)


def expand(scale: np.ndarray, shape: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """Each element's scale: the scale grid repeated over its blocks, cut to the tensor."""
    grid = np.asarray(scale, np.float64).reshape(-(-shape[0] // block[0]), -1)
    full = np.repeat(np.repeat(grid, block[0], axis=0), block[1], axis=1)
    return full[: shape[0], : shape[1]]


def quantize(w: np.ndarray, block: tuple[int, int], ue8m0: bool = False):
    """(fp8 bits, float32 scales (block rows, block cols)): amax / 448 per block."""
    rows, cols = w.shape
    grid = np.ones((-(-rows // block[0]), -(-cols // block[1])), np.float64)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            part = w[i * block[0] : (i + 1) * block[0], j * block[1] : (j + 1) * block[1]]
            amax = float(np.abs(part).max())
            if amax > 0:
                grid[i, j] = 2.0 ** np.ceil(np.log2(amax / 448)) if ue8m0 else amax / 448
    grid = grid.astype(np.float32)
    q = (w / expand(grid, w.shape, block)).astype(F8)
    return q.view(np.uint8), grid


def dequantize(bits: np.ndarray, scale: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float64 values of fp8 `bits` times their block's scale."""
    values = bits.view(F8).astype(np.float64)
    return values * expand(scale, values.shape, block)


def write_file(path: Path, tensors: dict) -> None:
    """A safetensors file from name -> (dtype code, array of its storage or value type)."""
    header, blobs, offset = {}, [], 0
    for name, (code, array) in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[name] = {
            "dtype": code,
            "shape": list(np.shape(array)),
            "data_offsets": [offset, offset + len(data)],
        }
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def write_folder(folder: Path, shards: list[dict], config: dict | None = None) -> Path:
    """A Hugging Face folder: one file per shard dict, an index and config.json."""
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for k, shard in enumerate(shards):
        name = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(folder / name, shard)
        weight_map.update(dict.fromkeys(shard, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": "bfloat16"}
    if config is not None:
        cfg["quantization_config"] = config
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


SHAPES = {  # ragged for 128x128 and for 64x32 blocks
    "model.embed_tokens.weight": (96, 48),
    "model.layers.0.self_attn.q_proj.weight": (200, 300),
    "model.layers.0.mlp.down_proj.weight": (130, 260),
    "model.layers.0.input_layernorm.weight": (300,),
    "model.layers.1.self_attn.q_proj.weight": (256, 129),
    "model.layers.1.mlp.down_proj.weight": (70, 300),
    "model.norm.weight": (300,),
}


def is_quantized(name: str) -> bool:
    return ".layers." in name and len(SHAPES[name]) == 2


def family_values(seed: int = 3) -> dict[str, dict[str, np.ndarray]]:
    """float32 values of a base and two fine-tunes (with a few exact zeros and a zero block)."""
    rng = np.random.default_rng(seed)
    base = {}
    for name, shape in SHAPES.items():
        x = rng.standard_normal(shape).astype(np.float32) * 0.05
        base[name] = x + 1 if len(shape) == 1 else x
    base["model.layers.1.mlp.down_proj.weight"][:64, :32] = 0  # an all-zero block
    models = {"base": base}
    for k in (1, 2):
        models[f"ft{k}"] = {
            n: x + rng.standard_normal(x.shape).astype(np.float32) * 0.01 * k
            for n, x in base.items()
        }
    return models


def write_quantized(
    folder: Path,
    values: dict[str, np.ndarray],
    *,
    kind: str = "block",
    size: tuple[int, int] = (128, 128),
    suffix: str = "_scale_inv",
    scale_code: str = "F32",
    config: dict | None = None,
    ue8m0: bool = False,
    extra: dict | None = None,
) -> tuple[Path, dict[str, np.ndarray]]:
    """A two-shard folder of `values` with the layer matrices quantized: the down_proj scales
    in the other shard. Returns the folder and the float64 dequantized values it holds."""
    shards: list[dict] = [{}, {}]
    exact = {}
    for name, x in values.items():
        home = 0 if ("layers.0" in name or "embed" in name) else 1
        if not is_quantized(name):
            shards[home][name] = ("F32", x)
            exact[name] = x.astype(np.float64)
            continue
        block = block_of(kind, x.shape, size)
        bits, grid = quantize(x, block, ue8m0)
        scale = grid.reshape(1) if kind == "tensor" else grid
        if scale_code == "F8_E8M0":
            stored = np.log2(scale).astype(np.int32) + 127
            scale_arr = stored.astype(np.uint8)
        else:
            scale_arr = scale.astype(NUMPY[scale_code])
        used = (
            np.asarray(scale_arr).view(ml_dtypes.float8_e8m0fnu)
            if scale_code == "F8_E8M0"
            else scale_arr
        )
        exact[name] = dequantize(bits, np.asarray(used).astype(np.float64), block)
        shards[home][name] = ("F8_E4M3", bits)
        other = 1 - home if "down_proj" in name else home
        shards[other][name + suffix] = (scale_code, scale_arr)
    for name, item in (extra or {}).items():
        shards[1][name] = item
    return write_folder(folder, shards, config), exact


DEEPSEEK = {
    "activation_scheme": "dynamic",
    "fmt": "e4m3",
    "quant_method": "fp8",
    "weight_block_size": [128, 128],
}


def compressed_tensors(strategy: str, **weights) -> dict:
    """A compressed-tensors float-quantized config with one group of fp8 weights."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {
                    "num_bits": 8,
                    "type": "float",
                    "symmetric": True,
                    "strategy": strategy,
                    **weights,
                },
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor"},
            }
        },
    }


def load_output(
    path: Path, block: tuple[int, int] = (128, 128)
) -> tuple[dict[str, np.ndarray], dict[str, tuple[str, np.ndarray]]]:
    """A checkpoint's tensors as float64 (fp8 ones dequantized with their `_scale_inv` in
    `block` blocks), and every stored tensor as (dtype code, raw array)."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    stored = {}
    for f in files:
        data = f.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            b, e = meta["data_offsets"]
            code = meta["dtype"]
            dtype = np.uint8 if code.startswith("F8") else NUMPY[code]
            arr = np.frombuffer(data[8 + n + b : 8 + n + e], dtype).reshape(meta["shape"])
            stored[name] = (code, arr)
    values = {}
    for name, (code, arr) in stored.items():
        if name.endswith("_scale_inv"):
            continue
        if code == "F8_E4M3":
            values[name] = dequantize(arr, stored[name + "_scale_inv"][1], block)
        else:
            values[name] = arr.astype(np.float64)
    return values, stored

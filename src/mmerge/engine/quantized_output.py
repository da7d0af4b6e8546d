"""What a merge of quantized checkpoints writes: by default dequantized tensors (BF16) and a
config.json without quantization_config; with `--out-dtype fp8`, every tensor quantized in an
input requantized to F8_E4M3 with fresh block scales, and a quantization_config to match."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mmerge.engine.plan import Plan
from mmerge.errors import InvalidInput
from mmerge.io.quantization import DEFAULT_BLOCK, Quantization
from mmerge.io.requantize import CODE

FP8_NAMES = {"fp8", "float8", "f8", "f8_e4m3", "float8_e4m3", "float8_e4m3fn", "e4m3"}


def wants_fp8(out_dtype: str | None) -> bool:
    """Whether an output dtype asks for block-scaled fp8 ('fp8', 'float8_e4m3fn', 'F8_E4M3')."""
    return out_dtype is not None and out_dtype.strip().lower() in FP8_NAMES


def plan_dtype(out_dtype: str | None) -> str | None:
    """The output dtype a plan is built with: none for fp8 (each tensor's own dtype, then
    `requantize` marks the quantized ones)."""
    return None if wants_fp8(out_dtype) else out_dtype


@dataclass(frozen=True)
class Requantization:
    """The fp8 tensors of an output, their block size and scale format, and the
    quantization_config written into its config.json."""

    names: frozenset[str]
    block: tuple[int, int]
    ue8m0: bool
    config: Mapping[str, Any]


def requantize(plan: Plan, checkpoints: Sequence, config_from=None) -> Requantization:
    """Mark for fp8 output every planned tensor read from a quantized tensor of some input.

    The block size and scale format follow the first quantized input (the one whose config
    is copied, `config_from`, if it is quantized); its quantization_config is kept when it
    declares those block scales, else one is written for them. InvalidInput when no input is
    quantized or a quantized tensor is not 2-D, before anything is written.
    """
    from mmerge.io import QuantizedRef

    quantized = [c for c in checkpoints if getattr(c, "quantization", None) is not None]
    if not quantized:
        raise InvalidInput(
            "--out-dtype fp8 requantizes the fp8 weights of quantized inputs, and no input is "
            "quantized (use bfloat16, float16 or float32)"
        )
    chosen = next((c for c in quantized if config_from is not None and c.path == config_from), None)
    scheme: Quantization = (chosen or quantized[0]).quantization
    names = []
    for i, item in enumerate(plan.items):
        if not any(isinstance(ref, QuantizedRef) for ref in item.inputs()):
            continue
        if len(item.shape) != 2:
            raise InvalidInput(
                f"--out-dtype fp8 writes block scales for 2-D weights; tensor {item.name!r} "
                f"has shape {list(item.shape)} (use bfloat16 instead)"
            )
        plan.items[i] = dataclasses.replace(item, out_dtype=CODE)
        names.append(item.name)
    keeps = (
        scheme.method == "fp8"
        and scheme.block is not None
        and scheme.config is not None
        and scheme.config.get("fmt") in (None, "e4m3", "float8_e4m3fn")
    )
    block = scheme.block if keeps else DEFAULT_BLOCK
    config = dict(scheme.config) if keeps else _fresh_config(plan, set(names), block)
    if not keeps and scheme.config is not None:
        plan.warnings.append(
            f"the inputs' {scheme.method} quantization_config is replaced by fine-grained fp8 "
            f"with {block[0]}x{block[1]} block scales (weight_scale_inv), as written"
        )
    return Requantization(frozenset(names), block, scheme.ue8m0 and keeps, config)


def _fresh_config(plan: Plan, fp8: set[str], block: tuple[int, int]) -> dict[str, Any]:
    """A Hugging Face fine-grained fp8 quantization_config for the written block scales; 2-D
    weights left unquantized are listed as modules not to convert."""
    keep = [
        item.name.removesuffix(".weight")
        for item in plan.items
        if item.name.endswith(".weight") and len(item.shape) == 2 and item.name not in fp8
    ]
    return {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(block),
        "modules_to_not_convert": keep,
    }


def output_config(
    config: dict[str, Any], requant: Requantization | None, out_dtype_name: str | None
) -> bool:
    """Update a copied config.json in place for the output; True when anything changed.

    fp8 output: its quantization_config. Otherwise a quantization_config is removed (the
    tensors are dequantized) and the dtype field set to the output dtype (bfloat16 unless
    another was asked for); an explicit output dtype is always recorded.
    """
    changed = False
    if requant is not None:
        if config.get("quantization_config") != requant.config:
            config.pop("compression_config", None)
            config["quantization_config"] = dict(requant.config)
            changed = True
    elif "quantization_config" in config or "compression_config" in config:
        config.pop("quantization_config", None)
        config.pop("compression_config", None)
        out_dtype_name = out_dtype_name or "bfloat16"
        changed = True
    if out_dtype_name:
        keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
        for key in keys:
            changed |= config.get(key) != out_dtype_name
            config[key] = out_dtype_name
    return changed

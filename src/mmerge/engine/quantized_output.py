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
from mmerge.io.quantization import Quantization
from mmerge.io.requantize import CODE
from mmerge.io.scale_layout import DEFAULT_BLOCK

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
    """Mark for fp8 output every planned tensor read from a quantized tensor of some input,
    and set `plan.requantization`.

    The block size and scale format follow the first quantized input (the one whose config
    is copied, `config_from`, if it is quantized); its quantization_config is kept when it
    declares those block scales, else one is written for them. InvalidInput when no input is
    quantized or a quantized tensor is not 2-D, before anything is written.
    """
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
        if not any(map(_quantized, item.inputs())):
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
        plan.warn(
            f"the inputs' {scheme.method} quantization_config is replaced by fine-grained fp8 "
            f"with {block[0]}x{block[1]} block scales (weight_scale_inv), as written"
        )
    plan.requantization = Requantization(frozenset(names), block, scheme.ue8m0 and keeps, config)
    return plan.requantization


def _quantized(ref) -> bool:
    """Whether a planned input is read from a quantized tensor (itself, or the base tensor an
    adapter is applied to)."""
    from mmerge.io import QuantizedRef
    from mmerge.io.adapted import AdaptedTensorRef

    if isinstance(ref, AdaptedTensorRef):
        ref = ref.base
    return isinstance(ref, QuantizedRef)


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


def quantization_config(config: dict[str, Any], plan: Plan) -> str | None:
    """Edit a copied config.json's quantization for the output: fp8 output gets its
    quantization_config; otherwise a quantization_config (or compression_config) is removed,
    the weights being dequantized, and the dtype code they are written in is returned (when
    they share one) for the config's dtype field."""
    requant = plan.requantization
    if requant is not None:
        config.pop("compression_config", None)
        config["quantization_config"] = dict(requant.config)
        return None
    removed = [config.pop(key, None) for key in ("quantization_config", "compression_config")]
    if all(value is None for value in removed):
        return None
    codes = {item.out_dtype for item in plan.items if any(map(_quantized, item.inputs()))}
    return codes.pop() if len(codes) == 1 else None

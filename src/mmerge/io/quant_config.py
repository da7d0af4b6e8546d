"""What a checkpoint's config.json declares about its quantization: the method, the layouts
its scale companions may follow, or a refusal naming a scheme mmerge cannot read as numbers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmerge.errors import QuantizationError
from mmerge.io.scale_layout import DEFAULT_BLOCK, Layout, block_layout

INSTEAD = (
    "merge the unquantized (bf16 or fp16) checkpoints it was made from, then quantize the result"
)


@dataclass(frozen=True)
class Declared:
    """What a checkpoint declares: its quantization method and the layouts its
    `X_scale_inv` and `X_scale` companions may follow, in the order they are tried."""

    method: str = ""  # "" when config.json declares nothing
    scale_inv: tuple[Layout, ...] = (Layout("block", DEFAULT_BLOCK), Layout("tensor"))
    scale: tuple[Layout, ...] = (Layout("tensor"), Layout("channel"))
    ue8m0: bool = False
    config: Mapping[str, Any] | None = None

    @property
    def block(self) -> tuple[int, int] | None:
        """The declared block size of `_scale_inv` companions, if they are block-scaled."""
        first = self.scale_inv[0]
        return first.size if first.kind == "block" else None


def read_config(path: Path) -> dict[str, Any] | None:
    """config.json of a checkpoint folder (with ModelOpt's hf_quant_config.json folded into
    its quantization_config); None for a single file or a folder without one."""
    if not path.is_dir():
        return None
    config = _json(path / "config.json")
    modelopt = _json(path / "hf_quant_config.json")
    if isinstance(modelopt, dict) and isinstance(modelopt.get("quantization"), dict):
        config = dict(config) if isinstance(config, dict) else {}
        config.setdefault(
            "quantization_config", {"quant_method": "modelopt", **modelopt["quantization"]}
        )
    return config if isinstance(config, dict) else None


def _json(path: Path) -> Any:
    """A JSON file's content; None when it is absent or not JSON (a config mmerge cannot read
    declares nothing: the tensor names alone still decide, and refuse what they must)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None


def declared_scheme(config: Mapping[str, Any] | None, where: str) -> Declared:
    """The quantization `config` (config.json) declares; QuantizationError for every
    scheme whose weights are not fp8 numbers times scales."""
    qc = None
    if isinstance(config, Mapping):
        qc = config.get("quantization_config") or config.get("compression_config")
    if not qc:
        return Declared()
    if not isinstance(qc, Mapping):
        raise QuantizationError(f"{where}: quantization_config is not an object")
    method = str(qc.get("quant_method") or "").lower()
    if qc.get("load_in_4bit") or qc.get("load_in_8bit"):
        method = "bitsandbytes"
    parse = _METHODS.get(method)
    if parse is not None:
        return parse(qc, where)
    what = _PACKED_METHODS.get(method, f"quantization method {method or '(none given)'!r}")
    raise QuantizationError(f"{where}: {what} is not supported; {INSTEAD}")


def _fp8(qc: Mapping[str, Any], where: str) -> Declared:
    """HF fine-grained fp8 (DeepSeek-V3/R1): fmt, weight_block_size (null: per tensor),
    scale_fmt; vLLM's per-tensor fp8 uses the same method with `X_scale` companions."""
    fmt = qc.get("fmt")
    if fmt not in (None, "e4m3", "e5m2", "float8_e4m3fn", "float8_e5m2"):
        raise QuantizationError(f"{where}: fp8 format {fmt!r} is not supported (e4m3 or e5m2)")
    scale_fmt = qc.get("scale_fmt")
    if scale_fmt not in (None, "float", "ue8m0"):
        raise QuantizationError(f"{where}: scale_fmt {scale_fmt!r} is not supported (float, ue8m0)")
    size = qc.get("weight_block_size", list(DEFAULT_BLOCK))
    block = (block_layout(size, f"{where}: weight_block_size"),) if size is not None else ()
    return Declared(
        method="fp8",
        scale_inv=(*block, Layout("tensor")),
        scale=(Layout("tensor"), Layout("channel"), *block),
        ue8m0=scale_fmt == "ue8m0",
        config=qc,
    )


_CT_FORMATS = {None, "float-quantized", "naive-quantized", "dense", "mixed-precision"}


def _compressed_tensors(qc: Mapping[str, Any], where: str) -> Declared:
    """compressed-tensors: every config group with quantized weights must be 8-bit float,
    symmetric, stored float-quantized or naive-quantized; its strategy gives the layout."""
    sparsity = qc.get("sparsity_config")
    if isinstance(sparsity, Mapping) and sparsity.get("format") not in (None, "dense"):
        raise QuantizationError(
            f"{where}: compressed-tensors {sparsity.get('format')} (sparse weights stored "
            f"compressed) is not supported; {INSTEAD}"
        )
    layouts: list[Layout] = []
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, Mapping):
        raise QuantizationError(f"{where}: compressed-tensors config_groups is not an object")
    for gname, group in groups.items():
        weights = group.get("weights") if isinstance(group, Mapping) else None
        if not weights:
            continue
        fmt = group.get("format") or qc.get("format")
        if fmt not in _CT_FORMATS:
            what = _CT_PACKED.get(fmt, f"format {fmt!r}")
            raise QuantizationError(
                f"{where}: compressed-tensors {what} is not supported; {INSTEAD}"
            )
        bits, kind = weights.get("num_bits", 8), str(weights.get("type", "int")).lower()
        if (bits, kind) != (8, "float"):
            raise QuantizationError(
                f"{where}: compressed-tensors {bits}-bit {kind} weights (group {gname}) are "
                f"not supported, only 8-bit float; {INSTEAD}"
            )
        if weights.get("symmetric") is False:
            raise QuantizationError(
                f"{where}: compressed-tensors asymmetric fp8 weights (zero points, group "
                f"{gname}) are not supported; {INSTEAD}"
            )
        layouts.append(_ct_layout(weights, gname, where))
    return Declared(
        method="compressed-tensors",
        scale_inv=tuple(layouts) or (Layout("tensor"),),
        scale=tuple(dict.fromkeys([*layouts, Layout("tensor")])),
        config=qc,
    )


def _ct_layout(weights: Mapping[str, Any], gname: str, where: str) -> Layout:
    strategy = weights.get("strategy")
    group_size = weights.get("group_size")
    if strategy is None:  # compressed-tensors infers it from the group size
        strategy = "tensor" if group_size is None else "channel" if group_size == -1 else "group"
    strategy = str(strategy).lower()
    if strategy in ("tensor", "channel"):
        return Layout(strategy)
    if strategy == "block":
        return block_layout(weights.get("block_structure"), f"{where}: group {gname} block")
    if strategy == "group" and isinstance(group_size, int) and group_size > 0:
        return Layout("group", (1, group_size))
    raise QuantizationError(
        f"{where}: compressed-tensors weight strategy {strategy!r} (group {gname}) is not "
        f"supported; {INSTEAD}"
    )


def _per_channel(method: str):
    def parse(qc: Mapping[str, Any], where: str) -> Declared:
        return Declared(method=method, scale=(Layout("channel"), Layout("tensor")), config=qc)

    return parse


def _modelopt(qc: Mapping[str, Any], where: str) -> Declared:
    algo = str(qc.get("quant_algo") or "")
    if not algo.upper().startswith("FP8"):
        raise QuantizationError(
            f"{where}: ModelOpt {algo or 'quantization'} is not supported; {INSTEAD}"
        )
    return Declared(method="modelopt", config=qc)


_METHODS = {
    "fp8": _fp8,
    "compressed-tensors": _compressed_tensors,
    "fbgemm_fp8": _per_channel("fbgemm_fp8"),
    "modelopt": _modelopt,
}
_PACKED_METHODS = {
    "gptq": "GPTQ (integer weights packed into int32, with group scales and zero points)",
    "awq": "AWQ (4-bit integer weights packed into int32, with group scales and zero points)",
    "bitsandbytes": "bitsandbytes (NF4/FP4 weights packed two per byte, or LLM.int8 weights)",
    "mxfp4": "MXFP4 (4-bit floats packed two per byte with shared power-of-two scales)",
    "hqq": "HQQ (packed low-bit integer weights)",
    "aqlm": "AQLM (additive codebook weights)",
    "vptq": "VPTQ (vector-quantized codebook weights)",
    "eetq": "EETQ (int8 weights)",
    "bitnet": "BitNet (ternary weights packed into bytes)",
    "gguf": "GGUF (packed block-quantized weights)",
    "exl2": "EXL2 (packed mixed-bit weights)",
}
_CT_PACKED = {
    "pack-quantized": "pack-quantized (integer weights packed into int32: weight_packed)",
    "int-quantized": "int-quantized (int8 weights)",
    "nvfp4-pack-quantized": "NVFP4 (4-bit floats packed two per byte with fp8 scales)",
    "mxfp4-pack-quantized": "MXFP4 (4-bit floats packed two per byte with power-of-two scales)",
    "marlin-24": "marlin-24 (2:4 sparse packed integer weights)",
}

# Tensor names that only packed formats use: refused even when no config says so.

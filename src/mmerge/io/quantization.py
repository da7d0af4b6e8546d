"""Quantized checkpoints: which tensors are fp8 numbers with scales, read from config.json's
`quantization_config` and the tensor names, and a clear refusal for every other scheme.

A recognised fp8 tensor and its scale become one `QuantizedRef`; the scale companions and the
activation scales leave the checkpoint's mapping. Nothing quantized is handed on as plain
numbers: what no rule here explains is refused (spec/format.md, "Quantized checkpoints").
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmerge.errors import QuantizationError

FP8 = ("F8_E4M3", "F8_E5M2")
SCALE_CODES = ("F32", "BF16", "F16", "F64", "F8_E8M0")
DEFAULT_BLOCK = (128, 128)
SCALE_INV = "_scale_inv"  # DeepSeek, HF fine-grained fp8: the value is fp8 * scale all the same
SCALE = "_scale"  # compressed-tensors, fbgemm, ModelOpt, vLLM fp8: the value is fp8 * scale
ACTIVATION_SCALES = {
    "input_scale",
    "output_scale",
    "k_scale",
    "v_scale",
    "q_scale",
    "kv_scale",
    "prob_scale",
}
INSTEAD = (
    "merge the unquantized (bf16 or fp16) checkpoints it was made from, then quantize the result"
)


@dataclass(frozen=True)
class Layout:
    """How one scale tensor covers its fp8 tensor, over the last two dimensions (a 1-D tensor
    is one row; leading dimensions have their own scales): one scale for the whole tensor
    ("tensor"), per row ("channel"), per `size[1]` elements of a row ("group") or per
    `size[0]` x `size[1]` block ("block")."""

    kind: str
    size: tuple[int, int] = (1, 1)

    def block(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Rows and columns of `shape` that share one scale."""
        *_, rows, cols = matrix_shape(shape)
        if self.kind == "tensor":
            return rows, cols
        if self.kind == "channel":
            return 1, cols
        return self.size

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale shape this layout gives a tensor of `shape` (() for one scale)."""
        if self.kind == "tensor":
            return ()
        *lead, rows, cols = matrix_shape(shape)
        b0, b1 = self.block(shape)
        return (*lead, -(-rows // b0), -(-cols // b1))

    def fits(self, scale: tuple[int, ...], shape: tuple[int, ...]) -> bool:
        """Whether a scale tensor of shape `scale` follows this layout for `shape`."""
        if self.kind == "tensor":
            return math.prod(scale) == 1
        grid = self.grid(shape)
        if tuple(scale) == grid:
            return True
        return self.kind == "channel" and tuple(scale) == grid[:-1]  # (rows,) for (rows, 1)

    def describe(self) -> str:
        if self.kind == "block":
            return f"{self.size[0]}x{self.size[1]} blocks"
        if self.kind == "group":
            return f"groups of {self.size[1]}"
        return f"per-{self.kind}"


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` with at least two dimensions: a vector is one row, a scalar one element."""
    return (1,) * max(0, 2 - len(shape)) + tuple(shape)


def _block_layout(value: Any, where: str) -> Layout:
    """A block layout from a config's [rows, cols] (or compressed-tensors' "RxC")."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        value = [int(p) for p in parts] if all(p.isdigit() for p in parts) else value
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise QuantizationError(f"{where}: block size {value!r} is not two positive integers")
    return Layout("block", (value[0], value[1]))


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


@dataclass(frozen=True)
class Quantization:
    """A checkpoint's recognised quantization: what inspect shows and what an fp8 output keeps."""

    method: str  # the declared quant_method, or "fp8" when only the tensor names tell
    config: Mapping[str, Any] | None  # the quantization_config as declared
    block: tuple[int, int] | None  # the declared block size of block scales
    ue8m0: bool  # scales declared as powers of two
    layouts: dict[str, int]  # "128x128 blocks" -> number of tensors
    tensors: int  # fp8 tensors read with their scales
    dropped: tuple[str, ...]  # activation and KV-cache scales left out

    def summary(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "method": self.method,
            "block": list(self.block) if self.block else None,
            "scale_fmt": "ue8m0" if self.ue8m0 else "float",
            "quantized_tensors": self.tensors,
            "layouts": dict(self.layouts),
            "dropped_scales": len(self.dropped),
        }


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
    block = (_block_layout(size, f"{where}: weight_block_size"),) if size is not None else ()
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
        return _block_layout(weights.get("block_structure"), f"{where}: group {gname} block")
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
_PACKED_NAMES = (
    (
        re.compile(r"\.(weight_global_scale|weight_scale_2)$"),
        "NVFP4 (4-bit floats packed two per byte with fp8 block scales)",
    ),
    (
        re.compile(r"\.weight_packed$"),
        "compressed-tensors pack-quantized (integer weights packed into int32)",
    ),
    (re.compile(r"\.(qweight|qzeros|g_idx)$"), "GPTQ/AWQ (integer weights packed into int32)"),
    (
        re.compile(r"\.(absmax|quant_map|SCB|weight_format)$|\.quant_state\.bitsandbytes__"),
        "bitsandbytes (packed 4-bit or LLM.int8 weights)",
    ),
    (
        re.compile(r"\.(bitmask|row_offsets)$"),
        "compressed-tensors sparse-bitmask (compressed sparse weights)",
    ),
    (re.compile(r"_zero_point$"), "asymmetric quantization (weights with zero points)"),
)


def _refuse_packed(refs: Mapping[str, Any], where: str) -> None:
    """Refuse tensor names only packed formats use (the most specific format first)."""
    for pattern, what in _PACKED_NAMES:
        for name in refs:
            if pattern.search(name):
                raise QuantizationError(
                    f"{where}: {what} tensor {name!r} is not supported; {INSTEAD}"
                )
    for name, ref in refs.items():
        if name.endswith("_blocks") and ref.dtype == "U8" and name[:-7] + "_scales" in refs:
            raise QuantizationError(
                f"{where}: MXFP4 tensor {name!r} (4-bit floats packed two per byte) is not "
                f"supported; {INSTEAD}"
            )


def _scale_like(name: str) -> bool:
    return "scale" in name.rsplit(".", 1)[-1].lower()


def dequantized(
    refs: Mapping[str, Any], config: Mapping[str, Any] | None, where: str | Path
) -> tuple[dict[str, Any], Quantization | None]:
    """`refs` with every fp8 tensor and its scale as one dequantizing ref, scale companions and
    activation scales left out, and what was recognised (None for a checkpoint without scales).
    QuantizationError for packed formats, scales that fit no layout, and scale-like tensors
    next to fp8 tensors that no rule explains: nothing quantized is read as plain numbers."""
    from mmerge.io.dequantize import QuantizedRef

    where = str(where)
    declared = declared_scheme(config, where)
    _refuse_packed(refs, where)
    out = dict(refs)
    fp8 = [n for n, r in refs.items() if r.dtype in FP8]
    layouts: Counter[str] = Counter()
    for name in fp8:
        inv, plain = refs.get(name + SCALE_INV), refs.get(name + SCALE)
        if inv is not None and plain is not None:
            raise QuantizationError(
                f"{where}: fp8 tensor {name!r} has two scales, {inv.name!r} and {plain.name!r}"
            )
        scale = inv if inv is not None else plain
        if scale is None:
            continue
        if scale.dtype not in SCALE_CODES:
            raise QuantizationError(
                f"{where}: scale {scale.name!r} of fp8 tensor {name!r} is {scale.dtype}; "
                f"scales must be {', '.join(SCALE_CODES)}"
            )
        layout = _fit(
            refs[name], scale, declared.scale_inv if scale is inv else declared.scale, where
        )
        out[name] = QuantizedRef(refs[name], scale, layout)
        del out[scale.name]
        layouts[layout.describe()] += 1
    quantized = bool(layouts) or bool(declared.method)
    unscaled = [n for n in fp8 if not isinstance(out[n], QuantizedRef)]
    if unscaled and quantized:
        raise QuantizationError(
            f"{where}: fp8 tensor {unscaled[0]!r} has no scale ({unscaled[0]}{SCALE_INV} or "
            f"{unscaled[0]}{SCALE}) in a quantized checkpoint"
        )
    dropped = []
    for name in list(out):
        if not _scale_like(name) or isinstance(out[name], QuantizedRef):
            continue
        if quantized and name.rsplit(".", 1)[-1] in ACTIVATION_SCALES:
            dropped.append(name)
            del out[name]
            continue
        owner = _owner(name, refs)
        if fp8 or quantized or owner is not None:
            reason = (
                f"belongs to {owner!r}, which is {refs[owner].dtype}, not fp8"
                if owner is not None
                else "sits next to fp8 tensors"
            )
            raise QuantizationError(
                f"{where}: scale-like tensor {name!r} {reason}, and no known rule says how it "
                f"applies; refusing to merge quantized values as plain numbers"
            )
    if not layouts:
        return out, None
    return out, Quantization(
        method=declared.method or "fp8",
        config=declared.config,
        block=declared.block if declared.method else None,
        ue8m0=declared.ue8m0,
        layouts=dict(layouts),
        tensors=sum(layouts.values()),
        dropped=tuple(dropped),
    )


def _owner(name: str, refs: Mapping[str, Any]) -> str | None:
    """The tensor a companion-named scale (`X_scale_inv`, `X_scale`) would belong to."""
    for suffix in (SCALE_INV, SCALE):
        if name.endswith(suffix) and name[: -len(suffix)] in refs:
            return name[: -len(suffix)]
    return None


def _fit(ref: Any, scale: Any, layouts: tuple[Layout, ...], where: str) -> Layout:
    for layout in layouts:
        if layout.fits(tuple(scale.shape), tuple(ref.shape)):
            return layout
    wanted = " or ".join(
        f"{list(layout.grid(tuple(ref.shape))) if layout.kind != 'tensor' else '[1]'} "
        f"({layout.describe()})"
        for layout in layouts
    )
    raise QuantizationError(
        f"{where}: scale {scale.name!r} has shape {list(scale.shape)}, but fp8 tensor "
        f"{ref.name!r} of shape {list(ref.shape)} needs {wanted}"
    )

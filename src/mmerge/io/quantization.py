"""Quantized checkpoints: which tensors are fp8 numbers with scales, read from config.json's
`quantization_config` and the tensor names, and a clear refusal for every other scheme.

A recognised fp8 tensor and its scale become one `QuantizedRef`; the scale companions and the
activation scales leave the checkpoint's mapping. Nothing quantized is handed on as plain
numbers: what no rule here explains is refused (spec/format.md, "Quantized checkpoints").
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmerge.errors import QuantizationError
from mmerge.io.quant_config import INSTEAD, declared_scheme
from mmerge.io.scale_layout import Layout

FP8 = ("F8_E4M3", "F8_E5M2")
SCALE_CODES = ("F32", "BF16", "F16", "F64", "F8_E8M0")
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

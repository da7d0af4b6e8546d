"""What a checkpoint holds: tensors, dtypes, shapes, sizes, quantization, metadata and mmerge
provenance."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from typing import Any

_JSON_KEYS = ("mmerge.parameters", "mmerge.inputs")


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready description of the checkpoint at `path` (headers only; no tensor is read).

    fp8 tensors with scales are listed once, with their stored dtype and scale layout, and
    counted as the dequantized parameters they stand for; a quantization mmerge refuses is
    described with the reason, its tensors listed as stored.
    """
    from mmerge.errors import QuantizationError
    from mmerge.io import open_checkpoint

    refused = None
    try:
        ckpt = open_checkpoint(path)
    except QuantizationError as exc:
        refused = str(exc)
        ckpt = open_checkpoint(path, dequantize=False)
    with ckpt:
        tensors = [_tensor(r) for r in ckpt.values()]
        metadata = dict(ckpt.metadata)
        files = [str(f) for f in ckpt.files]
        quantization = ckpt.quantization.summary() if ckpt.quantization else None
    if quantization is not None:
        quantization["dequantized_parameters"] = sum(
            _numel(t["shape"]) for t in tensors if "scale" in t
        )
    if refused is not None:
        quantization = {"refused": refused}
    provenance = {}
    for key in [k for k in metadata if k.startswith("mmerge.")]:
        value = metadata.pop(key)
        if key in _JSON_KEYS:
            with contextlib.suppress(json.JSONDecodeError):
                value = json.loads(value)
        provenance[key.removeprefix("mmerge.")] = value
    return {
        "path": str(path),
        "files": files,
        "tensors": tensors,
        "total_tensors": len(tensors),
        "total_parameters": sum(_numel(t["shape"]) for t in tensors),
        "total_bytes": sum(t["bytes"] for t in tensors),
        "dtypes": dict(Counter(t["dtype"] for t in tensors)),
        "quantization": quantization,
        "metadata": metadata,
        "provenance": provenance,
    }


def _tensor(ref) -> dict[str, Any]:
    """One tensor's row; a dequantized fp8 tensor also names its scale tensor and layout."""
    from mmerge.io import QuantizedRef

    row = {"name": ref.name, "dtype": ref.dtype, "shape": list(ref.shape), "bytes": ref.nbytes}
    if isinstance(ref, QuantizedRef):
        row["dtype"] = ref.stored_dtype
        row["scale"] = {"name": ref.scale_ref.name, "layout": ref.layout.describe()}
    return row


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def render(info: dict[str, Any]) -> str:
    """The description as a readable table followed by totals, metadata and provenance."""
    from mmerge.cli import human

    rows = [
        (
            t["name"],
            t["dtype"] + (f" + scale ({t['scale']['layout']})" if "scale" in t else ""),
            "x".join(map(str, t["shape"])) or "scalar",
            human(t["bytes"]),
        )
        for t in info["tensors"]
    ]
    widths = [
        max([len(h)] + [len(r[i]) for r in rows])
        for i, h in enumerate(("tensor", "dtype", "shape", "size"))
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("tensor", "dtype", "shape", "size"), widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(info["dtypes"].items()))
    lines += [
        "",
        f"{info['total_tensors']} tensors, {_count(info['total_parameters'])} parameters, "
        f"{human(info['total_bytes'])} ({dtypes}) in {len(info['files'])} file(s)",
    ]
    q = info.get("quantization")
    if q and "refused" in q:
        lines.append(f"quantization: cannot be merged: {q['refused']}")
    elif q:
        layouts = ", ".join(f"{n} with {k}" for k, n in q["layouts"].items())
        scales = ", power-of-two (ue8m0) scales" if q["scale_fmt"] == "ue8m0" else ""
        dropped = (
            f"; {q['dropped_scales']} activation scales left out" if q["dropped_scales"] else ""
        )
        lines.append(
            f"quantization: {q['method']}, {q['quantized_tensors']} fp8 tensors with scales "
            f"({layouts}){scales}{dropped}; merged as fp8 x scale "
            f"({_count(q['dequantized_parameters'])} dequantized parameters)"
        )
    if info["metadata"]:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in info["metadata"].items()))
    if info["provenance"]:
        lines.append("made by mmerge:")
        for k, v in info["provenance"].items():
            lines.append(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    return "\n".join(lines)

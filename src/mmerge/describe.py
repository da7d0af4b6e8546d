"""What a checkpoint holds: tensors, dtypes, shapes, sizes, metadata and mmerge provenance."""

from __future__ import annotations

import contextlib
import json
import os
from collections import Counter
from typing import Any

from mmerge.units import human

_JSON_KEYS = ("mmerge.parameters", "mmerge.inputs")


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON-ready description of the checkpoint at `path` (headers only; no tensor is read)."""
    from mmerge.io import open_checkpoint

    with open_checkpoint(path) as ckpt:
        tensors = [
            {"name": r.name, "dtype": r.dtype, "shape": list(r.shape), "bytes": r.nbytes}
            for r in ckpt.values()
        ]
        metadata = dict(ckpt.metadata)
        files = [str(f) for f in ckpt.files]
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
        "metadata": metadata,
        "provenance": provenance,
    }


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
    rows = [
        (t["name"], t["dtype"], "x".join(map(str, t["shape"])) or "scalar", human(t["bytes"]))
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
    if info["metadata"]:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in info["metadata"].items()))
    if info["provenance"]:
        lines.append("made by mmerge:")
        for k, v in info["provenance"].items():
            lines.append(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
    return "\n".join(lines)

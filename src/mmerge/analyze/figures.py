"""The figures people read (cosines, angles, rates, ratios), derived from summed `Stats`.

A figure that has no meaning for the data (the cosine of a zero task vector, the conflict rate
of two task vectors that never change the same entry, anything touched by NaN or infinite
weights) is None, shown as "n/a" and JSON null.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mmerge.analyze.stats import Stats


def density_key(density: float) -> str:
    """The JSON key of a density: 0.1 -> "0.1"."""
    return f"{density:g}"


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def _cos(dot: float, sq_a: float, sq_b: float) -> float | None:
    if not sq_a > 0 or not sq_b > 0:
        return None
    cos = dot / math.sqrt(sq_a * sq_b)
    return max(-1.0, min(1.0, cos)) if math.isfinite(cos) else None


def figures(st: Stats, labels: Sequence[str]) -> dict:
    """Per fine-tune and per pair of fine-tunes, every figure of `st` as a JSON-ready dict."""
    g = st.gram
    bb = float(g[0, 0])
    sq_task = [float(g[i + 1, i + 1]) for i in range(len(labels))]
    # full weights ft_i = base + task_i, so their dot products follow from the Gram matrix
    base_dot = [bb + float(g[0, i + 1]) for i in range(len(labels))]
    sq_weight = [bb + 2 * float(g[0, i + 1]) + sq_task[i] for i in range(len(labels))]
    models = []
    for i, label in enumerate(labels):
        models.append(
            {
                "model": label,
                "task_norm": math.sqrt(sq_task[i]),
                "relative_change": _ratio(math.sqrt(sq_task[i]), math.sqrt(bb)),
                "base_weight_cos": _cos(base_dot[i], sq_weight[i], bb),
                "kept_energy": {
                    density_key(d): _ratio(float(st.kept[k, i]), sq_task[i])
                    for k, d in enumerate(st.densities)
                },
            }
        )
    pairs = []
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            weight_dot = bb + float(g[0, i + 1] + g[0, j + 1] + g[i + 1, j + 1])
            weight_cos = _cos(weight_dot, sq_weight[i], sq_weight[j])
            pairs.append(
                {
                    "models": [labels[i], labels[j]],
                    "task_cos": _cos(float(g[i + 1, j + 1]), sq_task[i], sq_task[j]),
                    "weight_angle_deg": None
                    if weight_cos is None
                    else math.degrees(math.acos(weight_cos)),
                    "norm_ratio": _ratio(math.sqrt(sq_task[j]), math.sqrt(sq_task[i])),
                    "overlap": _ratio(int(st.both[i, j]), st.numel),
                    "sign_conflict": _ratio(int(st.conflicts[i, j]), int(st.both[i, j])),
                    "sign_conflict_top": {
                        density_key(d): _ratio(
                            int(st.top_conflicts[k, i, j]), int(st.top_both[k, i, j])
                        )
                        for k, d in enumerate(st.densities)
                    },
                }
            )
    return _finite(
        {"numel": st.numel, "base_norm": math.sqrt(bb), "models": models, "pairs": pairs}
    )


def _finite(obj):
    """`obj` with NaN and infinities (from NaN or inf weights) replaced by None, for JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

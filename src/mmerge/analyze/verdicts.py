"""Plain-language findings and a merge-method recommendation, from the figures and the
thresholds stated in spec/analyze.md (keep the two in step)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence

from mmerge.analyze.figures import density_key

BASE_COS_MIN = 0.5  # a fine-tune's weights have cosine >= this with the base's
STRANGER_CHANGE = 0.5  # relative change this large ...
STRANGER_FACTOR = 5.0  # ... and this many times the others' median also marks another base
PARALLEL_COS = 0.9  # task cosine at or above: near-parallel
ORTHOGONAL_COS = 0.2  # |task cosine| below: nearly orthogonal; at or below minus: opposing
HIGH_CONFLICT = 0.4  # sign-conflict rate among entries both keep at the middle density
MIN_OVERLAP = 0.05  # conflicts count only when both fine-tunes change this share of entries
IMBALANCE = 2.0  # larger over smaller task-vector norm
CONCENTRATED = 0.8  # kept energy at the smallest density at or above: concentrated
SPREAD = 0.5  # kept energy at the smallest density below: spread out

STRANGER = "does not share a base with the others"


def _finding(kind: str, severity: str, subject: str, text: str) -> dict:
    return {"kind": kind, "severity": severity, "subject": subject, "text": text}


def pair_name(pair: dict) -> str:
    """'ft1 ~ ft2'."""
    return " ~ ".join(pair["models"])


def middle_density(densities: Sequence[float]) -> float:
    """The density whose top-k sign conflict drives verdicts: the middle one given."""
    return densities[len(densities) // 2]


def strangers(models: Sequence[dict]) -> dict[str, str]:
    """Fine-tunes that do not look like fine-tunes of the base, each with the reason."""
    out = {}
    for m in models:
        cos, change = m["base_weight_cos"], m["relative_change"]
        others = [
            o["relative_change"]
            for o in models
            if o is not m and o["relative_change"] and o["base_weight_cos"] is not None
        ]
        if cos is not None and cos < BASE_COS_MIN:
            out[m["model"]] = (
                f"its weights have cosine {cos:.2f} with the base's "
                f"(fine-tunes of a base stay above {BASE_COS_MIN})"
            )
        elif (
            others
            and change is not None
            and change >= STRANGER_CHANGE
            and change >= STRANGER_FACTOR * statistics.median(others)
        ):
            out[m["model"]] = (
                f"it moved {change:.2f} of the base's norm away, "
                f"{change / statistics.median(others):.0f}x the others"
            )
    return out


def _model_findings(models: Sequence[dict], densities: Sequence[float]) -> list[dict]:
    found = []
    odd = strangers(models)
    low = min(densities)
    for m in models:
        name = m["model"]
        if name in odd:
            found.append(_finding("base", "warning", name, f"{name} {STRANGER}: {odd[name]}"))
            continue
        if m["task_norm"] is None:
            text = f"{name} has NaN or infinite weights: its figures are n/a"
            found.append(_finding("values", "warning", name, text))
            continue
        if not m["task_norm"]:
            found.append(
                _finding("base", "warning", name, f"{name} equals the base: it adds nothing")
            )
            continue
        kept = m["kept_energy"][density_key(low)]
        if kept is None:
            continue
        if kept >= CONCENTRATED:
            found.append(
                _finding(
                    "sparsity",
                    "info",
                    name,
                    f"{name}: its change is concentrated: the top {low:.0%} of entries hold "
                    f"{kept:.0%} of its squared norm, so trimming (ties, dare) loses little",
                )
            )
        elif kept < SPREAD:
            found.append(
                _finding(
                    "sparsity",
                    "info",
                    name,
                    f"{name}: its change is spread out: the top {low:.0%} of entries hold only "
                    f"{kept:.0%} of its squared norm; keep densities high when trimming",
                )
            )
    return found


def _direction(cos: float) -> str:
    if cos >= PARALLEL_COS:
        return "near-parallel: they learned almost the same change"
    if cos >= ORTHOGONAL_COS:
        return "aligned: their changes point the same way"
    if cos > -ORTHOGONAL_COS:
        return "nearly orthogonal: they changed independent directions"
    return "opposing: their changes cancel when averaged"


def _conflict(pair: dict, density: float) -> float | None:
    """The pair's top-k sign-conflict rate at `density`, when the overlap makes it matter."""
    rate = pair["sign_conflict_top"][density_key(density)]
    if rate is None or not pair["overlap"] or pair["overlap"] < MIN_OVERLAP:
        return None
    return rate


def _pair_findings(
    pairs: Sequence[dict], layers: Sequence[dict], density: float, skip: set[str]
) -> list[dict]:
    found = []
    for p, pair in enumerate(pairs):
        name, cos = pair_name(pair), pair["task_cos"]
        if cos is None or skip & set(pair["models"]):
            continue
        severity = "warning" if cos <= -ORTHOGONAL_COS else "info"
        text = f"{name}: task cosine {cos:+.2f}, {_direction(cos)}"
        found.append(_finding("direction", severity, name, text))
        rate = _conflict(pair, density)
        if rate is not None and rate >= HIGH_CONFLICT:
            found.append(
                _finding(
                    "conflict",
                    "warning",
                    name,
                    f"{name}: signs disagree on {rate:.0%} of the entries both keep at density "
                    f"{density:g}; sign election (ties, dare_ties) resolves this",
                )
            )
        else:
            hot = [
                (layer["layer"], r)
                for layer in layers
                if (r := _conflict(layer["pairs"][p], density)) is not None and r >= HIGH_CONFLICT
            ]
            if hot:
                worst = max(hot, key=lambda lr: lr[1])
                where = ", ".join(str(g) for g, _ in hot[:8]) + (" ..." if len(hot) > 8 else "")
                found.append(
                    _finding(
                        "conflict",
                        "warning",
                        name,
                        f"{name}: sign conflict is high in layers {where} "
                        f"(up to {worst[1]:.0%} in {worst[0]})",
                    )
                )
        ratio = pair["norm_ratio"]
        if ratio and max(ratio, 1 / ratio) >= IMBALANCE:
            big, small = pair["models"] if ratio < 1 else pair["models"][::-1]
            found.append(
                _finding(
                    "balance",
                    "warning",
                    name,
                    f"{name}: {big}'s task vector is {max(ratio, 1 / ratio):.1f}x the size of "
                    f"{small}'s and will dominate a sum; set per-model weights to balance them",
                )
            )
    return found


def recommend(models: Sequence[dict], pairs: Sequence[dict], densities: Sequence[float]) -> dict:
    """The methods to try and why, from the pairs of fine-tunes that share the base."""
    odd = set(strangers(models))
    keep = [m["model"] for m in models if m["model"] not in odd and m["task_norm"] != 0]
    pairs = [p for p in pairs if set(p["models"]) <= set(keep)]
    prefix = f"leave out {', '.join(sorted(odd))} (it {STRANGER}); then " if odd else ""
    density = middle_density(densities)
    cos = [p["task_cos"] for p in pairs if p["task_cos"] is not None]
    rates = [r for p in pairs if (r := _conflict(p, density)) is not None]
    if len(keep) < 2 or not cos:
        methods = ["linear", "slerp"]
        why = "one fine-tune: nothing to interfere; interpolate between base and fine-tune"
    elif min(cos) >= PARALLEL_COS:
        methods = ["linear"]
        why = f"near-parallel task vectors (cosine >= {PARALLEL_COS}): a plain average is enough"
    elif min(cos) <= -ORTHOGONAL_COS or (rates and max(rates) >= HIGH_CONFLICT):
        methods = ["ties", "dare_ties"]
        why = (
            f"opposing task vectors (cosine {min(cos):+.2f})"
            if min(cos) <= -ORTHOGONAL_COS
            else f"high sign conflict ({max(rates):.0%} >= {HIGH_CONFLICT:.0%})"
        ) + ": sign election keeps one direction per entry"
    elif max(abs(c) for c in cos) < ORTHOGONAL_COS:
        methods = ["task_arithmetic", "ties"]
        why = (
            "nearly orthogonal task vectors with few sign conflicts: adding them interferes little"
        )
    else:
        methods = ["task_arithmetic", "slerp" if len(keep) == 2 else "linear"]
        why = "aligned task vectors with few sign conflicts: add or interpolate them"
    ratios = [max(r, 1 / r) for p in pairs if (r := p["norm_ratio"])]
    if ratios and max(ratios) >= IMBALANCE:
        why += f"; task vectors differ up to {max(ratios):.1f}x in size: set per-model weights"
    return {"methods": methods, "text": f"{prefix}{' or '.join(methods)}: {why}"}


def assess(
    overall: dict, layers: Sequence[dict], densities: Sequence[float]
) -> tuple[list[dict], dict]:
    """Findings (warnings first) and the recommendation for a whole analysis."""
    found = _model_findings(overall["models"], densities)
    odd = set(strangers(overall["models"]))
    found += _pair_findings(overall["pairs"], layers, middle_density(densities), odd)
    found.sort(key=lambda f: f["severity"] != "warning")
    return found, recommend(overall["models"], overall["pairs"], densities)

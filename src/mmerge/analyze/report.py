"""The terminal summary of an analysis: models, pairs, worst layers first, findings, and the
recommendation line."""

from __future__ import annotations

from collections.abc import Sequence

from mmerge.analyze.figures import density_key
from mmerge.analyze.result import AnalysisResult
from mmerge.analyze.verdicts import middle_density, pair_name, strangers

MAX_LAYERS = 12  # layer rows shown; --json has them all


def _num(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else format(value, fmt)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Left-aligned first column, right-aligned others, two spaces apart, indented."""
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    lines = []
    for r in [header, *rows]:
        cells = [r[0].ljust(widths[0])] + [r[c].rjust(widths[c]) for c in range(1, len(r))]
        lines.append("  " + "  ".join(cells).rstrip())
    return lines


def related(layer: dict, odd: set[str]) -> tuple[list[dict], list[dict]]:
    """A layer's figures for fine-tunes that share the base: (models, pairs)."""
    models = [m for m in layer["models"] if m["model"] not in odd] or layer["models"]
    pairs = [p for p in layer["pairs"] if not odd & set(p["models"])]
    return models, pairs


def worst_first(result: AnalysisResult) -> list[dict]:
    """Layer groups ordered from most to least interference: highest top-k sign conflict, then
    lowest task cosine, over pairs of fine-tunes that share the base (with one such fine-tune:
    largest change from the base)."""
    odd = set(strangers(result.overall["models"]))
    key = density_key(middle_density(result.densities))

    def badness(layer: dict) -> tuple[float, float]:
        models, pairs = related(layer, odd)
        if not pairs:
            return (max((m["relative_change"] or 0.0) for m in models), 0.0)
        conflict = max((p["sign_conflict_top"][key] or 0.0) for p in pairs)
        cos = min((p["task_cos"] if p["task_cos"] is not None else 1.0) for p in pairs)
        return (conflict, -cos)

    return sorted(result.layers, key=badness, reverse=True)


def _layer_row(layer: dict, key: str, odd: set[str], with_pairs: bool) -> list[str]:
    models, pairs = related(layer, odd)
    cos = [p["task_cos"] for p in pairs if p["task_cos"] is not None]
    conf = [p["sign_conflict"] for p in pairs if p["sign_conflict"] is not None]
    top = [p["sign_conflict_top"][key] for p in pairs if p["sign_conflict_top"][key] is not None]
    change = [m["relative_change"] for m in models if m["relative_change"] is not None]
    row = [str(layer["layer"])]
    if with_pairs:
        row += [
            _num(min(cos) if cos else None, "+.3f"),
            _num(max(conf) if conf else None, ".2f"),
            _num(max(top) if top else None, ".2f"),
        ]
    return [*row, _num(max(change) if change else None, ".4f")]


def render(result: AnalysisResult) -> str:
    """The human-readable summary printed by `mmerge analyze`."""
    o = result.overall
    key = density_key(middle_density(result.densities))
    top_label = f"top {float(key):.0%}"
    lines = [
        f"mmerge analyze: {len(result.models)} fine-tune{'s' if len(result.models) > 1 else ''} "
        f"of {result.base}, "
        f"{len(result.tensors)} tensors, {o['numel']:,} entries each",
        "",
        "Fine-tunes (task vector = fine-tune - base)",
    ]
    paths = {m["model"]: m["path"] for m in result.models}
    rows = [
        [
            m["model"],
            _num(m["task_norm"], ".4g"),
            _num(m["relative_change"], ".4f"),
            _num(m["base_weight_cos"], ".4f"),
            paths[m["model"]],
        ]
        for m in o["models"]
    ]
    lines += _table(["model", "task norm", "change vs base", "cos with base", "path"], rows)
    if o["pairs"]:
        lines += ["", "Pairs"]
        rows = [
            [
                pair_name(p),
                _num(p["task_cos"], "+.3f"),
                _num(p["weight_angle_deg"], ".2f"),
                _num(p["sign_conflict"], ".2f"),
                _num(p["sign_conflict_top"][key], ".2f"),
                _num(p["overlap"], ".2f"),
                _num(p["norm_ratio"], ".2f"),
            ]
            for p in o["pairs"]
        ]
        header = ["pair", "task cos", "angle (deg)", "conflict", top_label, "overlap", "ratio"]
        lines += _table(header, rows)
    odd = set(strangers(o["models"]))
    with_pairs = bool(related(o, odd)[1])
    layers = worst_first(result)
    shown = layers[:MAX_LAYERS]
    title = "Layers, worst first" + (" (worst pair per layer)" if with_pairs else "")
    if odd:
        title += f", without {', '.join(sorted(odd))}"
    lines += ["", title]
    header = ["layer", "task cos", "conflict", top_label] if with_pairs else ["layer"]
    rows = [_layer_row(g, key, odd, with_pairs) for g in shown]
    lines += _table([*header, "change"], rows)
    if len(layers) > len(shown):
        lines.append(f"  ... {len(layers) - len(shown)} more layers in --json and --plot")
    lines += ["", "Findings"]
    lines += [
        f"  {'!' if f['severity'] == 'warning' else '-'} {f['text']}" for f in result.findings
    ] or ["  - nothing unusual"]
    lines += ["", f"Recommendation: {result.recommendation['text']}"]
    return "\n".join(lines)

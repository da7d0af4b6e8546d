"""Per-layer pictures of an analysis (matplotlib, the optional `plot` extra, imported lazily)."""

from __future__ import annotations

import os

from mmerge.analyze.figures import density_key
from mmerge.analyze.result import AnalysisResult
from mmerge.analyze.verdicts import BASE_COS_MIN, HIGH_CONFLICT, middle_density, strangers
from mmerge.errors import MmergeError

HEATMAP_PAIRS = 6  # more pairs than this are drawn as heatmaps rather than lines


def pyplot():
    """matplotlib.pyplot with the Agg backend, or a clear error saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise MmergeError('--plot needs matplotlib: pip install "mmerge[plot]"') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _pair_panel(ax, series: dict[str, list[float]], lo: float, line: dict) -> None:
    """Lines per pair over layers (with a reference line `line`, axhline keywords), or a
    heatmap (pairs x layers) when there are many pairs."""
    if len(series) > HEATMAP_PAIRS:
        image = ax.imshow(list(series.values()), aspect="auto", cmap="coolwarm", vmin=lo, vmax=1)
        ax.set_yticks(range(len(series)), list(series), fontsize=7)
        ax.figure.colorbar(image, cax=ax.inset_axes([1.01, 0, 0.015, 1]))
        return
    for label, values in series.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=label)
    ax.axhline(**line, linewidth=0.6)
    ax.set_ylim(lo - 0.05, 1.05)
    ax.legend(fontsize=7, loc="best")


def plot(result: AnalysisResult, path: str | os.PathLike) -> None:
    """Write a PNG with per-layer curves (or heatmaps): task cosine and sign conflict for each
    pair of fine-tunes, and each fine-tune's change relative to the base."""
    plt = pyplot()
    layers = result.layers
    names = [str(g["layer"]) for g in layers]
    odd = set(strangers(result.overall["models"]))
    key = density_key(middle_density(result.densities))
    pairs = [" ~ ".join(p["models"]) for p in result.overall["pairs"]]
    panels = 3 if pairs else 1
    fig, axes = plt.subplots(panels, 1, figsize=(max(7.0, 0.28 * len(names) + 3), 3 * panels))
    axes = list(axes) if panels > 1 else [axes]
    if pairs:
        cos = {
            name: [_nan(g["pairs"][i]["task_cos"]) for g in layers] for i, name in enumerate(pairs)
        }
        _pair_panel(axes[0], cos, -1.0, {"y": 0, "color": "grey"})
        axes[0].set_title("task-vector cosine per layer (1 parallel, 0 orthogonal, -1 opposing)")
        conflict = {
            f"{name} (top {float(key):.0%})": [
                _nan(g["pairs"][i]["sign_conflict_top"][key]) for g in layers
            ]
            for i, name in enumerate(pairs)
        }
        _pair_panel(axes[1], conflict, 0.0, {"y": HIGH_CONFLICT, "color": "red", "linestyle": "--"})
        axes[1].set_title(
            f"sign conflict among entries both keep at density {key} (high: {HIGH_CONFLICT})"
        )
    ax = axes[-1]
    changes = []
    for m, model in enumerate(result.overall["models"]):
        values = [_nan(g["models"][m]["relative_change"]) for g in layers]
        changes += [v for v in values if v > 0]
        note = f" (weights' cos with base < {BASE_COS_MIN}: another base)"
        label = model["model"] + (note if model["model"] in odd else "")
        ax.plot(range(len(layers)), values, marker="o", markersize=3, label=label)
    if changes and max(changes) > 20 * min(changes):
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    ax.set_title("change from the base per layer: ||fine-tune - base|| / ||base||")
    ax.legend(fontsize=7, loc="best")
    for ax in axes:
        ax.set_xticks(range(len(names)), names, fontsize=7, rotation=90 if len(names) > 40 else 0)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("layer")
    fig.suptitle(f"mmerge analyze: fine-tunes of {result.base}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)

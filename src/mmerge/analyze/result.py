"""The outcome of `analyze`: every figure, the findings and the recommendation."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AnalysisResult:
    """Figures for the whole model (`overall`), per layer group and per tensor; each holds
    `models` (one entry per fine-tune) and `pairs` (one per pair of fine-tunes)."""

    base: str
    models: list[dict]
    densities: tuple[float, ...]
    overall: dict
    layers: list[dict]
    tensors: list[dict]
    findings: list[dict]
    recommendation: dict

    def to_json(self) -> dict:
        """A plain dict for `json.dumps` (numbers, strings, lists, None)."""
        return {
            "base": self.base,
            "models": self.models,
            "densities": list(self.densities),
            "overall": self.overall,
            "layers": self.layers,
            "tensors": self.tensors,
            "findings": self.findings,
            "recommendation": self.recommendation,
        }

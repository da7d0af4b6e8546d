"""The search space: a recipe in which numbers are replaced by `{search: [low, high]}` ranges.

Every range becomes one dimension (or `layer_groups` dimensions spread over the layers as a
gradient), searched on [0, 1] and mapped linearly onto [low, high]. A point of the space turns
back into an ordinary recipe that `mmerge run` accepts. No Optuna here.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmerge.errors import InvalidInput

SEARCH_KEYS = {"layer_groups"}
MODEL_KEYS = ("base_model", "model")


class SearchError(InvalidInput):
    """A search recipe that cannot be searched as written."""


@dataclass(frozen=True)
class Range:
    """One `{search: [low, high]}` in the recipe: where it stands and how many groups it spans."""

    name: str  # readable location, e.g. "models[0].weight" or "t[filter=mlp]"
    path: tuple  # keys and indices leading to it in the recipe
    low: float
    high: float
    groups: int  # 1: one number; G > 1: a gradient of G numbers over the layers

    def dimensions(self) -> list[str]:
        """The names of this range's dimensions in the study."""
        if self.groups == 1:
            return [self.name]
        return [f"{self.name}@{g}" for g in range(self.groups)]

    def value(self, unit: float) -> float:
        """The recipe number for a point `unit` in [0, 1]."""
        return self.low + min(max(unit, 0.0), 1.0) * (self.high - self.low)

    def unit(self, value: float) -> float:
        """The point in [0, 1] for a recipe number (clipped into the range)."""
        return min(max((value - self.low) / (self.high - self.low), 0.0), 1.0)


@dataclass(frozen=True)
class Baseline:
    """A point enqueued before the search, so the study shows what the search gained."""

    label: str
    unit: dict[str, float]


class SearchSpace:
    """A recipe template with ranges, turned into points on [0, 1]^d and back into recipes."""

    def __init__(self, template: dict, ranges: list[Range], layer_groups: int) -> None:
        self.template, self.ranges, self.layer_groups = template, ranges, layer_groups

    @property
    def dimensions(self) -> list[str]:
        return [d for r in self.ranges for d in r.dimensions()]

    def values(self, unit: Mapping[str, float]) -> dict[str, float]:
        """Each dimension's recipe number for a point."""
        return {d: r.value(unit[d]) for r in self.ranges for d in r.dimensions()}

    def recipe(self, unit: Mapping[str, float]) -> dict:
        """The runnable recipe at a point: every range replaced by its number (or gradient)."""
        out = copy.deepcopy(self.template)
        for r in self.ranges:
            numbers = [r.value(unit[d]) for d in r.dimensions()]
            _set(out, r.path, numbers[0] if r.groups == 1 else numbers)
        return out

    def corner(self, unit: float) -> dict[str, float]:
        """The point with every dimension at `unit` (0: all lows, 0.5: midpoint, 1: all highs)."""
        return {d: unit for d in self.dimensions}

    def baselines(self) -> list[Baseline]:
        """The recipe's midpoint, uniform weights, and each fine-tune alone (where expressible)."""
        out = [Baseline("midpoint", self.corner(0.5))]
        weights = self._weight_ranges()
        if len(weights) >= 2:
            share = 1.0 / len(weights)
            if all(r.low <= share <= r.high for r in weights.values()):
                out.append(Baseline("uniform weights", self._with(weights, lambda _i: share)))
            if all(r.low <= 0.0 <= r.high for r in weights.values()):
                for i, (label, r) in enumerate(weights.items()):
                    alone = min(max(1.0, r.low), r.high)
                    out.append(
                        Baseline(
                            f"{label} alone",
                            self._with(weights, lambda j, i=i, a=alone: a if j == i else 0.0),
                        )
                    )
        unique: dict[tuple, Baseline] = {}
        for b in out:
            key = tuple(round(b.unit[d], 12) for d in self.dimensions)
            if key in unique:  # the same point under two names: one trial, both names
                b = Baseline(f"{unique[key].label} = {b.label}", unique[key].unit)
            unique[key] = b
        return list(unique.values())

    def _weight_ranges(self) -> dict[str, Range]:
        """Searched per-model weights by model label, when every merged model has one."""
        models = self.template.get("models")
        if not isinstance(models, list):
            return {}
        base = self.template.get("base_model")
        merged = [
            (i, e)
            for i, e in enumerate(models)
            if isinstance(e, Mapping) and e.get("model") != base
        ]
        by_path = {r.path: r for r in self.ranges}
        found = [by_path.get(("models", i, "parameters", "weight")) for i, _ in merged]
        if not merged or any(r is None for r in found):
            return {}
        labels = [Path(str(e.get("model"))).name for _, e in merged]
        if len(set(labels)) < len(labels):
            labels = [f"models[{i}]" for i, _ in merged]
        return dict(zip(labels, found))

    def _with(self, weights: dict[str, Range], value_of) -> dict[str, float]:
        unit = self.corner(0.5)
        for i, r in enumerate(weights.values()):
            for d in r.dimensions():
                unit[d] = r.unit(value_of(i))
        return unit

    def describe(self) -> dict:
        """Everything needed to rebuild the space: stored with the study, compared on resume."""
        return {
            "template": self.template,
            "layer_groups": self.layer_groups,
            "ranges": [
                {"name": r.name, "path": list(r.path), "low": r.low, "high": r.high}
                for r in self.ranges
            ],
        }

    @classmethod
    def from_description(cls, data: Mapping[str, Any]) -> SearchSpace:
        groups = int(data["layer_groups"])
        ranges = [
            Range(
                r["name"],
                tuple(r["path"]),
                float(r["low"]),
                float(r["high"]),
                groups if _whole_value(r["path"]) else 1,
            )
            for r in data["ranges"]
        ]
        return cls(copy.deepcopy(data["template"]), ranges, groups)

    def signature(self) -> str:
        return json.dumps(self.describe(), sort_keys=True)


def load_search(source: str | os.PathLike | Mapping[str, Any]) -> SearchSpace:
    """Read a search recipe (a YAML path or a dict) and find its ranges; model paths become
    absolute, so the recipes it yields run from any folder."""
    if isinstance(source, Mapping):
        data, root = copy.deepcopy(dict(source)), Path.cwd()
    else:
        import yaml

        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise SearchError(f"search recipe {path} does not exist") from None
        except yaml.YAMLError as exc:
            raise SearchError(
                f"search recipe {path} is not valid YAML: {exc}".splitlines()[0]
            ) from None
        if not isinstance(data, dict):
            raise SearchError(f"search recipe {path} must be a mapping of keys")
        root = path.parent
    block = data.pop("search", None) or {}
    if not isinstance(block, Mapping):
        raise SearchError(f"search: expected a mapping such as {{layer_groups: 4}}, got {block!r}")
    extra = sorted(set(block) - SEARCH_KEYS)
    if extra:
        raise SearchError(f"search: unsupported key {extra[0]!r} (supported: layer_groups)")
    groups = block.get("layer_groups", 1)
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise SearchError(f"search: layer_groups must be a whole number >= 1, got {groups!r}")
    _absolute_models(data, root)
    ranges: list[Range] = []
    _find(data, (), "", ranges, groups)
    if not ranges:
        raise SearchError("the search recipe has no {search: [low, high]} range: nothing to search")
    return SearchSpace(data, ranges, groups)


def _find(node: Any, path: tuple, name: str, out: list[Range], groups: int) -> None:
    if isinstance(node, Mapping):
        if "search" in node:
            out.append(_range(node, path, name or "recipe", groups))
            return
        filter_entry = _is_filter_entry(node)
        for key, value in node.items():
            skip = key == "parameters" or (filter_entry and key == "value")
            _find(value, (*path, key), name if skip else _join(name, key), out, groups)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            tag = i
            if _is_filter_entry(value):
                tag = value.get("filter") or "*"
            _find(value, (*path, i), f"{name}[{tag}]", out, groups)


def _is_filter_entry(node: Any) -> bool:
    return isinstance(node, Mapping) and "value" in node and set(node) <= {"filter", "value"}


def _join(name: str, key: Any) -> str:
    return f"{name}.{key}" if name else str(key)


def _range(node: Mapping, path: tuple, name: str, groups: int) -> Range:
    extra = sorted(set(node) - {"search"})
    if extra:
        raise SearchError(f"{name}: unexpected key {extra[0]!r} beside 'search'")
    bounds = node["search"]
    ok = (
        isinstance(bounds, list)
        and len(bounds) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds)
        and all(math.isfinite(v) for v in bounds)
        and bounds[0] < bounds[1]
    )
    if not ok:
        raise SearchError(
            f"{name}: a search range is {{search: [low, high]}} with two finite numbers and "
            f"low < high, got {bounds!r}"
        )
    whole = _whole_value(path)
    if groups > 1 and not whole:
        raise SearchError(
            f"{name}: a range inside a gradient list cannot be spread over layer groups; "
            "search the whole parameter instead"
        )
    return Range(name, path, float(bounds[0]), float(bounds[1]), groups if whole else 1)


def _whole_value(path) -> bool:
    """True when the range stands for a whole parameter value (not one entry of a gradient)."""
    return not path or not isinstance(path[-1], int)


def _set(node: Any, path: tuple, value: Any) -> None:
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _absolute_models(recipe: dict, root: Path) -> None:
    """Model paths resolved as `mmerge run` resolves them (as given, else beside the recipe)."""

    def resolve(value: Any) -> Any:
        if not isinstance(value, str):
            return value
        for candidate in (Path(value), root / value):
            if candidate.exists():
                return str(candidate.resolve())
        return value

    if "base_model" in recipe:
        recipe["base_model"] = resolve(recipe["base_model"])
    entries = [e for e in recipe.get("models") or [] if isinstance(e, dict)]
    for sl in recipe.get("slices") or []:
        if isinstance(sl, dict) and isinstance(sl.get("sources"), list):
            entries += [e for e in sl["sources"] if isinstance(e, dict)]
    for entry in entries:
        if "model" in entry:
            entry["model"] = resolve(entry["model"])

"""Parameter values that vary by tensor: gradients over layers and tensor-name filters.

A value in a recipe is one of (mergekit's schema):
- a scalar: the same for every tensor;
- a list of numbers: a gradient, spread piecewise-linearly over the layers of the merge (or of
  each slice, where layers are stacked) from the first value to the last; tensors outside
  layers take the first value;
- a list of booleans or strings: one step each, the layers divided evenly among them;
- a list of {filter: SUBSTRING, value: V} entries (or one such entry alone): the first entry
  whose filter occurs in the tensor name gives V, itself any of these. An entry without a
  filter, or with the filter "*", matches every tensor.
"""

from __future__ import annotations

import math
from typing import Any

from mmerge.errors import InvalidInput

Setting = Any


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_step(v: object) -> bool:
    return isinstance(v, (bool, str))


def _entries(value: Setting) -> list[dict] | None:
    """The filter entries of a setting (a lone entry counts as a list of one), or None."""
    if isinstance(value, dict):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return value
    return None


def validate_setting(key: str, value: Setting) -> None:
    """A clear error for a setting whose shape is none of scalar, gradient or filter list."""
    if isinstance(value, (int, float, bool, str)) or value is None:
        return
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return
    if isinstance(value, list) and value and all(_is_step(v) for v in value):
        return
    entries = _entries(value)
    if entries is not None:
        for entry in entries:
            extra = set(entry) - {"filter", "value"}
            if "value" not in entry or extra:
                raise InvalidInput(
                    f"parameter {key!r}: each filter entry needs 'value' (and optionally "
                    f"'filter'), got keys {sorted(entry)}"
                )
            validate_setting(key, entry["value"])
        return
    raise InvalidInput(
        f"parameter {key!r}: expected a number, a list of numbers (gradient) or a list of "
        f"{{filter, value}} entries, got {value!r}"
    )


def position(layer: int | None, n_layers: int) -> float:
    """Where a layer sits in [0, 1] among `n_layers` (mergekit's rule: a lone layer is at 1;
    a tensor outside layers at 0)."""
    if layer is None:
        return 0.0
    if n_layers <= 1:
        return 1.0
    return min(max(layer / (n_layers - 1), 0.0), 1.0)


def _matches(pattern: object, tensor_name: str) -> bool:
    return pattern is None or pattern == "*" or str(pattern) in tensor_name


def evaluate(value: Setting, tensor_name: str, layer: int | None, n_layers: int) -> Any:
    """The value of a setting for one tensor; None when no filter entry matches it."""
    entries = _entries(value)
    if entries is not None:
        for entry in entries:
            if _matches(entry.get("filter"), tensor_name):
                return evaluate(entry["value"], tensor_name, layer, n_layers)
        return None
    if isinstance(value, list):
        pos = position(layer, n_layers) * (len(value) - 1)
        if not all(_is_number(v) for v in value):
            return value[int(pos)]
        lo = math.floor(pos)
        hi = min(lo + 1, len(value) - 1)
        frac = pos - lo
        return (1 - frac) * value[lo] + frac * value[hi] if frac else value[lo]
    return value


def evaluate_all(
    settings: dict[str, Setting], tensor_name: str, layer: int | None, n_layers: int
) -> dict[str, Any]:
    """Every setting evaluated for one tensor; settings that evaluate to None are left out."""
    out = {}
    for key, value in settings.items():
        v = evaluate(value, tensor_name, layer, n_layers)
        if v is not None:
            out[key] = v
    return out

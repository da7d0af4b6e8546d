"""Parameter values that vary by tensor: gradients over layers and tensor-name filters.

A value in a recipe is one of (mergekit's schema):
- a scalar: the same for every tensor;
- a list of numbers: a gradient, spread piecewise-linearly over the layer index from the first
  layer (first value) to the last layer (last value); tensors outside layers take the first value;
- a list of {filter: SUBSTRING, value: V} entries: the first entry whose filter occurs in the
  tensor name (an entry without a filter matches every tensor) gives V, itself any of these.
"""

from __future__ import annotations

import math
from typing import Any

from mmerge.errors import InvalidInput

Setting = Any


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_setting(key: str, value: Setting) -> None:
    """A clear error for a setting whose shape is none of scalar, gradient or filter list."""
    if isinstance(value, (int, float, bool, str)) or value is None:
        return
    if isinstance(value, list) and value and all(_is_number(v) for v in value):
        return
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
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


def evaluate(value: Setting, tensor_name: str, layer: int | None, n_layers: int) -> Any:
    """The value of a setting for one tensor."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for entry in value:
            pattern = entry.get("filter")
            if pattern is None or str(pattern) in tensor_name:
                return evaluate(entry["value"], tensor_name, layer, n_layers)
        return None
    if isinstance(value, list):
        if len(value) == 1 or layer is None or n_layers <= 1:
            return value[0]
        pos = min(max(layer / (n_layers - 1), 0.0), 1.0) * (len(value) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(value) - 1)
        frac = pos - lo
        return (1 - frac) * value[lo] + frac * value[hi]
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

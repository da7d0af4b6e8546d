"""The table of merge methods: names, parameters, bounds, and the checks every call shares.

Each method body is pure math on compute-dtype arrays of one namespace. `MethodSpec.__call__`
does the rest once for all of them: counts models, requires a base, checks shapes, libraries
and devices, validates parameters against their declared bounds, widens 16-bit floats to
float32, and rounds the result back to the inputs' dtype.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmerge import backend
from mmerge.errors import InvalidInput, UnknownMethod

Array = Any


@dataclass(frozen=True)
class Param:
    """One method parameter: its type, default and valid range.

    `per_model` parameters (weight, density, ...) take one value for all models or a sequence
    with one value per model; the method body always receives a tuple, one value per model.
    Bounds are inclusive unless `low_open`/`high_open`.
    """

    name: str
    kind: type
    default: Any
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None
    per_model: bool = False
    synonyms: tuple[tuple[Any, Any], ...] = ()  # other spellings accepted: (given, meant)

    def range_text(self) -> str:
        """The valid range as a person reads it, e.g. '(0, 1]' or 'one of l1, none'."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.low is None and self.high is None:
            return ""
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def check(self, value: Any, method: str) -> Any:
        """`value` converted to this parameter's type, or a clear error naming the problem."""
        where = f"{method}: parameter {self.name!r}"
        for given, meant in self.synonyms:
            if type(value) is type(given) and value == given:
                value = meant
                break
        if self.kind is bool:
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
                value = value.lower() in ("true", "1")
            if not isinstance(value, bool):
                raise InvalidInput(f"{where} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            value = str(value)
            if self.choices and value not in self.choices:
                raise InvalidInput(f"{where} must be {self.range_text()}, got {value!r}")
            return value
        try:
            if isinstance(value, bool):
                raise TypeError
            num = self.kind(value)
            if self.kind is int and isinstance(value, float) and not value.is_integer():
                raise ValueError  # not float(value) == num: floats cannot hold every int64
        except (TypeError, ValueError):
            raise InvalidInput(f"{where} must be a number, got {value!r}") from None
        if self.kind is float and not math.isfinite(num):
            raise InvalidInput(f"{where} must be finite, got {value!r}")
        too_low = self.low is not None and (num <= self.low if self.low_open else num < self.low)
        too_high = self.high is not None and (
            num >= self.high if self.high_open else num > self.high
        )
        if too_low or too_high:
            raise InvalidInput(f"{where} must be in {self.range_text()}, got {value!r}")
        return num


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: the body plus everything needed to call it correctly."""

    name: str
    body: Callable[..., Array]
    description: str
    params: tuple[Param, ...] = ()
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    elementwise: bool = False  # output element i depends only on input elements i
    random: bool = False  # uses `seed` and the tensor name (DARE, DELLA)
    reference: str = ""
    aliases: tuple[str, ...] = field(default=())
    # prepare(xp, delta_i, i, **resolved) -> Survivors: model i's trim decided from its whole
    # task vector, so the engine can merge a large tensor chunk by chunk (TIES, DARE, ...).
    prepare: Callable[..., Any] | None = None
    # sums(xp, tensors, base=..., **resolved) -> tuple of floats: the whole-tensor statistics a
    # method needs, additive over chunks made of whole SUM_BLOCKs (slerp's norms and dot)
    sums: Callable[..., tuple[float, ...]] | None = None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve(self, n_models: int, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults filled in, values checked, per-model values expanded to one per model."""
        params = dict(params or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(params) - known)
        if unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidInput(
                f"{self.name}: unknown parameter {unknown[0]!r} (parameters: {allowed})"
            )
        out: dict[str, Any] = {}
        for p in self.params:
            value = params.get(p.name, p.default)
            if p.per_model:
                if isinstance(value, (list, tuple)):
                    if len(value) != n_models:
                        raise InvalidInput(
                            f"{self.name}: {p.name!r} has {len(value)} values for {n_models} models"
                        )
                    out[p.name] = tuple(p.check(v, self.name) for v in value)
                else:
                    out[p.name] = (p.check(value, self.name),) * n_models
            elif value is None and p.default is None:
                out[p.name] = None
            else:
                out[p.name] = p.check(value, self.name)
        return out

    def check_count(self, n_models: int, has_base: bool) -> None:
        """A clear error when the number of models or the presence of a base is wrong."""
        if self.needs_base and not has_base:
            raise InvalidInput(f"{self.name} needs a base model (--base)")
        if n_models < self.min_models:
            raise InvalidInput(
                f"{self.name} needs at least {self.min_models} model(s), got {n_models}"
            )
        if self.max_models is not None and n_models > self.max_models:
            raise InvalidInput(
                f"{self.name} takes at most {self.max_models} model(s), got {n_models}"
            )

    def __call__(
        self,
        tensors: Sequence[Array],
        *,
        base: Array | None = None,
        tensor_name: str = "",
        prepared: list | None = None,
        start: int = 0,
        **params: Any,
    ) -> Array:
        """Merge `tensors` (one per model) into one array of the same library, device, dtype.

        `prepared` (from `prepare`) and `start` let a chunk of a larger tensor be merged: the
        inputs are its flat entries start .. start+n-1.
        """
        tensors = list(tensors)
        self.check_count(len(tensors), base is not None)
        resolved = self.resolve(len(tensors), params)
        everything = tensors + ([base] if base is not None else [])
        if any(backend.is_numpy_bfloat16(a) for a in everything):
            return _via_float32_host(self, tensors, base, tensor_name, params)
        xp = backend.namespace(*everything)
        backend.same_shapes(everything, f"{self.name}: input tensors")
        out_dtype = tensors[0].dtype
        if any(a.dtype != out_dtype for a in everything):
            listed = ", ".join(str(a.dtype) for a in everything)
            raise InvalidInput(f"{self.name}: input tensors have different dtypes: {listed}")
        work = [backend.as_compute(xp, a) for a in tensors]
        work_base = None if base is None else backend.as_compute(xp, base)
        if self.random:
            resolved["tensor_name"] = tensor_name
        if prepared is not None:
            resolved.update(prepared=prepared, start=start)
        result = self.body(xp, work, base=work_base, **resolved)
        return result if result.dtype == out_dtype else xp.astype(result, out_dtype)


def _via_float32_host(spec, tensors, base, tensor_name, params):
    """ml_dtypes bfloat16 numpy arrays: merge in float32, round back to bfloat16 once."""
    import numpy as np

    widen = backend.host_bfloat16_to_float32
    if not all(
        backend.is_numpy_bfloat16(a) for a in tensors + ([base] if base is not None else [])
    ):
        raise InvalidInput(f"{spec.name}: input tensors have different dtypes")
    merged = spec(
        [widen(a) for a in tensors],
        base=None if base is None else widen(base),
        tensor_name=tensor_name,
        **params,
    )
    return backend.host_float32_to_bfloat16(np.asarray(merged))


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, description: str, **info: Any) -> Callable[[Callable], MethodSpec]:
    """Decorator: add a method body to the registry under `name`; returns the MethodSpec."""

    def add(body: Callable) -> MethodSpec:
        spec = MethodSpec(name=name, body=body, description=description, **info)
        for key in (name, *spec.aliases):
            if key in REGISTRY:
                raise RuntimeError(f"method {key!r} registered twice")
            REGISTRY[key] = spec
        return spec

    return add


def get(name: str) -> MethodSpec:
    """The method called `name` (or one of its aliases); a suggestion when it is misspelt."""
    from mmerge import methods  # noqa: F401  (importing registers every method)

    key = name.strip().lower().replace("-", "_")
    if key in REGISTRY:
        return REGISTRY[key]
    close = difflib.get_close_matches(key, REGISTRY, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownMethod(f"unknown merge method {name!r}{hint} (see `mmerge methods`)")


def all_methods() -> list[MethodSpec]:
    """Every registered method once (aliases folded), in registration order."""
    from mmerge import methods  # noqa: F401

    seen: dict[str, MethodSpec] = {}
    for spec in REGISTRY.values():
        seen.setdefault(spec.name, spec)
    return list(seen.values())

"""The table of merge methods: names, parameters, bounds, and the checks every call shares.

Each method is its streaming form (`contract`: passes and an apply over chunks of compute-dtype
arrays of one namespace). `MethodSpec.__call__` runs it on whole arrays: counts models, requires
or refuses a base, checks shapes, libraries and devices, validates parameters against their
declared bounds, widens 16-bit floats to float32, and rounds the result back to the inputs'
dtype. The engine runs the same form chunk by chunk over checkpoints.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmerge import backend
from mmerge.errors import InvalidInput, UnknownMethod
from mmerge.methods.contract import Chunk, Job, run_whole

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


BASES = ("none", "required", "optional", "endpoint")


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: its streaming form (see `contract`) plus everything needed to
    call it correctly and to test it.

    `base`: "none" (refused), "required", "optional" (task vectors when given) or "endpoint"
    (the base is the first of the models, slerp-style: `min_models`/`max_models` then count it).
    The properties below are spec/methods.md's promises, which the conformance suite checks:
    `symmetric` (model order does not matter), `exact` (bit-identical on every backend),
    `self_merge` (with these parameters, merging copies of a model returns it; None: no such
    promise), `tolerance` (float32 agreement across backends, relative to max|input|).

    `check(name, params)` raises InvalidInput for resolved parameters that are each in bounds
    but invalid together (DELLA's density - epsilon <= 0, weights summing to 0 that are to be
    normalized): it runs whenever parameters are resolved, so a plan, and a dry run, refuse
    what the merge itself would refuse, before anything is written.
    """

    name: str
    apply: Callable[..., Array]
    description: str
    params: tuple[Param, ...] = ()
    passes: Callable[..., Iterable[Any]] | None = None
    granule: Callable[..., int] | None = None
    base: str = "none"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False  # uses `seed` and the tensor name (DARE, DELLA)
    copies: Callable[[dict[str, Any]], bool] | None = None  # True: the result is model 0's bytes
    check: Callable[[str, dict[str, Any]], None] | None = None
    reference: str = ""
    aliases: tuple[str, ...] = field(default=())
    symmetric: bool = False
    exact: bool = False
    self_merge: dict[str, Any] | None = None
    tolerance: float = 1e-5

    def __post_init__(self) -> None:
        if self.base not in BASES:
            raise ValueError(f"{self.name}: base must be one of {BASES}, got {self.base!r}")

    @property
    def needs_base(self) -> bool:
        return self.base == "required"

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    def resolve(self, n_models: int, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults filled in, values checked (each against its bounds, then together by
        `check`), per-model values expanded to one per model."""
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
        if self.check is not None:
            self.check(self.name, out)
        return out

    def check_count(self, n_models: int, has_base: bool) -> None:
        """A clear error when the number of models or the presence of a base is wrong."""
        if self.base == "required" and not has_base:
            raise InvalidInput(f"{self.name} needs a base model (--base)")
        if self.base == "none" and has_base:
            raise InvalidInput(f"{self.name} does not use a base model; pass the models only")
        if self.base == "endpoint" and has_base and n_models + 1 > (self.max_models or n_models):
            raise InvalidInput(
                f"{self.name} takes {self.max_models} models, or {self.max_models - 1} and a "
                f"base; got {n_models} and a base"
            )
        count = n_models + (1 if has_base and self.base == "endpoint" else 0)
        if count < self.min_models:
            raise InvalidInput(
                f"{self.name} needs at least {self.min_models} model(s), got {count}"
            )
        if self.max_models is not None and count > self.max_models:
            raise InvalidInput(f"{self.name} takes at most {self.max_models} model(s), got {count}")

    def job(
        self,
        shape: tuple[int, ...],
        n_models: int,
        has_base: bool,
        params: dict[str, Any] | None = None,
        tensor_name: str = "",
    ) -> Job:
        """The merge of one tensor of `shape`: counts and parameters checked, defaults filled."""
        self.check_count(n_models, has_base)
        resolved = self.resolve(n_models, params)
        return Job(self, resolved, tuple(shape), n_models, has_base, tensor_name)

    def prepared(
        self,
        tensors: Sequence[Array],
        base: Array | None,
        tensor_name: str,
        params: dict[str, Any],
    ) -> tuple[Job, Chunk, Callable[[Array], Array]]:
        """A whole-array call as the contract runs it: the job, its single chunk (the inputs
        flattened in the compute dtype), and what turns the apply's result into the answer
        (shaped, in the inputs' dtype, library and device)."""
        tensors = list(tensors)
        shape = tuple(tensors[0].shape) if tensors else ()
        job = self.job(shape, len(tensors), base is not None, params, tensor_name)
        everything = tensors + ([base] if base is not None else [])
        if any(backend.is_numpy_bfloat16(a) for a in everything):
            # ml_dtypes bfloat16 numpy arrays: merge in float32, round back to bfloat16 once
            if not all(backend.is_numpy_bfloat16(a) for a in everything):
                raise InvalidInput(f"{self.name}: input tensors have different dtypes")
            widen = backend.host_bfloat16_to_float32
            job, chunk, finish = self.prepared(
                [widen(a) for a in tensors],
                None if base is None else widen(base),
                tensor_name,
                params,
            )
            return job, chunk, lambda r: backend.host_float32_to_bfloat16(np.asarray(finish(r)))
        xp = backend.namespace(*everything)
        backend.same_shapes(everything, f"{self.name}: input tensors")
        out_dtype = tensors[0].dtype
        if any(a.dtype != out_dtype for a in everything):
            listed = ", ".join(str(a.dtype) for a in everything)
            raise InvalidInput(f"{self.name}: input tensors have different dtypes: {listed}")
        work = [backend.as_compute(xp, a) for a in everything]
        job.compute = "float64" if work[0].dtype == xp.float64 else "float32"
        flat = [xp.reshape(a, (-1,)) for a in work]
        chunk = Chunk(xp, flat[: len(tensors)], flat[len(tensors)] if base is not None else None)

        def finish(result: Array) -> Array:
            result = xp.reshape(result, shape)
            return result if result.dtype == out_dtype else xp.astype(result, out_dtype)

        return job, chunk, finish

    def __call__(
        self,
        tensors: Sequence[Array],
        *,
        base: Array | None = None,
        tensor_name: str = "",
        **params: Any,
    ) -> Array:
        """Merge `tensors` (one per model) into one array of the same library, device, dtype."""
        job, chunk, finish = self.prepared(tensors, base, tensor_name, params)
        return finish(run_whole(job, chunk))


REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, description: str, **info: Any) -> Callable[[Callable], MethodSpec]:
    """Decorator on a method's `apply(job, chunk)`: add the method to the registry under `name`
    (with its passes, parameters and properties in `info`); returns the MethodSpec."""

    def add(apply: Callable) -> MethodSpec:
        spec = MethodSpec(name=name, apply=apply, description=description, **info)
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

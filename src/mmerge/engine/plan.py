"""The plan: every output tensor with its input tensor refs, method and resolved parameters.

A plan is built from checkpoint headers only and validated completely (names, shapes, dtypes,
every parameter value of every tensor) before the writer reserves a single byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmerge.engine import params as settings
from mmerge.engine.layers import is_embedding, layer_count, layer_index, rename_layer
from mmerge.errors import InvalidInput, PlanError
from mmerge.methods.registry import MethodSpec, get

FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
DTYPE_NAMES = {
    "float32": "F32",
    "fp32": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
    "fp64": "F64",
}
TORCH_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
MISMATCH_HINT = "--allow-mismatch (allow_mismatch=True) copies it from the base/first model"


def dtype_code(name: str | None) -> str | None:
    """A safetensors dtype code ('BF16') from a user's spelling ('bfloat16', 'bf16', 'BF16')."""
    if name is None:
        return None
    key = name.strip()
    if key.upper() in FLOAT_DTYPES:
        return key.upper()
    try:
        return DTYPE_NAMES[key.lower()]
    except KeyError:
        raise InvalidInput(
            f"unknown dtype {name!r} (use bfloat16, float16, float32 or float64)"
        ) from None


def common_dtype(codes: Sequence[str]) -> str:
    """The output dtype that holds every input float dtype exactly: the inputs' own when they
    agree; else the widest of float64 and float32 present; else float32 when float16 and
    bfloat16 mix (neither holds the other); else bfloat16 or float16 over fp8."""
    present = set(codes)
    if len(present) == 1:
        return next(iter(present))
    for wide in ("F64", "F32"):
        if wide in present:
            return wide
    if {"F16", "BF16"} <= present:
        return "F32"
    for half in ("BF16", "F16"):
        if half in present:
            return half
    return "BF16"  # two fp8 kinds: bfloat16 holds both exactly


@dataclass(frozen=True)
class Source:
    """One model taking part in a merge: its checkpoint and its own parameter settings."""

    checkpoint: Mapping  # name -> TensorRef (an mmerge.io.Checkpoint)
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class PlanItem:
    """One output tensor: computed by `method` from `sources` (and `base`), or copied."""

    name: str
    method: MethodSpec
    sources: tuple  # TensorRef per model
    base: Any  # TensorRef or None
    params: dict[str, Any]
    out_dtype: str
    shape: tuple[int, ...]
    note: str = ""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def is_copy(self) -> bool:
        """Bit-for-bit copy of one input tensor (an unscaled passthrough, or a tensor others
        lack): the bytes are copied, nothing is computed."""
        scale = self.params.get("scale", 1.0)
        return (
            self.method.name == "passthrough"
            and scale in (1.0, [1.0])
            and self.sources[0].dtype == self.out_dtype
        )

    def inputs(self) -> list:
        return list(self.sources) + ([self.base] if self.base is not None else [])


@dataclass
class Plan:
    """The whole merge, ready to execute.

    `layer_sources` is set for layer stacking: the source layer of each output layer, so that
    per-layer entries of the copied config follow the layers.
    """

    method: MethodSpec
    items: list[PlanItem]
    parameters: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    layer_sources: list[int] | None = None
    requantization: Any = None  # set by engine.quantized_output.requantize for fp8 output

    def bytes_read(self) -> int:
        return sum(ref.nbytes for item in self.items for ref in item.inputs())

    def bytes_written(self) -> int:
        from mmerge.io import DTYPES

        return sum(item.numel * DTYPES[item.out_dtype].itemsize for item in self.items)

    def out_dtype_name(self) -> str | None:
        """The torch name of the output's float dtype when all float tensors share one."""
        codes = {i.out_dtype for i in self.items if i.out_dtype in FLOAT_DTYPES}
        return TORCH_NAMES.get(codes.pop()) if len(codes) == 1 else None

    def warn(self, message: str) -> None:
        """Record a warning once."""
        if message not in self.warnings:
            self.warnings.append(message)


def _per_tensor_params(
    spec: MethodSpec,
    global_settings: Mapping[str, Any],
    sources: Sequence[Source],
    name: str,
    layer: int | None,
    n_layers: int,
) -> dict[str, Any]:
    """Global and per-model settings evaluated for one tensor, in the method's terms: a
    model's own value wins, and the global value is the default of every model without one."""
    out = settings.evaluate_all(dict(global_settings), name, layer, n_layers)
    per_model_keys = {k for s in sources for k in s.params}
    for key in sorted(per_model_keys):
        try:
            param = spec.param(key)
        except KeyError:
            raise InvalidInput(f"{spec.name}: unknown per-model parameter {key!r}") from None
        if not param.per_model:
            raise InvalidInput(f"{spec.name}: parameter {key!r} is global, not per model")
        default = out.get(key, param.default)
        values = []
        for s in sources:
            v = settings.evaluate(s.params[key], name, layer, n_layers) if key in s.params else None
            values.append(default if v is None else v)
        out[key] = values
    return out


def _check_settings(global_settings: Mapping, sources: Sequence[Source]) -> None:
    for key, value in global_settings.items():
        settings.validate_setting(key, value)
    for s in sources:
        for key, value in s.params.items():
            settings.validate_setting(key, value)


class _Planner:
    """Turns one output tensor's input refs into a plan item: checks names, shapes and dtypes,
    picks the output dtype, copies non-float tensors, and evaluates the parameters."""

    def __init__(self, spec: MethodSpec, global_settings: Mapping, out_code: str | None, plan):
        self.spec, self.global_settings, self.out_code, self.plan = (
            spec,
            global_settings,
            out_code,
            plan,
        )

    def item(
        self,
        name: str,
        sources: Sequence[Source],
        refs: Sequence,
        base_ref,
        labels: Sequence[str],
        position: tuple[int | None, int],
    ) -> PlanItem:
        """The plan item for output tensor `name` from `refs` (one per source) and `base_ref`;
        `position` is (layer, layers) for gradients."""
        everyone = list(refs) + ([base_ref] if base_ref is not None else [])
        first = everyone[0] if base_ref is None else base_ref
        kinds = {r.dtype in FLOAT_DTYPES for r in everyone}
        if kinds == {False} or (len(kinds) == 2 and first.dtype not in FLOAT_DTYPES):
            return self._integer_copy(name, first, everyone, labels, base_ref is not None)
        if len(kinds) == 2:
            listed = ", ".join(f"{lb} {r.dtype}" for lb, r in zip(labels, everyone))
            raise PlanError(
                f"tensor {name!r} is a float in some models and not in others: {listed}"
            )
        out_dtype = self.out_code or self._float_dtype(name, everyone)
        values = _per_tensor_params(self.spec, self.global_settings, sources, name, *position)
        try:
            self.spec.resolve(len(sources), values)
        except InvalidInput as exc:
            raise InvalidInput(f"{exc} (tensor {name!r})") from None
        return PlanItem(
            name=name,
            method=self.spec,
            sources=tuple(refs),
            base=base_ref,
            params=values,
            out_dtype=out_dtype,
            shape=tuple(first.shape),
        )

    def _float_dtype(self, name: str, refs: Sequence) -> str:
        codes = [r.dtype for r in refs]
        chosen = common_dtype(codes)
        if len(set(codes)) > 1:
            mixed = " and ".join(sorted({TORCH_NAMES.get(c, c) for c in codes}))
            self.plan.warn(
                f"inputs mix {mixed}: writing {TORCH_NAMES.get(chosen, chosen)}, which holds "
                "them all (choose with --out-dtype)"
            )
        return chosen

    def _integer_copy(self, name, first, refs, labels, has_base: bool) -> PlanItem:
        """Integer and boolean tensors (step counters, index buffers) are copied, never
        merged; the user is told when the models disagree about them."""
        if any(not _same_values(first, r) for r in refs if r is not first):
            which = "the base model's" if has_base else f"the one of {labels[0]}"
            self.plan.warn(
                f"{first.dtype} tensor {name!r} differs between the models; kept {which}"
            )
        return copy_item(name, first, None, note=f"{first.dtype} tensor copied, not merged")


def _same_values(a, b) -> bool:
    """True when two integer tensor refs hold the same dtype, shape and bytes."""
    if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape):
        return False
    return bool(np.array_equal(a.raw(), b.raw()))


def build_plan(
    sources: Sequence[Source],
    *,
    method: str | MethodSpec,
    base: Source | None = None,
    params: Mapping[str, Any] | None = None,
    out_dtype: str | None = None,
    allow_mismatch: bool = False,
) -> Plan:
    """Plan merging `sources` tensor by tensor; raises PlanError/InvalidInput before any write."""
    spec = method if isinstance(method, MethodSpec) else get(method)
    global_settings = dict(params or {})
    spec.check_count(len(sources), base is not None)
    _check_settings(global_settings, sources)
    reference = base or sources[0]
    everyone = list(sources) + ([base] if base is not None else [])
    n_layers = layer_count(reference.checkpoint)
    plan = Plan(method=spec, items=[], parameters=global_settings)
    planner = _Planner(spec, global_settings, dtype_code(out_dtype), plan)
    names = dict.fromkeys(reference.checkpoint)
    for s in everyone:
        names.update(dict.fromkeys(n for n in s.checkpoint if n not in names))
    for name in names:
        item = _plan_tensor(planner, name, sources, base, reference, n_layers, allow_mismatch)
        if item is not None:
            plan.items.append(item)
    return plan


def _plan_tensor(planner, name, sources, base, reference, n_layers, allow_mismatch):
    everyone = list(sources) + ([base] if base is not None else [])
    holders = [s for s in everyone if name in s.checkpoint]
    first = reference.checkpoint.get(name) or holders[0].checkpoint[name]
    missing = [s.label for s in everyone if name not in s.checkpoint]
    shapes = {tuple(s.checkpoint[name].shape) for s in holders}
    problem = ""
    if missing:
        problem = f"tensor {name!r} is missing from {', '.join(missing)}"
    elif len(shapes) > 1:
        listed = ", ".join(f"{s.label} {tuple(s.checkpoint[name].shape)}" for s in holders)
        problem = f"tensor {name!r} has mismatched shapes: {listed}"
    if problem:
        if not allow_mismatch:
            raise PlanError(f"{problem} ({MISMATCH_HINT})")
        if name not in reference.checkpoint:
            planner.plan.warn(f"{problem}; left out (not in the base/first model)")
            return None
        planner.plan.warn(f"{problem}; copied from {reference.label}")
        return copy_item(name, first, planner.out_code, note="copied: " + problem)
    return planner.item(
        name,
        sources,
        [s.checkpoint[name] for s in sources],
        base.checkpoint[name] if base is not None else None,
        [s.label for s in everyone],
        (layer_index(name), n_layers),
    )


def copy_item(name: str, ref, out_code: str | None, note: str) -> PlanItem:
    """A plan item that copies `ref` (converted only when `out_code` is another dtype)."""
    return PlanItem(
        name=name,
        method=get("passthrough"),
        sources=(ref,),
        base=None,
        params={},
        out_dtype=out_code or ref.dtype,
        shape=tuple(ref.shape),
        note=note,
    )


@dataclass(frozen=True)
class Slice:
    """Layers [start, stop) of each source merged into consecutive output layers; `params`
    are the slice's own settings (between the models' own and the recipe's), and `base` the
    slice's own base model, if any."""

    sources: tuple[tuple[Source, int, int], ...]  # (source, start, stop)
    params: Mapping[str, Any] = field(default_factory=dict)
    base: Source | None = None


def build_slice_plan(
    slices: Sequence[Slice],
    *,
    method: str | MethodSpec,
    base: Source | None = None,
    params: Mapping[str, Any] | None = None,
    out_dtype: str | None = None,
    allow_mismatch: bool = False,
) -> Plan:
    """Layer stacking (mergekit `slices`): output layers taken slice by slice from the sources.

    As in mergekit: embeddings come from the first slice's sources and the tensors after the
    layers (final norm, head) from the last slice's; a gradient runs over each slice's layers
    afresh; output tensors are in layer order (embeddings, layers, then the rest).
    """
    spec = method if isinstance(method, MethodSpec) else get(method)
    global_settings = dict(params or {})
    if not slices:
        raise PlanError("recipe has an empty 'slices' list")
    for sl in slices:
        lengths = {stop - start for _, start, stop in sl.sources}
        if len(lengths) != 1:
            raise PlanError(f"slice sources have different layer_range lengths: {sorted(lengths)}")
        _check_settings({**global_settings, **sl.params}, [s for s, _, _ in sl.sources])
    plan = Plan(method=spec, items=[], parameters=global_settings, layer_sources=[])
    out_code = dtype_code(out_dtype)
    reference = slices[0].sources[0][0].checkpoint
    outside = [n for n in reference if layer_index(n) is None]
    head = [n for n in outside if is_embedding(n)]
    tail = [n for n in outside if not is_embedding(n)]
    plan.items += _outside_items(spec, slices[0], head, base, global_settings, out_code, plan)
    for sl in slices:
        _stack_slice(spec, sl, base, global_settings, out_code, plan)
    plan.items += _outside_items(spec, slices[-1], tail, base, global_settings, out_code, plan)
    if allow_mismatch:
        plan.warn("--allow-mismatch has no effect on layer stacking: every tensor must match")
    return plan


def _split(sl: Slice, base: Source | None) -> tuple[list[Source], Source | None]:
    """A slice's merged models and its base (the slice's own, else the recipe's if it is
    among the slice's sources)."""
    srcs = [s for s, _, _ in sl.sources]
    chosen = sl.base or base
    bsrc = None
    if chosen is not None:
        bsrc = next((s for s in srcs if s.checkpoint is chosen.checkpoint), None)
    return [s for s in srcs if s is not bsrc], bsrc


def _outside_items(spec, sl, names, base, global_settings, out_code, plan) -> list[PlanItem]:
    """Embeddings or final norm and head: merged from slice `sl`'s sources, whole."""
    models, bsrc = _split(sl, base)
    planner = _Planner(spec, {**global_settings, **sl.params}, out_code, plan)
    items = []
    for name in names:
        everyone = models + ([bsrc] if bsrc is not None else [])
        for s in everyone:
            if name not in s.checkpoint:
                raise PlanError(f"tensor {name!r} is missing from {s.label}")
        shapes = {tuple(s.checkpoint[name].shape) for s in everyone}
        if len(shapes) > 1:
            raise PlanError(f"tensor {name!r}: mismatched shapes {sorted(shapes)}")
        items.append(_stack_item(planner, name, name, models, bsrc, {}, (None, 1)))
    return items


def _stack_item(planner, out_name, src_name, models, bsrc, renamed, position) -> PlanItem:
    """One output tensor of a stacked model from each source's `renamed` (or `src_name`)."""
    refs = [s.checkpoint[renamed.get(id(s), src_name)] for s in models]
    base_ref = bsrc.checkpoint[renamed.get(id(bsrc), src_name)] if bsrc is not None else None
    if not refs:  # only the base in this slice: no task vector, so the base (as mergekit)
        return copy_item(out_name, base_ref, planner.out_code, note="base only")
    labels = [s.label for s in models] + ([bsrc.label] if bsrc is not None else [])
    planner.spec.check_count(len(models), base_ref is not None)
    return planner.item(out_name, models, refs, base_ref, labels, position)


def _stack_slice(spec, sl, base, global_settings, out_code, plan) -> None:
    """Append slice `sl`'s layers to the plan as the next output layers."""
    models, bsrc = _split(sl, base)
    planner = _Planner(spec, {**global_settings, **sl.params}, out_code, plan)
    first, start0, stop0 = sl.sources[0]
    length = stop0 - start0
    everyone = models + ([bsrc] if bsrc is not None else [])
    starts = {id(s): start for s, start, _ in sl.sources}
    for k in range(length):
        out_layer = len(plan.layer_sources)
        names = [n for n in first.checkpoint if layer_index(n) == start0 + k]
        if not names:
            raise PlanError(f"{first.label} has no layer {start0 + k}")
        for name in names:
            renamed = {}
            for s in everyone:
                src_name = rename_layer(name, starts[id(s)] + k)
                if src_name not in s.checkpoint:
                    raise PlanError(f"tensor {src_name!r} is missing from {s.label}")
                renamed[id(s)] = src_name
            shapes = {tuple(s.checkpoint[renamed[id(s)]].shape) for s in everyone}
            out_name = rename_layer(name, out_layer)
            if len(shapes) > 1:
                raise PlanError(f"tensor {out_name!r}: mismatched shapes {sorted(shapes)}")
            plan.items.append(
                _stack_item(planner, out_name, name, models, bsrc, renamed, (k, length))
            )
        plan.layer_sources.append(start0 + k)

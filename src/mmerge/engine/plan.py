"""The plan: every output tensor with its input tensor refs, method and resolved parameters.

A plan is built from checkpoint headers only and validated completely (names, shapes, dtypes,
every parameter value of every tensor) before the writer reserves a single byte.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mmerge.engine import params as settings
from mmerge.engine.layers import layer_count, layer_index, rename_layer
from mmerge.errors import InvalidInput, PlanError
from mmerge.io.dtypes import FLOAT_CODES, dtype_code
from mmerge.methods.registry import MethodSpec, get


@dataclass(frozen=True)
class Source:
    """One model taking part in a merge: its checkpoint and its own parameter settings."""

    checkpoint: Mapping  # name -> TensorRef (an mmerge.io.Checkpoint)
    params: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""


@dataclass(frozen=True)
class PlanItem:
    """One output tensor: computed by `method` from `sources` (and `base`), or, when `method`
    is None, a copy of `sources[0]` (its bytes, or its values in another dtype)."""

    name: str
    method: MethodSpec | None
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
        """A copy of one input tensor rather than a merge."""
        return self.method is None

    def inputs(self) -> list:
        return list(self.sources) + ([self.base] if self.base is not None else [])


@dataclass
class Plan:
    """The whole merge, ready to execute."""

    method: MethodSpec
    items: list[PlanItem]
    parameters: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def bytes_read(self) -> int:
        return sum(ref.nbytes for item in self.items for ref in item.inputs())

    def bytes_written(self) -> int:
        from mmerge.io import DTYPES

        return sum(item.numel * DTYPES[item.out_dtype].itemsize for item in self.items)


def _per_tensor_params(
    spec: MethodSpec,
    global_settings: Mapping[str, Any],
    sources: Sequence[Source],
    name: str,
    layer: int | None,
    n_layers: int,
) -> dict[str, Any]:
    """Global and per-model settings evaluated for one tensor, in the method's terms."""
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


def _check_settings(spec: MethodSpec, global_settings: Mapping, sources: Sequence[Source]) -> None:
    for key, value in global_settings.items():
        settings.validate_setting(key, value)
    for s in sources:
        for key, value in s.params.items():
            settings.validate_setting(key, value)


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
    _check_settings(spec, global_settings, sources)
    out_code = dtype_code(out_dtype)
    reference = base or sources[0]
    everyone = list(sources) + ([base] if base is not None else [])
    n_layers = layer_count(reference.checkpoint)
    plan = Plan(method=spec, items=[], parameters=global_settings)
    all_names = list(reference.checkpoint)
    for s in everyone:
        all_names += [n for n in s.checkpoint if n not in reference.checkpoint]
    seen = set()
    for name in all_names:
        if name in seen:
            continue
        seen.add(name)
        item = _plan_tensor(
            spec,
            name,
            sources,
            base,
            reference,
            global_settings,
            n_layers,
            out_code,
            allow_mismatch,
            plan.warnings,
        )
        if item is not None:
            plan.items.append(item)
    return plan


def _plan_tensor(
    spec,
    name,
    sources,
    base,
    reference,
    global_settings,
    n_layers,
    out_code,
    allow_mismatch,
    warnings,
):
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
            raise PlanError(problem + " (--allow-mismatch copies it from the base/first model)")
        if name not in reference.checkpoint:
            warnings.append(f"{problem}; left out (not in the base/first model)")
            return None
        warnings.append(f"{problem}; copied from {reference.label}")
        return _copy_item(name, first, out_code, note="copied: " + problem)
    if first.dtype not in FLOAT_CODES:
        return _copy_item(name, first, None, note=f"{first.dtype} tensor copied, not merged")
    layer = layer_index(name)
    values = _per_tensor_params(spec, global_settings, sources, name, layer, n_layers)
    try:
        resolved = spec.resolve(len(sources), values)
    except InvalidInput as exc:
        raise InvalidInput(f"{exc} (tensor {name!r})") from None
    if spec.copies is not None and spec.copies(resolved):
        return _copy_item(name, sources[0].checkpoint[name], out_code, note=f"{spec.name}: copied")
    return PlanItem(
        name=name,
        method=spec,
        sources=tuple(s.checkpoint[name] for s in sources),
        base=base.checkpoint[name] if base is not None else None,
        params=values,
        out_dtype=out_code or first.dtype,
        shape=tuple(first.shape),
    )


def _copy_item(name, ref, out_code, note):
    return PlanItem(
        name=name,
        method=None,
        sources=(ref,),
        base=None,
        params={},
        out_dtype=out_code or ref.dtype,
        shape=tuple(ref.shape),
        note=note,
    )


@dataclass(frozen=True)
class Slice:
    """Layers [start, stop) of each source merged into consecutive output layers."""

    sources: tuple[tuple[Source, int, int], ...]  # (source, start, stop)


def build_slice_plan(
    slices: Sequence[Slice],
    *,
    method: str | MethodSpec,
    base: Source | None = None,
    params: Mapping[str, Any] | None = None,
    out_dtype: str | None = None,
) -> Plan:
    """Layer stacking (mergekit `slices`): output layers taken slice by slice from the sources.

    Tensors outside layers (embeddings, final norm, head) come from the first slice's sources.
    """
    spec = method if isinstance(method, MethodSpec) else get(method)
    global_settings = dict(params or {})
    out_code = dtype_code(out_dtype)
    if not slices:
        raise PlanError("recipe has an empty 'slices' list")
    n_out = 0
    for sl in slices:
        lengths = {stop - start for _, start, stop in sl.sources}
        if len(lengths) != 1:
            raise PlanError(f"slice sources have different layer_range lengths: {sorted(lengths)}")
        n_out += lengths.pop()
    plan = Plan(method=spec, items=[], parameters=global_settings)
    out_layer = 0
    first_sources = [s for s, _, _ in slices[0].sources]
    head_base = _slice_base(first_sources, base)
    head_models = [s for s in first_sources if s is not head_base]
    head = None
    if not _copies(spec, global_settings) and head_models:
        head = build_plan(
            head_models, method=spec, base=head_base, params=params, out_dtype=out_dtype
        )
    ref_ckpt = first_sources[0].checkpoint
    non_layer = [n for n in ref_ckpt if layer_index(n) is None]
    if head is not None:
        plan.items += [i for i in head.items if layer_index(i.name) is None]
    for sl in slices:
        srcs = [s for s, _, _ in sl.sources]
        bsrc = _slice_base(srcs, base)
        models = [s for s in srcs if s is not bsrc]
        if not models:
            models, bsrc = srcs, None
        spec.check_count(len(models), bsrc is not None)
        length = sl.sources[0][2] - sl.sources[0][1]
        for k in range(length):
            src_layer = {id(s): start + k for s, start, _ in sl.sources}
            first, start0, _ = sl.sources[0]
            names = [n for n in first.checkpoint if layer_index(n) == start0 + k]
            if not names:
                raise PlanError(f"{first.label} has no layer {start0 + k}")
            for name in names:
                out_name = rename_layer(name, out_layer)
                refs = {}
                for s in srcs:
                    src_name = rename_layer(name, src_layer[id(s)])
                    if src_name not in s.checkpoint:
                        raise PlanError(f"tensor {src_name!r} is missing from {s.label}")
                    refs[id(s)] = s.checkpoint[src_name]
                shapes = {tuple(r.shape) for r in refs.values()}
                if len(shapes) > 1:
                    raise PlanError(f"tensor {out_name!r}: mismatched shapes {sorted(shapes)}")
                ref0 = refs[id(srcs[0])]
                values = _per_tensor_params(
                    spec, global_settings, models, out_name, out_layer, n_out
                )
                resolved = spec.resolve(len(models), values)
                if ref0.dtype not in FLOAT_CODES or (spec.copies and spec.copies(resolved)):
                    plan.items.append(_copy_item(out_name, ref0, out_code, note="stacked"))
                    continue
                plan.items.append(
                    PlanItem(
                        name=out_name,
                        method=spec,
                        sources=tuple(refs[id(s)] for s in models),
                        base=refs[id(bsrc)] if bsrc is not None else None,
                        params=values,
                        out_dtype=out_code or ref0.dtype,
                        shape=tuple(ref0.shape),
                    )
                )
            out_layer += 1
    if head is None:
        plan.items[:0] = [_copy_item(n, ref_ckpt[n], out_code, "stacked") for n in non_layer]
    order = {n: i for i, n in enumerate(ref_ckpt)}
    plan.items.sort(key=lambda it: (layer_index(it.name) is not None, order.get(it.name, 0)))
    _move_tail(plan, ref_ckpt)
    return plan


def _copies(spec: MethodSpec, global_settings: Mapping[str, Any]) -> bool:
    """True when the method, with these settings for every tensor, copies its one input."""
    if spec.copies is None:
        return False
    try:
        return spec.copies(spec.resolve(1, dict(global_settings)))
    except InvalidInput:
        return False


def _slice_base(sources: Sequence[Source], base: Source | None) -> Source | None:
    if base is None:
        return None
    for s in sources:
        if s.checkpoint is base.checkpoint:
            return s
    return None


def _move_tail(plan: Plan, ref_ckpt: Mapping) -> None:
    """Keep the reference's order: tensors after the last layer (norm, head) go last."""
    names = list(ref_ckpt)
    last_layer_pos = max((i for i, n in enumerate(names) if layer_index(n) is not None), default=-1)
    tail = {n for n in names[last_layer_pos + 1 :] if layer_index(n) is None}
    plan.items.sort(key=lambda it: it.name in tail)

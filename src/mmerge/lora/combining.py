"""`lora combine`: several adapters of one base into one PEFT adapter, without the base.

- linear (default): the sum of w_i s_i B_i A_i, exactly, by stacking the factors (rank = sum of
  the ranks); with a rank K below that sum, recompressed without forming the delta (thin QR of
  both stacked factors, SVD of the small core), keeping the best rank-K approximation.
- a task-vector method of the registry (ties, dare_ties, ...): each adapter's delta is formed,
  the method merges the deltas as task vectors of a zero base, and the result is re-extracted at
  rank K by randomized SVD. Factors alone never decide a trim: they are defined only up to an
  invertible transform, the delta is not.

The written adapter has scale 1 per module (lora_alpha = r), so its B A is the combined delta.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mmerge.errors import InvalidInput
from mmerge.io.adapter import (
    PREFIX,
    Adapter,
    FullTensor,
    LoraModule,
    factor_keys,
    open_adapter,
    peft_config,
)
from mmerge.io.layout import TensorSpec
from mmerge.lora.result import AdapterResult, ModuleReport, factor_dtype, rank_settings
from mmerge.methods import lora as math_lora

PathLike = str | os.PathLike
EXCLUDED_METHODS = {"model_stock"}  # needs the base weights themselves, not only deltas


@dataclass
class _Module:
    """One module of the combined adapter and the adapters that adapt it."""

    module: str
    kind: str
    fan_in_fan_out: bool
    shape: tuple[int, int]  # the delta as the base stores the weight
    terms: list[tuple[int, float, LoraModule]] = field(default_factory=list)
    rank: int = 0

    @property
    def stored_transposed(self) -> bool:
        return self.kind == "embedding" or self.fan_in_fan_out

    @property
    def tensor_name(self) -> str:
        return self.module + ".weight"

    def factor_shapes(self) -> tuple[tuple[int, int], tuple[int, int]]:
        m, n = self.shape
        if self.stored_transposed:
            return (self.rank, m), (n, self.rank)
        return (self.rank, n), (m, self.rank)

    def has_bias(self) -> bool:
        return any(lora.bias is not None for _, _, lora in self.terms)


def _method_spec(method: str):
    if method == "linear":
        return None
    from mmerge.methods.registry import REGISTRY, get

    allowed = sorted(n for n, s in REGISTRY.items() if s.needs_base and n not in EXCLUDED_METHODS)
    spec = get(method)
    if spec.name not in allowed:
        raise InvalidInput(
            f"lora combine: method {method!r} does not merge task vectors; use linear or one "
            f"of: {', '.join(allowed)}"
        )
    return spec


def _modules(adapters: Sequence[Adapter], weights: Sequence[float]) -> dict[str, _Module]:
    modules: dict[str, _Module] = {}
    for i, (adapter, w) in enumerate(zip(adapters, weights)):
        if adapter.uses_dora:
            raise InvalidInput(
                f"{adapter.path}: DoRA adapters cannot be combined without the base weights (the "
                "magnitude rescales W + delta); merge them with `lora apply`, then `lora extract`"
            )
        for name, lora in adapter.modules.items():
            entry = modules.get(name)
            if entry is None:
                entry = modules[name] = _Module(
                    name, lora.kind, lora.fan_in_fan_out, lora.delta_shape()
                )
            elif (entry.kind, entry.fan_in_fan_out, entry.shape) != (
                lora.kind,
                lora.fan_in_fan_out,
                lora.delta_shape(),
            ):
                raise InvalidInput(
                    f"{adapter.path}: module {name!r} is a {lora.kind} layer of shape "
                    f"{lora.delta_shape()} (fan_in_fan_out={lora.fan_in_fan_out}), unlike in "
                    "the adapters before it"
                )
            entry.terms.append((i, w, lora))
    return modules


def _carried(adapters: Sequence[Adapter]) -> dict[str, FullTensor]:
    """Whole tensors that pass into the output unchanged: PEFT's copies of a targeted
    embedding's base weight, identical in every adapter that holds one. Trained whole tensors
    (modules_to_save) cannot be weighted without the base and are refused."""
    carried: dict[str, FullTensor] = {}
    for adapter in adapters:
        for name, full in adapter.full.items():
            if not full.base_layer:
                raise InvalidInput(
                    f"{adapter.path}: whole tensor {full.key!r} (modules_to_save or a trained "
                    "bias) cannot be weighted without the base model; apply the adapters with "
                    "`lora apply` instead"
                )
            first = carried.get(name)
            if first is None:
                carried[name] = full
            elif first.ref.shape != full.ref.shape or not np.array_equal(
                first.ref.read_float32(), full.ref.read_float32()
            ):
                raise InvalidInput(
                    f"{adapter.path}: its copy of the base tensor {name!r} differs from another "
                    "adapter's; they were not trained on the same base"
                )
    return carried


def _output_rank(module: _Module, rank: int | None, trimming: bool) -> int:
    total = sum(lora.rank for _, _, lora in module.terms)
    if trimming:
        return min(rank or total, *module.shape)
    return total if rank is None else min(rank, total, *module.shape)


def combine(
    adapters: Sequence[PathLike],
    output: PathLike,
    *,
    weights: Sequence[float] | None = None,
    rank: int | None = None,
    method: str = "linear",
    params: Mapping[str, Any] | None = None,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    backend: str = "numpy",
    device: str | None = None,
    out_dtype: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    dry_run: bool = False,
) -> AdapterResult:
    """Combine PEFT LoRA adapters of one base into a PEFT adapter at `output` (a folder).

    `weights` (default 1 each) weight each adapter's delta; `rank` recompresses (linear) or
    sets the re-extracted rank (task-vector methods, default: the sum of the ranks); `params`
    are the method's other parameters (density, seed, ...). Reports the energy kept per module.
    """
    from mmerge.backend import namespace
    from mmerge.backend.transfer import resolve

    if isinstance(adapters, (str, os.PathLike)):
        adapters = [adapters]
    if not adapters:
        raise InvalidInput("lora combine: no adapters given")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise InvalidInput(f"{len(weights)} weights for {len(adapters)} adapters")
    if rank is not None and rank < 1:
        raise InvalidInput(f"rank must be a positive integer, got {rank}")
    spec = _method_spec(method)
    params = dict(params or {})
    if spec is None and params:
        raise InvalidInput(
            f"lora combine: {', '.join(sorted(params))} need a task-vector method (--method)"
        )
    if spec is not None:
        spec.resolve(len(adapters), {"weight": weights, **params})
    out_code = factor_dtype(out_dtype)
    backend, device = resolve(backend, device)
    opened = [open_adapter(p) for p in adapters]
    try:
        modules = _modules(opened, weights)
        carried = _carried(opened)
        for m in modules.values():
            m.rank = _output_rank(m, rank, spec is not None)
        specs = _specs(modules, carried, out_code)
        result = AdapterResult(
            None,
            {m.module: ModuleReport(m.module, m.rank, float("nan")) for m in modules.values()},
            bytes_written=sum(s.nbytes for s in specs),
        )
        if dry_run:
            return result
        from mmerge.io.adapter_writer import AdapterFolder

        folder = AdapterFolder(
            output, inputs=[a.path for a in opened], resume=resume, overwrite=overwrite
        )
        try:
            meta = _metadata(opened, weights, method, rank, params)
            writer = folder.tensors(specs, meta)
            pending = set(writer.pending())
            for full in carried.values():
                if full.key in pending:
                    writer.write(full.key, full.ref.raw())
                    writer.finish_tensor(full.key)
            for m in modules.values():
                a_key, b_key = factor_keys(m.module, m.kind)
                if a_key not in pending and b_key not in pending:
                    continue
                low, energy = _combine_module(
                    m, spec, weights, params, backend, device, oversample, power_iters, seed
                )
                result.modules[m.module] = ModuleReport(m.module, m.rank, energy)
                xp = namespace(low.left)
                a, b = _peft_factors(xp, m, low)
                writer.write(a_key, a)
                writer.write(b_key, b)
                writer.finish_tensor(a_key)
                writer.finish_tensor(b_key)
                if m.has_bias():
                    key = f"{PREFIX}{m.module}.lora_B.bias"
                    writer.write(key, _bias(m))
                    writer.finish_tensor(key)
            config = peft_config(
                **_config_ranks(modules),
                target_modules=list(modules),
                fan_in_fan_out=any(m.fan_in_fan_out for m in modules.values()),
                lora_bias=any(m.has_bias() for m in modules.values()),
                base_model_name_or_path=opened[0].config.raw.get("base_model_name_or_path"),
                task_type=opened[0].config.raw.get("task_type"),
            )
            result.output = folder.commit(config)
        except BaseException:
            folder.close()
            raise
        return result
    finally:
        for adapter in opened:
            adapter.close()


def _specs(modules: Mapping[str, _Module], carried: Mapping[str, FullTensor], code: str):
    specs = [TensorSpec(f.key, f.ref.dtype, tuple(f.ref.shape)) for f in carried.values()]
    for m in modules.values():
        a_key, b_key = factor_keys(m.module, m.kind)
        a_shape, b_shape = m.factor_shapes()
        specs += [TensorSpec(a_key, code, a_shape), TensorSpec(b_key, code, b_shape)]
        if m.has_bias():
            bias_len = m.shape[1] if m.stored_transposed else m.shape[0]
            specs.append(TensorSpec(f"{PREFIX}{m.module}.lora_B.bias", code, (bias_len,)))
    return specs


def _config_ranks(modules: Mapping[str, _Module]) -> dict[str, Any]:
    r, rank_pattern, alpha_pattern = rank_settings({m.module: m.rank for m in modules.values()})
    return {"r": r, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}


def _metadata(adapters, weights, method, rank, params) -> dict[str, str]:
    from mmerge import __version__

    parameters = {"method": method, "weights": weights, "rank": rank, **params}
    return {
        "mmerge.version": __version__,
        "mmerge.operation": "lora combine",
        "mmerge.parameters": json.dumps(parameters, sort_keys=True, default=str),
        "mmerge.inputs": json.dumps([str(a.path) for a in adapters]),
    }


def _combine_module(m: _Module, spec, weights, params, backend, device, oversample, power, seed):
    """(low-rank result, share of the combined delta's energy kept) for one module."""
    from mmerge.backend import namespace
    from mmerge.backend.rng import gaussian
    from mmerge.backend.transfer import to_backend

    def put(host: np.ndarray):
        return to_backend(np.ascontiguousarray(host, np.float32), backend, device)

    pieces = []
    for _, w, lora in m.terms:
        left, right = lora.factors()
        scale = lora.scale if spec is not None else w * lora.scale
        pieces.append((put(left * np.float32(scale)), put(right)))
    xp = namespace(pieces[0][0])
    if spec is None:
        left = xp.concat([p[0] for p in pieces], axis=1)
        right = xp.concat([p[1] for p in pieces], axis=0)
        if left.shape[1] <= m.rank:
            s = xp.zeros((0,), dtype=left.dtype)
            return math_lora.LowRank(left, right, s), 1.0
        low = math_lora.recompress(xp, left, right, m.rank)
        values = [float(v) for v in low.singular_values]
        total = sum(v * v for v in values)
        return low, math_lora.energy_kept(values, m.rank, total)
    merged = _merged_delta(xp, m, pieces, spec, weights, params)
    total = float(xp.sum(merged * merged))
    width = math_lora.sketch_width(m.rank, oversample, m.shape)
    omega = put(gaussian((m.shape[1], width), seed=seed, name=m.tensor_name))
    low = math_lora.randomized_svd(
        xp,
        lambda x: xp.matmul(merged, x),
        lambda y: xp.matmul(xp.matrix_transpose(merged), y),
        omega,
        m.rank,
        power_iters=power,
    )
    values = [float(v) for v in low.singular_values]
    return low, math_lora.energy_kept(values, low.rank, total)


def _merged_delta(xp, m: _Module, pieces, spec, weights, params):
    """The registry method applied to the adapters' deltas as task vectors of a zero base
    (adapters without this module contribute a zero delta)."""
    deltas = []
    present = {i: piece for (i, _, _), piece in zip(m.terms, pieces)}
    zero = None
    for i in range(len(weights)):
        if i in present:
            left, right = present[i]
            deltas.append(math_lora.delta_rows(xp, left, right))
        else:
            if zero is None:
                zero = xp.zeros(m.shape, dtype=pieces[0][0].dtype)
            deltas.append(zero)
    base = xp.zeros(m.shape, dtype=pieces[0][0].dtype)
    return spec(deltas, base=base, tensor_name=m.tensor_name, weight=list(weights), **params)


def _peft_factors(xp, m: _Module, low) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) host arrays in PEFT's orientation from left @ right (the stored delta)."""
    from mmerge.backend.transfer import to_host

    left, right = to_host(low.left), to_host(low.right)
    if m.stored_transposed:
        return np.ascontiguousarray(left.T), np.ascontiguousarray(right.T)
    return right, left


def _bias(m: _Module) -> np.ndarray:
    """The combined lora_B bias: sum of w_i s_i b_i (zero for adapters without one)."""
    total = None
    for _, w, lora in m.terms:
        if lora.bias is not None:
            part = lora.bias.read_float32().astype(np.float64) * (w * lora.scale)
            total = part if total is None else total + part
    return total.astype(np.float32)

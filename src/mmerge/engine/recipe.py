"""mergekit-style YAML recipes: read, check every key, and turn into a plan.

Supported: merge_method, models (with per-model parameters), base_model, parameters (scalars,
gradients, filter lists), dtype, out_dtype, slices (sources with layer_range, and the slice's own
parameters and base_model), and tokenizer_source: base. Any other key is an error that names it,
never silently ignored. A parameter that another method uses but this one does not (mergekit's
tests pass `weight` to slerp) is ignored, as mergekit does, with a warning. A model may be
`BASE+ADAPTER`: a PEFT LoRA adapter applied on read.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mmerge.engine.plan import Plan, Slice, Source, build_plan, build_slice_plan
from mmerge.engine.quantized_output import plan_dtype, requantize, wants_fp8
from mmerge.errors import PlanError
from mmerge.methods.registry import MethodSpec, all_methods, get

TOP_KEYS = {
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "slices",
    "tokenizer_source",
}
MODEL_KEYS = {"model", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
SLICE_KEYS = {"sources", "parameters", "base_model"}
IGNORED_PARAMS = {"int8_mask"}  # memory tricks of mergekit with no effect on the result


class RecipeError(PlanError):
    """A recipe that mmerge cannot run as written."""


def load_recipe(source: str | os.PathLike | Mapping[str, Any]) -> tuple[dict, Path]:
    """The recipe as a dict and the folder its relative model paths are resolved from."""
    if isinstance(source, Mapping):
        return dict(source), Path.cwd()
    import yaml

    path = Path(source)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {path} is not valid YAML: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of keys, got {type(data).__name__}")
    return data, path.parent


def _unknown(keys, allowed, where: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise RecipeError(
            f"{where}: unsupported key {extra[0]!r} (mmerge supports: {', '.join(sorted(allowed))})"
        )


def _existing(value: str, root: Path) -> Path | None:
    for candidate in (Path(value), root / value):
        if candidate.exists():
            return candidate
    return None


def _model_path(value: Any, root: Path) -> Path:
    if not isinstance(value, str):
        raise RecipeError(f"model must be a local path string, got {value!r}")
    found = _existing(value, root)
    if found is None:
        raise RecipeError(
            f"model {value!r} not found (mmerge reads local checkpoints; hub ids are not "
            "downloaded)"
        )
    return found


def _adapter_split(value: Any, root: Path) -> tuple[Path, Path] | None:
    """(base, adapter) for mergekit's `BASE+ADAPTER` spelling (a LoRA adapter applied while
    streaming), or None for a plain model path."""
    if not isinstance(value, str) or "+" not in value or _existing(value, root) is not None:
        return None
    splits = []
    for i, char in enumerate(value):
        if char != "+":
            continue
        base, adapter = _existing(value[:i], root), _existing(value[i + 1 :], root)
        if base is not None and adapter is not None:
            splits.append((base, adapter))
    if len(splits) != 1:
        why = "no split into an existing BASE and ADAPTER" if not splits else "ambiguous"
        raise RecipeError(f"model {value!r}: not a path, and BASE+ADAPTER is {why}")
    return splits[0]


def _params(raw: Any, where: str, spec: MethodSpec, warnings: list[str]) -> dict[str, Any]:
    """A parameters mapping, less what mergekit would ignore for this method (with a warning).
    Names no method knows stay, so that the plan reports them as errors."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise RecipeError(f"{where}: parameters must be a mapping, got {raw!r}")
    used = {p.name for p in spec.params}
    known = {p.name for m in all_methods() for p in m.params}
    out = {}
    for key, value in raw.items():
        if key in IGNORED_PARAMS:
            warnings.append(f"{where}: parameter {key!r} has no effect in mmerge; ignored")
        elif key not in used and key in known:
            warnings.append(
                f"{where}: {spec.name} does not use parameter {key!r}; ignored (as mergekit does)"
            )
        else:
            out[key] = value
    return out


class RecipeModels:
    """Opens each distinct checkpoint of a recipe once; `BASE+ADAPTER` opens the base with the
    adapter applied on read (no copy on disk)."""

    def __init__(self, root: Path) -> None:
        self.root, self.opened, self.adapters = root, {}, []

    def get(self, value: Any):
        split = _adapter_split(value, self.root)
        if split is not None:
            return self._adapted(*split)
        return self._open(_model_path(value, self.root).resolve())

    def _open(self, path: Path):
        from mmerge.io import open_checkpoint

        if path not in self.opened:
            self.opened[path] = open_checkpoint(path)
        return self.opened[path]

    def _adapted(self, base: Path, adapter: Path):
        from mmerge.io.adapted import AdaptedCheckpoint
        from mmerge.io.adapter import open_adapter

        key = (base.resolve(), adapter.resolve())
        if key not in self.opened:
            opened = open_adapter(adapter)
            self.adapters.append(opened.checkpoint)
            self.opened[key] = AdaptedCheckpoint(self._open(key[0]), [opened])
        return self.opened[key]

    def checkpoints(self) -> list:
        """Every opened checkpoint and adapter file (for provenance and the output checks)."""
        return [*self.opened.values(), *self.adapters]


def plan_recipe(
    recipe: Mapping[str, Any], root: Path, *, allow_mismatch: bool = False
) -> tuple[Plan, list, Path | None]:
    """(plan, opened checkpoints, folder to copy config/tokenizer files from)."""
    _unknown(recipe, TOP_KEYS, "recipe")
    warnings: list[str] = []
    method = recipe.get("merge_method")
    if not method:
        raise RecipeError("recipe: 'merge_method' is required")
    spec = get(str(method))
    tok = recipe.get("tokenizer_source")
    if tok not in (None, "base"):
        raise RecipeError(f"recipe: tokenizer_source {tok!r} is not supported (only 'base')")
    opened = RecipeModels(root)
    base_ckpt = opened.get(recipe["base_model"]) if recipe.get("base_model") else None
    params = _params(recipe.get("parameters"), "recipe parameters", spec, warnings)
    out_dtype = recipe.get("out_dtype") or recipe.get("dtype")
    if recipe.get("slices") is not None:
        if recipe.get("models") is not None:
            raise RecipeError("recipe: give either 'models' or 'slices', not both")
        plan = _slice_plan(
            recipe["slices"], spec, base_ckpt, params, plan_dtype(out_dtype), opened, warnings
        )
        if allow_mismatch:
            warnings.append("--allow-mismatch has no effect on layer stacking")
    else:
        models = recipe.get("models")
        if not isinstance(models, list) or not models:
            raise RecipeError("recipe: 'models' must be a non-empty list (or use 'slices')")
        sources, base_src = [], None
        for i, entry in enumerate(models):
            if not isinstance(entry, Mapping):
                raise RecipeError(f"models[{i}]: expected a mapping with 'model', got {entry!r}")
            _unknown(entry, MODEL_KEYS, f"models[{i}]")
            ckpt = opened.get(entry.get("model"))
            src = Source(
                ckpt,
                _params(entry.get("parameters"), f"models[{i}]", spec, warnings),
                label=getattr(ckpt, "label", str(ckpt.path)),
            )
            if ckpt is base_ckpt:
                base_src = src  # mergekit lists the base among the models; it is not merged in
            else:
                sources.append(src)
        if base_ckpt is not None and base_src is None:
            base_src = Source(base_ckpt, {}, label=str(base_ckpt.path))
        plan = build_plan(
            sources,
            method=spec,
            base=base_src,
            params=params,
            out_dtype=plan_dtype(out_dtype),
            allow_mismatch=allow_mismatch,
        )
    plan.warnings[:0] = warnings
    first = base_ckpt or next(iter(opened.opened.values()))
    copy_from = first.path if first.path.is_dir() else None
    if wants_fp8(out_dtype):
        requantize(plan, list(opened.opened.values()), copy_from)
    return plan, opened.checkpoints(), copy_from


def _slice_plan(slices, spec, base_ckpt, params, out_dtype, opened, warnings) -> Plan:
    if not isinstance(slices, list):
        raise RecipeError("recipe: 'slices' must be a list")
    built = []
    by_ckpt: dict[int, Source] = {}

    def source(ckpt, raw, where) -> Source:
        label = getattr(ckpt, "label", str(ckpt.path))
        return Source(ckpt, _params(raw, where, spec, warnings), label=label)

    for i, sl in enumerate(slices):
        if not isinstance(sl, Mapping) or not isinstance(sl.get("sources"), list):
            raise RecipeError(f"slices[{i}]: expected a mapping with a 'sources' list")
        _unknown(sl, SLICE_KEYS, f"slices[{i}]")
        entries = []
        for j, src in enumerate(sl["sources"]):
            where = f"slices[{i}].sources[{j}]"
            if not isinstance(src, Mapping):
                raise RecipeError(f"{where}: expected a mapping with 'model'")
            _unknown(src, SOURCE_KEYS, where)
            ckpt = opened.get(src.get("model"))
            rng = src.get("layer_range")
            if (
                not isinstance(rng, list)
                or len(rng) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in rng)
                or not 0 <= rng[0] < rng[1]
            ):
                raise RecipeError(f"{where}: layer_range must be [start, stop) with start < stop")
            entry = source(ckpt, src.get("parameters"), where)
            by_ckpt.setdefault(id(ckpt), entry)
            entries.append((entry, rng[0], rng[1]))
        slice_base = None
        if sl.get("base_model"):
            slice_base = source(opened.get(sl["base_model"]), None, f"slices[{i}]")
        built.append(
            Slice(
                tuple(entries),
                params=_params(sl.get("parameters"), f"slices[{i}].parameters", spec, warnings),
                base=slice_base,
            )
        )
    base_src = None
    if base_ckpt is not None:
        base_src = by_ckpt.get(id(base_ckpt)) or Source(base_ckpt, {}, label=str(base_ckpt.path))
    return build_slice_plan(built, method=spec, base=base_src, params=params, out_dtype=out_dtype)

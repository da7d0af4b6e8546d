"""PEFT LoRA adapters on disk: `adapter_config.json` plus `adapter_model.safetensors`, read as
factors and scales per target module and bound to a base checkpoint's tensor names.

Everything is checked from the JSON config and the safetensors header before a tensor is read:
the profile is spec/lora.md. Pickled (`.bin`) adapters are refused, never unpickled.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmerge.errors import FormatError, InvalidInput
from mmerge.io.checkpoint import Checkpoint, open_checkpoint
from mmerge.io.tensor_ref import TensorRef

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}

# Config keys that switch on a LoRA variant whose merged weight is not W + s B A (or DoRA of it).
_VARIANTS = {
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "layer_replication": "layer replication",
    "trainable_token_indices": "trainable tokens",
    "target_parameters": "target_parameters (LoRA on nn.Parameter)",
}

_LORA_SUFFIXES = (
    (".lora_A.weight", "a"),
    (".lora_B.weight", "b"),
    (".lora_B.bias", "bias"),
    (".lora_embedding_A", "embedding_a"),
    (".lora_embedding_B", "embedding_b"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
)
_WRAPPER_SEGMENTS = (".modules_to_save.default.", ".modules_to_save.", ".base_layer.")


@dataclass(frozen=True)
class LoraConfig:
    """The fields of a PEFT LoRA config that decide the merged weights."""

    r: int
    alpha: float
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def rank_of(self, module: str) -> int:
        """The rank PEFT gives `module`: the first rank_pattern key matching it, else r."""
        key = pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha_of(self, module: str) -> float:
        key = pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.alpha

    def scale_of(self, module: str) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (the module's own rank and alpha)."""
        r, alpha = self.rank_of(module), self.alpha_of(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def targets(self, module: str) -> bool:
        """Whether PEFT would put a LoRA layer on `module` (PEFT's matching rules)."""
        if _matches_list_or_regex(self.exclude_modules, module):
            return False
        if self.modules_to_save and any(
            re.match(rf"(^|.*\.){m}($|\..*)", module) for m in self.modules_to_save
        ):
            return False
        target = self.target_modules
        if target is None:
            return True  # PEFT chose the targets from the architecture: trust the file
        if isinstance(target, str):
            if target == "all-linear":
                return module.split(".")[-1] not in ("lm_head", "embed_out")
            return re.fullmatch(target, module) is not None
        if module not in target and not any(module.endswith("." + t) for t in target):
            return False
        if self.layers_to_transform is None or self.layers_to_transform == []:
            return True
        layer = _layer_of(module, self.layers_pattern)
        if layer is None:
            return False
        wanted = self.layers_to_transform
        return layer == wanted if isinstance(wanted, int) else layer in wanted


def pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first key of a rank/alpha pattern that matches `module` as PEFT matches it: the key
    is a regular expression that must match a whole trailing run of dotted name parts."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def _matches_list_or_regex(spec: list[str] | str | None, module: str) -> bool:
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return module in spec or any(module.endswith("." + s) for s in spec)


def _layer_of(module: str, layers_pattern: list[str] | str | None) -> int | None:
    """The layer index PEFT reads from a module name for layers_to_transform."""
    if not layers_pattern:
        m = re.match(r".*?\.[^.]*\.(\d+)\.", module)
    else:
        patterns = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
        m = None
        for p in patterns:
            m = re.match(rf".*?\.{p}\.(\d+)\.", module)
            if m:
                break
    return int(m.group(1)) if m else None


def parse_config(obj: object, where: str) -> LoraConfig:
    """A LoraConfig from the JSON object of an adapter_config.json; refuses what is not LoRA or
    what mmerge cannot merge exactly, naming the key."""
    if not isinstance(obj, dict):
        raise FormatError(f"{where}: not a JSON object")
    peft_type = obj.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise InvalidInput(
            f"{where}: peft_type {peft_type!r} is not supported (mmerge reads LoRA adapters only)"
        )
    for key, name in _VARIANTS.items():
        if obj.get(key) not in (None, False, [], {}):
            raise InvalidInput(f"{where}: {name} ({key}) is not supported")
    init = obj.get("init_lora_weights")
    if isinstance(init, str) and init.lower() == "mica":
        raise InvalidInput(f"{where}: the MiCA variant (init_lora_weights='mica') is not supported")
    r = _positive_int(obj.get("r", 8), "r", where)
    alpha = _number(obj.get("lora_alpha", 8), "lora_alpha", where)
    ranks = _pattern(obj.get("rank_pattern"), "rank_pattern", where, integer=True)
    alphas = _pattern(obj.get("alpha_pattern"), "alpha_pattern", where, integer=False)
    bias = obj.get("bias", "none")
    if bias not in ("none", "all", "lora_only"):
        raise FormatError(f"{where}: bias {bias!r} is not one of none, all, lora_only")
    return LoraConfig(
        r=r,
        alpha=alpha,
        use_rslora=bool(obj.get("use_rslora", False)),
        use_dora=bool(obj.get("use_dora", False)),
        fan_in_fan_out=bool(obj.get("fan_in_fan_out", False)),
        lora_bias=bool(obj.get("lora_bias", False)),
        rank_pattern=ranks,
        alpha_pattern=alphas,
        target_modules=_names(obj.get("target_modules"), "target_modules", where),
        exclude_modules=_names(obj.get("exclude_modules"), "exclude_modules", where),
        layers_to_transform=obj.get("layers_to_transform"),
        layers_pattern=obj.get("layers_pattern"),
        modules_to_save=_names(obj.get("modules_to_save"), "modules_to_save", where),
        raw=dict(obj),
    )


def _positive_int(value: object, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise FormatError(f"{where}: {key} must be a positive integer, got {value!r}")
    if value <= 0:
        raise FormatError(f"{where}: {key} must be a positive integer, got {value!r}")
    return int(value)


def _number(value: object, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FormatError(f"{where}: {key} must be a finite number, got {value!r}")
    return float(value)


def _pattern(value: object, key: str, where: str, integer: bool) -> dict:
    if value in (None, {}):
        return {}
    if not isinstance(value, dict):
        raise FormatError(f"{where}: {key} must be an object of pattern -> value")
    check = _positive_int if integer else _number
    return {str(k): check(v, f"{key}[{k!r}]", where) for k, v in value.items()}


def _names(value: object, key: str, where: str) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise FormatError(f"{where}: {key} must be a string or a list of strings, got {value!r}")


@dataclass
class LoraModule:
    """One LoRA layer of an adapter: its factors and scale, in PEFT's orientation.

    `kind` is "linear" (A: r x in, B: out x r) or "embedding" (A: r x vocab, B: dim x r).
    """

    module: str
    kind: str
    a: TensorRef
    b: TensorRef
    scale: float
    rank: int
    fan_in_fan_out: bool = False
    bias: TensorRef | None = None
    magnitude: TensorRef | None = None

    @property
    def stored_transposed(self) -> bool:
        """True when the base tensor holds the layer as (in, out) rows: embeddings (vocab x dim
        for a delta of B A of shape dim x vocab) and fan_in_fan_out (Conv1D) layers."""
        return self.kind == "embedding" or self.fan_in_fan_out

    def factors(self) -> tuple[np.ndarray, np.ndarray]:
        """(left, right) float32 host arrays with left @ right = B A in the orientation the base
        stores the weight (the scale is not applied)."""
        a = self.a.read_float32().reshape(self.a.shape)
        b = self.b.read_float32().reshape(self.b.shape)
        if self.stored_transposed:
            return np.ascontiguousarray(a.T), np.ascontiguousarray(b.T)
        return np.array(b), np.array(a)

    def delta_shape(self) -> tuple[int, int]:
        """The shape of the delta as the base checkpoint stores the weight."""
        out_dim, in_dim = self.b.shape[0], self.a.shape[1]
        return (in_dim, out_dim) if self.stored_transposed else (out_dim, in_dim)


@dataclass(frozen=True)
class FullTensor:
    """A whole tensor an adapter carries for the base (modules_to_save, a trained bias, or the
    copy of a targeted embedding's weight that PEFT saves): it replaces the base tensor."""

    name: str  # the base tensor it replaces
    key: str  # its key in the adapter file
    ref: TensorRef
    base_layer: bool  # saved as `<module>.base_layer.<param>`


@dataclass
class Adapter:
    """A PEFT LoRA adapter opened from disk (headers only until tensors are read)."""

    path: Path
    config: LoraConfig
    checkpoint: Checkpoint
    modules: dict[str, LoraModule]
    full: dict[str, FullTensor]

    @property
    def uses_dora(self) -> bool:
        return any(m.magnitude is not None for m in self.modules.values())

    def header_digest(self) -> str:
        return self.checkpoint.header_digest()

    def close(self) -> None:
        self.checkpoint.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def adapter_files(path: str | Path) -> tuple[Path, Path]:
    """(config, weights) of an adapter given as its folder or its .safetensors file."""
    path = Path(path)
    if path.is_dir():
        folder, weights = path, path / WEIGHTS_NAME
    elif path.is_file() and path.name.endswith(".safetensors"):
        folder, weights = path.parent, path
    elif path.exists():
        raise InvalidInput(f"{path}: not an adapter folder or .safetensors file")
    else:
        raise InvalidInput(f"{path}: no such adapter")
    config = folder / CONFIG_NAME
    if not weights.is_file():
        legacy = [folder / n for n in LEGACY_NAMES if (folder / n).exists()]
        if legacy:
            raise InvalidInput(
                f"{legacy[0]}: pickled adapters are not read (unpickling runs code); "
                f"save it as {WEIGHTS_NAME} (PEFT: save_pretrained(safe_serialization=True))"
            )
        raise InvalidInput(f"{folder}: no {WEIGHTS_NAME}")
    if not config.is_file():
        raise InvalidInput(f"{folder}: no {CONFIG_NAME} beside the adapter weights")
    return config, weights


def open_adapter(path: str | Path) -> Adapter:
    """Open and validate a PEFT LoRA adapter (config and safetensors header)."""
    config_path, weights = adapter_files(path)
    try:
        obj = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FormatError(f"{config_path}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FormatError(f"{config_path}: not valid JSON: {str(exc)[:200]}") from None
    config = parse_config(obj, str(config_path))
    ckpt = open_checkpoint(weights)
    try:
        modules, full = _collect(ckpt, config, weights)
    except BaseException:
        ckpt.close()
        raise
    return Adapter(config_path.parent, config, ckpt, modules, full)


def split_key(key: str) -> tuple[str, str | None]:
    """(module, part) for a LoRA tensor key, or (base tensor name, None) for a full tensor;
    the `base_model.model.` prefix and PEFT's wrapper segments are removed."""
    name = key.removeprefix(PREFIX)
    for suffix, part in _LORA_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], part
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, ".")
    return name, None


def _collect(
    ckpt: Checkpoint, config: LoraConfig, where: Path
) -> tuple[dict[str, LoraModule], dict[str, FullTensor]]:
    parts: dict[str, dict[str, TensorRef]] = {}
    full: dict[str, FullTensor] = {}
    for key, ref in ckpt.items():
        if ref.dtype not in FLOAT_CODES:
            raise FormatError(f"{where}: tensor {key!r} has dtype {ref.dtype}, not a float")
        if ".original_module." in key:
            continue  # PEFT's untouched copy of a modules_to_save module: the base itself
        module, part = split_key(key)
        if part is None:
            if re.search(r"(^|\.)lora_[A-Za-z_]*\b", key):
                raise InvalidInput(f"{where}: tensor {key!r} is not a LoRA tensor mmerge knows")
            if module in full:
                raise FormatError(
                    f"{where}: {key!r} and {full[module].key!r} both replace {module}"
                )
            full[module] = FullTensor(module, key, ref, ".base_layer." in key)
            continue
        if part in parts.setdefault(module, {}):
            raise FormatError(f"{where}: module {module!r} has two {part} tensors")
        parts[module][part] = ref
    modules = {m: _module(m, p, config, where) for m, p in parts.items()}
    return modules, full


def _module(module: str, parts: dict[str, TensorRef], config: LoraConfig, where: Path):
    where = f"{where}: module {module!r}"
    embedding = "embedding_a" in parts or "embedding_b" in parts
    if embedding and ("a" in parts or "b" in parts):
        raise FormatError(f"{where}: has both linear and embedding LoRA factors")
    a = parts.get("embedding_a" if embedding else "a")
    b = parts.get("embedding_b" if embedding else "b")
    if a is None or b is None:
        missing = "A" if a is None else "B"
        raise FormatError(f"{where}: LoRA {missing} factor is missing")
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise InvalidInput(
            f"{where}: factors of shape {a.shape} and {b.shape}; only linear and embedding "
            "LoRA layers are supported (not convolutions)"
        )
    if not config.targets(module):
        raise InvalidInput(
            f"{where}: the adapter holds weights for it but its config does not target it "
            "(PEFT would ignore them)"
        )
    rank = config.rank_of(module)
    r_a, r_b = a.shape[0], b.shape[1]  # A is r x in (or r x vocab), B is out x r (or dim x r)
    if r_a != r_b:
        raise FormatError(f"{where}: A {a.shape} and B {b.shape} have different ranks")
    if r_a != rank:
        raise FormatError(f"{where}: factors have rank {r_a}, but the config gives it r={rank}")
    out_dim = b.shape[0]
    magnitude = parts.get("magnitude")
    if magnitude is not None:
        if not config.use_dora:
            raise FormatError(f"{where}: has a DoRA magnitude but the config has use_dora false")
        if magnitude.shape != (out_dim,):
            raise FormatError(
                f"{where}: DoRA magnitude of shape {magnitude.shape}, expected ({out_dim},)"
            )
    elif config.use_dora:
        raise FormatError(f"{where}: the config has use_dora true but no lora_magnitude_vector")
    bias = parts.get("bias")
    if bias is not None:
        if embedding:
            raise FormatError(f"{where}: an embedding LoRA has no lora_B bias")
        if bias.shape != (out_dim,):
            raise FormatError(f"{where}: lora_B bias of shape {bias.shape}, expected ({out_dim},)")
    return LoraModule(
        module=module,
        kind="embedding" if embedding else "linear",
        a=a,
        b=b,
        scale=config.scale_of(module),
        rank=rank,
        fan_in_fan_out=config.fan_in_fan_out and not embedding,
        bias=bias,
        magnitude=magnitude,
    )


def resolve_name(name: str, base: Mapping[str, Any]) -> str | None:
    """The base checkpoint's spelling of tensor `name`: as is, or with a leading `model.` added
    or removed (adapters saved from a bare transformer or from a model with a head)."""
    if name in base:
        return name
    other = name.removeprefix("model.") if name.startswith("model.") else "model." + name
    return other if other in base else None


@dataclass(frozen=True)
class TensorChange:
    """What one adapter does to one base tensor: a LoRA layer (its weight), a lora_B bias (its
    bias), and/or a whole replacement."""

    lora: LoraModule | None = None
    bias_of: LoraModule | None = None
    full: FullTensor | None = None


def bind(adapter: Adapter, base: Mapping[str, Any]) -> dict[str, TensorChange]:
    """Base tensor name -> change, after checking every adapter tensor against the base's
    header: the tensor exists, is a float, and the shapes agree."""
    where = str(adapter.path)
    changes: dict[str, dict[str, Any]] = {}

    def target(name: str, what: str) -> str:
        found = resolve_name(name, base)
        if found is None:
            raise InvalidInput(f"{where}: {what} has no base tensor {name!r}")
        ref = base[found]
        if ref.dtype not in FLOAT_CODES:
            raise InvalidInput(f"{where}: {what} targets {found!r} of dtype {ref.dtype}")
        return found

    for module, lora in adapter.modules.items():
        name = target(module + ".weight", f"LoRA module {module!r}")
        shape = tuple(base[name].shape)
        if shape != lora.delta_shape():
            raise InvalidInput(
                f"{where}: LoRA module {module!r} (A {lora.a.shape}, B {lora.b.shape}) does not "
                f"fit the base tensor {name!r} of shape {shape}"
            )
        changes.setdefault(name, {})["lora"] = lora
        if lora.bias is not None:
            bias_name = target(module + ".bias", f"the lora_B bias of {module!r}")
            if tuple(base[bias_name].shape) != tuple(lora.bias.shape):
                raise InvalidInput(f"{where}: lora_B bias of {module!r} does not fit {bias_name!r}")
            changes.setdefault(bias_name, {})["bias_of"] = lora
    for name, full in adapter.full.items():
        found = target(name, f"tensor {full.key!r}")
        if tuple(base[found].shape) != tuple(full.ref.shape):
            raise InvalidInput(
                f"{where}: tensor {full.key!r} of shape {full.ref.shape} does not fit the base "
                f"tensor {found!r} of shape {tuple(base[found].shape)} (resized vocabularies are "
                "not supported)"
            )
        changes.setdefault(found, {})["full"] = full
    return {name: TensorChange(**parts) for name, parts in changes.items()}


def peft_config(
    *,
    r: int,
    rank_pattern: dict[str, int],
    alpha_pattern: dict[str, float],
    target_modules: list[str],
    modules_to_save: list[str] | None = None,
    fan_in_fan_out: bool = False,
    lora_bias: bool = False,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """The adapter_config.json mmerge writes: a plain LoRA (no rsLoRA, no DoRA) whose scale is
    alpha / r = 1 for every module, so the saved B A is the delta itself."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "target_modules": sorted(target_modules),
        "modules_to_save": sorted(modules_to_save) if modules_to_save else None,
        "fan_in_fan_out": fan_in_fan_out,
        "lora_bias": lora_bias,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def factor_keys(module: str, kind: str) -> tuple[str, str]:
    """The file keys of a module's A and B factors."""
    if kind == "embedding":
        return f"{PREFIX}{module}.lora_embedding_A", f"{PREFIX}{module}.lora_embedding_B"
    return f"{PREFIX}{module}.lora_A.weight", f"{PREFIX}{module}.lora_B.weight"

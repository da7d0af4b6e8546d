"""From a validated plan to a checkpoint on disk: layout, provenance, non-tensor files, commit."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmerge.engine.execute import Execution, execute
from mmerge.engine.plan import Plan
from mmerge.engine.quantized_output import quantization_config
from mmerge.io.dtypes import DTYPES

# Weight files and indexes are never copied: the merged tensors replace them.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_SKIP_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


def files_to_copy(checkpoint_path: Path | None) -> list[Path]:
    """Non-tensor files of an HF folder (config, tokenizer, generation config, ...)."""
    if checkpoint_path is None or not checkpoint_path.is_dir():
        return []
    return sorted(
        p
        for p in checkpoint_path.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.name not in _SKIP_NAMES
        and not p.name.endswith(_SKIP_SUFFIXES)
    )


def provenance(plan: Plan, checkpoints: Sequence) -> dict[str, str]:
    """`__metadata__` recording what produced the file (string values, as the format requires)."""
    import hashlib

    from mmerge import __version__

    digest = hashlib.sha256()
    for ckpt in checkpoints:
        digest.update(ckpt.header_digest().encode())
    return {
        "format": "pt",
        "mmerge.version": __version__,
        "mmerge.method": plan.method.name,
        "mmerge.parameters": json.dumps(plan.parameters, sort_keys=True, default=str),
        "mmerge.inputs": json.dumps([str(c.path) for c in checkpoints]),
        "mmerge.inputs_digest": digest.hexdigest(),
    }


@dataclass(frozen=True)
class OutputOptions:
    """Where and how the merged checkpoint is written."""

    path: Path
    shard_size: int | None = None
    resume: bool = False
    copy_files_from: Path | None = None  # HF folder whose config/tokenizer files are copied
    overwrite: bool = False  # replace an existing output (once the new one is complete)


def layout_for(path: Path, shard_size: int | None) -> str:
    """A name ending in .safetensors is one file (unless sharded); any other name, an HF folder."""
    return "file" if path.suffix == ".safetensors" and shard_size is None else "folder"


def write_plan(plan: Plan, checkpoints: Sequence, options: OutputOptions, run: Execution) -> Path:
    """Execute `plan` into a new checkpoint at `options.path`; nothing appears there until done."""
    from mmerge.io import StreamingWriter, TensorSpec
    from mmerge.io.requantize import BlockQuantizer, fp8_specs

    specs = [TensorSpec(item.name, item.out_dtype, item.shape) for item in plan.items]
    requant = plan.requantization
    if requant is not None:
        specs = fp8_specs(specs, requant.names, requant.block)
    layout = layout_for(options.path, options.shard_size)
    extra = files_to_copy(options.copy_files_from) if layout == "folder" else []
    with StreamingWriter(
        options.path,
        specs,
        shard_size=options.shard_size,
        metadata=provenance(plan, checkpoints),
        inputs=[c.path for c in checkpoints],
        resume=options.resume,
        layout=layout,
        overwrite=options.overwrite,
        reserve_bytes=sum(f.stat().st_size + 4096 for f in extra),
    ) as writer:
        sink = writer
        if requant is not None:
            shapes = {item.name: item.shape for item in plan.items if item.name in requant.names}
            sink = BlockQuantizer(writer, shapes, requant.block, requant.ue8m0)
        if run.executor == "ray":
            from mmerge.engine.distributed import execute_shards

            execute_shards(plan, writer, run)
        else:
            execute(plan, sink, run)
        for src in extra:
            edited = _edited_config(src, plan) if src.name == "config.json" else None
            if edited is None:
                writer.add_file(src)
                continue
            with tempfile.TemporaryDirectory(prefix="mmerge-config-") as tmp:
                out = Path(tmp) / src.name
                out.write_text(json.dumps(edited, indent=2) + "\n")
                writer.add_file(out)
        return writer.commit()


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
DTYPE_KEYS = ("torch_dtype", "dtype")


def _edited_config(src: Path, plan: Plan) -> dict | None:
    """config.json as the output needs it, or None when the copy is right as it is: the dtype
    field names the output's dtype, quantization_config describes the fp8 output or is gone
    with dequantized weights (spec/format.md section 6), and after layer stacking the layer
    count and every per-layer list follow the stacked layers (in the config and in a
    `text_config`)."""
    try:
        config = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # not JSON we understand: copied as it is
    if not isinstance(config, dict):
        return None
    edited = json.loads(json.dumps(config))
    dtype = plan.out_dtype_name()
    quantized = quantization_config(edited, plan)
    if dtype is None and quantized is not None:
        dtype = DTYPES[quantized].name  # the dequantized weights' dtype
    if dtype is not None:
        keys = [k for k in DTYPE_KEYS if k in edited] or ["torch_dtype"]
        for key in keys:
            edited[key] = dtype
    if plan.layer_sources is not None:
        for part in (edited, edited.get("text_config")):
            if isinstance(part, dict):
                _stack_layers(part, plan.layer_sources)
    return None if edited == config else edited


def _stack_layers(config: dict, layer_sources: list[int]) -> None:
    """Set the layer count to the stacked one, and take each per-layer list's entries (lists
    as long as the source's layer count, such as `layer_types`) from the source layers."""
    counts = [config[k] for k in LAYER_COUNT_KEYS if isinstance(config.get(k), int)]
    if not counts:
        return
    n_src = counts[0]
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            config[key] = len(layer_sources)
    for key, value in list(config.items()):
        per_layer = isinstance(value, list) and len(value) == n_src > 1
        if per_layer and all(i < n_src for i in layer_sources):
            config[key] = [value[i] for i in layer_sources]

"""From a validated plan to a checkpoint on disk: layout, provenance, non-tensor files, commit."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mmerge.engine.execute import Execution, execute
from mmerge.engine.plan import Plan
from mmerge.engine.quantized_output import Requantization, output_config

# Weight files and indexes are never copied: the merged tensors replace them.
_SKIP_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")
_SKIP_NAMES = {"model.safetensors.index.json", "pytorch_model.bin.index.json"}


def files_to_copy(checkpoint_path: Path) -> list[Path]:
    """Non-tensor files of an HF folder (config, tokenizer, generation config, ...)."""
    if not checkpoint_path.is_dir():
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
    out_dtype_name: str | None = None  # recorded as torch_dtype in a copied config.json
    requantization: Requantization | None = None  # fp8 tensors written with block scales


def layout_for(path: Path, shard_size: int | None) -> str:
    """A name ending in .safetensors is one file (unless sharded); any other name, an HF folder."""
    return "file" if path.suffix == ".safetensors" and shard_size is None else "folder"


def write_plan(plan: Plan, checkpoints: Sequence, options: OutputOptions, run: Execution) -> Path:
    """Execute `plan` into a new checkpoint at `options.path`; nothing appears there until done."""
    from mmerge.io import StreamingWriter, TensorSpec
    from mmerge.io.requantize import BlockQuantizer, fp8_specs

    specs = [TensorSpec(item.name, item.out_dtype, item.shape) for item in plan.items]
    requant = options.requantization
    if requant is not None:
        specs = fp8_specs(specs, requant.names, requant.block)
    layout = layout_for(options.path, options.shard_size)
    with StreamingWriter(
        options.path,
        specs,
        shard_size=options.shard_size,
        metadata=provenance(plan, checkpoints),
        inputs=[c.path for c in checkpoints],
        resume=options.resume,
        layout=layout,
    ) as writer:
        sink = writer
        if requant is not None:
            shapes = {item.name: item.shape for item in plan.items if item.name in requant.names}
            sink = BlockQuantizer(writer, shapes, requant.block, requant.ue8m0)
        execute(plan, sink, run)
        if layout == "folder" and options.copy_files_from is not None:
            _copy_files(writer, options)
        return writer.commit()


def _copy_files(writer, options: OutputOptions) -> None:
    for src in files_to_copy(options.copy_files_from):
        config = json.loads(src.read_text()) if src.name == "config.json" else None
        if isinstance(config, dict) and output_config(
            config, options.requantization, options.out_dtype_name
        ):
            with tempfile.TemporaryDirectory(prefix="mmerge-config-") as tmp:
                out = Path(tmp) / "config.json"
                out.write_text(json.dumps(config, indent=2) + "\n")
                writer.add_file(out)
        else:
            writer.add_file(src)

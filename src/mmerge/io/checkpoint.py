"""Open a checkpoint (one file, a sharded Hugging Face folder, or a folder of files) as one
read-only mapping from tensor name to lazy tensor ref; fp8 tensors with scales appear as the
dequantized tensors they stand for."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath

from mmerge.errors import FormatError
from mmerge.io.header import Header, read_header
from mmerge.io.quant_config import read_config
from mmerge.io.quantization import Quantization, dequantized
from mmerge.io.tensor_ref import MappedFile, TensorRef

INDEX_NAME = "model.safetensors.index.json"
SUFFIX = ".safetensors"


class Checkpoint(Mapping[str, TensorRef]):
    """A model on disk: tensor refs in file order (index order for sharded folders).

    `quantization` describes the fp8 scheme recognised, if any: its tensors are QuantizedRefs
    and its scale tensors are not in the mapping.
    """

    def __init__(
        self,
        path: Path,
        headers: list[tuple[Path, Header]],
        maps: list[MappedFile],
        refs: dict[str, TensorRef],
        quantization: Quantization | None = None,
    ):
        self.path = path
        self.quantization = quantization
        self.files = [f for f, _ in headers]
        self.is_folder = path.is_dir()
        self._headers = headers
        self._maps = maps
        self._refs = refs
        self.metadata: dict[str, str] = {}
        for _, header in headers:
            self.metadata.update(header.metadata)

    def __getitem__(self, name: str) -> TensorRef:
        return self._refs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._refs)

    def __len__(self) -> int:
        return len(self._refs)

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self)} tensors, {len(self.files)} files)"

    @property
    def nbytes(self) -> int:
        """Total bytes of tensor data."""
        return sum(ref.nbytes for ref in self._refs.values())

    def header_digest(self) -> str:
        """sha256 (hex) over every file's raw header, files sorted by name: identifies the
        checkpoint's tensors, dtypes, shapes and metadata for provenance (see spec/format.md)."""
        h = hashlib.sha256()
        for path, header in sorted(self._headers, key=lambda ph: ph[0].name):
            h.update(path.name.encode("utf-8") + b"\0")
            h.update(struct.pack("<Q", len(header.raw)) + header.raw)
        return h.hexdigest()

    def close(self) -> None:
        """Unmap every file (arrays still viewing a map keep it alive until they are freed)."""
        for m in self._maps:
            m.close()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint(path: str | Path, *, dequantize: bool = True) -> Checkpoint:
    """Open a `.safetensors` file, a folder with `model.safetensors.index.json` and its shards,
    or a folder of `.safetensors` files; every header is validated before anything is mapped.

    Quantized tensors are recognised from the folder's config.json and the tensor names and read
    as their dequantized values; unsupported schemes raise QuantizationError. `dequantize=False`
    gives every stored tensor as it is (for inspecting a checkpoint mmerge cannot merge).
    """
    path = Path(path)
    if path.is_dir():
        index = path / INDEX_NAME
        if index.exists():
            files, order = _read_index(index)
        else:
            files = sorted(p for p in path.iterdir() if p.name.endswith(SUFFIX) and p.is_file())
            if not files:
                raise FormatError(f"{path}: folder has no {INDEX_NAME} and no *{SUFFIX} files")
            order = None
    elif path.is_file():
        files, order = [path], None
    elif path.exists():
        raise FormatError(f"{path}: not a regular file or folder")
    else:
        raise FormatError(f"{path}: no such file or folder")
    headers = [(f, read_header(f)) for f in files]
    maps = [MappedFile(f) for f in files]
    quantization = None
    try:
        refs = _collect(headers, maps, order, path / INDEX_NAME)
        if dequantize:
            refs, quantization = dequantized(refs, read_config(path), path)
    except FormatError:
        for m in maps:
            m.close()
        raise
    return Checkpoint(path, headers, maps, refs, quantization)


def _collect(
    headers: list[tuple[Path, Header]],
    maps: list[MappedFile],
    order: dict[str, Path] | None,
    index: Path,
) -> dict[str, TensorRef]:
    """Tensor refs of every file, in file order or, for an index, in its weight_map order."""
    refs: dict[str, TensorRef] = {}
    for (f, header), mapped in zip(headers, maps, strict=True):
        for entry in header.entries:
            if entry.name in refs:
                first = refs[entry.name].file
                raise FormatError(f"{f}: tensor {entry.name!r} is also in {first}")
            if order is not None and order.get(entry.name) != f:
                raise FormatError(
                    f"{f}: tensor {entry.name!r} is not mapped to this shard by {index}"
                )
            refs[entry.name] = TensorRef(entry, mapped)
    if order is None:
        return refs
    missing = [name for name in order if name not in refs]
    if missing:
        raise FormatError(
            f"{index}: tensor {missing[0]!r} is not in its shard {order[missing[0]].name}"
        )
    return {name: refs[name] for name in order}


def _read_index(index: Path) -> tuple[list[Path], dict[str, Path]]:
    """Shard files (in first-use order) and name -> shard from a Hugging Face index."""
    try:
        obj = json.loads(index.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FormatError(f"{index}: cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{index}: not valid JSON: {str(exc)[:200]}") from None
    weight_map = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(weight_map, dict):
        raise FormatError(f"{index}: no 'weight_map' object")
    folder = index.parent
    order: dict[str, Path] = {}
    files: dict[Path, None] = {}
    for name, shard in weight_map.items():
        order[name] = _shard_path(index, folder, name, shard)
        files[order[name]] = None
    return list(files), order


def _shard_path(index: Path, folder: Path, name: str, shard: object) -> Path:
    """The shard file of tensor `name`: a relative path inside the folder (checked by its
    spelling, so symlinked shards such as the Hub cache's still work), which must exist."""
    where = f"{index}: tensor {name!r}"
    if not isinstance(shard, str) or not shard:
        raise FormatError(f"{where}: shard {shard!r} is not a file name")
    parts = PurePosixPath(shard.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts or ":" in shard:
        raise FormatError(f"{where}: shard {shard!r} is outside the checkpoint folder")
    target = folder.joinpath(*parts.parts)
    if not target.is_file():
        raise FormatError(f"{where}: shard {shard!r} does not exist")
    return target

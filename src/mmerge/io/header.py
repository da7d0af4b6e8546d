"""Safetensors headers: read and validate one file's header, or build one for the writer.

A file is `u64 little-endian N`, then N bytes of JSON, then the data region. Every rule checked
here is listed in spec/format.md; each failure is a FormatError naming the file and tensor.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from mmerge.errors import FormatError, InvalidInput
from mmerge.io.dtypes import DTYPES, DType

MAX_HEADER_BYTES = 100_000_000
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class Entry:
    """One tensor as the header describes it; offsets are absolute within the file."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class Header:
    """A validated header: entries in header order, metadata, and the raw bytes (for digests)."""

    entries: list[Entry]
    metadata: dict[str, str]
    raw: bytes


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_header(path: Path) -> Header:
    """Read and validate the header of the safetensors file at `path` (the data is not read)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise FormatError(f"{path}: {size} bytes is too short for a safetensors file")
            prefix = f.read(8)
            (n,) = struct.unpack("<Q", prefix)
            if n > min(MAX_HEADER_BYTES, size - 8) and (kind := _other_format(prefix)):
                raise FormatError(f"{path}: not a safetensors file ({kind})")
            if n > MAX_HEADER_BYTES:
                raise FormatError(
                    f"{path}: header length {n} exceeds the {MAX_HEADER_BYTES} byte cap"
                )
            if n > size - 8:
                raise FormatError(
                    f"{path}: header length {n} runs past the end of the file ({size})"
                )
            raw = f.read(n)
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) != n:
        raise FormatError(f"{path}: file shrank while reading its header")
    return parse_header(path, raw, size)


_MAGIC = {
    b"PK\x03\x04": "a zip archive, as PyTorch's .bin/.pt checkpoints are; convert it to "
    "safetensors first",
    b"GGUF": "a GGUF file; convert it to safetensors first",
    b"\x80": "a Python pickle; mmerge never unpickles, convert it to safetensors first",
}


def _other_format(prefix: bytes) -> str | None:
    """What a file whose first 8 bytes are no plausible header length looks like, if known."""
    for magic, what in _MAGIC.items():
        if prefix.startswith(magic):
            return what
    if all(32 <= b < 127 or b in b"\t\n\r" for b in prefix):
        shown = prefix.decode("ascii").replace("\n", " ").strip()
        return f"it is text, beginning {shown!r}"
    return None


def parse_header(path: Path, raw: bytes, file_size: int) -> Header:
    """Validate the JSON header `raw` of a file of `file_size` bytes."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FormatError(f"{path}: header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(obj, dict):
        raise FormatError(f"{path}: header is not a JSON object")
    metadata = _metadata(path, obj.pop(METADATA_KEY, None))
    data_start = 8 + len(raw)
    entries = [_entry(path, name, spec, data_start) for name, spec in obj.items()]
    _check_layout(path, entries, data_start, file_size)
    return Header(entries, metadata, raw)


def _metadata(path: Path, meta: object) -> dict[str, str]:
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise FormatError(f"{path}: {METADATA_KEY} is not a JSON object")
    for key, value in meta.items():
        if not isinstance(value, str):
            raise FormatError(
                f"{path}: {METADATA_KEY} value of {key!r} is {type(value).__name__}, not a string"
            )
    return meta


def _entry(path: Path, name: str, spec: object, data_start: int) -> Entry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(spec, dict):
        raise FormatError(f"{where}: entry is not a JSON object")
    code, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(code, str) or code not in DTYPES:
        raise FormatError(f"{where}: unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise FormatError(
            f"{where}: data_offsets {offsets!r} are not [begin, end] with 0 <= begin <= end"
        )
    dtype = DTYPES[code]
    span = offsets[1] - offsets[0]
    if _nbytes_upto(shape, dtype.itemsize, span) != span:
        shown = str(shape) if len(shape) <= 8 else f"of {len(shape)} dimensions"
        raise FormatError(
            f"{where}: data_offsets span {span} bytes, which does not fit shape {shown} of {code}"
        )
    return Entry(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def _nbytes_upto(shape: list[int], itemsize: int, limit: int) -> int:
    """The byte size of `shape`, or limit + 1 once it is known to exceed `limit` (so a hostile
    shape of huge dimensions never builds a huge integer)."""
    if 0 in shape:
        return 0
    n = itemsize
    for d in shape:
        n *= d
        if n > limit:
            return limit + 1
    return n


def _check_layout(path: Path, entries: list[Entry], data_start: int, file_size: int) -> None:
    """Tensors must tile the data region exactly: in offset order, no overlap, no holes."""
    pos, last = data_start, None
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.start < pos:
            raise FormatError(f"{path}: tensor {e.name!r} overlaps the tensor before it")
        if e.start > pos:
            raise FormatError(
                f"{path}: tensor {e.name!r} leaves a hole of {e.start - pos} bytes before it"
            )
        pos, last = e.end, e
    if pos == file_size:
        return
    sizes = f"(data ends at {pos}, the file at {file_size})"
    if last is None:
        raise FormatError(f"{path}: no tensors, but {file_size - pos} bytes of data {sizes}")
    if pos > file_size:
        raise FormatError(f"{path}: tensor {last.name!r} runs past the end of the file {sizes}")
    raise FormatError(
        f"{path}: the last tensor {last.name!r} ends {file_size - pos} bytes short of the file "
        f"end {sizes}"
    )


def build_header(
    tensors: list[tuple[str, str, tuple[int, ...], int, int]], metadata: dict[str, str]
) -> bytes:
    """The header bytes (length prefix, JSON, space padding to 8 bytes) for tensors given as
    (name, dtype code, shape, begin, end) with offsets relative to the data region."""
    obj: dict[str, object] = {}
    if metadata:
        obj[METADATA_KEY] = metadata
    for name, code, shape, begin, end in tensors:
        obj[name] = {"dtype": code, "shape": list(shape), "data_offsets": [begin, end]}
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def check_metadata(metadata: object) -> dict[str, str]:
    """A copy of `metadata` after checking it maps strings to strings (TypeError otherwise)."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict of str to str, got {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"metadata must map str to str: {key!r} -> {type(value).__name__} "
                "(encode other values as JSON text)"
            )
    return dict(metadata)


def check_name(name: object) -> str:
    """A tensor name the format can hold: UTF-8 encodable text other than the metadata key."""
    if not isinstance(name, str) or name == METADATA_KEY:
        raise InvalidInput(f"invalid tensor name {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"tensor name {name!r} is not valid Unicode text") from None
    return name

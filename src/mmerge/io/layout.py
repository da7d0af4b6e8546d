"""Output layout: where every tensor of a checkpoint about to be written goes (file, offset)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mmerge.errors import InvalidInput
from mmerge.io.dtypes import DType, dtype_info
from mmerge.io.header import build_header, check_name

DEFAULT_SHARD_SIZE = 5 * 10**9


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor announced to the writer before any data: name, dtype code, shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        check_name(self.name)
        dtype_info(self.dtype)
        shape = tuple(self.shape)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise InvalidInput(f"{self.name}: shape {self.shape!r} is not non-negative integers")
        object.__setattr__(self, "shape", shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * dtype_info(self.dtype).itemsize


@dataclass(frozen=True)
class Slot:
    """Where one tensor's bytes go: shard number and absolute byte offset in that file."""

    spec: TensorSpec
    dtype: DType
    shard: int
    offset: int


@dataclass(frozen=True)
class Shard:
    """One output file: its name, header bytes and total size."""

    name: str
    header: bytes
    size: int


def shard_name(k: int, n: int) -> str:
    """The Hugging Face shard file name for shard k (0-based) of n."""
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


def split_shards(specs: list[TensorSpec], shard_size: int) -> list[list[TensorSpec]]:
    """Group specs, in order, into shards of at most `shard_size` tensor bytes; a tensor larger
    than the limit gets a shard of its own. There is always at least one shard."""
    groups: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if groups[-1] and used + spec.nbytes > shard_size:
            groups.append([])
            used = 0
        groups[-1].append(spec)
        used += spec.nbytes
    return groups


def plan_layout(
    groups: list[list[TensorSpec]], metadata: dict[str, str], names: list[str]
) -> tuple[list[Shard], dict[str, Slot]]:
    """Headers and tensor slots for shards `groups` written under file `names`, tensors laid out
    in spec order."""
    shards: list[Shard] = []
    slots: dict[str, Slot] = {}
    for k, group in enumerate(groups):
        rows, pos = [], 0
        for spec in group:
            rows.append((spec.name, spec.dtype, spec.shape, pos, pos + spec.nbytes))
            pos += spec.nbytes
        header = build_header(rows, metadata)
        for spec, (_, _, _, begin, _) in zip(group, rows, strict=True):
            slots[spec.name] = Slot(spec, dtype_info(spec.dtype), k, len(header) + begin)
        shards.append(Shard(names[k], header, len(header) + pos))
    return shards, slots

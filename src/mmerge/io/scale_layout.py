"""How a scale tensor covers its fp8 tensor: per tensor, per channel, per group or per
block of the last two dimensions (spec/format.md section 6)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from mmerge.errors import QuantizationError

DEFAULT_BLOCK = (128, 128)  # DeepSeek's blocks, implied by `_scale_inv` without a config


@dataclass(frozen=True)
class Layout:
    """How one scale tensor covers its fp8 tensor, over the last two dimensions (a 1-D tensor
    is one row; leading dimensions have their own scales): one scale for the whole tensor
    ("tensor"), per row ("channel"), per `size[1]` elements of a row ("group") or per
    `size[0]` x `size[1]` block ("block")."""

    kind: str
    size: tuple[int, int] = (1, 1)

    def block(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """Rows and columns of `shape` that share one scale."""
        *_, rows, cols = matrix_shape(shape)
        if self.kind == "tensor":
            return rows, cols
        if self.kind == "channel":
            return 1, cols
        return self.size

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The scale shape this layout gives a tensor of `shape` (() for one scale)."""
        if self.kind == "tensor":
            return ()
        *lead, rows, cols = matrix_shape(shape)
        b0, b1 = self.block(shape)
        return (*lead, -(-rows // b0), -(-cols // b1))

    def fits(self, scale: tuple[int, ...], shape: tuple[int, ...]) -> bool:
        """Whether a scale tensor of shape `scale` follows this layout for `shape`."""
        if self.kind == "tensor":
            return math.prod(scale) == 1
        grid = self.grid(shape)
        if tuple(scale) == grid:
            return True
        return self.kind == "channel" and tuple(scale) == grid[:-1]  # (rows,) for (rows, 1)

    def describe(self) -> str:
        if self.kind == "block":
            return f"{self.size[0]}x{self.size[1]} blocks"
        if self.kind == "group":
            return f"groups of {self.size[1]}"
        return f"per-{self.kind}"


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """`shape` with at least two dimensions: a vector is one row, a scalar one element."""
    return (1,) * max(0, 2 - len(shape)) + tuple(shape)


def block_layout(value: Any, where: str) -> Layout:
    """A block layout from a config's [rows, cols] (or compressed-tensors' "RxC")."""
    if isinstance(value, str):
        parts = value.lower().split("x")
        value = [int(p) for p in parts] if all(p.isdigit() for p in parts) else value
    ok = isinstance(value, (list, tuple)) and len(value) == 2
    if not ok or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise QuantizationError(f"{where}: block size {value!r} is not two positive integers")
    return Layout("block", (value[0], value[1]))

"""Which part of a model a tensor belongs to: a layer index, or embed / head / other."""

from __future__ import annotations

import re

from mmerge.engine.layers import layer_index

_EMBED = re.compile(r"embed|(?:^|\.)(?:wte|wpe|tok_embeddings)(?:\.|$)")
_HEAD = re.compile(
    r"(?:^|\.)(?:lm_head|head|output|classifier|score|norm|ln_f|final_layer_?norm)(?:\.|$)"
)
_ORDER = {"embed": 0, "head": 2, "other": 3}


def group_of(name: str) -> int | str:
    """A tensor's layer index (`layers.N.`, `h.N.`, `blocks.N.`), else "embed", "head" or
    "other", so that figures can be summed per layer."""
    index = layer_index(name)
    if index is not None:
        return index
    if _EMBED.search(name):
        return "embed"
    if _HEAD.search(name):
        return "head"
    return "other"


def group_order(group: int | str) -> tuple[int, int]:
    """Sort key: embed, layers 0..N, head, other (the order data flows through a model)."""
    if isinstance(group, int):
        return (1, group)
    return (_ORDER[group], 0)

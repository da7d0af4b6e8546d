"""Layer indices read from tensor names (`model.layers.12.mlp...` -> 12)."""

from __future__ import annotations

import re
from collections.abc import Iterable

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def layer_index(name: str) -> int | None:
    """The transformer layer a tensor belongs to, or None for embeddings, final norm, head."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def layer_count(names: Iterable[str]) -> int:
    """Number of layers: one more than the largest layer index among `names` (0 if none)."""
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def rename_layer(name: str, new_index: int) -> str:
    """`name` with its layer index replaced by `new_index` (for layer stacking)."""
    m = _LAYER.search(name)
    if m is None:
        return name
    return name[: m.start(1)] + str(new_index) + name[m.end(1) :]


_EMBEDDING = re.compile(r"embed|(?:^|\.)(?:wte|wpe|tok_embeddings)\.")


def is_embedding(name: str) -> bool:
    """True for token and position embeddings (`model.embed_tokens.weight`, GPT-2's `wte`):
    the tensors before the layers, as opposed to the final norm and head after them."""
    return layer_index(name) is None and _EMBEDDING.search(name) is not None

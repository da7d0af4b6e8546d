"""LoRA adapters: apply them to a base, combine several into one, extract one from a fine-tune.

`apply`, `combine` and `extract` stream like every merge (see spec/lora.md); importing this
package imports none of them until used, and never PEFT or torch.
"""

from __future__ import annotations

__all__ = ["apply", "combine", "extract"]


def __getattr__(name: str):
    if name == "apply":
        from mmerge.lora.applying import apply

        return apply
    if name == "combine":
        from mmerge.lora.combining import combine

        return combine
    if name == "extract":
        from mmerge.lora.extracting import extract

        return extract
    raise AttributeError(f"module 'mmerge.lora' has no attribute {name!r}")

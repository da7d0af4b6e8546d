"""LoRA adapters: apply them to a base, combine several into one, extract one from a fine-tune.

`apply`, `combine` and `extract` stream like every merge (see spec/lora.md); importing this
package imports none of them until used, and never PEFT or torch.
"""

from __future__ import annotations

from mmerge.lazy import attributes

__all__ = ["apply", "combine", "extract"]
__getattr__ = attributes(
    __name__, {"apply": "applying", "combine": "combining", "extract": "extracting"}
)

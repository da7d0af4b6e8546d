"""What `lora combine` and `lora extract` produced: per module, the rank and the share of the
delta's energy (squared Frobenius norm) the adapter keeps."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmerge.errors import InvalidInput


@dataclass(frozen=True)
class ModuleReport:
    """One LoRA module of the output: its rank and the energy it keeps (1.0 when exact)."""

    module: str
    rank: int
    energy: float


@dataclass
class AdapterResult:
    """The adapter written (or, for a dry run, planned)."""

    output: Path | None
    modules: dict[str, ModuleReport]
    modules_to_save: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    bytes_written: int = 0

    def summary(self) -> dict[str, Any]:
        """Counts, ranks and the lowest energy kept, for people and scripts."""
        reports = list(self.modules.values())
        worst = min(reports, key=lambda r: r.energy, default=None)
        return {
            "modules": len(reports),
            "rank_min": min((r.rank for r in reports), default=0),
            "rank_max": max((r.rank for r in reports), default=0),
            "energy_min": worst.energy if worst else 1.0,
            "energy_min_module": worst.module if worst else "",
            "energy_mean": sum(r.energy for r in reports) / len(reports) if reports else 1.0,
            "modules_to_save": len(self.modules_to_save),
            "bytes_written": self.bytes_written,
        }


def rank_settings(ranks: dict[str, int]) -> tuple[int, dict[str, int], dict[str, int]]:
    """PEFT config values giving every module its rank and a scale of exactly 1: (r, rank
    pattern, alpha pattern) with lora_alpha = r and alpha = rank wherever a pattern applies.
    Pattern keys are the escaped full module names, so each matches only its own module."""
    if not ranks:
        return 1, {}, {}
    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {re.escape(m): k for m, k in ranks.items() if k != common}
    return common, pattern, dict(pattern)


def factor_dtype(out_dtype: str | None) -> str:
    """The safetensors code adapter factors are written in: float32 unless asked otherwise."""
    from mmerge.engine.plan import dtype_code
    from mmerge.engine.quantized_output import wants_fp8

    if wants_fp8(out_dtype):
        raise InvalidInput(
            "adapters are written as float64, float32, float16 or bfloat16, not fp8 (fp8 "
            "output is for `lora apply` on an fp8 base)"
        )
    code = dtype_code(out_dtype) or "F32"
    if code not in ("F32", "F16", "BF16", "F64"):
        raise InvalidInput(
            f"adapters are written as float64, float32, float16 or bfloat16, not {out_dtype}"
        )
    return code

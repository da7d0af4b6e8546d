"""Byte counts for people: the one formatting shared by the CLI and the checkpoint description."""

from __future__ import annotations


def human(n: float) -> str:
    """Bytes for people: 2.2 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"

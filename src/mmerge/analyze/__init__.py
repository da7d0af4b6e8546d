"""`mmerge analyze`: measure, before merging, how well fine-tunes of one base will merge.

The public names are imported when first used, so that `mmerge --help`, which loads the
command, does not import numpy and the reader."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mmerge.analyze.result import AnalysisResult
    from mmerge.analyze.scan import analyze

__all__ = ["AnalysisResult", "analyze"]
_WHERE = {"AnalysisResult": "result", "analyze": "scan"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"mmerge.analyze.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'mmerge.analyze' has no attribute {name!r}")

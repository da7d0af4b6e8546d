"""`mmerge analyze`: measure, before merging, how well fine-tunes of one base will merge.

The public names are imported when first used, so that `mmerge --help`, which loads the
command, does not import numpy and the reader."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mmerge.lazy import attributes

if TYPE_CHECKING:
    from mmerge.analyze.result import AnalysisResult
    from mmerge.analyze.scan import analyze

__all__ = ["AnalysisResult", "analyze"]
__getattr__ = attributes(__name__, {"AnalysisResult": "result", "analyze": "scan"})

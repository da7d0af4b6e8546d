"""`mmerge analyze`: measure, before merging, how well fine-tunes of one base will merge."""

from mmerge.analyze.result import AnalysisResult
from mmerge.analyze.scan import analyze

__all__ = ["AnalysisResult", "analyze"]

"""`mmerge evolve`: search a recipe's ranges for the merge an evaluator scores best, on Optuna.

    import mmerge
    summary = mmerge.evolve("search.yaml", "python eval.py {model}", trials=100, out="runs/a")
    summary.best_recipe          # a recipe dict, runnable by mmerge.engine.api.run_recipe
    print(mmerge.evolve.report("runs/a").text())

This package is the only place that imports Optuna, and only when a search or a report runs:
`import mmerge` and `mmerge --help` do not import it. The package itself is callable, so
`mmerge.evolve(...)` is `mmerge.evolve.evolve(...)`.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from mmerge.lazy import attributes

_WHERE = {
    "evolve": "api",
    "report": "api",
    "TrialFailed": "evaluate",
    "EvolveError": "search",
    "TrialEvent": "search",
    "SearchError": "space",
    "SearchSpace": "space",
    "load_search": "space",
    "StudySummary": "summary",
}
__all__ = sorted(_WHERE)
__getattr__ = attributes(__name__, _WHERE)


class _CallableModule(types.ModuleType):
    """Importing `mmerge.evolve` binds this package as the attribute `mmerge.evolve`; calling
    it runs the search, so `mmerge.evolve(...)` keeps working after the import."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from mmerge.evolve.api import evolve

        return evolve(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

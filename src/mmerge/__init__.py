"""mmerge: merge fine-tunes of one base model, streaming, on any array library.

`import mmerge` stays light: numpy and the standard library only; backends such as
torch, cupy and mlx are imported when a merge asks for them.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "evolve", "merge", "merge_tensors", "methods"]


def __getattr__(name: str):
    # Lazy attributes keep `import mmerge` fast and free of optional frameworks.
    if name in ("merge", "merge_tensors"):
        from mmerge.engine import api

        return getattr(api, name)
    if name in ("methods", "evolve"):  # evolve: a callable package, `mmerge.evolve(...)`
        import importlib

        return importlib.import_module(f"mmerge.{name}")
    raise AttributeError(f"module 'mmerge' has no attribute {name!r}")

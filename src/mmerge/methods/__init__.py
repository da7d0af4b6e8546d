"""Merge methods, each a `MethodSpec` callable: `ties(tensors, base=b, density=0.5)`.

Importing this package imports every module in it, and each module registers its methods; so
adding a method is adding a module (plus its section in spec/methods.md and its test vectors).
`get(name)` and `all_methods()` read the table; every method is also an attribute here.
"""

from __future__ import annotations

import importlib
import pkgutil

from mmerge.methods.registry import REGISTRY, MethodSpec, Param, all_methods, get, register

for _module in pkgutil.iter_modules(__path__):  # in name order; shared modules register nothing
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

globals().update({spec.name: spec for spec in REGISTRY.values()})

__all__ = ["REGISTRY", "MethodSpec", "Param", "all_methods", "get", "register"] + sorted(
    {spec.name for spec in REGISTRY.values()}
)

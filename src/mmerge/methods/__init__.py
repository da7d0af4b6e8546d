# ruff: noqa: I001
"""Merge methods, each a `MethodSpec` callable: `ties(tensors, base=b, density=0.5)`.

Importing this package registers every method; `get(name)` and `all_methods()` read the table.
"""

# The import order is the registration order, which `mmerge methods` lists.
from mmerge.methods.registry import REGISTRY, MethodSpec, Param, all_methods, get, register
from mmerge.methods.linear import linear
from mmerge.methods.slerp import nuslerp, slerp
from mmerge.methods.spherical import karcher, multislerp
from mmerge.methods.task_arithmetic import (
    task_arithmetic,
    ties,
    dare_linear,
    dare_ties,
    breadcrumbs,
    breadcrumbs_ties,
    della,
    della_linear,
)
from mmerge.methods.model_stock import model_stock
from mmerge.methods.sce import sce
from mmerge.methods.nearswap import nearswap
from mmerge.methods.passthrough import passthrough

__all__ = [
    "REGISTRY",
    "MethodSpec",
    "Param",
    "all_methods",
    "get",
    "register",
    "linear",
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "task_arithmetic",
    "ties",
    "dare_linear",
    "dare_ties",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "model_stock",
    "sce",
    "nearswap",
    "passthrough",
]

"""Merge methods, each a `MethodSpec` callable: `linear(tensors, base=None, **params)`."""

from mmerge.methods.registry import REGISTRY, MethodSpec, Param, all_methods, get, register

__all__ = ["REGISTRY", "MethodSpec", "Param", "all_methods", "get", "register"]

"""array-api-compat's namespace for torch tensors, with what masks and selections are made of
done faster on the CPU. Torch's CPU kernels write booleans many times more slowly than numpy's
(a float32 comparison takes about 10x, bool to float32 3x, counting 6x), and its large results
fault in 4 KiB pages, where the masks of the trimming and sign-electing methods are made on
every chunk and a selection gathers tens of MB: booleans convert to numbers as their uint8
bytes, and comparisons, counts and concatenations of CPU tensors run as numpy's on the same
memory (exact either way). Every other name is array-api-compat's."""

from __future__ import annotations

import builtins  # `any` and friends below are the standard's, once looked up
from collections.abc import Callable
from typing import Any

import array_api_compat.torch as _compat
import numpy as np
import torch


def astype(x: Any, dtype: Any, /, *, copy: bool = True, device: Any = None) -> Any:
    """The standard's `astype`; a boolean tensor is read as its uint8 bytes first."""
    if x.dtype == torch.bool and dtype != torch.bool and device is None:
        return x.view(torch.uint8).to(dtype, copy=True)  # never the bool tensor's own bytes
    return _compat.astype(x, dtype, copy=copy, device=device)


def _host(x: Any) -> np.ndarray | None:
    """numpy's view of a plain CPU tensor's memory (None where there is none); scalars pass."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.device.type != "cpu" or x.requires_grad or x.dtype == torch.bfloat16:
        return None
    if x.is_conj() or x.is_neg():
        return None
    return x.numpy()


def _same_promotion(x1: Any, x2: Any) -> bool:
    """Whether numpy compares `x1` with `x2` in the dtype torch does: a tensor with a tensor of
    its dtype, or with a Python scalar of its kind (torch compares an integer tensor with a
    Python float in float32, numpy in float64)."""
    if not isinstance(x1, torch.Tensor):
        return False
    if isinstance(x2, torch.Tensor):
        return x1.dtype == x2.dtype
    return not (isinstance(x2, float) and not x1.is_floating_point())


def _on_host(name: str) -> Callable[[Any, Any], Any]:
    numpy_fn, fallback = getattr(np, name), getattr(_compat, name)

    def compare(x1: Any, x2: Any, /) -> Any:
        a, b = _host(x1), _host(x2)
        if a is None or b is None or not _same_promotion(x1, x2):
            return fallback(x1, x2)
        return torch.from_numpy(np.asarray(numpy_fn(a, b)))

    compare.__name__ = compare.__qualname__ = name
    compare.__doc__ = f"The standard's `{name}`, as numpy's on the memory of CPU tensors."
    return compare


greater = _on_host("greater")
greater_equal = _on_host("greater_equal")
less = _on_host("less")
less_equal = _on_host("less_equal")
equal = _on_host("equal")


def count_nonzero(x: Any, /, *, axis: Any = None, keepdims: bool = False) -> Any:
    """The standard's `count_nonzero`; numpy's on the memory of a CPU tensor (6x faster)."""
    host = _host(x)
    if host is None:
        return _compat.count_nonzero(x, axis=axis, keepdims=keepdims)
    return torch.from_numpy(np.asarray(np.count_nonzero(host, axis=axis, keepdims=keepdims)))


def concat(arrays: Any, /, *, axis: int | None = 0) -> Any:
    """The standard's `concat`; numpy's for CPU tensors, whose large results numpy allocates in
    huge pages (3x faster than torch's for the tens of MB a selection gathers)."""
    hosts = [_host(x) for x in arrays]
    if builtins.any(h is None for h in hosts) or len({x.dtype for x in arrays}) != 1:
        return _compat.concat(arrays, axis=axis)
    return torch.from_numpy(np.concatenate(hosts, axis=axis))


def __getattr__(name: str) -> Any:
    value = getattr(_compat, name)
    globals()[name] = value  # looked up once
    return value

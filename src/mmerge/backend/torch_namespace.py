"""array-api-compat's namespace for torch tensors, with one conversion done faster: booleans to
numbers. Torch's CPU kernel converts bool to float32 three times more slowly than it converts
the same bytes read as uint8 (0 and 1 either way), and the masks of the trimming and
sign-electing methods are converted on every chunk. Every other name is array-api-compat's."""

from __future__ import annotations

from typing import Any

import array_api_compat.torch as _compat
import torch


def astype(x: Any, dtype: Any, /, *, copy: bool = True, device: Any = None) -> Any:
    """The standard's `astype`; a boolean tensor is read as its uint8 bytes first."""
    if x.dtype == torch.bool and dtype != torch.bool and device is None:
        return x.view(torch.uint8).to(dtype, copy=True)  # never the bool tensor's own bytes
    return _compat.astype(x, dtype, copy=copy, device=device)


def __getattr__(name: str) -> Any:
    value = getattr(_compat, name)
    globals()[name] = value  # looked up once
    return value

"""The backends the suite runs on: an id, how to move host arrays there, which floats it has."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmerge import backend as mm_backend

ALL_FLOATS = ("float16", "bfloat16", "float32", "float64")


@dataclass(frozen=True)
class Backend:
    """One backend id of the `backend` fixture: a library on a device."""

    id: str
    library: str
    device: str | None = None
    floats: tuple[str, ...] = ALL_FLOATS
    subnormals: bool = True  # False: its kernels flush float32 subnormals to zero

    def available(self) -> tuple[bool, str]:
        """(True, '') or (False, why not), as mmerge's backend objects see it."""
        return mm_backend.available(self.library, self.device)

    def put(self, host: np.ndarray) -> Any:
        """A host array on this backend (16-bit floats keep their dtype where it exists)."""
        return mm_backend.get(self.library, self.device).from_host(host)

    def host(self, x: Any) -> np.ndarray:
        """A backend array back on the host."""
        return mm_backend.to_host(x)

    @property
    def xp(self) -> Any:
        """The array namespace of this backend's arrays."""
        return mm_backend.namespace(self.put(np.zeros(1, np.float32)))

    def float_dtypes(self) -> tuple[str, ...]:
        """The float dtypes this backend computes in here (MLX has float64 only on its CPU)."""
        if self.library == "mlx":
            import mlx.core as mx

            if mx.default_device().type != mx.cpu:
                return tuple(f for f in self.floats if f != "float64")
        return self.floats

    @contextlib.contextmanager
    def strictness(self) -> Iterator[None]:
        """array-api-strict without data-dependent shapes or boolean indexing, like MLX; a no-op
        elsewhere. Methods must not rely on either."""
        if self.library != "array_api_strict":
            yield
            return
        import array_api_strict

        with array_api_strict.ArrayAPIStrictFlags(
            boolean_indexing=False, data_dependent_shapes=False
        ):
            yield


BACKENDS = (
    Backend("numpy", "numpy"),
    Backend("array_api_strict", "array_api_strict", floats=("float32", "float64")),
    Backend("array_api_strict-no_float64", "array_api_strict", "no_float64", floats=("float32",)),
    Backend("torch", "torch", "cpu"),
    Backend("mlx", "mlx"),
    Backend("jax", "jax", floats=("float16", "bfloat16", "float32")),
    Backend("torch-cuda", "torch", "cuda"),
    # CuPy compiles every kernel with -ftz=true (cupy/cuda/compiler.py)
    Backend("cupy", "cupy", "cuda", floats=("float16", "float32", "float64"), subnormals=False),
)
BY_ID = {b.id: b for b in BACKENDS}
REFERENCE = BY_ID["numpy"]


def selected() -> tuple[Backend, ...]:
    """The backends named in MMERGE_BACKENDS (comma-separated ids), or all of them."""
    wanted = os.environ.get("MMERGE_BACKENDS", "").strip()
    if not wanted:
        return BACKENDS
    ids = [w.strip() for w in wanted.split(",") if w.strip()]
    unknown = [i for i in ids if i not in BY_ID]
    if unknown:
        raise ValueError(
            f"MMERGE_BACKENDS names unknown backend ids {unknown}; known: {', '.join(BY_ID)}"
        )
    return tuple(BY_ID[i] for i in ids)

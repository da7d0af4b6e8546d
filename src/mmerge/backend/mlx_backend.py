"""MLX (Apple silicon, unified memory; also its CPU build on Linux). Stored BF16 and F16 bits
become MLX arrays of that type and widen there; the array-API namespace is `mlx_namespace`."""

from __future__ import annotations

from typing import Any

import numpy as np

from mmerge.backend.base import Array, Backend, check_host, partitioned_kth
from mmerge.io.dtypes import DType


class MlxBackend(Backend):
    name = "mlx"
    module = "mlx.core"
    install = 'pip install "mmerge[mlx]"'

    def __init__(self, device: str | None = None) -> None:
        super().__init__(device)
        if self.device == "gpu":
            self.chunk_elements = 1 << 21  # 8 MiB of float32 per input: fewer, longer dispatches

    @classmethod
    def device_problem(cls, mx, device: str) -> str:
        if device == "cpu":
            return ""
        if device == "gpu":
            return "" if mx.is_available(mx.gpu) else "no MLX GPU available"
        return f"unknown device {device!r} (use cpu or gpu)"

    def from_host(self, host: np.ndarray) -> Array:
        import mlx.core as mx

        host = check_host(host)
        if host.dtype.name == "bfloat16":
            bits = np.ascontiguousarray(host).view(np.uint16).reshape(host.shape)
            return mx.array(bits).view(mx.bfloat16)
        from mmerge.backend import mlx_namespace

        return mlx_namespace.asarray(host)

    def to_host(self, x: Array) -> np.ndarray:
        import mlx.core as mx

        # a view of the array's memory (computed first), not a copy: numpy keeps it alive
        if x.dtype == mx.bfloat16:
            import ml_dtypes

            return np.asarray(x.view(mx.uint16)).view(ml_dtypes.bfloat16)
        return np.asarray(x)

    def from_stored(self, raw: np.ndarray, dtype: DType, compute="float32", slot=0) -> Array:
        import mlx.core as mx

        if dtype.code not in ("BF16", "F16"):
            return self.from_host(self.widen(raw, dtype, compute, slot))
        bits = mx.array(raw.view(np.uint16))
        return bits.view(getattr(mx, dtype.name)).astype(getattr(mx, compute))

    def all_finite(self, x: Array) -> bool:
        """On the CPU, numpy's check on a view of the array's memory: MLX's CPU sum takes 3x
        numpy's."""
        if self.device != "cpu":
            return super().all_finite(x)
        return _numpy().all_finite(np.asarray(x))

    def settle(self, value: Any) -> Any:
        """MLX computes lazily, on a stream of the thread that built the graph: evaluated
        elsewhere, an array made in a chunk task fails ("no Stream(cpu, 0) in current thread")."""
        import mlx.core as mx

        arrays: list = []
        _collect(value, mx.array, arrays)
        if arrays:
            mx.eval(*arrays)
        return value

    def float_bits(self, x: Array) -> Array:
        import mlx.core as mx

        return x.view(mx.int32 if x.dtype.size == 4 else mx.int64)

    def kth_largest(self, a: Array, k: int) -> tuple[int | float, int, int]:
        """On the CPU, numpy's partition of a copy (MLX arrays are immutable): 7x faster than
        MLX's partition of 11.5M entries, copy included."""
        import mlx.core as mx

        if self.device == "cpu":
            return _numpy().kth_largest(np.array(a), k)
        return partitioned_kth(self.xp, mx.partition(a, a.shape[0] - k), k)

    def ranks(self, a: Array, axis: int) -> Array:
        """On the CPU, numpy's one sort of keys on a view of the array's memory: 10x faster
        than MLX's two argsorts."""
        if self.device != "cpu":
            return super().ranks(a, axis)
        import mlx.core as mx

        return mx.array(_numpy().ranks(np.asarray(a), axis))

    def keep_mask(self, n: int, threshold, keys: tuple[int, int], start: int = 0) -> Array:
        """On the CPU, numpy's uint32 form (16x faster than MLX's int64 arithmetic), copied in
        as bytes."""
        if self.device != "cpu":
            return super().keep_mask(n, threshold, keys, start)
        import mlx.core as mx

        cut = threshold if isinstance(threshold, int) else np.asarray(threshold)
        return mx.array(_numpy().keep_mask(n, cut, keys, start))


def _numpy() -> Backend:
    """The numpy backend, whose kernels MLX's CPU build borrows where they are many times
    faster."""
    from mmerge.backend import get

    return get("numpy")


def _collect(value: Any, kind: type, out: list) -> None:
    """The arrays of type `kind` inside nested tuples, lists and dicts."""
    if isinstance(value, kind):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _collect(v, kind, out)
    elif isinstance(value, dict):
        for v in value.values():
            _collect(v, kind, out)

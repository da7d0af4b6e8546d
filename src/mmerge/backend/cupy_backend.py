"""CuPy on a CUDA GPU. CuPy has no bfloat16: BF16 bits travel as uint16 and widen on the GPU by a
16-bit shift (exact); F16 travels and widens natively; F8 widens on the host."""

from __future__ import annotations

import numpy as np

from mmerge.backend.base import Array, Backend, check_host, partitioned_kth
from mmerge.backend.torch_backend import cuda_index
from mmerge.io.dtypes import DTYPES, DType, widen_to_float32


class CupyBackend(Backend):
    name = "cupy"
    module = "cupy"
    install = 'pip install "mmerge[cupy]"'
    default_device = "cuda"
    chunk_elements = 1 << 24  # 64 MiB of float32 per input: long transfers, few calls

    @classmethod
    def device_problem(cls, cupy, device: str) -> str:
        index = cuda_index(device)
        if index is None:
            return f"unknown device {device!r} (use cuda or cuda:N)"
        try:
            count = cupy.cuda.runtime.getDeviceCount()
        except Exception:  # no driver, no GPU
            count = 0
        return "" if index < count else f"no CUDA device {device!r} (found {count})"

    def _device(self):
        import cupy

        return cupy.cuda.Device(cuda_index(self.device))

    def from_host(self, host: np.ndarray) -> Array:
        import cupy

        host = check_host(host)
        if host.dtype.name == "bfloat16":  # no bfloat16 in cupy: float32, the compute dtype
            wide = np.empty(host.shape, np.float32)
            host = widen_to_float32(host.reshape(-1), DTYPES["BF16"], wide.reshape(-1))
            host = wide
        with self._device():
            return cupy.asarray(host)

    def to_host(self, x: Array) -> np.ndarray:
        import cupy

        return cupy.asnumpy(x)

    def from_stored(self, raw: np.ndarray, dtype: DType, compute="float32", slot=0) -> Array:
        import cupy

        if dtype.code not in ("BF16", "F16"):
            return self.from_host(self.widen(raw, dtype, compute, slot))
        with self._device():
            bits = cupy.asarray(raw)
            if dtype.code == "F16":
                return bits.astype(compute)
            wide = (bits.astype(cupy.uint32) << 16).view(cupy.float32)
            return wide if compute == "float32" else wide.astype(compute)

    def float_bits(self, x: Array) -> Array:
        import cupy

        return x.view(cupy.int32 if x.dtype.itemsize == 4 else cupy.int64)

    def bincount(self, x: Array, length: int, where: Array | None = None) -> np.ndarray:
        import cupy

        values = x.reshape(-1) if where is None else x.reshape(-1)[where.reshape(-1)]
        counts = cupy.bincount(values, minlength=length)
        return cupy.asnumpy(counts).astype(np.int64, copy=False)

    def compress(self, x: Array, where: Array) -> tuple[Array, Array]:
        import cupy

        index = cupy.flatnonzero(where)
        return x.reshape(-1)[index], index

    def kth_largest(self, a: Array, k: int) -> tuple[int | float, int, int]:
        a.partition(a.shape[0] - k)
        return partitioned_kth(self.xp, a, k)

    def array_device(self):
        return self._device()

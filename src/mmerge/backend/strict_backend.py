"""array-api-strict: the standard and nothing more, on its CPU device or its test devices (one
without float64). It has no 16-bit floats: they arrive as float32, the compute dtype."""

from __future__ import annotations

import numpy as np

from mmerge.backend.base import Array, Backend, check_host
from mmerge.errors import InvalidInput
from mmerge.io.dtypes import DTYPES, widen_to_float32

DEVICES = ("CPU_DEVICE", "device1", "device2", "no_float64", "no_x64")


class StrictBackend(Backend):
    name = "array_api_strict"
    module = "array_api_strict"
    install = "pip install array-api-strict"

    @classmethod
    def device_problem(cls, lib, device: str) -> str:
        if device == "cpu" or device in DEVICES:
            return ""
        return f"unknown array_api_strict device {device!r} (cpu or {', '.join(DEVICES)})"

    @property
    def device_name(self) -> str:
        return "CPU_DEVICE" if self.device == "cpu" else self.device

    def _device(self):
        import array_api_strict as xp

        return xp.Device(self.device_name)

    def from_host(self, host: np.ndarray) -> Array:
        import array_api_strict as xp

        wanted = check_host(host)
        if wanted.dtype.name == "bfloat16":
            wide = np.empty(wanted.shape, np.float32)
            widen_to_float32(wanted.reshape(-1).view(np.uint16), DTYPES["BF16"], wide.reshape(-1))
            wanted = wide
        if wanted.dtype == np.float16:
            wanted = wanted.astype(np.float32)
        where = self._device()
        if wanted.dtype.name not in xp.__array_namespace_info__().dtypes(device=where):
            raise InvalidInput(
                f"array_api_strict device {self.device_name!r} has no {wanted.dtype} dtype"
            )
        return xp.asarray(wanted, device=where)

    def to_host(self, x: Array) -> np.ndarray:
        import array_api_strict as xp

        return np.asarray(x.to_device(xp.Device("CPU_DEVICE")))

    def array_device(self):
        return self._device()

"""JAX on its CPU or a GPU (float64 only with jax_enable_x64)."""

from __future__ import annotations

import numpy as np

from mmerge.backend.base import Array, Backend, check_host
from mmerge.backend.torch_backend import cuda_index
from mmerge.errors import InvalidInput


class JaxBackend(Backend):
    name = "jax"
    module = "jax"
    install = "pip install jax"

    @classmethod
    def device_problem(cls, jax, device: str) -> str:
        platform = "gpu" if device.startswith("cuda") else device
        try:
            jax.devices(platform)
        except RuntimeError:
            return f"no jax device {device!r}"
        return ""

    def from_host(self, host: np.ndarray) -> Array:
        import jax
        import jax.numpy as jnp

        host = check_host(host)
        if host.dtype == np.float64 and not jax.config.jax_enable_x64:
            raise InvalidInput("jax keeps float64 only with jax_enable_x64 set (or use float32)")
        platform = "gpu" if self.device.startswith("cuda") else self.device
        index = cuda_index(self.device) or 0
        return jax.device_put(jnp.asarray(host), jax.devices(platform)[index])

    def to_host(self, x: Array) -> np.ndarray:
        return np.asarray(x)

    def float_bits(self, x: Array) -> Array:
        import jax
        import jax.numpy as jnp

        return jax.lax.bitcast_convert_type(x, jnp.int32 if x.dtype.itemsize == 4 else jnp.int64)

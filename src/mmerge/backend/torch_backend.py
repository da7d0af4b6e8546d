"""PyTorch on the CPU, a CUDA GPU or Apple's MPS. Stored bytes travel as they are (BF16, F16 and
F8 bits, half the bytes of float32 or less) through a reused staging buffer, pinned for CUDA, and
widen on the device."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import numpy as np

from mmerge.backend import rng
from mmerge.backend.base import Array, Backend, check_host, partitioned_kth
from mmerge.io.dtypes import DType

_SIGNED = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}
_TOP = -(1 << 31)  # the sign bit of an int32: flipping it maps unsigned order onto signed order


def _int32(value: int) -> int:
    """The 32-bit pattern `value` (0 .. 2**32-1) as the int32 that holds it."""
    return value - (1 << 32) if value >= 1 << 31 else value


def cuda_index(device: str) -> int | None:
    """The device index of 'cuda' / 'cuda:N' (0 for plain 'cuda'); None for other names."""
    if device == "cuda":
        return 0
    head, _, index = device.partition(":")
    return int(index) if head == "cuda" and index.isdigit() else None


class TorchBackend(Backend):
    name = "torch"
    module = "torch"
    install = 'pip install "mmerge[torch]"'

    def __init__(self, device: str | None = None) -> None:
        super().__init__(device)
        self.on_gpu = self.device != "cpu"
        if cuda_index(self.device) is not None:
            self.chunk_elements = 1 << 24  # 64 MiB of float32 per input: long transfers, few calls

    @classmethod
    def device_problem(cls, torch, device: str) -> str:
        if device == "cpu":
            return ""
        if device == "mps":
            return "" if torch.backends.mps.is_available() else "no Apple GPU (mps) available"
        index = cuda_index(device)
        if index is None:
            return f"unknown device {device!r} (use cpu, cuda, cuda:N or mps)"
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return "" if index < count else f"no CUDA device {device!r} (found {count})"

    def _torch_dtype(self, name: str):
        import torch

        return getattr(torch, name)

    def _as_tensor(self, host: np.ndarray):
        """A CPU tensor sharing `host`'s memory; ml_dtypes types become their torch dtype."""
        import torch

        with warnings.catch_warnings():
            # memory-mapped checkpoints are read-only; methods never write into their inputs
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            if host.dtype.kind == "V" or host.dtype.name.startswith(("bfloat16", "float8")):
                bits = np.ascontiguousarray(host).view(_SIGNED[host.itemsize]).reshape(host.shape)
                return torch.from_numpy(bits).view(self._torch_dtype(host.dtype.name))
            return torch.from_numpy(host)

    def from_host(self, host: np.ndarray) -> Array:
        t = self._as_tensor(check_host(host))
        return t.to(self.device) if self.on_gpu else t

    def to_host(self, x: Array) -> np.ndarray:
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()

    def from_stored(self, raw: np.ndarray, dtype: DType, compute="float32", slot=0) -> Array:
        if not dtype.is_float:
            return self.from_host(self.widen(raw, dtype, compute, slot))
        bits = raw.view(_SIGNED[raw.itemsize]) if dtype.needs_widening else raw
        if self.on_gpu:
            pinned = cuda_index(self.device) is not None
            staged = self.staging(slot, bits.size, bits.dtype)
            self._wait_for_copy(slot)
            np.copyto(staged, bits)
            moved = self._as_tensor(staged).to(self.device, non_blocking=pinned)
            self._record_copy(slot)
        else:
            moved = self._as_tensor(bits)
        if dtype.needs_widening:
            moved = moved.view(self._torch_dtype(dtype.name))
        if self.on_gpu:
            return moved.to(self._torch_dtype(compute))
        # on the CPU, widen into this thread's reused buffer, as numpy does: no allocation per
        # chunk and input, so no heap churn and no page faulted in again
        out = self._as_tensor(self.staging(slot, raw.size, np.dtype(compute)))
        return out.copy_(moved)

    def new_staging(self, n: int, dtype: np.dtype) -> np.ndarray:
        if cuda_index(self.device) is None:
            return np.empty(n, dtype)
        import torch

        pinned = torch.empty(n * dtype.itemsize, dtype=torch.uint8, pin_memory=True)
        return pinned.numpy().view(dtype)

    def _events(self) -> dict:
        events = getattr(self._local, "events", None)
        if events is None:
            events = self._local.events = {}
        return events

    def _wait_for_copy(self, slot: int) -> None:
        """Block until the last transfer out of staging buffer `slot` has finished."""
        event = self._events().get(slot)
        if event is not None:
            event.synchronize()

    def _record_copy(self, slot: int) -> None:
        if cuda_index(self.device) is None:
            return
        import torch

        event = torch.cuda.Event()
        event.record()
        self._events()[slot] = event

    @contextlib.contextmanager
    def threads(self, workers: int) -> Iterator[None]:
        """On the CPU, torch's intra-op pool gets the cores divided among the engine's workers
        (one each on two cores): oversubscribed, a TIES merge took 20% longer. Restored after."""
        if self.on_gpu:
            yield
            return
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, workers)))
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def float_bits(self, x: Array) -> Array:
        import torch

        return x.view(torch.int32 if x.element_size() == 4 else torch.int64)

    def bincount(self, x: Array, length: int, where: Array | None = None) -> np.ndarray:
        import torch

        values = x.reshape(-1) if where is None else x.reshape(-1)[where.reshape(-1)]
        counts = torch.bincount(values.to(torch.int64), minlength=length)
        return counts.cpu().numpy().astype(np.int64, copy=False)

    def compress(self, x: Array, where: Array) -> tuple[Array, Array]:
        import torch

        index = torch.nonzero(where.reshape(-1)).reshape(-1)
        return x.reshape(-1)[index], index

    def kth_largest(self, a: Array, k: int) -> tuple[int | float, int, int]:
        import torch

        if a.device.type == "cpu":  # numpy's partition in place, on the same memory
            host = a.numpy()
            host.partition(host.shape[0] - k)
            return partitioned_kth(np, host, k)
        t = torch.topk(a, k, sorted=False).values.min()
        return t.item(), int(torch.count_nonzero(a > t)), int(torch.count_nonzero(a == t))

    def ranks(self, a: Array, axis: int) -> Array:
        """On the CPU, numpy's one sort of keys on the same memory (3x faster than torch's sort
        and scatter); on a GPU, the inverse of a stable sort's order."""
        import torch

        if not self.on_gpu:
            from mmerge.backend import get

            return torch.from_numpy(get("numpy").ranks(a.numpy(), axis))
        order = torch.sort(a, dim=axis, stable=True).indices
        shape = [1] * a.ndim
        shape[axis] = a.shape[axis]
        positions = torch.arange(a.shape[axis], device=a.device).reshape(shape).expand_as(order)
        return torch.empty_like(order).scatter_(axis, order, positions)

    def keep_mask(self, n: int, threshold, keys: tuple[int, int], start: int = 0) -> Array:
        """On the CPU, numpy's uint32 form on the same memory (8x faster than torch's kernels
        for this); on a GPU, `device_keep_mask`."""
        import torch

        if self.on_gpu:
            return self.device_keep_mask(n, threshold, keys, start)
        from mmerge.backend import get

        cut = threshold if isinstance(threshold, int) else threshold.numpy()
        return torch.from_numpy(get("numpy").keep_mask(n, cut, keys, start))

    def device_keep_mask(self, n: int, threshold, keys: tuple[int, int], start: int = 0) -> Array:
        """`rng.keep_mask` in int32 arithmetic (torch has no uint32 products): the same 32-bit
        patterns, with logical shifts masked out of arithmetic ones and products wrapping, and
        unsigned order compared as signed once the sign bit is flipped. Half the bytes and
        fewer operations than the portable int64 form."""
        import torch

        out = torch.empty(n, dtype=torch.bool, device=self.device)
        per_element = not isinstance(threshold, int)
        for lo, hi in rng.spans(start, start + n):
            first, last = lo & rng.M32, ((hi - 1) & rng.M32) + 1
            x = torch.arange(first, last, dtype=torch.int64, device=self.device).to(torch.int32)
            x ^= _int32(rng.block_key(keys, lo))
            for final in (False, False, True):
                x ^= (x >> 16) & 0xFFFF
                if not final:
                    x *= rng.MULTIPLIER
            part = out[lo - start : hi - start]
            if per_element:
                torch.lt(x.to(torch.int64) & rng.M32, threshold[lo - start : hi - start], out=part)
            elif threshold >= 1 << rng.BITS:
                part.fill_(True)
            elif threshold <= 0:
                part.fill_(False)
            else:
                torch.lt(x ^ _TOP, threshold + _TOP, out=part)
        return out

    def array_device(self):
        return self.device

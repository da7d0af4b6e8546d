"""The streaming writer: every output tensor is announced up front, the files are pre-sized,
and tensor data is written at its offset in any order, then the output is renamed into place."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from mmerge.errors import InvalidInput, MmergeError
from mmerge.io.checkpoint import INDEX_NAME, SUFFIX
from mmerge.io.dtypes import DTYPES, to_storage
from mmerge.io.flusher import Flusher
from mmerge.io.header import check_metadata
from mmerge.io.journal import Journal, input_identity
from mmerge.io.layout import (
    DEFAULT_SHARD_SIZE,
    Shard,
    Slot,
    TensorSpec,
    plan_layout,
    shard_name,
    split_shards,
)
from mmerge.io.output_path import (
    check_not_an_input,
    check_replaceable,
    fsync_dir,
    remove,
    replace,
)

CHUNK_BYTES = 8 << 20  # storage bytes converted and written per pwrite
LAYOUTS = ("file", "folder")


class StreamingWriter:
    """Write a checkpoint tensor by tensor at known offsets; atomic and resumable.

    Data goes to `<output>.mmerge-partial` (a file or folder) beside the output, and the resume
    journal to `<output>.mmerge-journal`; `commit` renames the partial output into place.
    Leaving a `with` block normally commits; leaving it with an exception keeps the partial
    output and journal for `resume=True`, and never puts anything under the final name.
    An existing output is replaced only with `overwrite=True`, and only once the new one is
    complete. `reserve_bytes` counts the files the caller will `add_file`, so that the space
    check at the start covers everything written. Files are written back to the disk while
    tensors are written (see `Flusher`), except with `write_back=False`: scratch files deleted
    before they are ever committed.
    """

    def __init__(
        self,
        output: str | Path,
        specs: Iterable[TensorSpec],
        *,
        shard_size: int | None = None,
        metadata: dict[str, str] | None = None,
        inputs: Sequence[str | Path] = (),
        resume: bool = False,
        layout: str | None = None,
        overwrite: bool = False,
        reserve_bytes: int = 0,
        write_back: bool = True,
    ):
        self.output = Path(output)
        self.overwrite = overwrite
        self.specs = [s if isinstance(s, TensorSpec) else TensorSpec(*s) for s in specs]
        self.layout = _resolve_layout(self.output, layout, shard_size)
        self.metadata = {"format": "pt", **check_metadata(metadata)}
        check_not_an_input(self.output, inputs)
        check_replaceable(self.output, overwrite)
        groups = self._groups(shard_size)
        names = (
            [self.output.name]
            if self.layout == "file"
            else [shard_name(k, len(groups)) for k in range(len(groups))]
        )
        self._shards, self._slots = plan_layout(groups, self.metadata, names)
        self.partial = self.output.with_name(self.output.name + ".mmerge-partial")
        self._journal = Journal(
            self.output.with_name(self.output.name + ".mmerge-journal"),
            self._layout_digest(),
            input_identity(inputs),
        )
        self._reserve = reserve_bytes
        self._lock = threading.Lock()
        self._scratch = threading.local()  # per-thread conversion buffer, reused across writes
        self._fds: list[int] = []
        self._flusher: Flusher | None = None
        self._written = dict.fromkeys(self._slots, 0)
        self._done = False
        finished = self._journal.load() if resume else None
        reuse = finished is not None and self._partial_matches()
        self._finished = set(finished) & set(self._slots) if reuse else set()
        self._digests = dict(self._journal.digests) if reuse else {}
        try:
            self.output.parent.mkdir(parents=True, exist_ok=True)
            if reuse:
                self._open_existing()
            else:
                self._create()
            if write_back:
                self._flusher = Flusher(self._fds)
            self._journal.start(
                [s.name for s in self.specs if s.name in self._finished], self._digests
            )
        except OSError as exc:
            self._fail(reuse)
            raise _disk_error(exc, self.output, self._bytes_needed()) from None
        except BaseException:
            self._fail(reuse)
            raise

    def _fail(self, reuse: bool) -> None:
        """Undo a start that failed: a fresh start leaves nothing behind."""
        self._close_files()
        if not reuse:
            remove(self.partial)
            self._journal.remove()

    # -- layout -------------------------------------------------------------------------------

    def _groups(self, shard_size: int | None) -> list[list[TensorSpec]]:
        seen: set[str] = set()
        for s in self.specs:
            if s.name in seen:
                raise InvalidInput(f"tensor {s.name!r} is listed twice in the output")
            seen.add(s.name)
        if self.layout == "file":
            return [self.specs]
        size = DEFAULT_SHARD_SIZE if shard_size is None else shard_size
        if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or size <= 0:
            raise InvalidInput(f"shard_size must be a positive number of bytes, got {size!r}")
        return split_shards(self.specs, int(size))

    def _layout_digest(self) -> str:
        h = hashlib.sha256(self.layout.encode())
        for shard in self._shards:
            h.update(b"\0" + shard.name.encode("utf-8") + b"\0" + shard.header)
        return h.hexdigest()

    def _shard_path(self, shard: Shard) -> Path:
        return self.partial if self.layout == "file" else self.partial / shard.name

    # -- creating or reopening the partial output ---------------------------------------------

    def _partial_matches(self) -> bool:
        """True when the partial output has every shard at full size with the same header."""
        for shard in self._shards:
            path = self._shard_path(shard)
            try:
                if path.stat().st_size != shard.size:
                    return False
                with open(path, "rb") as f:
                    if f.read(len(shard.header)) != shard.header:
                        return False
            except OSError:
                return False
        return True

    def _open_existing(self) -> None:
        """Reopen a matching partial output; its blocks were reserved when it was created."""
        for shard in self._shards:
            self._fds.append(os.open(self._shard_path(shard), os.O_RDWR))

    def _bytes_needed(self) -> int:
        """Everything this output writes: shards, index, journal and the caller's files."""
        index = len(self._index_bytes()) if self.layout == "folder" else 0
        journal = self._journal.bytes_needed([s.name for s in self.specs])
        return sum(s.size for s in self._shards) + index + journal + self._reserve

    def _create(self) -> None:
        remove(self.partial)
        self._journal.remove()
        _check_free_space(self.output.parent, self._bytes_needed())
        if self.layout == "folder":
            self.partial.mkdir()
        for shard in self._shards:
            fd = os.open(self._shard_path(shard), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            _preallocate(fd, shard.size)
            pwrite_all(fd, memoryview(shard.header), 0)

    # -- writing ------------------------------------------------------------------------------

    def write(self, name: str, array: np.ndarray, start: int = 0) -> None:
        """Write `array` (flattened, cast to the tensor's dtype) at element `start` of `name`.

        An array already in the storage dtype (uint16 for BF16, uint8 for F8, as
        `TensorRef.raw` returns) is written as raw bits; any other is cast by value.
        """
        slot = self._slot(name)
        scratch = getattr(self._scratch, "buffer", None)
        if scratch is None:
            scratch = self._scratch.buffer = np.empty(CHUNK_BYTES, np.uint8)
        try:
            n = write_slot(self._fds[slot.shard], slot, array, start, scratch)
        except OSError as exc:
            raise _disk_error(exc, self.output, self._bytes_needed()) from None
        with self._lock:
            self._written[name] += n
        if self._flusher is not None:
            self._flusher.wrote(slot.shard, n * slot.dtype.itemsize)

    def finish_tensor(self, name: str) -> None:
        """Mark `name` completely written: it is recorded in the journal and skipped on resume."""
        slot = self._slot(name)
        with self._lock:
            if name in self._finished:
                return
            if self._written[name] < slot.spec.numel:
                raise InvalidInput(
                    f"{name}: finished after only {self._written[name]} of "
                    f"{slot.spec.numel} elements were written"
                )
            self._journal.append(name)
            self._finished.add(name)

    def shards(self) -> list[tuple[Path, Shard, list[Slot]]]:
        """Every output file: its path in the partial output, its layout and its tensors' slots
        (in spec order), for executors that write whole shards themselves."""
        slots: list[list[Slot]] = [[] for _ in self._shards]
        for spec in self.specs:
            slot = self._slots[spec.name]
            slots[slot.shard].append(slot)
        return [(self._shard_path(s), s, slots[k]) for k, s in enumerate(self._shards)]

    def shard_digest(self, k: int) -> str | None:
        """The sha256 recorded for shard k by `finish_shard` in the resumed journal, if any."""
        return self._digests.get(self._shards[k].name)

    def finish_shard(self, k: int, digest: str) -> None:
        """Record shard k as written whole by another process (renamed into the partial output
        under its name): its digest, then each of its tensors, in the journal."""
        self._check_open()
        shard = self._shards[k]
        with self._lock:
            self._journal.record_shard(shard.name, digest)
            self._digests[shard.name] = digest
            for name, slot in self._slots.items():
                if slot.shard == k:
                    self._written[name] = slot.spec.numel
        for name, slot in self._slots.items():
            if slot.shard == k:
                self.finish_tensor(name)

    def pending(self) -> list[str]:
        """Names not finished yet, in output order (all of them on a fresh start)."""
        return [s.name for s in self.specs if s.name not in self._finished]

    def add_file(self, src: str | Path, name: str | None = None) -> None:
        """Copy a non-tensor file (config.json, tokenizer files) into a folder output."""
        self._check_open()
        if self.layout != "folder":
            raise InvalidInput(f"{self.output}: only a folder output can hold other files")
        src = Path(src)
        name = src.name if name is None else name
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            raise InvalidInput(f"{name!r} is not a plain file name")
        if name == INDEX_NAME or name.endswith(SUFFIX):
            raise InvalidInput(f"{name!r} would clash with the output's own tensor files")
        try:
            shutil.copyfile(src, self.partial / name)
        except OSError as exc:
            raise _disk_error(exc, self.output, self._bytes_needed()) from None

    def _slot(self, name: str):
        self._check_open()
        try:
            return self._slots[name]
        except KeyError:
            raise InvalidInput(f"{name!r} is not one of the output's tensors") from None

    def _check_open(self) -> None:
        if self._done:
            raise InvalidInput(f"{self.output}: the writer is already committed or aborted")

    # -- finishing ----------------------------------------------------------------------------

    def commit(self) -> Path:
        """Check every tensor is finished, flush and fsync, then rename the partial output into
        the final name (replacing an existing output) and drop the journal."""
        self._check_open()
        missing = self.pending()
        if missing:
            shown = ", ".join(repr(n) for n in missing[:3])
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise InvalidInput(f"{self.output}: tensors not written: {shown}{more}")
        check_replaceable(self.output, self.overwrite)  # it may have appeared meanwhile
        try:
            if self.layout == "folder":
                self._write_index()
            if self._flusher is not None:
                self._flusher.close()
            for fd in self._fds:
                os.fsync(fd)
        except OSError as exc:
            raise _disk_error(exc, self.output, self._bytes_needed()) from None
        self._close_files()
        if self.layout == "folder":
            fsync_dir(self.partial)
        replace(self.partial, self.output)
        fsync_dir(self.output.parent)
        self._journal.remove()
        self._done = True
        return self.output

    def _index_bytes(self) -> bytes:
        """The Hugging Face index of a folder output: every tensor's shard, and the total."""
        weight_map = {}
        for spec in self.specs:
            weight_map[spec.name] = self._shards[self._slots[spec.name].shard].name
        total = sum(s.nbytes for s in self.specs)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        return (json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode("utf-8")

    def _write_index(self) -> None:
        fd = os.open(self.partial / INDEX_NAME, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            pwrite_all(fd, memoryview(self._index_bytes()), 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        """Remove the partial output and the journal; nothing is left behind."""
        self._close_files()
        self._journal.remove()
        remove(self.partial)
        self._done = True

    def _close_files(self) -> None:
        if self._flusher is not None:
            self._flusher.stop()
        while self._fds:
            os.close(self._fds.pop())

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._done:
            try:
                self.commit()
            except BaseException:
                self._close_files()
                self._journal.close()
                raise
        elif exc_type is not None:
            self._close_files()
            self._journal.close()


_VALUE_DTYPES = {d.value for d in DTYPES.values()}


def _resolve_layout(output: Path, layout: str | None, shard_size: int | None) -> str:
    if layout is None:
        single = output.name.endswith(SUFFIX) and shard_size is None
        return "file" if single else "folder"
    if layout not in LAYOUTS:
        raise InvalidInput(f"layout must be 'file' or 'folder', got {layout!r}")
    if layout == "file" and shard_size is not None:
        raise InvalidInput("shard_size needs a folder output (layout='folder')")
    return layout


def _space_message(folder: Path, needed: int) -> str:
    try:
        free = f"{shutil.disk_usage(folder).free / 1e9:.2f} GB free"
    except OSError:
        free = "free space unknown"
    return (
        f"not enough disk space in {folder}: the output needs {needed / 1e9:.2f} GB "
        f"({needed} bytes), {free}"
    )


def _check_free_space(folder: Path, needed: int) -> None:
    if needed > shutil.disk_usage(folder).free:
        raise MmergeError(_space_message(folder, needed))


def _disk_error(exc: OSError, output: Path, needed: int) -> MmergeError:
    """An OSError while creating or finishing `output` as one line naming the output."""
    if exc.errno == errno.ENOSPC:
        return MmergeError(_space_message(output.parent, needed))
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return MmergeError(f"cannot write the output {output}: {reason} (in {output.parent})")
    return MmergeError(f"cannot write the output {output}: {reason}")


def _preallocate(fd: int, size: int) -> None:
    """Reserve the file's blocks now, so a full disk fails here and not mid-merge."""
    if size == 0:
        return
    if not hasattr(os, "posix_fallocate"):
        os.ftruncate(fd, size)
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise
        os.ftruncate(fd, size)  # file systems without fallocate: a sparse file


def write_slot(fd: int, slot: Slot, array: np.ndarray, start: int, scratch: np.ndarray) -> int:
    """Write `array` (flattened, cast to the slot's dtype; raw bits when already in the storage
    dtype) at element `start` of `slot` in file `fd`, via `scratch`; the count written."""
    name = slot.spec.name
    values = np.asarray(array).reshape(-1)
    if values.dtype.kind not in "fiub" and values.dtype not in _VALUE_DTYPES:
        raise InvalidInput(f"{name}: cannot write an array of dtype {values.dtype}")
    n, numel = values.size, slot.spec.numel
    if not isinstance(start, (int, np.integer)) or start < 0 or start + n > numel:
        raise InvalidInput(
            f"{name}: writing {n} elements at {start} runs outside its {numel} elements"
        )
    step = max(1, CHUNK_BYTES // slot.dtype.itemsize)
    for s in range(0, n, step):
        data = to_storage(values[s : s + step], slot.dtype, scratch)
        offset = slot.offset + (int(start) + s) * slot.dtype.itemsize
        pwrite_all(fd, memoryview(data).cast("B"), offset)
    return n


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n

"""The resume journal beside a partial output: which tensors are completely written.

Line 1 is a JSON object naming the layout (a digest of every shard's name and header), the boot
in which the partial output was written, and the identity of every input file; each further
line is one finished tensor name as a JSON string, or a shard written whole by a distributed
executor, `{"shard": file name, "sha256": digest}` (recorded before its tensors' names). Lines
are appended with single `write` calls after the tensor's bytes are written, so a process
killed at any point leaves a journal that never claims unwritten data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
from collections.abc import Sequence
from pathlib import Path

from mmerge.errors import InvalidInput

VERSION = 2
_HEADER_CAP = 100_000_000  # bytes of a header read for its digest at most


def boot_id() -> str | None:
    """An identifier of the running OS boot (Linux), so a journal from before a crash or power
    loss, whose page-cache writes may be lost, is never trusted."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _input_files(path: Path) -> list[Path]:
    """The files a checkpoint (or adapter) at `path` is read from: itself, or a folder's
    tensor files and index."""
    if not path.is_dir():
        return [path]
    return sorted(
        p for p in path.iterdir() if p.is_file() and p.name.endswith((".safetensors", ".json"))
    )


def _header_digest(path: Path) -> str:
    """sha256 of a safetensors file's length prefix and header (of the whole file, for JSON)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if not path.name.endswith(".safetensors"):
            h.update(f.read(_HEADER_CAP))
            return h.hexdigest()
        prefix = f.read(8)
        h.update(prefix)
        if len(prefix) == 8:
            (n,) = struct.unpack("<Q", prefix)
            h.update(f.read(min(n, _HEADER_CAP)))
    return h.hexdigest()


def input_identity(inputs: Sequence[str | Path]) -> list[dict]:
    """Size, modification time, inode and header digest of every file of every input: a
    different checkpoint put in the same place is told apart even when its header is equal."""
    out = []
    for given in inputs:
        for f in _input_files(Path(given)):
            try:
                st = f.stat()
                digest = _header_digest(f)
            except OSError as exc:
                raise InvalidInput(f"cannot read input {f}: {exc.strerror or exc}") from None
            out.append(
                {
                    "file": str(f.resolve()),
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                    "inode": st.st_ino,
                    "header": digest,
                }
            )
    return out


def _changed_input(old: list, new: list) -> str:
    """A sentence naming the first input that differs between two identities."""
    before = {e.get("file"): e for e in old if isinstance(e, dict)}
    after = {e["file"]: e for e in new}
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name), after.get(name)
        if a is None:
            return f"{name} was not an input of the interrupted merge"
        if b is None:
            return f"{name} is no longer an input"
        diffs = [k for k in ("size", "mtime_ns", "inode", "header") if a.get(k) != b[k]]
        if diffs:
            what = {"mtime_ns": "modification time", "header": "header"}
            listed = ", ".join(what.get(k, k) for k in diffs)
            return f"{name} changed since the interrupted merge ({listed} differ)"
    return "the inputs changed since the interrupted merge"


class Journal:
    """Append-only record of finished tensors for one output layout and one set of inputs."""

    def __init__(self, path: Path, layout_digest: str, inputs: list[dict] | None = None):
        self.path = path
        self._head = {
            "mmerge_journal": VERSION,
            "layout": layout_digest,
            "boot": boot_id(),
            "inputs": inputs or [],
        }
        self._fd: int | None = None
        self.digests: dict[str, str] = {}  # shard file name -> sha256, from `load`

    def load(self) -> list[str] | None:
        """Finished names from an existing journal of this same layout and boot; None when there
        is no journal or it belongs to another layout or boot. InvalidInput when it belongs to
        this layout but an input file changed: its tensors must not be mixed with new ones."""
        try:
            lines = self.path.read_bytes().split(b"\n")
        except OSError:
            return None
        try:
            head = json.loads(lines[0])
        except ValueError:
            return None
        if not isinstance(head, dict):
            return None
        same = ("mmerge_journal", "layout", "boot")
        if any(head.get(k) != self._head[k] for k in same):
            return None
        if head.get("inputs") != self._head["inputs"]:
            reason = _changed_input(head.get("inputs") or [], self._head["inputs"])
            raise InvalidInput(
                f"cannot resume: {reason}; run without --resume to start the merge over"
            )
        names: list[str] = []
        for line in lines[1:-1]:  # the last piece has no newline: empty or torn
            try:
                name = json.loads(line)
            except ValueError:
                break
            if _is_shard_record(name):
                self.digests[name["shard"]] = name["sha256"]
                continue
            if not isinstance(name, str):
                break
            names.append(name)
        return names

    def bytes_needed(self, names: Sequence[str]) -> int:
        """Bytes this journal takes once every one of `names` is recorded (for the space
        check)."""
        return sum(len(json.dumps(x).encode("utf-8")) + 1 for x in [self._head, *names])

    def start(self, names: list[str], digests: dict[str, str] | None = None) -> None:
        """Write a fresh journal holding `names` (the already finished tensors) and the
        `digests` of shards written whole."""
        self.close()
        shards = [{"shard": k, "sha256": v} for k, v in (digests or {}).items()]
        lines = [self._head, *shards, *names]
        text = "".join(json.dumps(x) + "\n" for x in lines).encode("utf-8")
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            tmp.write_bytes(text)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, name: str) -> None:
        """Record `name` as finished (one write of one whole line)."""
        if self._fd is None:
            raise RuntimeError("journal is not open")
        os.write(self._fd, (json.dumps(name) + "\n").encode("utf-8"))

    def record_shard(self, name: str, digest: str) -> None:
        """Record shard file `name` as written whole, with its sha256 (one write of one line)."""
        if self._fd is None:
            raise RuntimeError("journal is not open")
        os.write(self._fd, (json.dumps({"shard": name, "sha256": digest}) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def _is_shard_record(value) -> bool:
    return (
        isinstance(value, dict)
        and isinstance(value.get("shard"), str)
        and isinstance(value.get("sha256"), str)
    )

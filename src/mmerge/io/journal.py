"""The resume journal beside a partial output: which tensors are completely written.

Line 1 is a JSON object naming the layout (a digest of every shard's name and header) and the
boot in which the partial output was written; each further line is one finished tensor name as
a JSON string. Lines are appended with single `write` calls after the tensor's bytes are written,
so a process killed at any point leaves a journal that never claims unwritten data.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

VERSION = 1


def boot_id() -> str | None:
    """An identifier of the running OS boot (Linux), so a journal from before a crash or power
    loss, whose page-cache writes may be lost, is never trusted."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


class Journal:
    """Append-only record of finished tensors for one output layout."""

    def __init__(self, path: Path, layout_digest: str):
        self.path = path
        self._head = {"mmerge_journal": VERSION, "layout": layout_digest, "boot": boot_id()}
        self._fd: int | None = None

    def load(self) -> list[str] | None:
        """Finished names from an existing journal of this same layout and boot; None when there
        is no journal or it belongs to another layout or boot."""
        try:
            lines = self.path.read_bytes().split(b"\n")
        except OSError:
            return None
        try:
            if json.loads(lines[0]) != self._head:
                return None
        except ValueError:
            return None
        names: list[str] = []
        for line in lines[1:-1]:  # the last piece has no newline: empty or torn
            try:
                name = json.loads(line)
            except ValueError:
                break
            if not isinstance(name, str):
                break
            names.append(name)
        return names

    def start(self, names: list[str]) -> None:
        """Write a fresh journal holding `names` (the already finished tensors)."""
        self.close()
        text = "".join(json.dumps(x) + "\n" for x in [self._head, *names]).encode("utf-8")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(text)
        os.replace(tmp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def append(self, name: str) -> None:
        """Record `name` as finished (one write of one whole line)."""
        if self._fd is None:
            raise RuntimeError("journal is not open")
        os.write(self._fd, (json.dumps(name) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)

"""Safety around the output's name: never write over an input or a folder that is not a
checkpoint, and move a finished output into place as atomically as the OS allows."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from mmerge.errors import InvalidInput
from mmerge.io.checkpoint import INDEX_NAME, SUFFIX


def check_not_an_input(output: Path, inputs: Sequence[str | Path]) -> None:
    """InvalidInput when `output` is, is inside, or contains one of `inputs`."""
    out = output.resolve()
    for given in inputs:
        inp = Path(given).resolve()
        same = out == inp or (out.exists() and inp.exists() and os.path.samefile(out, inp))
        if same or inp in out.parents or out in inp.parents:
            raise InvalidInput(
                f"refusing to write {output}: it is, is inside, or contains the input {given}"
            )


def check_replaceable(output: Path) -> None:
    """InvalidInput unless `output` is absent, a .safetensors file, or a folder of plain files
    holding safetensors (an earlier output): anything else is never deleted."""
    if not output.exists():
        return
    if output.is_file():
        if output.name.endswith(SUFFIX):
            return
    elif output.is_dir():
        entries = list(output.iterdir())
        if not any(e.is_dir() for e in entries) and (
            not entries or any(e.name.endswith(SUFFIX) or e.name == INDEX_NAME for e in entries)
        ):
            return
    raise InvalidInput(
        f"refusing to replace {output}: it exists and is not a safetensors checkpoint"
    )


def remove(path: Path) -> None:
    """Delete a file or a folder tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def replace(src: Path, dst: Path) -> None:
    """Move `src` to `dst`: one atomic rename, unless `dst` is a non-empty folder; then the old
    output is first moved aside and deleted after (the final name is briefly absent, never
    partial)."""
    try:
        os.replace(src, dst)
        return
    except OSError:
        if not dst.exists():
            raise
    old = dst.with_name(dst.name + ".mmerge-old")
    remove(old)
    os.replace(dst, old)
    os.replace(src, dst)
    remove(old)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in folder `path` durable (a no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

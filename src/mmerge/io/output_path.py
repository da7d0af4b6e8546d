"""Safety around the output's name: never write over an input, never replace an existing output
unless asked, never delete what is not a checkpoint, and move a finished output into place so
that the old one survives any failure."""

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


def occupied(output: Path) -> bool:
    """True when `output` exists and is not an empty folder: writing there replaces something."""
    if output.is_symlink() or output.is_file():
        return True
    if output.is_dir():
        return any(output.iterdir())
    return output.exists()


def check_replaceable(output: Path, overwrite: bool) -> None:
    """InvalidInput unless `output` is absent or an empty folder, or `overwrite` is set and it
    is a .safetensors file or a folder of plain files holding safetensors (an earlier output):
    a user's files are never replaced unasked, and what is not a checkpoint never at all."""
    if not occupied(output):
        return
    if not overwrite:
        raise InvalidInput(
            f"{output} already exists and is not empty; pass --overwrite (overwrite=True in "
            "the library) to replace it once the new output is complete"
        )
    if output.is_file() and not output.is_symlink():
        if output.name.endswith(SUFFIX):
            return
    elif output.is_dir() and not output.is_symlink():
        entries = list(output.iterdir())
        if not any(e.is_dir() for e in entries) and any(
            e.name.endswith(SUFFIX) or e.name == INDEX_NAME for e in entries
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


def _aside_name(dst: Path) -> Path:
    """A free name beside `dst` for the old output while the new one moves in."""
    for k in range(1000):
        candidate = dst.with_name(f"{dst.name}.mmerge-old{'' if k == 0 else f'-{k}'}")
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise InvalidInput(f"too many {dst.name}.mmerge-old* entries beside {dst}; remove them")


def replace(src: Path, dst: Path) -> None:
    """Move `src` to `dst`. A file over a file is one atomic rename; otherwise the old output is
    renamed aside, the new one renamed in, and the old one deleted only after that succeeded.
    If the second rename fails, the old output is moved back before the error is raised."""
    if dst.is_dir() and not dst.is_symlink() and not occupied(dst):
        dst.rmdir()  # an empty folder holds nothing to keep, and a file cannot replace it
    if not occupied(dst) or (src.is_file() and dst.is_file() and not dst.is_symlink()):
        os.replace(src, dst)
        return
    aside = _aside_name(dst)
    os.replace(dst, aside)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(aside, dst)
        raise
    remove(aside)


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in folder `path` durable (a no-op where unsupported)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

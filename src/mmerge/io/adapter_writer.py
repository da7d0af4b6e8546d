"""Writing a PEFT LoRA adapter folder atomically and resumably.

Everything goes to `<output>.mmerge-partial/`: the tensors through the streaming writer (its own
journal lets `resume=True` continue), scratch files of the producer, and finally
`adapter_config.json`; then the folder is renamed into place. Nothing appears under the final
name before it is complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mmerge.errors import InvalidInput
from mmerge.io.adapter import CONFIG_NAME, LEGACY_NAMES, WEIGHTS_NAME
from mmerge.io.layout import TensorSpec
from mmerge.io.output_path import check_not_an_input, fsync_dir, remove, replace
from mmerge.io.writer import StreamingWriter

_ADAPTER_FILES = {CONFIG_NAME, WEIGHTS_NAME, "README.md", *LEGACY_NAMES}


def check_adapter_output(output: Path, overwrite: bool) -> None:
    """An existing non-empty `output` is replaced only with `overwrite`, and only when it is an
    adapter folder (plain files, among them an adapter config or weights)."""
    if not output.exists():
        return
    if output.is_dir():
        entries = list(output.iterdir())
        if not entries:
            return
        looks_like_adapter = not any(e.is_dir() for e in entries) and any(
            e.name in _ADAPTER_FILES for e in entries
        )
        if not looks_like_adapter:
            raise InvalidInput(
                f"refusing to replace {output}: it exists and is not a LoRA adapter folder"
            )
        if not overwrite:
            raise InvalidInput(f"{output} already exists (pass --overwrite to replace it)")
        return
    raise InvalidInput(f"refusing to replace {output}: it exists and is not a folder")


class AdapterFolder:
    """A PEFT adapter folder being written: `tensors()` opens the tensor file, `scratch()`
    names a file that is removed before the folder is committed."""

    def __init__(
        self,
        output: str | Path,
        *,
        inputs: Sequence[str | Path] = (),
        resume: bool = False,
        overwrite: bool = False,
    ):
        self.output = Path(output)
        if self.output.name.endswith(".safetensors"):
            raise InvalidInput(f"{self.output}: an adapter is a folder; give a folder name")
        check_not_an_input(self.output, inputs)
        check_adapter_output(self.output, overwrite)
        self.partial = self.output.with_name(self.output.name + ".mmerge-partial")
        self.resume = resume
        if not resume:
            remove(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        self._writer: StreamingWriter | None = None
        self._scratch: list[StreamingWriter] = []

    def scratch(self, name: str, specs: Iterable[TensorSpec], metadata: dict[str, str]):
        """A resumable safetensors file of intermediate results inside the partial folder."""
        writer = StreamingWriter(
            self.partial / name,
            specs,
            metadata=metadata,
            resume=self.resume,
            layout="file",
            overwrite=True,  # the partial folder is this writer's own
            write_back=False,  # deleted at the commit: the page cache is enough for resume
        )
        self._scratch.append(writer)
        return writer

    def tensors(self, specs: Iterable[TensorSpec], metadata: dict[str, str]) -> StreamingWriter:
        """The writer of `adapter_model.safetensors` (resumable like any output)."""
        self._writer = StreamingWriter(
            self.partial / WEIGHTS_NAME,
            specs,
            metadata=metadata,
            resume=self.resume,
            layout="file",
            overwrite=True,  # the partial folder is this writer's own
        )
        return self._writer

    def commit(self, config: dict[str, Any]) -> Path:
        """Finish the tensor file, drop scratch files, write the config, rename into place."""
        if self._writer is None:
            raise InvalidInput("no adapter tensors were written")
        self._writer.commit()
        for writer in self._scratch:
            writer.abort()
        text = json.dumps(config, indent=2, sort_keys=True) + "\n"
        path = self.partial / CONFIG_NAME
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.partial)
        replace(self.partial, self.output)
        fsync_dir(self.output.parent)
        return self.output

    def close(self) -> None:
        """Leave the partial folder for `resume` (after an error)."""
        for writer in [*self._scratch, *([self._writer] if self._writer else [])]:
            writer.__exit__(RuntimeError, RuntimeError("aborted"), None)

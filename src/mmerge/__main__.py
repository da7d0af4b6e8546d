"""`mmerge` and `python -m mmerge`: Ctrl-C at any moment, even while the command line's own
modules are still loading, ends with one line and exit status 130, never a traceback."""

from __future__ import annotations

import signal
import sys


def main(args: list[str] | None = None) -> int:
    """Run one command line (`sys.argv` by default) and return its exit status."""
    try:
        from mmerge.cli import run_cli

        return run_cli(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


def program() -> int:
    """The `mmerge` console script: `main`, after which Ctrl-C is ignored. Python restores
    SIGINT's default action while it shuts down, so a late Ctrl-C would kill the exit silently;
    an ignored signal is left alone. Only the program owns its process's signals."""
    try:
        return main()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(program())

"""`mmerge` and `python -m mmerge`: Ctrl-C at any moment, even while the command line's own
modules are still loading, ends with one line and exit status 130, never a traceback."""

from __future__ import annotations

import signal
import sys


def main(args: list[str] | None = None) -> int:
    """Entry point of the `mmerge` console script."""
    try:
        from mmerge.cli import run_cli

        return run_cli(args)
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130
    finally:
        # The command is over: Python restores the default SIGINT action while it shuts down,
        # so a late Ctrl-C would kill the exit silently. Ignored handlers are left alone.
        signal.signal(signal.SIGINT, signal.SIG_IGN)


if __name__ == "__main__":
    sys.exit(main())

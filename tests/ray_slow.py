"""Installed in the Ray workers of the distributed tests (a worker setup hook): while the marker
file named by MMERGE_TEST_SLOW_MARKER exists, every chunk write sleeps first, so that a test can
kill a worker or the driver while a shard is being written."""

import os
import time


def install() -> None:
    from mmerge.engine import execute

    marker = os.environ["MMERGE_TEST_SLOW_MARKER"]
    original = execute.write_chunk

    def slow(*args) -> None:
        if os.path.exists(marker):
            time.sleep(0.05)
        original(*args)

    execute.write_chunk = slow

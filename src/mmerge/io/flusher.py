"""Write-back while merging: a thread that syncs an output file each time enough of it was
written, so that the disk writes beside the reads and the math instead of after them, and the
commit's fsync finds little left to do."""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence

FLUSH_BYTES = 64 << 20  # bytes written to a file that start its write-back
_sync = getattr(os, "fdatasync", os.fsync)  # data, not metadata: macOS has only fsync


class Flusher:
    """Syncs files (its own duplicates of `fds`) on a background thread, started by the first
    file to reach FLUSH_BYTES of unsynced writes. `close` waits for it and raises the first
    error it met (the kernel reports a write-back error to one fsync only, which may be this
    thread's); `stop` leaves it to end on its own, for a merge that is abandoned."""

    def __init__(self, fds: Sequence[int], threshold: int | None = None) -> None:
        self.threshold = FLUSH_BYTES if threshold is None else threshold
        self.unsynced = [0] * len(fds)
        self.fds = [os.dup(fd) for fd in fds]
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.closing = False
        self.error: OSError | None = None

    def wrote(self, k: int, nbytes: int) -> None:
        """Count `nbytes` written to file `k`; wake the thread once the file has enough."""
        with self.cond:
            self.unsynced[k] += nbytes
            if self.unsynced[k] < self.threshold or self.closing:
                return
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="mmerge-flush", daemon=True)
                self.thread.start()
            self.cond.notify()

    def _next(self) -> int | None:
        """The file with the most unsynced bytes once one has enough; None when closing."""
        with self.cond:
            self.cond.wait_for(lambda: self.closing or max(self.unsynced) >= self.threshold)
            if self.closing:
                return None
            k = max(range(len(self.unsynced)), key=self.unsynced.__getitem__)
            self.unsynced[k] = 0
            return k

    def _run(self) -> None:
        try:
            while (k := self._next()) is not None:
                _sync(self.fds[k])
        except OSError as exc:
            self.error = exc
        finally:
            self._release()

    def _release(self) -> None:
        with self.cond:
            self.closing = True
            fds, self.fds = self.fds, []
        for fd in fds:
            os.close(fd)

    def stop(self) -> None:
        """End without waiting: the thread closes its files when its sync returns."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
            running = self.thread is not None
        if not running:
            self._release()

    def close(self) -> None:
        """End once the sync under way returns; raise the error a sync met, if any."""
        self.stop()
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error

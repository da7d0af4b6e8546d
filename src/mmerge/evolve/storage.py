"""Where a study lives (SQLite in OUT, any database URL, or a journal file) and how trials of
dead workers are found, failed and queued again.

Database storages use Optuna's heartbeat: a trial whose worker stopped beating for the grace
period is failed and re-queued by `RetryHeartbeatStaleTrialCallback`. Journal files have no
heartbeat in Optuna, so a trial attribute carries ours. On the worker's own machine a dead
process is seen at once from its process id, without waiting for the grace period.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from mmerge.errors import InvalidInput

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# We run the heartbeat ourselves around ask/tell (Liveness.beating), not through optimize().
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")

OWNER = "mmerge:owner"  # system attribute: which process runs the trial
BEAT = "mmerge:beat"  # system attribute: our heartbeat on storages without Optuna's
MAX_RETRY = 3  # a trial whose worker died is run again at most this many times
# Errors of two workers creating a new database's tables at once; the later one retries.
RACES = ("already exists", "UNIQUE constraint", "duplicate key", "database is locked")


def default_url(out: Path) -> str:
    """SQLite in the output folder."""
    return f"sqlite:///{(Path(out) / 'study.db').resolve()}"


def open_storage(url: str, heartbeat: int) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url`: sqlite:///FILE, postgresql://..., mysql://... (any SQLAlchemy
    URL; postgresql:// goes through psycopg 3, which mmerge[evolve] installs), or journal:PATH
    (a journal file, for shared file systems)."""
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)
    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = url.removeprefix("journal:")
        path = path[2:] if path.startswith("///") else path
        if not path:
            raise InvalidInput("storage journal: needs a file, e.g. journal:/shared/study.log")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise InvalidInput(
            f"storage {url!r}: expected a database URL (sqlite:///study.db, "
            "postgresql://user@host/db) or journal:PATH"
        )
    for plain in ("postgresql://", "postgres://"):  # the driver mmerge[evolve] installs
        if url.startswith(plain):
            url = "postgresql+psycopg://" + url.removeprefix(plain)
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    attempt = 0
    while True:
        try:
            storage = optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat,
                grace_period=3 * heartbeat,
                heartbeat_stale_trial_callback=retry,
            )
            if url.startswith("sqlite"):
                _serialize(storage.engine)
            return storage
        except Exception as exc:  # driver missing, server down, bad URL: one clear line
            text, attempt = str(exc).strip(), attempt + 1
            if attempt < 6 and any(s in text for s in RACES):
                time.sleep(0.2 + random.random())  # another worker is creating the tables
                continue
            first = text.splitlines()[0] if text else type(exc).__name__
            raise InvalidInput(f"cannot open storage {redact(url)}: {first}") from None


def _serialize(engine: Any) -> None:
    """Make every SQLite transaction take the write lock when it begins (BEGIN IMMEDIATE).

    SQLite has no SELECT ... FOR UPDATE, and Python's driver starts a transaction only at the
    first write, so two workers could both read an enqueued trial as waiting and both run it.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver issues no BEGIN of its own

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners are not reused


def redact(url: str) -> str:
    """A URL fit to print: the password replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    cred, at, host = rest.rpartition("@")
    user, colon, _ = cred.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}{at}{host}"


def _machine() -> str:
    """This boot of this machine and this process-id namespace (two containers on one host see
    different processes under the same ids); empty where /proc does not tell."""
    with contextlib.suppress(OSError):
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot} {os.readlink('/proc/self/ns/pid')}"
    return ""


def _start_time(pid: int) -> str | None:
    """When process `pid` started (Linux: clock ticks since boot), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return started is None or _start_time(pid) in (None, started)


class Liveness:
    """Marks this process's trials, keeps them beating, and releases trials of dead workers."""

    def __init__(self, study: optuna.Study, heartbeat: int) -> None:
        self.study, self.heartbeat = study, heartbeat
        self.storage = study._storage
        self.optuna_heartbeat = optuna.storages._heartbeat.is_heartbeat_enabled(self.storage)
        self.persistent = not isinstance(self.storage, optuna.storages.InMemoryStorage)
        self.me = {
            "host": socket.gethostname(),
            "boot": _machine(),
            "pid": os.getpid(),
            "start": _start_time(os.getpid()),
        }

    def claim(self, trial: optuna.Trial) -> None:
        """Record that this process runs `trial`, and beat once at once."""
        self.study._storage.set_trial_system_attr(
            trial._trial_id, OWNER, {**self.me, "number": trial.number}
        )
        self._beat(trial._trial_id)

    def _beat(self, trial_id: int) -> None:
        if self.optuna_heartbeat:
            self.storage.record_heartbeat(trial_id)
        elif self.persistent:
            self.storage.set_trial_system_attr(trial_id, BEAT, time.time())

    @contextlib.contextmanager
    def beating(self, trial: optuna.Trial) -> Iterator[None]:
        """Keep `trial` beating while the block runs."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(self.heartbeat):
                with contextlib.suppress(Exception):  # a missed beat is retried next time
                    self._beat(trial._trial_id)

        thread = threading.Thread(target=loop, name=f"heartbeat-{trial.number}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def recover(self) -> list[int]:
        """Fail and re-queue the running trials whose worker is gone; their numbers."""
        if not self.persistent:
            return []
        if self.optuna_heartbeat:
            optuna.storages.fail_stale_trials(self.study)
        now = time.time()
        released = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.system_attrs.get(OWNER)
            if not isinstance(owner, dict) or owner.get("number") != t.number:
                continue  # just asked and not yet claimed, or the claim of an earlier attempt
            here = owner.get("host") == self.me["host"] and owner.get("boot") == self.me["boot"]
            if here:
                dead = owner.get("pid") != self.me["pid"] and not _alive(
                    int(owner["pid"]), owner.get("start")
                )
            elif not self.optuna_heartbeat:
                beat = t.system_attrs.get(BEAT)
                dead = beat is not None and now - float(beat) > 3 * self.heartbeat
            else:
                dead = False  # Optuna's heartbeat decides for other machines
            if dead and self.release(t):
                released.append(t.number)
        return released

    def release(self, trial: Any) -> bool:
        """Fail a trial that will not finish and queue its parameters again."""
        try:
            if not self.storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                return False
        except optuna.exceptions.UpdateFinishedTrialError:
            return False  # another worker got there first
        RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(
            self.study, self.storage.get_trial(trial._trial_id)
        )
        return True

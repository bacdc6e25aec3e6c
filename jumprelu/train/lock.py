"""One run per workdir: WORKDIR/lock.json, held from before the data are opened until the report.

Two runs on one workdir overwrite each other's checkpoints and metrics, and the first one
reports weights the second one wrote. So `train` takes this lock first (which also finds a
workdir that is a file or not writable, before any long work) and a second run fails at
once, naming the holder's pid and host. `jumprelu refit` holds the same kind of lock on RUN/refit.

Local (and NFS) workdirs: an exclusive `flock` on lock.json, which the kernel releases
when the holder dies however it dies, so a lock left by a dead process is taken over
safely (with a warning naming it). The file holds the holder's pid, host and start time.

gs:// workdirs (no file locks in a bucket): lock.json is an object with a heartbeat the
holder rewrites every HEARTBEAT_S seconds. A lock whose heartbeat is older than
STALE_AFTER_S belongs to a dead run and is taken over. Taking it is write, wait SETTLE_S,
read back: of two runs starting within the same moment the last writer keeps it and the
other fails. Without a conditional write this is not airtight (a writer delayed by more
than SETTLE_S could still overwrite), which is why the heartbeat also checks that the
lock is still ours and logs an error if another run took it.

Multi-host runs: process 0 takes the lock and every process learns the outcome.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np

from jumprelu import fs
from jumprelu.errors import WorkdirError

log = logging.getLogger("jumprelu")

LOCK_FILE = "lock.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
SETTLE_S = 2.0
TRAIN_ADVICE = "wait for it to finish or use another --workdir"


def _holder(info: dict | None) -> str:
    if not info:
        return "a run that has not written its name yet"
    return f"pid {info.get('pid')} on host {info.get('host')} (since {info.get('started')})"


def _prepare(workdir: str) -> None:
    """Creates the workdir; a file in the way or a read-only file system is one line, now."""
    try:
        fs.makedirs(workdir)
    except (FileExistsError, NotADirectoryError):
        raise WorkdirError(f"workdir {workdir} is not a directory (a file is in the way)") from None
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} cannot be created: {e.strerror or e}") from None


class WorkdirLock:
    def __init__(self, workdir: str, advice: str = TRAIN_ADVICE):
        self.workdir = workdir
        self.advice = advice  # what the refused one should do, ending its error
        self.path = fs.join(workdir, LOCK_FILE)
        self.info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "token": uuid.uuid4().hex,
        }
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- local: flock ---------------------------------------------------------------------------
    def _acquire_file(self) -> None:
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise WorkdirError(f"workdir {self.workdir} is not writable: {e.strerror or e}") from None
            import fcntl  # POSIX only; imported here so that the module imports everywhere

            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._read_fd(fd, wait=True)
                os.close(fd)
                raise WorkdirError(
                    f"workdir {self.workdir} is in use by another run: {_holder(holder)}; {self.advice}"
                ) from None
            except OSError:
                os.close(fd)
                raise
            try:  # the holder may have removed the file between our open and our flock: lock the new one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = self._read_fd(fd)
            if previous:
                log.warning(
                    "workdir %s: taking over the lock left by %s, which is no longer running",
                    self.workdir,
                    _holder(previous),
                )
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(self.info).encode(), 0)
                os.fsync(fd)
            except OSError as e:
                os.close(fd)
                raise WorkdirError(f"workdir {self.workdir} is not writable: {e.strerror or e}") from None
            self._fd = fd
            return

    @staticmethod
    def _read_fd(fd: int, wait: bool = False) -> dict | None:
        for _ in range(20 if wait else 1):  # a holder writes its name just after locking
            try:
                return json.loads(os.pread(fd, 1 << 16, 0).decode())
            except ValueError:
                if wait:
                    time.sleep(0.05)
        return None

    # -- object stores: heartbeat ---------------------------------------------------------------
    def _read_object(self) -> dict | None:
        try:
            return json.loads(fs.read_text(self.path)) if fs.exists(self.path) else None
        except (OSError, ValueError):
            return None

    def _write_object(self) -> None:
        fs.write_text_atomically(self.path, json.dumps(dict(self.info, heartbeat=time.time())))

    def _acquire_object(self) -> None:
        holder = self._read_object()
        age = time.time() - float(holder.get("heartbeat", 0)) if holder else 0.0
        if holder and age < STALE_AFTER_S:
            raise WorkdirError(
                f"workdir {self.workdir} is in use by another run: {_holder(holder)}, last heartbeat {age:.0f} s "
                f"ago (a lock silent for {STALE_AFTER_S:.0f} s is taken over); {self.advice}"
            )
        if holder:
            log.warning(
                "workdir %s: taking over the lock of %s, whose last heartbeat was %.0f s ago",
                self.workdir,
                _holder(holder),
                time.time() - float(holder.get("heartbeat", 0)),
            )
        try:
            self._write_object()
        except OSError as e:
            raise WorkdirError(f"workdir {self.workdir} is not writable: {e}") from None
        time.sleep(SETTLE_S)
        now = self._read_object()
        if not now or now.get("token") != self.info["token"]:
            raise WorkdirError(
                f"workdir {self.workdir} is in use by another run that started at the same moment: "
                f"{_holder(now)}; {self.advice}"
            )
        self._beat = threading.Thread(target=self._heartbeat, name="jumprelu-lock-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            now = self._read_object()
            if now and now.get("token") != self.info["token"]:
                log.error(
                    "workdir %s: the lock was taken by %s; this run no longer owns it", self.workdir, _holder(now)
                )
                return
            with contextlib.suppress(OSError):  # a missed beat is retried; only STALE_AFTER_S of them matter
                self._write_object()

    # -- both -----------------------------------------------------------------------------------
    def acquire(self, object_lock: bool | None = None) -> None:
        """object_lock: force the heartbeat lock (default: for remote workdirs, or where flock is unsupported)."""
        _prepare(self.workdir)
        if object_lock is None:
            object_lock = fs.is_remote(self.workdir)
        if not object_lock:
            try:
                return self._acquire_file()
            except OSError as e:  # file systems without flock (some network mounts)
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
        self._acquire_object()

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)  # before unlocking: a waiting run then sees the inode change and retries
            os.close(self._fd)
            self._fd = None
        if self._beat is not None:
            self._stop.set()
            self._beat.join()
            self._beat = None
            now = self._read_object()
            if now and now.get("token") == self.info["token"]:
                with contextlib.suppress(OSError):
                    fs.remove(self.path)


@contextlib.contextmanager
def hold(workdir: str, advice: str = TRAIN_ADVICE, check=None):
    """Holds the workdir's lock for the block; process 0 takes it and every process raises if it could not.
    advice: what a refused caller should do (ends its error). check: called with the workdir by
    process 0 before it takes the lock; a WorkdirError it raises is every process's."""
    lock = WorkdirLock(workdir, advice) if jax.process_index() == 0 else None
    error = None
    if lock is not None:
        try:
            if check is not None:
                check(workdir)
            lock.acquire()
        except WorkdirError as e:
            error = e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
        if not ok and error is None:
            error = WorkdirError(f"workdir {workdir}: process 0 could not take the workdir's lock (see its error)")
    if error is not None:
        raise error
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()

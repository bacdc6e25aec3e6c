"""One writer per store (per part of a multi-process store): an exclusive `flock` on a lock file.

Two `store convert` (or harvest) runs on one directory would each take the other's freshly
committed shards for leftovers of a crash and delete them, and could then mark the store
complete with a shard missing. The kernel releases a `flock` however its holder dies, so a
lock left by a killed writer never blocks the resume. The file holds the holder's pid, for
the message of the process that is refused. Within one process a new writer takes over the
lock of an earlier one on the same store (a producer that failed and is retried in-process
leaves its writer unclosed).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os

from jumprelu.errors import DataError

log = logging.getLogger("jumprelu")
_HELD: dict[str, tuple[int, object]] = {}  # lock file → (descriptor, the WriterLock owning it)


class StoreBusy(DataError):
    """Another live process holds this store's writer lock."""


def lock_name(part: int | None) -> str:
    """A one-process write's lock, or part k's: the parts of one store write side by side."""
    return ".writer.lock" if part is None else f".writer-p{part:03d}.lock"


class WriterLock:
    """Held from `acquire` until `release` (or the process's end)."""

    def __init__(self, store: str, part: int | None = None):
        self.store, self.path = store, os.path.join(os.path.realpath(store), lock_name(part))
        self._fd: int | None = None

    def acquire(self) -> None:
        held = _HELD.get(self.path)
        if held is not None:
            self._fd = held[0]
            _HELD[self.path] = (held[0], self)
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise DataError(f"store {self.store}: cannot write {os.path.basename(self.path)}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no flock on this mount
                os.close(fd)
                log.warning("store %s: this file system has no file locks; a second writer is not detected", self.store)
                return
            if not isinstance(e, BlockingIOError):
                os.close(fd)
                raise DataError(
                    f"store {self.store}: cannot lock {os.path.basename(self.path)}: {e.strerror}"
                ) from None
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StoreBusy(
                f"store {self.store}: another process (pid {holder}) is writing this store; "
                "wait for it to finish or write to a new directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        _HELD[self.path] = (fd, self)

    def release(self, remove: bool = False) -> None:
        """remove: the write is complete, so the file goes too (a writer that opens it later finds
        the store or part complete once it holds the lock, and stops there)."""
        held = _HELD.get(self.path)
        if held is not None and held[1] is self:
            del _HELD[self.path]
            with contextlib.suppress(OSError):
                if remove:
                    os.remove(self.path)
            with contextlib.suppress(OSError):
                os.close(held[0])  # closing the descriptor releases the flock
        self._fd = None


@contextlib.contextmanager
def layout_lock(store: str):
    """Held briefly by every writer of `store`, of one process or a part, while it checks which
    kind of write is in progress and records its own: the two kinds hold different writer
    locks, so without this both could pass the check and one's rows replace the other's. A
    lock on the directory itself, so it leaves no file."""
    fd = os.open(store, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits: the other writer holds it for a moment only
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # no flock on this mount
                raise
        yield
    finally:
        os.close(fd)

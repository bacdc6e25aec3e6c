"""Workdir file access for local paths and object-store URLs (gs://, through etils.epath).

Training workdirs may be `gs://bucket/...` on Cloud TPU: orbax writes checkpoints there
itself, and every other workdir file (config, metrics, report, plots) goes through here.
Local writes are atomic (temporary file, fsync, rename); an object-store write is atomic
by itself (an object appears whole or not at all).
"""

from __future__ import annotations

import os


def is_remote(path: str) -> bool:
    return "://" in path


def join(path: str, *parts: str) -> str:
    if is_remote(path):
        return "/".join([path.rstrip("/"), *parts])
    return os.path.join(path, *parts)


def abspath(path: str) -> str:
    return path if is_remote(path) else os.path.abspath(path)


def _epath(path: str):
    from etils import epath  # only remote paths need it

    return epath.Path(path)


def exists(path: str) -> bool:
    return _epath(path).exists() if is_remote(path) else os.path.exists(path)


def makedirs(path: str) -> None:
    if is_remote(path):
        _epath(path).mkdir(parents=True, exist_ok=True)
    else:
        os.makedirs(path, exist_ok=True)


def read_text(path: str) -> str:
    if is_remote(path):
        return _epath(path).read_text()
    with open(path) as fh:
        return fh.read()


def read_bytes(path: str) -> bytes:
    if is_remote(path):
        return _epath(path).read_bytes()
    with open(path, "rb") as fh:
        return fh.read()


def check_writable(directory: str) -> None:
    """Raises the OSError (EACCES, EROFS, ENOSPC...) that writing a file into the existing `directory`
    would, by creating and removing one: before hours of work whose end is that write. An object
    store answers only on the write itself, so remote paths are not checked."""
    if is_remote(directory):
        return
    import tempfile

    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".write-check.")
    except OSError as e:
        e.filename = directory  # the temporary's random name would mean nothing to the user
        raise
    os.close(fd)
    os.remove(tmp)


def write_bytes_atomically(path: str, data: bytes) -> None:
    """Readers never see half a file: local writes go through a temporary file and a rename."""
    if is_remote(path):
        _epath(path).write_bytes(data)
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk or a bad destination leaves no stray temporary behind
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.filename is None:  # a buffered write's error names no file
            e.filename = path
        raise


def write_text_atomically(path: str, text: str) -> None:
    write_bytes_atomically(path, text.encode())


def remove(path: str) -> None:
    if is_remote(path):
        _epath(path).unlink(missing_ok=True)
    elif os.path.exists(path):
        os.remove(path)


def rename(src: str, dst: str) -> None:
    """Moves a file or directory (in a bucket: copies then deletes, which etils does for directories)."""
    if is_remote(src):
        _epath(src).rename(_epath(dst))
    else:
        os.replace(src, dst)

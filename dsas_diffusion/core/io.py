"""Atomic file writes: a reader never sees a half-written file, whatever interrupts the writer."""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it over `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_file(path.parent, path.name) as tmp:
        yield tmp
        publish(tmp, path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---- a folder of files replaced together (the steering artifact) ---------------------------------

def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file to disk, so a rename that publishes it never publishes an empty file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: str | os.PathLike) -> None:
    """Flush a folder's entries (renames, removals) to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows opens no folders
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


@contextmanager
def locked_directory(path: str | os.PathLike, *, exclusive: bool, wait_s: float | None = None):
    """Hold a lock on a folder (flock on the folder itself, so it adds no file): a writer excludes
    other writers and readers, readers share. The kernel drops it when the process dies, even by
    kill -9. With `wait_s`, give up waiting after that long and go on unlocked (a reader, whose
    own checks refuse a half-replaced folder). Where locks are not available (Windows, some
    network file systems) it does nothing."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        _flock(fcntl, fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, wait_s)
        yield
    finally:
        os.close(fd)  # closing the last descriptor releases the lock


def _flock(fcntl, fd: int, mode: int, wait_s: float | None) -> None:
    try:
        if wait_s is None:
            fcntl.flock(fd, mode)
            return
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.02)
    except OSError:  # a file system without locks
        return


@contextmanager
def temporary_file(directory: str | os.PathLike, final_name: str):
    """A new empty file `.{final_name}.XXXX.tmp` in `directory`, removed on exit unless `publish`
    renamed it away."""
    fd, tmp = tempfile.mkstemp(prefix=f".{final_name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Rename a written, flushed temporary file over `path` (atomically) with the permissions a
    plain new file gets (mkstemp makes 0600 files), and flush the rename to disk."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
    fsync_directory(Path(path).parent)


def remove_stale_temporaries(directory: str | os.PathLike, final_names: tuple[str, ...]) -> list[str]:
    """Remove the `.{name}.XXXX.tmp` files that writers killed before they could clean up left
    behind. Call it holding the folder's exclusive lock, so no live writer's file is taken."""
    removed = []
    for entry in Path(directory).iterdir():
        ours = entry.name.endswith(".tmp") and any(entry.name.startswith(f".{n}.") for n in final_names)
        if ours and not entry.is_dir():
            try:
                entry.unlink()
                removed.append(entry.name)
            except FileNotFoundError:
                pass
    return removed

"""One live process at a time on a folder (a sweep's driver, a `sweep train` run): an OS file lock, which
the OS releases with the process however it ends, so a killed holder never blocks the next one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class LockHeld(Exception):
    """Another live process holds the lock."""


@contextlib.contextmanager
def process_lock(path: Path) -> Iterator[None]:
    """Hold the lock on `path` (the file stays) while the block runs; LockHeld at once if another process
    holds it. Best effort: where the folder takes no lock (some network mounts) the block runs unlocked."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise LockHeld(str(path)) from None
    except OSError:
        lock = None
    try:
        yield
    finally:
        if lock is not None and lock.is_locked:
            lock.release()


def is_locked_elsewhere(path: Path) -> bool:
    """True while another live process holds the lock on `path` (a look: taken and released at once)."""
    if not path.exists():
        return False
    try:
        with process_lock(path):
            return False
    except LockHeld:
        return True

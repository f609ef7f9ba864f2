"""Best-effort locks that only save duplicate work.

flock/lockf are silently *not* coordinated across hosts on many network filesystems (seen
on two FUSE mounts of one SeaweedFS, and reported for Lustre/GPFS/NFS). So nothing in
casstore needs a lock to be correct: a lock that fails to exclude only costs duplicate
uploads, and a lock that cannot be taken in time is skipped, never fatal.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("casstore")


def _try_lock(path: Path, timeout: float) -> tuple[Any | None, bool]:
    """(lock, busy): the held lock, or None and whether that was because someone holds it
    (True) or because locking is impossible here (False: read-only store, no flock)."""
    import portalocker  # imported by the first lock, not by every process that imports casstore

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = portalocker.Lock(
            os.fspath(path),
            mode="a",
            timeout=max(timeout, 0.0),
            check_interval=min(0.25, max(timeout, 0.01)),
            fail_when_locked=False,
            flags=portalocker.LOCK_EX | portalocker.LOCK_NB,
        )
        lock.acquire()
    except portalocker.exceptions.AlreadyLocked:
        return None, True
    except (portalocker.exceptions.BaseLockException, OSError) as e:
        log.debug("cannot lock %s (%s); going on without it", path, e)
        return None, False
    try:
        os.utime(path)  # so cleanup can tell live lock files from stale ones
    except OSError:
        pass
    return lock, False


def _release(lock: Any) -> None:
    import portalocker

    try:
        lock.release()
    except (portalocker.exceptions.BaseLockException, OSError):
        pass


@contextmanager
def best_effort_lock(path: Path, timeout: float) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` if possible within ``timeout`` seconds.

    Yields True when held, False when the lock was busy or could not be created; the body
    runs either way.
    """
    lock, _busy = _try_lock(path, timeout)
    try:
        yield lock is not None
    finally:
        if lock is not None:
            _release(lock)


def remove_if_unheld(path: str) -> bool:
    """Remove a stale lock file only if nobody holds it now (else it only looks stale)."""
    lock, _busy = _try_lock(Path(path), 0)
    if lock is None:
        return False
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    finally:
        _release(lock)


@contextmanager
def exclusive_unless_busy(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` where possible; yields False only when someone
    else holds it. Where locking is impossible (a read-only or unwritable lock directory,
    no flock) it yields True: these locks carry no correctness, so the work goes on."""
    lock, busy = _try_lock(path, 0)
    try:
        yield not busy
    finally:
        if lock is not None:
            _release(lock)


@contextmanager
def save_slot(lock_dir: Path, slots: int, timeout: float) -> Iterator[bool]:
    """Hold one of ``slots`` lock files, so at most that many saves run at once per store.

    Yields False only when every slot stayed busy for ``timeout`` seconds. Where locking is
    impossible it yields True (no limit rather than no saves); where flock is not
    coordinated between hosts, each host counts only its own saves.
    """
    deadline = time.monotonic() + max(timeout, 0.0)
    order = list(range(slots))
    random.shuffle(order)  # spread replicas over the slots instead of all probing slot 0
    while True:
        for i in order:
            lock, busy = _try_lock(lock_dir / f"save-slot-{i:04d}.lock", 0)
            if lock is not None or not busy:
                try:
                    yield True
                finally:
                    if lock is not None:
                        _release(lock)
                return
        if time.monotonic() >= deadline:
            yield False
            return
        time.sleep(0.2)

"""Best-effort locks that only save duplicate work.

flock/lockf are silently *not* coordinated across hosts on many network filesystems (seen
on two FUSE mounts of one SeaweedFS, and reported for Lustre/GPFS/NFS). So nothing in
casstore needs a lock to be correct: a lock that fails to exclude only costs duplicate
uploads, and a lock that cannot be taken in time is skipped, never fatal.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import portalocker

log = logging.getLogger("casstore")


@contextmanager
def best_effort_lock(path: Path, timeout: float) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` if possible within ``timeout`` seconds.

    Yields True when held, False when the lock was busy or could not be created; the body
    runs either way.
    """
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
    except (portalocker.exceptions.BaseLockException, OSError) as e:
        log.debug("lock %s not taken (%s); going on without it", path, e)
        yield False
        return
    try:
        # Refresh the lock file's age so cleanup can tell live locks from stale ones.
        try:
            os.utime(path)
        except OSError:
            pass
        yield True
    finally:
        try:
            lock.release()
        except (portalocker.exceptions.BaseLockException, OSError):
            pass

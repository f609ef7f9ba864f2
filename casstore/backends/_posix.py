"""``renameat2(RENAME_NOREPLACE)``: publish a file under a name only if the name is free, in
one metadata operation (link + unlink costs two, and file creation is the dominant cost of
small objects on ext4 and network filesystems alike)."""

from __future__ import annotations

import ctypes
import errno
import os
import sys

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
# Answers meaning "this kernel or filesystem cannot do it", not "it failed".
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM}


def _load() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # glibc before 2.28, musl without it
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load()


def rename_noreplace(src: str, dst: str) -> bool:
    """Rename ``src`` to ``dst`` unless ``dst`` exists: True if renamed, False if it existed.

    Raises NotImplementedError where the platform or filesystem lacks the operation.
    """
    if _renameat2 is None:
        raise NotImplementedError("renameat2 is not available")
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
        return True
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        return False
    if err in _UNSUPPORTED:
        raise NotImplementedError(os.strerror(err))
    raise OSError(err, os.strerror(err), src, None, dst)

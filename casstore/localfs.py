"""The local side of a save or a load: walking the tree to save (regular files only, never
through a symlink), reading a file that may still be written, hashing a local file, and
finding a safe directory to restore into. Nothing here touches the store.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from casstore import chunking, constants
from casstore import manifest as mf
from casstore.errors import UnsafePath

log = logging.getLogger("casstore")


@dataclass
class LocalFile:
    rel: str
    path: str  # a string, not a Path: a save scans thousands of files
    size: int
    mode: int
    signature: Signature  # its state when scanned


# What tells a file's state without reading it: device, inode, size, mtime and ctime (ns),
# mode. Writing a file changes its ctime, which no one can set back (statcache.py).
Signature = tuple[int, int, int, int, int, int]


def signature_of(st: os.stat_result) -> Signature:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_mode)


def current_signature(path: str | os.PathLike[str]) -> Signature | None:
    """The state of the file at ``path`` now (not following a symlink); None if gone."""
    try:
        return signature_of(os.lstat(path))
    except OSError:
        return None


def open_checked(
    path: str, flags: int, same: Callable[[os.stat_result], bool]
) -> tuple[int, os.stat_result]:
    """(fd, stat) of ``path`` opened again by name (``flags``, never through a symlink, never
    waiting on a FIFO) if ``same(stat)`` says it is still the file expected there; else
    OSError(ESTALE), the descriptor closed. For files in a directory others may write:
    whatever they put in a file's place between two steps is refused, not written to.
    The caller closes the fd."""
    fd = os.open(path, flags | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not same(st):
            raise OSError(errno.ESTALE, "replaced or changed since it was checked", path)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def made_here(st: os.stat_result) -> bool:
    """Whether ``st`` can be a file this process made: a regular file of its user's with
    one name. With the inode number, what tells it from another file made in its place
    (ext4 hands a removed file's number to the next one made at once)."""
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1


def scan_tree(
    root: Path, skipped: list[tuple[str, str]], exclude: Callable[[str], bool] | None
) -> Iterator[LocalFile]:
    """Regular files under ``root``, never following a symlink; others are logged."""
    stack = [(root, "")]
    while stack:
        directory, rel_dir = stack.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            skipped.append((rel_dir or ".", f"unreadable directory: {e.strerror}"))
            log.warning("skipping unreadable directory %s: %s", directory, e)
            continue
        for entry in entries:
            rel = f"{rel_dir}{entry.name}"
            if entry.name.startswith(constants.TEMP_PREFIX):
                continue
            if exclude is not None and exclude(rel):
                continue
            try:
                rel.encode("utf-8")
            except UnicodeEncodeError:
                skipped.append((rel, "name is not valid UTF-8"))
                log.warning("skipping %r: file name is not valid UTF-8", rel)
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError as e:
                skipped.append((rel, f"cannot stat: {e.strerror}"))
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append((Path(entry.path), f"{rel}/"))
            elif stat.S_ISREG(st.st_mode):
                yield LocalFile(
                    rel, entry.path, st.st_size, stat.S_IMODE(st.st_mode), signature_of(st)
                )
            else:
                kind = "symlink" if stat.S_ISLNK(st.st_mode) else "special file"
                skipped.append((rel, kind))
                log.info("skipping %s %s", kind, rel)


def open_stable(f: LocalFile) -> tuple[int, os.stat_result] | None:
    """(fd, stat) of a regular file opened without following a symlink, or None if it
    vanished or is something else now. The caller closes the fd.

    O_NONBLOCK: a file swapped for a FIFO since the scan must not make the open wait for
    a writer (its check then refuses it). A regular file is read in blocking mode
    again, whatever a network filesystem would make of the flag."""
    try:
        fd, before = open_checked(f.path, os.O_RDONLY, lambda st: stat.S_ISREG(st.st_mode))
    except OSError:
        return None
    os.set_blocking(fd, True)
    return fd, before


def still_unchanged(fd: int, before: os.stat_result, bytes_read: int) -> bool:
    """Whether the file behind ``fd`` kept its size and mtime while ``bytes_read`` bytes
    (all of it) were read: otherwise a compiler is still writing it."""
    after = os.fstat(fd)
    return (
        bytes_read == before.st_size
        and after.st_size == before.st_size
        and after.st_mtime_ns == before.st_mtime_ns
    )


def read_stable(f: LocalFile) -> bytes | None:
    """The file's bytes, or None if it changed size/mtime while being read (still being
    written by a compiler, say) or vanished."""
    opened = open_stable(f)
    if opened is None:
        return None
    fd, before = opened
    try:
        with os.fdopen(os.dup(fd), "rb", buffering=0) as fh:
            data = fh.read()
        if not still_unchanged(fd, before, len(data)):
            return None
    finally:
        os.close(fd)
    f.size = len(data)
    return data


def file_digest(path: str, size: int) -> bytes | None:
    """BLAKE3 of a local file, read through mmap in native code (no copy, GIL released)."""
    try:
        return chunking.file_digest(path, size)
    except (OSError, ValueError):
        return None


def safe_parent(dest: str, rel: str, made_dirs: set[str], created: set[str] | None = None) -> str:
    """The directory that will hold ``rel`` inside ``dest``, created as needed.

    Every existing component must be a real directory: a symlink (even one pointing back
    inside) is refused, so no write can be redirected outside ``dest``. ``made_dirs``
    remembers directories already checked by this load, so each is checked once; the
    directories this call made are also added to ``created``.
    """
    mf.check_path(rel)
    head = rel.rpartition("/")[0]
    parent = os.path.join(dest, head) if head else dest
    if parent in made_dirs:  # most files: a sibling's load checked the whole way already
        return parent
    current = dest
    for part in rel.split("/")[:-1]:
        current = os.path.join(current, part)
        if current in made_dirs:
            continue
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            try:
                os.mkdir(current, 0o755)
                made_dirs.add(current)
                if created is not None:
                    created.add(current)
                continue
            except FileExistsError:
                st = os.lstat(current)
        if not stat.S_ISDIR(st.st_mode):
            what = "a symlink" if stat.S_ISLNK(st.st_mode) else "not a directory"
            raise UnsafePath(f"{rel}: {current} is {what}")
        made_dirs.add(current)
    return current

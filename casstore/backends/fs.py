"""POSIX filesystem backend: a local disk or a network volume mounted on every replica.

Publish protocol (see docs/format.md): write a uniquely named temp file *in the object's own
directory*, fsync it, then move it to the final name without ever replacing an existing one:
``renameat2(RENAME_NOREPLACE)`` where the filesystem has it, else ``link()`` + ``unlink()``
(EEXIST means someone published first, which is fine for immutable, content-addressed
objects). Filesystems with neither fall back to ``rename()``: keys are content digests or
unique names, so replacing an object could only replace it with identical bytes.
"""

from __future__ import annotations

import errno
import itertools
import os
import stat
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from casstore import constants
from casstore.backends._posix import rename_noreplace
from casstore.backends.base import Backend, ObjectInfo
from casstore.errors import CannotRenew, CorruptObject, NotFound, StoreUnavailable

# link() is not supported on every mount (some FUSE and SMB filesystems).
_NO_LINK_ERRNOS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


class _TempNames:
    """Unique temp names without a system call each (a restore makes thousands): a random
    stem per process, drawn again in a forked child, and a counter."""

    def __init__(self) -> None:
        self.renew()
        os.register_at_fork(after_in_child=self.renew)

    def renew(self) -> None:
        self.stem = uuid.uuid4().hex[:20]
        self.counter = itertools.count()

    def next(self) -> str:
        return f"{constants.TEMP_PREFIX}{self.stem}-{next(self.counter):x}"


_temp_names = _TempNames()


def temp_name() -> str:
    """A name no other temp file has: in one directory, across processes and hosts."""
    return _temp_names.next()


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samestat(os.lstat(a), os.lstat(b))
    except FileNotFoundError:
        return False


class FileSystemBackend(Backend):
    def __init__(self, root: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.root = Path(root)
        self._root = os.fspath(self.root)
        self.fsync = fsync
        self._noreplace = True
        # The primitive the last publish used: "renameat2", "link" or "rename" (so tests
        # and `casstore doctor` can tell what this mount supports).
        self.primitive = ""

    def describe(self) -> str:
        return f"fs:{self.root}"

    def _path(self, key: str) -> str:
        parts = key.split("/")
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"invalid object key {key!r}")
        return os.path.join(self._root, key)

    def _open_regular(self, key: str) -> tuple[int, os.stat_result]:
        """An fd of the object (and its stat), refused unless it is a regular file.

        O_NOFOLLOW and O_NONBLOCK: a symlink or a FIFO planted at an object's name must be
        refused, not followed or waited on (a FIFO would block every loader)."""
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self._path(key), flags)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no object {key}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise CorruptObject(f"object {key} is a symlink", path=key) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise CorruptObject(f"object {key} is not a regular file", path=key)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        fd, st = self._open_regular(key)
        try:
            limit = max_bytes if max_bytes is not None else st.st_size
            if st.st_size > limit:
                raise CorruptObject(
                    f"object {key} holds {st.st_size} bytes, over the limit of {limit}",
                    path=key,
                )
            # Read until EOF: one read() may return less on FUSE and network mounts.
            parts: list[bytes] = []
            total = 0
            while True:
                # Sized by the file, not the limit: os.read allocates what it is asked for.
                part = os.read(fd, max(min(limit, st.st_size) + 1 - total, 1 << 16))
                if not part:
                    break
                parts.append(part)
                total += len(part)
                if max_bytes is not None and total > max_bytes:
                    raise CorruptObject(
                        f"object {key} grew over the limit of {max_bytes} bytes", path=key
                    )
            return b"".join(parts)
        finally:
            os.close(fd)

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        # One open for every range (a round trip each on a network filesystem), then
        # positioned reads; refused like get() for a symlink or a non-regular file.
        fd, st = self._open_regular(key)
        try:
            out = []
            for offset, length in ranges:
                if offset < 0 or length < 0 or offset + length > st.st_size:
                    raise CorruptObject(
                        f"object {key} holds {st.st_size} bytes; range {offset}+{length} "
                        "is outside",
                        path=key,
                    )
                parts: list[bytes] = []
                got = 0
                while got < length:  # pread may return less on FUSE and network mounts
                    part = os.pread(fd, length - got, offset + got)
                    if not part:
                        raise CorruptObject(f"object {key} shrank while being read", path=key)
                    parts.append(part)
                    got += len(part)
                out.append(b"".join(parts))
            return out
        finally:
            os.close(fd)

    def put_if_absent(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        directory = os.path.dirname(path)
        try:
            tmp = self._write_temp(directory, data)
        except FileNotFoundError:
            os.makedirs(directory, exist_ok=True)
            tmp = self._write_temp(directory, data)
        try:
            return self._publish(tmp, path) is not None
        finally:
            try:
                os.unlink(tmp)  # gone after a rename; left by link() or a lost race
            except FileNotFoundError:
                pass

    def move(self, src: str, dst: str) -> bool:
        """Rename object ``src`` to ``dst`` unless ``dst`` exists. True if moved; False if
        ``dst`` existed (``src`` is then left in place) or ``src`` was gone."""
        src_path, dst_path = self._path(src), self._path(dst)
        os.makedirs(os.path.dirname(dst_path), exist_ok=True)
        try:
            how = self._publish(src_path, dst_path)
        except FileNotFoundError:
            return False
        # Only link() leaves the source name behind. After a rename, whatever is at the
        # source now is someone else's fresh object: never touch it.
        if how == "link":
            self._drop_linked_source(src_path, dst_path)
        return how is not None

    def _drop_linked_source(self, src_path: str, dst_path: str) -> None:
        """After ``link(src, dst)``, remove the name ``src`` only if it still names the
        object that was linked. Between the link and now another process may have removed
        ``src`` and published a fresh object there (a second gc's sweep, then a saver's
        re-upload); unlinking by name would delete that upload. So the name is first taken
        atomically (a rename to a temp name in the same directory), compared by inode, and
        a different object is put back."""
        taken = os.path.join(os.path.dirname(src_path), temp_name())
        try:
            os.rename(src_path, taken)
        except FileNotFoundError:
            return
        try:
            if not _same_file(taken, dst_path):
                self._publish(taken, src_path)  # False: re-published meanwhile, also fine
        finally:
            try:
                os.unlink(taken)
            except FileNotFoundError:
                pass

    def _publish(self, src: str, dst: str) -> str | None:
        """Give ``src``'s file the name ``dst`` without replacing an existing ``dst``.
        Returns the primitive that did it ("renameat2", "link", "rename"), or None when
        ``dst`` existed.

        Afterwards ``src`` may still exist (link() was used, or ``dst`` existed); the
        caller removes it."""
        if self._noreplace:
            try:
                self.primitive = "renameat2"
                return "renameat2" if rename_noreplace(src, dst) else None
            except NotImplementedError:
                self._noreplace = False  # this mount cannot; use link() from now on
        try:
            self.primitive = "link"
            os.link(src, dst)
            return "link"
        except FileExistsError:
            return None
        except OSError as e:
            if e.errno not in _NO_LINK_ERRNOS:
                raise
        # Neither primitive exists here: a plain rename. Keys are content digests or
        # unique names, so the only thing it can replace is an identical object.
        self.primitive = "rename"
        if os.path.lexists(dst):
            return None
        os.rename(src, dst)
        return "rename"

    def _write_temp(self, directory: str, data: bytes) -> str:
        tmp = os.path.join(directory, temp_name())
        # 0o666 less the umask, as any tool creates files: on a team volume (umask 002,
        # a shared group) every writer can then renew every object's age.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.close(fd)
        return tmp

    def refresh(self, key: str) -> bool:
        path = self._path(key)
        try:
            os.utime(path)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except PermissionError as e:
            # Present but not renewable by this user (another user's 0644 object, a
            # read-only store). Saying "present" would let gc sweep a chunk that the
            # manifest about to be published lists.
            if not os.path.lexists(path):
                return False
            raise CannotRenew(
                f"cannot renew {key}: {e.strerror} (objects written by another user "
                "must be group-writable; see docs/deploy.md)",
                key=key,
            ) from e

    def republish(self, key: str, data: bytes) -> None:
        """Replace ``key`` by a fresh copy of the same bytes owned by this user, so its age
        starts now. Safe because names are content digests: only identical bytes replace
        identical bytes, atomically (a reader sees the old copy or the new one)."""
        path = self._path(key)
        try:
            tmp = self._write_temp(os.path.dirname(path), data)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = self._write_temp(os.path.dirname(path), data)
        try:
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, st.st_size, st.st_mtime)

    def delete(self, key: str) -> bool:
        """Unlink ``key``, walking down from the root one directory at a time without
        following symlinks: anyone who can write the store could swap a directory for a
        symlink between gc's listing and its delete, and gc must never unlink outside the
        store. A key under a symlinked directory is not in the store: False."""
        parts = self._path(key)[len(self._root) :].strip("/").split("/")
        try:
            dir_fd = os.open(self._root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            for part in parts[:-1]:
                flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
                try:
                    child = os.open(part, flags, dir_fd=dir_fd)
                except (FileNotFoundError, NotADirectoryError):
                    return False
                except OSError as e:
                    if e.errno == errno.ELOOP:  # a symlink
                        return False
                    raise
                os.close(dir_fd)
                dir_fd = child
            os.unlink(parts[-1], dir_fd=dir_fd)
            return True
        except FileNotFoundError:
            return False
        finally:
            os.close(dir_fd)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = prefix.rstrip("/")
        start = Path(self._path(base)) if base else self.root
        if base and not self._real_dirs(base):
            return  # a store directory replaced by a symlink: never list (or delete) there
        yield from self._walk(start, f"{base}/" if base else "")

    def _real_dirs(self, base: str) -> bool:
        """Whether every component of ``base`` below the root is a real directory (not a
        symlink). Anyone who can write the store could swap one for a symlink elsewhere."""
        current = self._root
        for part in base.split("/"):
            current = os.path.join(current, part)
            try:
                if not stat.S_ISDIR(os.lstat(current).st_mode):
                    return False
            except FileNotFoundError:
                return True  # nothing there to list: _walk finds nothing
        return True

    def _walk(self, directory: Path, key_prefix: str) -> Iterator[ObjectInfo]:
        try:
            entries = list(os.scandir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.name.startswith(constants.TEMP_PREFIX):
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), f"{key_prefix}{entry.name}/")
            elif entry.is_file(follow_symlinks=False):
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield ObjectInfo(f"{key_prefix}{entry.name}", st.st_size, st.st_mtime)

    def holds_other_files(self) -> bool:
        """Whether the root directory holds anything but ``lost+found`` and temp files (a
        fresh volume's root, a first save that crashed): where a new store may start."""
        try:
            names = os.listdir(self._root)
        except FileNotFoundError:
            return False
        except OSError as e:
            raise StoreUnavailable(f"cannot read store root {self.root}: {e.strerror}") from e
        return any(n != "lost+found" and not n.startswith(constants.TEMP_PREFIX) for n in names)

    def ensure_root(self) -> None:
        """Create the root directory, with a clear error when that is impossible."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise StoreUnavailable(
                f"store root {self.root} exists and is not a directory"
            ) from None
        except OSError as e:
            raise StoreUnavailable(f"cannot create store root {self.root}: {e.strerror}") from e
        if not self.root.is_dir():
            raise StoreUnavailable(f"store root {self.root} is not a directory")

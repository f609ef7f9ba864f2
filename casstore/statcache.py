"""What this host knows about the files of a directory it saved or restored: for each
file, its state (device, inode, size, mtime, ctime, mode) when casstore last read or wrote
it, and the entry that describes its bytes.

A later save of the same directory, to the same store under the same key, takes a file
whose state is unchanged as unchanged without reading it (its chunks are still looked
for in the store, so a save still heals a chunk lost since: it reads the file then); a
later load skips hashing a present file whose state is unchanged. Like git's index or a
backup tool's parent snapshot, this trusts that a file whose inode, size, mtime and ctime
are all unchanged holds the same bytes: writing a file changes its ctime, which no one can
set back. A file whose mtime or ctime falls within a second of when it was read is not
recorded (it may change again within the same timestamp tick); files a load has just
written are recorded (casstore wrote and verified them itself).

Only entries whose chunk list is known to describe the file's bytes are recorded (a save
cut or checked it against them; a load, which checks each chunk it writes but not the
file's digest, records the files whose chunk list tells the digest: one chunk, or none),
so that a manifest lying about a file cannot be carried into the next save. A
record is used only if this user wrote it and no one else may write it.

Only an optimisation, kept per host under ``~/.cache/casstore/stat``
(``$CASSTORE_STAT_CACHE``; ``off`` keeps none): any trouble reading or writing it (a
damaged or foreign record included) means reading the files.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path

import msgspec

from casstore import constants
from casstore.backends.fs import temp_name
from casstore.errors import CasstoreError
from casstore.localfs import Signature
from casstore.manifest import FileEntry, check_entry

log = logging.getLogger("casstore")

FORMAT = 1
# A file changed within this long before it was read may change again unseen: the
# timestamps of many filesystems tick by a jiffy, of some (FUSE, NFS) by a second.
RACY_NS = 1_000_000_000


class _Record(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    signature: Signature
    entry: FileEntry


class _Document(msgspec.Struct, forbid_unknown_fields=True):
    format: int
    files: dict[str, _Record]


Known = dict[str, tuple[Signature, FileEntry]]


def is_racy(signature: Signature, read_at_ns: int) -> bool:
    """Whether a file in this state, read at ``read_at_ns``, may change unseen."""
    _, _, _, mtime_ns, ctime_ns, _ = signature
    return max(mtime_ns, ctime_ns) >= read_at_ns - RACY_NS


class StatCache:
    """The recorded states of one directory's files, for one store and key."""

    def __init__(self, directory: Path, store_location: str, key_id: str, tree: Path) -> None:
        # Bytes: a directory's name need not be UTF-8.
        where = b"\0".join(
            (store_location.encode(), key_id.encode(), os.fsencode(os.path.realpath(tree)))
        )
        self.path = directory / f"{hashlib.sha256(where).hexdigest()[:32]}.stat"

    def load(self) -> Known:
        """The recorded files; empty when there is no record or it cannot be used."""
        try:
            return self._load()
        except FileNotFoundError:
            return {}
        except Exception as e:  # whatever is wrong with it, the files are read instead
            log.debug("stat cache %s not used: %s", self.path, e)
            return {}

    def _load(self) -> Known:
        with open(self.path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                raise PermissionError("not written by this user alone")
            if st.st_size > constants.MAX_MANIFEST_BYTES:
                raise ValueError(f"{st.st_size} bytes")
            doc = msgspec.msgpack.decode(fh.read(), type=_Document)
        if doc.format != FORMAT:
            return {}
        known: Known = {}
        for rel, r in doc.files.items():
            try:
                check_entry(r.entry, "stat cache")
            except CasstoreError:
                continue
            _, _, size, _, _, mode = r.signature
            if r.entry.path == rel and r.entry.size == size and r.entry.mode == stat.S_IMODE(mode):
                known[rel] = (r.signature, r.entry)
        return known

    def record(self, known: Known) -> None:
        """Replace the record with ``known`` (best effort; atomic)."""
        doc = _Document(FORMAT, {rel: _Record(sig, entry) for rel, (sig, entry) in known.items()})
        tmp = self.path.parent / temp_name()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(msgspec.msgpack.encode(doc))
            os.replace(tmp, self.path)
        except Exception as e:  # only an optimisation: never a failed save or load
            log.debug("stat cache %s not written: %s", self.path, e)
            try:
                tmp.unlink()
            except OSError:
                pass


__all__ = ["FORMAT", "RACY_NS", "Known", "StatCache", "is_racy"]

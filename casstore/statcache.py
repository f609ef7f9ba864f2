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

Only an optimisation, kept per host under ``~/.cache/casstore/stat``
(``$CASSTORE_STAT_CACHE``; ``off`` keeps none): any trouble reading or writing it means
reading the files.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import msgspec

from casstore.backends.fs import temp_name
from casstore.localfs import Signature
from casstore.manifest import FileEntry

log = logging.getLogger("casstore")

FORMAT = 1
# A file changed within this long before it was read may change again unseen: the
# timestamps of many filesystems tick by a jiffy, of some (FUSE, NFS) by a second.
RACY_NS = 1_000_000_000


class _Record(msgspec.Struct, array_like=True, forbid_unknown_fields=True):
    signature: tuple[int, int, int, int, int, int]
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
        where = "\0".join((store_location, key_id, os.path.realpath(tree)))
        self.path = directory / f"{hashlib.sha256(where.encode()).hexdigest()[:32]}.stat"

    def load(self) -> Known:
        """The recorded files; empty when there is no record or it cannot be used."""
        try:
            doc = msgspec.msgpack.decode(self.path.read_bytes(), type=_Document)
        except FileNotFoundError:
            return {}
        except (OSError, msgspec.DecodeError, msgspec.ValidationError) as e:
            log.debug("stat cache %s not used: %s", self.path, e)
            return {}
        if doc.format != FORMAT:
            return {}
        return {rel: (r.signature, r.entry) for rel, r in doc.files.items() if r.entry.path == rel}

    def record(self, known: Known) -> None:
        """Replace the record with ``known`` (best effort; atomic)."""
        doc = _Document(FORMAT, {rel: _Record(sig, entry) for rel, (sig, entry) in known.items()})
        tmp = self.path.parent / temp_name()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(msgspec.msgpack.encode(doc))
            os.replace(tmp, self.path)
        except OSError as e:
            log.debug("stat cache %s not written: %s", self.path, e)
            try:
                tmp.unlink()
            except OSError:
                pass


__all__ = ["FORMAT", "RACY_NS", "Known", "StatCache", "is_racy"]

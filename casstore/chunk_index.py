"""The chunk index: which chunks the store holds, and in which pack.

It is the union of every pack's index object (``index/<pack id>.idx``, written once, never
changed, see :mod:`casstore.packs`). A save reads it to skip every chunk any earlier save
of any model stored (org-wide dedup); a load reads it to find the packs holding the
chunks it needs (manifests name chunks, not packs); gc reads it to know what each pack
holds.

Index objects are immutable and named after their pack, so a host keeps the ones it has
read in a local cache directory and, next time, fetches only those it has not seen: one
listing of ``index/`` and a request per new pack. A cached copy is used only while the
store lists an object of that name and size, and is checked like a fetched one.
"""

from __future__ import annotations

import bisect
import hashlib
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from casstore import constants
from casstore.backends.base import Backend, ObjectInfo
from casstore.errors import CasstoreError, CorruptObject, NotFound, UnsupportedIndex
from casstore.packs import (
    ChunkLoc,
    PackIndex,
    decode_index,
    index_key,
    pack_id_from_key,
    pack_key,
)

log = logging.getLogger("casstore")


@dataclass(frozen=True, slots=True)
class Location:
    index: PackIndex
    chunk: ChunkLoc


@dataclass
class ChunkIndex:
    """Where each chunk lies. A chunk may lie in several packs (two savers racing, gc
    repacking): every location is kept, newest pack last."""

    packs: dict[str, PackIndex] = field(default_factory=dict)
    #: Index objects listed but that fail their checks (checksum, encoding, bounds).
    damaged: dict[str, str] = field(default_factory=dict)
    #: Index objects listed but not readable now (permissions, I/O, a newer format).
    #: With the damaged ones, their packs' contents are unknown: gc never judges them.
    unreadable: dict[str, str] = field(default_factory=dict)
    #: When each pack's index was published (its listing), to try newer packs first.
    published: dict[str, float] = field(default_factory=dict)
    _where: dict[bytes, list[Location]] = field(default_factory=dict)

    def add(self, index: PackIndex, published: float = 0.0) -> None:
        if index.id in self.packs:
            return
        self.packs[index.id] = index
        self.published[index.id] = published
        for c in index.chunks:
            # Kept in publishing order as they are added: looked up for every chunk of
            # every restore, never sorted again.
            bisect.insort(
                self._where.setdefault(c.digest, []),
                Location(index, c),
                key=lambda loc: self.published[loc.index.id],
            )

    def locate(self, digest: bytes) -> list[Location]:
        """Every location of ``digest``, the most recently published pack last."""
        return list(self._where.get(digest, ()))

    def dictionary_chunks(self, live: Iterable[bytes]) -> set[bytes]:
        """Every chunk the dictionaries of blocks holding a live chunk name, and so on for
        blocks holding those (any copy of a chunk may be the one read), live or not: what
        must stay readable from a block without a dictionary for every live chunk to stay
        readable."""
        named: set[bytes] = set()
        seen: set[tuple[bytes, ...]] = set()
        frontier = set(live)
        while frontier:
            found: set[bytes] = set()
            for digest in frontier:
                for loc in self._where.get(digest, ()):
                    block = loc.index.blocks[loc.chunk.block]
                    if block.plain:
                        continue
                    dictionary = loc.index.dictionaries[block.dictionary]
                    if dictionary not in seen:
                        seen.add(dictionary)
                        found.update(d for d in dictionary if d not in named)
            named |= found
            frontier = found
        return named

    def catch_up(
        self, backend: Backend, skip: Iterable[str] = ()
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Read the indexes the store lists now that this index lacks (published since it
        was read; ``skip``: ids not to read again); returns those that could not be read,
        with why, as :func:`load` sorts them: (damaged, unreadable)."""
        passed = self.packs.keys() | set(skip)
        listed = {p: info for p, info in list_indexes(backend).items() if p not in passed}
        fresh = load(backend, listed=listed)
        for pack_id, pack in fresh.packs.items():
            self.add(pack, fresh.published[pack_id])
        return fresh.damaged, fresh.unreadable

    def stored_sizes(self) -> dict[bytes, int]:
        """Each chunk's stored bytes: its share of its block's compressed length (what
        ``du`` and gc's --max-size count)."""
        sizes: dict[bytes, int] = {}
        for pack in self.packs.values():
            for c in pack.chunks:
                block = pack.blocks[c.block]
                sizes[c.digest] = block.length * c.size // max(1, block.usize)
        return sizes

    def __contains__(self, digest: object) -> bool:
        return digest in self._where

    def __len__(self) -> int:
        return len(self._where)

    def digests(self) -> Iterator[bytes]:
        return iter(self._where)


def read_index(backend: Backend, pack_id: str) -> PackIndex:
    """One pack's index, checked. Raises NotFound or CorruptObject."""
    key = index_key(pack_id)
    return _checked(backend.get(key, max_bytes=constants.MAX_INDEX_BYTES), key, pack_id)


def _checked(blob: bytes, key: str, pack_id: str) -> PackIndex:
    index = decode_index(blob, source=key)
    if index.id != pack_id:
        raise CorruptObject(f"{key} describes pack {index.id}", path=key)
    return index


class IndexCache:
    """Index objects already read, in a local directory of this store's own (its name is a
    hash of the store's location). Only an optimisation: any trouble reading or writing
    it means fetching from the store."""

    def __init__(self, directory: Path, store_location: str) -> None:
        tag = hashlib.sha256(store_location.encode()).hexdigest()[:16]
        self.dir = directory / tag

    def get(self, pack_id: str, size: int) -> bytes | None:
        try:
            blob = (self.dir / f"{pack_id}{constants.INDEX_SUFFIX}").read_bytes()
        except OSError:
            return None
        return blob if len(blob) == size else None

    def put(self, pack_id: str, blob: bytes) -> None:
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f"{constants.TEMP_PREFIX}{uuid.uuid4().hex}"
            tmp.write_bytes(blob)
            os.rename(tmp, self.dir / f"{pack_id}{constants.INDEX_SUFFIX}")
        except OSError as e:
            log.debug("index cache %s not written: %s", self.dir, e)

    def prune(self, listed: Iterable[str]) -> None:
        """Forget packs the store no longer lists (gc deleted them)."""
        keep = {f"{p}{constants.INDEX_SUFFIX}" for p in listed}
        try:
            entries = list(os.scandir(self.dir))
        except OSError:
            return
        for e in entries:
            if e.name not in keep:
                try:
                    os.unlink(e.path)
                except OSError:
                    pass


def list_packs(backend: Backend) -> dict[str, ObjectInfo]:
    """Pack id -> the listing of its pack object (``packs/``)."""
    return _by_pack_id(backend, constants.PACKS_DIR, pack_key)


def list_trashed(backend: Backend) -> dict[str, str]:
    """Pack id -> the key of its copy in ``trash/`` (a sweep in progress, or a crashed one)."""
    found: dict[str, str] = {}
    for info in backend.list(f"{constants.TRASH_DIR}/"):
        pack_id = pack_id_from_key(info.key)
        if pack_id is not None and info.key.endswith(constants.PACK_SUFFIX):
            found[pack_id] = info.key
    return found


def list_indexes(backend: Backend) -> dict[str, ObjectInfo]:
    """Pack id -> the listing of its index object."""
    return _by_pack_id(backend, constants.INDEX_DIR, index_key)


def _by_pack_id(
    backend: Backend, directory: str, key_of: Callable[[str], str]
) -> dict[str, ObjectInfo]:
    """The objects listed under ``directory`` whose key is exactly ``key_of`` their pack
    id, by pack id (anything else there is not one of them)."""
    found: dict[str, ObjectInfo] = {}
    for info in backend.list(f"{directory}/"):
        pack_id = pack_id_from_key(info.key)
        if pack_id is not None and info.key == key_of(pack_id):
            found[pack_id] = info
    return found


#: Starts the reason of an index from a newer casstore in ``ChunkIndex.unreadable``.
UNSUPPORTED_MARK = "newer format: "

#: What fetching one index gave: the index, why it could not be read, or None (gone).
_Fetched = PackIndex | CasstoreError | OSError | None


def load(
    backend: Backend,
    *,
    cache: IndexCache | None = None,
    threads: int = 8,
    listed: dict[str, ObjectInfo] | None = None,
) -> ChunkIndex:
    """The chunk index of the store: every listed index object, read from ``cache`` where
    it holds them, else fetched in parallel. ``listed``: a listing of ``index/`` the
    caller made already (:func:`list_indexes`)."""
    listed = list_indexes(backend) if listed is None else listed
    result = ChunkIndex()

    def fetch(
        item: tuple[str, ObjectInfo],
    ) -> tuple[str, PackIndex | CasstoreError | OSError | None]:
        pack_id, info = item
        if cache is not None and (blob := cache.get(pack_id, info.size)) is not None:
            try:
                return pack_id, _checked(blob, info.key, pack_id)
            except CasstoreError:
                pass  # a damaged cached copy: fetch it again
        try:
            blob = backend.get(info.key, max_bytes=constants.MAX_INDEX_BYTES)
            index = _checked(blob, info.key, pack_id)
        except NotFound:
            return pack_id, None  # deleted since the listing: its pack is gone too
        except (CasstoreError, OSError) as e:
            return pack_id, e
        if cache is not None:
            cache.put(pack_id, blob)
        return pack_id, index

    items = sorted(listed.items())
    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="casstore-index") as pool:
        for pack_id, outcome in pool.map(fetch, items):
            if isinstance(outcome, PackIndex):
                result.add(outcome, listed[pack_id].mtime)
            elif isinstance(outcome, CorruptObject):
                result.damaged[pack_id] = str(outcome)
            elif isinstance(outcome, UnsupportedIndex):
                result.unreadable[pack_id] = f"{UNSUPPORTED_MARK}{outcome}"
            elif outcome is not None:
                result.unreadable[pack_id] = str(outcome)
    if cache is not None:
        cache.prune(listed)
    return result

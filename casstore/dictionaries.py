"""Dictionaries of stored chunks: which chunks a save compresses against, and rebuilding
a block's dictionary to read it.

A compile cache of a new model repeats much of what caches of other models already hold
(Triton kernels of the same templates, FX entries of the same layers), but chunk dedup
cannot see it: the repeats sit inside files of their own. A save therefore compresses its
blocks of small files' chunks with, as a zstd raw-content dictionary, chunks the store
already holds (docs/decisions.md, "Cross-save compression"). The dictionary costs no stored
bytes: a pack's index lists its chunks' digests, and a reader rebuilds it from them.

Depth is one: a dictionary is made only of chunks read from blocks compressed without
one, so rebuilding a dictionary never needs another dictionary, and no chain of blocks can
loop. Every chunk is checked against its digest, so a rebuilt dictionary is exactly the
one the writer used, or it is not rebuilt at all.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

import zstandard

from casstore import constants, packs
from casstore.backends.base import Backend
from casstore.chunk_index import ChunkIndex, Location
from casstore.errors import CasstoreError, DictionaryUnavailable, NotFound
from casstore.manifest import Manifest

#: Blocks read (and held decompressed) at once while gathering a dictionary's chunks.
_BLOCKS_PER_READ = 2
#: Decompressed bytes of blocks that hold none of the chunks their index places there
#: (damaged or planted), at most, in one gathering of a dictionary's chunks: each such
#: pack is read no further, so this is 32 packs of two 9 MiB blocks (a chunk is tried in
#: 16 packs at most anyway).
WASTED_BLOCK_BYTES = 64 * constants.MAX_BLOCK_USIZE
#: How many of a chunk's locations are tried before it counts as unavailable.
MAX_TRIES = 16  # as for any chunk (docs/format.md)


def choose(
    index: ChunkIndex,
    manifests: Iterable[Manifest],
    target: int | None = None,
) -> list[bytes]:
    """The chunks a new save's dictionary is drawn from, up to ``target`` bytes: those the
    most recent ``manifests`` list (newest first) that lie in a block of small files
    stored without a dictionary (only those may feed one: depth one). Chunks some manifest
    lists, rather than the most recently packed ones: a dictionary keeps its chunks from gc
    while a block needs it, and a dropped key's chunks would stay for it. Oldest first
    (zstd reaches the end of a dictionary most cheaply). ``target`` defaults to
    :data:`constants.DICTIONARY_TARGET` (0: no dictionary)."""
    target = constants.DICTIONARY_TARGET if target is None else target
    newest_first: list[bytes] = []
    seen: set[bytes] = set()
    total = 0
    for m in manifests:
        for f in reversed(m.files):
            for c in reversed(f.chunks):
                if len(newest_first) == constants.MAX_DICTIONARY_CHUNKS:
                    return newest_first[::-1]
                if c.digest in seen:
                    continue
                feeding = [
                    loc
                    for loc in index.locate(c.digest)
                    if loc.index.blocks[loc.chunk.block].plain
                    and loc.index.blocks[loc.chunk.block].small
                ]
                if not feeding:
                    continue
                # The largest size an index gives, not the manifest's: both are anyone's
                # words, so the save also stops reading past its budget (fetch) and
                # counts the bytes as read (newest_within).
                size = max(loc.chunk.size for loc in feeding)
                if total + size > target:
                    return newest_first[::-1]
                seen.add(c.digest)
                newest_first.append(c.digest)
                total += size
    return newest_first[::-1]


def newest_within(chunks: list[tuple[bytes, bytes]], budget: int) -> list[tuple[bytes, bytes]]:
    """The longest tail of ``chunks`` (oldest first) whose bytes fit in ``budget``."""
    total = 0
    for i in range(len(chunks) - 1, -1, -1):
        total += len(chunks[i][1])
        if total > budget:
            return chunks[i + 1 :]
    return chunks


def plain_locations(index: ChunkIndex, digest: bytes) -> list[Location]:
    """The locations of ``digest`` in blocks without a dictionary, the most recently
    published last: the only ones a dictionary's chunk is read from."""
    return [loc for loc in index.locate(digest) if loc.index.blocks[loc.chunk.block].plain]


def fetch(
    backend: Backend,
    index: ChunkIndex,
    digests: Iterable[bytes],
    *,
    max_bytes: int | None = None,
    trash_key: Callable[[str], str | None] | None = None,
    only_from: Mapping[bytes, str] | None = None,
) -> tuple[dict[bytes, bytes], dict[bytes, str]]:
    """The bytes of ``digests``, each read from a block without a dictionary and checked
    against its digest; and, for those that could not be read, why. ``only_from``: the
    one pack (id) each digest may be read from (the copy a save keeps). Each digest is tried
    in up to :data:`MAX_TRIES` packs, the most recently published first; blocks are read
    two at a time (neighbours in one range) and let go once their chunks are taken.

    Bounded whatever the indexes say: reading stops once the chunks read pass
    ``max_bytes``. A pack that cannot be read, or one of whose blocks yields none of the
    chunks its index places there (damaged, or planted: a frame of a few bytes may expand
    to 9 MiB), is not read again, and reading stops once such blocks add up to
    :data:`WASTED_BLOCK_BYTES`: only blocks that yield nothing count, so a planted index
    never uses up the budget of the blocks that hold the chunks. ``trash_key(pack id)``:
    where a pack gc is sweeping lies meanwhile (a load reads it there, as restore.py
    does)."""
    found: dict[bytes, bytes] = {}
    why: dict[bytes, str] = {}
    total = wasted = 0
    shunned: set[bytes] = set()  # packs whose blocks did not hold what their index says
    options = {
        d: _distinct_packs(
            [
                loc
                for loc in plain_locations(index, d)
                if only_from is None or only_from.get(d) == loc.index.id
            ]
        )[-MAX_TRIES:]
        for d in set(digests)
    }
    for d, left in options.items():
        if not left:
            why[d] = f"chunk {d.hex()} is in no block without a dictionary"

    def stop(what: str) -> tuple[dict[bytes, bytes], dict[bytes, str]]:
        return found, {d: what for d in options if d not in found}

    while True:
        plan: dict[bytes, tuple[packs.PackIndex, dict[int, list[Location]]]] = {}
        for d, left in options.items():
            while d not in found and left:
                loc = left.pop()  # the most recently published first
                if loc.index.pack in shunned:
                    continue
                entry = plan.setdefault(loc.index.pack, (loc.index, {}))
                entry[1].setdefault(loc.chunk.block, []).append(loc)
                break
        if not plan:
            return found, {d: w for d, w in why.items() if d not in found}
        for pack, by_block in plan.values():
            source = packs.pack_key(pack.pack)
            numbers = sorted(by_block)
            for i in range(0, len(numbers), _BLOCKS_PER_READ):
                group = numbers[i : i + _BLOCKS_PER_READ]
                if pack.pack in shunned:
                    for n in group:
                        for loc in by_block[n]:
                            why[loc.chunk.digest] = f"{source} holds other bytes than it says"
                    continue
                try:
                    blocks = _read_plain(backend, pack, group, trash_key)
                except (CasstoreError, OSError) as e:
                    shunned.add(pack.pack)  # gone, damaged or unreadable: not again
                    for n in group:
                        for loc in by_block[n]:
                            why[loc.chunk.digest] = f"{source}: {e}"
                    continue
                for n in group:
                    yielded = False
                    for loc in by_block[n]:
                        try:
                            data = packs.chunk_of(blocks[n], loc.chunk, source)
                        except CasstoreError as e:
                            why[loc.chunk.digest] = str(e)
                            continue
                        yielded = True
                        found[loc.chunk.digest] = data
                        total += len(data)
                        if max_bytes is not None and total > max_bytes:
                            return stop(f"its chunks pass {max_bytes} bytes")
                    if not yielded:
                        shunned.add(pack.pack)
                        wasted += pack.blocks[n].usize
                        if wasted > WASTED_BLOCK_BYTES:
                            return stop(
                                f"blocks holding none of the chunks their indexes place there "
                                f"pass {WASTED_BLOCK_BYTES} bytes"
                            )


def _distinct_packs(locations: list[Location]) -> list[Location]:
    """One location per pack (the last listed): a pack listing a digest many times must
    not use up its tries."""
    seen: set[bytes] = set()
    kept: list[Location] = []
    for loc in reversed(locations):
        if loc.index.pack not in seen:
            seen.add(loc.index.pack)
            kept.append(loc)
    return kept[::-1]


def _read_plain(
    backend: Backend,
    pack: packs.PackIndex,
    numbers: list[int],
    trash_key: Callable[[str], str | None] | None,
) -> dict[int, bytes]:
    try:
        return packs.read_blocks(backend, pack, numbers)
    except NotFound:
        moved = trash_key(pack.id) if trash_key is not None else None
        if moved is None:
            raise
        return packs.read_blocks(backend, pack, numbers, key=moved)


class Rebuilder:
    """Rebuilds the dictionaries blocks name (a :data:`casstore.packs.Dictionaries`), each
    once per instance however many blocks and threads need it; a dictionary that could
    not be rebuilt is not tried again by the same instance."""

    def __init__(
        self,
        backend: Backend,
        index: ChunkIndex,
        *,
        reload: Callable[[], ChunkIndex] | None = None,
        trash_key: Callable[[str], str | None] | None = None,
    ) -> None:
        """``reload()``: the store's chunk index read again, tried once when a dictionary
        cannot be rebuilt (gc may have repacked its chunks since ``index`` was read);
        ``trash_key``: as for :func:`fetch`."""
        self.backend = backend
        self.index = index
        self._reload = reload
        self._trash_key = trash_key
        self._lock = threading.Lock()
        self._locks: dict[tuple[bytes, ...], threading.Lock] = defaultdict(threading.Lock)
        self._built: dict[tuple[bytes, ...], zstandard.ZstdCompressionDict | str] = {}

    def __call__(self, pack: packs.PackIndex, number: int) -> zstandard.ZstdCompressionDict:
        digests = pack.dictionaries[number]
        with self._lock:
            one = self._locks[digests]
        with one:
            built = self._built.get(digests)
            if built is None:
                built = self._built[digests] = self._build(digests)
        if isinstance(built, str):
            raise DictionaryUnavailable(
                f"dictionary {number} of pack {pack.id} cannot be rebuilt: {built}"
            )
        return built

    def _build(self, digests: tuple[bytes, ...]) -> zstandard.ZstdCompressionDict | str:
        tried = self.index
        built = self._build_from(tried, digests)
        if isinstance(built, str):
            with self._lock:  # read again once, by whichever thread fails first
                if self._reload is not None:
                    self.index = self._reload()
                    self._reload = None
                fresh = self.index
            if fresh is not tried:
                built = self._build_from(fresh, digests)
        return built

    def _build_from(
        self, index: ChunkIndex, digests: tuple[bytes, ...]
    ) -> zstandard.ZstdCompressionDict | str:
        # Bounded by the bytes read and verified, never by sizes an index declares (any
        # writer of the store can publish an index that lies about them).
        found, why = fetch(
            self.backend,
            index,
            digests,
            max_bytes=constants.MAX_DICTIONARY_BYTES,
            trash_key=self._trash_key,
        )
        if why:
            first = next(iter(why.values()))
            return f"{len(why)} of its {len(digests)} chunks cannot be read ({first})"
        size = sum(len(found[d]) for d in digests)
        if size > constants.MAX_DICTIONARY_BYTES:
            return f"its chunks pass {constants.MAX_DICTIONARY_BYTES} bytes"
        return packs.raw_dictionary(b"".join(found[d] for d in digests))

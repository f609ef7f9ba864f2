"""Pack files: many chunks in one store object, compressed together.

A compile cache is thousands of small files, and a store pays per object (a round trip
per open on a network filesystem, a request on an object store, an inode on a shared
volume). A save therefore writes its new chunks into a few *packs*:

* a pack (``packs/<hh>/<id>.pack``, ``id`` random: every pack ever published has a name
  of its own, so a pack is never "already there" with another index) is a sequence of
  *blocks*, each one zstd frame holding whole chunks back to back, up to
  :data:`constants.BLOCK_TARGET` uncompressed bytes. A compile cache repeats itself across
  files (a Triton kernel kept at five stages of lowering, FX entries bundling copies of
  kernels), which per-chunk compression cannot see and a multi-MiB frame can
  (docs/decisions.md, "Packs and compression");
* its *index* (``index/<id>.idx``) lists each block (offset, length, uncompressed size,
  dictionary) and each chunk (digest, block, offset in the block, size). Readers never
  trust it for bytes: every chunk is checked against its digest after decompression;
* a block of small files' chunks may be compressed with a *dictionary*: the bytes of
  chunks earlier saves stored, back to back, as a zstd raw-content dictionary, so that a
  new model's cache is stored as its differences from caches already in the store
  (docs/decisions.md, "Cross-save compression"). The index lists the dictionary's chunk
  digests; a reader rebuilds it from those chunks, read from blocks without a dictionary
  (depth 1: :mod:`casstore.dictionaries`).

A pack is published before its index, and both before any manifest that needs them
(:mod:`casstore.store`). Layout and encoding: docs/format.md.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import msgspec
import zstandard

from casstore import chunking, constants
from casstore.backends.base import Backend
from casstore.errors import CorruptObject, DictionaryUnavailable, NotFound, UnsupportedIndex

INDEX_FORMAT_VERSION = 2
_Bytes = TypeVar("_Bytes", bytes, memoryview)
#: ``BlockRef.dictionary`` of a block compressed without one.
NO_DICTIONARY = -1


class BlockRef(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One zstd frame of a pack: where it lies, how many bytes it expands to, the
    dictionary it was compressed with (a number in ``PackIndex.dictionaries``, or
    :data:`NO_DICTIONARY`), and whether it holds chunks of small files (only such blocks
    without a dictionary feed the dictionaries of later saves)."""

    offset: int
    length: int
    usize: int
    dictionary: int = NO_DICTIONARY
    small: bool = False

    @property
    def plain(self) -> bool:
        return self.dictionary == NO_DICTIONARY


class ChunkLoc(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Where one chunk lies: block number, offset in the block's uncompressed bytes."""

    digest: bytes
    block: int
    offset: int
    size: int


class PackIndex(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: int
    pack: bytes  # the pack's id: 32 random bytes, unique to this pack
    size: int  # the pack's length in bytes
    blocks: tuple[BlockRef, ...]
    chunks: tuple[ChunkLoc, ...]
    checksum: bytes  # BLAKE3 of the pack's bytes (verify checks it)
    #: Each dictionary its blocks use: the digests of the chunks whose bytes, back to
    #: back in this order, are the zstd raw-content dictionary.
    dictionaries: tuple[tuple[bytes, ...], ...] = ()

    @property
    def id(self) -> str:
        return self.pack.hex()


@dataclass(frozen=True)
class Sealed:
    """A finished pack, ready to publish: its bytes, then its index."""

    data: bytes
    index: PackIndex

    @property
    def id(self) -> str:
        return self.index.id


def pack_key(pack_id: bytes | str) -> str:
    hexd = pack_id if isinstance(pack_id, str) else pack_id.hex()
    return f"{constants.PACKS_DIR}/{hexd[: constants.FANOUT_CHARS]}/{hexd}{constants.PACK_SUFFIX}"


def index_key(pack_id: bytes | str) -> str:
    hexd = pack_id if isinstance(pack_id, str) else pack_id.hex()
    return f"{constants.INDEX_DIR}/{hexd}{constants.INDEX_SUFFIX}"


def pack_id_from_key(key: str) -> str | None:
    """The pack id a ``packs/`` or ``index/`` key names; None for any other name."""
    name = key.rsplit("/", 1)[-1]
    for suffix in (constants.PACK_SUFFIX, constants.INDEX_SUFFIX):
        if name.endswith(suffix):
            hexd = name[: -len(suffix)]
            if len(hexd) == constants.DIGEST_SIZE * 2 and _is_hex(hexd):
                return hexd
    return None


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return True


# --- the index's encoding ---------------------------------------------------------------

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(PackIndex)


def encode_index(index: PackIndex) -> bytes:
    """Magic, BLAKE3-256 of the body, msgpack body (docs/format.md)."""
    body = _encoder.encode(index)
    return constants.INDEX_MAGIC + chunking.digest(body) + body


def decode_index(blob: bytes, *, source: str = "index") -> PackIndex:
    """Decode and check an index object; :class:`CorruptObject` for anything off."""
    head = len(constants.INDEX_MAGIC)
    if len(blob) < head + constants.DIGEST_SIZE or not blob.startswith(constants.INDEX_MAGIC):
        raise CorruptObject(f"{source} is not a casstore pack index", path=source)
    checksum, body = blob[head : head + constants.DIGEST_SIZE], blob[head + constants.DIGEST_SIZE :]
    if chunking.digest(body) != checksum:
        raise CorruptObject(f"{source} does not match its checksum", path=source)
    try:
        header = msgspec.msgpack.decode(body, type=_Header)
    except msgspec.DecodeError as e:
        raise CorruptObject(f"{source} cannot be decoded: {e}", path=source) from e
    if header.format != INDEX_FORMAT_VERSION:
        raise UnsupportedIndex(
            f"{source} is a format {header.format} pack index; this casstore reads "
            f"format {INDEX_FORMAT_VERSION} (upgrade casstore)"
        )
    try:
        index = _decoder.decode(body)
    except msgspec.DecodeError as e:
        raise CorruptObject(f"{source} cannot be decoded: {e}", path=source) from e
    _validate(index, source)
    return index


class _Header(msgspec.Struct):
    """Read first, leniently: a newer format is unsupported, not damaged."""

    format: int


def _validate(index: PackIndex, source: str) -> None:
    def bad(why: str) -> CorruptObject:
        return CorruptObject(f"{source}: {why}", path=source)

    if len(index.pack) != constants.DIGEST_SIZE or not 0 <= index.size <= constants.MAX_PACK_BYTES:
        raise bad("invalid pack id or size")
    if len(index.checksum) != constants.DIGEST_SIZE:
        raise bad("invalid checksum")
    end = 0
    for b in index.blocks:
        if b.offset != end or b.length <= 0 or not 0 < b.usize <= constants.MAX_BLOCK_USIZE:
            raise bad("blocks are not laid end to end within their limits")
        # zstd never expands its input by more than this: a longer "block" is a way to make
        # readers fetch and hold gigabytes for a few bytes of chunk.
        if b.length > b.usize + (b.usize >> 7) + 2**16:
            raise bad("a block is longer than its content could ever compress to")
        end = b.offset + b.length
        if not (b.plain or 0 <= b.dictionary < len(index.dictionaries)):
            raise bad("a block names a dictionary the index does not list")
    if end != index.size:
        raise bad("blocks do not cover the pack exactly")
    for d in index.dictionaries:
        if (
            not 0 < len(d) <= constants.MAX_DICTIONARY_CHUNKS
            or any(len(x) != constants.DIGEST_SIZE for x in d)
            or len(set(d)) != len(d)
        ):
            raise bad("a dictionary is empty, too long, or lists an invalid or repeated digest")
    if len({c.digest for c in index.chunks}) != len(index.chunks):
        # Writers never list a chunk twice; a reader trying a chunk's locations would
        # spend its tries on one pack.
        raise bad("a chunk is listed twice")
    for c in index.chunks:
        if (
            len(c.digest) != constants.DIGEST_SIZE
            or not 0 <= c.block < len(index.blocks)
            or not 0 < c.size <= constants.CHUNK_MAX_SIZE
            or c.offset < 0
            or c.offset + c.size > index.blocks[c.block].usize
        ):
            raise bad("a chunk lies outside its block")


# --- writing ----------------------------------------------------------------------------

_local = threading.local()


@dataclass(frozen=True, eq=False)
class Reference:
    """Chunks the store holds, as the dictionary a save compresses its small files'
    blocks with: ``digests`` in order, and their bytes back to back."""

    digests: tuple[bytes, ...]
    content: zstandard.ZstdCompressionDict

    @classmethod
    def of(cls, chunks: list[tuple[bytes, bytes]]) -> Reference:
        """From (digest, bytes) pairs, in the order the dictionary lists them."""
        content = raw_dictionary(b"".join(data for _, data in chunks))
        # Its tables built once, for every block and thread of the save.
        content.precompute_compress(
            compression_params=_dictionary_parameters(constants.SMALL_FILE_LEVEL)
        )
        return cls(tuple(d for d, _ in chunks), content)

    @property
    def size(self) -> int:
        return len(self.content.as_bytes())


def raw_dictionary(content: bytes) -> zstandard.ZstdCompressionDict:
    """``content`` as a zstd raw-content dictionary (never parsed as a trained one)."""
    return zstandard.ZstdCompressionDict(content, dict_type=zstandard.DICT_TYPE_RAWCONTENT)


def _compressor(level: int, reference: Reference | None = None) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe: one per thread, level and dictionary (only the
    # latest dictionary is kept: a process uses one per save).
    cache: dict[tuple[int, bool], tuple[Reference | None, zstandard.ZstdCompressor]] | None = (
        getattr(_local, "cctx", None)
    )
    if cache is None:
        cache = _local.cctx = {}
    slot = (level, reference is not None)
    held = cache.get(slot)
    if held is None or held[0] is not reference:
        if reference is None:
            cctx = zstandard.ZstdCompressor(level=level, write_content_size=True)
        else:
            cctx = zstandard.ZstdCompressor(
                compression_params=_dictionary_parameters(level), dict_data=reference.content
            )
        held = cache[slot] = (reference, cctx)
    return held[1]


def _dictionary_parameters(level: int) -> zstandard.ZstdCompressionParameters:
    """``level``, with tables large enough to reach the whole dictionary: at level 6's own
    sizes (2^18-entry chains, a 2 MiB window) most of a 4 MiB dictionary cannot be found,
    and what can depends on the order chunks arrive in (on two GPU caches: 12-21 KB by
    run, against 10 KB with these)."""
    return zstandard.ZstdCompressionParameters.from_level(
        level,
        window_log=constants.DICTIONARY_WINDOW_LOG,
        hash_log=constants.DICTIONARY_TABLE_LOG,
        chain_log=constants.DICTIONARY_TABLE_LOG,
        write_content_size=True,
    )


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if d is None:
        d = _local.dctx = zstandard.ZstdDecompressor()
    return d


class _OpenBlock:
    def __init__(self, level: int) -> None:
        self.level = level
        self.parts: list[bytes] = []
        self.chunks: list[tuple[bytes, int, int]] = []  # digest, offset, size
        self.size = 0


@dataclass(frozen=True)
class _Frame:
    """A compressed block waiting for its pack."""

    data: bytes
    usize: int
    chunks: list[tuple[bytes, int, int]]
    small: bool
    reference: Reference | None  # the dictionary it was compressed with


class PackBuilder:
    """Collects chunks into packs. Thread-safe: savers add from many threads.

    Chunks of small files and chunks of large ones go to separate blocks: small files are
    where a compile cache repeats itself (text at several stages of lowering), compressed
    at :data:`constants.SMALL_FILE_LEVEL`; large binaries (precompiled headers, shared
    objects) compress little better at a higher level and would cost it on every save.

    ``reference``, when given, is called once, when the first block of small files' chunks
    of at least :data:`constants.DICTIONARY_MIN_BLOCK` bytes that a fast compression
    shrinks below :data:`constants.DICTIONARY_INCOMPRESSIBLE` is compressed: the
    dictionary to try on those blocks (None: none). A block keeps it only when it shrinks to
    :data:`constants.DICTIONARY_GAIN` of its plain size.
    """

    def __init__(
        self,
        *,
        block_target: int = constants.BLOCK_TARGET,
        pack_target: int = constants.PACK_TARGET,
        reference: Callable[[], Reference | None] | None = None,
    ) -> None:
        self.block_target = block_target
        self.pack_target = pack_target
        self._lock = threading.Lock()
        self._open = {
            True: _OpenBlock(constants.SMALL_FILE_LEVEL),
            False: _OpenBlock(constants.LARGE_FILE_LEVEL),
        }
        self._frames: list[_Frame] = []
        self._frames_size = 0
        self._added: set[bytes] = set()
        self._compressing = 0  # blocks being compressed outside the lock
        self._reference_source = reference
        self._reference: Reference | None = None
        self._reference_lock = threading.Lock()

    def add(self, digest: bytes, data: bytes | memoryview, *, small: bool) -> list[Sealed]:
        """Add one chunk (a digest already added is skipped); returns the packs that this
        filled, to publish."""
        with self._lock:
            if digest in self._added:
                return []
            self._added.add(digest)
            block = self._open[small]
            block.chunks.append((digest, block.size, len(data)))
            block.parts.append(bytes(data))
            block.size += len(data)
            if block.size < self.block_target:
                return []
            self._open[small] = _OpenBlock(block.level)
            self._compressing += 1
        # Compressed outside the lock: other threads go on adding to the next block.
        try:
            frame = self._compress(block, small)
        finally:
            with self._lock:
                self._compressing -= 1
        with self._lock:
            self._frames.append(frame)
            self._frames_size += len(frame.data)
            if self._frames_size < self.pack_target:
                return []
            return [self._seal()]

    def finish(self) -> list[Sealed]:
        """Seal whatever is left (no pack at all when nothing was added). Call once every
        ``add`` has returned."""
        with self._lock:
            assert self._compressing == 0, "finish() while add() is still running"
            left = [(small, self._open[small]) for small in (True, False)]
            self._open = {s: _OpenBlock(b.level) for s, b in left}
        for small, block in left:
            if block.chunks:
                frame = self._compress(block, small)
                self._frames.append(frame)
                self._frames_size += len(frame.data)
        with self._lock:
            return [self._seal()] if self._frames else []

    def _reference_for_block(self) -> Reference | None:
        source = self._reference_source
        if source is None:
            return None
        with self._reference_lock:  # asked once; other threads wait for the answer
            if self._reference_source is not None:
                self._reference = source()
                self._reference_source = None
            return self._reference

    def _compress(self, block: _OpenBlock, small: bool) -> _Frame:
        content = b"".join(block.parts)
        reference = None
        if small and block.size >= constants.DICTIONARY_MIN_BLOCK:
            # A fast estimate of the plain frame (a low level, a little larger than the
            # block's own): content it cannot shrink (random bytes, compressed data) is
            # not worth a dictionary, whose chunks the save would first read.
            estimate = _compressor(constants.DICTIONARY_ESTIMATE_LEVEL).compress(content)
            if len(estimate) <= constants.DICTIONARY_INCOMPRESSIBLE * block.size:
                reference = self._reference_for_block()
        if reference is not None:
            referring = _compressor(block.level, reference).compress(content)
            # Judged against the estimate: the plain frame is made only when needed.
            if len(referring) <= constants.DICTIONARY_GAIN * len(estimate):
                return _Frame(referring, block.size, block.chunks, small, reference)
        plain = _compressor(block.level).compress(content)
        return _Frame(plain, block.size, block.chunks, small, None)

    def _seal(self) -> Sealed:
        blocks: list[BlockRef] = []
        chunks: list[ChunkLoc] = []
        dictionaries: list[Reference] = []
        offset = 0
        for number, frame in enumerate(self._frames):
            dictionary = NO_DICTIONARY
            if frame.reference is not None:
                if frame.reference not in dictionaries:
                    dictionaries.append(frame.reference)
                dictionary = dictionaries.index(frame.reference)
            blocks.append(BlockRef(offset, len(frame.data), frame.usize, dictionary, frame.small))
            offset += len(frame.data)
            chunks.extend(ChunkLoc(d, number, o, n) for d, o, n in frame.chunks)
        data = b"".join(frame.data for frame in self._frames)
        self._frames = []
        self._frames_size = 0
        index = PackIndex(
            format=INDEX_FORMAT_VERSION,
            # Random, not the hash of the bytes: two packs with the same bytes but other
            # chunk tables (or one published again after gc deleted it) must not share a
            # name, or one's index is refused and its chunks are in no pack.
            pack=os.urandom(constants.DIGEST_SIZE),
            size=len(data),
            blocks=tuple(blocks),
            chunks=tuple(chunks),
            checksum=chunking.digest(data),
            dictionaries=tuple(r.digests for r in dictionaries),
        )
        # Checked as every reader checks it: an index readers refuse would leave its
        # chunks in no pack, under a manifest published after it.
        _validate(index, "a new pack index")
        return Sealed(data, index)


def publish(backend: Backend, sealed: Sealed) -> None:
    """Publish a pack, then its index (a reader that finds the index finds the pack). Pack
    ids are random, so a name found taken holds this very write (a request the client
    retried after it had landed) or something that must not be trusted: the bytes decide."""
    for key, data in (
        (pack_key(sealed.index.pack), sealed.data),
        (index_key(sealed.index.pack), encode_index(sealed.index)),
    ):
        if not backend.put_if_absent(key, data):
            found = backend.get(key, max_bytes=len(data))
            if chunking.digest(found) != chunking.digest(data):
                raise CorruptObject(f"{key} exists already with other bytes", path=key)


# --- reading ----------------------------------------------------------------------------

#: Rebuilds dictionary ``number`` of a pack's index (raises DictionaryUnavailable).
Dictionaries = Callable[[PackIndex, int], zstandard.ZstdCompressionDict]


def read_blocks(
    backend: Backend,
    index: PackIndex,
    numbers: Iterable[int],
    *,
    key: str | None = None,
    dictionaries: Dictionaries | None = None,
) -> dict[int, bytes]:
    """The uncompressed bytes of blocks ``numbers`` of ``index``'s pack, read with one
    call for all of them (neighbouring blocks in one range); ``key``: read the pack under
    another name (its copy in trash/). Raises NotFound when the pack is gone,
    CorruptObject when a block is damaged, and DictionaryUnavailable when a block needs
    a dictionary that ``dictionaries`` cannot rebuild (or none is given)."""
    wanted = sorted(set(numbers))
    key = key if key is not None else pack_key(index.pack)
    ranges: list[tuple[int, int]] = []  # merged (offset, length)
    members: list[list[int]] = []
    for n in wanted:
        b = index.blocks[n]
        if ranges and ranges[-1][0] + ranges[-1][1] + constants.COALESCE_GAP >= b.offset:
            start = ranges[-1][0]
            ranges[-1] = (start, b.offset + b.length - start)
            members[-1].append(n)
        else:
            ranges.append((b.offset, b.length))
            members.append([n])
    out: dict[int, bytes] = {}
    for (start, _length), data, group in zip(
        ranges, backend.get_ranges(key, ranges), members, strict=True
    ):
        for n in group:
            b = index.blocks[n]
            frame = data[b.offset - start : b.offset - start + b.length]
            out[n] = decode_block(frame, b, key, dictionary_of(index, n, dictionaries))
    return out


def dictionary_of(
    index: PackIndex, number: int, dictionaries: Dictionaries | None
) -> zstandard.ZstdCompressionDict | None:
    """The dictionary block ``number`` was compressed with; None for a plain block."""
    block = index.blocks[number]
    if block.plain:
        return None
    if dictionaries is None:
        raise DictionaryUnavailable(
            f"block {number} of pack {index.id} needs a dictionary, and only blocks without "
            "one can serve a dictionary's chunks"
        )
    return dictionaries(index, block.dictionary)


def decode_block(
    frame: bytes,
    block: BlockRef,
    source: str,
    dictionary: zstandard.ZstdCompressionDict | None = None,
) -> bytes:
    try:
        declared = zstandard.get_frame_parameters(frame).content_size
        if declared != block.usize:
            raise CorruptObject(
                f"{source}: a block declares {declared} bytes, its index {block.usize}",
                path=source,
            )
        # A dictionary's decompression context is made per block: a context keeps the
        # dictionary it was made with, and blocks name many dictionaries.
        dctx = _decompressor() if dictionary is None else zstandard.ZstdDecompressor(dictionary)
        data = dctx.decompress(frame, max_output_size=block.usize)
    except zstandard.ZstdError as e:
        raise CorruptObject(f"{source}: a block is not a valid zstd frame: {e}", path=source) from e
    if len(data) != block.usize:
        raise CorruptObject(f"{source}: a block holds {len(data)} bytes", path=source)
    return data


def chunk_of(block: _Bytes, loc: ChunkLoc, source: str) -> _Bytes:
    """Chunk ``loc`` out of its block's bytes, checked against its digest (a view of a
    memoryview's bytes, a copy of a bytes object's)."""
    data = block[loc.offset : loc.offset + loc.size]
    if len(data) != loc.size or chunking.digest(data) != loc.digest:
        raise CorruptObject(
            f"{source}: chunk {loc.digest.hex()} does not match its digest",
            digest=loc.digest.hex(),
            path=source,
        )
    return data


@dataclass
class PackCheck:
    """What reading a whole pack back found."""

    damaged: list[bytes]  # chunks that do not read back intact (a damaged block: all its)
    intact: bool  # the pack's bytes match its checksum
    #: Chunks of blocks whose dictionary could not be rebuilt: not judged, and why.
    unverified: list[bytes]
    why_unverified: str = ""


def verify_pack(
    backend: Backend, index: PackIndex, *, dictionaries: Dictionaries | None = None
) -> PackCheck:
    """Read the whole pack once and re-hash every chunk. The checksum may not match while
    every chunk reads intact (damage between blocks, or bytes added at the end). Raises
    NotFound when the pack is gone."""
    key = pack_key(index.pack)
    # No more than the index says: a pack grown past it is damaged, not read whole.
    data = backend.get(key, max_bytes=index.size)
    check = PackCheck(
        damaged=[],
        intact=len(data) == index.size and chunking.digest(data) == index.checksum,
        unverified=[],
    )
    # Every chunk is re-hashed even when the checksum matches: a writer may have packed
    # bytes that are not what their digest names (the checksum covers what was written).
    by_block: dict[int, list[ChunkLoc]] = {}
    for c in index.chunks:
        by_block.setdefault(c.block, []).append(c)
    for n, locs in sorted(by_block.items()):
        b = index.blocks[n]
        try:
            if b.offset + b.length > len(data):
                raise CorruptObject(f"{key} is shorter than its index says", path=key)
            dictionary = dictionary_of(index, n, dictionaries)
            block = decode_block(data[b.offset : b.offset + b.length], b, key, dictionary)
        except DictionaryUnavailable as e:
            check.unverified.extend(c.digest for c in locs)
            check.why_unverified = str(e)
            continue
        except CorruptObject:
            check.damaged.extend(c.digest for c in locs)
            continue
        for c in locs:
            try:
                chunk_of(block, c, key)
            except CorruptObject:
                check.damaged.append(c.digest)
    return check


def copy_chunks(
    backend: Backend,
    index: PackIndex,
    digests: Iterable[bytes],
    *,
    skip_damaged: bool = False,
    dictionaries: Dictionaries | None = None,
) -> set[bytes]:
    """Pack the chunks ``digests`` of ``index``'s pack again, into new packs (blocks
    without a dictionary) published with their indexes like any save's; returns the
    digests copied. A block or chunk that cannot be read raises (NotFound,
    CorruptObject, DictionaryUnavailable), or is left out with ``skip_damaged`` (repair
    salvaging what it can)."""
    wanted = set(digests)
    by_block: dict[int, list[ChunkLoc]] = {}
    for c in index.chunks:
        if c.digest in wanted:
            by_block.setdefault(c.block, []).append(c)
    source = pack_key(index.pack)
    builder = PackBuilder()
    sealed: list[Sealed] = []
    copied: set[bytes] = set()
    for n, locs in sorted(by_block.items()):
        try:
            block = read_blocks(backend, index, [n], dictionaries=dictionaries)[n]
        except (CorruptObject, NotFound, DictionaryUnavailable):
            if not skip_damaged:
                raise
            continue
        for c in locs:
            try:
                data = chunk_of(block, c, source)
            except CorruptObject:
                if not skip_damaged:
                    raise
                continue
            sealed += builder.add(c.digest, data, small=index.blocks[n].small)
            copied.add(c.digest)
    for one in sealed + builder.finish():
        publish(backend, one)
    return copied

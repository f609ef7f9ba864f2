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
* its *index* (``index/<id>.idx``) lists each block (offset, length, uncompressed size)
  and each chunk (digest, block, offset in the block, size). Readers never trust it for
  bytes: every chunk is checked against its digest after decompression.

A pack is published before its index, and both before any manifest that needs them
(:mod:`casstore.store`). Layout and encoding: docs/format.md.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec
import zstandard

from casstore import chunking, constants
from casstore.backends.base import Backend
from casstore.errors import CorruptObject, NotFound, UnsupportedIndex

INDEX_FORMAT_VERSION = 1


class BlockRef(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One zstd frame of a pack: where it lies and how many bytes it expands to."""

    offset: int
    length: int
    usize: int


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
    if end != index.size:
        raise bad("blocks do not cover the pack exactly")
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


def _compressor(level: int) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe: one per thread and level.
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "cctx", None)
    if cache is None:
        cache = _local.cctx = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_content_size=True)
    return cache[level]


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


class PackBuilder:
    """Collects chunks into packs. Thread-safe: savers add from many threads.

    Chunks of small files and chunks of large ones go to separate blocks: small files are
    where a compile cache repeats itself (text at several stages of lowering), compressed
    at :data:`constants.SMALL_FILE_LEVEL`; large binaries (precompiled headers, shared
    objects) compress little better at a higher level and would cost it on every save.
    """

    def __init__(
        self,
        *,
        block_target: int = constants.BLOCK_TARGET,
        pack_target: int = constants.PACK_TARGET,
    ) -> None:
        self.block_target = block_target
        self.pack_target = pack_target
        self._lock = threading.Lock()
        self._open = {
            True: _OpenBlock(constants.SMALL_FILE_LEVEL),
            False: _OpenBlock(constants.LARGE_FILE_LEVEL),
        }
        self._frames: list[tuple[bytes, int, list[tuple[bytes, int, int]]]] = []
        self._frames_size = 0
        self._added: set[bytes] = set()
        self._compressing = 0  # blocks being compressed outside the lock

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
        frame = _compressor(block.level).compress(b"".join(block.parts))
        with self._lock:
            self._compressing -= 1
            self._frames.append((frame, block.size, block.chunks))
            self._frames_size += len(frame)
            if self._frames_size < self.pack_target:
                return []
            return [self._seal()]

    def finish(self) -> list[Sealed]:
        """Seal whatever is left (no pack at all when nothing was added). Call once every
        ``add`` has returned."""
        with self._lock:
            assert self._compressing == 0, "finish() while add() is still running"
            for small in (True, False):
                if self._open[small].chunks:
                    self._close_block(small)
            return [self._seal()] if self._frames else []

    def _close_block(self, small: bool) -> None:
        block = self._open[small]
        frame = _compressor(block.level).compress(b"".join(block.parts))
        self._frames.append((frame, block.size, block.chunks))
        self._frames_size += len(frame)
        self._open[small] = _OpenBlock(block.level)

    def _seal(self) -> Sealed:
        blocks: list[BlockRef] = []
        chunks: list[ChunkLoc] = []
        offset = 0
        for number, (frame, usize, members) in enumerate(self._frames):
            blocks.append(BlockRef(offset, len(frame), usize))
            offset += len(frame)
            chunks.extend(ChunkLoc(d, number, o, n) for d, o, n in members)
        data = b"".join(frame for frame, _, _ in self._frames)
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
        )
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


def read_blocks(
    backend: Backend, index: PackIndex, numbers: Iterable[int], *, key: str | None = None
) -> dict[int, bytes]:
    """The uncompressed bytes of blocks ``numbers`` of ``index``'s pack, read with one
    call for all of them (neighbouring blocks in one range); ``key``: read the pack under
    another name (its copy in trash/). Raises NotFound when the pack is gone and
    CorruptObject when a block is damaged."""
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
            out[n] = decode_block(frame, b, key)
    return out


def decode_block(frame: bytes, block: BlockRef, source: str) -> bytes:
    try:
        declared = zstandard.get_frame_parameters(frame).content_size
        if declared != block.usize:
            raise CorruptObject(
                f"{source}: a block declares {declared} bytes, its index {block.usize}",
                path=source,
            )
        data = _decompressor().decompress(frame, max_output_size=block.usize)
    except zstandard.ZstdError as e:
        raise CorruptObject(f"{source}: a block is not a valid zstd frame: {e}", path=source) from e
    if len(data) != block.usize:
        raise CorruptObject(f"{source}: a block holds {len(data)} bytes", path=source)
    return data


def chunk_of(block: bytes, loc: ChunkLoc, source: str) -> bytes:
    """Chunk ``loc`` out of its block's bytes, checked against its digest."""
    data = block[loc.offset : loc.offset + loc.size]
    if len(data) != loc.size or chunking.digest(data) != loc.digest:
        raise CorruptObject(
            f"{source}: chunk {loc.digest.hex()} does not match its digest",
            digest=loc.digest.hex(),
            path=source,
        )
    return data


def verify_pack(backend: Backend, index: PackIndex) -> tuple[list[bytes], bool]:
    """The digests of the chunks of ``index`` that cannot be read back intact (a damaged
    block damages all of its chunks), and whether the pack's bytes match its checksum
    (they may not while every chunk reads intact: damage between blocks, or bytes added
    at the end). Reads the whole pack once. Raises NotFound when the pack is gone."""
    key = pack_key(index.pack)
    # No more than the index says: a pack grown past it is damaged, not read whole.
    data = backend.get(key, max_bytes=index.size)
    intact = len(data) == index.size and chunking.digest(data) == index.checksum
    # Every chunk is re-hashed even when the checksum matches: a writer may have packed
    # bytes that are not what their digest names (the checksum covers what was written).
    damaged: list[bytes] = []
    by_block: dict[int, list[ChunkLoc]] = {}
    for c in index.chunks:
        by_block.setdefault(c.block, []).append(c)
    for n, locs in sorted(by_block.items()):
        b = index.blocks[n]
        try:
            if b.offset + b.length > len(data):
                raise CorruptObject(f"{key} is shorter than its index says", path=key)
            block = decode_block(data[b.offset : b.offset + b.length], b, key)
        except CorruptObject:
            damaged.extend(c.digest for c in locs)
            continue
        for c in locs:
            try:
                chunk_of(block, c, key)
            except CorruptObject:
                damaged.append(c.digest)
    return damaged, intact


def copy_chunks(
    backend: Backend, index: PackIndex, digests: Iterable[bytes], *, skip_damaged: bool = False
) -> set[bytes]:
    """Pack the chunks ``digests`` of ``index``'s pack again, into new packs published
    with their indexes like any save's; returns the digests copied. A block or chunk that
    cannot be read raises (NotFound, CorruptObject), or is left out with ``skip_damaged``
    (repair salvaging what it can)."""
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
            block = read_blocks(backend, index, [n])[n]
        except (CorruptObject, NotFound):
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
            sealed += builder.add(c.digest, data, small=True)
            copied.add(c.digest)
    for one in sealed + builder.finish():
        publish(backend, one)
    return copied

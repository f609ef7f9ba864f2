"""Packs (casstore/packs.py) and the chunk index (casstore/chunk_index.py), on a real
filesystem backend and on a real SeaweedFS S3 gateway."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import msgspec
import pytest

from casstore import chunk_index, chunking, constants, packs
from casstore.backends.base import Backend
from casstore.backends.fs import FileSystemBackend
from casstore.errors import CorruptObject, NotFound


@pytest.fixture(params=["fs", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "fs":
        return FileSystemBackend(tmp_path / "store")
    from casstore.backends.s3 import S3Backend

    url: str = request.getfixturevalue("s3_url")
    return S3Backend(url)


def text_chunks(n: int, seed: int = 0) -> list[bytes]:
    """Compile-cache-like chunks: text that repeats across chunks with small changes."""
    rng = random.Random(seed)
    base = "".join(f"  %{i} = add i32 %{i - 1}, {rng.randrange(99)}\n" for i in range(400))
    return [f"; kernel {i} stage {i % 5}\n{base}{rng.random()}\n".encode() * 3 for i in range(n)]


def seal_all(
    builder: packs.PackBuilder, chunks: list[bytes], small: bool = True
) -> list[packs.Sealed]:
    sealed: list[packs.Sealed] = []
    for data in chunks:
        sealed += builder.add(chunking.digest(data), data, small=small)
    return sealed + builder.finish()


def test_a_pack_round_trips_every_chunk_through_its_index(backend: Backend) -> None:
    chunks = text_chunks(300)
    sealed = seal_all(packs.PackBuilder(block_target=256 * 1024), chunks)
    assert len(sealed) == 1
    index = sealed[0].index
    assert len(index.blocks) > 3  # several blocks, so reads must pick the right ones
    packs.publish(backend, sealed[0])
    packs.publish(backend, sealed[0])  # the same bytes again: a retried request, accepted
    other = packs.Sealed(sealed[0].data + b"x", sealed[0].index)
    with pytest.raises(CorruptObject, match="other bytes"):
        packs.publish(backend, other)  # ids are random: other bytes under one are wrong
    read_back = chunk_index.read_index(backend, index.id)
    assert read_back == index
    assert index.checksum == chunking.digest(backend.get(packs.pack_key(index.pack)))
    # Read a few blocks at once (neighbours merged into one range), out of order.
    wanted = [len(index.blocks) - 1, 0, 1]
    blocks = packs.read_blocks(backend, index, wanted)
    assert sorted(blocks) == sorted(wanted)
    by_digest = {chunking.digest(c): c for c in chunks}
    for loc in index.chunks:
        if loc.block in blocks:
            assert packs.chunk_of(blocks[loc.block], loc, "t") == by_digest[loc.digest]
    assert {loc.digest for loc in index.chunks} == set(by_digest)
    assert packs.verify_pack(backend, index) == packs.PackCheck([], True, [])


def test_blocks_compress_across_chunks() -> None:
    """The point of a block: similar chunks compressed together take far less room than
    each compressed alone."""
    import zstandard

    chunks = text_chunks(200)
    alone = sum(len(zstandard.ZstdCompressor(level=3).compress(c)) for c in chunks)
    (sealed,) = seal_all(packs.PackBuilder(), chunks)
    assert sealed.index.size < alone / 3


def test_packs_close_at_their_target_and_chunks_are_added_once() -> None:
    rng = random.Random(1)
    chunks = [rng.randbytes(100_000) for _ in range(60)]  # incompressible: 6 MB
    builder = packs.PackBuilder(block_target=500_000, pack_target=2_000_000)
    sealed: list[packs.Sealed] = []
    for data in chunks + chunks[:10]:  # the repeats are skipped
        sealed += builder.add(chunking.digest(data), data, small=False)
    sealed += builder.finish()
    assert len(sealed) == 3
    assert all(s.index.size < 2_000_000 + 600_000 for s in sealed)
    listed = [loc.digest for s in sealed for loc in s.index.chunks]
    assert sorted(listed) == sorted({chunking.digest(c) for c in chunks})
    assert packs.PackBuilder().finish() == []


def test_builders_are_safe_from_many_threads() -> None:
    chunks = text_chunks(400, seed=2)
    builder = packs.PackBuilder(block_target=64 * 1024, pack_target=256 * 1024)
    sealed: list[packs.Sealed] = []
    lock = threading.Lock()

    def add(part: list[bytes]) -> None:
        for data in part:
            out = builder.add(chunking.digest(data), data, small=True)
            with lock:
                sealed.extend(out)

    threads = [threading.Thread(target=add, args=(chunks[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sealed += builder.finish()
    listed = [loc.digest for s in sealed for loc in s.index.chunks]
    assert sorted(listed) == sorted({chunking.digest(c) for c in chunks})


def test_a_damaged_block_is_an_error_never_wrong_bytes(tmp_path: Path) -> None:
    backend = FileSystemBackend(tmp_path / "store")
    chunks = text_chunks(100)
    (sealed,) = seal_all(packs.PackBuilder(block_target=128 * 1024), chunks)
    packs.publish(backend, sealed)
    index = sealed.index
    path = tmp_path / "store" / packs.pack_key(index.pack)
    data = bytearray(path.read_bytes())
    second = index.blocks[1]
    data[second.offset + second.length // 2] ^= 0xFF
    path.chmod(0o644)
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptObject):
        block = packs.read_blocks(backend, index, [1])[1]
        for loc in index.chunks:
            if loc.block == 1:
                packs.chunk_of(block, loc, "t")
    check = packs.verify_pack(backend, index)
    assert set(check.damaged) == {loc.digest for loc in index.chunks if loc.block == 1}
    assert not check.intact and not check.unverified
    # The other blocks still read.
    assert packs.read_blocks(backend, index, [0])[0]
    path.unlink()
    with pytest.raises(NotFound):
        packs.read_blocks(backend, index, [0])


@pytest.mark.parametrize(
    "damage",
    ["magic", "checksum", "body", "wrong pack", "chunk outside its block", "gap"],
)
def test_hostile_or_damaged_indexes_are_refused(damage: str) -> None:
    chunks = text_chunks(20)
    (sealed,) = seal_all(packs.PackBuilder(block_target=16 * 1024), chunks)
    index = sealed.index
    blob = packs.encode_index(index)
    if damage == "magic":
        blob = b"X" + blob[1:]
    elif damage == "checksum":
        blob = blob[:10] + bytes([blob[10] ^ 1]) + blob[11:]
    elif damage == "body":
        blob = blob[:-1] + bytes([blob[-1] ^ 1])
    else:
        if damage == "wrong pack":
            index = msgspec.structs.replace(index, pack=b"\0" * 31)
        elif damage == "chunk outside its block":
            c = index.chunks[0]
            bad = packs.ChunkLoc(c.digest, c.block, index.blocks[c.block].usize, c.size)
            index = msgspec.structs.replace(index, chunks=(bad,))
        else:
            b = index.blocks[1]
            moved = packs.BlockRef(b.offset + 1, b.length, b.usize)
            blocks = (index.blocks[0], moved, *index.blocks[2:])
            index = msgspec.structs.replace(index, blocks=blocks)
        blob = packs.encode_index(index)
    with pytest.raises(CorruptObject):
        packs.decode_index(blob, source="t")


def test_the_chunk_index_is_the_union_of_every_pack_and_is_cached(
    backend: Backend, tmp_path: Path
) -> None:
    first = seal_all(packs.PackBuilder(), text_chunks(30, seed=1))[0]
    second = seal_all(packs.PackBuilder(), text_chunks(30, seed=1)[:5] + text_chunks(10, seed=9))[0]
    for s in (first, second):
        packs.publish(backend, s)
    cache = chunk_index.IndexCache(tmp_path / "cache", backend.describe())
    index = chunk_index.load(backend, cache=cache)
    assert set(index.packs) == {first.id, second.id}
    shared = first.index.chunks[0].digest
    assert {loc.index.id for loc in index.locate(shared)} == {first.id, second.id}
    assert len(index) == 30 + 10
    assert sorted(os.listdir(cache.dir)) == sorted(
        f"{p}{constants.INDEX_SUFFIX}" for p in (first.id, second.id)
    )

    # A second load reads the cached copies: prove it by making the store's copies
    # unreadable to get() while they stay listed with the same size.
    real_get = backend.get
    fetched: list[str] = []

    def counting_get(key: str, *, max_bytes: int | None = None) -> bytes:
        fetched.append(key)
        return real_get(key, max_bytes=max_bytes)

    backend.get = counting_get  # type: ignore[method-assign]
    again = chunk_index.load(backend, cache=cache)
    assert set(again.packs) == set(index.packs) and fetched == []
    # A damaged cached copy is fetched again, not believed.
    cached = cache.dir / f"{first.id}{constants.INDEX_SUFFIX}"
    blob = bytearray(cached.read_bytes())
    blob[-1] ^= 1
    cached.write_bytes(bytes(blob))
    again = chunk_index.load(backend, cache=cache)
    assert set(again.packs) == set(index.packs)
    assert fetched == [packs.index_key(first.id)]
    # A pack the store stops listing is forgotten, in the index and in the cache.
    backend.delete(packs.index_key(second.id))
    again = chunk_index.load(backend, cache=cache)
    assert set(again.packs) == {first.id}
    assert os.listdir(cache.dir) == [f"{first.id}{constants.INDEX_SUFFIX}"]


def test_an_unreadable_index_is_reported_not_skipped_silently(tmp_path: Path) -> None:
    backend = FileSystemBackend(tmp_path / "store")
    sealed = seal_all(packs.PackBuilder(), text_chunks(5))[0]
    packs.publish(backend, sealed)
    backend.put_if_absent(packs.index_key("ab" * 32), b"not an index")
    index = chunk_index.load(backend)
    assert set(index.packs) == {sealed.id}
    assert list(index.damaged) == ["ab" * 32] and index.unreadable == {}

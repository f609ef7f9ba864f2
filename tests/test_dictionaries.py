"""Cross-save compression (casstore/dictionaries.py): a save compresses its blocks against
chunks earlier saves stored, and every guarantee holds for such blocks: restores rebuild
the dictionary, gc keeps its chunks while a block needs them, a saver reusing a chunk of
such a block keeps the dictionary too, lost dictionary chunks are misses, never wrong
bytes. On real compile caches (six GPU caches from an H200, benchmarks/data)."""

from __future__ import annotations

import os
import shutil
import tarfile
import time
from pathlib import Path

import msgspec
import pytest
import zstandard

from casstore import CacheKey, Store, chunk_index, chunking, constants, dictionaries, packs
from casstore import gc as gc_mod
from casstore import manifest as mf
from casstore.audit import repair, verify
from casstore.errors import (
    CorruptObject,
    DictionaryUnavailable,
    FormatMismatch,
    UnsupportedIndex,
)
from tests.helpers import KEY, read_tree, single_chunk_pack
from tests.test_gc_s3 import aged

CORPUS = Path(__file__).resolve().parent.parent / "benchmarks/data/gpu-caches-h200.tar.xz"
FIRST = CacheKey(torch="2.11.0+cu130", arch="sm_90 H200", model="first")
SECOND = CacheKey(torch="2.11.0+cu130", arch="sm_90 H200", model="second")


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real inductor caches of different models (bert, conv, gpt, ...), the third one
    without the files that share a chunk with the first: its chunks are all its own, so
    that a save of it reuses nothing of the first but through a dictionary."""
    target = tmp_path_factory.mktemp("gpu")
    with tarfile.open(CORPUS) as tar:
        tar.extractall(target, filter="data")
    found = sorted(p for p in target.iterdir() if p.is_dir())
    assert len(found) >= 3
    first = set(_chunks_of(found[0]))
    for p in sorted(found[2].rglob("*")):
        if p.is_file() and set(_chunks_of_file(p)) & first:
            p.unlink()
    return found


def assert_loads_whole(root: Path | str, key: CacheKey, cache: Path, out: Path) -> None:
    """A replica with nothing cached restores ``key`` into ``out``, byte for byte."""
    assert Store(root).load(key, out).missing == []
    assert read_tree(out) == read_tree(cache)


def index_of(store: Store) -> chunk_index.ChunkIndex:
    return chunk_index.load(store.backend)


def packs_with_dictionaries(store: Store) -> list[packs.PackIndex]:
    return [p for p in index_of(store).packs.values() if any(not b.plain for b in p.blocks)]


def age_everything(root: Path, seconds_ago: float) -> None:
    then = time.time() - seconds_ago
    for d in (constants.PACKS_DIR, constants.INDEX_DIR):
        for p in (root / d).rglob("*"):
            os.utime(p, (then, then))


def two_models(tmp_path: Path, caches: list[Path]) -> Store:
    store = Store(tmp_path / "store")
    store.save(caches[0], FIRST)
    store.save(caches[2], SECOND)  # bert, then gpt: a dictionary makes it a tenth
    return store


def test_a_second_model_is_stored_against_the_first_ones_chunks(
    tmp_path: Path, caches: list[Path]
) -> None:
    store = two_models(tmp_path, caches)
    (referring,) = packs_with_dictionaries(store)
    first_chunks = {d for f in store.files(FIRST).values() for d in (c.digest for c in f.chunks)}
    (dictionary,) = referring.dictionaries
    # Made of the first save's chunks, read from its plain blocks (depth one).
    assert set(dictionary) <= first_chunks
    # And worth it: the second cache's blocks take at most DICTIONARY_GAIN of their size
    # compressed without the dictionary.
    second = [c for f in store.files(SECOND).values() for c in f.chunks]
    data = _chunks_of(caches[2])
    own = [data[c.digest] for c in second if c.digest not in first_chunks]
    plain = len(zstandard.ZstdCompressor(level=constants.SMALL_FILE_LEVEL).compress(b"".join(own)))
    assert referring.size <= constants.DICTIONARY_GAIN * plain
    assert_loads_whole(tmp_path / "store", SECOND, caches[2], tmp_path / "out")
    assert verify(store).ok


def _chunks_of(tree: Path) -> dict[bytes, bytes]:
    found: dict[bytes, bytes] = {}
    for p in sorted(tree.rglob("*")):
        if p.is_file() and not p.is_symlink():
            found.update(_chunks_of_file(p))
    return found


def _chunks_of_file(path: Path) -> dict[bytes, bytes]:
    data = path.read_bytes()
    return {c.digest: data[c.offset : c.offset + c.length] for c in chunking.cut(data)}


def test_gc_keeps_a_dictionarys_chunks_while_a_block_needs_them(
    tmp_path: Path, caches: list[Path]
) -> None:
    store = two_models(tmp_path, caches)
    gc_mod.remove_key(store, FIRST)
    age_everything(tmp_path / "store", 7200)
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=3600)))
    assert report.errors == []
    assert_loads_whole(tmp_path / "store", SECOND, caches[2], tmp_path / "out")
    # Once no block needs them, they go like any dead chunk.
    gc_mod.remove_key(store, SECOND)
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=3600)))
    assert report.errors == [] and index_of(store).packs == {}


def test_a_save_reusing_a_chunk_of_such_a_block_keeps_its_dictionary(
    tmp_path: Path, caches: list[Path]
) -> None:
    """gc plans while both keys are gone (every pack dead); a replica then saves the second
    cache again, reusing its chunks from the block that needs the first cache's chunks.
    The saver renews the dictionary's packs too, so the sweep gives them back."""
    store = two_models(tmp_path, caches)
    gc_mod.remove_key(store, FIRST)
    gc_mod.remove_key(store, SECOND)
    age_everything(tmp_path / "store", 7200)
    plan = gc_mod.plan(store, gc_mod.Policy(grace=3600))
    assert len(plan.packs) == 2
    saved = Store(tmp_path / "store").save(caches[2], SECOND)
    assert saved.new_chunks == 0  # every chunk reused, none from the first save's pack
    report = gc_mod.execute(store, plan)
    assert report.errors == []
    assert_loads_whole(tmp_path / "store", SECOND, caches[2], tmp_path / "out")


def test_a_lost_dictionary_chunk_is_a_miss_never_wrong_bytes(
    tmp_path: Path, caches: list[Path]
) -> None:
    store = two_models(tmp_path, caches)
    (referring,) = packs_with_dictionaries(store)
    for pack_id in index_of(store).packs:
        if pack_id != referring.id:
            (tmp_path / "store" / packs.pack_key(pack_id)).unlink()  # the first save's
    out = tmp_path / "out"
    report = Store(tmp_path / "store").load(SECOND, out)
    in_referring = {c.digest for c in referring.chunks}
    needing = {
        path
        for path, f in store.files(SECOND).items()
        if any(c.digest in in_referring for c in f.chunks)
    }
    assert needing and set(report.missing) >= needing
    expected = read_tree(caches[2])
    for rel, content in read_tree(out).items():
        assert content == expected[rel]  # whatever was written is right
    # verify says the store is not whole, without calling the block damaged; repair
    # leaves the pack (its bytes may be whole: a later save brings the chunks back).
    found = verify(store)
    assert not found.ok and referring.id not in found.damaged_chunks
    assert any(referring.id in key for key, _ in found.unreadable)
    repair(store, found)
    assert (tmp_path / "store" / packs.pack_key(referring.id)).exists()
    # A save of the first cache brings its chunks back: the second cache loads whole.
    Store(tmp_path / "store").save(caches[0], FIRST)
    again = tmp_path / "again"
    assert Store(tmp_path / "store").load(SECOND, again).missing == []
    assert read_tree(again) == expected


def test_a_dictionary_is_drawn_from_listed_chunks_of_plain_small_file_blocks(
    tmp_path: Path, caches: list[Path]
) -> None:
    tree = tmp_path / "first"
    shutil.copytree(caches[0], tree)
    big = os.urandom(constants.STREAM_MIN_FILE_SIZE + 1000)  # a large file: its own blocks
    (tree / "big.so").write_bytes(big)
    dropped = tmp_path / "dropped"
    shutil.copytree(caches[1], dropped)
    store = Store(tmp_path / "store")
    store.save(dropped, CacheKey(torch="t", arch="a", model="dropped"))
    gc_mod.remove_key(store, CacheKey(torch="t", arch="a", model="dropped"))
    store.save(tree, FIRST)
    store.save(caches[2], SECOND)
    index = index_of(store)
    chosen = dictionaries.choose(index, store.recent_manifests())
    assert chosen
    big_chunks = {c.digest for c in store.files(FIRST)["big.so"].chunks}
    dropped_only = set(_chunks_of(dropped)) - set(_chunks_of(tree)) - set(_chunks_of(caches[2]))
    for digest in chosen:
        assert digest not in big_chunks and digest not in dropped_only
        assert any(loc.index.blocks[loc.chunk.block].plain for loc in index.locate(digest))
    sizes = {c.digest: c.size for f in store.files(FIRST).values() for c in f.chunks}
    assert sum(sizes.get(d, 0) for d in chosen) <= constants.DICTIONARY_TARGET
    # The newest save's chunks come last: its own blocks use a dictionary, so they do not
    # feed one; the first save's do.
    assert set(chosen) <= set(sizes)
    assert dictionaries.choose(index, store.recent_manifests(), target=10) == []


def test_an_index_naming_a_missing_dictionary_is_refused(tmp_path: Path) -> None:
    data, sealed = single_chunk_pack()
    index = sealed.index
    block = index.blocks[0]
    bad_block = packs.BlockRef(block.offset, block.length, block.usize, 0, True)
    for dictionaries_listed, why in (
        ((), "dictionary"),  # a block naming a dictionary the index does not list
        # A dictionary listing one chunk many times (memory out of all proportion).
        (((chunking.digest(data),) * 256,), "repeated"),
    ):
        bad = msgspec.structs.replace(index, blocks=(bad_block,), dictionaries=dictionaries_listed)
        with pytest.raises(CorruptObject, match=why):
            packs.decode_index(packs.encode_index(bad))
    old = packs.PackIndex(1, index.pack, index.size, index.blocks, index.chunks, index.checksum)
    with pytest.raises(UnsupportedIndex):
        packs.decode_index(packs.encode_index(old))


def test_a_store_without_dictionaries_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    root = tmp_path / "store"
    Store(root)
    layout = (root / constants.LAYOUT_FILE).read_text().replace('"format": 3', '"format": 2')
    (root / constants.LAYOUT_FILE).chmod(0o644)
    (root / constants.LAYOUT_FILE).write_text(layout)
    with pytest.raises(FormatMismatch, match=r"format 2 store \(packs without dictionaries"):
        Store(root)


def test_on_s3_gc_and_a_racing_saver_keep_a_dictionary(
    s3_url: str, tmp_path: Path, caches: list[Path]
) -> None:
    """The same guarantees on an object store (no utime: the racing saver announces the
    dictionary's chunks in its intent, and the sweep gives their pack back)."""
    store = Store(s3_url)
    store.save(caches[0], FIRST)
    store.save(caches[2], SECOND)
    assert packs_with_dictionaries(store)
    gc_mod.remove_key(store, FIRST)
    aged(store, 0)
    assert gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=0))).errors == []
    assert_loads_whole(s3_url, SECOND, caches[2], tmp_path / "out")
    gc_mod.remove_key(store, SECOND)
    plan = gc_mod.plan(store, gc_mod.Policy(grace=0))
    assert len(plan.packs) == 2
    assert Store(s3_url).save(caches[2], SECOND).new_chunks == 0
    assert gc_mod.execute(store, plan).errors == []
    assert_loads_whole(s3_url, SECOND, caches[2], tmp_path / "again")


# --- found by review: each failed on the version before its fix -------------------------


def test_a_chunk_is_covered_only_by_a_copy_in_a_block_without_a_dictionary(
    tmp_path: Path, caches: list[Path]
) -> None:
    """The first cache's chunks lie in a mostly dead plain pack and, again, in a block
    compressed with a dictionary (a racing replica's). gc must not count that copy as
    covering them: the dictionary of the second cache's block reads them from plain
    blocks only."""
    root = tmp_path / "store"
    store = Store(root)
    junk_key = CacheKey(torch="t", arch="a", model="junk")
    tree = tmp_path / "tree"
    shutil.copytree(caches[0], tree)
    for i in range(10):
        write = tree / "junk" / f"{i}.bin"
        write.parent.mkdir(exist_ok=True)
        write.write_bytes(os.urandom(2**20))
    store.save(tree, junk_key)  # the first cache's chunks, in a pack mostly of junk
    store.save(caches[0], FIRST)  # every chunk reused
    store.save(caches[2], SECOND)  # compressed against the first cache's chunks
    first = _chunks_of(caches[0])
    reference = packs.Reference.of(list(first.items()))
    builder = packs.PackBuilder(reference=lambda: reference)
    sealed = [s for d, data in first.items() for s in builder.add(d, data, small=True)]
    for one in sealed + builder.finish():
        assert not one.index.blocks[0].plain
        packs.publish(store.backend, one)
    gc_mod.remove_key(store, junk_key)
    age_everything(root, 7200)
    assert gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=3600))).errors == []
    for key, cache in ((SECOND, caches[2]), (FIRST, caches[0])):
        assert_loads_whole(root, key, cache, tmp_path / f"out-{key.model}")


def test_on_s3_a_pack_published_while_gc_plans_keeps_its_dictionary(
    s3_url: str, tmp_path: Path, caches: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between gc's reading of the pack indexes and its listing of manifests, a replica
    saves the second cache (its dictionary drawn from the first's chunks) and the first
    key is removed: the plan sees the manifest, and must see the new pack's index too."""
    store = Store(s3_url)
    store.save(caches[0], FIRST)
    aged(store, 0)
    original = gc_mod._list_manifests

    def racing(s: Store) -> object:
        Store(s3_url).save(caches[2], SECOND)
        gc_mod.remove_key(Store(s3_url), FIRST)
        return original(s)

    monkeypatch.setattr(gc_mod, "_list_manifests", racing)
    plan = gc_mod.plan(store, gc_mod.Policy(grace=0))
    monkeypatch.setattr(gc_mod, "_list_manifests", original)
    assert packs_with_dictionaries(store)
    assert gc_mod.execute(store, plan).errors == []
    assert_loads_whole(s3_url, SECOND, caches[2], tmp_path / "out")


def test_a_dictionary_never_passes_what_readers_accept(
    tmp_path: Path, caches: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A manifest that understates its chunks' sizes, and more chunks than a dictionary
    may list: the saver's dictionary stays within the byte target and the chunk limit
    (readers refuse more, which would lose the blocks compressed with it)."""
    root = tmp_path / "store"
    store = Store(root)
    for i, cache in enumerate(caches[:2]):
        store.save(cache, CacheKey(torch="t", arch="a", model=f"m{i}"))
    index = index_of(store)
    everything = [d for d in index.digests() if dictionaries.plain_locations(index, d)]
    liar = CacheKey(torch="t", arch="a", model="liar")
    entry = mf.FileEntry(
        "x", len(everything), 0o644, os.urandom(32), tuple(mf.ChunkRef(d, 1) for d in everything)
    )
    lie = mf.new_manifest(liar, [entry])
    store.backend.put_if_absent(
        f"{constants.MANIFESTS_DIR}/{liar.id}/{mf.new_manifest_name(lie.created_at)}",
        mf.encode(lie),
    )
    monkeypatch.setattr(constants, "DICTIONARY_TARGET", 512 * 1024)
    monkeypatch.setattr(constants, "MAX_DICTIONARY_CHUNKS", 20)
    used: list[packs.Reference] = []
    real = packs.Reference.of.__func__  # type: ignore[attr-defined]

    def spy(cls: type[packs.Reference], chunks: list[tuple[bytes, bytes]]) -> packs.Reference:
        used.append(real(cls, chunks))
        return used[-1]

    monkeypatch.setattr(packs.Reference, "of", classmethod(spy))
    store.save(caches[2], SECOND)
    (reference,) = used
    assert 0 < len(reference.digests) <= 20 and reference.size <= 512 * 1024
    assert_loads_whole(root, SECOND, caches[2], tmp_path / "out")


def test_a_dictionary_too_large_to_rebuild_is_a_miss(
    tmp_path: Path, caches: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index naming more chunk bytes than any dictionary holds (a hostile one could name
    gigabytes): readers refuse to rebuild it, before or while reading, and the load goes
    on without those files."""
    store = two_models(tmp_path, caches)
    (referring,) = packs_with_dictionaries(store)
    monkeypatch.setattr(constants, "MAX_DICTIONARY_BYTES", 1024)
    out = tmp_path / "out"
    report = Store(tmp_path / "store").load(SECOND, out)
    assert report.missing
    rebuild = dictionaries.Rebuilder(store.backend, index_of(store))
    with pytest.raises(DictionaryUnavailable, match="pass 1024 bytes"):
        rebuild(referring, 0)
    found, why = dictionaries.fetch(
        store.backend, index_of(store), referring.dictionaries[0], max_bytes=1024
    )
    assert why and sum(map(len, found.values())) <= 1024 + constants.CHUNK_MAX_SIZE


def test_an_unreadable_index_without_its_pack_does_not_stop_gc(tmp_path: Path) -> None:
    store, root = a_dead_pack(tmp_path)
    tree = tmp_path / "tree"
    # A newer casstore's index of a pack already gone.
    store.backend.put_if_absent(packs.index_key(os.urandom(32).hex()), newer_index())
    age_everything(root, 7200)
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=3600)))
    assert report.errors == [] and report.packs_deleted == 1 and report.indexes_deleted == 2
    # With its pack present, nothing is swept: it may name a dictionary of any chunk.
    store.save(tree, KEY)
    gc_mod.remove_key(store, KEY)
    (pack_id,) = index_of(store).packs
    (root / packs.index_key(pack_id)).chmod(0o644)
    (root / packs.index_key(pack_id)).write_bytes(newer_index())
    age_everything(root, 7200)
    plan = gc_mod.plan(store, gc_mod.Policy(grace=3600))
    assert plan.sweep_blocked and "cannot be read" in plan.sweep_blocked


def test_a_load_racing_a_repack_of_a_dictionary_still_rebuilds_it(
    tmp_path: Path, caches: list[Path]
) -> None:
    """A load read the chunk index; gc then repacked the pack holding the dictionary's
    chunks and deleted it: the rebuild reads the index again once, and finds them."""
    store = two_models(tmp_path, caches)
    (referring,) = packs_with_dictionaries(store)
    stale = index_of(store)
    (holder,) = (p for p in stale.packs.values() if p.id != referring.id)
    packs.copy_chunks(store.backend, holder, [c.digest for c in holder.chunks])
    store.backend.delete(packs.pack_key(holder.id))
    store.backend.delete(packs.index_key(holder.id))
    with pytest.raises(DictionaryUnavailable):
        dictionaries.Rebuilder(store.backend, stale)(referring, 0)
    rebuilt = dictionaries.Rebuilder(store.backend, stale, reload=lambda: index_of(store))
    assert len(rebuilt(referring, 0).as_bytes()) > 0


# --- found by the second review: each failed on 5f12e26 ----------------------------------


def plant_plain_index(store: Store, listed: list[tuple[bytes, int]]) -> None:
    """A pack of one byte whose index claims a plain small-file block holding ``listed``
    (digest, size): what any user who can write the store can publish."""
    frame = b"x"
    usize = constants.MAX_BLOCK_USIZE
    index = packs.PackIndex(
        packs.INDEX_FORMAT_VERSION,
        os.urandom(32),
        len(frame),
        (packs.BlockRef(0, len(frame), usize, packs.NO_DICTIONARY, True),),
        tuple(packs.ChunkLoc(d, 0, 0, size) for d, size in listed),
        chunking.digest(frame),
    )
    packs.publish(store.backend, packs.Sealed(frame, index))


def test_an_index_overstating_sizes_does_not_deny_a_dictionary(
    tmp_path: Path, caches: list[Path]
) -> None:
    store = two_models(tmp_path, caches)
    (referring,) = packs_with_dictionaries(store)
    (dictionary,) = referring.dictionaries
    plant_plain_index(store, [(d, constants.CHUNK_MAX_SIZE) for d in dictionary[:17]])
    assert_loads_whole(tmp_path / "store", SECOND, caches[2], tmp_path / "out")


def test_a_save_reads_no_more_than_its_dictionary_budget(
    tmp_path: Path, caches: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An index understating sizes makes every stored chunk look small: the save still
    stops reading chunks for its dictionary once past its budget."""
    store = Store(tmp_path / "store")
    for i, cache in enumerate(caches[:2]):
        store.save(cache, CacheKey(torch="t", arch="a", model=f"m{i}"))
    index = index_of(store)
    plant_plain_index(store, [(d, 1) for d in index.digests()])
    monkeypatch.setattr(constants, "DICTIONARY_TARGET", 64 * 1024)
    read: list[int] = []
    real = packs.chunk_of

    def counting(block: bytes, loc: packs.ChunkLoc, source: str) -> bytes:
        data = real(block, loc, source)
        read.append(len(data))
        return data

    monkeypatch.setattr(packs, "chunk_of", counting)
    store.save(caches[2], SECOND)
    assert sum(read) <= 64 * 1024 + 2 * constants.CHUNK_MAX_SIZE
    assert_loads_whole(tmp_path / "store", SECOND, caches[2], tmp_path / "out")


def a_dead_pack(tmp_path: Path) -> tuple[Store, Path]:
    """A store holding one pack no key lists any more."""
    root = tmp_path / "store"
    store = Store(root)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a").write_bytes(os.urandom(100_000))
    store.save(tree, KEY)
    gc_mod.remove_key(store, KEY)
    return store, root


def newer_index() -> bytes:
    """A well-formed pack index of a format this casstore does not read."""
    body = msgspec.msgpack.encode({"format": 99})
    return constants.INDEX_MAGIC + chunking.digest(body) + body


def test_an_unreadable_index_of_a_pack_in_trash_or_just_published_blocks_the_sweep(
    tmp_path: Path,
) -> None:
    store, root = a_dead_pack(tmp_path)
    newer = newer_index()
    # A pack a crashed gc run left in trash/, whose index cannot be read now.
    in_trash = os.urandom(32).hex()
    store.backend.put_if_absent(f"{constants.TRASH_DIR}/crashed/{in_trash}.pack", b"x")
    store.backend.put_if_absent(packs.index_key(in_trash), newer)
    age_everything(root, 7200)
    plan = gc_mod.plan(store, gc_mod.Policy(grace=3600))
    assert plan.sweep_blocked and in_trash in plan.sweep_blocked
    # And one published just now, whose pack the plan did not list.
    store.backend.delete(f"{constants.TRASH_DIR}/crashed/{in_trash}.pack")
    fresh = os.urandom(32).hex()
    store.backend.put_if_absent(packs.index_key(fresh), newer)
    plan = gc_mod.plan(store, gc_mod.Policy(grace=3600))
    assert plan.sweep_blocked and fresh in plan.sweep_blocked


def test_an_ignored_index_does_not_block_a_run_during_which_a_replica_saves(
    tmp_path: Path,
) -> None:
    store, root = a_dead_pack(tmp_path)
    store.backend.put_if_absent(packs.index_key(os.urandom(32).hex()), newer_index())
    age_everything(root, 7200)
    plan = gc_mod.plan(store, gc_mod.Policy(grace=3600))
    other = tmp_path / "other"
    other.mkdir()
    (other / "b").write_bytes(os.urandom(50_000))
    store.save(other, SECOND)  # published during the run
    report = gc_mod.execute(store, plan)
    assert report.errors == [] and report.packs_deleted == 1


# --- found by the third review: each failed on 61f45f7 -----------------------------------


def test_an_index_listing_a_chunk_many_times_does_not_use_up_its_tries(
    tmp_path: Path, caches: list[Path]
) -> None:
    store = two_models(tmp_path, caches)
    (referring,) = packs_with_dictionaries(store)
    plant_plain_index(store, [(referring.dictionaries[0][0], 1)] * 16)
    assert_loads_whole(tmp_path / "store", SECOND, caches[2], tmp_path / "out")


@pytest.mark.parametrize("frame", ["expanding", "garbage"])
def test_a_planted_pack_neither_blows_up_nor_denies_a_rebuild(
    tmp_path: Path, caches: list[Path], monkeypatch: pytest.MonkeyPatch, frame: str
) -> None:
    """A pack of a few bytes, newest, whose blocks each claim one chunk of a dictionary:
    frames that expand to 9 MiB of zeros, or bytes that are no frame at all. The rebuild
    holds at most two such blocks at once, reads that pack no further once it lied, and
    rebuilds the dictionary from the real blocks."""
    store = two_models(tmp_path, caches)
    (referring,) = packs_with_dictionaries(store)
    (dictionary,) = referring.dictionaries
    usize = constants.MAX_BLOCK_USIZE
    data = (
        zstandard.ZstdCompressor(level=19).compress(bytes(usize)) if frame == "expanding" else b"x"
    )
    blocks = tuple(
        packs.BlockRef(i * len(data), len(data), usize, packs.NO_DICTIONARY, True)
        for i in range(len(dictionary))
    )
    body = data * len(dictionary)
    planted = packs.PackIndex(
        packs.INDEX_FORMAT_VERSION,
        os.urandom(32),
        len(body),
        blocks,
        tuple(packs.ChunkLoc(d, i, 0, 1000) for i, d in enumerate(dictionary)),
        chunking.digest(body),
    )
    packs.publish(store.backend, packs.Sealed(body, planted))
    held: list[int] = []
    real = packs.read_blocks

    def measuring(*args: object, **kwargs: object) -> dict[int, bytes]:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        held.append(sum(map(len, out.values())))
        return out

    monkeypatch.setattr(packs, "read_blocks", measuring)
    rebuilt = dictionaries.Rebuilder(store.backend, index_of(store))(referring, 0)
    assert len(rebuilt.as_bytes()) > 0
    assert max(held) <= 2 * usize
    assert sum(held) <= 2 * usize + 4 * constants.BLOCK_TARGET + constants.MAX_DICTIONARY_BYTES
    monkeypatch.setattr(packs, "read_blocks", real)
    assert_loads_whole(tmp_path / "store", SECOND, caches[2], tmp_path / "out")


def test_dictionaries_can_be_turned_off_for_saves_and_loads_still_read_them(
    tmp_path: Path, caches: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "store")
    store.save(caches[0], FIRST)
    monkeypatch.setenv("CASSTORE_DICTIONARIES", "0")
    store.save(caches[2], SECOND)
    assert packs_with_dictionaries(store) == []
    monkeypatch.setenv("CASSTORE_DICTIONARIES", "1")
    third = CacheKey(torch="2.11.0+cu130", arch="sm_90 H200", model="third")
    store.save(caches[3], third)
    assert packs_with_dictionaries(store)
    monkeypatch.setenv("CASSTORE_DICTIONARIES", "0")
    assert_loads_whole(tmp_path / "store", third, caches[3], tmp_path / "out")


def test_incompressible_blocks_do_not_ask_for_a_dictionary() -> None:
    """Random bytes (or compressed files) gain nothing from a dictionary of compile-cache
    text: the save does not read one for them; compressible blocks still get one."""
    asked: list[int] = []

    def reference() -> packs.Reference | None:
        asked.append(1)
        return None

    text = b"def kernel(buf0, buf1):\n    tl.store(buf0, tl.load(buf1))\n"
    for chunks, expected in (
        ([os.urandom(200_000) for _ in range(2)], []),
        ([text * 3000 + str(i).encode() for i in range(2)], [1]),
    ):
        asked.clear()
        builder = packs.PackBuilder(reference=reference)
        for data in chunks:
            builder.add(chunking.digest(data), data, small=True)
        assert builder.finish()
        assert asked == expected

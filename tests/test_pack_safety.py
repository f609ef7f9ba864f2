"""Packs against what an adversarial review found: identical pack bytes, crashes between a
pack and its index, repair of an index it merely could not read, lying chunk lists,
unreadable packs, planted and oversized indexes, stale listings, mostly dead packs kept
forever. Each test was seen failing before its fix."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from casstore import CacheKey, Store, audit, chunk_index, chunking, constants, packs
from casstore import gc as gc_mod
from casstore import manifest as mf
from casstore.backends.base import Backend
from casstore.errors import StoreUnavailable
from casstore.manifest import ChunkRef, FileEntry
from tests.helpers import pack_files, read_tree, seal_chunk, single_chunk_pack, write_tree

HOUR = 3600.0


def key(model: str) -> CacheKey:
    return CacheKey(torch="t", arch="a", model=model)


def age_packs(root: Path, seconds_ago: float) -> None:
    then = time.time() - seconds_ago
    for d in (constants.PACKS_DIR, constants.INDEX_DIR):
        for p in (root / d).rglob("*"):
            os.utime(p, (then, then))


def plant_index(store: Store, pack_id: bytes, digest: bytes) -> None:
    """An index naming ``digest`` (20,000 bytes) in a pack that does not exist."""
    planted = packs.PackIndex(
        format=packs.INDEX_FORMAT_VERSION,
        pack=pack_id,
        size=10,
        blocks=(packs.BlockRef(0, 10, 20_000),),
        chunks=(packs.ChunkLoc(digest, 0, 0, 20_000),),
        checksum=b"\0" * 32,
    )
    store.backend.put_if_absent(packs.index_key(pack_id), packs.encode_index(planted))


def test_identical_pack_bytes_with_another_chunk_table_are_two_packs(
    store: Store, tmp_path: Path
) -> None:
    """Save 1 holds files A and B (one block: A then B); save 2 holds one file A+B (one
    chunk, the same block bytes). Each save's pack must be its own, with its own index."""
    a, b = os.urandom(10_000), os.urandom(12_000)
    write_tree(tmp_path / "one", {"a": a, "b": b})
    write_tree(tmp_path / "two", {"ab": a + b})
    store.save(tmp_path / "one", key("one"))
    store.save(tmp_path / "two", key("two"))
    report = store.load(key("two"), tmp_path / "out")
    assert report.missing == [] and (tmp_path / "out" / "ab").read_bytes() == a + b


def test_a_save_retried_after_a_crash_between_pack_and_index_survives_gc(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save crashes after its pack, before its index; gc plans that pack as garbage (no
    index, old); the retried save publishes a complete save; gc executes its plan."""
    files = {"f": os.urandom(20_000)}
    write_tree(tmp_path / "src", files)
    real_put = store.backend.put_if_absent

    def crash_on_index(k: str, data: bytes) -> bool:
        if k.startswith(f"{constants.INDEX_DIR}/"):
            raise StoreUnavailable("simulated crash before the index")
        return real_put(k, data)

    monkeypatch.setattr(store.backend, "put_if_absent", crash_on_index)
    with pytest.raises(StoreUnavailable):
        store.save(tmp_path / "src", key("m"))
    monkeypatch.undo()
    age_packs(tmp_path / "store", 2 * HOUR)
    p = gc_mod.plan(store, gc_mod.Policy(grace=HOUR))
    assert len(p.packs) == 1  # the unindexed pack
    assert store.save(tmp_path / "src", key("m")).manifest is not None
    gc_mod.execute(store, p)
    report = store.load(key("m"), tmp_path / "out")
    assert report.missing == [] and read_tree(tmp_path / "out")["f"][0] == files["f"]


def test_repair_never_quarantines_an_index_it_merely_could_not_read(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"f": os.urandom(20_000)}
    write_tree(tmp_path / "src", files)
    store.save(tmp_path / "src", key("m"))
    real_get = store.backend.get

    def refused(k: str, *, max_bytes: int | None = None) -> bytes:
        if k.startswith(f"{constants.INDEX_DIR}/"):
            raise PermissionError(13, "Permission denied", k)
        return real_get(k, max_bytes=max_bytes)

    monkeypatch.setattr(store.backend, "get", refused)
    report = audit.verify(store)
    monkeypatch.undo()
    assert not report.ok  # it could not check that pack, and says so
    repaired = audit.repair(store, report)
    assert repaired.indexes_quarantined == 0
    assert store.load(key("m"), tmp_path / "out").missing == []


def test_a_lying_chunk_list_never_drops_another_files_chunk(store: Store, tmp_path: Path) -> None:
    """A manifest lists file a with its right whole-file digest but file b's chunk: the
    save must still pack b's chunk for b."""
    k = key("m")
    x, y = os.urandom(5000), os.urandom(5000)
    lie = FileEntry("a", len(x), 0o644, chunking.digest(x), (ChunkRef(chunking.digest(y), len(y)),))
    m = mf.new_manifest(k, [lie])
    store.backend.put_if_absent(
        f"{constants.MANIFESTS_DIR}/{k.id}/{mf.new_manifest_name(m.created_at)}", mf.encode(m)
    )
    write_tree(tmp_path / "src", {"a": x, "b": y})
    store.save(tmp_path / "src", k)
    report = store.load(k, tmp_path / "out")
    assert report.missing == []
    assert {p: d for p, (d, _) in read_tree(tmp_path / "out").items()} == {"a": x, "b": y}


def test_an_unreadable_pack_costs_its_files_not_the_load(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tree(tmp_path / "one", {"one": os.urandom(5000)})
    write_tree(tmp_path / "two", {"two": os.urandom(5000)})
    store.save(tmp_path / "one", key("m"))
    (first,) = pack_files(tmp_path / "store")
    store.save(tmp_path / "two", key("m"))
    real = store.backend.get_ranges

    def refused(k: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if k.endswith(first.name):
            raise PermissionError(13, "Permission denied", k)  # another user's 0600 pack
        return real(k, ranges)

    monkeypatch.setattr(store.backend, "get_ranges", refused)
    report = store.load(key("m"), tmp_path / "out")
    assert report.missing == ["one"] and (tmp_path / "out" / "two").exists()


def test_an_index_declaring_an_oversized_block_is_refused() -> None:
    _, sealed = single_chunk_pack()
    index = sealed.index
    block = index.blocks[0]
    huge = packs.BlockRef(0, 48 * 2**20, block.usize)  # a sparse 48 MiB "frame"
    bad = packs.PackIndex(
        packs.INDEX_FORMAT_VERSION, index.pack, 48 * 2**20, (huge,), index.chunks, index.checksum
    )
    with pytest.raises(Exception, match="block"):
        packs.decode_index(packs.encode_index(bad), source="t")


def test_planted_indexes_never_hide_the_real_pack(store: Store, tmp_path: Path) -> None:
    """Indexes naming a chunk in packs that do not exist, however many and however named:
    the load still reads the real pack."""
    data = os.urandom(20_000)
    digest = chunking.digest(data)
    write_tree(tmp_path / "src", {"f": data})
    store.save(tmp_path / "src", key("m"))
    for i in range(12):
        plant_index(store, bytes([0xFF] * 31 + [i]), digest)
    assert store.load(key("m"), tmp_path / "out").missing == []


def test_a_chunk_whose_size_differs_from_the_manifest_is_a_miss(
    store: Store, tmp_path: Path
) -> None:
    """A manifest declaring a chunk 1,000 bytes longer than it is: the file is a miss, never
    written with a zero-filled tail."""
    k = key("m")
    data = os.urandom(5000)
    write_tree(tmp_path / "src", {"real": data})
    store.save(tmp_path / "src", k)
    ref = store.files(k)["real"].chunks[0]
    wrong = FileEntry("f", 6000, 0o644, b"\1" * 32, (ChunkRef(ref.digest, 6000),))
    m = mf.new_manifest(k, [wrong])
    store.backend.put_if_absent(
        f"{constants.MANIFESTS_DIR}/{k.id}/{mf.new_manifest_name(m.created_at + 1)}", mf.encode(m)
    )
    report = store.load(k, tmp_path / "out")
    assert report.missing == ["f"] and not (tmp_path / "out" / "f").exists()


def test_a_load_whose_listing_predates_a_repack_reads_the_index_again(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = {"f": os.urandom(20_000)}
    write_tree(tmp_path / "src", files)
    store.save(tmp_path / "src", key("m"))
    real_load = chunk_index.load
    calls: list[int] = []

    def stale_first(backend: Backend, **kwargs: object) -> chunk_index.ChunkIndex:
        calls.append(1)
        if len(calls) == 1:
            return chunk_index.ChunkIndex()  # listed before the pack's index appeared
        return real_load(backend, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(chunk_index, "load", stale_first)
    report = store.load(key("m"), tmp_path / "out")
    assert report.missing == [] and len(calls) == 2


def test_a_mostly_dead_pack_is_freed_though_its_key_is_compacted(
    store: Store, tmp_path: Path
) -> None:
    """gc's own compaction renews the packs a merged manifest lists: it must not renew the
    packs this run repacks, or they are never freed."""
    small = os.urandom(20_000)
    write_tree(tmp_path / "old", {"a": small, "b": os.urandom(3_000_000)})
    store.save(tmp_path / "old", key("old"))
    gc_mod.remove_key(store, key("old"))
    write_tree(tmp_path / "hot", {"a": small})
    store.save(tmp_path / "hot", key("hot"))
    write_tree(tmp_path / "hot", {"c": os.urandom(20_000)})
    store.save(tmp_path / "hot", key("hot"))  # two manifests: gc compacts them
    age_packs(tmp_path / "store", 2 * HOUR)
    p = gc_mod.plan(store, gc_mod.Policy(grace=HOUR))
    assert len(p.repack) == 1 and len(p.compact) == 1
    report = gc_mod.execute(store, p)
    assert report.packs_repacked == 1 and report.packs_deleted == 0
    # The next run, once the copy is older than the grace (only the indexes are aged: a
    # renewal of the old pack by the compaction would keep it).
    then = time.time() - 2 * HOUR
    for index_file in (tmp_path / "store" / constants.INDEX_DIR).rglob("*"):
        os.utime(index_file, (then, then))
    assert_a_run_frees_the_old_pack(store, tmp_path)


# --- found by a second review, each seen failing before its fix ---------------------------


def assert_a_run_frees_the_old_pack(store: Store, tmp_path: Path) -> None:
    """A gc run sweeps the mostly dead pack without copying anything again; key "hot"
    still loads."""
    run = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR)))
    assert run.packs_repacked == 0 and run.packs_deleted == 1
    assert max(f.stat().st_size for f in pack_files(tmp_path / "store")) < 1_000_000
    assert store.load(key("hot"), tmp_path / "out").missing == []


def test_planted_indexes_beyond_the_round_limit_never_hide_the_real_pack(
    store: Store, tmp_path: Path
) -> None:
    """40 planted indexes, all newer than the real one, naming packs that do not exist:
    those cost no round of their own."""
    data = os.urandom(20_000)
    digest = chunking.digest(data)
    write_tree(tmp_path / "src", {"f": data})
    store.save(tmp_path / "src", key("m"))
    for _ in range(40):
        plant_index(store, os.urandom(32), digest)
    assert store.load(key("m"), tmp_path / "out").missing == []


def test_a_repack_kept_by_a_saver_is_not_copied_again_next_run(
    store: Store, tmp_path: Path
) -> None:
    """A mostly dead pack survives its repack (a saver renewed it); the next run finds its
    live chunk in the repack's output and sweeps it without another copy."""
    small = os.urandom(20_000)
    write_tree(tmp_path / "old", {"a": small, "b": os.urandom(3_000_000)})
    store.save(tmp_path / "old", key("old"))
    gc_mod.remove_key(store, key("old"))
    write_tree(tmp_path / "hot", {"a": small})
    store.save(tmp_path / "hot", key("hot"))
    (old_pack,) = [p for p in pack_files(tmp_path / "store") if p.stat().st_size > 1_000_000]
    age_packs(tmp_path / "store", 2 * HOUR)
    p = gc_mod.plan(store, gc_mod.Policy(grace=HOUR))
    os.utime(old_pack)  # a saver reusing a chunk of it, during the run
    first = gc_mod.execute(store, p)
    assert first.packs_repacked == 1 and first.packs_deleted == 0 and old_pack.exists()
    age_packs(tmp_path / "store", 2 * HOUR)
    second = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR)))
    assert second.packs_repacked == 0 and second.packs_deleted == 1
    # hot's save reused a from the old pack: what is left is the one copy the repack made.
    assert len(pack_files(tmp_path / "store")) == 1
    assert store.load(key("hot"), tmp_path / "out").missing == []


def test_repair_quarantines_an_index_that_describes_another_pack(
    store: Store, tmp_path: Path
) -> None:
    write_tree(tmp_path / "src", {"f": os.urandom(5000)})
    store.save(tmp_path / "src", key("m"))
    (real,) = chunk_index.load(store.backend).packs.values()
    impostor = os.urandom(32).hex()
    store.backend.put_if_absent(packs.index_key(impostor), packs.encode_index(real))
    report = audit.verify(store)
    assert [k for k, _ in report.corrupt] == [packs.index_key(impostor)]
    assert audit.repair(store, report).indexes_quarantined == 1
    assert audit.verify(store).ok


def test_publish_accepts_its_own_retried_write(tmp_path: Path) -> None:
    """A request retried after it landed finds the name taken by its own bytes."""
    from casstore.backends.fs import FileSystemBackend

    backend = FileSystemBackend(tmp_path / "store")
    _, sealed = single_chunk_pack(5000)
    backend.put_if_absent(packs.pack_key(sealed.index.pack), sealed.data)  # the first try
    packs.publish(backend, sealed)  # the retry
    assert chunk_index.read_index(backend, sealed.id) == sealed.index


def test_a_second_listing_that_fails_costs_files_not_the_load(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tree(tmp_path / "src", {"f": os.urandom(5000)})
    store.save(tmp_path / "src", key("m"))
    real_load = chunk_index.load
    calls: list[int] = []

    def flaky(backend: Backend, **kwargs: object) -> chunk_index.ChunkIndex:
        calls.append(1)
        if len(calls) == 1:
            return chunk_index.ChunkIndex()
        raise StoreUnavailable("the listing timed out")

    monkeypatch.setattr(chunk_index, "load", flaky)
    report = store.load(key("m"), tmp_path / "out")
    monkeypatch.setattr(chunk_index, "load", real_load)
    assert report.missing == ["f"] and len(calls) == 2


# --- found by the load test across two SeaweedFS mounts, each seen failing before its fix ---


def a_mostly_dead_pack_and_a_key_reusing_it(
    store: Store, tmp_path: Path, small: bytes | None = None
) -> bytes:
    """A pack of one small live file (kept by key "hot": ``small``, or 20 kB of random
    bytes) and 3 MB of a dropped key's bytes, two hours old; the digest of the live file's
    chunk."""
    small = os.urandom(20_000) if small is None else small
    write_tree(tmp_path / "old", {"a": small, "b": os.urandom(3_000_000)})
    store.save(tmp_path / "old", key("old"))
    gc_mod.remove_key(store, key("old"))
    write_tree(tmp_path / "hot", {"a": small})
    store.save(tmp_path / "hot", key("hot"))
    age_packs(tmp_path / "store", 2 * HOUR)
    (chunk,) = store.files(key("hot"))["a"].chunks
    return chunk.digest


def publish_copy(store: Store, digest: bytes, data: bytes) -> packs.Sealed:
    """A pack of one chunk, ``data`` under ``digest`` (a copy another host wrote)."""
    sealed = seal_chunk(digest, data)
    packs.publish(store.backend, sealed)
    return sealed


def lagging_host(store: Store, listing: chunk_index.ChunkIndex) -> Store:
    """The same store seen from a host whose listing of indexes is ``listing`` for now: a
    FUSE mount shows what another host wrote seconds later, here gc's new pack."""
    other = Store(store.root if store.root is not None else "")
    other.chunk_index = lambda: listing  # type: ignore[method-assign]
    return other


def test_a_host_that_does_not_see_a_repack_yet_still_loads(store: Store, tmp_path: Path) -> None:
    """gc copies the live chunk of a mostly dead pack into a new pack: the old one must stay
    until every host can see the copy (its index older than the grace), not go in the same
    run. The load test lost 15 files on the second mount this way."""
    a_mostly_dead_pack_and_a_key_reusing_it(store, tmp_path)
    lagging = lagging_host(store, chunk_index.load(store.backend))
    first = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR)))
    assert first.packs_repacked == 1
    assert lagging.load(key("hot"), tmp_path / "lag").missing == []
    # Two hours on, every host has long seen the copy: the old pack goes, without a copy.
    age_packs(tmp_path / "store", 2 * HOUR)
    assert_a_run_frees_the_old_pack(store, tmp_path)


def test_a_copy_another_host_just_published_does_not_cover_a_chunk_yet(
    store: Store, tmp_path: Path
) -> None:
    """Another host packed its own copy of the live chunk a moment ago: hosts that do not
    see that pack yet still read the old one, so it is neither swept nor copied again now,
    and goes once the copy is older than the grace."""
    digest = a_mostly_dead_pack_and_a_key_reusing_it(store, tmp_path)
    lagging = lagging_host(store, chunk_index.load(store.backend))
    publish_copy(store, digest, (tmp_path / "hot" / "a").read_bytes())
    first = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR)))
    assert first.packs_deleted == 0 and first.packs_repacked == 0
    assert lagging.load(key("hot"), tmp_path / "lag").missing == []
    age_packs(tmp_path / "store", 2 * HOUR)
    assert_a_run_frees_the_old_pack(store, tmp_path)


def test_a_dictionary_renews_one_plain_copy_of_each_chunk_not_every_one(
    store: Store, tmp_path: Path
) -> None:
    """After a repack, the old pack and its copy both hold the live chunk. A save whose
    dictionary draws on that chunk must renew the newest copy only: renewing every copy
    kept the 3 MB old pack young at every run, never freed while such saves came."""
    digest = a_mostly_dead_pack_and_a_key_reusing_it(store, tmp_path)
    (old_pack,) = [p for p in pack_files(tmp_path / "store") if p.stat().st_size > 1_000_000]
    assert gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR))).packs_repacked
    age_packs(tmp_path / "store", 3 * HOUR)
    (copy,) = [
        loc.index.id
        for loc in chunk_index.load(store.backend).locate(digest)
        if loc.index.id not in old_pack.name
    ]
    then = time.time() - 2 * HOUR  # published after the old pack, as a repack's copy is
    os.utime(tmp_path / "store" / packs.index_key(copy), (then, then))
    # Files much like "a" (one byte differs in each): their block compresses far better
    # with a dictionary holding "a".
    small = (tmp_path / "hot" / "a").read_bytes()
    files = {f"k{i}": small[:i] + bytes([small[i] ^ 1]) + small[i + 1 :] for i in range(14)}
    write_tree(tmp_path / "new", files)
    store.save(tmp_path / "new", key("new"))
    named = {
        d
        for index in chunk_index.load(store.backend).packs.values()
        for dictionary in index.dictionaries
        for d in dictionary
    }
    assert digest in named, "the save's dictionary did not draw on the chunk"
    assert old_pack.stat().st_mtime < time.time() - HOUR, "the old pack was renewed"
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR)))
    assert report.packs_deleted == 1 and not old_pack.exists()
    assert store.load(key("hot"), tmp_path / "hot-out").missing == []
    assert store.load(key("new"), tmp_path / "new-out").missing == []
    assert {p: d for p, (d, _) in read_tree(tmp_path / "new-out").items()} == files


def test_a_copy_dated_ahead_does_not_hold_a_mostly_dead_pack(store: Store, tmp_path: Path) -> None:
    """A copy whose index a host with a clock a month ahead dated: it would "settle" only
    then, and the 3 MB pack would wait as long. gc copies the chunk itself instead (dated
    by its own clock), and frees the pack the day after."""
    digest = a_mostly_dead_pack_and_a_key_reusing_it(store, tmp_path)
    sealed = publish_copy(store, digest, (tmp_path / "hot" / "a").read_bytes())
    ahead = time.time() + 30 * 24 * HOUR
    os.utime(tmp_path / "store" / packs.index_key(sealed.index.pack), (ahead, ahead))
    for day in (1, 2):
        now = time.time() + day * 24 * HOUR
        gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR), now=now))
    assert max(f.stat().st_size for f in pack_files(tmp_path / "store")) < 1_000_000
    assert store.load(key("hot"), tmp_path / "out").missing == []


def test_a_plan_counts_as_freed_only_what_this_run_deletes(store: Store, tmp_path: Path) -> None:
    """A repacked pack is freed by a later run: the plan (and `gc --dry-run`) says so,
    and how many packs wait for a copy another host published lately."""
    a_mostly_dead_pack_and_a_key_reusing_it(store, tmp_path)
    p = gc_mod.plan(store, gc_mod.Policy(grace=HOUR))
    summary = p.summary()
    assert (
        summary["packs_to_repack"] == 1 and summary["bytes_to_repack"] == p.repack_bytes > 3_000_000
    )
    report = gc_mod.execute(store, p)
    assert summary["bytes_to_free"] == report.bytes_freed == 0
    # The next run, within the grace: the pack waits for the copy, copied no more.
    waiting = gc_mod.plan(store, gc_mod.Policy(grace=HOUR)).summary()
    assert waiting["packs_waiting_for_copies"] == 1 and waiting["bytes_to_free"] == 0


def test_a_dictionary_is_read_from_the_copy_the_save_keeps(store: Store, tmp_path: Path) -> None:
    """The newest plain copy of a dictionary's chunk is damaged: the save keeps (renews)
    that copy, so it must not take the bytes from the older one, which it does not keep and
    gc then sweeps (the chunk covered by the damaged copy). Its files must still load."""
    digest = a_mostly_dead_pack_and_a_key_reusing_it(store, tmp_path)
    small = (tmp_path / "hot" / "a").read_bytes()
    damaged = publish_copy(store, digest, bytes(b ^ 0xFF for b in small[:64]) + small[64:])
    age_packs(tmp_path / "store", 3 * HOUR)
    then = time.time() - 2 * HOUR  # published after the first copy, before the grace
    os.utime(tmp_path / "store" / packs.index_key(damaged.id), (then, then))
    files = {f"k{i}": small[:i] + bytes([small[i] ^ 1]) + small[i + 1 :] for i in range(14)}
    write_tree(tmp_path / "new", files)
    store.save(tmp_path / "new", key("new"))
    gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR)))
    assert store.load(key("new"), tmp_path / "new-out").missing == []
    assert {p: d for p, (d, _) in read_tree(tmp_path / "new-out").items()} == files

"""gc on a real S3 gateway (SeaweedFS), where objects cannot be renamed atomically nor
renewed: sweeps through trash/ settled against the savers' intents."""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from casstore import CacheKey, Store, chunk_index, packs
from casstore import gc as gc_mod
from casstore import intents as intents_mod
from casstore import manifest as mf
from casstore.backends.base import ObjectInfo
from casstore.errors import StoreUnavailable
from casstore.intents import Intent
from tests.helpers import read_tree, wait_until, write_tree
from tests.load_mix import run_mix
from tests.stress_worker import seed_aged_garbage
from tests.test_gc_stress import assert_every_save_loads

KEEP = CacheKey(torch="t", arch="a", model="keep")
GONE = CacheKey(torch="t", arch="a", model="gone")


def two_keys(root: str, tmp_path: Path) -> tuple[Store, dict[str, bytes], bytes]:
    """KEEP and GONE share one file; GONE's own file becomes garbage once it is removed.
    Returns the store, KEEP's files and the digest of GONE's own chunk."""
    shared = os.urandom(3000)
    keep = {"shared.py": shared, "keep.py": os.urandom(3000)}
    write_tree(tmp_path / "keep", keep)
    write_tree(tmp_path / "gone", {"shared.py": shared, "gone.py": os.urandom(3000)})
    store = Store(root)
    store.save(tmp_path / "keep", KEEP)
    store.save(tmp_path / "gone", GONE)
    garbage = store.files(GONE)["gone.py"].chunks[0].digest
    gc_mod.remove_key(store, GONE)
    aged(store, 0)  # object stores date to the second: grace 0 must see them as old
    return store, keep, garbage


def store_clock(store: Store) -> float:
    """The store's clock: the date it gives an object written now."""
    store.backend.put_if_absent("locks/test-clock", b"")
    info = store.backend.stat("locks/test-clock")
    store.backend.delete("locks/test-clock")
    assert info is not None
    return info.mtime


def aged(store: Store, seconds: float) -> None:
    """Wait until every chunk is older than ``seconds`` by the store's clock (S3 has no
    utime: time must pass), polling the clock with a bound."""
    newest = max(i.mtime for i in store.backend.list("packs/"))
    wait_until(lambda: store_clock(store) > newest + seconds, seconds + 30, "packs to age")


def pack_of(store: Store, digest: bytes) -> str:
    """The key of the (one) pack holding ``digest``."""
    (loc,) = chunk_index.load(store.backend).locate(digest)
    return packs.pack_key(loc.index.pack)


def present(store: Store, digest: bytes) -> bool:
    """Whether a pack holding ``digest`` is in packs/."""
    return any(
        store.backend.stat(packs.pack_key(loc.index.pack)) is not None
        for loc in chunk_index.load(store.backend).locate(digest)
    )


def test_gc_sweeps_garbage_and_keeps_live_chunks(s3_url: str, tmp_path: Path) -> None:
    store, keep, garbage = two_keys(s3_url, tmp_path)
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=0)))
    assert report.errors == [] and report.packs_deleted == 1
    assert not present(store, garbage)
    assert Store(s3_url, create=False).load(KEEP, tmp_path / "out").missing == []
    assert {p: d for p, (d, _) in read_tree(tmp_path / "out").items()} == keep
    assert list(store.backend.list("trash/")) == []


def test_a_saver_that_looked_first_gets_its_chunk_back(s3_url: str, tmp_path: Path) -> None:
    """A save announced the garbage chunk and found it present before gc moved it away:
    gc reads the intent after the move and gives the chunk back."""
    store, _keep, garbage = two_keys(s3_url, tmp_path)
    intent = Intent(store.backend)
    intent.announce([garbage])
    assert present(store, garbage)  # what the saver saw
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=0)))
    assert report.packs_deleted == 0 and report.packs_kept_late >= 1
    assert present(store, garbage)
    intent.close()
    aged(store, 0)  # given back means written anew: it ages from now
    again = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=0)))
    assert again.packs_deleted == 1 and not present(store, garbage)


def test_intents_of_dead_saves_expire_after_the_grace(s3_url: str, tmp_path: Path) -> None:
    store, _keep, garbage = two_keys(s3_url, tmp_path)
    Intent(store.backend).announce([garbage])  # a saver that died: never withdrawn
    kept = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=3600)))
    assert kept.packs_deleted == 0 and list(store.backend.list("intents/"))
    intents = list(store.backend.list("intents/"))
    wait_until(
        lambda: store_clock(store) > max(i.mtime for i in intents) + 1, 30, "the intent to age"
    )
    swept = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=0)))
    assert swept.packs_deleted == 1 and list(store.backend.list("intents/")) == []


def test_a_set_aside_copied_but_not_deleted_is_whole_again(s3_url: str, tmp_path: Path) -> None:
    """S3 has no rename: gc's move is a copy then a delete. A crash in between leaves the
    manifest under both names; the next run keeps the key and drops the copy."""
    store, _keep, _garbage = two_keys(s3_url, tmp_path)
    backend = store.backend
    (name,) = [i.key for i in backend.list(f"manifests/{KEEP.id}/")]
    copy = gc_mod.dropped_name(name, time.time())
    backend.put_if_absent(copy, backend.get(name))
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=0)))
    assert report.keys_restored == 1 and backend.stat(copy) is None
    assert Store(s3_url, create=False).load(KEEP, tmp_path / "out").missing == []


def test_a_crashed_sweep_is_finished_by_the_next_run(s3_url: str, tmp_path: Path) -> None:
    store, _keep, garbage = two_keys(s3_url, tmp_path)
    backend = store.backend
    live = store.files(KEEP)["keep.py"].chunks[0].digest
    run = "trash/20260101T000000-c0-deadbeef"
    for key in {pack_of(store, live), pack_of(store, garbage)}:
        assert backend.move(key, f"{run}/{key.rsplit('/', 1)[-1]}")
    plan = gc_mod.plan(store, gc_mod.Policy(grace=0))
    later = dataclasses.replace(plan, store_clock=(plan.store_clock or 0) + 700)  # run aged
    report = gc_mod.execute(store, later)
    assert report.trash_restored == 1 and present(store, live) and not present(store, garbage)
    assert list(backend.list("trash/")) == []


@pytest.mark.slow
def test_gc_sweeps_while_savers_reuse_the_chunks_it_sweeps_on_s3(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The concurrent saver/loader/gc mix of test_gc_stress.py on S3: savers reuse chunks
    gc sees as garbage, gc loops with a short grace; no completed save and no load may
    miss a file, and gc must really delete."""
    grace = 8.0
    old_chunks = tmp_path / "old-chunks"
    monkeypatch.setenv("CASSTORE_TEST_OLD_CHUNKS", str(old_chunks))
    garbage = seed_aged_garbage(Store(s3_url), tmp_path / "seed", keys=3, filler=150)
    assert garbage > 0 and old_chunks.exists()
    aged(Store(s3_url, create=False), grace)  # no utime on S3: the seed ages for real
    mix = run_mix([s3_url], tmp_path / "work", 10.0, savers=2, loaders=2, gc_grace=grace)
    assert mix.errors == []
    assert mix.total("gc_runs") > 0 and mix.total("loads") > 0
    assert mix.total("packs_deleted") > 0, "gc must really sweep"
    assert mix.total("bad") == 0 and mix.total("misses") == 0, mix.warnings
    assert_every_save_loads(Store(s3_url, create=False), mix, tmp_path)


def test_a_saver_that_looks_between_gcs_check_and_its_move_gets_the_chunk_back(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race itself: gc checked the intents (none), then a save announces the garbage
    chunk and finds it present, then gc moves it to trash. gc reads the intents again
    after moving, and gives it back."""
    store, _keep, garbage = two_keys(s3_url, tmp_path)
    backend = store.backend
    key = pack_of(store, garbage)
    real_move = backend.move
    seen: list[bool] = []
    intent = Intent(backend)

    def move(src: str, dst: str) -> bool:
        if src == key and dst.startswith("trash/") and not seen:
            intent.announce([garbage])  # the saver, between gc's check and its move
            seen.append(backend.stat(key) is not None)
        return real_move(src, dst)

    monkeypatch.setattr(backend, "move", move)
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=0)))
    assert seen == [True]  # the saver found it, so it will list it without uploading
    assert report.packs_deleted == 0 and present(store, garbage)
    intent.close()


def test_a_load_finds_a_chunk_gc_holds_in_trash(s3_url: str, tmp_path: Path) -> None:
    """Between gc's move to trash and its giving the chunk back, a load of a save that just
    listed it reads the trashed copy (verified like any chunk) instead of missing."""
    store, keep, _garbage = two_keys(s3_url, tmp_path)
    key = pack_of(store, store.files(KEEP)["keep.py"].chunks[0].digest)
    assert store.backend.move(key, f"trash/run-in-progress/{key.rsplit('/', 1)[-1]}")
    report = Store(s3_url, create=False).load(KEEP, tmp_path / "out")
    assert report.missing == []
    assert (tmp_path / "out" / "keep.py").read_bytes() == keep["keep.py"]


# --- found by review, each seen failing before its fix -------------------------------------


NEW = CacheKey(torch="t", arch="a", model="new")


def publish_listing(store: Store, digest: bytes, size: int) -> str:
    """What a save does at its end: publish a manifest listing a chunk it found present."""
    entry = mf.FileEntry("gone.py", size, 0o644, b"\1" * 32, (mf.ChunkRef(digest, size),))
    m = mf.new_manifest(NEW, [entry])
    name = f"manifests/{NEW.id}/{mf.new_manifest_name(m.created_at)}"
    store.backend.put_if_absent(name, mf.encode(m))
    return name


def test_a_new_manifest_gc_cannot_read_keeps_the_batch(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save looks at the chunk between gc's check and its move, then publishes and
    withdraws its intent before gc reads again; that read of its manifest fails (a
    timeout): gc must keep the chunk, not judge the manifest absent."""
    store, _keep, garbage = two_keys(s3_url, tmp_path)
    backend = store.backend
    key = pack_of(store, garbage)
    real_move, real_get = backend.move, backend.get
    published: list[str] = []

    def move(src: str, dst: str) -> bool:
        if src == key and not published:
            intent = Intent(backend)
            intent.announce([garbage])
            assert backend.stat(key) is not None  # the saver finds it present
            moved = real_move(src, dst)
            published.append(publish_listing(store, garbage, 3000))
            intent.close()
            return moved
        return real_move(src, dst)

    def get(name: str, **kwargs: int | None) -> bytes:
        if name in published:
            raise StoreUnavailable(f"{name}: simulated timeout")
        return real_get(name, **kwargs)

    monkeypatch.setattr(backend, "move", move)
    monkeypatch.setattr(backend, "get", get)
    gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=0)))
    monkeypatch.setattr(backend, "move", real_move)
    monkeypatch.setattr(backend, "get", real_get)
    assert present(store, garbage)


def test_recovery_reads_the_manifests_published_since_planning(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A crashed sweep left a chunk in trash/ that a running save had looked at; the save
    publishes and withdraws its intent after gc's step 4, before recovery reads the
    intents: the manifest must still protect the chunk."""
    store, _keep, garbage = two_keys(s3_url, tmp_path)
    backend = store.backend
    key = pack_of(store, garbage)
    intent = Intent(backend)
    intent.announce([garbage])
    assert backend.move(key, f"trash/20260101T000000-c0-deadbeef/{key.rsplit('/', 1)[-1]}")
    plan = gc_mod.plan(store, gc_mod.Policy(grace=0))
    later = dataclasses.replace(plan, store_clock=(plan.store_clock or 0) + 700)
    real_active = intents_mod.active
    calls: list[int] = []

    def active(backend_: object, younger_than: float) -> object:
        if not calls:
            publish_listing(store, garbage, 3000)
            intent.close()
        calls.append(1)
        return real_active(backend_, younger_than)  # type: ignore[arg-type]

    monkeypatch.setattr("casstore.sweep.active_intents", active)
    report = gc_mod.execute(store, later)
    assert report.trash_restored == 1 and present(store, garbage)


def test_a_trash_copy_that_vanished_is_an_error_not_a_kept_chunk(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _keep, garbage = two_keys(s3_url, tmp_path)
    backend = store.backend
    key = pack_of(store, garbage)
    intent = Intent(backend)
    real_move = backend.move

    def move(src: str, dst: str) -> bool:
        moved = real_move(src, dst)
        if src == key:
            intent.announce([garbage])  # a saver between gc's check and its move
            backend.delete(dst)  # and a second gc's recovery deleting the copy
        return moved

    monkeypatch.setattr(backend, "move", move)
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=0)))
    assert report.packs_kept_late == 0 and any("vanished" in e for e in report.errors)
    intent.close()


def test_a_load_reads_the_chunk_again_when_gc_gives_it_back_meanwhile(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _keep, _garbage = two_keys(s3_url, tmp_path)
    key = pack_of(store, store.files(KEEP)["keep.py"].chunks[0].digest)
    trash_key = f"trash/20990101T000000-c0-feedface/{key.rsplit('/', 1)[-1]}"
    assert store.backend.move(key, trash_key)
    loader = Store(s3_url, create=False)
    real_list = loader.backend.list

    def listing(prefix: str) -> Iterator[ObjectInfo]:
        found = list(real_list(prefix))
        if prefix == "trash/":
            assert store.backend.move(trash_key, key)  # gc gives it back right now
        return iter(found)

    monkeypatch.setattr(loader.backend, "list", listing)
    assert loader.load(KEEP, tmp_path / "out").missing == []

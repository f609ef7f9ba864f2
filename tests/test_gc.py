"""gc: retention policies (time controlled through mtimes and an injected clock), the
sweep protocol next to concurrent savers, compaction, cleanup, repair."""

from __future__ import annotations

import itertools
import os
import shutil
import threading
import time
from pathlib import Path

import msgspec
import pytest

from casstore import CacheKey, InvalidManifest, NotFound, Store, audit, constants
from casstore import gc as gc_mod
from casstore import manifest as mf
from casstore.locks import best_effort_lock
from casstore.store import StoredManifest
from casstore.sweep import trash_run_name
from tests.helpers import (
    corrupt_chunk,
    manifest_files,
    pack_files,
    read_tree,
    temp_files,
    write_tree,
)

DAY = 86400.0
HOUR = 3600.0


def key(model: str, torch: str = "2.13.0", tree: str = "inductor") -> CacheKey:
    return CacheKey(torch=torch, arch="x86-64-v3-test", model=model, extra={"tree": tree})


def save(store: Store, tmp_path: Path, k: CacheKey, files: dict[str, bytes]) -> None:
    src = tmp_path / f"src-{k.id}"
    write_tree(src, files)
    store.save(src, k)


def age(path: Path, seconds_ago: float, now: float) -> None:
    os.utime(path, (now - seconds_ago, now - seconds_ago))


def age_all_chunks(store_root: Path, seconds_ago: float, now: float) -> None:
    """Every pack and pack index dated ``seconds_ago``."""
    for c in pack_files(store_root) + sorted((store_root / constants.INDEX_DIR).glob("*")):
        age(c, seconds_ago, now)


def set_last_use(store: Store, k: CacheKey, when: float) -> None:
    """Pretend ``k`` was saved and last loaded at ``when`` (manifest times are in the
    documents, so the clock is moved instead: plan(now=...) below)."""
    marker = Path(store.backend.root) / Store.access_key(k.id)  # type: ignore[attr-defined]
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.utime(marker, (when, when))


def loads_intact(store: Store, k: CacheKey, dest: Path, files: dict[str, bytes]) -> bool:
    report = store.load(k, dest)
    return report.missing == [] and {p: d for p, (d, _) in read_tree(dest).items()} == files


def test_max_age_drops_unused_keys_and_their_own_chunks(store: Store, tmp_path: Path) -> None:
    shared = os.urandom(200_000)
    old_files = {"old.bin": os.urandom(300_000), "shared.bin": shared}
    new_files = {"new.bin": os.urandom(300_000), "shared.bin": shared}
    save(store, tmp_path, key("old"), old_files)
    save(store, tmp_path, key("new"), new_files)
    now = time.time() + 40 * DAY  # both saved "40 days ago"
    set_last_use(store, key("new"), now - 1 * DAY)  # but "new" was loaded yesterday
    age_all_chunks(tmp_path / "store", 40 * DAY, now)
    p = gc_mod.plan(store, gc_mod.Policy(max_age=30 * DAY), now=now)
    assert [d.state.key.model for d in p.drop] == ["old"]
    report = gc_mod.execute(store, p)
    # Run 1 sets the key aside: it stops loading at once, its chunks stay.
    assert report.keys_dropped == 1 and report.packs_deleted == 0
    with pytest.raises(NotFound):
        store.load(key("old"), tmp_path / "d1")
    # Run 2 deletes it, and copies the chunk it shared with "new" out of its pack; run 3
    # frees that pack (the copy is older than the grace by then: every host sees it).
    second = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(max_age=30 * DAY), now=now))
    assert second.keys_expired == 1 and second.packs_repacked == 1
    third = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(max_age=30 * DAY), now=now))
    assert third.packs_deleted == 1
    assert loads_intact(store, key("new"), tmp_path / "d2", new_files)
    assert audit.verify(store).ok


def test_a_load_records_use_without_rewriting_manifests(store: Store, tmp_path: Path) -> None:
    save(store, tmp_path, key("m"), {"a": b"1"})
    manifest = manifest_files(tmp_path / "store")[0]
    before = manifest.stat().st_mtime_ns
    store.load(key("m"), tmp_path / "d")
    marker = tmp_path / "store" / Store.access_key(key("m").id)
    assert marker.exists() and marker.stat().st_size == 0
    assert manifest.stat().st_mtime_ns == before
    now = time.time() + 40 * DAY
    set_last_use(store, key("m"), now - HOUR)  # the load an hour before "now"
    assert gc_mod.plan(store, gc_mod.Policy(max_age=30 * DAY), now=now).drop == ()


def test_keep_last_per_model_and_tree(store: Store, tmp_path: Path) -> None:
    now = time.time() + 10 * DAY
    for i, torch in enumerate(["2.11.0", "2.12.0", "2.13.0"]):
        save(store, tmp_path, key("flux", torch), {"f": f"graph {torch}".encode()})
        set_last_use(store, key("flux", torch), now - (3 - i) * DAY)
    save(store, tmp_path, key("flux", "2.11.0", tree="triton"), {"k": b"triton"})
    save(store, tmp_path, key("other", "2.11.0"), {"o": b"other"})
    p = gc_mod.plan(store, gc_mod.Policy(keep_last=2), now=now)
    assert [(d.state.key.model, d.state.key.torch) for d in p.drop] == [("flux", "2.11.0")]
    assert p.drop[0].state.key.extra["tree"] == "inductor"


def test_max_size_evicts_least_recently_used(store: Store, tmp_path: Path) -> None:
    now = time.time() + 10 * DAY
    for i, m in enumerate(["a", "b", "c"]):
        save(store, tmp_path, key(m), {"blob": os.urandom(1_000_000)})  # incompressible
        set_last_use(store, key(m), now - (10 - i) * HOUR)  # a oldest, c newest
    age_all_chunks(tmp_path / "store", 2 * DAY, now)
    p = gc_mod.plan(store, gc_mod.Policy(max_size=2_200_000), now=now)
    assert [d.state.key.model for d in p.drop] == ["a"]
    gc_mod.execute(store, p)
    assert {k.key.model for k in store.keys()} == {"b", "c"}
    gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(max_size=2_200_000), now=now))
    stored = sum(c.stat().st_size for c in pack_files(tmp_path / "store"))
    assert stored <= 2_200_000
    assert {k.key.model for k in store.keys()} == {"b", "c"}


def test_grace_period_protects_young_unreferenced_chunks(store: Store, tmp_path: Path) -> None:
    save(store, tmp_path, key("m"), {"f": os.urandom(100_000)})
    gc_mod.remove_key(store, key("m"))
    now = time.time()
    chunks = pack_files(tmp_path / "store")
    assert gc_mod.plan(store, gc_mod.Policy(grace=HOUR), now=now).packs == ()
    age_all_chunks(tmp_path / "store", 2 * HOUR, now)
    p = gc_mod.plan(store, gc_mod.Policy(grace=HOUR), now=now)
    assert len(p.packs) == len(chunks)
    gc_mod.execute(store, p)
    assert pack_files(tmp_path / "store") == []


def test_rm_then_gc_frees_the_key(store: Store, tmp_path: Path) -> None:
    save(store, tmp_path, key("m"), {"f": b"x" * 10})
    assert gc_mod.remove_key(store, key("m")) == 1
    with pytest.raises(NotFound):
        store.load(key("m"), tmp_path / "d")
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=0)))
    assert report.packs_deleted == 1


def test_compaction_merges_manifests_without_losing_files(store: Store, tmp_path: Path) -> None:
    k = key("m")
    files = {}
    for i in range(4):
        files[f"graph{i}"] = f"compiled {i}".encode()
        save(store, tmp_path, k, {f"graph{i}": files[f"graph{i}"]})
    assert len(store.manifests(k)) == 4
    p = gc_mod.plan(store, gc_mod.Policy())
    # A replica saves a new graph after the plan was made, before it is executed.
    save(store, tmp_path, k, {"late": b"compiled during gc"})
    files["late"] = b"compiled during gc"
    report = gc_mod.execute(store, p)
    assert report.keys_compacted == 1
    assert len(store.manifests(k)) == 2  # the merged one + the late one
    assert loads_intact(store, k, tmp_path / "d", files)


def forty_manifests(store: Store, tmp_path: Path) -> tuple[CacheKey, dict[str, bytes]]:
    """A key saved 40 times, one new file each time: 40 manifests to compact."""
    k = key("m")
    files = {f"g{i:02}/graph.py": os.urandom(3000) for i in range(40)}
    for path, data in files.items():
        save(store, tmp_path, k, {path: data})
    assert len(store.manifests(k)) == 40
    return k, files


@pytest.mark.parametrize("after", [1, 5, 39])
def test_a_load_listing_the_key_as_gc_compacts_it_sees_every_file(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: int
) -> None:
    """The load has listed the 40 manifests and read ``after`` of them when gc compacts
    the key (merged manifest published, the 40 deleted): the rest vanish under the load,
    which must still restore all 40 files."""
    k, files = forty_manifests(store, tmp_path)
    real_get = store.backend.get
    reads = 0

    def get(name: str, *, max_bytes: int | None = None) -> bytes:
        nonlocal reads
        blob = real_get(name, max_bytes=max_bytes)
        if name.startswith(constants.MANIFESTS_DIR):
            reads += 1
            if reads == after:
                names = tuple(info.key for info in store.backend.list(f"manifests/{k.id}/"))
                monkeypatch.setattr(store.backend, "get", real_get)
                assert gc_mod.compact_key(store, k.id, names)
        return blob

    monkeypatch.setattr(store.backend, "get", get)
    report = store.load(k, tmp_path / "dest")
    assert reads >= after and len(manifest_files(tmp_path / "store")) == 1  # compacted
    assert (report.files, report.missing) == (40, [])
    assert {p: d for p, (d, _) in read_tree(tmp_path / "dest").items()} == files


def test_loads_racing_compaction_restore_every_file_every_time(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gc compacts a key of many manifests over and over while loads run: each load must
    restore every file of the key, not only intact ones. Each round the key gets 40
    one-file manifests again, none listing every file (published, then the merged one
    removed), and gc merges them into one and deletes the 40. The loader reads manifests
    with a little latency, as over a network filesystem, so that its reading overlaps
    the deletions."""
    k, files = forty_manifests(store, tmp_path)
    entries = list(store.files(k).values())
    loader = threading.current_thread()
    real_get, real_delete = store.backend.get, store.backend.delete
    deleted = 0

    def get(name: str, *, max_bytes: int | None = None) -> bytes:
        blob = real_get(name, max_bytes=max_bytes)
        if threading.current_thread() is loader and name.startswith(constants.MANIFESTS_DIR):
            time.sleep(0.0005)  # the bytes arrive late: the directory changes meanwhile
        return blob

    def delete(name: str) -> bool:
        nonlocal deleted
        done = real_delete(name)
        deleted += done
        return done

    monkeypatch.setattr(store.backend, "get", get)
    monkeypatch.setattr(store.backend, "delete", delete)
    stop = threading.Event()
    errors: list[BaseException] = []

    def compactor() -> None:
        try:
            while not stop.is_set():
                merged = [s.name for s in store.read_manifests(k.id)[0]]
                for entry in entries:
                    m = mf.new_manifest(k, [entry])
                    name = mf.new_manifest_name(m.created_at)
                    store.backend.put_if_absent(f"manifests/{k.id}/{name}", mf.encode(m))
                for name in merged:
                    delete(name)
                names = tuple(s.name for s in store.read_manifests(k.id)[0])
                assert gc_mod.compact_key(store, k.id, names)
        except BaseException as e:
            errors.append(e)

    real_manifests = store.manifests
    raced = 0  # loads whose reading of the manifests overlapped deletions

    def manifests(k: CacheKey) -> list[StoredManifest]:
        nonlocal raced
        before = deleted
        found = real_manifests(k)
        raced += deleted != before
        return found

    monkeypatch.setattr(store, "manifests", manifests)
    thread = threading.Thread(target=compactor)
    thread.start()
    try:
        for i in range(60):
            dest = tmp_path / f"load{i}"
            report = store.load(k, dest)
            assert (report.files, report.missing) == (40, []), f"load {i}, {raced} raced"
            assert {p: d for p, (d, _) in read_tree(dest).items()} == files
    finally:
        stop.set()
        thread.join()
    assert errors == []
    assert raced >= 10, f"only {raced} of 60 loads raced a compaction"


def test_late_manifest_protects_candidate_chunks(store: Store, tmp_path: Path) -> None:
    """gc planned to delete chunks that a save published after the plan references."""
    data = {"big.so": os.urandom(800_000)}
    save(store, tmp_path, key("gone"), data)
    gc_mod.remove_key(store, key("gone"))
    now = time.time()
    age_all_chunks(tmp_path / "store", 2 * HOUR, now)
    p = gc_mod.plan(store, gc_mod.Policy(grace=HOUR), now=now)
    assert len(p.packs) == len(pack_files(tmp_path / "store")) >= 1
    save(store, tmp_path, key("again"), data)  # reuses (and refreshes) every chunk
    report = gc_mod.execute(store, p)
    assert report.packs_deleted == 0 and report.packs_kept_late == len(p.packs)
    assert loads_intact(store, key("again"), tmp_path / "d", data)


def test_refresh_just_before_the_sweep_restores_the_chunk(store: Store, tmp_path: Path) -> None:
    """The trash step: a candidate refreshed after planning comes back from trash."""
    save(store, tmp_path, key("m"), {"f": os.urandom(1000)})
    gc_mod.remove_key(store, key("m"))
    now = time.time()
    (chunk,) = pack_files(tmp_path / "store")
    age(chunk, 2 * HOUR, now)
    p = gc_mod.plan(store, gc_mod.Policy(grace=HOUR), now=now)
    assert len(p.packs) == 1
    os.utime(chunk)  # a saver's refresh, without a manifest yet
    report = gc_mod.execute(store, p)
    assert report.packs_deleted == 0 and chunk.exists()
    assert not list((tmp_path / "store" / constants.TRASH_DIR).rglob("*.pack"))


def test_crashed_sweep_trash_is_recovered(store: Store, tmp_path: Path) -> None:
    save(store, tmp_path, key("m1"), {"keep": os.urandom(1000)})
    (keep_path,) = pack_files(tmp_path / "store")
    save(store, tmp_path, key("m2"), {"drop": os.urandom(1000)})
    (drop_path,) = set(pack_files(tmp_path / "store")) - {keep_path}
    keep_key, drop_key = (
        f"{constants.PACKS_DIR}/{p.parent.name}/{p.name}" for p in (keep_path, drop_path)
    )
    run = f"{constants.TRASH_DIR}/crashed-run"
    assert store.backend.move(keep_key, f"{run}/{keep_path.name}")
    assert store.backend.move(drop_key, f"{run}/{drop_path.name}")
    for k in ("m1", "m2"):
        gc_mod.remove_key(store, key(k))  # unreferenced now: only the mtime decides
    trash = tmp_path / "store" / run
    now = time.time()
    age(trash / drop_path.name, 3 * HOUR, now)  # garbage: old
    os.utime(trash / keep_path.name)  # refreshed by a saver: young
    age(trash, 2 * HOUR, now)  # the crashed run is long gone
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR)))
    assert report.trash_restored == 1
    assert store.backend.stat(keep_key) is not None and store.backend.stat(drop_key) is None
    assert not trash.exists()


def test_cleanup_removes_stale_temps_and_idle_locks_only(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "store"
    save(store, tmp_path, key("m"), {"f": b"1"})
    now = time.time()
    stale = pack_files(root)[0].parent / f"{constants.TEMP_PREFIX}crashed"
    fresh = root / "manifests" / f"{constants.TEMP_PREFIX}writing"
    stale.write_bytes(b"partial")
    fresh.write_bytes(b"in progress")
    age(stale, 120, now)
    (root / "locks").mkdir(exist_ok=True)
    idle, held = root / "locks" / "idle.lock", root / "locks" / "held.lock"
    idle.touch()
    age(idle, 120, now)
    with best_effort_lock(held, 0) as got:
        assert got
        age(held, 120, now)
        p = gc_mod.plan(store, gc_mod.Policy(temp_timeout=60, lock_timeout=30), now=now)
        report = gc_mod.execute(store, p)
    assert report.temps_removed == 1 and not stale.exists() and fresh.exists()
    assert report.locks_removed == 1 and not idle.exists() and held.exists()


def stale_temp_files(root: Path, count: int) -> None:
    """``count`` temp files in manifests/, as crashed writers leave them, 5 minutes old."""
    (root / "manifests").mkdir(exist_ok=True)
    now = time.time()
    for i in range(count):
        t = root / "manifests" / f"{constants.TEMP_PREFIX}{i}"
        t.write_bytes(b"x")
        age(t, 300, now)


def test_opportunistic_cleanup_is_bounded(store: Store, tmp_path: Path) -> None:
    root = tmp_path / "store"
    stale_temp_files(root, 50)
    assert gc_mod.cleanup(store, temp_timeout=60, lock_timeout=30, budget_seconds=5) == 50
    assert temp_files(root) == []
    assert gc_mod.cleanup(store, temp_timeout=60, lock_timeout=30, budget_seconds=0) == 0


def test_cleanup_stops_at_its_time_budget(store: Store, tmp_path: Path) -> None:
    """A clock that ticks one second each time cleanup reads it (once per file): a budget
    of 10 s removes exactly 10 of 50 stale temp files; later runs remove the rest."""
    root = tmp_path / "store"
    stale_temp_files(root, 50)
    ticks = itertools.count()

    def clock() -> float:
        return float(next(ticks))

    def run(budget: float) -> int:
        return gc_mod.cleanup(
            store, temp_timeout=60, lock_timeout=30, budget_seconds=budget, clock=clock
        )

    assert run(10) == 10
    assert len(temp_files(root)) == 40
    assert run(25) == 25
    assert run(1000) == 15 and temp_files(root) == []


def test_repair_quarantines_and_the_next_save_heals(store: Store, tmp_path: Path) -> None:
    files = {"a": os.urandom(200_000), "b": os.urandom(5000)}
    save(store, tmp_path, key("m"), files)
    (victim,) = pack_files(tmp_path / "store")
    corrupt_chunk(store.backend, store.files(key("m"))["b"].chunks[0].digest)
    (victim,) = pack_files(tmp_path / "store")
    report = audit.verify(store)
    assert len(report.corrupt) == 1
    repaired = audit.repair(store, report)
    in_pack = len({c.digest for f in store.files(key("m")).values() for c in f.chunks})
    assert repaired.packs_quarantined == 1 and not victim.exists()
    assert repaired.chunks_salvaged == in_pack - 1
    assert list((tmp_path / "store" / constants.QUARANTINE_DIR).rglob("*"))
    after = audit.verify(store)
    assert after.corrupt == [] and len(after.missing_chunks) == 1
    healed = store.save(tmp_path / f"src-{key('m').id}", key("m"))  # unchanged tree
    assert healed.new_chunks == 1 and healed.manifest is None
    assert audit.verify(store).ok
    assert loads_intact(store, key("m"), tmp_path / "d", files)


def test_only_one_gc_at_a_time(store: Store) -> None:
    with gc_mod.gc_lock(store) as first:
        assert first
        with gc_mod.gc_lock(store) as second:
            assert not second


# --- regressions: a stale plan, crashed trash, bad manifests --------------------------------


def expired_plan(store: Store, tmp_path: Path, k: CacheKey) -> gc_mod.Plan:
    """A plan that drops ``k``: planned "40 days later", its chunks aged to match."""
    now = time.time() + 40 * DAY
    age_all_chunks(tmp_path / "store", 40 * DAY, now)
    p = gc_mod.plan(store, gc_mod.Policy(max_age=30 * DAY, grace=HOUR), now=now)
    assert [d.state.key_id for d in p.drop] == [k.id]
    return p


def test_execute_keeps_a_key_loaded_and_extended_after_planning(
    store: Store, tmp_path: Path
) -> None:
    """Between plan and execute (gc waiting at its prompt) a replica loads the key and
    saves one more file: execute must keep every file of the key."""
    k = key("m")
    files = {"a.so": os.urandom(300_000), "b.py": os.urandom(2000)}
    save(store, tmp_path, k, files)
    p = expired_plan(store, tmp_path, k)
    replica = tmp_path / "replica"
    store.load(k, replica)
    (replica / "c.py").write_bytes(b"compiled later")
    store.save(replica, k)
    report = gc_mod.execute(store, p)
    assert report.keys_dropped == 0 and report.packs_deleted == 0
    assert loads_intact(store, k, tmp_path / "d", {**files, "c.py": b"compiled later"})
    assert audit.verify(store).ok


def test_execute_keeps_a_key_loaded_and_resaved_unchanged_after_planning(
    store: Store, tmp_path: Path
) -> None:
    k = key("m")
    files = {"a.so": os.urandom(300_000), "b.py": os.urandom(2000)}
    save(store, tmp_path, k, files)
    p = expired_plan(store, tmp_path, k)
    replica = tmp_path / "replica"
    store.load(k, replica)
    assert store.save(replica, k).manifest is None  # nothing new
    report = gc_mod.execute(store, p)
    assert report.keys_dropped == 0
    assert loads_intact(store, k, tmp_path / "d", files)


def test_a_save_landing_while_gc_deletes_the_key_loses_nothing(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replica loads and saves after execute re-checked the key, just before gc sets
    its first manifest aside: gc must notice and put the manifests back at once."""
    k = key("m")
    files = {"a.so": os.urandom(300_000), "b.py": os.urandom(2000)}
    save(store, tmp_path, k, files)
    p = expired_plan(store, tmp_path, k)
    replica = tmp_path / "replica"
    real_move = store.backend.move
    raced: list[str] = []

    def move(src: str, dst: str) -> bool:
        if src.startswith(constants.MANIFESTS_DIR) and not raced:
            raced.append(src)
            store.load(k, replica)
            (replica / "c.py").write_bytes(b"compiled later")
            store.save(replica, k)
        return real_move(src, dst)

    monkeypatch.setattr(store.backend, "move", move)
    report = gc_mod.execute(store, p)
    monkeypatch.undo()
    assert raced and report.keys_dropped == 0 and report.packs_deleted == 0
    assert loads_intact(store, k, tmp_path / "d", {**files, "c.py": b"compiled later"})
    assert audit.verify(store).ok


def test_crashed_trash_gives_back_chunks_that_live_manifests_list(
    store: Store, tmp_path: Path
) -> None:
    """A crashed gc left a chunk in trash that a live manifest lists: old or not, it goes
    back to packs/."""
    files = {"live": os.urandom(1000)}
    save(store, tmp_path, key("m"), files)
    (live,) = pack_files(tmp_path / "store")
    now = time.time()
    age(live, 3 * HOUR, now)
    run = f"{constants.TRASH_DIR}/crashed-run"  # any name: runs of older versions too
    live_key = f"{constants.PACKS_DIR}/{live.parent.name}/{live.name}"
    assert store.backend.move(live_key, f"{run}/{live.name}")
    age(tmp_path / "store" / run, 2 * HOUR, now)  # the crashed run is long gone
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR)))
    assert report.trash_restored == 1 and live.exists()
    assert loads_intact(store, key("m"), tmp_path / "d", files)


def test_crashed_trash_restores_what_its_own_run_would_have(store: Store, tmp_path: Path) -> None:
    """A chunk refreshed after the crashed run's cutoff (but before this run's) was kept
    by a saver for that run: recovery judges it by the crashed run's cutoff."""
    save(store, tmp_path, key("m"), {"f": os.urandom(1000)})
    gc_mod.remove_key(store, key("m"))
    (chunk,) = pack_files(tmp_path / "store")
    now = time.time()
    crashed_cutoff = now - 5 * HOUR
    age(chunk, 4 * HOUR, now)  # refreshed after the crashed run's cutoff
    run = f"{constants.TRASH_DIR}/{trash_run_name(crashed_cutoff)}"
    ckey = f"{constants.PACKS_DIR}/{chunk.parent.name}/{chunk.name}"
    assert store.backend.move(ckey, f"{run}/{chunk.name}")
    age(tmp_path / "store" / run, 2 * HOUR, now)
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR), now=now))
    assert report.trash_restored == 1 and chunk.exists()


def test_a_manifest_with_an_impossible_time_never_stops_gc(store: Store, tmp_path: Path) -> None:
    k = key("m")
    save(store, tmp_path, k, {"a": b"first"})
    save(store, tmp_path, k, {"b": b"second"})
    for bad_time in (float("nan"), float("inf"), -1.0, 1e300):
        m = mf.new_manifest(k, [])
        bad = msgspec.structs.replace(m, created_at=bad_time)
        store.backend.put_if_absent(
            f"{constants.MANIFESTS_DIR}/{k.id}/{mf.new_manifest_name(time.time())}", mf.encode(bad)
        )
    save(store, tmp_path, key("gone"), {"g": os.urandom(5000)})
    gc_mod.remove_key(store, key("gone"))
    p = gc_mod.plan(store, gc_mod.Policy(grace=0))
    report = gc_mod.execute(store, p)
    assert report.keys_compacted == 1 and report.packs_deleted == 1
    assert loads_intact(store, k, tmp_path / "d", {"a": b"first", "b": b"second"})


# --- regressions from an adversarial review ---------------------------------------------------


def test_symlinks_in_trash_are_never_followed(store: Store, tmp_path: Path) -> None:
    """Anyone who can write the store can plant trash/<run> -> elsewhere; recovering
    crashed sweeps must not delete through it (live chunks, or files outside the store)."""
    files = {f"f{i}": os.urandom(1000) + bytes([i]) for i in range(20)}
    save(store, tmp_path, key("m"), files)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    fanout = sorted((tmp_path / "store" / constants.PACKS_DIR).iterdir())[0]
    trash = tmp_path / "store" / constants.TRASH_DIR
    trash.mkdir()
    os.symlink(victim, trash / "evil-c0-x")
    os.symlink(os.path.relpath(fanout, trash), trash / "evil2-c9999999999-y")
    long_ago = time.time() - 3 * HOUR
    for p in (victim, fanout):
        os.utime(p, (long_ago, long_ago))
    gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy()))
    assert (victim / "precious.txt").read_text() == "keep me"
    assert loads_intact(store, key("m"), tmp_path / "d", files)


def test_two_gcs_finishing_one_crashed_run_do_not_crash(store: Store, tmp_path: Path) -> None:
    save(store, tmp_path, key("m"), {"f": os.urandom(1000)})
    gc_mod.remove_key(store, key("m"))
    (chunk,) = pack_files(tmp_path / "store")
    run = tmp_path / "store" / constants.TRASH_DIR / "crashed"
    run.mkdir(parents=True)
    os.rename(chunk, run / chunk.name)
    (run / "a-directory").mkdir()  # junk a gc cannot unlink
    long_ago = time.time() - 3 * HOUR
    os.utime(run, (long_ago, long_ago))
    gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR)))  # no exception
    assert not (run / chunk.name).exists()
    shutil.rmtree(run)  # the run vanishing under a second gc, as if another finished it
    gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR)))


def test_gc_never_sweeps_chunks_of_a_manifest_from_a_newer_casstore(
    store: Store, tmp_path: Path
) -> None:
    """A manifest this casstore cannot read (a newer format, a field it does not know) may
    well be valid: its chunks must not be swept as garbage."""
    save(store, tmp_path, key("m"), {"a": os.urandom(5000)})
    (path,) = manifest_files(tmp_path / "store")
    body = msgspec.msgpack.decode(path.read_bytes()[len(constants.MANIFEST_MAGIC) + 32 :])
    body["compression_level"] = 3
    path.write_bytes(mf.seal(msgspec.msgpack.encode(body)))
    before = pack_files(tmp_path / "store")
    report = gc_mod.execute(
        store, gc_mod.plan(store, gc_mod.Policy(grace=60), now=time.time() + 2 * HOUR)
    )
    assert report.packs_deleted == 0 and pack_files(tmp_path / "store") == before
    assert any("newer casstore" in e for e in report.errors), report.errors


def test_a_junk_manifest_file_does_not_pin_its_key(store: Store, tmp_path: Path) -> None:
    k = key("m")
    save(store, tmp_path, k, {"a": os.urandom(5000)})
    junk = tmp_path / "store" / constants.MANIFESTS_DIR / k.id / "junk.manifest"
    junk.write_bytes(b"not a manifest")
    p = expired_plan(store, tmp_path, k)
    report = gc_mod.execute(store, p)
    assert report.keys_dropped == 1 and report.keys_spared == 0
    with pytest.raises(InvalidManifest):  # only the junk is left under the key
        store.load(k, tmp_path / "d")


def test_a_dropped_key_goes_in_two_runs_and_comes_back_if_saved_meanwhile(
    store: Store, tmp_path: Path
) -> None:
    """Run 1 sets a dropped key's manifests aside (the key stops loading, its chunks stay);
    run 2 deletes them, unless a replica saved the key in between: then they come back, so
    even a save whose view of the key lagged behind loses nothing."""
    k = key("m")
    files = {"a.so": os.urandom(300_000), "b.py": os.urandom(2000)}
    save(store, tmp_path, k, files)
    first = gc_mod.execute(store, expired_plan(store, tmp_path, k))
    assert first.keys_dropped == 1 and first.packs_deleted == 0
    with pytest.raises(NotFound):
        store.load(k, tmp_path / "gone")
    # A replica with a lagging view saves only its new file.
    late = tmp_path / "late"
    write_tree(late, {"c.py": b"compiled later"})
    store.save(late, k)
    second = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR)))
    assert second.packs_deleted == 0
    assert loads_intact(store, k, tmp_path / "d", {**files, "c.py": b"compiled later"})


def test_set_aside_manifests_are_deleted_by_the_next_run_and_their_chunks_freed(
    store: Store, tmp_path: Path
) -> None:
    k = key("m")
    save(store, tmp_path, k, {"a.so": os.urandom(300_000)})
    gc_mod.execute(store, expired_plan(store, tmp_path, k))
    assert pack_files(tmp_path / "store")
    later = time.time() + 41 * DAY
    second = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR), now=later))
    assert second.packs_deleted > 0 and pack_files(tmp_path / "store") == []
    leftovers = (tmp_path / "store" / constants.MANIFESTS_DIR).rglob("*")
    assert [p for p in leftovers if not p.is_dir()] == []
    assert not (tmp_path / "store" / Store.access_key(k.id)).exists()


# --- regressions from a second adversarial review ---------------------------------------------


@pytest.mark.parametrize("subdir", ["access", "trash", "locks", "manifests"])
def test_a_store_directory_replaced_by_a_symlink_is_never_followed(
    store: Store, tmp_path: Path, subdir: str
) -> None:
    """Anyone who can write the store root can swap one of its directories for a symlink:
    neither gc nor a saver's cleanup may then delete anything where it points."""
    save(store, tmp_path, key("m"), {"f": os.urandom(2000)})
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    names = ["a" * 32, "poetry.lock", f"{constants.TEMP_PREFIX}x", "sub/b.lock", "c.zst"]
    long_ago = time.time() - 3 * DAY
    for name in names:
        (victim / name).write_text("precious")
        os.utime(victim / name, (long_ago, long_ago))
    for d in (victim, victim / "sub"):
        os.utime(d, (long_ago, long_ago))
    real = tmp_path / "store" / subdir
    if real.exists():
        shutil.rmtree(real)
    os.symlink(victim, real)
    p = gc_mod.plan(store, gc_mod.Policy(grace=60, temp_timeout=1, lock_timeout=1))
    gc_mod.execute(store, p)
    gc_mod.cleanup(store, temp_timeout=1, lock_timeout=1, budget_seconds=5)
    assert sorted(str(p.relative_to(victim)) for p in victim.rglob("*") if p.is_file()) == sorted(
        names
    )


def test_gc_runs_where_its_lock_cannot_be_taken(store: Store, tmp_path: Path) -> None:
    """A lock that cannot even be created (read-only locks/, no flock) is not "another gc
    is running": locks carry no correctness, gc goes on."""
    locks = tmp_path / "store" / constants.LOCKS_DIR
    if locks.exists():
        shutil.rmtree(locks)
    locks.write_text("a file where the locks directory should be")
    with gc_mod.gc_lock(store) as go:
        assert go


def test_one_key_gc_cannot_write_does_not_stop_the_run(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save(store, tmp_path, key("stuck"), {"a": os.urandom(3000)})
    save(store, tmp_path, key("gone"), {"g": os.urandom(3000)})
    gc_mod.remove_key(store, key("gone"))
    now = time.time() + 40 * DAY
    age_all_chunks(tmp_path / "store", 40 * DAY, now)
    real_move = store.backend.move

    def move(src: str, dst: str) -> bool:
        if key("stuck").id in src:
            raise PermissionError(13, "Permission denied", src)
        return real_move(src, dst)

    monkeypatch.setattr(store.backend, "move", move)
    p = gc_mod.plan(store, gc_mod.Policy(max_age=30 * DAY, grace=HOUR), now=now)
    report = gc_mod.execute(store, p)
    assert report.packs_deleted >= 1  # the rest of the run went on
    assert any("Permission denied" in e for e in report.errors), report.errors


def test_a_key_set_aside_saved_and_dropped_again_does_not_flip_back(
    store: Store, tmp_path: Path
) -> None:
    k = key("m")
    save(store, tmp_path, k, {"old.so": os.urandom(3000)})
    now = time.time() + 40 * DAY
    policy = gc_mod.Policy(max_age=30 * DAY, grace=0)
    gc_mod.execute(store, gc_mod.plan(store, policy, now=now))  # set aside
    save(store, tmp_path / "again", k, {"new.so": os.urandom(3000)})
    # Dropped again before anything loads it (the save is "old" by this plan's clock).
    later = now + 40 * DAY
    for _ in range(3):
        gc_mod.execute(store, gc_mod.plan(store, policy, now=later))
    with pytest.raises(NotFound):
        store.load(k, tmp_path / "d")
    assert [
        p for p in (tmp_path / "store" / constants.MANIFESTS_DIR).rglob("*") if p.is_file()
    ] == []


def test_set_aside_manifests_wait_a_grace_period_before_deletion(
    store: Store, tmp_path: Path
) -> None:
    """The run that deletes a set-aside key must come long enough after the one that set
    it aside for any save still in flight to show (gc run twice in a row, a retried job)."""
    k = key("m")
    save(store, tmp_path, k, {"a.so": os.urandom(3000)})
    policy = gc_mod.Policy(max_age=30 * DAY, grace=HOUR)
    gc_mod.execute(store, expired_plan(store, tmp_path, k))
    right_after = gc_mod.execute(store, gc_mod.plan(store, policy))
    assert right_after.keys_expired == 0
    assert list((tmp_path / "store" / constants.MANIFESTS_DIR).rglob("*.dropped*"))
    later = gc_mod.execute(store, gc_mod.plan(store, policy, now=time.time() + 2 * HOUR))
    assert later.keys_expired == 1


def test_chunks_of_shadowed_entries_in_live_manifests_are_kept(
    store: Store, tmp_path: Path
) -> None:
    """A live manifest lists a chunk that a newer one shadows: if the newer one goes
    (quarantined, say), the older must still load."""
    k = key("m")
    save(store, tmp_path / "v1", k, {"f.so": b"version one" * 300})
    save(store, tmp_path / "v2", k, {"f.so": b"version two" * 300})
    age_all_chunks(tmp_path / "store", 2 * HOUR, time.time())
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=HOUR, compact=False)))
    assert report.packs_deleted == 0
    newest = manifest_files(tmp_path / "store")[-1]
    newest.unlink()
    assert loads_intact(store, k, tmp_path / "d", {"f.so": b"version one" * 300})

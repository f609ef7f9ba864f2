"""Usage history (one record per load and save), `stats --since`, `ls` loads, Prometheus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from casstore import CacheKey, NotFound, Store, usage
from casstore import gc as gc_mod
from casstore.backends.fs import FileSystemBackend
from tests import cpu_host
from tests.helpers import KEY, pack_files, stored_chunks, wait_until, write_tree

DAY = 86400.0


def saved_store(tmp_path: Path) -> Store:
    store = Store(tmp_path / "store")
    write_tree(tmp_path / "src", {"a.py": b"a" * 100, "b.so": os.urandom(50_000)})
    store.save(tmp_path / "src", KEY)
    return store


def test_every_load_and_save_leaves_one_record(tmp_path: Path) -> None:
    store = saved_store(tmp_path)
    store.save(tmp_path / "src", KEY)  # unchanged
    store.load(KEY, tmp_path / "d1")
    store.load(KEY, tmp_path / "d1")  # every file present: still complete
    for chunk in pack_files(tmp_path / "store"):
        chunk.unlink()
    store.load(KEY, tmp_path / "d2")  # partial: the chunks are gone
    with pytest.raises(NotFound):
        store.load(CacheKey(torch="t", arch="a", model="nobody"), tmp_path / "d3")
    records = usage.read(store.backend)
    assert [(r.op, r.outcome) for r in records] == [
        ("save", "saved"),
        ("save", "unchanged"),
        ("load", "complete"),
        ("load", "complete"),
        ("load", "partial"),
        ("load", "miss"),
    ]
    first_load = records[2]
    assert first_load.files == 2 and first_load.bytes == 50_100 and first_load.key_id == KEY.id
    assert records[3].files == 0  # nothing written the second time
    assert records[0].bytes == 50_100 and records[1].bytes == 0
    assert len({r.id for r in records}) == 6


def test_a_read_only_store_still_loads(tmp_path: Path) -> None:
    saved_store(tmp_path)
    os.chmod(tmp_path / "store", 0o555)
    try:
        reader = Store(tmp_path / "store", create=False)
        reader.backend.put_if_absent = _refuse  # type: ignore[method-assign]
        assert reader.load(KEY, tmp_path / "out").missing == []
    finally:
        os.chmod(tmp_path / "store", 0o755)


def _refuse(key: str, data: bytes) -> bool:
    raise PermissionError(13, "Permission denied", key)


def test_stats_since_counts_only_the_window(tmp_path: Path) -> None:
    store = saved_store(tmp_path)
    now = time.time()
    for age, outcome, nbytes in ((10 * DAY, "complete", 1), (2 * DAY, "partial", 100)):
        usage.record(store.backend, "load", outcome, KEY, files=1, nbytes=nbytes, now=now - age)
    usage.record(store.backend, "load", "miss", KEY, now=now - 3600)
    recent = usage.summarize(usage.read(store.backend, since=now - 7 * DAY), now - 7 * DAY)
    assert recent.loads == {"complete": 0, "partial": 1, "miss": 1}
    assert recent.bytes_served == 100 and recent.hit_rate == 0.5
    everything = usage.summarize(usage.read(store.backend), None)
    assert everything.loads["complete"] == 1 and everything.saves["saved"] == 1


def cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "CASSTORE_ROOT"}
    proc = subprocess.run(
        [*cpu_host.cli(), *args],
        capture_output=True,
        text=True,
        env={**base, "CASSTORE_ROOT": str(root)},
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def test_stats_json_ls_and_the_prometheus_text_parsed_back(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    store = saved_store(tmp_path)
    root = tmp_path / "store"
    for _ in range(3):
        store.load(KEY, tmp_path / "out")
    with pytest.raises(NotFound):
        store.load(CacheKey(torch="t", arch="a", model="gone"), tmp_path / "x")
    usage.record(store.backend, "load", "complete", KEY, now=time.time() - 30 * DAY)

    doc = json.loads(cli(root, "stats", "--since", "7d", "--json").stdout)
    assert doc["usage"]["loads"] == {"complete": 3, "partial": 0, "miss": 1}
    assert doc["usage"]["restores"] == 4 and doc["usage"]["hit_rate"] == 0.75
    assert doc["usage"]["saves"] == {"saved": 1, "unchanged": 0}
    assert doc["usage"]["bytes_served"] == 50_100  # the first load wrote both files
    wider = json.loads(cli(root, "stats", "--since", "60d", "--json").stdout)
    assert wider["usage"]["loads"]["complete"] == 4

    (listed,) = json.loads(cli(root, "ls", "--json").stdout)
    assert listed["loads"] == 4 and listed["last_load"].endswith("Z")

    text = cli(root, "stats", "--prometheus").stdout
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in families.values()
        for s in f.samples
    }
    where = ("store", str(root))
    assert samples[("casstore_keys", (where,))] == 1
    assert samples[("casstore_chunks", (where,))] == len(stored_chunks(FileSystemBackend(root)))
    assert samples[("casstore_packs", (where,))] == len(pack_files(root)) >= 1
    window = ("window", "7d")
    assert samples[("casstore_loads", (("outcome", "complete"), where, window))] == 3
    assert samples[("casstore_loads", (("outcome", "miss"), where, window))] == 1
    assert samples[("casstore_load_hit_ratio", (where, window))] == 0.75
    assert samples[("casstore_served_bytes", (where, window))] == 50_100
    assert all(f.type == "gauge" for f in families.values())


def test_gc_merges_finished_days_counts_each_record_once_and_drops_old_ones(
    tmp_path: Path,
) -> None:
    store = saved_store(tmp_path)
    now = time.time()
    for i in range(5):
        usage.record(store.backend, "load", "complete", KEY, now=now - 3 * DAY + i)
    usage.record(store.backend, "load", "complete", KEY, now=now - 200 * DAY)
    before = usage.read(store.backend)
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(usage_retention=90 * DAY)))
    assert report.usage_records_merged == 5 and report.usage_objects_deleted == 6
    after = usage.read(store.backend)
    assert [r.id for r in after] == [r.id for r in before if r.time > now - 90 * DAY]
    old_day = usage.day_of(now - 3 * DAY)
    assert [
        n.rsplit("/", 1)[-1].endswith(".recs")
        for n in usage.iter_objects(store.backend)
        if f"/{old_day}/" in n
    ] == [True]
    # A gc that crashed after publishing the merged object, before deleting what it merged:
    # the records are there twice, and count once.
    for rec in after:
        usage.record(store.backend, rec.op, rec.outcome, KEY, now=rec.time)
    duplicated = list(usage.iter_objects(store.backend))
    assert len(duplicated) > 1
    stale = usage.read(store.backend)
    assert len(stale) == len(after) * 2  # re-recorded copies carry new ids: counted
    # ... while the same id in two objects is counted once.
    merged = next(n for n in usage.iter_objects(store.backend) if n.endswith(".recs"))
    blob = store.backend.get(merged)
    store.backend.put_if_absent(merged.replace(".recs", "-copy.recs"), blob)
    assert len(usage.read(store.backend)) == len(stale)


def test_concurrent_loaders_on_two_hosts_lose_no_record(
    shared_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """Four processes per host load at once through two SeaweedFS mounts; every load's
    record is there, seen from either host."""
    a, b = shared_dirs
    write_tree(tmp_path / "src", {f"f{i}.py": os.urandom(2000) for i in range(5)})
    Store(a / "store").save(tmp_path / "src", KEY)
    wait_until(lambda: (b / "store" / "CASSTORE").exists(), 30, "store visible on host 2")
    loads_each = 3
    code = (
        "import sys\nfrom pathlib import Path\nfrom casstore import Store\n"
        "from tests.helpers import KEY\n"
        "root, dest = Path(sys.argv[1]), Path(sys.argv[2])\n"
        f"for i in range({loads_each}):\n"
        "    Store(root, create=False).load(KEY, dest / str(i))\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(host / "store"), str(tmp_path / f"d{n}")],
            cwd=Path(__file__).parent.parent,
        )
        for n, host in enumerate([a, b] * 4)
    ]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    expected = len(procs) * loads_each

    def counted(host: Path) -> int:
        records = usage.read(Store(host / "store", create=False).backend)
        return sum(1 for r in records if r.op == "load" and r.outcome == "complete")

    wait_until(lambda: counted(a) == expected, 60, f"{expected} load records on host 1")
    wait_until(lambda: counted(b) == expected, 60, f"{expected} load records on host 2")


# --- hostile or odd records: found by review, each seen failing before its fix ----------


def plant(store: Store, day: str, name: str, blob: bytes) -> None:
    store.backend.put_if_absent(f"{usage.USAGE_DIR}/{day}/{name}", blob)


def test_undecodable_and_implausible_records_are_skipped_never_fatal(tmp_path: Path) -> None:
    import msgspec

    store = saved_store(tmp_path)
    store.load(KEY, tmp_path / "out")
    root = tmp_path / "store"
    today = usage.day_of(time.time())
    good: dict[str, object] = msgspec.to_builtins(usage.read(store.backend)[-1])
    # A field readers must skip, nested 60,000 deep (built by hand: no encoder nests so).
    placeholder = msgspec.msgpack.encode({**good, "id": "x", "junk": None})
    plant(store, today, "0-deep.rec", placeholder[:-1] + b"\x91" * 60_000 + b"\x00")
    changes: list[dict[str, object]] = [
        {"time": float("inf")},
        {"time": time.time() + 400 * DAY},  # a clock years ahead
        {"outcome": "bogus"},
        {"files": -5},
    ]
    for n, change in enumerate(changes):
        odd = msgspec.msgpack.encode({**good, "id": f"o{n}", **change})
        plant(store, today, f"1-odd{n}.rec", odd)
    plant(store, today, "2-garbage.rec", b"\xc1\xc1")
    assert len(usage.read(store.backend)) == 2  # the save and the load
    listed = json.loads(cli(root, "ls", "--json").stdout)
    assert listed[0]["loads"] == 1
    stats = json.loads(cli(root, "stats", "--json").stdout)
    assert stats["usage"]["loads"] == {"complete": 1, "partial": 0, "miss": 0}
    assert "bogus" not in cli(root, "stats", "--prometheus").stdout
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy()))
    assert not [e for e in report.errors if "usage" in e], report.errors


def test_gc_never_deletes_usage_objects_it_could_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = saved_store(tmp_path)
    now = time.time()
    for i in range(3):
        usage.record(store.backend, "load", "complete", KEY, now=now - 2 * DAY + i)
    day = usage.day_of(now - 2 * DAY)
    plant(store, day, "9-unreadable.rec", b"\xc1")
    gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy()))
    names = [n.rsplit("/", 1)[-1] for n in usage.iter_objects(store.backend) if day in n]
    assert "9-unreadable.rec" in names and sum(n.endswith(".recs") for n in names) == 1
    # A day too large for one merged object is split: every part stays readable.
    for i in range(40):
        usage.record(store.backend, "load", "complete", KEY, now=now - 3 * DAY + i)
    monkeypatch.setattr(usage, "MAX_MERGED_BYTES", 2000)
    gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy()))
    old = usage.day_of(now - 3 * DAY)
    parts = [n for n in usage.iter_objects(store.backend) if old in n]
    assert len(parts) > 1 and all(store.backend.stat(p).size <= 2000 for p in parts)  # type: ignore[union-attr]
    assert sum(1 for r in usage.read(store.backend) if usage.day_of(r.time) == old) == 40


def test_future_days_are_ignored_and_deleted(tmp_path: Path) -> None:
    store = saved_store(tmp_path)
    usage.record(store.backend, "load", "miss", KEY, now=time.time() + 3 * 365 * DAY)
    assert [r.outcome for r in usage.read(store.backend)] == ["saved"]
    report = gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy()))
    assert report.usage_objects_deleted == 1


def test_labels_print_as_written(tmp_path: Path) -> None:
    """Key labels may hold ':' (org:a:v1): no console turns ':a:' into an emoji."""
    root = tmp_path / "store"
    key = CacheKey(torch="t", arch="a", model="org:a:v1:thumbs_up:")
    write_tree(tmp_path / "src", {"a.py": b"1"})
    Store(root).save(tmp_path / "src", key)
    Store(root).load(key, tmp_path / "out")
    assert "org:a:v1:thumbs_up:" in cli(root, "ls").stdout
    assert 'model="org:a:v1:thumbs_up:"' in cli(root, "stats", "--prometheus").stdout


def test_optional_side_trees_that_are_absent_are_not_misses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from casstore import load_compile_cache, save_compile_cache

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    root, cache = tmp_path / "store", tmp_path / "cache"
    write_tree(cache, {"fxgraph/a": b"x"})
    save_compile_cache(cache_dir=cache, root=root, model="side")  # no precompiled header
    load_compile_cache(cache_dir=tmp_path / "c2", root=root, model="side")
    outcomes = [(r.op, r.outcome) for r in usage.read(Store(root).backend)]
    assert outcomes == [("save", "saved"), ("load", "complete")]

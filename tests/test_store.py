from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from casstore import (
    CacheKey,
    CacheTooLarge,
    CasstoreError,
    FormatMismatch,
    InvalidManifest,
    NotFound,
    Store,
    audit,
    chunking,
    constants,
    localfs,
)
from casstore import manifest as mf
from casstore.errors import CannotRenew
from tests.helpers import (
    KEY,
    corrupt_chunk,
    lose_chunk,
    manifest_files,
    pack_files,
    read_tree,
    temp_files,
    write_tree,
)

# --- round trip ----------------------------------------------------------------------------

_name = st.text(alphabet=st.sampled_from("abcXYZ019_-.~ #é漢+=,@"), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith(constants.TEMP_PREFIX)
)
_path = st.lists(_name, min_size=1, max_size=4).map("/".join)
_size = st.sampled_from([0, 1, 100, 4096, 70_000, 300_000, 1_500_000])


@st.composite
def trees(draw: st.DrawFn) -> dict[str, tuple[bytes, int]]:
    paths = draw(st.lists(_path, min_size=0, max_size=12, unique=True))
    # A path cannot be both a file and a directory.
    paths = [p for p in paths if not any(q.startswith(p + "/") for q in paths)]
    tree = {}
    for p in paths:
        size = draw(_size)
        seed = draw(st.integers(0, 2**16))
        data = random.Random(seed).randbytes(size) if seed % 3 else bytes(size)
        mode = draw(st.sampled_from([0o644, 0o600, 0o755, 0o444]))
        tree[p] = (data, mode)
    return tree


@given(tree=trees())
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_roundtrip_restores_identical_bytes_and_modes(tree: dict[str, tuple[bytes, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        src, dst = root / "src", root / "dst"
        src.mkdir()
        write_tree(src, {p: d for p, (d, _) in tree.items()}, {p: m for p, (_, m) in tree.items()})
        store = Store(root / "store", threads=4)
        report = store.save(src, KEY)
        assert report.files == len(tree)
        assert report.bytes == sum(len(d) for d, _ in tree.values())
        if not tree:
            assert report.manifest is None
            with pytest.raises(NotFound):
                store.load(KEY, dst)
            return
        loaded = store.load(KEY, dst)
        assert loaded.written == len(tree) and loaded.missing == []
        assert read_tree(dst) == tree
        assert temp_files(dst) == [] and temp_files(root / "store") == []


# --- dedup and incremental saves ---------------------------------------------------------


def test_resave_of_unchanged_tree_stores_nothing(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_tree(src, {f"d{i}/f{i}": os.urandom(1000 * i) for i in range(20)})
    first = store.save(src, KEY)
    assert first.new_chunks > 0 and first.manifest is not None
    again = store.save(src, KEY)
    assert (again.new_chunks, again.new_bytes, again.manifest) == (0, 0, None)
    assert len(manifest_files(store.backend.root)) == 1  # type: ignore[attr-defined]


def test_one_byte_edit_in_100mb_file_stores_under_1mb(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    data = bytearray(random.Random(3).randbytes(100 * 2**20))
    write_tree(src, {"big.bin": bytes(data)})
    first = store.save(src, KEY)
    assert first.new_bytes == len(data)
    data[50 * 2**20] ^= 0xFF
    (src / "big.bin").write_bytes(bytes(data))
    second = store.save(src, KEY)
    assert second.changed_files == 1
    assert 0 < second.new_bytes < 2**20
    dst = tmp_path / "dst"
    store.load(KEY, dst)
    assert (dst / "big.bin").read_bytes() == bytes(data)


def test_same_bytes_in_two_keys_are_stored_once(store: Store, tmp_path: Path) -> None:
    shared = os.urandom(3 * 2**20)
    write_tree(tmp_path / "a", {"pch.h.gch": shared, "a.py": b"model a"})
    write_tree(tmp_path / "b", {"other/pch.h.gch": shared, "b.py": b"model b"})
    ra = store.save(tmp_path / "a", CacheKey(torch="t", arch="x", model="a"))
    rb = store.save(tmp_path / "b", CacheKey(torch="t", arch="x", model="b"))
    assert ra.new_bytes == len(shared) + len(b"model a")
    assert rb.new_bytes == len(b"model b")


def test_later_saves_add_files_without_losing_earlier_ones(store: Store, tmp_path: Path) -> None:
    """Two replicas save different graphs under one key; a loader sees both."""
    write_tree(tmp_path / "r1", {"fx/a": b"graph a", "common": b"same"})
    write_tree(tmp_path / "r2", {"fx/b": b"graph b", "common": b"same"})
    store.save(tmp_path / "r1", KEY)
    second = store.save(tmp_path / "r2", KEY)
    assert second.changed_files == 1  # only fx/b is new
    assert len(store.manifests(KEY)) == 2
    store.load(KEY, tmp_path / "dst")
    assert {p: d for p, (d, _) in read_tree(tmp_path / "dst").items()} == {
        "fx/a": b"graph a",
        "fx/b": b"graph b",
        "common": b"same",
    }


def test_newer_save_wins_for_a_changed_file(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"f": b"v1"})
    store.save(tmp_path / "src", KEY)
    write_tree(tmp_path / "src", {"f": b"version 2"})
    store.save(tmp_path / "src", KEY)
    store.load(KEY, tmp_path / "dst")
    assert (tmp_path / "dst" / "f").read_bytes() == b"version 2"


def test_size_cap_is_enforced_before_upload(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"a": os.urandom(600_000), "b": os.urandom(600_000)})
    with pytest.raises(CacheTooLarge, match="nothing was uploaded"):
        store.save(tmp_path / "src", KEY, max_bytes=2**20)
    assert pack_files(tmp_path / "store") == []
    assert manifest_files(tmp_path / "store") == []


def test_special_files_are_skipped_never_followed(store: Store, tmp_path: Path) -> None:
    outside = tmp_path / "secret"
    outside.write_bytes(b"do not copy")
    src = tmp_path / "src"
    write_tree(src, {"real": b"data"})
    os.symlink(outside, src / "link_to_file")
    os.symlink(tmp_path, src / "link_to_dir")
    os.mkfifo(src / "fifo")
    os.mknod(src / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    report = store.save(src, KEY)
    assert report.files == 1
    assert sorted(report.skipped) == [
        ("fifo", "special file"),
        ("link_to_dir", "symlink"),
        ("link_to_file", "symlink"),
        ("null", "special file"),
    ]
    assert list(store.files(KEY)) == ["real"]


def test_non_utf8_names_are_skipped(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_bytes(b"1")
    with open(os.path.join(os.fsencode(src), b"bad\xff"), "wb") as fh:
        fh.write(b"2")
    report = store.save(src, KEY)
    assert report.files == 1
    assert report.skipped and report.skipped[0][1] == "name is not valid UTF-8"


def test_temp_files_in_the_source_are_not_saved(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"a": b"1", f"{constants.TEMP_PREFIX}partial": b"junk"})
    store.save(tmp_path / "src", KEY)
    assert list(store.files(KEY)) == ["a"]


def test_file_growing_during_save_is_never_saved_torn(store: Store, tmp_path: Path) -> None:
    """A compiler still appending to a file: the save skips it or stores a stable snapshot."""
    src = tmp_path / "src"
    src.mkdir()
    grow = src / "growing.so"
    block = os.urandom(2**20)
    stop = threading.Event()
    started = threading.Event()

    def writer() -> None:
        with open(grow, "ab") as fh:
            while not stop.is_set():
                fh.write(block)
                fh.flush()
                started.set()

    t = threading.Thread(target=writer)
    t.start()
    assert started.wait(10)
    try:
        report = store.save(src, KEY)
    finally:
        stop.set()
        t.join()
    final = grow.read_bytes()
    if report.manifest is not None:
        store.load(KEY, tmp_path / "dst")
        saved = (tmp_path / "dst" / "growing.so").read_bytes()
        assert final.startswith(saved) and len(saved) % len(block) == 0
    else:
        assert report.skipped == [("growing.so", "changed while being read")]


# --- load ---------------------------------------------------------------------------------


def test_unknown_key_raises_not_found(store: Store, tmp_path: Path) -> None:
    with pytest.raises(NotFound) as e:
        store.load(KEY, tmp_path / "dst")
    assert isinstance(e.value, LookupError) and isinstance(e.value, CasstoreError)


def test_load_skips_identical_and_replaces_different_files(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"same": b"same", "changed": b"new", "mode": b"m"})
    os.chmod(tmp_path / "src" / "mode", 0o755)
    store.save(tmp_path / "src", KEY)
    dst = tmp_path / "dst"
    write_tree(dst, {"same": b"same", "changed": b"old!", "mode": b"m", "extra": b"kept"})
    report = store.load(KEY, dst)
    assert (report.written, report.skipped) == (1, 2)
    assert (dst / "changed").read_bytes() == b"new"
    assert stat.S_IMODE(os.stat(dst / "mode").st_mode) == 0o755
    assert (dst / "extra").read_bytes() == b"kept"


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077, 0o777])
def test_load_gives_every_file_its_saved_mode_whatever_the_umask(
    store: Store, tmp_path: Path, umask: int
) -> None:
    """Temp files are made with the saved mode where the umask lets them (no chmod after):
    whatever the umask, every restored file ends with its saved mode, a read-only file of
    several chunks included (its owner reopens it for each chunk), into a new destination
    and over stale files alike."""
    modes = {"rw": 0o644, "group": 0o664, "exe": 0o755, "private": 0o600, "ro": 0o444}
    files = {name: random.Random(name).randbytes(100 + 10_000 * i) for i, name in enumerate(modes)}
    files["ro"] = random.Random(7).randbytes(3 * 2**20)  # several chunks
    write_tree(tmp_path / "src", files)
    for name, mode in modes.items():
        os.chmod(tmp_path / "src" / name, mode)
    store.save(tmp_path / "src", KEY)
    stale = tmp_path / "stale"
    write_tree(stale, dict.fromkeys(modes, b"old"))
    before = os.umask(umask)
    try:
        for dst in (tmp_path / "new" / "dst", stale):
            report = store.load(KEY, dst)
            assert report.missing == [] and report.written == len(modes)
            for name, mode in modes.items():
                assert stat.S_IMODE(os.stat(dst / name).st_mode) == mode, (dst, name)
                assert (dst / name).read_bytes() == files[name]
    finally:
        os.umask(before)


def _flip_byte(path: Path, index: int) -> None:
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[index % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupt_or_missing_chunks_never_yield_wrong_bytes(store: Store, tmp_path: Path) -> None:
    rng = random.Random(11)
    tree = {f"f{i}": rng.randbytes(rng.choice([10, 5000, 200_000, 1_200_000])) for i in range(12)}
    write_tree(tmp_path / "src", tree)
    store.save(tmp_path / "src", KEY)
    chunks = sorted({c.digest for f in store.files(KEY).values() for c in f.chunks})
    for i, c in enumerate(rng.sample(chunks, 6)):
        if i % 2:
            lose_chunk(store.backend, c)
        else:
            corrupt_chunk(store.backend, c)
    dst = tmp_path / "dst"
    report = store.load(KEY, dst)
    assert report.missing, "damaged chunks must make some files a miss"
    restored = {p: d for p, (d, _) in read_tree(dst).items()}
    assert set(restored) == set(tree) - set(report.missing)
    for p, d in restored.items():
        assert d == tree[p]
    assert temp_files(dst) == []


def test_every_single_byte_corruption_is_caught(store: Store, tmp_path: Path) -> None:
    """Flip each byte of a stored pack in turn: the load reports a miss every time."""
    write_tree(tmp_path / "src", {"f": os.urandom(3000)})
    store.save(tmp_path / "src", KEY)
    (chunk,) = pack_files(tmp_path / "store")
    original = chunk.read_bytes()
    for i in range(len(original)):
        _flip_byte(chunk, i)
        dst = tmp_path / f"dst{i % 2}"
        report = store.load(KEY, dst)
        assert report.missing == ["f"] and not (dst / "f").exists()
        chunk.write_bytes(original)


def _put_raw_manifest(store: Store, key: CacheKey, files: list[dict[str, object]]) -> None:
    doc = msgspec.to_builtins(mf.new_manifest(key, []))
    doc["files"] = files
    name = f"{constants.MANIFESTS_DIR}/{key.id}/{mf.new_manifest_name(doc['created_at'])}"
    store.backend.put_if_absent(name, mf.seal(msgspec.msgpack.encode(doc)))


@pytest.mark.parametrize(
    "path", ["../escape", "ABSOLUTE", "a/../../escape", "../../../escape", "./x", "a//b"]
)
def test_hostile_manifest_writes_nothing_outside(store: Store, tmp_path: Path, path: str) -> None:
    if path == "ABSOLUTE":  # a fresh absolute target, so its absence proves something
        path = f"{tempfile.gettempdir()}/casstore-escape-{os.getpid()}-{random.random()}"
    dest = tmp_path / "dst" / "inner"
    # Exactly where a loader that followed the path would have written it.
    target = Path(os.path.normpath(os.path.join(dest, path)))
    write_tree(tmp_path / "src", {"payload": b"evil"})
    good = store.save(tmp_path / "src", CacheKey(torch="t", arch="a", model="donor"))
    entry = msgspec.to_builtins(store.files(good.key)["payload"], builtin_types=(bytes,))
    entry["path"] = path
    _put_raw_manifest(store, KEY, [entry])
    before = set(tmp_path.rglob("*"))
    try:
        store.load(KEY, dest)
        refused = False
    except InvalidManifest:
        refused = True
    # The places first: they are what the promise is about.
    assert not target.exists() and not target.is_symlink(), f"wrote {target}"
    new = set(tmp_path.rglob("*")) - before
    assert [p for p in new if p != dest and dest not in p.parents] == []
    assert refused


def test_invalid_manifest_beside_a_good_one_is_ignored(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"good": b"fine"})
    store.save(tmp_path / "src", KEY)
    _put_raw_manifest(
        store,
        KEY,
        [{"path": "../evil", "size": 0, "mode": 0o644, "digest": b"\0" * 32, "chunks": []}],
    )
    report = store.load(KEY, tmp_path / "dst")
    assert report.written == 1 and report.manifests == 1
    assert not (tmp_path / "evil").exists()


def test_manifest_of_another_key_is_never_served(store: Store, tmp_path: Path) -> None:
    """A manifest saved for one arch, copied under another key's id, is refused."""
    write_tree(tmp_path / "src", {"kernel.so": b"avx512 code"})
    avx512 = CacheKey(torch="t", arch="x86-64-v4-aaaa", model="m")
    avx2 = CacheKey(torch="t", arch="x86-64-v3-bbbb", model="m")
    r = store.save(tmp_path / "src", avx512)
    assert r.manifest is not None
    blob = store.backend.get(r.manifest)
    store.backend.put_if_absent(f"{constants.MANIFESTS_DIR}/{avx2.id}/x.manifest", blob)
    with pytest.raises(InvalidManifest, match="invalid"):
        store.load(avx2, tmp_path / "dst")
    assert not (tmp_path / "dst" / "kernel.so").exists()


def test_symlinked_parent_in_destination_is_refused(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"sub/file": b"payload", "top": b"ok"})
    store.save(tmp_path / "src", KEY)
    outside = tmp_path / "outside"
    outside.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(outside, dst / "sub")
    report = store.load(KEY, dst)
    assert report.missing == ["sub/file"]
    assert list(outside.iterdir()) == []
    assert (dst / "top").read_bytes() == b"ok"


def test_symlink_at_target_is_replaced_not_followed(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"f": b"cache bytes"})
    store.save(tmp_path / "src", KEY)
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    dst = tmp_path / "dst"
    dst.mkdir()
    os.symlink(victim, dst / "f")
    store.load(KEY, dst)
    assert victim.read_bytes() == b"untouched"
    assert not (dst / "f").is_symlink() and (dst / "f").read_bytes() == b"cache bytes"


def test_directory_in_the_way_is_a_miss(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"f": b"x", "g": b"y"})
    store.save(tmp_path / "src", KEY)
    (tmp_path / "dst" / "f").mkdir(parents=True)
    report = store.load(KEY, tmp_path / "dst")
    assert report.missing == ["f"] and report.written == 1


# --- store layout --------------------------------------------------------------------------


def test_store_with_other_chunker_params_is_refused(tmp_path: Path) -> None:
    Store(tmp_path / "s")
    layout = tmp_path / "s" / constants.LAYOUT_FILE
    doc = json.loads(layout.read_text())
    doc["chunker"]["avg_size"] = 65536
    layout.write_text(json.dumps(doc))
    with pytest.raises(FormatMismatch, match="chunk the same way"):
        Store(tmp_path / "s")
    doc["format"] = 99
    layout.write_text(json.dumps(doc))
    with pytest.raises(FormatMismatch, match="format 99"):
        Store(tmp_path / "s")


def test_opening_a_file_as_root_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(CasstoreError, match="not a directory"):
        Store(tmp_path / "file")


def test_keys_listing_and_resolve(store: Store, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"a": b"1"})
    k1 = CacheKey(torch="t", arch="a", model="one")
    k2 = CacheKey(torch="t", arch="a", model="two")
    store.save(tmp_path / "src", k1)
    store.save(tmp_path / "src", k2)
    infos = {i.key: i for i in store.keys()}
    assert set(infos) == {k1, k2} and infos[k1].files == 1
    assert store.resolve(k2.id[:8]) == k2
    with pytest.raises(NotFound):
        store.resolve("ffffffffffff")


# --- concurrency across processes -----------------------------------------------------------

_SAVER = """
import sys
from pathlib import Path
from casstore import Store, CacheKey
store = Store(sys.argv[1], threads=4)
key = CacheKey(torch="t", arch="a", model=sys.argv[3])
for _ in range(3):
    store.save(sys.argv[2], key, lock_timeout=0)
"""


def test_two_processes_saving_concurrently_both_load_intact(tmp_path: Path) -> None:
    rng = random.Random(5)
    shared = rng.randbytes(4 * 2**20)  # both trees share chunks: the publishes race
    trees = {}
    for name in ("one", "two"):
        tree = {f"{name}/{i}": rng.randbytes(rng.randrange(1, 400_000)) for i in range(30)}
        tree["shared.bin"] = shared
        write_tree(tmp_path / name, tree)
        trees[name] = tree
    store_root = tmp_path / "store"
    procs = [
        subprocess.Popen([sys.executable, "-c", _SAVER, str(store_root), str(tmp_path / n), n])
        for n in trees
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    store = Store(store_root)
    for name, tree in trees.items():
        dst = tmp_path / f"dst-{name}"
        report = store.load(CacheKey(torch="t", arch="a", model=name), dst)
        assert report.missing == []
        assert {p: d for p, (d, _) in read_tree(dst).items()} == tree
    assert temp_files(store_root) == []


def test_merge_tie_goes_to_the_newest_name(store: Store, tmp_path: Path) -> None:
    """Two manifests with the same time name one path: the later name wins
    (docs/format.md), whatever order the listing returns them in."""
    when = 1_800_000_000.0
    for tag, data in (("aaaa", b"from the first name"), ("ffff", b"from the last name")):
        src = tmp_path / f"src-{tag}"
        write_tree(src, {"graph.py": data})
        store.save(src, KEY)
        (name,) = [p for p in manifest_files(tmp_path / "store") if not p.stem.endswith("aaaa")]
        m = mf.decode(name.read_bytes())
        name.unlink()
        tied = msgspec.structs.replace(m, created_at=when)
        store.backend.put_if_absent(
            f"{constants.MANIFESTS_DIR}/{KEY.id}/{int(when * 1e9):020d}-{tag}.manifest",
            mf.encode(tied),
        )
    store.load(KEY, tmp_path / "dst")
    assert (tmp_path / "dst" / "graph.py").read_bytes() == b"from the last name"


def test_an_unchanged_file_never_uploads_bytes_under_a_digest_they_do_not_have(
    store: Store, tmp_path: Path
) -> None:
    """A manifest whose file digest matches the local file but whose chunk list lies (a
    hostile or buggy writer): the saver must not store the local bytes under the listed
    chunk digest, and the key must load correct bytes afterwards."""
    data = os.urandom(50_000)
    write_tree(tmp_path / "src", {"f.so": data})
    lie = mf.ChunkRef(chunking.digest(b"other bytes"), len(data))
    m = mf.new_manifest(
        KEY, [mf.FileEntry("f.so", len(data), 0o644, chunking.digest(data), (lie,))]
    )
    store.backend.put_if_absent(
        f"{constants.MANIFESTS_DIR}/{KEY.id}/{mf.new_manifest_name(m.created_at)}", mf.encode(m)
    )
    store.save(tmp_path / "src", KEY)
    assert audit.verify(store).corrupt == []
    assert store.load(KEY, tmp_path / "dst").missing == []
    assert (tmp_path / "dst" / "f.so").read_bytes() == data


def test_large_files_are_streamed_not_read_whole(store: Store, tmp_path: Path) -> None:
    """A save's memory is bounded by the size of a pack, whatever the size of a file:
    saving a file twice as large does not raise the peak."""
    peaks = []
    for n, size in enumerate((48 * 2**20, 96 * 2**20)):
        src = tmp_path / f"src{n}"
        src.mkdir()
        with open(src / "big.bin", "wb") as fh:
            for _ in range(size // 2**20):
                fh.write(os.urandom(2**20))
        tracemalloc.start()
        try:
            report = store.save(src, KEY)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert report.new_bytes == size
        peaks.append(peak)
    bound = 5 * constants.PACK_TARGET
    assert peaks[1] < bound, f"peak {peaks[1] / 2**20:.1f} MiB saving a 96 MiB file"
    assert peaks[1] < 1.25 * peaks[0], f"peaks {[p / 2**20 for p in peaks]} MiB grow with size"
    src = tmp_path / "src1"
    view = store.files(KEY)["big.bin"]
    assert [(c.digest, c.size) for c in view.chunks] == [
        (c.digest, c.length) for c in chunking.cut((src / "big.bin").read_bytes())
    ]
    store.load(KEY, tmp_path / "dst")
    assert (tmp_path / "dst" / "big.bin").read_bytes() == (src / "big.bin").read_bytes()


def test_a_save_records_use_of_its_key(store: Store, tmp_path: Path) -> None:
    """gc ages keys by last use: a replica that saves (even nothing new) uses the key."""
    write_tree(tmp_path / "src", {"a": b"1"})
    store.save(tmp_path / "src", KEY)
    marker = tmp_path / "store" / Store.access_key(KEY.id)
    assert marker.exists()
    os.utime(marker, (1000, 1000))
    assert store.save(tmp_path / "src", KEY).manifest is None
    assert marker.stat().st_mtime > 1000


def test_a_miss_leaves_the_target_exactly_as_it_was(store: Store, tmp_path: Path) -> None:
    """docs/format.md: a file that cannot be restored leaves the target as it was (here an
    older version from an earlier load), never removed, truncated or half-written."""
    write_tree(tmp_path / "v1", {"g.so": b"version one" * 1000})
    store.save(tmp_path / "v1", KEY)
    store.load(KEY, tmp_path / "dst")
    write_tree(tmp_path / "v2", {"g.so": os.urandom(700_000)})
    store.save(tmp_path / "v2", KEY)
    v2_chunks = store.files(KEY)["g.so"].chunks
    lose_chunk(store.backend, v2_chunks[-1].digest)
    report = store.load(KEY, tmp_path / "dst")
    assert report.missing == ["g.so"]
    assert (tmp_path / "dst" / "g.so").read_bytes() == b"version one" * 1000
    assert temp_files(tmp_path / "dst") == []


def test_a_save_that_would_grow_the_key_past_the_cap_is_refused(
    store: Store, tmp_path: Path
) -> None:
    """The cap applies to the key as loads will see it (the merged view), not only to one
    replica's tree: otherwise two replicas under the cap make a key no load may restore."""
    cap = 1_000_000
    write_tree(tmp_path / "one", {"one.so": os.urandom(600_000)})
    write_tree(tmp_path / "two", {"two.so": os.urandom(600_000)})
    store.save(tmp_path / "one", KEY, max_bytes=cap)
    chunks = pack_files(tmp_path / "store")
    with pytest.raises(CacheTooLarge, match="key would hold"):
        store.save(tmp_path / "two", KEY, max_bytes=cap)
    assert pack_files(tmp_path / "store") == chunks  # nothing uploaded
    assert store.load(KEY, tmp_path / "dst", max_bytes=cap).missing == []


def test_a_special_file_in_place_of_a_chunk_never_hangs_a_load(
    store: Store, tmp_path: Path
) -> None:
    write_tree(tmp_path / "src", {"f": os.urandom(5000)})
    store.save(tmp_path / "src", KEY)
    (chunk,) = pack_files(tmp_path / "store")
    chunk.unlink()
    os.mkfifo(chunk)
    result: list[object] = []
    t = threading.Thread(target=lambda: result.append(store.load(KEY, tmp_path / "dst")))
    t.daemon = True
    t.start()
    t.join(20)
    assert result, "the load hung on a FIFO"
    assert audit.verify(store).corrupt or audit.verify(store).missing_chunks


def test_an_unrenewable_chunk_is_never_republished_from_unverified_bytes(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lying chunk list (the file's digest matches, a chunk's does not) plus a chunk this
    user cannot renew: the local bytes must not replace the shared chunk."""
    victim_data = os.urandom(30_000)  # under the minimum chunk: always one chunk
    write_tree(tmp_path / "victim", {"v.so": victim_data})
    victim = CacheKey(torch="t", arch="a", model="victim")
    store.save(tmp_path / "victim", victim)
    (ref,) = store.files(victim)["v.so"].chunks
    data = os.urandom(50_000)
    write_tree(tmp_path / "src", {"f.so": data})
    lie = mf.ChunkRef(ref.digest, len(data))
    m = mf.new_manifest(
        KEY, [mf.FileEntry("f.so", len(data), 0o644, chunking.digest(data), (lie,))]
    )
    store.backend.put_if_absent(
        f"{constants.MANIFESTS_DIR}/{KEY.id}/{mf.new_manifest_name(m.created_at)}", mf.encode(m)
    )

    def cannot_renew(key: str) -> bool:
        if key.startswith(constants.PACKS_DIR) and store.backend.stat(key) is not None:
            raise CannotRenew(f"cannot renew {key}", key=key)
        return store.backend.stat(key) is not None

    monkeypatch.setattr(store.backend, "refresh", cannot_renew)
    store.save(tmp_path / "src", KEY)
    monkeypatch.undo()
    assert audit.verify(store).corrupt == []
    assert store.load(victim, tmp_path / "v").missing == []
    assert (tmp_path / "v" / "v.so").read_bytes() == victim_data


def test_a_save_refused_by_the_cap_records_no_use(store: Store, tmp_path: Path) -> None:
    """A key over the cap (two hosts saving at once, or deployments with different caps)
    must be able to age out: a refused save is not a use."""
    write_tree(tmp_path / "one", {"one.so": os.urandom(600_000)})
    write_tree(tmp_path / "two", {"two.so": os.urandom(600_000)})
    store.save(tmp_path / "one", KEY)
    marker = tmp_path / "store" / Store.access_key(KEY.id)
    os.utime(marker, (1000, 1000))
    with pytest.raises(CacheTooLarge):
        store.save(tmp_path / "two", KEY, max_bytes=1_000_000)
    assert marker.stat().st_mtime == 1000


def test_a_fresh_volume_root_with_a_private_lost_and_found_is_a_new_store(
    tmp_path: Path,
) -> None:
    root = tmp_path / "volume"
    (root / "lost+found").mkdir(parents=True)
    (root / "lost+found" / "#1234").write_bytes(b"fsck found this")
    os.chmod(root / "lost+found", 0o700)
    (root / f"{constants.TEMP_PREFIX}crashed").write_bytes(b"a crashed first save")
    Store(root)  # no error: nothing of anyone's is there
    assert (root / constants.LAYOUT_FILE).exists()


def test_resolving_a_key_id_prefix_reads_only_the_matching_keys(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`load --key PREFIX` reads the manifests of the keys whose id starts with the
    prefix, not every manifest of the store."""
    write_tree(tmp_path / "src", {"a.py": b"a" * 5000})
    keys = [CacheKey(torch="t", arch="a", model=f"m{i}") for i in range(5)]
    for k in keys:
        store.save(tmp_path / "src", k)
    read: list[str] = []
    real = store.read_manifests

    def counting(key_id: str, key: CacheKey | None = None):  # type: ignore[no-untyped-def]
        read.append(key_id)
        return real(key_id, key)

    monkeypatch.setattr(store, "read_manifests", counting)
    wanted = keys[3]
    assert store.resolve(wanted.id[:12]) == wanted
    assert read == [wanted.id]
    with pytest.raises(NotFound):
        store.resolve("zz")


def test_a_file_swapped_for_a_fifo_after_the_scan_never_hangs_a_save(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Between the scan and the read, a file becomes a FIFO no one writes to: opening it
    must not wait for a writer; the save goes on without it."""
    write_tree(tmp_path / "src", {"a.py": b"a" * 5000, "b.py": b"b" * 5000})
    real_scan = localfs.scan_tree

    def scan_then_swap(*args, **kwargs):  # type: ignore[no-untyped-def]
        found = list(real_scan(*args, **kwargs))
        os.unlink(tmp_path / "src/b.py")
        os.mkfifo(tmp_path / "src/b.py")
        return iter(found)

    monkeypatch.setattr(localfs, "scan_tree", scan_then_swap)
    done: list[object] = []
    saver = threading.Thread(target=lambda: done.append(store.save(tmp_path / "src", KEY)))
    saver.daemon = True
    saver.start()
    saver.join(timeout=30)
    if saver.is_alive():  # let the blocked open go, so the thread ends
        os.close(os.open(tmp_path / "src/b.py", os.O_WRONLY | os.O_NONBLOCK))
    assert done, "the save hung opening a FIFO"
    assert set(store.files(KEY)) == {"a.py"}

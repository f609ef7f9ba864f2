"""Loads that must not leave a half-restored unit behind, nor write more than a cap allows:
``Store.load(..., group=...)`` restores each group all-or-nothing, ``max_bytes`` refuses an
oversized (or hostile) key before anything is written, and partial restores are logged."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

from casstore import CacheKey, CacheTooLarge, Store, constants
from casstore import manifest as mf
from casstore.backends.fs import FileSystemBackend
from casstore.manifest import ChunkRef, FileEntry
from tests.helpers import KEY, lose_chunk, read_tree, temp_files, write_tree


def by_top_dir(path: str) -> str | None:
    """Group files under ``g*/`` by that directory; everything else is on its own."""
    top = path.split("/", 1)[0]
    return top if top.startswith("g") and "/" in path else None


def blob(rng: random.Random, size: int) -> bytes:
    return rng.randbytes(size)


@pytest.fixture
def grouped(tmp_path: Path) -> tuple[Store, dict[str, bytes]]:
    rng = random.Random(11)
    tree = {
        "g1/index.py": b"names g1/artifact.bin and g1/sub/more.bin",
        "g1/artifact.bin": blob(rng, 700_000),  # several chunks
        "g1/sub/more.bin": blob(rng, 3_000),
        "g2/index.py": b"names g2/artifact.bin",
        "g2/artifact.bin": blob(rng, 5_000),
        "loose/one.bin": blob(rng, 4_000),
        "loose/two.bin": blob(rng, 4_000),
    }
    write_tree(tmp_path / "src", tree)
    store = Store(tmp_path / "store", threads=4)
    store.save(tmp_path / "src", KEY)
    return store, tree


def drop_chunk(store: Store, path: str, index: int = 0) -> None:
    """Lose one chunk that ``path`` (and only it) needs."""
    lose_chunk(store.backend, store.files(KEY)[path].chunks[index].digest)


def restored(dest: Path) -> dict[str, bytes]:
    return {p: d for p, (d, _) in read_tree(dest).items()}


def test_a_group_with_a_missing_chunk_is_not_restored_at_all(
    tmp_path: Path, grouped: tuple[Store, dict[str, bytes]]
) -> None:
    store, tree = grouped
    drop_chunk(store, "g1/artifact.bin", index=1)
    dest = tmp_path / "dst"
    report = store.load(KEY, dest, group=by_top_dir)
    g1 = sorted(p for p in tree if p.startswith("g1/"))
    assert report.missing == g1
    got = restored(dest)
    assert not any(p.startswith("g1/") for p in got), "no file of a failed group is written"
    assert got == {p: d for p, d in tree.items() if not p.startswith("g1/")}
    assert report.written == len(tree) - len(g1) and report.skipped == 0
    assert temp_files(dest) == []


def test_ungrouped_files_are_still_restored_one_by_one(
    tmp_path: Path, grouped: tuple[Store, dict[str, bytes]]
) -> None:
    store, _tree = grouped
    drop_chunk(store, "g1/artifact.bin")
    report = store.load(KEY, tmp_path / "dst")  # no group: only the damaged file is missing
    assert report.missing == ["g1/artifact.bin"]
    assert "g1/index.py" in restored(tmp_path / "dst")


def test_identical_local_files_count_as_fetched(
    tmp_path: Path, grouped: tuple[Store, dict[str, bytes]]
) -> None:
    store, tree = grouped
    dest = tmp_path / "dst"
    write_tree(dest, {"g2/index.py": tree["g2/index.py"]})
    report = store.load(KEY, dest, group=by_top_dir)
    assert report.missing == []
    assert report.skipped == 1 and report.written == len(tree) - 1
    assert restored(dest) == tree


def test_a_failed_group_leaves_local_files_alone_and_reports_all_of_them(
    tmp_path: Path, grouped: tuple[Store, dict[str, bytes]]
) -> None:
    store, tree = grouped
    dest = tmp_path / "dst"
    write_tree(dest, {"g2/index.py": tree["g2/index.py"]})
    drop_chunk(store, "g2/artifact.bin")
    report = store.load(KEY, dest, group=by_top_dir)
    assert report.missing == ["g2/artifact.bin", "g2/index.py"]
    got = restored(dest)
    assert got["g2/index.py"] == tree["g2/index.py"]  # was there before: untouched
    assert "g2/artifact.bin" not in got
    assert temp_files(dest) == []


def test_partial_restore_is_a_warning_with_counts(
    tmp_path: Path, grouped: tuple[Store, dict[str, bytes]], caplog: pytest.LogCaptureFixture
) -> None:
    store, tree = grouped
    drop_chunk(store, "loose/one.bin")
    with caplog.at_level(logging.INFO, logger="casstore"):
        store.load(KEY, tmp_path / "dst")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        f"restored {len(tree) - 1} of {len(tree)} files, 1 missing" in w for w in warnings
    ), warnings


# --- size cap ------------------------------------------------------------------------------


def test_max_bytes_refuses_before_creating_the_destination(
    tmp_path: Path, grouped: tuple[Store, dict[str, bytes]]
) -> None:
    store, tree = grouped
    total = sum(len(d) for d in tree.values())
    dest = tmp_path / "a" / "dst"
    with pytest.raises(CacheTooLarge):
        store.load(KEY, dest, max_bytes=total - 1)
    assert not (tmp_path / "a").exists()
    report = store.load(KEY, dest, max_bytes=total)  # at the cap: fine
    assert report.missing == [] and restored(dest) == tree


def test_hostile_manifest_repeating_one_chunk_writes_nothing(tmp_path: Path) -> None:
    """One real 20 kB chunk listed 100,000 times: a 2 GB file from a 20 kB store."""
    store = Store(tmp_path / "store", threads=4)
    write_tree(tmp_path / "src", {"seed": os.urandom(20_000)})
    store.save(tmp_path / "src", KEY)
    (ref,) = store.files(KEY)["seed"].chunks
    n = 100_000
    hostile = [FileEntry(f"huge{i}", n * ref.size, 0o644, b"\1" * 32, (ref,) * n) for i in range(3)]
    m = mf.new_manifest(KEY, hostile)
    name = f"{constants.MANIFESTS_DIR}/{KEY.id}/{mf.new_manifest_name(m.created_at)}"
    store.backend.put_if_absent(name, mf.encode(m))
    dest = tmp_path / "dst"
    with pytest.raises(CacheTooLarge, match="MiB"):
        store.load(KEY, dest, max_bytes=64 * 2**20)
    assert not dest.exists()


def test_a_group_publishes_its_deepest_files_first(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's index (vllm_compile_cache.py) sits above the inductor artifacts it names: if
    a group's renames stop midway, the index must not be the one that made it."""
    rng = random.Random(3)
    unit = "torch_compile_cache/abc/rank_0_0/backbone"
    files = {
        f"{unit}/vllm_compile_cache.py": blob(rng, 500),
        f"{unit}/inductor_cache/fx/ab/entry": blob(rng, 40_000),
        f"{unit}/inductor_cache/triton/cd/k.cubin": blob(rng, 9_000),
        f"{unit}/computation_graph.py": blob(rng, 700),
    }
    write_tree(tmp_path / "src", files)
    store.save(tmp_path / "src", KEY)
    order: list[str] = []
    real_replace = os.replace

    def replace(src: str, dst: str) -> None:
        if Path(dst).is_relative_to(tmp_path / "dst"):  # not this host's record of them
            order.append(os.path.relpath(dst, tmp_path / "dst"))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    store.load(KEY, tmp_path / "dst", group=lambda p: p.split("/", 2)[1])
    monkeypatch.undo()
    assert sorted(order) == sorted(files)
    depths = [p.count("/") for p in order]
    assert depths == sorted(depths, reverse=True), order


# --- what a load reads ------------------------------------------------------------------


class CountingBackend(FileSystemBackend):
    """A filesystem backend counting the pack reads."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.pack_reads = 0

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        if key.startswith(constants.PACKS_DIR + "/"):
            self.pack_reads += 1
        return super().get_ranges(key, ranges)


@pytest.mark.parametrize("first_missing", [0, 100])
def test_a_file_listing_thousands_of_missing_chunks_costs_no_reads(
    tmp_path: Path, first_missing: int
) -> None:
    """A manifest's file lists one real chunk ``first_missing`` times, then 20,000 chunks
    the store lacks: the chunk index says they are missing before anything is read, so
    the load reads at most the one block holding the real chunk, once, and writes
    nothing."""
    backend = CountingBackend(tmp_path / "store")
    backend.ensure_root()
    store = Store(backend=backend, threads=2)
    seed = CacheKey(torch="t", arch="a", model="seed")  # a real chunk, under another key
    write_tree(tmp_path / "src", {"seed": os.urandom(3000)})
    store.save(tmp_path / "src", seed)
    (real,) = store.files(seed)["seed"].chunks
    lost = [ChunkRef(bytes([i % 251 + 1]) * 32, real.size) for i in range(20_000)]
    chunks = (real,) * first_missing + tuple(lost)
    entry = FileEntry("huge", len(chunks) * real.size, 0o644, b"\1" * 32, chunks)
    m = mf.new_manifest(KEY, [entry])
    name = f"{constants.MANIFESTS_DIR}/{KEY.id}/{mf.new_manifest_name(m.created_at)}"
    store.backend.put_if_absent(name, mf.encode(m))
    report = store.load(KEY, tmp_path / "dst")
    assert report.missing == ["huge"]
    assert backend.pack_reads <= (1 if first_missing else 0)
    assert list((tmp_path / "dst").iterdir()) == []


def test_a_temp_file_that_cannot_be_made_costs_only_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Temp files are made by the threads that bring each file's first chunk: one that
    cannot be made (a directory this user may not write, say) fails that file alone; the
    others are restored and no temp file is left behind."""
    import casstore.store

    write_tree(tmp_path / "src", {"a/x.py": b"x" * 5000, "b/y.py": b"y" * 5000, "c": b""})
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    real_create = casstore.store._create_temp

    def create(parent: str) -> tuple[str, int]:
        if parent.endswith("/b"):
            raise PermissionError(13, "Permission denied", parent)
        return real_create(parent)

    monkeypatch.setattr(casstore.store, "_create_temp", create)
    report = Store(tmp_path / "store").load(KEY, tmp_path / "dst")
    assert report.missing == ["b/y.py"] and report.written == 2
    assert (tmp_path / "dst/a/x.py").read_bytes() == b"x" * 5000
    assert (tmp_path / "dst/c").read_bytes() == b""
    assert temp_files(tmp_path / "dst") == []


# --- How a restored file is written: its mode, and who may touch it before it is in place ---


def _posix_default_acl(directory: Path, other: int) -> None:
    """A default POSIX ACL on ``directory`` (user rwx, group rwx, other ``other``): files
    made in it take their mode from it, not from the umask."""
    undefined = 0xFFFFFFFF
    entries = ((0x01, 7), (0x04, 7), (0x20, other))  # ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER
    data = (2).to_bytes(4, "little") + b"".join(
        tag.to_bytes(2, "little") + perm.to_bytes(2, "little") + undefined.to_bytes(4, "little")
        for tag, perm in entries
    )
    os.setxattr(directory, "system.posix_acl_default", data)


def test_a_default_acl_does_not_change_the_saved_mode(tmp_path: Path) -> None:
    """A shared directory's default ACL (o::---, say) would strip bits the umask leaves: the
    restored files still get their saved mode exactly."""
    files = {f"f{i}": random.Random(i).randbytes(1000) for i in range(3)}
    write_tree(tmp_path / "src", files, dict.fromkeys(files, 0o644))
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    shared = tmp_path / "shared"
    shared.mkdir()
    _posix_default_acl(shared, other=0)
    before = os.umask(0o022)
    try:
        report = Store(tmp_path / "store").load(KEY, shared / "dst")
    finally:
        os.umask(before)
    assert report.missing == []
    assert {n: oct((shared / "dst" / n).stat().st_mode & 0o777) for n in files} == dict.fromkeys(
        files, "0o644"
    )


def test_a_umask_changed_during_a_load_does_not_change_the_saved_modes(tmp_path: Path) -> None:
    """Another thread of the caller's process tightens the umask while the load runs (the
    usual `os.umask(0o077)` around writing a secret): files still get their saved modes."""
    files = {f"f{i}": random.Random(i).randbytes(1000) for i in range(8)}
    write_tree(tmp_path / "src", files, dict.fromkeys(files, 0o644))
    Store(tmp_path / "store").save(tmp_path / "src", KEY)

    def tighten(done: int, total: int) -> None:
        os.umask(0o077)

    before = os.umask(0o022)
    try:
        report = Store(tmp_path / "store").load(KEY, tmp_path / "dst", progress=tighten)
    finally:
        os.umask(before)
    assert report.missing == []
    modes = {n: oct((tmp_path / "dst" / n).stat().st_mode & 0o777) for n in files}
    assert modes == dict.fromkeys(files, "0o644")


def test_a_temp_file_is_its_owners_alone_until_it_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file saved 0666 restored with umask 0 (a shared team directory): while its checked
    chunks are written, no one else may open its temp file to change them (the load records
    the file's state once in place, and would record those bytes as the entry)."""
    from casstore import restore

    write_tree(tmp_path / "src", {"f": random.Random(1).randbytes(3 << 20)}, {"f": 0o666})
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    seen: list[int] = []
    real = restore._write_all

    def spy(fd: int, data: bytes | memoryview, offset: int) -> None:
        seen.append(os.fstat(fd).st_mode & 0o777)
        real(fd, data, offset)

    monkeypatch.setattr(restore, "_write_all", spy)
    before = os.umask(0)
    try:
        Store(tmp_path / "store").load(KEY, tmp_path / "dst")
    finally:
        os.umask(before)
    assert len(seen) > 1 and set(seen) == {0o600}, seen
    assert (tmp_path / "dst/f").stat().st_mode & 0o777 == 0o666


def test_a_directory_put_in_a_groups_way_fails_the_group_before_any_of_it_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files of a group in a directory the load just made are still looked for: a directory
    another process makes in the way of one fails the whole group, none of it published."""
    from casstore import localfs

    write_tree(tmp_path / "src", {"grp/a/deep": b"A" * 100, "grp/b": b"B" * 100})
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    real = localfs.safe_parent

    def racing(dest: str, rel: str, *args: set[str]) -> str:
        parent = real(dest, rel, *args)
        if rel == "grp/b":  # made right after the load made grp/
            os.makedirs(os.path.join(parent, "b", "x"), exist_ok=True)
        return parent

    monkeypatch.setattr(localfs, "safe_parent", racing)
    report = Store(tmp_path / "store", threads=1).load(KEY, tmp_path / "dst", group=lambda p: "grp")
    assert sorted(report.missing) == ["grp/a/deep", "grp/b"]
    assert not (tmp_path / "dst/grp/a/deep").exists()
    assert temp_files(tmp_path / "dst") == []


def test_a_temp_file_removed_between_its_chunks_costs_only_its_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cleaner removes a temp file after its first chunk: that file is reported missing,
    the others are restored, and the load does not fail."""
    from casstore import restore

    big = random.Random(2).randbytes(3 << 20)  # several chunks
    write_tree(tmp_path / "src", {"big.bin": big, "small.py": b"s" * 500})
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    real = restore._write_all
    removed: list[str] = []

    def write_then_remove(fd: int, data: bytes | memoryview, offset: int) -> None:
        real(fd, data, offset)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not removed and os.path.getsize(path) > 100_000:  # big.bin's temp file
            removed.append(path)
            os.unlink(path)

    monkeypatch.setattr(restore, "_write_all", write_then_remove)
    report = Store(tmp_path / "store", threads=1).load(KEY, tmp_path / "dst")
    assert removed and report.missing == ["big.bin"]
    assert (tmp_path / "dst/small.py").read_bytes() == b"s" * 500
    assert temp_files(tmp_path / "dst") == []


def _victim(tmp_path: Path) -> Path:
    """A file of the loading user's outside the destination (0600, ten bytes): what a
    symlink someone else swaps into the destination would point the load at."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"V" * 10)
    victim.chmod(0o600)
    return victim


def _swap_for_symlink(path: str, victim: Path) -> None:
    """What whoever else can write the destination directory does to ``path``."""
    os.unlink(path)
    os.symlink(victim, path)


def _swap_for_symlink_after_first_write(monkeypatch: pytest.MonkeyPatch, victim: Path) -> list[str]:
    """Whoever else can write the destination directory replaces a temp file with a
    symlink to ``victim`` right after its first chunk is written."""
    from casstore import restore

    real = restore._write_all
    swapped: list[str] = []

    def write_then_swap(fd: int, data: bytes | memoryview, offset: int) -> None:
        real(fd, data, offset)
        path = os.readlink(f"/proc/self/fd/{fd}")
        if not swapped and "/dst/" in path:
            swapped.append(path)
            _swap_for_symlink(path, victim)

    monkeypatch.setattr(restore, "_write_all", write_then_swap)
    return swapped


def test_a_temp_file_swapped_for_a_symlink_is_not_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of several chunks reopens its temp file for each later chunk: one replaced by
    a symlink (to a file of the loading user's, outside the destination) is neither
    written through nor given the saved mode; that file alone is missing."""
    write_tree(
        tmp_path / "src",
        {"big.bin": random.Random(2).randbytes(3 << 20), "small.py": b"s" * 500},
        {"big.bin": 0o666},
    )
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    victim = _victim(tmp_path)
    swapped = _swap_for_symlink_after_first_write(monkeypatch, victim)
    report = Store(tmp_path / "store", threads=1).load(KEY, tmp_path / "dst")
    assert swapped
    assert victim.read_bytes() == b"V" * 10 and victim.stat().st_mode & 0o777 == 0o600
    assert report.missing == ["big.bin"] and not (tmp_path / "dst/big.bin").exists()
    assert (tmp_path / "dst/small.py").read_bytes() == b"s" * 500
    assert temp_files(tmp_path / "dst") == []


def test_a_grouped_temp_file_swapped_for_a_symlink_is_not_given_its_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grouped file's temp file waits for the rest of its group and is given its mode
    then: replaced by a symlink meanwhile, the file it points to keeps its mode, and the
    group is not restored."""
    import casstore.store

    write_tree(
        tmp_path / "src", {"g/a": b"a" * 100, "g/b": b"b" * 100}, {"g/a": 0o666, "g/b": 0o666}
    )
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    victim = _victim(tmp_path)
    real = casstore.store._Staged.give_mode

    def swap_then_give_mode(self: casstore.store._Staged, fd: int | None = None) -> None:
        if self.tmp is not None and fd is None and not os.path.islink(self.tmp):
            _swap_for_symlink(self.tmp, victim)
        real(self, fd)

    monkeypatch.setattr(casstore.store._Staged, "give_mode", swap_then_give_mode)
    report = Store(tmp_path / "store", threads=1).load(KEY, tmp_path / "dst", group=lambda p: "g")
    assert victim.stat().st_mode & 0o777 == 0o600
    assert sorted(report.missing) == ["g/a", "g/b"]
    assert not (tmp_path / "dst/g/a").is_symlink()


def test_bytes_changed_between_the_chmod_and_the_rename_are_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file saved 0664 becomes writable by its group when given its mode, just before the
    rename: a group member who writes then (within one timestamp tick) must not have those
    bytes recorded as the entry, or the next load would leave them in place as identical."""
    write_tree(tmp_path / "src", {"f": b"good" * 1000}, {"f": 0o664})
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    real_fchmod = os.fchmod

    def fchmod_then_tamper(fd: int, mode: int) -> None:
        real_fchmod(fd, mode)
        st = os.fstat(fd)
        os.pwrite(fd, b"EVIL", 0)  # the group member, allowed by the new bits
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))  # as if within the same tick

    monkeypatch.setattr(os, "fchmod", fchmod_then_tamper)
    Store(tmp_path / "store").load(KEY, tmp_path / "dst")
    monkeypatch.setattr(os, "fchmod", real_fchmod)
    assert (tmp_path / "dst/f").read_bytes()[:4] == b"EVIL"
    report = Store(tmp_path / "store").load(KEY, tmp_path / "dst")
    assert report.written == 1
    assert (tmp_path / "dst/f").read_bytes() == b"good" * 1000


def test_a_present_file_swapped_for_a_symlink_is_not_given_its_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file already in place with the saved bytes and another mode is given the saved
    mode: swapped for a symlink meanwhile (while it was hashed, while its group waited),
    the file the symlink points to keeps its mode."""
    import casstore.store

    write_tree(
        tmp_path / "src", {"g/a": b"a" * 100, "g/b": b"b" * 100}, {"g/a": 0o666, "g/b": 0o666}
    )
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    Store(tmp_path / "store").load(KEY, tmp_path / "dst")
    (tmp_path / "dst/g/a").chmod(0o600)  # or a copy of the same bytes, 0444, put there
    victim = _victim(tmp_path)
    real = casstore.store._Staged.publish

    def swap_then_publish(self: casstore.store._Staged, fd: int | None = None) -> str:
        if self.tmp is None and self.chmod is not None and not os.path.islink(self.target):
            _swap_for_symlink(self.target, victim)
        return real(self, fd)

    monkeypatch.setattr(casstore.store._Staged, "publish", swap_then_publish)
    for group in (None, lambda p: "g"):
        Store(tmp_path / "store", threads=1).load(KEY, tmp_path / "dst", group=group)
        assert victim.stat().st_mode & 0o777 == 0o600


def test_one_swapped_temp_file_fails_its_group_before_any_of_it_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every temp file of a group is checked before the first rename: one swapped for a
    symlink fails the whole group, none of it published, no temp file left."""
    import casstore.store

    write_tree(tmp_path / "src", {"g/a": b"a" * 100, "g/b": b"b" * 100})
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    victim = _victim(tmp_path)
    real = casstore.store._Staged.give_mode

    def swap_b_then_check(self: casstore.store._Staged, fd: int | None = None) -> None:
        if self.tmp is not None and self.target.endswith("/b") and not os.path.islink(self.tmp):
            _swap_for_symlink(self.tmp, victim)
        real(self, fd)

    monkeypatch.setattr(casstore.store._Staged, "give_mode", swap_b_then_check)
    report = Store(tmp_path / "store", threads=1).load(KEY, tmp_path / "dst", group=lambda p: "g")
    assert sorted(report.missing) == ["g/a", "g/b"]
    assert not (tmp_path / "dst/g/a").exists() and not (tmp_path / "dst/g/b").exists()
    assert victim.stat().st_mode & 0o777 == 0o600
    assert temp_files(tmp_path / "dst") == []


def test_a_present_file_swapped_in_a_group_fails_the_group_before_any_of_it_appears(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A present file of a group whose mode must be fixed is checked and given its mode
    with the group's temp files, before the first rename: swapped for a symlink, it fails
    the whole group, the group's new file included."""
    import casstore.store

    write_tree(tmp_path / "src", {"g/top": b"t" * 100, "g/sub/new": b"n" * 100}, {"g/top": 0o644})
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    Store(tmp_path / "store").load(KEY, tmp_path / "dst")
    (tmp_path / "dst/g/top").chmod(0o600)
    (tmp_path / "dst/g/sub/new").unlink()
    victim = _victim(tmp_path)
    real = casstore.store._Staged.give_mode

    def swap_then_give_mode(self: casstore.store._Staged, fd: int | None = None) -> None:
        if self.tmp is None and self.chmod is not None and not os.path.islink(self.target):
            _swap_for_symlink(self.target, victim)
        real(self, fd)

    monkeypatch.setattr(casstore.store._Staged, "give_mode", swap_then_give_mode)
    report = Store(tmp_path / "store", threads=1).load(KEY, tmp_path / "dst", group=lambda p: "g")
    assert sorted(report.missing) == ["g/sub/new", "g/top"]
    assert not (tmp_path / "dst/g/sub/new").exists()
    assert victim.stat().st_mode & 0o777 == 0o600
    assert temp_files(tmp_path / "dst") == []


def test_a_grouped_temp_file_replaced_by_another_file_fails_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grouped temp file removed and another of the same size made in its place while it
    waits (ext4 may give the new one the very inode number): the whole state is compared,
    not the number alone, so the group fails and the other bytes are never recorded."""
    import casstore.store

    write_tree(tmp_path / "src", {"g/a": b"a" * 100, "g/b": b"b" * 100})
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    real = casstore.store._Staged.give_mode

    def replace_then_give_mode(self: casstore.store._Staged, fd: int | None = None) -> None:
        if self.tmp is not None and fd is None and self.target.endswith("/a"):
            mtime = os.lstat(self.tmp).st_mtime_ns
            os.unlink(self.tmp)
            made = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(made, b"E" * 100)
            os.close(made)
            os.utime(self.tmp, ns=(mtime + 10**9, mtime + 10**9))  # a later tick
        real(self, fd)

    monkeypatch.setattr(casstore.store._Staged, "give_mode", replace_then_give_mode)
    report = Store(tmp_path / "store", threads=1).load(KEY, tmp_path / "dst", group=lambda p: "g")
    assert sorted(report.missing) == ["g/a", "g/b"]
    assert not (tmp_path / "dst/g/a").exists()
    assert temp_files(tmp_path / "dst") == []

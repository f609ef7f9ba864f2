"""The host's record of the files it saved and restored (casstore/statcache.py): a file in
the state recorded is not read again by a save, nor hashed again by a load; any change of
its content, a chunk lost from the store, or a record that cannot be used still costs
only a read."""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest

from casstore import CacheKey, Store, chunking, constants, localfs, statcache
from casstore import manifest as mf
from casstore.manifest import ChunkRef, FileEntry
from tests.helpers import KEY, lose_chunk, pack_files, write_tree


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Files opened to be read by saves (by relative path), and files hashed by loads."""
    counts: Counter[str] = Counter()
    real_open, real_digest = localfs.open_stable, localfs.file_digest

    def open_stable(f: localfs.LocalFile):  # type: ignore[no-untyped-def]
        counts[f.rel] += 1
        return real_open(f)

    def file_digest(path: str, size: int) -> bytes | None:
        counts[f"hashed:{Path(path).name}"] += 1
        return real_digest(path, size)

    monkeypatch.setattr(localfs, "open_stable", open_stable)
    monkeypatch.setattr(localfs, "file_digest", file_digest)
    return counts


@pytest.fixture
def settled(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files count as settled at once (the tests' files were all written a moment ago; a
    real cache's were written long before its save)."""
    monkeypatch.setattr(statcache, "RACY_NS", 0)


def tree(root: Path) -> dict[str, bytes]:
    files = {f"fx/{i:02d}.py": os.urandom(3000) for i in range(20)}
    files["big.so"] = os.urandom(5 * 2**20)  # streamed: over the 4 MiB threshold
    files["empty"] = b""
    write_tree(root, files)
    return files


@pytest.mark.usefixtures("settled")
@pytest.mark.parametrize("where", ["filesystem", "s3"])
def test_an_unchanged_resave_reads_no_file(
    tmp_path: Path, reads: Counter[str], request: pytest.FixtureRequest, where: str
) -> None:
    tree(tmp_path / "src")
    root = tmp_path / "store" if where == "filesystem" else request.getfixturevalue("s3_url")
    store = Store(root)
    store.save(tmp_path / "src", KEY)
    reads.clear()
    again = store.save(tmp_path / "src", KEY)
    assert again.manifest is None and again.new_chunks == 0
    assert reads == Counter(), reads


@pytest.mark.usefixtures("settled")
def test_a_file_rewritten_with_its_size_and_mtime_kept_is_read_again(
    tmp_path: Path, reads: Counter[str]
) -> None:
    """The ctime tells: writing a file moves it, and no one can set it back."""
    tree(tmp_path / "src")
    store = Store(tmp_path / "store")
    store.save(tmp_path / "src", KEY)
    target = tmp_path / "src/fx/07.py"
    before = target.stat()
    target.write_bytes(b"z" * before.st_size)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    reads.clear()
    report = store.save(tmp_path / "src", KEY)
    assert reads == Counter({"fx/07.py": 1}), reads
    assert report.changed_files == 1 and store.files(KEY)["fx/07.py"].size == before.st_size
    Store(tmp_path / "store").load(KEY, tmp_path / "dst")
    assert (tmp_path / "dst/fx/07.py").read_bytes() == b"z" * before.st_size


@pytest.mark.usefixtures("settled")
def test_a_chunk_lost_since_is_packed_again_from_the_unchanged_file(
    tmp_path: Path, reads: Counter[str]
) -> None:
    """Saves still heal the store: the chunks of a recorded file are looked for, and the
    file is read when one is missing (and only that file)."""
    tree(tmp_path / "src")
    store = Store(tmp_path / "store")
    store.save(tmp_path / "src", KEY)
    lose_chunk(store.backend, store.files(KEY)["fx/03.py"].chunks[0].digest)
    reads.clear()
    report = store.save(tmp_path / "src", KEY)
    assert report.new_chunks == 1 and reads == Counter({"fx/03.py": 1}), reads
    assert Store(tmp_path / "store").load(KEY, tmp_path / "dst").missing == []


@pytest.mark.usefixtures("settled")
def test_a_load_records_what_it_wrote(tmp_path: Path, reads: Counter[str]) -> None:
    """A replica restores, then saves: the save reads none of the restored files of one
    chunk (the chunk's digest is the file's), only the multi-chunk one (a load checks its
    chunks, not its digest); a second load into the same directory hashes none."""
    files = tree(tmp_path / "src")
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    store = Store(tmp_path / "store")
    assert store.load(KEY, tmp_path / "cache").written == len(files)
    reads.clear()
    assert store.save(tmp_path / "cache", KEY).manifest is None
    assert reads == Counter({"big.so": 1}), reads
    assert store.load(KEY, tmp_path / "cache").skipped == len(files)
    assert reads == Counter({"big.so": 1}), reads


def test_files_changed_just_before_a_save_are_not_trusted(
    tmp_path: Path, reads: Counter[str]
) -> None:
    """A file whose mtime or ctime is within a second of the save may change again in the
    same timestamp tick: it is not recorded, so the next save reads it."""
    tree(tmp_path / "src")  # just written
    store = Store(tmp_path / "store")
    store.save(tmp_path / "src", KEY)
    reads.clear()
    store.save(tmp_path / "src", KEY)
    assert reads["fx/00.py"] == 1 and reads["big.so"] == 1


def _publish_lie(store: Store, entry: FileEntry) -> str:
    m = mf.new_manifest(KEY, [entry])
    name = f"{constants.MANIFESTS_DIR}/{KEY.id}/{mf.new_manifest_name(m.created_at + 1)}"
    store.backend.put_if_absent(name, mf.encode(m))
    return name


@pytest.mark.usefixtures("settled")
@pytest.mark.parametrize("local", [True, False], ids=["found in place", "written"])
def test_a_lying_manifest_is_never_recorded_nor_carried_into_a_save(
    tmp_path: Path, local: bool
) -> None:
    """A manifest lists a file with the digest of bytes L but the chunk of bytes E. Whether
    the load finds L in place (the digest matches) or writes E, this host must not record
    that entry: once the lie is gone, its next save lists the file's real bytes, and a
    later load does not leave the wrong bytes in place as 'skipped'."""
    real, other = os.urandom(5000), os.urandom(5000)
    store = Store(tmp_path / "store")
    write_tree(tmp_path / "other", {"e": other})
    store.save(tmp_path / "other", CacheKey(torch="t", arch="a", model="other"))  # E stored
    lie = FileEntry(
        "p", len(real), 0o644, chunking.digest(real), (ChunkRef(chunking.digest(other), 5000),)
    )
    name = _publish_lie(store, lie)
    cache = tmp_path / "cache"
    if local:
        write_tree(cache, {"p": real})
    store.load(KEY, cache)
    store.backend.delete(name)
    store.save(cache, KEY)
    honest = Store(tmp_path / "store").files(KEY)["p"]
    on_disk = (cache / "p").read_bytes()
    assert honest.digest == chunking.digest(on_disk)
    assert [c.digest for c in honest.chunks] == [chunking.digest(on_disk)]
    # A correct manifest of L now: a load must put L in place, not skip the wrong bytes.
    write_tree(tmp_path / "l", {"p": real})
    Store(tmp_path / "store").save(tmp_path / "l", KEY)
    Store(tmp_path / "store").load(KEY, cache)
    assert (cache / "p").read_bytes() == real


@pytest.mark.usefixtures("settled")
def test_a_directory_whose_name_is_not_utf8(tmp_path: Path) -> None:
    src = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9"))
    write_tree(src, {"a.py": b"a" * 5000})
    store = Store(tmp_path / "store")
    store.save(src, KEY)
    assert store.save(src, KEY).manifest is None
    dst = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/d\xe9st"))
    assert store.load(KEY, dst).written == 1 and store.load(KEY, dst).skipped == 1


@pytest.mark.usefixtures("settled")
@pytest.mark.parametrize("how", ["off", "damaged record", "impossible entry", "group-writable"])
def test_without_a_usable_record_every_file_is_read(
    tmp_path: Path, reads: Counter[str], monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """No record (turned off), one that does not decode, one with an entry no manifest
    could hold (a mode with file-type bits), or one someone else may have written: each
    costs reads, never a save."""
    files = tree(tmp_path / "src")
    records = tmp_path / "records"
    monkeypatch.setenv("CASSTORE_STAT_CACHE", str(records))
    store = Store(tmp_path / "store")
    store.save(tmp_path / "src", KEY)
    (record,) = records.iterdir()
    assert record.stat().st_mode & 0o077 == 0 and records.stat().st_mode & 0o077 == 0
    if how == "off":
        monkeypatch.setenv("CASSTORE_STAT_CACHE", "off")
    elif how == "damaged record":
        record.write_bytes(b"\x93not a record")
    elif how == "group-writable":
        record.chmod(0o664)
    else:
        doc = msgspec.msgpack.decode(record.read_bytes())
        for _, (_, entry) in doc["files"].items():
            entry["mode"] = 0o100644
        record.write_bytes(msgspec.msgpack.encode(doc))
    reads.clear()
    assert store.save(tmp_path / "src", KEY).manifest is None
    assert reads == Counter(dict.fromkeys(files, 1)), reads


@pytest.mark.usefixtures("settled")
def test_the_packs_of_a_large_unread_file_are_looked_at_in_parallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large file spans several packs; when a save does not read it (its state is
    recorded), its packs are still looked at (renewed), but together, not one round trip
    after another from the file's thread."""
    write_tree(tmp_path / "src", {"big.so": os.urandom(40 * 2**20)})  # three packs or more
    store = Store(tmp_path / "store", threads=8)
    store.save(tmp_path / "src", KEY)
    assert len(pack_files(tmp_path / "store")) >= 3
    looking, most, lock = 0, 0, threading.Lock()
    real = Store._pack_present

    def slow(self: Store, pack_id: str) -> bool:
        nonlocal looking, most
        with lock:
            looking += 1
            most = max(most, looking)
        time.sleep(0.2)  # a round trip to a distant object store
        with lock:
            looking -= 1
        return real(self, pack_id)

    monkeypatch.setattr(Store, "_pack_present", slow)
    assert store.save(tmp_path / "src", KEY).manifest is None
    assert most >= 2, most


def after_scan(monkeypatch: pytest.MonkeyPatch, action: Callable[[], object]) -> None:
    """Run ``action`` once the save has scanned the tree, before it uploads (where a save
    may wait for the key's lock, reads the key's view and records its use)."""
    real = Store._record_use

    def hooked(self: Store, key: CacheKey) -> None:
        action()
        real(self, key)

    monkeypatch.setattr(Store, "_record_use", hooked)


@pytest.mark.usefixtures("settled")
def test_a_recorded_file_rewritten_after_the_scan_is_saved_as_it_is_now(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Same size, mtime put back (its ctime moves): the save lists the new bytes, not the
    entry recorded for the state the scan saw."""
    tree(tmp_path / "src")
    store = Store(tmp_path / "store")
    store.save(tmp_path / "src", KEY)
    target = tmp_path / "src/fx/03.py"
    new = b"n" * 3000

    def rewrite() -> None:
        st = target.stat()
        target.write_bytes(new)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))

    after_scan(monkeypatch, rewrite)
    store.save(tmp_path / "src", KEY)
    assert Store(tmp_path / "store").files(KEY)["fx/03.py"].digest == chunking.digest(new)


@pytest.mark.usefixtures("settled")
def test_a_recorded_file_deleted_after_the_scan_is_reported_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree(tmp_path / "src")
    store = Store(tmp_path / "store")
    store.save(tmp_path / "src", KEY)
    after_scan(monkeypatch, lambda: (tmp_path / "src/fx/03.py").unlink())
    report = store.save(tmp_path / "src", KEY)
    assert "fx/03.py" in dict(report.skipped), report.skipped


@pytest.mark.usefixtures("settled")
def test_a_file_swapped_in_right_after_a_load_wrote_it_is_not_recorded_as_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer renames its own file into place just after the load put its file
    there, before the load takes the target's state: that state must not be recorded as
    the load's entry, or the next load leaves the other bytes in place as identical."""
    files = tree(tmp_path / "src")
    Store(tmp_path / "store").save(tmp_path / "src", KEY)
    dst = tmp_path / "dst"
    other = b"o" * 3000
    real = os.replace
    swapped: list[str] = []

    def racing(src: str, target: str) -> None:
        real(src, target)  # the load's file in place; the other writer's comes at once
        p = os.fspath(target)
        if p.endswith("fx/02.py") and p.startswith(str(dst)) and not swapped:
            swapped.append(p)
            Path(p + ".writer").write_bytes(other)
            real(p + ".writer", p)

    monkeypatch.setattr(os, "replace", racing)
    Store(tmp_path / "store").load(KEY, dst)
    monkeypatch.setattr(os, "replace", real)
    assert swapped and (dst / "fx/02.py").read_bytes() == other
    Store(tmp_path / "store").load(KEY, dst)
    assert (dst / "fx/02.py").read_bytes() == files["fx/02.py"]

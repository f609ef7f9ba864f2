from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from casstore import constants
from casstore.backends.fs import FileSystemBackend, temp_name
from casstore.errors import CannotRenew, CorruptObject
from tests.backend_conformance import BackendConformance
from tests.helpers import temp_files


class TestFileSystemBackend(BackendConformance):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> FileSystemBackend:
        return FileSystemBackend(tmp_path / "root")


def test_publish_leaves_no_temp_files(tmp_path: Path) -> None:
    b = FileSystemBackend(tmp_path)
    for i in range(20):
        b.put_if_absent(f"chunks/abc/{i}", b"x" * i)
        b.put_if_absent(f"chunks/abc/{i}", b"x" * i)
    assert temp_files(tmp_path) == []


def test_temp_files_are_invisible_to_list(tmp_path: Path) -> None:
    b = FileSystemBackend(tmp_path)
    b.put_if_absent("m/k/a", b"1")
    (tmp_path / "m" / "k" / f"{constants.TEMP_PREFIX}crashed").write_bytes(b"partial")
    assert [i.key for i in b.list("m/")] == ["m/k/a"]


def without_renameat2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Act as a filesystem without RENAME_NOREPLACE (NFS, some FUSE mounts)."""

    def unsupported(src: str, dst: str) -> bool:
        raise NotImplementedError("no renameat2 here")

    monkeypatch.setattr("casstore.backends.fs.rename_noreplace", unsupported)


def without_hard_links(monkeypatch: pytest.MonkeyPatch) -> None:
    """Act as a mount that refuses link() (some FUSE and SMB filesystems)."""

    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)


class TestLinkFallback(BackendConformance):
    """The whole conformance suite on the link()+unlink() publish path (no renameat2)."""

    @pytest.fixture
    def backend(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FileSystemBackend:
        without_renameat2(monkeypatch)
        return FileSystemBackend(tmp_path / "root")


class TestRenameFallback(BackendConformance):
    """The whole conformance suite on the last resort: neither renameat2 nor link()."""

    publishes_exactly_once = False  # check-then-rename is not atomic

    @pytest.fixture
    def backend(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FileSystemBackend:
        without_renameat2(monkeypatch)
        without_hard_links(monkeypatch)
        return FileSystemBackend(tmp_path / "root")


@pytest.mark.parametrize("mode", ["renameat2", "link", "rename"])
def test_each_publish_primitive_is_used_and_never_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    if mode != "renameat2":
        without_renameat2(monkeypatch)
    if mode == "rename":
        without_hard_links(monkeypatch)
    b = FileSystemBackend(tmp_path)
    assert b.put_if_absent("x/y", b"one") is True
    assert b.primitive == mode
    assert b.put_if_absent("x/y", b"two") is False
    assert b.get("x/y") == b"one"
    assert b.move("x/y", "z/y") is True and b.primitive == mode
    assert b.get("z/y") == b"one" and b.stat("x/y") is None
    assert temp_files(tmp_path) == []


def test_failed_write_leaves_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    b = FileSystemBackend(tmp_path)
    b.put_if_absent("x/first", b"1")  # creates the directory

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError):
        b.put_if_absent("x/y", b"data")
    assert temp_files(tmp_path) == []
    assert b.stat("x/y") is None


def test_link_mode_move_never_deletes_a_fresh_reupload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two gcs sweep one chunk: the other gc removes it and a saver re-uploads it while this
    move is between its two steps. The re-upload must survive."""
    without_renameat2(monkeypatch)
    b = FileSystemBackend(tmp_path)
    b.put_if_absent("chunks/ab/c.zst", b"old copy")
    src = tmp_path / "chunks" / "ab" / "c.zst"
    real_link = os.link
    raced: list[bool] = []

    def link(a: str, z: str) -> None:
        real_link(a, z)
        if not raced and z.endswith("trash/run/c.zst"):
            raced.append(True)
            src.unlink()  # the other gc's sweep
            assert b.put_if_absent("chunks/ab/c.zst", b"fresh upload")  # a saver's

    monkeypatch.setattr(os, "link", link)
    assert b.move("chunks/ab/c.zst", "trash/run/c.zst")
    assert raced
    assert src.read_bytes() == b"fresh upload"
    assert (tmp_path / "trash" / "run" / "c.zst").read_bytes() == b"old copy"
    assert temp_files(tmp_path) == []


def test_objects_and_directories_honour_the_umask(tmp_path: Path) -> None:
    """On a team volume (umask 002) every writer must be able to renew every object."""
    old = os.umask(0o002)
    try:
        b = FileSystemBackend(tmp_path / "root")
        b.put_if_absent("chunks/ab/x.zst", b"data")
    finally:
        os.umask(old)
    assert (tmp_path / "root" / "chunks" / "ab" / "x.zst").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "root" / "chunks" / "ab").stat().st_mode & 0o777 == 0o775


def test_a_refresh_that_cannot_renew_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = FileSystemBackend(tmp_path)
    b.put_if_absent("chunks/ab/x.zst", b"data")

    def denied(path: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted", path)

    monkeypatch.setattr(os, "utime", denied)
    with pytest.raises(CannotRenew, match=r"cannot renew chunks/ab/x\.zst"):
        b.refresh("chunks/ab/x.zst")
    assert b.refresh("chunks/ab/absent.zst") is False


def test_republish_gives_an_identical_object_a_new_age(tmp_path: Path) -> None:
    b = FileSystemBackend(tmp_path)
    b.put_if_absent("chunks/ab/x.zst", b"data")
    path = tmp_path / "chunks" / "ab" / "x.zst"
    os.utime(path, (1000, 1000))
    b.republish("chunks/ab/x.zst", b"data")
    assert path.read_bytes() == b"data" and path.stat().st_mtime > 1000
    assert temp_files(tmp_path) == []


def test_renameat2_moves_never_touch_a_fresh_upload_at_the_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With renameat2 the source name is gone once moved; a saver re-uploading there right
    after must find its object left alone (no detour through a temp name)."""
    import casstore.backends.fs as fs_mod

    b = FileSystemBackend(tmp_path)
    b.put_if_absent("chunks/ab/c.zst", b"old copy")
    from casstore.backends._posix import rename_noreplace as real  # the unpatched call

    def then_reupload(src: str, dst: str) -> bool:
        moved = real(src, dst)
        if dst.endswith("trash/run/c.zst"):
            assert b.put_if_absent("chunks/ab/c.zst", b"fresh upload")
        return moved

    def must_not_run(*args: object) -> None:
        raise AssertionError("link-mode clean-up ran after a renameat2 move")

    monkeypatch.setattr(fs_mod, "rename_noreplace", then_reupload)
    monkeypatch.setattr(FileSystemBackend, "_drop_linked_source", must_not_run)
    assert b.move("chunks/ab/c.zst", "trash/run/c.zst")
    assert (tmp_path / "chunks" / "ab" / "c.zst").read_bytes() == b"fresh upload"


def test_only_regular_files_are_objects(tmp_path: Path) -> None:
    b = FileSystemBackend(tmp_path)
    (tmp_path / "chunks" / "ab").mkdir(parents=True)
    os.mkfifo(tmp_path / "chunks" / "ab" / "fifo.zst")
    with pytest.raises(CorruptObject, match="not a regular file"):
        b.get("chunks/ab/fifo.zst", max_bytes=100)
    with pytest.raises(CorruptObject, match="not a regular file"):
        b.get("chunks/ab/fifo.zst")


def test_delete_never_follows_a_directory_swapped_for_a_symlink(tmp_path: Path) -> None:
    """gc lists, then deletes: a writer who swaps a store directory for a symlink in
    between must not make it unlink a file outside the store."""
    backend = FileSystemBackend(tmp_path / "store")
    backend.put_if_absent("usage/2026-01-01/a.rec", b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "a.rec").write_bytes(b"precious")
    day = tmp_path / "store" / "usage" / "2026-01-01"
    (day / "a.rec").unlink()
    day.rmdir()
    day.symlink_to(outside)
    assert backend.delete("usage/2026-01-01/a.rec") is False
    assert (outside / "a.rec").read_bytes() == b"precious"


def test_temp_names_are_unique_and_differ_in_a_forked_child() -> None:
    """Temp names come from a per-process stem and a counter (no system call each): a
    forked child draws a stem of its own, so parent and child never pick the same name."""
    names = {temp_name() for _ in range(10_000)}
    assert len(names) == 10_000 and all(n.startswith(constants.TEMP_PREFIX) for n in names)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report the names it would pick, then leave at once
        os.write(write, "\n".join(temp_name() for _ in range(100)).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    with os.fdopen(read) as fh:
        child = set(fh.read().split("\n"))
    parent = {temp_name() for _ in range(100)}
    assert len(child) == 100 and not child & parent

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from casstore import constants
from casstore.backends.fs import FileSystemBackend
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


def test_falls_back_to_rename_without_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some network mounts refuse link(); publishing must still work and never replace."""

    def no_link(src: object, dst: object) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    b = FileSystemBackend(tmp_path)
    assert b.put_if_absent("x/y", b"one") is True
    assert b.put_if_absent("x/y", b"two") is False
    assert b.get("x/y") == b"one"
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

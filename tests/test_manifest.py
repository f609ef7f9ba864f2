from __future__ import annotations

import msgspec
import pytest

from casstore import chunking, constants
from casstore import manifest as mf
from casstore.errors import InvalidManifest, UnsafePath
from tests.helpers import KEY


def entry(path: str, data: bytes = b"abc", mode: int = 0o644) -> mf.FileEntry:
    refs = tuple(mf.ChunkRef(c.digest, c.length) for c in chunking.cut(data))
    return mf.FileEntry(path, len(data), mode, chunking.digest(data), refs)


def raw_manifest(files: list[dict[str, object]], fmt: int = 1) -> bytes:
    doc = msgspec.to_builtins(mf.new_manifest(KEY, [entry("ok")]), builtin_types=(bytes,))
    doc["format"] = fmt
    doc["files"] = files
    return mf.seal(msgspec.msgpack.encode(doc))


def raw_file(
    path: str, size: int = 3, chunks: list[list[object]] | None = None
) -> dict[str, object]:
    return {
        "path": path,
        "size": size,
        "mode": 0o644,
        "digest": b"\1" * 32,
        "chunks": chunks if chunks is not None else [[b"\2" * 32, size]] if size else [],
    }


def test_roundtrip() -> None:
    m = mf.new_manifest(KEY, [entry("b/c.py", b"x" * 10), entry("a", b""), entry("z", b"1")])
    back = mf.decode(mf.encode(m))
    assert back == m
    assert [f.path for f in back.files] == ["a", "b/c.py", "z"]
    assert back.key.id == KEY.id


def test_unknown_format_version_is_a_clear_error() -> None:
    with pytest.raises(InvalidManifest, match="format 3 is not supported"):
        mf.decode(raw_manifest([raw_file("a")], fmt=3))


@pytest.mark.parametrize(
    "blob",
    [b"", b"\xc1", b"garbage that is not msgpack", msgspec.msgpack.encode({"files": []})],
)
def test_malformed_documents_are_rejected(blob: bytes) -> None:
    with pytest.raises(InvalidManifest, match="bad magic"):
        mf.decode(blob)
    with pytest.raises(InvalidManifest, match=r"not a casstore manifest|malformed"):
        mf.decode(mf.seal(blob))


def test_every_damaged_byte_is_detected() -> None:
    """Without the digest, a flipped byte could rename a file or change its mode."""
    blob = mf.encode(mf.new_manifest(KEY, [entry("dir/file.py", b"x" * 100)]))
    for i in range(len(blob)):
        bad = bytearray(blob)
        bad[i] ^= 0x01
        with pytest.raises(InvalidManifest):
            mf.decode(bytes(bad))


def test_truncated_document_is_rejected() -> None:
    blob = mf.encode(mf.new_manifest(KEY, [entry(f"f{i}") for i in range(50)]))
    for cut in (1, 10, len(blob) // 2, len(blob) - 1):
        with pytest.raises(InvalidManifest):
            mf.decode(blob[:cut])


def test_unknown_field_is_rejected() -> None:
    doc = msgspec.to_builtins(mf.new_manifest(KEY, [entry("a")]), builtin_types=(bytes,))
    doc["surprise"] = 1
    with pytest.raises(InvalidManifest, match="unknown field `surprise`"):
        mf.decode(mf.seal(msgspec.msgpack.encode(doc)))


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a/./b",
        "a//b",
        "a/",
        "",
        ".",
        "..",
        "a\\..\\b",
        "nul\x00byte",
        "x" * 5000,
    ],
)
def test_unsafe_paths_are_rejected(path: str) -> None:
    with pytest.raises(UnsafePath):
        mf.decode(raw_manifest([raw_file(path)]))


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ([raw_file("a"), raw_file("a")], "duplicate"),
        ([raw_file("a"), raw_file("a/b")], "both a file and a directory"),
        ([raw_file("a", size=-1, chunks=[])], "impossible size"),
        ([raw_file("a", size=1 << 50, chunks=[])], "impossible size"),
        ([raw_file("a", size=10, chunks=[[b"\2" * 32, 5]])], "add up"),
        ([raw_file("a", size=3, chunks=[[b"\2" * 32, 1]] * 4)], "more chunks than bytes"),
        ([raw_file("a", size=3, chunks=[[b"\2" * 5, 3]])], "malformed chunk digest"),
        ([raw_file("a", size=2**30, chunks=[[b"\2" * 32, 2**30]])], "chunk of size"),
    ],
)
def test_hostile_entries_are_rejected(files: list[dict[str, object]], match: str) -> None:
    with pytest.raises(InvalidManifest, match=match):
        mf.decode(raw_manifest(files))


def test_oversized_document_is_rejected_before_parsing() -> None:
    with pytest.raises(InvalidManifest, match="size limit"):
        mf.decode(b"\0" * (constants.MAX_MANIFEST_BYTES + 1))


def test_merge_newest_wins_and_drops_clashes() -> None:
    old = mf.new_manifest(KEY, [entry("a", b"old"), entry("d", b"file"), entry("keep", b"k")])
    new = mf.new_manifest(KEY, [entry("a", b"new"), entry("d/x", b"dir now")])
    new = msgspec.structs.replace(new, created_at=old.created_at + 1)
    view = mf.merge([new, old])
    assert list(view) == ["a", "d/x", "keep"]
    assert view["a"].size == 3 and view["a"].digest == chunking.digest(b"new")


def test_manifest_names_sort_by_time() -> None:
    a = mf.new_manifest_name(1000.0)
    b = mf.new_manifest_name(1000.5)
    assert a < b and a.endswith(constants.MANIFEST_SUFFIX)


@pytest.mark.parametrize("when", [float("nan"), float("inf"), float("-inf"), -1.0, 1e300])
def test_impossible_creation_times_are_rejected(when: float) -> None:
    bad = msgspec.structs.replace(mf.new_manifest(KEY, [entry("a")]), created_at=when)
    with pytest.raises(InvalidManifest, match="created_at"):
        mf.decode(mf.encode(bad))


def test_only_a_newer_format_or_an_unknown_field_is_unsupported() -> None:
    """A manifest of a newer casstore may be valid (gc keeps its chunks); one with a field
    of the wrong type is simply broken (gc need not stop sweeping for it)."""
    from casstore.errors import UnsupportedManifest

    doc = msgspec.to_builtins(mf.new_manifest(KEY, [entry("a")]), builtin_types=(bytes,))
    doc["files"][0]["mode"] = "0644"
    with pytest.raises(InvalidManifest) as bad_type:
        mf.decode(mf.seal(msgspec.msgpack.encode(doc)))
    assert not isinstance(bad_type.value, UnsupportedManifest)
    with pytest.raises(UnsupportedManifest):
        mf.decode(raw_manifest([raw_file("a")], fmt=3))
    with pytest.raises(InvalidManifest) as older:
        mf.decode(raw_manifest([raw_file("a")], fmt=0))
    assert not isinstance(older.value, UnsupportedManifest)

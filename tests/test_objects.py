from __future__ import annotations

import os

import pytest
import zstandard

from casstore import chunking, constants, objects
from casstore.errors import CorruptObject


def test_roundtrip_and_key_layout() -> None:
    data = os.urandom(5000) + b"\0" * 50_000
    d = chunking.digest(data)
    blob = objects.encode_chunk(data)
    assert len(blob) < len(data)  # compressible tail
    assert objects.decode_chunk(blob, d, len(data)) == data
    key = objects.chunk_key(d)
    assert key == f"chunks/{d.hex()[: constants.FANOUT_CHARS]}/{d.hex()}.zst"
    assert objects.digest_from_key(key) == d.hex()
    assert objects.digest_from_key("chunks/abc/nothex.zst") is None


def test_any_flipped_byte_is_detected() -> None:
    data = os.urandom(20_000)
    d = chunking.digest(data)
    blob = objects.encode_chunk(data)
    for i in range(0, len(blob), max(1, len(blob) // 200)):
        bad = bytearray(blob)
        bad[i] ^= 0x40
        with pytest.raises(CorruptObject) as e:
            objects.decode_chunk(bytes(bad), d, len(data))
        assert e.value.digest == d.hex()


def test_truncated_and_empty_blobs_are_corrupt() -> None:
    data = os.urandom(20_000)
    d = chunking.digest(data)
    blob = objects.encode_chunk(data)
    for bad in (blob[:-1], blob[: len(blob) // 2], b""):
        with pytest.raises(CorruptObject):
            objects.decode_chunk(bad, d, len(data))


def test_valid_frame_with_other_content_is_corrupt() -> None:
    d = chunking.digest(b"expected")
    with pytest.raises(CorruptObject, match="does not match"):
        objects.decode_chunk(objects.encode_chunk(b"imposter"), d, 8)


def test_decompression_bomb_is_refused() -> None:
    """A hostile frame cannot expand past what the manifest declares."""
    bomb = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 50_000_000)
    with pytest.raises(CorruptObject):
        objects.decode_chunk(bomb, b"\0" * 32, 1000)
    declared = objects.encode_chunk(b"\0" * 10_000_000)
    with pytest.raises(CorruptObject, match="declares"):
        objects.decode_chunk(declared, b"\0" * 32, None)

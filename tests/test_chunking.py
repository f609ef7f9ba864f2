from __future__ import annotations

import io
import os
import random

import blake3
from hypothesis import given, settings
from hypothesis import strategies as st

from casstore import chunking, constants


@given(st.binary(max_size=300_000))
@settings(max_examples=50, deadline=None)
def test_cuts_cover_input_exactly(data: bytes) -> None:
    cuts = chunking.cut(data)
    assert b"".join(data[c.offset : c.offset + c.length] for c in cuts) == data
    pos = 0
    for c in cuts:
        assert c.offset == pos
        assert c.length <= constants.CHUNK_MAX_SIZE
        assert c.digest == blake3.blake3(data[c.offset : c.offset + c.length]).digest()
        pos += c.length
    # Every chunk but the last respects the minimum size.
    assert all(c.length >= constants.CHUNK_MIN_SIZE for c in cuts[:-1])


def test_empty_input_has_no_chunks() -> None:
    assert chunking.cut(b"") == []


def test_small_file_is_one_chunk() -> None:
    data = os.urandom(constants.CHUNK_MIN_SIZE - 1)
    assert len(chunking.cut(data)) == 1


def test_cuts_are_deterministic_and_content_defined() -> None:
    """An insertion early in a file only changes the chunks around it: the rest realign."""
    rng = random.Random(7)
    data = rng.randbytes(8 * 2**20)
    before = {c.digest for c in chunking.cut(data)}
    assert before == {c.digest for c in chunking.cut(data)}
    edited = data[:1000] + b"inserted bytes" + data[1000:]
    after = chunking.cut(edited)
    changed = [c for c in after if c.digest not in before]
    assert sum(c.length for c in changed) <= 2 * constants.CHUNK_MAX_SIZE
    assert len(after) > 20  # the file really was cut into many chunks


def test_average_chunk_size_is_near_configured() -> None:
    data = random.Random(1).randbytes(32 * 2**20)
    cuts = chunking.cut(data)
    mean = len(data) / len(cuts)
    # FastCDC's effective mean is about avg + min.
    assert constants.CHUNK_AVG_SIZE * 0.8 < mean < (constants.CHUNK_AVG_SIZE * 2)


def test_streamed_cuts_equal_buffer_cuts() -> None:
    """Large files are cut from a stream: the cut points must be the format's, exactly."""
    data = random.Random(5).randbytes(6 * 2**20) + bytes(2**20)
    streamed = [(d, len(b)) for d, b in chunking.cut_stream(io.BytesIO(data))]
    assert streamed == [(c.digest, c.length) for c in chunking.cut(data)]

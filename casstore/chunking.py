"""Content-defined chunking (FastCDC) and BLAKE3 digests.

The chunker parameters live in :mod:`casstore.constants` and are recorded in each store's
layout file: two writers that cut differently would never share a chunk.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import blake3
from pyfastcdc import FastCDC

from casstore import constants

_local = threading.local()


def _new_chunker() -> FastCDC:
    return FastCDC(
        constants.CHUNK_AVG_SIZE,
        min_size=constants.CHUNK_MIN_SIZE,
        max_size=constants.CHUNK_MAX_SIZE,
        normalized_chunking=constants.CHUNK_NORMALIZED,
        seed=constants.CHUNK_SEED,
    )


def _chunker() -> FastCDC:
    # A FastCDC instance is not safe to share between threads; one per thread is cheap.
    cdc: FastCDC | None = getattr(_local, "cdc", None)
    if cdc is None:
        cdc = _new_chunker()
        _local.cdc = cdc
    return cdc


def chunker_params() -> dict[str, int | str]:
    """The parameters that define how bytes are cut, as recorded in the layout file."""
    return {
        "algorithm": "fastcdc2020",
        "min_size": constants.CHUNK_MIN_SIZE,
        "avg_size": constants.CHUNK_AVG_SIZE,
        "max_size": constants.CHUNK_MAX_SIZE,
        "normalized_chunking": constants.CHUNK_NORMALIZED,
        "seed": constants.CHUNK_SEED,
    }


def digest(data: bytes | memoryview) -> bytes:
    """BLAKE3-256 of ``data``; releases the GIL for large inputs."""
    return blake3.blake3(data, max_threads=1).digest()


def file_digest(path: str, size: int) -> bytes:
    """BLAKE3 of a file's contents via mmap; large files hash on every core."""
    threads = blake3.blake3.AUTO if size >= 16 * 2**20 else 1
    return blake3.blake3(max_threads=threads).update_mmap(path).digest()


@dataclass(frozen=True, slots=True)
class Cut:
    """One chunk of a buffer: its digest and where it lies."""

    digest: bytes
    offset: int
    length: int


def cut_stream(stream: BinaryIO) -> Iterator[tuple[bytes, bytes]]:
    """(digest, bytes) of each chunk of ``stream``, with the same cut points as
    :func:`cut` on its whole content; memory stays within a few chunks."""
    # A chunker of its own: a caller may interleave this generator with cut() calls.
    for c in _new_chunker().cut_stream(stream):
        data = bytes(c.data)  # c.data is only valid until the next chunk is cut
        yield digest(data), data


def hasher() -> blake3.blake3:
    """An incremental BLAKE3, for a file's digest computed while it streams."""
    return blake3.blake3(max_threads=1)


def cut(data: bytes | memoryview) -> list[Cut]:
    """Cut ``data`` into content-defined chunks. Empty input gives no chunks."""
    if len(data) == 0:
        return []
    view = memoryview(data)
    cuts = []
    for c in _chunker().cut_buf(view):
        start = c.offset
        end = start + c.length
        cuts.append(Cut(digest(view[start:end]), start, c.length))
    return cuts

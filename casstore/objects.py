"""Chunk objects: a zstd frame holding the chunk's bytes, named by the BLAKE3 digest of the
*uncompressed* bytes. Every read verifies the digest before the bytes are used.
"""

from __future__ import annotations

import threading

import zstandard

from casstore import chunking, constants
from casstore.errors import CorruptObject

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; keep one per thread.
    c: zstandard.ZstdCompressor | None = getattr(_local, "cctx", None)
    if c is None:
        c = zstandard.ZstdCompressor(level=constants.ZSTD_LEVEL, write_content_size=True)
        _local.cctx = c
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if d is None:
        d = zstandard.ZstdDecompressor()
        _local.dctx = d
    return d


def chunk_key(digest: bytes | str) -> str:
    """The backend key of a chunk: ``chunks/<first FANOUT_CHARS hex>/<hex>.zst``."""
    hexd = digest if isinstance(digest, str) else digest.hex()
    return f"{constants.CHUNKS_DIR}/{hexd[: constants.FANOUT_CHARS]}/{hexd}{constants.CHUNK_SUFFIX}"


def digest_from_key(key: str) -> str | None:
    """Inverse of :func:`chunk_key`; ``None`` for a key that does not name a chunk."""
    name = key.rsplit("/", 1)[-1]
    if not name.endswith(constants.CHUNK_SUFFIX):
        return None
    hexd = name[: -len(constants.CHUNK_SUFFIX)]
    if len(hexd) != constants.DIGEST_SIZE * 2:
        return None
    try:
        bytes.fromhex(hexd)
    except ValueError:
        return None
    return hexd


def encode_chunk(data: bytes | memoryview) -> bytes:
    """Compress a chunk for storage."""
    return _compressor().compress(data)


def decode_chunk(blob: bytes, digest: bytes, expected_size: int | None = None) -> bytes:
    """Decompress ``blob`` and check it hashes to ``digest``.

    ``expected_size`` (from the manifest) bounds decompression, so a hostile object cannot
    expand into gigabytes of memory. Raises :class:`CorruptObject` on any mismatch.
    """
    hexd = digest.hex()
    limit = expected_size if expected_size is not None else constants.CHUNK_MAX_SIZE
    try:
        declared = zstandard.get_frame_parameters(blob).content_size
        if declared != zstandard.CONTENTSIZE_UNKNOWN and (
            declared > limit or (expected_size is not None and declared != expected_size)
        ):
            raise CorruptObject(
                f"chunk {hexd} declares {declared} bytes, expected {limit}", digest=hexd
            )
        data = _decompressor().decompress(blob, max_output_size=limit)
    except zstandard.ZstdError as e:
        raise CorruptObject(f"chunk {hexd} is not a valid zstd frame: {e}", digest=hexd) from e
    if expected_size is not None and len(data) != expected_size:
        raise CorruptObject(
            f"chunk {hexd} holds {len(data)} bytes, expected {expected_size}", digest=hexd
        )
    if chunking.digest(data) != digest:
        raise CorruptObject(f"chunk {hexd} does not match its digest", digest=hexd)
    return data

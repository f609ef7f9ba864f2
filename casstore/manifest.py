"""Manifests: the msgspec document that lists a saved tree's files and their chunks.

Manifests are immutable. One key may hold several (each save that adds files publishes
one more); readers merge them, newest winning per path. Decoding is strict: an unknown
format version, an unknown field or an unsafe path rejects the whole document.

A signed manifest (format 2) wraps the exact bytes of a format-1 document with an ed25519
signature of them: a reader that knows no signatures sees a newer format and ignores it
(and its gc keeps its chunks), rather than using it without checking who wrote it.
"""

from __future__ import annotations

import math
import os
import platform
import socket
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec

from casstore import chunking, constants
from casstore._version import __version__
from casstore.errors import InvalidManifest, UnsafePath, UnsupportedManifest
from casstore.keys import CacheKey

if TYPE_CHECKING:
    from casstore.signing import SigningKey


class ChunkRef(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """One chunk of a file, in order: digest of its uncompressed bytes and their count."""

    digest: bytes
    size: int


class FileEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    path: str  # relative, '/'-separated, normalised
    size: int
    mode: int  # permission bits only
    digest: bytes  # BLAKE3 of the whole file, to recognise an identical local file cheaply
    chunks: tuple[ChunkRef, ...]


class Producer(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    host: str
    pid: int
    casstore: str
    python: str
    platform: str


class Manifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    format: int
    key: CacheKey
    created_at: float
    producer: Producer
    files: tuple[FileEntry, ...]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


class Signature(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    algorithm: str  # "ed25519"
    public_key: bytes  # 32 raw bytes
    signature: bytes  # 64 bytes, over signing.SIGNATURE_CONTEXT + the document's bytes


class SignedEnvelope(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Format 2: a format-1 document, byte for byte, and its signature."""

    format: int
    manifest: bytes
    signature: Signature


@dataclass(frozen=True)
class Decoded:
    """A manifest and who signed it: the public key whose signature was checked, or None
    for an unsigned manifest."""

    manifest: Manifest
    signer: bytes | None


class _Header(msgspec.Struct):
    """Read first, leniently, so a newer format gets a clear error instead of a schema one."""

    format: int


def this_producer() -> Producer:
    return Producer(
        host=socket.gethostname(),
        pid=os.getpid(),
        casstore=__version__,
        python=platform.python_version(),
        platform=f"{sys.platform}-{platform.machine()}",
    )


def new_manifest(key: CacheKey, files: Iterable[FileEntry]) -> Manifest:
    ordered = tuple(sorted(files, key=lambda f: f.path))
    m = Manifest(
        format=constants.MANIFEST_FORMAT_VERSION,
        key=key,
        created_at=time.time(),
        producer=this_producer(),
        files=ordered,
    )
    validate(m)
    return m


def new_manifest_name(created_at: float) -> str:
    """Unique, time-ordered file name: ``<ns since epoch, 20 digits>-<random>.manifest``."""
    ns = int(created_at * 1e9)
    return f"{ns:020d}-{uuid.uuid4().hex[:12]}{constants.MANIFEST_SUFFIX}"


_encoder = msgspec.msgpack.Encoder()


def encode(m: Manifest, signing_key: SigningKey | None = None) -> bytes:
    """``MAGIC`` + BLAKE3-256 of the body + the msgpack body (see docs/format.md); with a
    signing key, the body is a signed envelope (format 2) around the document."""
    document = _encoder.encode(m)
    if signing_key is None:
        return seal(document)
    from casstore import signing

    envelope = SignedEnvelope(
        format=constants.SIGNED_MANIFEST_FORMAT_VERSION,
        manifest=document,
        signature=Signature(
            algorithm=signing.ALGORITHM,
            public_key=signing_key.public.raw,
            signature=signing_key.sign(document),
        ),
    )
    return seal(_encoder.encode(envelope))


def seal(body: bytes) -> bytes:
    """Frame a msgpack body as a manifest file: magic, then the body's digest."""
    return constants.MANIFEST_MAGIC + chunking.digest(body) + body


def decode(blob: bytes, *, source: str = "manifest") -> Manifest:
    """Check, strictly decode and validate a manifest, signed or not (a signature is
    verified). Raises :class:`InvalidManifest`."""
    return decode_signed(blob, source=source).manifest


def decode_signed(blob: bytes, *, source: str = "manifest") -> Decoded:
    """Check, strictly decode and validate a manifest, and tell who signed it. Raises
    :class:`InvalidManifest`; a signature that does not verify is one.

    The digest in the header makes any damaged byte an error rather than, say, a file
    restored under another name or mode.
    """
    if len(blob) > constants.MAX_MANIFEST_BYTES:
        raise InvalidManifest(f"{source}: {len(blob)} bytes exceeds the manifest size limit")
    magic, size = constants.MANIFEST_MAGIC, len(constants.MANIFEST_MAGIC)
    if blob[:size] != magic:
        raise InvalidManifest(f"{source}: not a casstore manifest (bad magic)")
    digest, body = blob[size : size + constants.DIGEST_SIZE], blob[size + constants.DIGEST_SIZE :]
    if chunking.digest(body) != digest:
        raise InvalidManifest(f"{source}: manifest is damaged (digest mismatch)")
    if _format_of(body, source) == constants.SIGNED_MANIFEST_FORMAT_VERSION:
        return _open_envelope(body, source)
    return Decoded(decode_body(body, source=source), None)


def _format_of(body: bytes, source: str) -> int:
    try:
        return msgspec.msgpack.decode(body, type=_Header).format
    except (msgspec.DecodeError, ValueError) as e:  # invalid UTF-8 raises ValueError
        raise InvalidManifest(f"{source}: not a casstore manifest ({e})") from e


def _open_envelope(body: bytes, source: str) -> Decoded:
    from casstore import signing

    try:
        envelope = msgspec.msgpack.decode(body, type=SignedEnvelope)
    except msgspec.ValidationError as e:
        if "unknown field" in str(e):
            raise UnsupportedManifest(
                f"{source}: signed manifest does not match this casstore's schema ({e}); "
                "written by a newer casstore?"
            ) from e
        raise InvalidManifest(f"{source}: malformed signed manifest ({e})") from e
    except (msgspec.DecodeError, ValueError) as e:
        raise InvalidManifest(f"{source}: malformed signed manifest ({e})") from e
    sig = envelope.signature
    if sig.algorithm != signing.ALGORITHM:
        raise UnsupportedManifest(
            f"{source}: signed with {sig.algorithm!r}, which this casstore does not know; "
            "upgrade casstore"
        )
    if not signing.verify(sig.public_key, sig.signature, envelope.manifest):
        signer = (
            signing.PublicKey(sig.public_key)
            if len(sig.public_key) == signing.PUBLIC_KEY_SIZE
            else "a malformed key"
        )
        raise InvalidManifest(
            f"{source}: signature does not verify (claims signer {signer}): the manifest "
            "was altered or forged"
        )
    # The signed document itself must be a plain format-1 manifest, not another envelope.
    if _format_of(envelope.manifest, source) != constants.MANIFEST_FORMAT_VERSION:
        raise InvalidManifest(f"{source}: a signed manifest must wrap a format-1 document")
    return Decoded(decode_body(envelope.manifest, source=source), sig.public_key)


def decode_body(blob: bytes, *, source: str = "manifest") -> Manifest:
    """Strictly decode and validate a manifest body (msgpack, without the header)."""
    try:
        header = msgspec.msgpack.decode(blob, type=_Header)
    except (msgspec.DecodeError, ValueError) as e:  # invalid UTF-8 raises ValueError
        raise InvalidManifest(f"{source}: not a casstore manifest ({e})") from e
    if header.format != constants.MANIFEST_FORMAT_VERSION:
        # Only a newer format may be a valid manifest this version cannot read.
        newest = constants.SIGNED_MANIFEST_FORMAT_VERSION
        error = UnsupportedManifest if header.format > newest else InvalidManifest
        raise error(
            f"{source}: manifest format {header.format} is not supported by this casstore "
            f"(reads formats {constants.MANIFEST_FORMAT_VERSION}-{newest}); upgrade casstore"
        )
    try:
        m = msgspec.msgpack.decode(blob, type=Manifest)
    except msgspec.ValidationError as e:
        if "unknown field" not in str(e):
            raise InvalidManifest(f"{source}: malformed manifest ({e})") from e
        # Well-formed, with a field this version does not know: perhaps written by a
        # newer casstore, so gc must treat it as possibly live.
        raise UnsupportedManifest(
            f"{source}: manifest does not match this casstore's schema ({e}); written by a "
            "newer casstore?"
        ) from e
    except (msgspec.DecodeError, ValueError) as e:
        raise InvalidManifest(f"{source}: malformed manifest ({e})") from e
    validate(m, source=source)
    return m


def check_path(path: str) -> None:
    """Reject any path that is not a plain relative path inside the destination."""
    if not path:
        raise UnsafePath("empty path")
    if "\x00" in path or "\\" in path:
        raise UnsafePath(f"path {path!r} contains NUL or backslash")
    if len(path.encode("utf-8", "surrogatepass")) > constants.MAX_PATH_BYTES:
        raise UnsafePath(f"path {path[:80]!r}... is too long")
    if path.startswith("/"):
        raise UnsafePath(f"path {path!r} is absolute")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"path {path!r} is not normalised (empty, '.' or '..' component)")


def validate(m: Manifest, *, source: str = "manifest") -> None:
    # created_at orders manifests ("newest wins") and names compacted ones: NaN would make
    # that order meaningless and infinity cannot become a name, so both are refused here,
    # where a bad document is one invalid manifest and not a crash of every reader and gc.
    if not (math.isfinite(m.created_at) and 0 <= m.created_at <= constants.MAX_MANIFEST_TIME):
        raise InvalidManifest(f"{source}: impossible created_at {m.created_at!r}")
    if len(m.files) > constants.MAX_FILES_PER_MANIFEST:
        raise InvalidManifest(f"{source}: too many files ({len(m.files)})")
    seen: set[str] = set()
    dirs: set[str] = set()
    for f in m.files:
        check_entry(f, source)
        if f.path in seen:
            raise InvalidManifest(f"{source}: duplicate path {f.path!r}")
        seen.add(f.path)
        parts = f.path.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    clash = seen & dirs
    if clash:
        raise InvalidManifest(f"{source}: {sorted(clash)[0]!r} is both a file and a directory")


def check_entry(f: FileEntry, source: str = "manifest") -> None:
    """Raise :class:`InvalidManifest` (or :class:`UnsafePath`) unless ``f`` is a possible
    entry: a safe path, sizes and digests of the right shape, chunks adding up to the
    file."""
    try:
        check_path(f.path)
    except UnsafePath as e:
        raise UnsafePath(f"{source}: {e}") from None
    if not 0 <= f.size <= constants.MAX_FILE_SIZE:
        raise InvalidManifest(f"{source}: {f.path!r} declares impossible size {f.size}")
    if not 0 <= f.mode <= 0o7777:
        raise InvalidManifest(f"{source}: {f.path!r} has invalid mode {f.mode:o}")
    if len(f.digest) != constants.DIGEST_SIZE:
        raise InvalidManifest(f"{source}: {f.path!r} has a malformed digest")
    if len(f.chunks) > f.size:
        # Every chunk holds at least one byte: more chunks than bytes is hostile.
        raise InvalidManifest(f"{source}: {f.path!r} lists more chunks than bytes")
    total = 0
    for c in f.chunks:
        if len(c.digest) != constants.DIGEST_SIZE:
            raise InvalidManifest(f"{source}: {f.path!r} has a malformed chunk digest")
        if not 0 < c.size <= constants.CHUNK_MAX_SIZE:
            raise InvalidManifest(f"{source}: {f.path!r} has a chunk of size {c.size}")
        total += c.size
    if total != f.size:
        raise InvalidManifest(f"{source}: {f.path!r} chunks add up to {total} bytes, not {f.size}")


def merge(manifests: Iterable[Manifest]) -> dict[str, FileEntry]:
    """Union of the manifests' files; for a path in several, the newest manifest wins.

    Pass the manifests oldest first, as :meth:`casstore.Store.read_manifests` returns them
    (ordered by time, then name): between manifests of the same time, the later one in
    that order (the greater name) wins. A path that clashes with a newer one (a file where
    the newer has a directory, or the reverse) is dropped, so the merged view can always
    be written out.
    """
    view: dict[str, FileEntry] = {}
    dirs: set[str] = set()
    # A stable sort keeps the caller's order among equal times; reversing it afterwards
    # (not sort(reverse=True), which keeps ties in input order) puts each tie's winner first.
    newest_first = sorted(manifests, key=lambda m: m.created_at)
    newest_first.reverse()
    for m in newest_first:
        for f in m.files:
            parts = f.path.split("/")
            parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
            if f.path in view or f.path in dirs or any(p in view for p in parents):
                continue
            view[f.path] = f
            dirs.update(parents)
    return dict(sorted(view.items()))

"""The store: save a directory tree under a key, load it back byte for byte.

Save: scan the tree, cut every file into chunks, upload only chunks the store lacks, then
publish one immutable manifest listing what changed. Load: merge the key's manifests, and
for each file not already present, fetch and verify its chunks into a temp file that is
renamed into place only when complete. See docs/format.md for the exact protocol.
"""

from __future__ import annotations

import builtins
import collections
import functools
import itertools
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from casstore import (
    chunk_index,
    chunking,
    config,
    constants,
    dictionaries,
    localfs,
    packs,
    restore,
    statcache,
    usage,
)
from casstore import manifest as mf
from casstore.backends.base import Backend
from casstore.backends.fs import FileSystemBackend, temp_name
from casstore.chunk_index import ChunkIndex, IndexCache
from casstore.config import check_root, is_s3_url
from casstore.errors import (
    CacheTooLarge,
    CannotRenew,
    CasstoreError,
    CorruptObject,
    FormatMismatch,
    InvalidManifest,
    NotFound,
    NotTrusted,
    StoreUnavailable,
    UnsafePath,
)
from casstore.intents import Intent
from casstore.keys import CacheKey
from casstore.locks import best_effort_lock
from casstore.manifest import ChunkRef, FileEntry, Manifest

if TYPE_CHECKING:
    from casstore.signing import SigningKey, TrustedKeys

log = logging.getLogger("casstore")
_T = TypeVar("_T")
# Manifests larger than this are not read to explain a miss (a key's key is in any of them).
_EXPLAIN_MANIFEST_BYTES = 4 * 2**20

#: ``progress(done_bytes, total_bytes)``; called from worker threads.
ProgressCallback = Callable[[int, int], None]


@dataclass
class SaveReport:
    key: CacheKey
    files: int = 0  # regular files in the tree
    bytes: int = 0  # their total size
    changed_files: int = 0  # files new or different from what the key already held
    chunks: int = 0  # chunk references of the changed files
    new_chunks: int = 0  # chunks this save uploaded
    new_bytes: int = 0  # uncompressed bytes of those chunks
    stored_bytes: int = 0  # compressed bytes written to the store (packs)
    packs: int = 0  # packs this save published
    manifest: str | None = None  # published manifest name; None when nothing changed
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    seconds: float = 0.0


@dataclass
class LoadReport:
    key: CacheKey
    files: int = 0  # files in the merged manifests
    written: int = 0  # files fetched and written
    skipped: int = 0  # files already present and identical
    missing: list[str] = field(default_factory=list)  # files not restored (missing/corrupt)
    bytes_fetched: int = 0  # compressed bytes read from the store
    bytes_written: int = 0
    manifests: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class StoredManifest:
    """A valid manifest of a key, its object name, and who signed it."""

    name: str
    manifest: Manifest
    signer: bytes | None  # the ed25519 public key whose signature verified; None: unsigned


@dataclass(frozen=True)
class KeyInfo:
    key: CacheKey
    manifests: int
    files: int
    bytes: int
    last_saved: float
    # Distinct signers of its manifests, oldest first (None: unsigned).
    signers: tuple[builtins.bytes | None, ...] = ()


class _Counter:
    """Thread-safe running totals and the optional progress callback."""

    def __init__(self, total: int, progress: ProgressCallback | None) -> None:
        self.total = total
        self.done = 0
        self._progress = progress
        self._lock = threading.Lock()

    def advance(self, n: int) -> None:
        with self._lock:
            self.done += n
            done = self.done
        if self._progress is not None:
            self._progress(done, self.total)


#: Store formats this casstore refuses, and what they were.
_OLDER_FORMATS = {1: "one object per chunk", 2: "packs without dictionaries"}


def _layout_doc() -> dict[str, object]:
    return {
        "format": constants.FORMAT_VERSION,
        "digest": constants.DIGEST_ALGORITHM,
        "compression": constants.COMPRESSION,
        "chunker": chunking.chunker_params(),
        "fanout_chars": constants.FANOUT_CHARS,
    }


class Store:
    """A content-addressed store of directory trees.

    ``Store(root)`` opens the store at ``root`` on a POSIX filesystem, creating it if
    needed; ``Store(backend=...)`` opens one on any :class:`Backend`.

    ``signing_key``: saves sign the manifests they publish. ``trusted``: loads use only
    manifests signed by one of these keys (None: every valid manifest, signed or not).
    ``record_usage``: each load and save leaves a small usage record (:mod:`casstore.usage`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        backend: Backend | None = None,
        threads: int | None = None,
        fsync: bool = True,
        create: bool = True,
        signing_key: SigningKey | None = None,
        trusted: TrustedKeys | None = None,
        record_usage: bool = True,
    ) -> None:
        self.root: Path | None = None  # the directory of a filesystem store
        if backend is None:
            if root is None:
                raise TypeError("Store() needs a root path or a backend")
            check_root(root)  # before Path() turns "s3://b/x" into a local "s3:/b/x"
            if is_s3_url(os.fspath(root)):
                from casstore.backends.s3 import S3Backend

                s3 = S3Backend(os.fspath(root))
                s3.check()  # a missing bucket or refused credentials: one clear error now
                backend = s3
            else:
                fs = FileSystemBackend(root, fsync=fsync)
                if create:
                    fs.ensure_root()
                elif not fs.root.is_dir():
                    raise StoreUnavailable(f"no store at {fs.root}")
                backend = fs
                self.root = fs.root
        elif isinstance(backend, FileSystemBackend):
            self.root = backend.root
        self.backend = backend
        if threads is None:
            # An object store answers each request after a network round trip, not a
            # disk seek: more requests in flight pay off (docs/s3-benchmarks.md).
            network = not isinstance(self.backend, FileSystemBackend)
            threads = constants.OBJECT_STORE_THREADS if network else constants.DEFAULT_THREADS
        self.threads = max(1, threads)
        self.signing_key = signing_key
        self.trusted = trusted
        self.record_usage = record_usage
        self._warned_unsigned = False
        self._check_layout(create)

    def __repr__(self) -> str:
        return f"Store({self.backend.describe()})"

    @property
    def location(self) -> str:
        """Where the store is, as a user names it: its directory, or its ``s3://`` URL."""
        return str(self.root) if self.root is not None else self.backend.describe()

    # --- layout ----------------------------------------------------------------------------

    def _check_layout(self, create: bool) -> None:
        expected = _layout_doc()
        try:
            blob = self.backend.get(constants.LAYOUT_FILE)
        except NotFound:
            if not create:
                raise StoreUnavailable(f"{self.backend.describe()} is not a casstore") from None
            if self.backend.holds_other_files():
                # Load refuses such a root (no layout file): save must refuse it too, not
                # quietly start a store among someone's files.
                raise StoreUnavailable(
                    f"{self.backend.describe()} is not a casstore (no {constants.LAYOUT_FILE}"
                    " file) and is not empty; point the store root at a new or empty "
                    "directory"
                ) from None
            encoded = json.dumps(expected, indent=2, sort_keys=True).encode() + b"\n"
            try:
                self.backend.put_if_absent(constants.LAYOUT_FILE, encoded)
            except OSError as e:
                raise StoreUnavailable(
                    f"cannot initialise store {self.backend.describe()}: {e}"
                ) from e
            blob = self.backend.get(constants.LAYOUT_FILE)
        except OSError as e:
            raise StoreUnavailable(f"cannot read store {self.backend.describe()}: {e}") from e
        try:
            found = json.loads(blob)
        except ValueError as e:
            raise FormatMismatch(f"{constants.LAYOUT_FILE} is not valid JSON: {e}") from e
        older = _OLDER_FORMATS.get(found.get("format"))
        if older is not None:
            raise FormatMismatch(
                f"{self.location} is a format {found.get('format')} store ({older}), which "
                f"this casstore does not read (format {expected['format']}: packs whose "
                "blocks may be compressed with a dictionary of stored chunks). Point the "
                "store root at a new, empty directory or prefix; saves fill it again "
                "(docs/format.md)"
            )
        if found.get("format") != expected["format"]:
            raise FormatMismatch(
                f"store format {found.get('format')} is not supported by this casstore "
                f"(format {expected['format']}); upgrade casstore"
            )
        if found != expected:
            raise FormatMismatch(
                f"store layout differs from this casstore's (found {found}, "
                f"expected {expected}); every writer must chunk the same way"
            )

    # --- manifests ---------------------------------------------------------------------------

    @staticmethod
    def _manifest_prefix(key_id: str) -> str:
        return f"{constants.MANIFESTS_DIR}/{key_id}/"

    def manifests(self, key: CacheKey) -> list[StoredManifest]:
        """Every valid manifest of ``key`` that this store trusts, oldest first.

        Invalid manifests are logged and left out, and so are manifests no trusted key
        signed (when the store has trusted keys), in one warning naming them and their
        signers. Raises :class:`InvalidManifest` when manifests exist but none is valid,
        :class:`NotTrusted` when valid ones exist but none is trusted, :class:`NotFound`
        when there are none.
        """
        found, errors = self.read_manifests(key.id, key)
        if not found:
            if errors:
                raise InvalidManifest(f"every manifest of key {key} is invalid: {errors[0]}")
            raise NotFound(f"no saved cache for key {key}")
        if self.trusted is None:
            return found
        trusted = [s for s in found if self.trusted.trusts(s.signer)]
        ignored = [s for s in found if not self.trusted.trusts(s.signer)]
        if ignored:
            log.warning(
                "ignoring %d manifests of %s that no trusted key signed (%s): %s",
                len(ignored),
                key,
                self.trusted.source,
                ", ".join(f"{shown(s.name)} ({signer_text(s.signer)})" for s in ignored),
            )
        if not trusted:
            signers = ", ".join(sorted({signer_text(s.signer) for s in ignored}))
            raise NotTrusted(
                f"no manifest of key {key} is signed by a trusted key ({len(ignored)} "
                f"ignored: {signers})"
            )
        return trusted

    def read_manifests(
        self,
        key_id: str,
        key: CacheKey | None = None,
        *,
        seen: dict[str, StoredManifest | str] | None = None,
    ) -> tuple[list[StoredManifest], list[str]]:
        """(valid manifests oldest first, errors) under ``manifests/<key_id>/``, trusted or
        not: signatures are verified (a bad one makes a manifest invalid), trust is
        :meth:`manifests`' business.

        The key's directory is listed until two listings in a row name the same
        manifests, every one of them read. gc compacts a key by publishing the merged
        manifest before it deletes the old ones, so a load that lists the key while that
        happens sees old manifests vanish (between its listing and its reading, or inside
        the listing itself, where the filesystem drops them unseen) and the next listing
        shows the merged one: a load racing compaction still sees the whole key. Each
        manifest is read once, however many listings name it; should the key never
        settle, every manifest read is used (they are immutable, and the merged ones
        repeat what they replaced).

        ``seen``: the manifests an earlier call of the same operation read (it is filled
        in): a name is never given other bytes, so those are not read again.
        """
        prefix = self._manifest_prefix(key_id)
        # name -> manifest, or why it is ignored
        read: dict[str, StoredManifest | str] = {} if seen is None else seen
        previous: list[str] | None = None
        chosen: list[str] | None = None
        listed: set[str] = set()  # by this call's listings
        for _listing in range(_MANIFEST_LISTINGS):
            names = sorted(
                info.key
                for info in self.backend.list(prefix)
                if info.key.endswith(constants.MANIFEST_SUFFIX)
            )
            listed.update(names)
            for name in names:
                if name not in read:
                    outcome = self._read_manifest(name, key_id, key)
                    if outcome is not None:  # None: it vanished
                        read[name] = outcome
            if names == previous and all(name in read for name in names):
                chosen = names
                break
            previous = names
        if chosen is None:
            log.info("manifests of key %s kept changing while read; using all of them", key_id)
            chosen = [name for name in read if name in listed]
        found = [m for n in chosen if isinstance(m := read[n], StoredManifest)]
        errors = [m for n in chosen if isinstance(m := read[n], str)]
        found.sort(key=lambda s: (s.manifest.created_at, s.name))
        return found, errors

    def _read_manifest(
        self,
        name: str,
        key_id: str,
        key: CacheKey | None,
        *,
        max_bytes: int = constants.MAX_MANIFEST_BYTES,
    ) -> StoredManifest | str | None:
        """The manifest ``name``; a string saying why it is ignored (damaged, forged,
        another key's, over ``max_bytes``); None when it has vanished."""
        try:
            blob = self.backend.get(name, max_bytes=max_bytes)
            decoded = mf.decode_signed(blob, source=shown(name))
        except NotFound:
            return None
        except (InvalidManifest, CorruptObject) as e:
            log.warning("ignoring invalid manifest: %s", e)
            return str(e)
        m = decoded.manifest
        if m.key.id != key_id or (key is not None and m.key != key):
            log.warning("ignoring %s: it belongs to key %s", shown(name), m.key)
            return f"{shown(name)}: stored under the wrong key"
        return StoredManifest(name, m, decoded.signer)

    def recent_manifests(
        self, *, limit: int = 32, max_bytes: int = 16 * 2**20
    ) -> Iterator[Manifest]:
        """The valid ones of the ``limit`` most recently published manifests of every key
        (manifest names start with their creation time), read one by one as the caller
        goes on. Names dated more than a day ahead (a broken clock, or a writer putting
        itself first) and manifests over ``max_bytes`` are passed over: one writer must not
        make every save read much."""
        ahead = time.time_ns() + 86_400 * 10**9
        names = []
        for info in self.backend.list(f"{constants.MANIFESTS_DIR}/"):
            name = info.key.rsplit("/", 1)[-1]
            stamp = name.split("-", 1)[0]
            if (
                info.key.endswith(constants.MANIFEST_SUFFIX)
                and info.key.count("/") == 2
                and stamp.isdigit()
                and int(stamp) <= ahead
                and info.size <= max_bytes
            ):
                names.append(info.key)
        names.sort(key=lambda n: n.rsplit("/", 1)[-1], reverse=True)
        for name in names[:limit]:
            outcome = self._read_manifest(name, name.split("/")[1], None, max_bytes=max_bytes)
            if isinstance(outcome, StoredManifest):
                yield outcome.manifest

    def files(self, key: CacheKey) -> dict[str, FileEntry]:
        """The merged view of ``key``: every file a load would restore."""
        return mf.merge(s.manifest for s in self.manifests(key))

    def _key_ids(self) -> list[str]:
        """The names of the key directories under ``manifests/``, sorted."""
        return sorted(
            {
                info.key.split("/")[1]
                for info in self.backend.list(f"{constants.MANIFESTS_DIR}/")
                if info.key.count("/") == 2
            }
        )

    def keys(self) -> Iterator[KeyInfo]:
        """One :class:`KeyInfo` per key that has at least one valid manifest."""
        for key_id in self._key_ids():
            loaded, _errors = self.read_manifests(key_id)
            if not loaded:
                continue
            key = loaded[-1].manifest.key
            view = mf.merge(s.manifest for s in loaded)
            yield KeyInfo(
                key=key,
                manifests=len(loaded),
                files=len(view),
                bytes=sum(f.size for f in view.values()),
                last_saved=loaded[-1].manifest.created_at,
                signers=tuple({s.signer: None for s in loaded}),
            )

    def stored_keys(self, *, budget: float | None = None) -> tuple[list[CacheKey], bool]:
        """The key of every key directory, read from its newest manifest that decodes (one
        small read per key, not a merge), and whether all were read within ``budget``
        seconds. For explaining a miss on a load's path: bounded in time whatever the
        store holds (the deadline is checked at every listed name and every read, and only
        manifests up to 4 MiB are read), and silent about what it skips."""
        end = None if budget is None else time.monotonic() + budget

        def late() -> bool:
            return end is not None and time.monotonic() > end

        names: dict[str, list[str]] = collections.defaultdict(list)
        for info in self.backend.list(f"{constants.MANIFESTS_DIR}/"):
            if late():
                return [], False
            parts = info.key.split("/")
            if len(parts) == 3 and parts[2].endswith(constants.MANIFEST_SUFFIX):
                names[parts[1]].append(info.key)
        found: list[CacheKey] = []
        for key_id in sorted(names):
            for name in sorted(names[key_id], reverse=True):
                if late():
                    return found, False
                try:
                    blob = self.backend.get(name, max_bytes=_EXPLAIN_MANIFEST_BYTES)
                    key = mf.decode(blob, source=shown(name)).key
                except Exception:  # anything a damaged or hostile manifest raises
                    continue
                if key.id == key_id:
                    found.append(key)
                    break
        return found, True

    def resolve(self, ref: str) -> CacheKey:
        """A key from its id or an unambiguous id prefix (as ``casstore ls`` prints)."""
        ref = ref.strip().lower()
        matches = []
        # Only the keys whose directory name matches are read (not every manifest of the
        # store); a key counts if it has a valid manifest.
        for key_id in [k for k in self._key_ids() if k.startswith(ref)] if ref else []:
            loaded, _errors = self.read_manifests(key_id)
            if loaded and loaded[-1].manifest.key.id.startswith(ref):
                matches.append(loaded[-1].manifest.key)
        if not matches:
            raise NotFound(f"no key with id {ref!r}")
        if len(matches) > 1:
            raise NotFound(f"key id prefix {ref!r} is ambiguous ({len(matches)} keys)")
        return matches[0]

    # --- save ---------------------------------------------------------------------------

    def save(
        self,
        src_dir: str | os.PathLike[str],
        key: CacheKey,
        *,
        max_bytes: int | None = None,
        exclude: Callable[[str], bool] | None = None,
        lock_timeout: float = 60.0,
        progress: ProgressCallback | None = None,
    ) -> SaveReport:
        """Save the regular files under ``src_dir`` as ``key``.

        Only files new or different from the key's current merged view are uploaded and
        listed in the new manifest; unchanged trees publish nothing. Raises
        :class:`CacheTooLarge` before uploading anything when the tree exceeds ``max_bytes``.
        """
        started = time.monotonic()
        src = Path(src_dir)
        if not src.is_dir():
            raise NotFound(f"{src} is not a directory")
        if self.trusted is not None and self.signing_key is None and not self._warned_unsigned:
            self._warned_unsigned = True
            log.warning(
                "saving unsigned manifests while trusting only signed ones (%s): loads "
                "with these trusted keys will ignore this save; set CASSTORE_SIGNING_KEY",
                self.trusted.source,
            )
        report = SaveReport(key=key)
        scanned_ns = time.time_ns()
        local = list(localfs.scan_tree(src, report.skipped, exclude))
        report.files = len(local)
        report.bytes = sum(f.size for f in local)
        if max_bytes is not None and report.bytes > max_bytes:
            raise CacheTooLarge(
                f"{src} holds {report.bytes / 2**20:.1f} MiB, over the "
                f"{max_bytes / 2**20:.0f} MiB cap; nothing was uploaded"
            )
        lock_path = self._lock_path(key)
        # The key's manifests this save has read (names are never given other bytes): each
        # reading of its view below decodes only the ones it has not seen.
        seen: dict[str, StoredManifest | str] = {}
        with best_effort_lock(lock_path, lock_timeout) if lock_path else nullcontext(False):
            if max_bytes is not None:
                # Loads apply the same cap to the key's merged view: refuse a save that
                # would grow the key past it, or no replica could restore the key. Checked
                # before the use is recorded: a refused save is no use, so a key stuck
                # over the cap still ages out.
                mine = {f.rel for f in local}
                before = self._current_view(key, seen)
                merged = report.bytes + sum(e.size for p, e in before.items() if p not in mine)
                if merged > max_bytes:
                    raise CacheTooLarge(
                        f"the key would hold {merged / 2**20:.1f} MiB after this save, over "
                        f"the {max_bytes / 2**20:.0f} MiB cap; nothing was uploaded"
                    )
            # A save is a use of the key. Recorded before the view this save works from is
            # read, so a gc that sets the key aside after that read sees the use when it
            # re-checks the key, and puts it back (docs/gc.md).
            self._record_use(key)
            # Read the current view under the lock: a replica that waited for another's
            # upload of the same key then finds nothing left to do.
            current = self._current_view(key, seen)
            # An object store cannot renew the packs this save reuses: announce their
            # chunks before looking for any, so that gc gives back any pack it deletes
            # meanwhile (intents.py).
            intent = None if self.backend.renews_age else Intent(self.backend)
            stat_cache = self._stat_cache(key, src)
            # Files in the state this host recorded them in: their entries, unread.
            known = stat_cache.load() if stat_cache else {}
            surveyed = _Survey.of_known(local, known)
            try:
                if intent is not None:
                    surveyed = self._survey(local, current, surveyed)
                    intent.announce(surveyed.digests)
                # Which chunks any earlier save of any model stored: read after the
                # announcement, so every chunk found here is protected (docs/gc.md).
                index = self.chunk_index()
                entries = self._upload(local, current, report, progress, intent, index, surveyed)
                changed = [e for e in entries if current.get(e.path) != e]
                report.changed_files = len(changed)
                report.chunks = sum(len(e.chunks) for e in changed)
                if changed:
                    # Every chunk of every listed file is present now: _upload returned
                    # only entries whose chunks it found (and renewed) or packed, and
                    # published every pack (and its index) it wrote.
                    report.manifest = self._publish_manifest(key, changed)
                if current:
                    self._relist_lost(key, entries, report, seen)
            finally:
                if intent is not None:
                    intent.close()
        if stat_cache is not None:
            # A file changed since the scan may not hold the bytes its entry was made
            # from in the state the scan saw: recorded only if still in that state. An
            # entry recorded already for the state the scan saw (and found in it again
            # when listed) describes that state whatever happened since: recorded again
            # without another look. Nothing is written when nothing changed.
            scanned = {f.rel: f for f in local}
            states = {
                e.path: (scanned[e.path].signature, e)
                for e in entries
                if not statcache.is_racy(scanned[e.path].signature, scanned_ns)
                and (
                    known.get(e.path) == (scanned[e.path].signature, e)
                    or localfs.current_signature(scanned[e.path].path) == scanned[e.path].signature
                )
            }
            if states != known:
                stat_cache.record(states)
        report.seconds = time.monotonic() - started
        self._note(
            "save",
            usage.SAVE_SAVED if report.manifest else usage.SAVE_UNCHANGED,
            key,
            files=report.changed_files,
            nbytes=report.new_bytes,
            seconds=report.seconds,
        )
        log.info(
            "saved %s: %d files, %d changed, %d new chunks (%.1f MiB) in %.2fs",
            key,
            report.files,
            report.changed_files,
            report.new_chunks,
            report.new_bytes / 2**20,
            report.seconds,
        )
        return report

    def _current_view(
        self, key: CacheKey, seen: dict[str, StoredManifest | str]
    ) -> dict[str, FileEntry]:
        """What this saver's manifests already hold for ``key``: the manifests it would
        sign (its own signer's), or every valid one when it does not sign. ``seen``: the
        manifests this save read already (see read_manifests).

        A signed save must not skip a file because an unsigned or otherwise-signed
        manifest lists it: loaders that trust only this saver's key would never get it.
        """
        found, _errors = self.read_manifests(key.id, key, seen=seen)
        if self.signing_key is not None:
            own = self.signing_key.public.raw
            found = [s for s in found if s.signer == own]
        return mf.merge(s.manifest for s in found)

    def _publish_manifest(self, key: CacheKey, files: list[FileEntry]) -> str:
        m = mf.new_manifest(key, files)
        name = self._manifest_prefix(key.id) + mf.new_manifest_name(m.created_at)
        self.backend.put_if_absent(name, mf.encode(m, self.signing_key))
        return name

    def _relist_lost(
        self,
        key: CacheKey,
        entries: list[FileEntry],
        report: SaveReport,
        seen: dict[str, StoredManifest | str],
    ) -> None:
        """Publish again the files of this save that the key no longer lists.

        This save listed only what differed from the view it read; if the manifests of
        that view vanished since (``casstore rm``, or a gc dropping the key), the unchanged
        files would be lost although this replica holds them. Their chunks were renewed by
        this save, so listing them again is safe."""
        view = self._current_view(key, seen)
        lost = [e for e in entries if e.path not in view]
        if lost:
            log.warning(
                "%s: %d files vanished from the key during the save; listing them again",
                key,
                len(lost),
            )
            report.manifest = self._publish_manifest(key, lost)
            report.changed_files += len(lost)

    def _note(
        self,
        op: str,
        outcome: str,
        key: CacheKey,
        *,
        files: int = 0,
        nbytes: int = 0,
        seconds: float = 0.0,
    ) -> None:
        """Leave a usage record of this load or save, unless the store records none."""
        if self.record_usage:
            usage.record(
                self.backend, op, outcome, key, files=files, nbytes=nbytes, seconds=seconds
            )

    @staticmethod
    def access_key(key_id: str) -> str:
        return f"{constants.ACCESS_DIR}/{key_id}"

    def _record_use(self, key: CacheKey) -> None:
        """Mark ``key`` as used now, for gc's age and LRU policies: one ``utime`` per load
        (a marker file per key), never a manifest rewrite. Best effort: a read-only store
        still loads."""
        marker = self.access_key(key.id)
        try:
            try:
                found = self.backend.refresh(marker)
            except CannotRenew:
                # New bytes where times are whole seconds (object stores): gc tells a use
                # during its run by the marker's ETag changing.
                content = b"" if self.backend.renews_age else str(time.time_ns()).encode()
                self.backend.republish(marker, content)
                found = True
            if not found:
                self.backend.put_if_absent(marker, b"")
        except (OSError, NotImplementedError) as e:
            log.debug("could not record use of %s: %s", key, e)

    def _lock_path(self, key: CacheKey) -> Path | None:
        if isinstance(self.backend, FileSystemBackend):
            return self.backend.root / constants.LOCKS_DIR / f"{key.id}.lock"
        return None

    def _save_streamed(
        self,
        f: localfs.LocalFile,
        old: FileEntry | None,
        ensure_chunk: Callable[[memoryview, ChunkRef, bool], None],
        chunk_pool: ThreadPoolExecutor,
    ) -> FileEntry | None:
        """Cut, hash and upload a large file as it is read, a few chunks in memory at a
        time; None if it changed while being read (what was uploaded is harmless:
        content-addressed chunks that no manifest lists)."""
        in_flight: collections.deque[Future[None]] = collections.deque()

        def upload(data: bytes, ref: ChunkRef) -> None:
            if len(in_flight) >= 2 * self.threads:
                in_flight.popleft().result()
            in_flight.append(chunk_pool.submit(ensure_chunk, memoryview(data), ref, False))

        try:
            entry = _streamed_entry(f, old, upload)
            while in_flight:
                in_flight.popleft().result()
        finally:
            for fut in in_flight:
                fut.cancel()
        return entry

    def _survey(
        self, local: list[localfs.LocalFile], current: dict[str, FileEntry], known: _Survey
    ) -> _Survey:
        """The first pass of a save to an object store: each file's entry from its bytes as
        they are now, so that all their chunks are announced before any is looked for
        (intents.py). The second pass lists a file as this pass read it when the file is
        as it was then and its chunks are all in the store; it reads again every other
        file (one that changed since, or with a chunk the store lacks), new chunks
        announced one by one. A file that changes while this pass reads it, or cannot be
        read, is left to the second pass; the chunks cut from it are announced anyway.
        Files ``known`` (unchanged since this host recorded them) are not read."""

        def survey(batch: list[localfs.LocalFile]) -> _Survey:
            found = _Survey()
            for f in batch:
                old = current.get(f.rel)
                cut: list[bytes] = []

                def note(_: bytes, ref: ChunkRef, into: list[bytes] = cut) -> None:
                    into.append(ref.digest)

                try:
                    if f.size >= constants.STREAM_MIN_FILE_SIZE:
                        entry = _streamed_entry(f, old, note)
                    else:
                        data = localfs.read_stable(f)
                        entry = None if data is None else _entry_of(f.rel, data, f.mode, old)
                except OSError as e:
                    log.debug("%s: could not read it ahead (%s); read again when saved", f.rel, e)
                    entry = None
                found.digests.update(cut)
                if entry is not None:
                    # Paired with the state the scan saw: a file changed since then, even
                    # before this read, is read again by the second pass.
                    found.digests.update(r.digest for r in entry.chunks)
                    found.entries[f.rel] = (entry, f.signature)
            return found

        # Reading from the page cache and hashing: CPU work, one thread per core (more
        # only contend: 0.33 s instead of 0.14 s for 120 MiB with 8 threads on 2 cores).
        workers = min(self.threads, _cores())
        merged = _Survey(dict(known.entries), set(known.digests))
        unknown = [f for f in local if f.rel not in known.entries]
        with ThreadPoolExecutor(workers, thread_name_prefix="casstore-survey") as pool:
            for part in pool.map(survey, _batches(unknown, lambda f: f.size)):
                merged.entries.update(part.entries)
                merged.digests |= part.digests
        return merged

    def _stat_cache(self, key: CacheKey, tree: Path) -> statcache.StatCache | None:
        """What this host recorded of ``tree``'s files for ``key`` in this store."""
        directory = config.stat_cache_dir()
        if directory is None:
            return None
        return statcache.StatCache(directory, self.location, key.id, tree)

    def chunk_index(self) -> ChunkIndex:
        """Which chunks the store holds and where (every pack's index; those read before
        come from this host's cache)."""
        cache_dir = config.index_cache_dir()
        cache = IndexCache(cache_dir, self.location) if cache_dir is not None else None
        return chunk_index.load(self.backend, cache=cache, threads=self.threads)

    def _pack_present(self, pack_id: str) -> bool:
        """Whether a pack is there, renewing its age where the backend can (gc's grace
        then protects every chunk in it). A pack this user cannot renew (another user's,
        on a volume without a shared group) counts as absent: the save packs its own copy
        of the chunks it needs rather than list chunks gc could sweep."""
        key = packs.pack_key(pack_id)
        if not self.backend.renews_age:
            return self.backend.stat(key) is not None  # protected by the save's intent
        try:
            return self.backend.refresh(key)
        except CannotRenew:
            return False

    def _upload(
        self,
        local: list[localfs.LocalFile],
        current: dict[str, FileEntry],
        report: SaveReport,
        progress: ProgressCallback | None,
        intent: Intent | None,
        index: ChunkIndex,
        surveyed: _Survey,
    ) -> list[FileEntry]:
        """Cut, check and pack. A chunk the index places in a pack that is still there
        (renewed, or announced by ``intent`` on an object store) is reused; every other
        goes into this save's packs, each published (then its index) as it fills, the
        last ones before this returns. A file ``surveyed`` (by the first pass of a save to an
        object store, or recorded by this host), unchanged since and whose chunks are all
        in the store, is not read again."""
        counter = _Counter(report.bytes, progress)
        present: set[bytes] = set()  # chunks known to be in the store during this save
        pack_state: dict[str, bool] = {}  # pack id -> present (and renewed) for this save
        pack_locks: dict[str, threading.Lock] = {}
        stats_lock = threading.Lock()
        dictionary_state: dict[tuple[bytes, ...], bool] = {}  # dictionary -> its chunks kept
        dictionary_lock = threading.Lock()

        def publish(sealed: list[packs.Sealed]) -> None:
            for one in sealed:
                try:
                    packs.publish(self.backend, one)
                except PermissionError as e:
                    raise CannotRenew(
                        f"cannot renew the packs this save reuses (written by another "
                        f"user), nor write packs of its own ({e.strerror or e}); give every "
                        "writer of the store one group, setgid directories and umask 002 "
                        "(docs/deploy.md)",
                        key=packs.pack_key(one.id),
                    ) from e
                with stats_lock:
                    report.packs += 1
                    report.stored_bytes += len(one.data)

        def look(pack_id: str, fresh: bool) -> bool:
            """Whether a pack is present (and renewed): one look per pack and save however
            many threads need it at once, or a new one when ``fresh``."""
            with stats_lock:
                pack_lock = pack_locks.setdefault(pack_id, threading.Lock())
            with pack_lock:
                if fresh or pack_id not in pack_state:
                    pack_state[pack_id] = self._pack_present(pack_id)
                return pack_state[pack_id]

        def reusable(digest: bytes) -> bool:
            late = intent is not None and not intent.covers(digest)
            if late and intent is not None:
                # A chunk not in the first pass (its file changed since): announced
                # before it is looked for, like the others, and looked for afresh: an
                # earlier look at its pack predates the announcement, and gc may have
                # moved the pack since without a reason to give it back.
                intent.announce([digest])
            for loc in reversed(index.locate(digest)):
                block = loc.index.blocks[loc.chunk.block]
                # A copy in a block compressed with a dictionary serves only while the
                # dictionary's chunks are kept too (docs/gc.md, S1).
                if look(loc.index.id, late) and (
                    block.plain or dictionary_kept(loc.index.dictionaries[block.dictionary])
                ):
                    return True
            return False

        def keep_plain(digests: tuple[bytes, ...] | list[bytes]) -> dict[bytes, str]:
            """Those of ``digests`` found in a present (renewed) pack, in a block without a
            dictionary (where a dictionary's chunks are read from), and that pack's id. On
            an object store they are announced first, together, and their packs looked at
            afresh.

            One copy of each is kept, the most recently published present one, as
            ``reusable`` does: renewing every copy would keep young the pack a repack
            copied the chunk out of, which is then never freed (docs/gc.md)."""
            candidates = {d: dictionaries.plain_locations(index, d) for d in digests}
            if intent is not None:
                intent.announce(candidates)
            fresh = intent is not None
            looked: dict[str, bool] = {}  # one look per pack, however many chunks it holds

            def present(pack_id: str) -> bool:
                if pack_id not in looked:
                    looked[pack_id] = look(pack_id, fresh)
                return looked[pack_id]

            kept: dict[bytes, str] = {}
            for d, locs in candidates.items():
                for loc in reversed(locs):
                    if present(loc.index.id):
                        kept[d] = loc.index.id
                        break
            return kept

        def dictionary_kept(digests: tuple[bytes, ...]) -> bool:
            with dictionary_lock:
                kept = dictionary_state.get(digests)
                if kept is None:
                    kept = dictionary_state[digests] = len(keep_plain(digests)) == len(set(digests))
            return kept

        def reference() -> packs.Reference | None:
            """The dictionary this save's blocks of small files are compressed with: chunks
            other saves stored, kept like the chunks a save reuses, read back and checked.
            Never fails the save: without one, blocks are stored plain."""
            try:
                candidates = dictionaries.choose(index, self.recent_manifests())
                kept = keep_plain(candidates)
                wanted = [d for d in candidates if d in kept]
                budget = constants.DICTIONARY_TARGET + constants.CHUNK_MAX_SIZE
                # Read from the copy kept, and only there: bytes read from another copy
                # (the kept one damaged) would make a dictionary whose source gc may sweep.
                found, _ = dictionaries.fetch(
                    self.backend, index, wanted, max_bytes=budget, only_from=kept
                )
            except (CasstoreError, OSError) as e:
                log.warning("no dictionary for this save's blocks: %s", e)
                return None
            picked = [(d, found[d]) for d in candidates if d in found]
            # The bytes as read, not as any index or manifest said: a dictionary readers
            # refuse to rebuild would lose the blocks compressed with it.
            picked = dictionaries.newest_within(picked, constants.DICTIONARY_TARGET)
            return packs.Reference.of(picked) if picked else None

        builder = packs.PackBuilder(reference=reference if config.dictionaries_enabled() else None)

        def ensure_chunk(data: memoryview, ref: ChunkRef, small: bool) -> None:
            """Make sure ``ref`` (the digest of ``data``) is in the store: reused, or packed
            by this save."""
            with stats_lock:
                # Claimed by the first thread to meet it: the manifest is published only
                # after every thread is done and every pack is out, so the others need
                # not wait for it.
                if ref.digest in present:
                    return
                present.add(ref.digest)
            if not reusable(ref.digest):
                publish(builder.add(ref.digest, data, small=small))
                with stats_lock:
                    report.new_chunks += 1
                    report.new_bytes += ref.size

        with (
            ThreadPoolExecutor(self.threads, thread_name_prefix="casstore-file") as files_pool,
            ThreadPoolExecutor(self.threads, thread_name_prefix="casstore-chunk") as chunk_pool,
        ):

            def ensure_all(view: memoryview, refs: list[ChunkRef], offsets: list[int]) -> None:
                if len(refs) == 1:  # most files: no hand-off to another thread
                    ensure_chunk(view, refs[0], True)
                elif refs:
                    futures: list[Future[None]] = [
                        chunk_pool.submit(ensure_chunk, view[o : o + r.size], r, True)
                        for o, r in zip(offsets, refs, strict=False)
                    ]
                    for fut in futures:
                        fut.result()

            def stored(digest: bytes) -> bool:
                """Whether a chunk is in the store (or packed by this save) already."""
                with stats_lock:
                    if digest in present:
                        return True
                if not reusable(digest):
                    return False
                with stats_lock:
                    present.add(digest)
                return True

            def settled(f: localfs.LocalFile) -> FileEntry | None:
                """The entry of a file read by the first pass (or recorded by this host)
                and not changed since, every chunk found: nothing to pack, nothing to
                read again."""
                known = surveyed.unchanged_entry(f)
                if known is not None and all(stored(r.digest) for r in known.chunks):
                    counter.advance(f.size)
                    return known
                return None

            def save_file(f: localfs.LocalFile) -> FileEntry | None:
                if f.size >= constants.STREAM_MIN_FILE_SIZE:
                    entry = self._save_streamed(f, current.get(f.rel), ensure_chunk, chunk_pool)
                else:
                    entry = save_small_file(f)
                if entry is None:
                    with stats_lock:
                        report.skipped.append((f.rel, "changed while being read"))
                counter.advance(f.size)
                return entry

            def save_small_file(f: localfs.LocalFile) -> FileEntry | None:
                data = localfs.read_stable(f)
                if data is None:
                    return None
                # Unchanged files too: their chunks are still checked (and their age
                # refreshed), so a chunk lost since (gc race, disk damage repaired by
                # quarantine) is packed again from these local bytes: saves heal the store.
                entry = _entry_of(f.rel, data, f.mode, current.get(f.rel))
                offsets = list(itertools.accumulate((r.size for r in entry.chunks), initial=0))
                ensure_all(memoryview(data), list(entry.chunks), offsets)
                return entry

            def save_batch(batch: list[localfs.LocalFile]) -> list[FileEntry | None]:
                return [save_file(f) for f in batch]

            # The packs of the chunks already known are looked at together, in parallel,
            # before any file: a large file's chunks span many packs, and its thread would
            # otherwise look at them one after another, a round trip each on an object store.
            # One task per pack, not per chunk: handing 2,300 chunks of an unchanged tree
            # to threads one by one cost more than the looks (0.1 s on 2 cores).
            newest = {locs[-1].index.id for d in surveyed.digests if (locs := index.locate(d))}
            for _ in chunk_pool.map(lambda pack_id: look(pack_id, False), sorted(newest)):
                pass
            # Files settled by those looks need no thread: an unchanged tree starts none
            # (32 thread starts cost 0.05 s of a 0.15 s re-save on 2 cores).
            done: dict[str, FileEntry | None] = {
                f.rel: entry for f in local if (entry := settled(f)) is not None
            }
            unsettled = [f for f in local if f.rel not in done]
            batches = _batches(unsettled, lambda f: f.size)
            read = [e for b in files_pool.map(save_batch, batches) for e in b]
            done.update((f.rel, e) for f, e in zip(unsettled, read, strict=True))
            results = [done[f.rel] for f in local]
        publish(builder.finish())
        return [e for e in results if e is not None]

    # --- load ---------------------------------------------------------------------------

    def load(
        self,
        key: CacheKey,
        dest_dir: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        group: Callable[[str], str | None] | None = None,
        progress: ProgressCallback | None = None,
        record_miss: bool = True,
    ) -> LoadReport:
        """Restore ``key`` into ``dest_dir``. Raises :class:`NotFound` for an unknown key.

        Files already present with identical bytes are left alone. A file whose chunks are
        missing or corrupt is reported in ``missing`` and never written.

        ``max_bytes``: when the key's files add up to more, raise :class:`CacheTooLarge`
        before writing anything (``dest_dir`` is not even created).

        ``group(path)``: files whose group is the same string are restored all-or-nothing.
        Each is fetched and verified into a temp file beside its target; the temps are
        renamed into place only once every file of the group was fetched (a file already
        present and identical counts as fetched). Otherwise every temp of the group is
        discarded, none of its files is written, and all of them are reported in
        ``missing``. Files whose group is None are restored one by one.

        ``record_miss=False``: a key with no manifest leaves no usage record (an optional
        side tree, absent by design, is not a miss).
        """
        started = time.monotonic()
        try:
            loaded = self.manifests(key)
        except NotFound:  # NotTrusted included
            if record_miss:
                self._note("load", usage.LOAD_MISS, key)
            raise
        view = mf.merge(s.manifest for s in loaded)
        total = sum(f.size for f in view.values())
        if max_bytes is not None and total > max_bytes:
            raise CacheTooLarge(
                f"{key} holds {total / 2**20:.1f} MiB in {len(view)} files, over the "
                f"{max_bytes / 2**20:.1f} MiB cap; nothing was restored"
            )
        self._record_use(key)
        report = LoadReport(key=key, files=len(view), manifests=len(loaded))
        dest = Path(dest_dir)
        # Directories this load made (the destination itself, when it made it): no file
        # can be in the way there, so their files are not looked for before writing.
        created: set[str] = set()
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.mkdir()
            created.add(os.fspath(dest))
        except FileExistsError:  # a directory or not: checked below
            pass
        if dest.is_symlink() or not dest.is_dir():
            raise StoreUnavailable(f"destination {dest} is not a directory")
        counter = _Counter(total, progress)
        stats_lock = threading.Lock()
        trash = restore.PackTrash(self.backend)
        dest_str = os.fspath(dest)
        made_dirs: set[str] = set()  # directories this load verified or created
        stat_cache = self._stat_cache(key, dest)
        known = stat_cache.load() if stat_cache is not None else {}
        states: statcache.Known = {}  # what to record of the files in place after this load
        started_ns = time.time_ns()
        groups: dict[str, _Group] = {}
        group_of: dict[str, _Group] = {}
        if group is not None:
            for entry in view.values():
                name = group(entry.path)
                if name is not None:
                    g = groups.setdefault(name, _Group(name))
                    g.entries.append(entry)
                    g.pending += 1
                    group_of[entry.path] = g

        def tally(entry: FileEntry, outcome: str, staged: _Staged | None = None) -> None:
            # Called with stats_lock held.
            # Recorded for the next load or save of this directory; a file found in place
            # only if it did not change just before it was hashed; a file written only if
            # no one else could write it between its chmod and the reading of its state
            # (with a saved mode letting the group or others write, they could, within
            # the same timestamp tick: docs/decisions.md).
            signature = staged.signature if staged is not None else None
            if (
                staged is not None
                and staged.verified
                and signature is not None
                and (
                    (outcome == "written" and not entry.mode & _OTHERS_WRITE)
                    or (outcome == "skipped" and not statcache.is_racy(signature, started_ns))
                )
            ):
                states[entry.path] = (signature, entry)
            if outcome == "written":
                report.written += 1
                report.bytes_written += entry.size
            elif outcome == "skipped":
                report.skipped += 1
            else:
                report.missing.append(entry.path)

        def finish_group(g: _Group) -> None:
            """Publish a group whose files were all staged, or discard it."""
            if g.failed:
                for _, staged in g.staged:
                    staged.discard()
                log.warning(
                    "%s not restored: %d of its files could not be fetched or verified",
                    g.name,
                    g.unfetched,
                )
                with stats_lock:
                    for entry in g.entries:
                        tally(entry, "missing")
                return
            outcomes: list[tuple[FileEntry, str, _Staged | None]] = []
            # Deepest paths first: an index sits above the artifacts it names (vLLM's
            # vllm_compile_cache.py beside inductor_cache/), so should the renames stop
            # midway (a crash, a full disk), no index names an artifact not yet there.
            g.staged.sort(key=lambda es: (-es[0].path.count("/"), es[0].path))
            try:
                # Every file is checked (still the file written, or hashed) and given its
                # mode before the first rename: one swapped by someone else fails the
                # group before any of it appears.
                for _, staged in g.staged:
                    staged.give_mode()
                for entry, staged in g.staged:
                    outcomes.append((entry, staged.publish(), staged))
            except OSError as e:  # renaming failed: the rest of the group is discarded
                if e.errno in restore.FATAL_ERRNOS:
                    raise
                log.warning("%s only partly restored: %s", g.name, e)
            finally:
                for entry, staged in g.staged[len(outcomes) :]:
                    staged.discard()
                    outcomes.append((entry, "missing", None))
                with stats_lock:
                    for entry, outcome, published in outcomes:
                        tally(entry, outcome, published)

        jobs: dict[restore.FileJob, tuple[str, int]] = {}  # job -> target, mode

        def settle(entry: FileEntry, staged: _Staged | None, fd: int | None = None) -> None:
            """One file is ready to appear (``staged``, ``fd`` an open descriptor of its
            temp file if any) or could not be restored (None): published now, or with the
            rest of its group."""
            g = group_of.get(entry.path)
            if g is None:
                outcome = "missing"
                if staged is not None:
                    try:
                        outcome = staged.publish(fd)
                    except OSError as e:
                        if e.errno in restore.FATAL_ERRNOS:
                            raise
                        log.warning("could not restore %s: %s", entry.path, e)
                with stats_lock:
                    tally(entry, outcome, staged)
            else:
                with stats_lock:
                    if staged is None:
                        g.failed = True
                        g.unfetched += 1
                    else:
                        g.staged.append((entry, staged))
                    g.pending -= 1
                    last = g.pending == 0
                if last:
                    finish_group(g)
            counter.advance(entry.size)

        def survey(batch: list[FileEntry]) -> None:
            """Leave identical files alone; give every other one a temp file to fill."""
            for entry in batch:
                try:
                    prepared = self._prepare_file(
                        dest_str, entry, made_dirs, created, known, entry.path in group_of
                    )
                except (CasstoreError, OSError) as e:
                    if isinstance(e, OSError) and e.errno in restore.FATAL_ERRNOS:
                        raise
                    log.warning("could not restore %s: %s", entry.path, e)
                    settle(entry, None)
                    continue
                if isinstance(prepared, _Staged):
                    settle(entry, prepared)
                else:
                    with stats_lock:
                        jobs[prepared[0]] = prepared[1:]

        def finished(job: restore.FileJob, fd: int) -> None:
            target, mode = jobs[job]
            assert job.tmp is not None  # made before its first chunk was written
            # Every chunk was checked as it was written, but not the file's own digest (a
            # manifest may lie about it): recorded only where the chunks tell the digest.
            # Hashing the others here would cost every cold load what it saves a re-save.
            staged = _Staged(target, job.tmp, mode, verified=_trivially_described(job.entry))
            if job.entry.path in group_of:  # renamed later, once its group is complete
                staged.written = localfs.signature_of(os.fstat(fd))
            settle(job.entry, staged, fd)
            if staged.tmp is None:  # in place now: nothing to clean up
                job.tmp = None

        try:
            # The destination is local: surveying it (lstat, mkdir) and writing into it
            # are CPU work, like decompressing and verifying blocks. More threads than
            # cores only contend for the interpreter and the kernel: restoring 2,003 files
            # (108 MiB) from a FUSE mount on 2 cores took 0.45 s with 4 readers, 0.37 s
            # with 2. From an object store a second reader per core hides the round trip
            # each request waits (docs/decisions.md).
            cores = _cores()
            local = isinstance(self.backend, FileSystemBackend)
            readers = cores if local else 2 * cores
            survey_threads = min(self.threads, cores)
            with ThreadPoolExecutor(survey_threads, thread_name_prefix="casstore-file") as pool:
                for _ in pool.map(survey, _batches(list(view.values()), lambda e: e.size)):
                    pass
            if jobs:
                index = self.chunk_index()
                outcome = restore.fetch_files(
                    self.backend,
                    index,
                    list(jobs),
                    threads=min(self.threads, readers),
                    blocks_per_read=1 if local else 2,
                    finished=finished,
                    trash=trash,
                    reload=self.chunk_index,
                    dictionaries=dictionaries.Rebuilder(
                        self.backend, index, reload=self.chunk_index, trash_key=trash.key_of
                    ),
                )
                report.bytes_fetched += outcome.bytes_fetched
                for job in outcome.failed:
                    if job.tmp is not None:
                        _unlink_quietly(job.tmp)
                    log.warning("%s not restored: %s", job.entry.path, job.failed)
                    settle(job.entry, None)
        finally:
            # A load stopped midway (a full disk…): no temp file stays behind.
            for job in jobs:
                if job.tmp is not None:
                    _unlink_quietly(job.tmp)
            for g in groups.values():
                if g.pending:
                    for _, staged in g.staged:
                        staged.discard()
        report.missing.sort()
        if stat_cache is not None:
            stat_cache.record(states)
        report.seconds = time.monotonic() - started
        self._note(
            "load",
            usage.LOAD_PARTIAL if report.missing else usage.LOAD_COMPLETE,
            key,
            files=report.written,
            nbytes=report.bytes_written,
            seconds=report.seconds,
        )
        log.info(
            "loaded %s: %d written, %d already present, %d missing in %.2fs",
            key,
            report.written,
            report.skipped,
            len(report.missing),
            report.seconds,
        )
        if report.missing:
            log.warning(
                "partial restore of %s: restored %d of %d files, %d missing; "
                "could not be restored: %s%s",
                key,
                report.written + report.skipped,
                report.files,
                len(report.missing),
                ", ".join(report.missing[:5]),
                ", …" if len(report.missing) > 5 else "",
            )
        return report

    def _prepare_file(
        self,
        dest: str,
        entry: FileEntry,
        made_dirs: set[str],
        created: set[str],
        known: statcache.Known,
        grouped: bool,
    ) -> _Staged | tuple[restore.FileJob, str, int]:
        """The target already in place with identical bytes (staged, perhaps for a mode
        change), or a job to fill a new temp file beside it, made when its first chunk
        comes (with its target and mode). A target in the state this host recorded it in
        (``known``) is not hashed again; one in a directory this load made (``created``)
        is not looked for, unless it belongs to a group (``grouped``): a directory another
        process put in its way must fail the group before any of it is published."""
        parent = localfs.safe_parent(dest, entry.path, made_dirs, created)
        target = os.path.join(parent, entry.path.rsplit("/", 1)[-1])
        mode = entry.mode & 0o777
        create = functools.partial(_create_temp, parent)
        if parent in created and not grouped:
            # Whatever appeared there since (another load of this key, say) is replaced
            # by the checked bytes, as a load replaces any file that differs; a directory
            # fails this file when it is renamed.
            return restore.FileJob(entry, create), target, mode
        try:
            st = os.lstat(target)
        except FileNotFoundError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UnsafePath(f"{entry.path}: a directory is in the way")
        if st is not None and stat.S_ISREG(st.st_mode) and st.st_size == entry.size:
            signature = localfs.signature_of(st)
            recorded = known.get(entry.path)
            # In the recorded state, recorded as this very entry: these are its bytes.
            unchanged = recorded is not None and recorded == (signature, entry)
            if unchanged or localfs.file_digest(target, entry.size) == entry.digest:
                chmod = stat.S_IMODE(st.st_mode) != mode
                # A file matched by its digest alone is recorded only where the chunk list
                # cannot differ from it (one chunk, or none).
                verified = unchanged or _trivially_described(entry)
                return _Staged(target, None, mode if chmod else None, signature, verified)
        return restore.FileJob(entry, create), target, mode


@dataclass
class _Staged:
    """A file ready to appear: its complete, verified temp file (``tmp``), or None when the
    target already holds identical bytes (``chmod``: the mode to give the temp file, or to
    fix on the target, if any)."""

    target: str
    tmp: str | None
    chmod: int | None
    signature: localfs.Signature | None = None  # the target's state, once in place
    # Whether the entry's chunk list is known to describe these bytes: only then may
    # this host record the file (statcache.py).
    verified: bool = False
    written: localfs.Signature | None = None  # the complete temp file's state
    moded: bool = False  # the file has its saved mode

    def give_mode(self, fd: int | None = None) -> None:
        """Give the file its saved mode exactly (the umask, a default ACL or a caller's
        thread changing the umask meanwhile have no say). A temp file gets it only once
        complete (until the rename it is its owner's alone): through ``fd``, a descriptor
        of it still open, or else through one opened anew and checked to be the very file
        the load wrote, in the very state it left it (``written``). A present file whose
        mode differs gets it the same way, checked against the state it was hashed in."""
        if self.moded or self.chmod is None:
            return
        if self.tmp is None:
            self.signature = _chmod_checked(self.target, self.signature, self.chmod)
            self.moded = True
            return
        try:
            if fd is not None:
                os.fchmod(fd, self.chmod)
            else:
                self.written = _chmod_checked(self.tmp, self.written, self.chmod, made=True)
        except BaseException:
            self.discard()
            raise
        self.moded = True

    def publish(self, fd: int | None = None) -> str:
        """Put the file in place. ``fd``: a descriptor of the temp file, still open.

        The state recorded (statcache.py) is the state of the very file this load wrote or
        checked after the rename or chmod (which change its ctime), never that of a file
        another writer renamed into place in between: read through ``fd`` when there is
        one, else by path and kept only if it is still the same file."""
        self.give_mode(fd)
        if self.tmp is None:
            return "skipped"
        try:
            os.replace(self.tmp, self.target)
        except BaseException:
            self.discard()
            raise
        self.tmp = None
        if fd is not None:
            self.signature = localfs.signature_of(os.fstat(fd))
        else:
            self.signature = _same_file(self.written, localfs.current_signature(self.target))
        return "written"

    def discard(self) -> None:
        if self.tmp is not None:
            _unlink_quietly(self.tmp)
            self.tmp = None


# Mode bits letting someone other than the owner write a file.
_OTHERS_WRITE = stat.S_IWGRP | stat.S_IWOTH


def _chmod_checked(
    path: str, checked: localfs.Signature | None, mode: int, *, made: bool = False
) -> localfs.Signature:
    """Give ``path`` ``mode`` if it is still the file the load wrote or checked
    (``checked``), and return its state then: never through a symlink, nor to another
    file, put there by whoever else can write the directory (a temp file waiting for the
    rest of its group, a present file while it was hashed). ``made``: a file this
    process made, so also its own, with one name."""
    # The whole state, not the inode number alone: a file removed and another made in its
    # place may get the same number at once (ext4 reuses it); its ctime differs but for
    # one made within the same timestamp tick, which another user's is not.
    fd, _ = localfs.open_checked(
        path,
        os.O_RDONLY,
        lambda st: localfs.signature_of(st) == checked and (not made or localfs.made_here(st)),
    )
    try:
        os.fchmod(fd, mode)
        return localfs.signature_of(os.fstat(fd))
    finally:
        os.close(fd)


def _same_file(
    before: localfs.Signature | None, after: localfs.Signature | None
) -> localfs.Signature | None:
    """``after``, if it is the state of the same file (device and inode) as ``before``."""
    if before is None or after is None or before[:2] != after[:2]:
        return None
    return after


@dataclass
class _Group:
    """Files restored all-or-nothing (``Store.load(group=...)``)."""

    name: str
    entries: list[FileEntry] = field(default_factory=list)
    staged: list[tuple[FileEntry, _Staged]] = field(default_factory=list)
    pending: int = 0  # files not yet staged (or given up)
    failed: bool = False
    unfetched: int = 0  # files that could not be fetched or verified


def _create_temp(parent: str) -> tuple[str, int]:
    """A new, empty temp file in ``parent`` and a descriptor open for writing it: readable
    and writable by its owner only until it is complete and given its mode, right before
    it is renamed (in a shared directory, no one else may change bytes already checked)."""
    tmp = os.path.join(parent, temp_name())
    return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# Listings of a key's manifests before a read gives up waiting for them to settle.
_MANIFEST_LISTINGS = 10


def _batches(
    items: list[_T], size_of: Callable[[_T], int], max_bytes: int = 4 << 20, max_items: int = 32
) -> list[list[_T]]:
    """Group small items so a worker thread gets a few MiB of work per hand-off; handing
    files one by one costs more in thread switching than a small file costs to process."""
    batches: list[list[_T]] = []
    current: list[_T] = []
    current_bytes = 0
    for item in items:
        current.append(item)
        current_bytes += size_of(item)
        if current_bytes >= max_bytes or len(current) >= max_items:
            batches.append(current)
            current, current_bytes = [], 0
    if current:
        batches.append(current)
    return batches


def _with_mode(entry: FileEntry, mode: int) -> FileEntry:
    return FileEntry(entry.path, entry.size, mode, entry.digest, entry.chunks)


def signer_text(signer: bytes | None) -> str:
    """``signed by ed25519:…`` or ``unsigned``, for messages."""
    from casstore.signing import signer_name

    return "unsigned" if signer is None else f"signed by {signer_name(signer)}"


def shown(name: str) -> str:
    """An object name for a message: as it is when printable, else escaped. Names come
    from listings anyone who can write the store controls; a newline in one must not
    forge a line of the log."""
    return name if name.isprintable() else ascii(name)


def _cores() -> int:
    """The cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class _Survey:
    """What a save knows before its second pass: each file's entry with the file's state
    when it was read (by the first pass of a save to an object store, or recorded by this
    host), and every chunk digest to announce."""

    entries: dict[str, tuple[FileEntry, localfs.Signature]] = field(default_factory=dict)
    digests: set[bytes] = field(default_factory=set)

    @classmethod
    def of_known(cls, local: list[localfs.LocalFile], known: statcache.Known) -> _Survey:
        """The files scanned in the state this host recorded them in, with their entries."""
        found = cls()
        for f in local:
            recorded = known.get(f.rel)
            if recorded is not None and recorded[0] == f.signature:
                found.entries[f.rel] = (recorded[1], f.signature)
                found.digests.update(r.digest for r in recorded[1].chunks)
        return found

    def unchanged_entry(self, f: localfs.LocalFile) -> FileEntry | None:
        """The entry known for ``f``, if the file is still in the state it was read in:
        looked at again, since a save may wait for its key's lock after the scan, and a
        file rewritten meanwhile must be listed as it is now."""
        found = self.entries.get(f.rel)
        if found is None or localfs.current_signature(f.path) != found[1]:
            return None
        return found[0]


def _streamed_entry(
    f: localfs.LocalFile,
    old: FileEntry | None,
    on_chunk: Callable[[bytes, ChunkRef], None] | None = None,
) -> FileEntry | None:
    """A large file's entry, cut and hashed as it is read (``on_chunk`` sees each chunk),
    a few chunks in memory at a time; None if it changed while being read."""
    opened = localfs.open_stable(f)
    if opened is None:
        return None
    fd, before = opened
    whole = chunking.hasher()
    refs: list[ChunkRef] = []
    try:
        with os.fdopen(os.dup(fd), "rb", buffering=0) as stream:
            for digest, data in chunking.cut_stream(stream):
                whole.update(data)
                ref = ChunkRef(digest, len(data))
                refs.append(ref)
                if on_chunk is not None:
                    on_chunk(data, ref)
        unchanged = localfs.still_unchanged(fd, before, sum(r.size for r in refs))
    finally:
        os.close(fd)
    if not unchanged:
        return None
    entry = FileEntry(f.rel, before.st_size, f.mode, whole.digest(), tuple(refs))
    return old if old == entry else entry


_EMPTY_DIGEST = chunking.digest(b"")


def _trivially_described(entry: FileEntry) -> bool:
    """Whether any bytes with the entry's digest are also the bytes its chunk list names:
    no chunk (an empty file), or one chunk whose digest is the file's."""
    if not entry.chunks:
        return entry.digest == _EMPTY_DIGEST
    return len(entry.chunks) == 1 and entry.chunks[0].digest == entry.digest


def _entry_of(rel: str, data: bytes, mode: int, old: FileEntry | None) -> FileEntry:
    """A small file's entry: the key's current one when these are its bytes and its chunk
    list holds (checked against the bytes: a manifest's lying chunk list must not keep
    another file's chunk out of the store), else the bytes cut afresh."""
    whole = chunking.digest(data)
    if old is not None and old.digest == whole and old.size == len(data):
        wrong = _wrong_chunk(data, old.chunks, whole)
        if wrong is None:
            return old if old.mode == mode else _with_mode(old, mode)
        log.warning(
            "%s: the key lists chunk %s that these bytes do not hold; saving the file anew",
            rel,
            wrong.hex(),
        )
    refs = tuple(ChunkRef(c.digest, c.length) for c in chunking.cut(memoryview(data)))
    return FileEntry(rel, len(data), mode, whole, refs)


def _wrong_chunk(data: bytes, refs: tuple[ChunkRef, ...], whole: bytes) -> bytes | None:
    """The first of ``refs`` that the bytes at its place in ``data`` do not match."""
    if len(refs) == 1 and refs[0].size == len(data):
        # One chunk spanning the file: its digest is the file's, already computed.
        return None if refs[0].digest == whole else refs[0].digest
    view, offset = memoryview(data), 0
    for ref in refs:
        if chunking.digest(view[offset : offset + ref.size]) != ref.digest:
            return ref.digest
        offset += ref.size
    return None if offset == len(data) else (refs[-1].digest if refs else whole)

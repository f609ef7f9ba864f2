"""gc's sweep: deleting packs without ever losing a chunk a save is about to list.

A candidate is a pack object with the chunks it holds (its *members*, from its index) and
those of them another pack holds too, published before the grace (*covered*: a copy every
host sees, often one an earlier run's repack made). Only its other members can make it
needed.

Two strategies, by what the backend can do (:attr:`Backend.renews_age`, docs/gc.md):

* **by rename** (a filesystem): each candidate is renamed into ``trash/<run>/`` (atomic,
  keeps its mtime), then its mtime says whether a saver renewed it meanwhile: back it
  goes, or it is deleted;
* **by intents** (an object store: no rename, no renewal): each batch of candidates is
  moved to trash, then the intents of running saves and the manifests published since
  planning are read again, and every trashed chunk one of them lists goes back.

Both finish, at the start of a run, what a crashed run left in ``trash/``. gc (gc.py)
plans and decides; this module only sweeps what it is given and says what it did.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from casstore import constants, packs
from casstore import manifest as mf
from casstore.backends.fs import FileSystemBackend
from casstore.chunk_index import ChunkIndex
from casstore.errors import (
    CasstoreError,
    CorruptObject,
    InvalidManifest,
    NotFound,
    UnsupportedManifest,
)
from casstore.intents import Active
from casstore.intents import active as active_intents
from casstore.store import Store

log = logging.getLogger("casstore")

#: ``progress(done, total)`` over the candidates.
ProgressCallback = Callable[[int, int], None]
#: The chunks a pack holds, by pack id; None when its index cannot be read now.
MembersOf = Callable[[str], frozenset[bytes] | None]


@dataclass(frozen=True)
class Candidate:
    """A pack gc would delete: its key and size, the chunks it holds, and those of them
    another pack holds too (so none of those makes it needed)."""

    key: str
    size: int
    members: frozenset[bytes]
    covered: frozenset[bytes] = frozenset()

    @property
    def needed_by(self) -> frozenset[bytes]:
        """The members only this pack holds: if a save or a manifest lists one, it stays."""
        return self.members - self.covered


Candidates = list[Candidate]

# Candidates an object-store sweep moves to trash before it looks at the intents again.
OBJECT_SWEEP_BATCH = 256
# A crashed run's trash is finished by another run only once it is this old: younger, it
# may be another gc's sweep in progress.
TRASH_AGE = 600.0

_RUN_CUTOFF_RE = re.compile(r"-c(\d+)-")


@dataclass
class Tally:
    """What a sweep or a recovery did."""

    deleted: int = 0
    bytes_freed: int = 0
    kept: int = 0  # candidates spared: referenced, renewed or announced during the sweep
    restored: int = 0  # packs a crashed run had trashed, given back
    errors: list[str] = field(default_factory=list)
    deleted_packs: list[str] = field(default_factory=list)  # pack ids deleted for good

    def count(self, item: Candidate, outcome: str) -> bool:
        """Count a swept candidate's ``deleted`` or ``kept``; False for any other outcome."""
        if outcome == "deleted":
            self.deleted += 1
            self.bytes_freed += item.size
            if (pack_id := packs.pack_id_from_key(item.key)) is not None:
                self.deleted_packs.append(pack_id)
        elif outcome == "kept":
            self.kept += 1
        else:
            return False
        return True


def trash_run_name(cutoff: float) -> str:
    """``trash/`` subdirectory of one sweep. It records the run's cutoff, so that a later
    run finishing this one's sweep after a crash judges each chunk as this run would."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-c{int(cutoff)}-{uuid.uuid4().hex[:8]}"


def real_dir(path: Path) -> bool:
    """A directory of the store that is really one: anyone who can write the store could
    replace it with a symlink to elsewhere, where gc must delete nothing."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


# --- the manifests published since planning ------------------------------------------------


@dataclass
class NewManifests:
    """The chunks of the manifests published since planning, read again and again during
    a sweep: manifests are immutable, so each is read once (``read``: name -> chunks)."""

    read: dict[str, frozenset[bytes]] = field(default_factory=dict)
    #: Every pack index read so far (the plan's, then those published since): where the
    #: new manifests' chunks lie, and so which dictionaries they need.
    index: ChunkIndex = field(default_factory=ChunkIndex)
    #: Indexes not to read again: damaged (their packs serve nothing), or of packs gc
    #: found surely gone when it planned.
    ignored: set[str] = field(default_factory=set)


def chunks_of_new_manifests(
    store: Store, seen: frozenset[str], cache: NewManifests | None = None
) -> set[bytes] | None:
    """Digests of the chunks every manifest published since planning (not in
    ``seen``) lists; None when one of them could not be judged (unreadable now, or from a
    newer casstore): the caller then protects everything. Only a manifest deleted since
    the listing, or one nothing can ever load (damaged, hostile), is skipped."""
    cache = cache if cache is not None else NewManifests()
    protected: set[bytes] = set()
    for info in store.backend.list(f"{constants.MANIFESTS_DIR}/"):
        if info.key in seen or not info.key.endswith(constants.MANIFEST_SUFFIX):
            continue
        if info.key not in cache.read:
            try:
                blob = store.backend.get(info.key, max_bytes=constants.MAX_MANIFEST_BYTES)
                m = mf.decode(blob, source=info.key)
            except NotFound:
                continue  # deleted since the listing
            except UnsupportedManifest:
                return None
            except (InvalidManifest, CorruptObject):
                continue  # nothing can ever load it
            except (CasstoreError, OSError) as e:
                log.warning("gc: cannot read new manifest %s (%s): protecting all", info.key, e)
                return None
            cache.read[info.key] = frozenset(c.digest for f in m.files for c in f.chunks)
        protected |= cache.read[info.key]
    if protected:
        needed = _dictionary_chunks(store, cache, protected)
        if needed is None:
            return None
        protected |= needed
    return protected


def _dictionary_chunks(store: Store, cache: NewManifests, chunks: set[bytes]) -> set[bytes] | None:
    """The chunks the dictionaries of blocks holding ``chunks`` name (a new manifest's
    chunk may lie in a block compressed with one, in a pack published since planning
    too): every index the store lists now is read, those read before from ``cache``.
    None when one cannot be read now (it could name any chunk)."""
    damaged, unreadable = cache.index.catch_up(store.backend, skip=cache.ignored)
    cache.ignored.update(damaged)  # their packs serve no chunk: no dictionary needed
    if unreadable:
        pack_id, why = next(iter(unreadable.items()))
        log.warning("gc: cannot read pack index %s (%s): protecting all", pack_id, why)
        return None
    return cache.index.dictionary_chunks(chunks)


# --- by rename (a filesystem) -------------------------------------------------------------


def _sweep_pack(fs: FileSystemBackend, key: str, trash_key: str, cutoff: float) -> str:
    """Move one candidate to trash, then delete it unless a saver refreshed it meanwhile.

    A refresh that landed before the move shows in the moved file's mtime (rename keeps
    it): the pack goes back. A refresh after the move finds no file, so that saver packs
    the chunks it needed again. Either way no manifest is left pointing at nothing.
    """
    if not fs.move(key, trash_key):
        return "gone"
    info = fs.stat(trash_key)
    if info is not None and info.mtime >= cutoff:
        if not fs.move(trash_key, key):  # a saver re-uploaded it already
            fs.delete(trash_key)
        return "kept"
    fs.delete(trash_key)
    return "deleted"


def by_rename(
    fs: FileSystemBackend,
    candidates: Candidates,
    cutoff: float,
    threads: int,
    progress: ProgressCallback | None,
) -> Tally:
    """Sweep ``candidates`` on a filesystem: whatever a saver renewed after ``cutoff``
    (this host's clock, as the files' mtimes) goes back."""
    tally = Tally()
    run_trash = f"{constants.TRASH_DIR}/{trash_run_name(cutoff)}"
    lock = threading.Lock()
    done = 0

    def sweep(item: Candidate) -> None:
        nonlocal done
        key = item.key
        outcome = _sweep_pack(fs, key, f"{run_trash}/{key.rsplit('/', 1)[-1]}", cutoff)
        with lock:
            done += 1
            tally.count(item, outcome)
        if progress is not None:
            progress(done, len(candidates))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(sweep, candidates))
    remove_empty_dir(fs.root / run_trash)
    return tally


def recover_renamed(
    fs: FileSystemBackend, cutoff: float, live: set[bytes], members: MembersOf
) -> Tally:
    """Finish the sweeps of gc runs that crashed. A trashed pack goes back to packs/
    when a live manifest lists one of its chunks (``live``; ``members(pack id)``: what it
    holds, None when its index is unreadable) or when it was refreshed after the crashed
    run's cutoff (or this run's, whichever is earlier); the rest is deleted.

    Anyone who can write the store can plant things in trash/: only real directories and
    regular files are handled (never followed through a symlink), and whatever vanishes or
    cannot be removed (another gc finishing the same run) is skipped, never fatal."""
    tally = Tally()
    if not real_dir(fs.root / constants.TRASH_DIR):
        return tally
    try:
        runs = list(os.scandir(fs.root / constants.TRASH_DIR))
    except OSError:
        return tally
    for run in runs:
        try:
            # Another gc may be mid-sweep in its own run directory: leave recent ones alone.
            if not run.is_dir(follow_symlinks=False):
                continue
            if run.stat(follow_symlinks=False).st_mtime >= time.time() - TRASH_AGE:
                continue
            entries = list(os.scandir(run.path))
        except OSError:
            continue
        recorded = _RUN_CUTOFF_RE.search(run.name)
        run_cutoff = min(cutoff, float(recorded.group(1))) if recorded else cutoff
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
                trash_key = f"{constants.TRASH_DIR}/{run.name}/{entry.name}"
                pack_id = packs.pack_id_from_key(entry.name)
                info = fs.stat(trash_key)
                held = members(pack_id) if pack_id is not None else frozenset()
                keep = pack_id is not None and (
                    held is None
                    or bool(held & live)
                    or (info is not None and info.mtime >= run_cutoff)
                )
                if keep and pack_id is not None and fs.move(trash_key, packs.pack_key(pack_id)):
                    tally.restored += 1
                    continue
                # Garbage, or present in chunks/ already (re-uploaded): the copy is redundant.
                fs.delete(trash_key)
            except OSError as e:
                tally.errors.append(f"trash {run.name}/{entry.name}: {e.strerror or e}")
        remove_empty_dir(Path(run.path))
    return tally


# --- by intents (an object store) ---------------------------------------------------------


def store_clock(store: Store) -> float:
    """The object store's clock: the date it gives a probe object written now. Its
    objects are dated by it, and this host's clock may differ by any amount."""
    name = f"{constants.LOCKS_DIR}/gc-clock-{uuid.uuid4().hex}"
    store.backend.put_if_absent(name, b"")
    try:
        info = store.backend.stat(name)
    finally:
        store.backend.delete(name)
    return info.mtime if info is not None else time.time()


def by_intents(
    store: Store,
    candidates: Candidates,
    cutoff: float,
    seen: frozenset[str],
    intent_expiry: Callable[[], float],
    new_manifests: NewManifests,
    threads: int,
    progress: ProgressCallback | None,
) -> Tally:
    """Sweep ``candidates`` on an object store (intents.py): each batch is moved to
    trash/, then the intents (those dated after ``intent_expiry()``, the store's clock)
    and the manifests published since planning (not in ``seen``) are read again, and
    every trashed chunk one of them lists goes back; the rest is deleted.

    A saver publishes its intent before it looks for a chunk; this looks at the intents
    after moving the chunk away. If the saver looked first, its intent is visible here and
    the chunk goes back; if this moved first, the saver finds the chunk missing and
    uploads it. Either way no manifest lists a chunk that is gone for good."""
    tally = Tally()
    backend = store.backend
    run_trash = f"{constants.TRASH_DIR}/{trash_run_name(cutoff)}"
    done = 0

    def wanted(intents: Active, late: set[bytes] | None, item: Candidate) -> bool:
        """One of the chunks only it holds is listed by an intent or a new manifest; None
        (a manifest not judged): every pack is wanted."""
        if late is None:
            return True
        return any(intents.protects(d) or d in late for d in item.needed_by)

    with ThreadPoolExecutor(max(1, threads)) as pool:
        for start in range(0, len(candidates), OBJECT_SWEEP_BATCH):
            # Candidates a save announced or listed already are not even moved: the window
            # in which a load finds one only in trash/ stays for races, which are rare.
            intents = active_intents(backend, intent_expiry())
            late = chunks_of_new_manifests(store, seen, new_manifests)
            batch = []
            for item in candidates[start : start + OBJECT_SWEEP_BATCH]:
                if wanted(intents, late, item):
                    tally.kept += 1
                else:
                    batch.append(item)

            def to_trash(item: Candidate) -> tuple[Candidate, str] | None:
                trash_key = f"{run_trash}/{item.key.rsplit('/', 1)[-1]}"
                return (item, trash_key) if backend.move(item.key, trash_key) else None

            moved = [m for m in pool.map(to_trash, batch) if m is not None]
            intents = active_intents(backend, intent_expiry())
            late = chunks_of_new_manifests(store, seen, new_manifests)

            def settle(
                moved_item: tuple[Candidate, str],
                intents: Active = intents,
                late: set[bytes] | None = late,
            ) -> str:
                item, trash_key = moved_item
                key = item.key
                if not wanted(intents, late, item):
                    backend.delete(trash_key)
                    return "deleted"
                if backend.move(trash_key, key):
                    return "kept"
                # Not given back: either a saver uploaded it again (the trash copy is
                # redundant), or the trash copy is gone (another gc finished this run):
                # then the chunk is lost, and that must be said, never counted as kept.
                if backend.stat(key) is not None:
                    backend.delete(trash_key)
                    return "kept"
                return "lost"

            for (item, _trash), outcome in zip(moved, pool.map(settle, moved), strict=True):
                if not tally.count(item, outcome):
                    tally.errors.append(
                        f"{item.key}: listed by a save, but its trash copy vanished before gc "
                        "could give it back (a second gc on this store?); the next save of "
                        "that file packs it again"
                    )
            done += len(batch)
            if progress is not None:
                progress(done, len(candidates))
    # Intents older than the grace belong to saves that died (or were slower than the
    # grace, and are unprotected anyway): withdraw them.
    for name in active_intents(backend, intent_expiry()).expired:
        backend.delete(name)
    return tally


def recover_objects(
    store: Store,
    live: set[bytes],
    members: MembersOf,
    seen: frozenset[str],
    intent_expiry: Callable[[], float],
    store_now: Callable[[], float],
    new_manifests: NewManifests,
) -> Tally:
    """Finish the sweeps of object-store gc runs that crashed between moving a pack to
    trash/ and settling it: a trashed pack goes back when a live manifest (``live``), an
    intent or a manifest published since planning lists one of its chunks (intents read
    first, then manifests, as the sweep does), or when its index cannot be read; else it
    is deleted. Trash younger than 10 minutes
    (by the store's clock) may be another gc's sweep in progress."""
    tally = Tally()
    backend = store.backend
    intents = active_intents(backend, intent_expiry())
    late = chunks_of_new_manifests(store, seen, new_manifests)
    for info in list(backend.list(f"{constants.TRASH_DIR}/")):
        if info.mtime >= store_now() - TRASH_AGE:
            continue
        pack_id = packs.pack_id_from_key(info.key.rsplit("/", 1)[-1])
        try:
            held = members(pack_id) if pack_id is not None else frozenset()
            wanted = pack_id is not None and (
                late is None
                or held is None
                or any(d in live or d in late or intents.protects(d) for d in held)
            )
            if wanted and pack_id is not None and backend.move(info.key, packs.pack_key(pack_id)):
                tally.restored += 1
                continue
            backend.delete(info.key)
        except (OSError, CasstoreError) as e:
            tally.errors.append(f"trash {info.key}: {e}")
    return tally

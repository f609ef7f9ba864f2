"""Store maintenance: retention, compaction, mark-and-sweep with a grace period, cleanup.

Plan, then execute: :func:`plan` reads the store and returns a frozen :class:`Plan` (what
would be deleted, how many bytes, why) without changing anything; :func:`execute` carries
it out. ``casstore gc --dry-run`` prints the plan only.

The protocol that keeps gc safe next to live savers and loaders, and its argument, is in
docs/gc.md. In short: manifests go before chunks; only chunks unreferenced *and* older than
the grace period are candidates; manifests published while gc ran protect their chunks; and
each candidate is moved to ``trash/`` before deletion, then restored if a saver refreshed it
in the meantime (a refresh after the move fails, and the saver re-uploads).
"""

from __future__ import annotations

import logging
import os
import random
import re
import stat
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from casstore import constants, objects
from casstore import manifest as mf
from casstore.backends.fs import FileSystemBackend
from casstore.errors import CasstoreError, CorruptObject, NotFound
from casstore.keys import CacheKey
from casstore.locks import _release, _try_lock, best_effort_lock
from casstore.store import Store

log = logging.getLogger("casstore")

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Policy:
    """What to keep. ``None`` disables a rule. Seconds and bytes throughout."""

    max_age: float | None = None  # drop keys neither saved nor loaded for this long
    max_size: int | None = None  # drop least-recently-used keys until chunks fit
    keep_last: int | None = None  # per (model, tree): keep the N most recently used keys
    grace: float = 3600.0  # never delete a chunk younger than this
    compact: bool = True  # merge each key's manifests into one
    temp_timeout: float = 60.0  # CLEANUP_INCOMPLETE_TIMEOUT_SECONDS
    lock_timeout: float = 30.0  # CLEANUP_LOCK_TIMEOUT_SECONDS


@dataclass(frozen=True)
class KeyState:
    key_id: str
    key: CacheKey
    manifests: tuple[str, ...]  # object keys, oldest first
    last_used: float  # newest of: last save, last load
    marker_mtime: float | None  # the access marker's mtime when planned (None: no marker)
    chunks: frozenset[bytes]  # digests referenced by the merged view
    logical_bytes: int


@dataclass(frozen=True)
class DroppedKey:
    state: KeyState
    reason: str


@dataclass(frozen=True)
class Plan:
    """A frozen decision. ``execute`` re-checks everything that may have changed since."""

    now: float
    policy: Policy
    keys: tuple[KeyState, ...]  # every key found
    drop: tuple[DroppedKey, ...]
    compact: tuple[KeyState, ...]  # kept keys with more than one manifest
    chunks: tuple[tuple[str, int], ...]  # (object key, stored bytes) sweep candidates
    temps: tuple[str, ...]  # stale temp files (absolute paths)
    locks: tuple[str, ...]  # stale lock files (absolute paths)
    seen_manifests: frozenset[str]
    live_chunks: int
    live_bytes: int

    @property
    def cutoff(self) -> float:
        return self.now - self.policy.grace

    @property
    def freed_bytes(self) -> int:
        return sum(size for _, size in self.chunks)

    def summary(self) -> dict[str, object]:
        return {
            "keys": len(self.keys),
            "drop_keys": [
                {
                    "id": d.state.key_id,
                    "key": d.state.key.describe(),
                    "reason": d.reason,
                    "manifests": len(d.state.manifests),
                }
                for d in self.drop
            ],
            "compact_keys": [{"id": k.key_id, "manifests": len(k.manifests)} for k in self.compact],
            "chunks_to_delete": len(self.chunks),
            "bytes_to_free": self.freed_bytes,
            "live_chunks": self.live_chunks,
            "live_bytes": self.live_bytes,
            "stale_temp_files": len(self.temps),
            "stale_lock_files": len(self.locks),
            "grace_seconds": self.policy.grace,
        }


@dataclass
class GcReport:
    manifests_deleted: int = 0
    keys_dropped: int = 0
    keys_spared: int = 0  # planned drops kept: the key was loaded or saved after planning
    keys_compacted: int = 0
    chunks_deleted: int = 0
    bytes_freed: int = 0
    chunks_kept_late: int = 0  # candidates spared: referenced or refreshed during the run
    temps_removed: int = 0
    locks_removed: int = 0
    trash_restored: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def _fs(store: Store) -> FileSystemBackend:
    if not isinstance(store.backend, FileSystemBackend):
        raise CasstoreError("gc needs a filesystem store")
    return store.backend


# --- plan ------------------------------------------------------------------------------


def _key_states(store: Store, now: float) -> tuple[list[KeyState], set[str]]:
    by_id: dict[str, list[str]] = defaultdict(list)
    for info in store.backend.list(f"{constants.MANIFESTS_DIR}/"):
        parts = info.key.split("/")
        if len(parts) == 3 and parts[2].endswith(constants.MANIFEST_SUFFIX):
            by_id[parts[1]].append(info.key)
    seen = {name for names in by_id.values() for name in names}
    states = []
    for key_id in sorted(by_id):
        loaded, _errors = store.read_manifests(key_id)
        if not loaded:
            continue  # only invalid manifests: `verify --repair` handles those
        view = mf.merge(m for _, m in loaded)
        marker = store.backend.stat(Store.access_key(key_id))
        last_used = max([loaded[-1][1].created_at] + ([marker.mtime] if marker else []))
        states.append(
            KeyState(
                key_id=key_id,
                key=loaded[-1][1].key,
                manifests=tuple(n for n, _ in loaded),
                last_used=min(last_used, now),
                marker_mtime=marker.mtime if marker else None,
                chunks=frozenset(c.digest for f in view.values() for c in f.chunks),
                logical_bytes=sum(f.size for f in view.values()),
            )
        )
    return states, seen


def _retention(
    states: list[KeyState], sizes: dict[bytes, int], policy: Policy, now: float
) -> list[DroppedKey]:
    dropped: dict[str, DroppedKey] = {}
    if policy.max_age is not None:
        for s in states:
            if s.last_used < now - policy.max_age:
                idle = (now - s.last_used) / 86400
                dropped[s.key_id] = DroppedKey(s, f"unused for {idle:.1f} days (max-age)")
    if policy.keep_last is not None:
        groups: dict[tuple[str, str], list[KeyState]] = defaultdict(list)
        for s in states:
            groups[(s.key.model, s.key.extra.get("tree", ""))].append(s)
        for (model, _tree), members in groups.items():
            members.sort(key=lambda s: s.last_used, reverse=True)
            for s in members[policy.keep_last :]:
                dropped.setdefault(
                    s.key_id, DroppedKey(s, f"older than the {policy.keep_last} newest of {model}")
                )
    if policy.max_size is not None:
        kept = [s for s in states if s.key_id not in dropped]
        refs: dict[bytes, int] = defaultdict(int)
        for s in kept:
            for d in s.chunks:
                refs[d] += 1
        live = sum(sizes.get(d, 0) for d in refs)
        for s in sorted(kept, key=lambda s: s.last_used):  # least recently used first
            if live <= policy.max_size:
                break
            for d in s.chunks:
                refs[d] -= 1
                if refs[d] == 0:
                    live -= sizes.get(d, 0)
            dropped[s.key_id] = DroppedKey(s, "least recently used over max-size")
    return list(dropped.values())


def plan(store: Store, policy: Policy, *, now: float | None = None) -> Plan:
    """Decide what gc would do. Reads the store; changes nothing."""
    fs = _fs(store)
    now = time.time() if now is None else now
    chunk_infos = [
        (info, bytes.fromhex(hexd))
        for info in store.backend.list(f"{constants.CHUNKS_DIR}/")
        if (hexd := objects.digest_from_key(info.key)) is not None
    ]
    sizes = {d: info.size for info, d in chunk_infos}
    states, seen = _key_states(store, now)
    drop = _retention(states, sizes, policy, now)
    dropped_ids = {d.state.key_id for d in drop}
    kept = [s for s in states if s.key_id not in dropped_ids]
    live: set[bytes] = set().union(*(s.chunks for s in kept)) if kept else set()
    cutoff = now - policy.grace
    candidates = tuple(
        (info.key, info.size) for info, d in chunk_infos if d not in live and info.mtime < cutoff
    )
    return Plan(
        now=now,
        policy=policy,
        keys=tuple(states),
        drop=tuple(drop),
        compact=tuple(s for s in kept if policy.compact and len(s.manifests) > 1),
        chunks=candidates,
        temps=tuple(_stale_temps(fs.root, now - policy.temp_timeout)),
        locks=tuple(_stale_locks(fs.root / constants.LOCKS_DIR, now - policy.lock_timeout)),
        seen_manifests=frozenset(seen),
        live_chunks=len(live),
        live_bytes=sum(sizes.get(d, 0) for d in live),
    )


def _stale_temps(root: Path, older_than: float) -> Iterable[str]:
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            if name.startswith(constants.TEMP_PREFIX):
                path = os.path.join(dirpath, name)
                try:
                    if os.lstat(path).st_mtime < older_than:
                        yield path
                except FileNotFoundError:
                    pass


def _stale_locks(lock_dir: Path, older_than: float) -> Iterable[str]:
    try:
        entries = list(os.scandir(lock_dir))
    except FileNotFoundError:
        return
    for e in entries:
        try:
            if e.name.endswith(".lock") and e.stat().st_mtime < older_than:
                yield e.path
        except FileNotFoundError:
            pass


# --- execute ---------------------------------------------------------------------------


def execute(
    store: Store,
    p: Plan,
    *,
    threads: int = constants.DEFAULT_THREADS,
    progress: ProgressCallback | None = None,
) -> GcReport:
    """Carry out ``p``. Safe next to running savers and loaders, and next to another gc."""
    started = time.monotonic()
    report = GcReport()
    fs = _fs(store)
    # 1. Manifests of dropped keys go first: from here on their chunks are unreferenced.
    #    A key loaded or saved since planning is kept, and its chunks with it.
    spared: set[str] = set()
    dropped: set[str] = set()
    for d in p.drop:
        if _drop_key(store, d.state, report):
            report.keys_dropped += 1
            dropped.add(d.state.key_id)
        else:
            report.keys_spared += 1
            spared.update(c.hex() for c in d.state.chunks)
    # 2. Compaction never drops a file: it merges only manifests it read, and deletes
    #    only those; one published meanwhile stays, and is newer, so it still wins.
    for s in p.compact:
        try:
            if compact_key(store, s.key_id, s.manifests):
                report.keys_compacted += 1
        except Exception as e:  # one key's trouble never stops the rest of gc
            report.errors.append(f"compaction of {s.key_id}: {type(e).__name__}: {e}")
    # 3. Protect the chunks of every manifest published since planning.
    protected = _chunks_of_new_manifests(store, p.seen_manifests) | spared
    # 4. Sweep, through trash/.
    run_trash = f"{constants.TRASH_DIR}/{trash_run_name(p.cutoff)}"
    # Chunks that a live manifest lists: trash left by a crashed run gives them back.
    live = protected | {c.hex() for s in p.keys if s.key_id not in dropped for c in s.chunks}
    report.trash_restored += _recover_trash(store, p.cutoff, live)
    todo = [(k, size) for k, size in p.chunks if objects.digest_from_key(k) not in protected]
    report.chunks_kept_late += len(p.chunks) - len(todo)
    lock = threading.Lock()
    done = 0

    def sweep(item: tuple[str, int]) -> None:
        nonlocal done
        key, size = item
        outcome = _sweep_chunk(fs, key, f"{run_trash}/{key.rsplit('/', 1)[-1]}", p.cutoff)
        with lock:
            done += 1
            if outcome == "deleted":
                report.chunks_deleted += 1
                report.bytes_freed += size
            elif outcome == "kept":
                report.chunks_kept_late += 1
        if progress is not None:
            progress(done, len(todo))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(sweep, todo))
    _remove_empty_dir(fs.root / run_trash)
    # 5. Cleanup of what crashed writers and lock holders left.
    report.temps_removed = sum(1 for t in p.temps if _unlink(t))
    report.locks_removed = sum(1 for path in p.locks if _remove_idle_lock(path))
    report.seconds = time.monotonic() - started
    log.info(
        "gc: dropped %d keys (%d manifests), compacted %d, deleted %d chunks (%.1f MiB), "
        "spared %d, removed %d temp and %d lock files in %.2fs",
        report.keys_dropped,
        report.manifests_deleted,
        report.keys_compacted,
        report.chunks_deleted,
        report.bytes_freed / 2**20,
        report.chunks_kept_late,
        report.temps_removed,
        report.locks_removed,
        report.seconds,
    )
    return report


def _used_since_plan(store: Store, state: KeyState) -> bool:
    """Whether a replica saved (a manifest gc did not plan with) or loaded (the access
    marker changed) ``state``'s key since planning. Compares against what the plan saw,
    never against a clock, so clock skew between hosts cannot hide a use."""
    planned = set(state.manifests)
    prefix = f"{constants.MANIFESTS_DIR}/{state.key_id}/"
    if any(
        info.key not in planned and info.key.endswith(constants.MANIFEST_SUFFIX)
        for info in store.backend.list(prefix)
    ):
        return True
    marker = store.backend.stat(Store.access_key(state.key_id))
    return (marker.mtime if marker else None) != state.marker_mtime


def _drop_key(store: Store, state: KeyState, report: GcReport) -> bool:
    """Delete the manifests of a key the plan dropped, unless it was used since planning.

    The key is checked before the deletion and again after it: a replica that loaded and
    saved while gc deleted (its save read the manifests gc was removing, so it listed only
    its new files) changed the access marker or published a manifest, and gc then puts
    back the manifests it deleted. True when the key is gone.
    """
    if _used_since_plan(store, state):
        return False
    removed: dict[str, bytes] = {}
    for name in state.manifests:
        try:
            blob = store.backend.get(name, max_bytes=constants.MAX_MANIFEST_BYTES)
        except (NotFound, CorruptObject):
            continue
        if store.backend.delete(name):
            removed[name] = blob
    if _used_since_plan(store, state):
        for name, blob in removed.items():
            store.backend.put_if_absent(name, blob)
        log.info("gc: kept %s: it was used while gc ran", state.key_id)
        return False
    report.manifests_deleted += len(removed)
    store.backend.delete(Store.access_key(state.key_id))
    return True


def _chunks_of_new_manifests(store: Store, seen: frozenset[str]) -> set[str]:
    protected: set[str] = set()
    for info in store.backend.list(f"{constants.MANIFESTS_DIR}/"):
        if info.key in seen or not info.key.endswith(constants.MANIFEST_SUFFIX):
            continue
        try:
            blob = store.backend.get(info.key, max_bytes=constants.MAX_MANIFEST_BYTES)
            m = mf.decode(blob, source=info.key)
        except CasstoreError:  # NotFound included: deleted since the listing
            continue
        protected.update(c.digest.hex() for f in m.files for c in f.chunks)
    return protected


def _sweep_chunk(fs: FileSystemBackend, key: str, trash_key: str, cutoff: float) -> str:
    """Move one candidate to trash, then delete it unless a saver refreshed it meanwhile.

    A refresh that landed before the move shows in the moved file's mtime (rename keeps
    it): the chunk goes back. A refresh after the move finds no file, so that saver
    uploads the chunk again. Either way no manifest is left pointing at nothing.
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


_RUN_CUTOFF_RE = re.compile(r"-c(\d+)-")


def trash_run_name(cutoff: float) -> str:
    """``trash/`` subdirectory of one sweep. It records the run's cutoff, so that a later
    run finishing this one's sweep after a crash judges each chunk as this run would."""
    return f"{time.strftime('%Y%m%dT%H%M%S')}-c{int(cutoff)}-{uuid.uuid4().hex[:8]}"


def _recover_trash(store: Store, cutoff: float, live: set[str]) -> int:
    """Finish the sweeps of gc runs that crashed. A trashed chunk goes back to chunks/
    when a live manifest lists it (``live``: hex digests) or when it was refreshed after
    the crashed run's cutoff (or this run's, whichever is earlier); the rest is deleted."""
    fs = _fs(store)
    restored = 0
    trash = fs.root / constants.TRASH_DIR
    try:
        runs = list(os.scandir(trash))
    except FileNotFoundError:
        return 0
    for run in runs:
        # Another gc may be mid-sweep in its own run directory: leave recent ones alone.
        if not run.is_dir() or run.stat().st_mtime >= time.time() - 600:
            continue
        recorded = _RUN_CUTOFF_RE.search(run.name)
        run_cutoff = min(cutoff, float(recorded.group(1))) if recorded else cutoff
        for entry in list(os.scandir(run.path)):
            trash_key = f"{constants.TRASH_DIR}/{run.name}/{entry.name}"
            hexd = objects.digest_from_key(entry.name)
            info = fs.stat(trash_key)
            keep = hexd is not None and (
                hexd in live or (info is not None and info.mtime >= run_cutoff)
            )
            if keep and hexd is not None and fs.move(trash_key, objects.chunk_key(hexd)):
                restored += 1
                continue
            # Garbage, or present in chunks/ already (re-uploaded): the copy is redundant.
            fs.delete(trash_key)
        _remove_empty_dir(Path(run.path))
    return restored


def compact_key(store: Store, key_id: str, names: tuple[str, ...]) -> bool:
    """Replace the manifests ``names`` of one key by a single merged manifest."""
    wanted = set(names)
    loaded = [(n, m) for n, m in store.read_manifests(key_id)[0] if n in wanted]
    if len(loaded) < 2:
        return False
    newest = max(m.created_at for _, m in loaded)
    view = mf.merge(m for _, m in loaded)
    merged = mf.Manifest(
        format=constants.MANIFEST_FORMAT_VERSION,
        key=loaded[-1][1].key,
        # The newest merged time, not now: a manifest published during compaction is
        # newer than every file in here and must keep winning for the paths it names.
        created_at=newest,
        producer=mf.this_producer(),
        files=tuple(view.values()),
    )
    mf.validate(merged)
    name = f"{constants.MANIFESTS_DIR}/{key_id}/{mf.new_manifest_name(newest)}"
    store.backend.put_if_absent(name, mf.encode(merged))
    for n, _ in loaded:
        store.backend.delete(n)
    return True


def remove_key(store: Store, key: CacheKey) -> int:
    """Delete every manifest of ``key`` (``casstore rm``); its chunks go at the next gc."""
    count = 0
    for info in list(store.backend.list(f"{constants.MANIFESTS_DIR}/{key.id}/")):
        if store.backend.delete(info.key):
            count += 1
    store.backend.delete(Store.access_key(key.id))
    return count


def cleanup(
    store: Store, *, temp_timeout: float, lock_timeout: float, budget_seconds: float = 0.05
) -> int:
    """Opportunistic cleanup for savers: remove stale temp files from a few directories,
    stopping after ``budget_seconds`` so no replica spends more than a moment here."""
    if not isinstance(store.backend, FileSystemBackend):
        return 0
    root = store.backend.root
    deadline = time.monotonic() + budget_seconds
    now = time.time()
    removed = 0
    dirs = [root / constants.MANIFESTS_DIR, root / constants.LOCKS_DIR]
    try:
        fanout = [e.path for e in os.scandir(root / constants.CHUNKS_DIR) if e.is_dir()]
    except FileNotFoundError:
        fanout = []
    dirs += [Path(p) for p in random.sample(fanout, min(4, len(fanout)))]
    for d in dirs:
        for dirpath, _sub, names in os.walk(d):
            for name in names:
                if time.monotonic() > deadline:
                    return removed
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                if name.startswith(constants.TEMP_PREFIX) and st.st_mtime < now - temp_timeout:
                    removed += _unlink(path)
                elif (
                    name.endswith(".lock")
                    and st.st_mtime < now - lock_timeout
                    and stat.S_ISREG(st.st_mode)
                ):
                    removed += _remove_idle_lock(path)
    return removed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _remove_idle_lock(path: str) -> bool:
    """Remove a stale lock file only if nobody holds it now (else it only looks stale)."""
    lock, _busy = _try_lock(Path(path), 0)
    if lock is None:
        return False
    try:
        return _unlink(path)
    finally:
        _release(lock)


def _remove_empty_dir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def gc_lock(store: Store) -> AbstractContextManager[bool]:
    """Only one gc at a time per store; a second finds it busy. Saves duplicate work only:
    two gcs racing are still safe."""
    return best_effort_lock(_fs(store).root / constants.LOCKS_DIR / "gc.lock", 0)

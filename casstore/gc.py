"""Store maintenance: retention, compaction, mark-and-sweep with a grace period, cleanup.

Plan, then execute: :func:`plan` reads the store and returns a frozen :class:`Plan` (what
would be deleted, how many bytes, why) without changing anything; :func:`execute` carries
it out. ``casstore gc --dry-run`` prints the plan only.

The protocol that keeps gc safe next to live savers and loaders, and its argument, is in
docs/gc.md. In short: a key that retention drops is first *set aside* (its manifests
renamed out of readers' sight, its chunks kept) and deleted only by the next run, unless a
replica saved it in between; manifests go before chunks; only chunks unreferenced *and*
older than the grace period are candidates; manifests published while gc ran protect their
chunks; and each candidate is moved to ``trash/`` before deletion, then restored if a saver
refreshed it (a filesystem) or announced it (an object store) in the meantime: the sweep
itself is :mod:`casstore.sweep`.
"""

from __future__ import annotations

import logging
import os
import random
import re
import stat
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

from casstore import chunk_index, constants, packs, usage
from casstore import manifest as mf
from casstore.backends.base import ObjectInfo
from casstore.backends.fs import FileSystemBackend
from casstore.chunk_index import ChunkIndex
from casstore.dictionaries import Rebuilder
from casstore.errors import (
    CannotRenew,
    CasstoreError,
    CorruptObject,
    InvalidManifest,
    NotFound,
    UnsupportedManifest,
)
from casstore.keys import CacheKey
from casstore.locks import exclusive_unless_busy, remove_if_unheld
from casstore.store import Store, StoredManifest
from casstore.sweep import (
    Candidate,
    NewManifests,
    by_intents,
    by_rename,
    chunks_of_new_manifests,
    real_dir,
    recover_objects,
    recover_renamed,
    store_clock,
)

log = logging.getLogger("casstore")

ProgressCallback = Callable[[int, int], None]

# A pack whose live chunks are under this share of its chunk bytes is repacked: its live
# chunks go into a new pack and it is swept. Half: a store then holds at most about twice
# its live bytes in packs, and a chunk is copied at most once per halving of its pack.
REPACK_BELOW = 0.5

# A set-aside manifest: ``manifests/<key id>/<name>.manifest.dropped-<unix time>``. Readers
# list only names ending in ``.manifest``, so the key stops loading at once; its chunks stay
# until a later run, at least a grace period later, deletes these files (or renames them
# back when the key was saved meanwhile).
DROPPED_SUFFIX = ".dropped"
_DROPPED_RE = re.compile(r"^(?P<name>.+\.manifest)\.dropped(?:-(?P<at>\d+))?$")


def dropped_name(name: str, at: float) -> str:
    """The set-aside name of manifest ``name``, recording when (gc's clock) it was set
    aside: the run that may delete it must come a grace period later."""
    return f"{name}{DROPPED_SUFFIX}-{int(at)}"


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
    usage_retention: float = usage.DEFAULT_RETENTION  # keep load/save records this long


@dataclass(frozen=True)
class KeyState:
    key_id: str
    key: CacheKey
    manifests: tuple[str, ...]  # object keys, oldest first
    last_used: float  # newest of: last save, last load
    marker_mtime: float | None  # the access marker's mtime when planned (None: no marker)
    chunks: frozenset[bytes]  # digests referenced by the merged view
    logical_bytes: int
    signers: frozenset[bytes | None] = frozenset()  # who signed its manifests (None: unsigned)
    marker_tag: str | None = None  # the marker's ETag, on an object store (whole seconds)
    # Whether a key gc was told to trust (--trusted-keys) signed one of its manifests;
    # True when gc was given no trusted keys.
    trusted: bool = True
    # What --keep-last and --max-size rank by: last_used without trusted keys; with them,
    # the newest manifest a trusted key signed, since access markers and other manifests
    # are anyone's to write.
    rank_time: float = 0.0


@dataclass(frozen=True)
class DroppedKey:
    state: KeyState
    reason: str


@dataclass(frozen=True)
class SetAside:
    """A key a previous run set aside: its ``.dropped`` manifests and their chunks."""

    key_id: str
    names: tuple[str, ...]
    chunks: frozenset[bytes]
    restore: bool  # True: the key was saved since, its manifests come back
    due: bool  # aside for at least the grace period: this run may delete them


@dataclass(frozen=True)
class Plan:
    """A frozen decision. ``execute`` re-checks everything that may have changed since."""

    now: float
    policy: Policy
    keys: tuple[KeyState, ...]  # every key found
    drop: tuple[DroppedKey, ...]  # set aside by this run
    set_aside: tuple[SetAside, ...]  # set aside by an earlier run: deleted or restored now
    compact: tuple[KeyState, ...]  # kept keys with more than one manifest
    packs: tuple[Candidate, ...]  # packs holding no live chunk: sweep candidates
    # Packs mostly dead (live chunks under REPACK_BELOW of their bytes): their live chunks
    # are packed again; a later run sweeps them, once every host sees the copies.
    repack: tuple[Candidate, ...]
    temps: tuple[str, ...]  # stale temp files (absolute paths)
    locks: tuple[str, ...]  # stale lock files (absolute paths)
    orphan_markers: tuple[str, ...]  # access markers of keys that have no manifest at all
    orphan_indexes: tuple[str, ...]  # index objects of packs gone (a crash after a delete)
    seen_manifests: frozenset[str]  # every name under manifests/ when planned
    live_chunks: int
    live_bytes: int
    sweep_blocked: str | None = None  # why no pack may be deleted this run
    grace_kept: int = 0  # packs without live chunks kept: younger than the grace
    grace_kept_bytes: int = 0
    # Mostly dead packs whose live chunks copies published within the grace hold: swept by
    # a later run, once every host sees those copies.
    waiting: tuple[Candidate, ...] = ()
    # The chunks each pack held when planned (its index); packs whose index could not be
    # read are absent, and are never swept.
    members: dict[str, frozenset[bytes]] = field(default_factory=dict)
    # Chunks no manifest lists that the dictionaries of blocks holding live chunks name:
    # live too, read from blocks without a dictionary (docs/gc.md, "Dictionaries").
    dictionary_chunks: frozenset[bytes] = frozenset()
    # The chunk index read when planning: where the chunks of manifests published during
    # the run lie (step 4), without reading every index again.
    index: ChunkIndex | None = field(default=None, repr=False, compare=False)
    # Indexes that name nothing a reader can use (damaged, or of a pack surely gone): not
    # read again when manifests published during the run are judged.
    ignored_indexes: frozenset[str] = frozenset()
    # Kept keys with several manifests that gc may not merge, and why (signatures).
    uncompacted: tuple[tuple[str, str], ...] = ()
    # Object stores: the store's own clock when planned (objects are dated by it, not by
    # this host), and this host's monotonic clock then, to tell the store's time later.
    store_clock: float | None = None
    planned_at: float = 0.0

    def store_now(self) -> float:
        """The store's clock now (object stores), else this host's."""
        if self.store_clock is None:
            return time.time()
        return self.store_clock + (time.monotonic() - self.planned_at)

    @property
    def cutoff(self) -> float:
        return self.now - self.policy.grace

    @property
    def freed_bytes(self) -> int:
        """What this run deletes; repacked packs are freed by a later run."""
        return 0 if self.sweep_blocked else sum(c.size for c in self.packs)

    @property
    def repack_bytes(self) -> int:
        return 0 if self.sweep_blocked else sum(c.size for c in self.repack)

    @property
    def waiting_bytes(self) -> int:
        return 0 if self.sweep_blocked else sum(c.size for c in self.waiting)

    def summary(self) -> dict[str, object]:
        return {
            "keys": len(self.keys),
            "drop_keys": [
                {
                    "key_id": d.state.key_id,
                    "key": d.state.key.describe(),
                    "reason": d.reason,
                    "manifests": len(d.state.manifests),
                }
                for d in self.drop
            ],
            "expire_keys": [s.key_id for s in self.set_aside if not s.restore and s.due],
            "waiting_keys": [s.key_id for s in self.set_aside if not s.restore and not s.due],
            "restore_keys": [s.key_id for s in self.set_aside if s.restore],
            "compact_keys": [
                {"key_id": k.key_id, "manifests": len(k.manifests)} for k in self.compact
            ],
            "uncompacted_keys": [
                {"key_id": key_id, "reason": why} for key_id, why in self.uncompacted
            ],
            "packs_to_delete": 0 if self.sweep_blocked else len(self.packs),
            "packs_to_repack": 0 if self.sweep_blocked else len(self.repack),
            "bytes_to_free": self.freed_bytes,
            "bytes_to_repack": self.repack_bytes,
            "packs_waiting_for_copies": 0 if self.sweep_blocked else len(self.waiting),
            "bytes_waiting_for_copies": self.waiting_bytes,
            "packs_kept_by_grace": self.grace_kept,
            "bytes_kept_by_grace": self.grace_kept_bytes,
            "sweep_blocked": self.sweep_blocked,
            "live_chunks": self.live_chunks,
            "live_bytes": self.live_bytes,
            "stale_temp_files": len(self.temps),
            "stale_lock_files": len(self.locks),
            "grace_seconds": self.policy.grace,
        }


@dataclass
class GcReport:
    manifests_deleted: int = 0
    keys_dropped: int = 0  # set aside by this run (they stop loading; deleted next run)
    keys_spared: int = 0  # planned drops kept: the key was loaded or saved after planning
    keys_expired: int = 0  # set aside by an earlier run and deleted now
    keys_restored: int = 0  # set aside by an earlier run, saved since: back in use
    keys_compacted: int = 0
    packs_deleted: int = 0
    packs_repacked: int = 0  # mostly dead packs whose live chunks were packed again
    chunks_repacked: int = 0
    bytes_freed: int = 0
    packs_kept_late: int = 0  # candidates spared: referenced or refreshed during the run
    indexes_deleted: int = 0
    temps_removed: int = 0
    locks_removed: int = 0
    markers_removed: int = 0
    trash_restored: int = 0
    usage_records_merged: int = 0  # load/save records merged into one object per day
    usage_objects_deleted: int = 0  # merged records, and records past the retention
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


def _fs(store: Store) -> FileSystemBackend | None:
    """The filesystem backend, or None for an object store (no temp files, no locks, no
    renames: its sweep protects reused chunks with intents instead, intents.py)."""
    return store.backend if isinstance(store.backend, FileSystemBackend) else None


# --- plan ------------------------------------------------------------------------------


@dataclass
class _Listing:
    """What the manifests/ directory held when planned."""

    live: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    dropped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    seen: set[str] = field(default_factory=set)


def _list_manifests(store: Store) -> _Listing:
    listing = _Listing()
    for info in store.backend.list(f"{constants.MANIFESTS_DIR}/"):
        parts = info.key.split("/")
        if len(parts) != 3:
            continue
        listing.seen.add(info.key)
        if parts[2].endswith(constants.MANIFEST_SUFFIX):
            listing.live[parts[1]].append(info.key)
        elif _DROPPED_RE.match(parts[2]):
            listing.dropped[parts[1]].append(info.key)
    return listing


def _unsupported(store: Store, names: Iterable[str]) -> str | None:
    """The first of ``names`` that is a manifest this casstore cannot read although it may
    be valid (a newer format): its chunks must not be swept. Damaged or hostile manifests
    (bad digest, unsafe paths) do not count: nothing can ever load them."""
    for name in names:
        try:
            mf.decode(store.backend.get(name, max_bytes=constants.MAX_MANIFEST_BYTES), source=name)
        except UnsupportedManifest as e:
            return f"{e}; not sweeping any chunk until casstore is upgraded"
        except (CasstoreError, OSError):
            continue
    return None


def _key_states(store: Store, listing: _Listing, now: float) -> tuple[list[KeyState], str | None]:
    states = []
    blocked = None
    for key_id in sorted(listing.live):
        loaded, errors = store.read_manifests(key_id)
        if errors and blocked is None:
            valid = {s.name for s in loaded}
            blocked = _unsupported(store, (n for n in listing.live[key_id] if n not in valid))
        if not loaded:
            continue  # only invalid manifests: `verify --repair` handles those
        view = mf.merge(s.manifest for s in loaded)
        marker = store.backend.stat(Store.access_key(key_id))
        newest = loaded[-1].manifest
        if store.trusted is None:
            trusted, rank_time = True, min(last_used_of(loaded, marker), now)
        else:
            signed = [s for s in loaded if store.trusted.trusts(s.signer)]
            trusted = bool(signed)
            rank_time = min(signed[-1].manifest.created_at, now) if signed else 0.0
        last_used = last_used_of(loaded, marker)
        states.append(
            KeyState(
                key_id=key_id,
                key=newest.key,
                manifests=tuple(s.name for s in loaded),
                last_used=min(last_used, now),
                marker_mtime=marker.mtime if marker else None,
                marker_tag=marker.tag if marker else None,
                # Every manifest's chunks, shadowed entries too: if the newer manifest
                # goes (quarantine, a crashed compaction), the older must still load.
                chunks=frozenset(
                    c.digest for s in loaded for f in s.manifest.files for c in f.chunks
                ),
                logical_bytes=sum(f.size for f in view.values()),
                signers=frozenset(s.signer for s in loaded),
                trusted=trusted,
                rank_time=rank_time,
            )
        )
    return states, blocked


def last_used_of(loaded: list[StoredManifest], marker: ObjectInfo | None) -> float:
    """The newer of a key's newest manifest and its access marker."""
    return max([loaded[-1].manifest.created_at] + ([marker.mtime] if marker else []))


def _set_aside(
    store: Store, listing: _Listing, saved: set[str], dropping: set[str], due_before: float
) -> tuple[list[SetAside], str | None]:
    """Keys set aside by earlier runs. ``saved``: ids of keys with a valid manifest now
    (saved again since: their set-aside manifests come back), unless this run drops them
    again (``dropping``): then they stay aside. Also the reason to block the sweep, if a
    set-aside manifest comes from a newer casstore."""
    found = []
    blocked = None
    for key_id, names in sorted(listing.dropped.items()):
        chunks: set[bytes] = set()
        latest = 0
        for name in names:
            matched = _DROPPED_RE.match(name.rsplit("/", 1)[-1])
            latest = max(latest, int(matched.group("at") or 0) if matched else 0)
            try:
                blob = store.backend.get(name, max_bytes=constants.MAX_MANIFEST_BYTES)
                m = mf.decode(blob, source=name)
            except UnsupportedManifest as e:
                blocked = blocked or f"{e}; not sweeping any chunk until casstore is upgraded"
                continue
            except (NotFound, InvalidManifest, CorruptObject):
                continue  # gone, or nothing can ever load it
            except (CasstoreError, OSError) as e:
                # Unreadable now (a timeout, a 5xx): its key may come back, so its chunks
                # must not be swept on a guess.
                blocked = blocked or f"cannot read set-aside manifest {name}: {e}"
                continue
            chunks.update(c.digest for f in m.files for c in f.chunks)
        restore = key_id in saved and key_id not in dropping
        due = latest <= due_before
        found.append(SetAside(key_id, tuple(sorted(names)), frozenset(chunks), restore, due))
    return found, blocked


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
            # Keys no trusted key signed never take one of the N places: otherwise anyone
            # who can write the store could push trusted keys out by saving newer ones.
            members.sort(key=lambda s: (s.trusted, s.rank_time), reverse=True)
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
        # Least recently used first; keys no trusted key signed before every trusted one.
        for s in sorted(kept, key=lambda s: (s.trusted, s.rank_time)):
            if live <= policy.max_size:
                break
            for d in s.chunks:
                refs[d] -= 1
                if refs[d] == 0:
                    live -= sizes.get(d, 0)
            dropped[s.key_id] = DroppedKey(s, "least recently used over max-size")
    return list(dropped.values())


def plan(store: Store, policy: Policy, *, now: float | None = None) -> Plan:
    """Decide what gc would do. Reads the store and changes nothing, but for one probe
    object on an object store, written and deleted to read the store's clock."""
    fs = _fs(store)
    now = time.time() if now is None else now
    pack_infos = chunk_index.list_packs(store.backend)
    index_infos = chunk_index.list_indexes(store.backend)
    index = chunk_index.load(store.backend, threads=store.threads, listed=index_infos)
    sizes = index.stored_sizes()
    listing = _list_manifests(store)
    # A pack published between the listing of index/ and that of manifests/ may hold the
    # chunks of a manifest just listed, in a block whose dictionary must then stay: its
    # index is read too (unlike its pack, which this run does not judge).
    damaged, unreadable = index.catch_up(store.backend, skip={*index.damaged, *index.unreadable})
    index.damaged.update(damaged)
    index.unreadable.update(unreadable)
    states, blocked = _key_states(store, listing, now)
    drop = _retention(states, sizes, policy, now)
    dropped_ids = {d.state.key_id for d in drop}
    # Saved again since set aside: by a trusted key, when gc was given trusted keys.
    saved = {s.key_id for s in states if s.trusted}
    set_aside, aside_blocked = _set_aside(store, listing, saved, dropped_ids, now - policy.grace)
    blocked = blocked or aside_blocked
    kept = [s for s in states if s.key_id not in dropped_ids]
    # Live: every kept key, every key set aside by this run (deleted only by the next
    # one) and every set-aside key coming back. Keys set aside earlier and not saved since
    # are deleted by this run: their chunks are candidates.
    live: set[bytes] = set()
    for s in states:
        live.update(s.chunks)
    for a in set_aside:
        if a.restore or not a.due:
            live.update(a.chunks)
    # A block compressed with a dictionary is read only while the dictionary's chunks
    # are: they live as long as a live chunk lies in such a block.
    dictionary_chunks = index.dictionary_chunks(live)
    live |= dictionary_chunks
    kept_live: set[bytes] = set().union(*(s.chunks for s in kept)) if kept else set()
    # Chunk ages against the clock that dated them: the store's own, on an object store.
    clock = store_clock(store) if fs is None else None
    planned_at = time.monotonic()
    cutoff = (clock if clock is not None else now) - policy.grace
    # An index not read could name a dictionary of chunks this run would see as dead. Only
    # one whose pack is surely gone names none that anything can read: its pack neither
    # listed nor in trash/ (a crashed run may give it back), and the index older than the
    # grace (its pack may have been published after packs/ was listed).
    trashed = chunk_index.list_trashed(store.backend)
    orphaned = {
        p
        for p in index.unreadable
        if p not in pack_infos
        and p not in trashed
        and p in index_infos
        and index_infos[p].mtime < cutoff
        # Looked at once more after trash/ was listed: a pack given back from trash/ in
        # between (another gc) was in neither listing.
        and store.backend.stat(packs.pack_key(p)) is None
    }
    unknown = sorted(set(index.unreadable) - orphaned)
    if unknown and not blocked:
        blocked = (
            f"{len(unknown)} pack index(es) cannot be read ({packs.index_key(unknown[0])}: "
            f"{index.unreadable[unknown[0]]}); not sweeping any chunk while the dictionaries "
            "they may name are unknown (casstore verify lists them)"
        )
    dead, repack, young = [], [], []
    for pack_id, info in sorted(pack_infos.items()):
        if pack_id in index.unreadable or pack_id in index.damaged:
            continue  # what it holds is unknown: never swept on a guess
        pack = index.packs.get(pack_id)
        if pack is None:
            # No index: a save that crashed between publishing the pack and its index;
            # no manifest can list its chunks (manifests come after indexes).
            if info.mtime < cutoff:
                dead.append(Candidate(info.key, info.size, frozenset()))
            continue
        members = frozenset(c.digest for c in pack.chunks)
        held = {c.digest: c.size for c in pack.chunks}
        live_bytes = sum(n for d, n in held.items() if d in live)
        if info.mtime >= cutoff:
            if not live_bytes:
                young.append(info.size)
        elif not live_bytes:
            dead.append(Candidate(info.key, info.size, members))
        elif live_bytes < REPACK_BELOW * sum(held.values()):
            repack.append(Candidate(info.key, info.size, members))
    # A live chunk of a mostly dead pack that another pack (staying this run) holds too is
    # covered already: it is not copied again, so repeated runs never pile up copies, and a
    # pack all of whose live chunks are held elsewhere is swept without a repack (once
    # those copies are settled, below).
    sweeping = {c.key for c in dead + repack}
    staying = {
        pack_id
        for pack_id in index.packs
        if packs.pack_key(pack_id) not in sweeping and pack_id in pack_infos
    }
    # A copy covers only once every host can see it: its index published before the
    # cutoff. A mount may show what another host wrote only seconds later (a FUSE client's
    # metadata, an NFS attribute cache), and a host that does not see the copy yet reads
    # the chunk where it saw it. So a repack's own copy frees the old pack in a later run.
    settled = {
        pack_id
        for pack_id in staying
        if pack_id in index_infos and index_infos[pack_id].mtime < cutoff
    }
    # A copy dated ahead of this run's clock (its writer's clock runs ahead) would settle
    # only when that date comes: not waited for; the chunk is copied again, dated by gc.
    present = clock if clock is not None else now
    awaited = {
        pack_id
        for pack_id in staying
        if pack_id in index_infos and index_infos[pack_id].mtime <= present
    }

    def held_elsewhere(c: Candidate, among: set[str]) -> frozenset[bytes]:
        own = packs.pack_id_from_key(c.key)
        return frozenset(
            d
            for d in c.members & live
            if any(
                loc.index.id in among
                and loc.index.id != own
                # Only a copy in a block without a dictionary covers a chunk: any chunk
                # may be, or become (a save racing this run), a dictionary's, and those
                # are read only from such blocks.
                and loc.index.blocks[loc.chunk.block].plain
                for loc in index.locate(d)
            )
        )

    still_repack, waiting = [], []
    for c in repack:
        covered = held_elsewhere(c, settled)
        c = replace(c, covered=covered)
        if c.members & live <= covered:
            dead.append(c)
        elif c.members & live <= held_elsewhere(c, awaited):
            # Copies published lately hold every live chunk: swept by a later run, once
            # every host sees them, without a copy of its own.
            waiting.append(c)
        else:
            still_repack.append(c)
    repack = still_repack
    orphan_indexes = tuple(
        info.key
        for pack_id, info in sorted(index_infos.items())
        if pack_id not in pack_infos and info.mtime < cutoff
    )
    with_manifests = set(listing.live) | set(listing.dropped)
    several = [s for s in kept if policy.compact and len(s.manifests) > 1]
    refusals = {s.key_id: why for s in several if (why := compaction_refused(store, s.signers))}
    return Plan(
        now=now,
        policy=policy,
        keys=tuple(states),
        drop=tuple(drop),
        set_aside=tuple(set_aside),
        compact=tuple(s for s in several if s.key_id not in refusals),
        uncompacted=tuple(sorted(refusals.items())),
        packs=tuple(dead),
        repack=tuple(repack),
        members={p: frozenset(c.digest for c in i.chunks) for p, i in index.packs.items()},
        dictionary_chunks=frozenset(dictionary_chunks),
        index=index,
        ignored_indexes=frozenset({*index.damaged, *orphaned}),
        orphan_indexes=orphan_indexes,
        temps=tuple(_stale_temps(fs.root, now - policy.temp_timeout)) if fs else (),
        locks=(
            tuple(_stale_locks(fs.root / constants.LOCKS_DIR, now - policy.lock_timeout))
            if fs
            else ()
        ),
        orphan_markers=tuple(
            info.key
            for info in store.backend.list(f"{constants.ACCESS_DIR}/")
            if _KEY_ID_RE.fullmatch(name := info.key.split("/")[-1])
            and name not in with_manifests
            and info.mtime < cutoff
        ),
        seen_manifests=frozenset(listing.seen),
        live_chunks=len(kept_live),
        live_bytes=sum(sizes.get(d, 0) for d in kept_live),
        sweep_blocked=blocked,
        store_clock=clock,
        planned_at=planned_at,
        grace_kept=len(young),
        grace_kept_bytes=sum(young),
        waiting=tuple(waiting),
    )


def repack(
    store: Store,
    candidate: Candidate,
    keep: frozenset[bytes],
    dictionaries: packs.Dictionaries | None = None,
) -> frozenset[bytes] | None:
    """Pack ``keep``'s chunks of ``candidate`` again (a new pack, published with its
    index like any save's), and return those copied; None when its pack is gone. Raises
    when a live chunk cannot be read (it is then left alone)."""
    pack_id = packs.pack_id_from_key(candidate.key)
    if pack_id is None:
        return None
    index = chunk_index.read_index(store.backend, pack_id)
    if index.dictionaries and dictionaries is None:
        # Copied into blocks without a dictionary: read through the one they were
        # compressed with, located in the store's current chunk index.
        dictionaries = Rebuilder(store.backend, store.chunk_index())
    return frozenset(packs.copy_chunks(store.backend, index, keep, dictionaries=dictionaries))


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
    if not real_dir(lock_dir):
        return
    try:
        entries = list(os.scandir(lock_dir))
    except OSError:
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
    # 1. Keys retention drops are set aside: their manifests renamed out of readers'
    #    sight (the key stops loading), their chunks kept until the next run. A key loaded
    #    or saved since planning is kept. One key gc cannot rename (permissions) is an
    #    error in the report, never the end of the run.
    protected: set[bytes] = set()
    spared: set[str] = set()
    for d in p.drop:
        try:
            aside = _set_key_aside(store, d.state, p.seen_manifests)
        except OSError as e:
            report.errors.append(f"setting {d.state.key_id} aside: {e.strerror or e}")
            aside = False
        if aside:
            report.keys_dropped += 1
        else:
            report.keys_spared += 1
            spared.add(d.state.key_id)
            protected.update(d.state.chunks)
    # 2. Keys an earlier run set aside: deleted once aside for a grace period, or back if
    #    saved since (or kept in use by step 1).
    for a in p.set_aside:
        try:
            outcome = _finish_set_aside(store, a, p.seen_manifests, a.key_id in spared, report)
        except OSError as e:
            report.errors.append(f"finishing {a.key_id}: {e.strerror or e}")
            outcome = "restored"  # unknown: protect its chunks this run
        if outcome != "expired":
            protected.update(a.chunks)
    # 3. Compaction never drops a file: it merges only manifests it read, and deletes
    #    only those; one published meanwhile stays, and is newer, so it still wins.
    sweeping = {packs.pack_id_from_key(c.key) for c in p.packs + p.repack}
    # One view of the packs for every key compacted, read now (not at planning: packs
    # published since count), and one renewal per pack for the whole run.
    where = store.chunk_index() if p.compact else None
    renewed: dict[str, bool] = {}
    for s in p.compact:
        try:
            if compact_key(
                store,
                s.key_id,
                s.manifests,
                sweeping={x for x in sweeping if x},
                index=where,
                renewed=renewed,
            ):
                report.keys_compacted += 1
        except Exception as e:  # one key's trouble never stops the rest of gc
            report.errors.append(f"compaction of {s.key_id}: {type(e).__name__}: {e}")
    # 4. Protect the chunks of every manifest published since planning. One that cannot
    #    be read now could list any chunk: then nothing is swept this run.
    new_manifests = NewManifests(
        index=p.index if p.index is not None else ChunkIndex(),
        ignored=set(p.ignored_indexes),
    )
    late = chunks_of_new_manifests(store, p.seen_manifests, new_manifests)
    if late is None:
        p = replace(
            p, sweep_blocked=p.sweep_blocked or "a manifest published during gc cannot be read"
        )
    else:
        protected |= late
    # 5. Sweep, through trash/: first what crashed runs left there, then the packs with
    #    no live chunk. Mostly dead packs have their live chunks packed again, and are
    #    swept by a later run, once every host sees the copy.
    live = protected | {c for s in p.keys for c in s.chunks} | p.dictionary_chunks
    live |= {c for a in p.set_aside if a.restore or not a.due for c in a.chunks}

    def expiry() -> float:
        return _intent_expiry(p)

    def members_of(pack_id: str) -> frozenset[bytes] | None:
        if pack_id in p.members:
            return p.members[pack_id]
        try:
            return frozenset(
                c.digest for c in chunk_index.read_index(store.backend, pack_id).chunks
            )
        except NotFound:
            return frozenset()  # no index: no manifest can list its chunks
        except (CasstoreError, OSError):
            return None

    if fs is not None:
        recovered = recover_renamed(fs, p.cutoff, live, members_of)
    else:
        recovered = recover_objects(
            store, live, members_of, p.seen_manifests, expiry, p.store_now, new_manifests
        )
    report.trash_restored += recovered.restored
    report.errors += recovered.errors
    if p.sweep_blocked:
        report.errors.append(p.sweep_blocked)
    else:
        candidates = list(p.packs)
        # One rebuild of each dictionary for the whole run, from the chunk index read when
        # planning (nothing is deleted before the repacks are done), read again if needed.
        rebuild = (
            Rebuilder(store.backend, p.index, reload=store.chunk_index)
            if p.index is not None
            else None
        )
        for c in p.repack:
            try:
                copied = repack(store, c, (c.members & live) - c.covered, rebuild)
            except (CasstoreError, OSError) as e:
                report.errors.append(f"repacking {c.key}: {e}")
                continue
            if copied is not None:
                # The old pack stays until a later run: a host that does not see the new
                # pack yet reads the chunks there (see plan, "settled").
                report.packs_repacked += 1
                report.chunks_repacked += len(copied)
        todo = [c for c in candidates if not c.needed_by & protected]
        report.packs_kept_late += len(candidates) - len(todo)
        if fs is not None:
            swept = by_rename(fs, todo, p.cutoff, threads, progress)
        else:
            swept = by_intents(
                store, todo, p.cutoff, p.seen_manifests, expiry, new_manifests, threads, progress
            )
        report.packs_deleted += swept.deleted
        report.bytes_freed += swept.bytes_freed
        report.packs_kept_late += swept.kept
        report.errors += swept.errors
        # A pack gone for good takes its index with it: after the pack, so a reader never
        # finds a pack whose index it cannot read.
        for pack_id in swept.deleted_packs:
            report.indexes_deleted += store.backend.delete(packs.index_key(pack_id))
    # An index whose pack is gone (a run that crashed between the two deletes, or one
    # nothing can read): deleted even while the sweep is blocked, which such an index
    # must not do forever. One whose pack sits in trash/ stays: a run may give it back.
    in_trash = chunk_index.list_trashed(store.backend)
    for key in p.orphan_indexes:
        orphan = packs.pack_id_from_key(key)
        if (
            orphan is not None
            and orphan not in in_trash
            and store.backend.stat(packs.pack_key(orphan)) is None
        ):
            report.indexes_deleted += store.backend.delete(key)
    # 6. Cleanup of what crashed writers and lock holders left.
    report.temps_removed = sum(1 for t in p.temps if _unlink(t))
    report.locks_removed = sum(1 for path in p.locks if remove_if_unheld(path))
    report.markers_removed = sum(1 for m in p.orphan_markers if _remove_orphan_marker(store, m))
    # 7. Usage history: one object per finished day; nothing past the retention.
    try:
        merged = usage.compact(store.backend, now=p.now, retention=p.policy.usage_retention)
        report.usage_records_merged = merged.records_merged
        report.usage_objects_deleted = merged.objects_deleted
    except Exception as e:  # the history is informational: it never fails gc
        report.errors.append(f"usage history: {type(e).__name__}: {e}")
    report.seconds = time.monotonic() - started
    log.info(
        "gc: set aside %d keys, deleted %d set aside earlier, restored %d, compacted %d, "
        "deleted %d packs (%.1f MiB), repacked %d, spared %d, removed %d temp and %d lock files "
        "in %.2fs",
        report.keys_dropped,
        report.keys_expired,
        report.keys_restored,
        report.keys_compacted,
        report.packs_deleted,
        report.bytes_freed / 2**20,
        report.packs_repacked,
        report.packs_kept_late,
        report.temps_removed,
        report.locks_removed,
        report.seconds,
    )
    return report


def _intent_expiry(p: Plan) -> float:
    """Intents dated before this (the store's clock) are older than the grace: expired.
    A second of slack: object stores date objects to the second."""
    return p.store_now() - p.policy.grace - 1.0


def _used_since_plan(store: Store, state: KeyState, seen: frozenset[str]) -> bool:
    """Whether a replica saved (a manifest that was not there when gc planned) or loaded
    (the access marker changed) ``state``'s key since planning. Compares against what the
    plan saw, never against a clock, so clock skew between hosts cannot hide a use; and
    against every name listed then, so a junk file cannot look like a new save."""
    prefix = f"{constants.MANIFESTS_DIR}/{state.key_id}/"
    if any(
        info.key not in seen and info.key.endswith(constants.MANIFEST_SUFFIX)
        for info in store.backend.list(prefix)
    ):
        return True
    marker = store.backend.stat(Store.access_key(state.key_id))
    now = (marker.mtime, marker.tag) if marker else (None, None)
    return now != (state.marker_mtime, state.marker_tag)


def _set_key_aside(store: Store, state: KeyState, seen: frozenset[str]) -> bool:
    """Rename the manifests of a key the plan dropped to ``<name>.dropped``, unless the key
    was used since planning. True when the key is set aside.

    Renames, not deletions: they need no space (a full volume is when ``--max-size``
    runs), a crash leaves the key set aside or not but never half-deleted, and the
    manifests can come back byte for byte. The key is checked before and after: a replica
    that loaded and saved meanwhile (its save read the manifests being renamed, so it
    listed only its new files) changed the access marker or published a manifest, and the
    manifests go back at once. A use that reaches gc later than that (metadata crossing
    hosts lazily) is caught by the next run, hours later, before anything is deleted.
    """
    if _used_since_plan(store, state, seen):
        return False
    at = time.time()
    moved = [name for name in state.manifests if store.backend.move(name, dropped_name(name, at))]
    if _used_since_plan(store, state, seen):
        for name in moved:
            _move_back(store, dropped_name(name, at))
        log.info("gc: kept %s: it was used while gc ran", state.key_id)
        return False
    return True


def _move_back(store: Store, dropped: str) -> bool:
    """Rename a set-aside manifest back; if its name is taken (cannot happen with unique
    names, but never replace), the set-aside copy is redundant."""
    directory, _, base = dropped.rpartition("/")
    matched = _DROPPED_RE.match(base)
    name = f"{directory}/{matched.group('name')}" if matched else dropped
    if store.backend.move(dropped, name):
        return True
    store.backend.delete(dropped)
    return False


def _finish_set_aside(
    store: Store, a: SetAside, seen: frozenset[str], in_use: bool, report: GcReport
) -> str:
    """Delete a key set aside by an earlier run, or bring it back when it was saved since
    (a replica whose view lagged may have listed only its new files: the old manifests
    complete the key again)."""
    prefix = f"{constants.MANIFESTS_DIR}/{a.key_id}/"
    saved_since = any(
        info.key.endswith(constants.MANIFEST_SUFFIX) and info.key not in seen
        for info in store.backend.list(prefix)
    )
    if a.restore or saved_since or in_use:
        for name in a.names:
            _move_back(store, name)
        report.keys_restored += 1
        return "restored"
    if not a.due:
        return "waiting"  # not aside for a grace period yet: a save may still be in flight
    for name in a.names:
        if store.backend.delete(name):
            report.manifests_deleted += 1
    # A save that landed between the check and the deletions still lists its own files;
    # the access marker goes only when no manifest is left at all.
    if not any(True for _ in store.backend.list(prefix)):
        store.backend.delete(Store.access_key(a.key_id))
    report.keys_expired += 1
    return "expired"


def _remove_orphan_marker(store: Store, marker: str) -> bool:
    key_id = marker.rsplit("/", 1)[-1]
    if any(True for _ in store.backend.list(f"{constants.MANIFESTS_DIR}/{key_id}/")):
        return False
    return store.backend.delete(marker)


_KEY_ID_RE = re.compile(r"[0-9a-f]{32}")


def compaction_refused(store: Store, signers: Iterable[bytes | None]) -> str | None:
    """Why gc may not merge manifests with these signers, or None when it may.

    A merged manifest speaks for everything it merges, so it may only say what one signer
    already said, signed by that signer: manifests of several signers stay apart (merging
    them would launder one signer's files under another's name, or strip signatures), and
    signed ones are merged only by a gc that holds that very key (docs/security.md).
    Unsigned manifests merge into an unsigned one, as they always did."""
    distinct = set(signers)
    if len(distinct) > 1:
        return "manifests of several signers are never merged"
    signer = next(iter(distinct), None)
    if signer is None:
        return None
    held = store.signing_key.public.raw if store.signing_key is not None else None
    if signer != held:
        from casstore.signing import PublicKey

        return (
            f"signed by {PublicKey(signer).short}…; gc merges signed manifests only with "
            "their signer's key (gc --signing-key)"
        )
    return None


def compact_key(
    store: Store,
    key_id: str,
    names: tuple[str, ...],
    *,
    sweeping: frozenset[str] | set[str] = frozenset(),
    index: ChunkIndex | None = None,
    renewed: dict[str, bool] | None = None,
) -> bool:
    """Replace the manifests ``names`` of one key by a single merged manifest.

    gc publishes like any saver (docs/gc.md, S1-S2): every chunk the merged manifest
    lists is renewed first, so a concurrent sweep (another gc) gives it back; if one is
    missing, the key is left uncompacted rather than published anew over a hole. Signed
    manifests are merged under their signer's signature, and only as
    :func:`compaction_refused` allows, judged again on what is read now."""
    wanted = set(names)
    current = store.read_manifests(key_id)[0]
    loaded = [s for s in current if s.name in wanted]
    if len(loaded) < 2:
        return False
    # Every manifest the key holds now counts, published since planning included: merging
    # one signer's manifests dates their older files anew, which could reorder them
    # against another signer's manifest stamped in between.
    if why := compaction_refused(store, (s.signer for s in current)):
        log.info("gc: not compacting %s: %s", key_id, why)
        return False
    signed = loaded[0].signer is not None
    newest = max(s.manifest.created_at for s in loaded)
    view = mf.merge(s.manifest for s in loaded)
    index = index if index is not None else store.chunk_index()
    renewed = renewed if renewed is not None else {}
    for digest in {c.digest for f in view.values() for c in f.chunks}:
        present = False
        for loc in reversed(index.locate(digest)):
            pack_id = loc.index.id
            if pack_id in sweeping:
                # Live, so this run sweeps it only if another pack holds the chunk, or
                # copies it (the pack then stays until a later run): renewing the pack
                # would only keep it longer.
                present = True
                continue
            if pack_id not in renewed:
                renewed[pack_id] = _renew(store, pack_id)
            if renewed[pack_id]:
                present = True
                break
        if not present:
            log.info("gc: not compacting %s: chunk %s is missing", key_id, digest.hex())
            return False
    merged = mf.Manifest(
        format=constants.MANIFEST_FORMAT_VERSION,
        key=loaded[-1].manifest.key,
        # The newest merged time, not now: a manifest published during compaction is
        # newer than every file in here and must keep winning for the paths it names.
        created_at=newest,
        producer=mf.this_producer(),
        files=tuple(view.values()),
    )
    mf.validate(merged)
    name = f"{constants.MANIFESTS_DIR}/{key_id}/{mf.new_manifest_name(newest)}"
    store.backend.put_if_absent(name, mf.encode(merged, store.signing_key if signed else None))
    for s in loaded:
        store.backend.delete(s.name)
    return True


def _renew(store: Store, pack_id: str) -> bool:
    try:
        return store.backend.refresh(packs.pack_key(pack_id))
    except CannotRenew:
        return False


def remove_key(store: Store, key: CacheKey) -> int:
    """Delete every manifest of ``key`` (``casstore rm``); its chunks go at the next gc."""
    count = 0
    for info in list(store.backend.list(f"{constants.MANIFESTS_DIR}/{key.id}/")):
        if store.backend.delete(info.key):
            count += 1
    store.backend.delete(Store.access_key(key.id))
    return count


def cleanup(
    store: Store,
    *,
    temp_timeout: float,
    lock_timeout: float,
    budget_seconds: float = 0.05,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Opportunistic cleanup for savers: remove stale temp files from a few directories,
    stopping after ``budget_seconds`` (by ``clock``, read before each file) so no replica
    spends more than a moment here."""
    if not isinstance(store.backend, FileSystemBackend):
        return 0
    root = store.backend.root
    deadline = clock() + budget_seconds
    now = time.time()
    removed = 0
    dirs = [root / constants.MANIFESTS_DIR, root / constants.LOCKS_DIR]
    try:
        packs_dir = root / constants.PACKS_DIR
        fanout = [e.path for e in os.scandir(packs_dir) if e.is_dir(follow_symlinks=False)]
        fanout = fanout if real_dir(packs_dir) else []
    except OSError:
        fanout = []
    dirs += [Path(p) for p in random.sample(fanout, min(4, len(fanout)))]
    for d in dirs:
        if not real_dir(d):
            continue  # os.walk would follow a symlink given as its top directory
        for dirpath, _sub, names in os.walk(d):
            for name in names:
                if clock() > deadline:
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
                    removed += remove_if_unheld(path)
    return removed


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def gc_lock(store: Store) -> AbstractContextManager[bool]:
    """Only one gc at a time per store: False when another gc holds the lock. Where the
    lock cannot be taken at all, True: a gc that silently never ran would let the store
    fill up, and the lock only avoids duplicate work. An object store has no locks: run
    its gc from one place (docs/gc.md)."""
    fs = _fs(store)
    if fs is None:
        return nullcontext(True)
    return exclusive_unless_busy(fs.root / constants.LOCKS_DIR / "gc.lock")

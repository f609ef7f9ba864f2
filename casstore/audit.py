"""Inspection of a store: ``verify`` re-hashes every chunk of every pack, ``stats`` sums
usage, ``repair`` moves what verify found damaged out of readers' way."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from casstore import chunk_index, constants, packs
from casstore import manifest as mf
from casstore.chunk_index import UNSUPPORTED_MARK
from casstore.dictionaries import Rebuilder
from casstore.errors import (
    CasstoreError,
    CorruptObject,
    InvalidManifest,
    NotFound,
    UnsupportedManifest,
)
from casstore.store import Store

if TYPE_CHECKING:
    from casstore.signing import TrustedKeys


@dataclass
class VerifyReport:
    chunks: int = 0  # chunk entries checked, in every pack
    packs: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (object key, reason)
    # Pack id -> hex digests of its chunks that do not read back intact (the rest do).
    damaged_chunks: dict[str, list[str]] = field(default_factory=dict)
    # Packs with no index (a save that crashed between the two): garbage gc removes.
    unindexed_packs: list[str] = field(default_factory=list)
    # Objects that could not be read now (permissions, I/O): not judged, never
    # quarantined; the store is not known to be whole, so verify does not say ok.
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    # Pack indexes of a newer casstore: kept, like unsupported manifests (upgrade to check).
    unsupported_indexes: list[tuple[str, str]] = field(default_factory=list)
    manifests: int = 0
    invalid_manifests: list[tuple[str, str]] = field(default_factory=list)
    # Manifests of a newer casstore (another format, an unknown field): not damage, and
    # never quarantined by --repair (a newer version may need them); upgrade to check them.
    unsupported_manifests: list[tuple[str, str]] = field(default_factory=list)
    missing_chunks: list[tuple[str, str]] = field(default_factory=list)  # (manifest, digest)
    # Valid manifests per signer (a public key, or "unsigned"). A signature that does not
    # verify makes its manifest invalid (above): forged or altered.
    signers: dict[str, int] = field(default_factory=dict)
    # Valid manifests the given trusted keys do not trust, with their signer: not damage
    # (loads ignore them), listed so an operator sees who else writes the store.
    untrusted_manifests: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.corrupt or self.invalid_manifests or self.missing_chunks or self.unreadable
        )


@dataclass
class StoreStats:
    keys: int = 0
    manifests: int = 0
    chunks: int = 0  # distinct chunks in the packs
    packs: int = 0
    stored_bytes: int = 0  # bytes of packs and their indexes
    unique_bytes: int = 0  # uncompressed bytes of distinct chunks referenced by manifests
    logical_bytes: int = 0  # bytes of every key's files, as loads would write them

    @property
    def dedup_ratio(self) -> float:
        """Logical bytes per distinct chunk byte: 2.0 means each chunk serves twice."""
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def compression_ratio(self) -> float:
        return self.unique_bytes / self.stored_bytes if self.stored_bytes else 1.0


def _all_manifests(
    store: Store,
    unsupported: list[tuple[str, str]] | None = None,
    signers: dict[str, bytes | None] | None = None,
) -> tuple[list[tuple[str, mf.Manifest]], list[tuple[str, str]]]:
    good: list[tuple[str, mf.Manifest]] = []
    bad: list[tuple[str, str]] = []
    for info in store.backend.list(f"{constants.MANIFESTS_DIR}/"):
        if not info.key.endswith(constants.MANIFEST_SUFFIX):
            continue  # keys gc set aside, and anything else that is not a manifest
        try:
            blob = store.backend.get(info.key, max_bytes=constants.MAX_MANIFEST_BYTES)
            decoded = mf.decode_signed(blob, source=info.key)
        except NotFound:
            continue
        except UnsupportedManifest as e:
            if unsupported is not None:
                unsupported.append((info.key, str(e)))
            continue
        except (InvalidManifest, CorruptObject) as e:
            bad.append((info.key, str(e)))
            continue
        m = decoded.manifest
        if info.key.split("/")[1] != m.key.id:
            bad.append((info.key, f"stored under the wrong key id (belongs to {m.key.id})"))
            continue
        good.append((info.key, m))
        if signers is not None:
            signers[info.key] = decoded.signer
    return good, bad


def verify(
    store: Store,
    *,
    threads: int = constants.DEFAULT_THREADS,
    progress: Callable[[int, int], None] | None = None,
    trusted: TrustedKeys | None = None,
) -> VerifyReport:
    """Decompress and re-hash every chunk; check every manifest (its signature too) and
    what it references. ``trusted``: also list the valid manifests these keys do not
    trust."""
    from casstore.signing import signer_name

    report = VerifyReport()
    signer_of: dict[str, bytes | None] = {}
    manifests, report.invalid_manifests = _all_manifests(
        store, report.unsupported_manifests, signer_of
    )
    for name, signer in sorted(signer_of.items()):
        label = signer_name(signer)
        report.signers[label] = report.signers.get(label, 0) + 1
        if trusted is not None and not trusted.trusts(signer):
            report.untrusted_manifests.append((name, label))
    report.manifests = (
        len(manifests) + len(report.invalid_manifests) + len(report.unsupported_manifests)
    )
    listed = chunk_index.list_packs(store.backend)
    index = chunk_index.load(store.backend, threads=threads)
    rebuild = Rebuilder(store.backend, index)
    for pack_id, why in sorted(index.damaged.items()):
        report.corrupt.append((packs.index_key(pack_id), why))
    for pack_id, why in sorted(index.unreadable.items()):
        if why.startswith(UNSUPPORTED_MARK):
            report.unsupported_indexes.append((packs.index_key(pack_id), why))
        else:
            report.unreadable.append((packs.index_key(pack_id), why))
    present: set[str] = set()
    unknown: set[str] = set()  # chunks of packs that could not be read: not judged missing
    lock = threading.Lock()
    done = 0
    todo = [index.packs[p] for p in sorted(listed) if p in index.packs]
    report.unindexed_packs = sorted(
        p
        for p in listed
        if p not in index.packs and p not in index.unreadable and p not in index.damaged
    )

    def check(pack: packs.PackIndex) -> None:
        nonlocal done
        reason = None
        damaged: list[bytes] = []
        intact = True
        if listed[pack.id].size != pack.size:
            reason = f"holds {listed[pack.id].size} bytes, its index says {pack.size}"
        unverified: set[bytes] = set()
        try:
            check = packs.verify_pack(store.backend, pack, dictionaries=rebuild)
            damaged, intact, unverified = check.damaged, check.intact, set(check.unverified)
        except NotFound:
            return  # deleted since the listing (gc)
        except CorruptObject as e:
            reason, damaged, intact = str(e), [c.digest for c in pack.chunks], False
        except (CasstoreError, OSError) as e:
            with lock:
                report.unreadable.append((packs.pack_key(pack.id), str(e)))
                unknown.update(c.digest.hex() for c in pack.chunks)
            return
        bad = set(damaged)
        with lock:
            done += 1
            report.chunks += len(pack.chunks)
            if unverified:
                # Not damage: the block may be whole, but what it needs to be read is not
                # (its dictionary's chunks). Not judged, never quarantined.
                report.unreadable.append((packs.pack_key(pack.id), check.why_unverified))
                unknown.update(d.hex() for d in unverified)
            present.update(
                c.digest.hex()
                for c in pack.chunks
                if c.digest not in bad and c.digest not in unverified
            )
            if damaged or not intact or reason:
                # Repair rewrites the pack from its intact chunks either way; not while
                # some of them cannot be read for want of a dictionary (they may be whole).
                if not unverified:
                    report.damaged_chunks[pack.id] = sorted(d.hex() for d in bad)
                if not reason:
                    reason = (
                        f"{len(bad)} of its {len(pack.chunks)} chunks are damaged"
                        if bad
                        else "its bytes differ from its checksum (every chunk reads intact)"
                    )
                report.corrupt.append((packs.pack_key(pack.id), reason))
        if progress is not None:
            progress(done, len(todo))

    # Each check holds a whole pack (up to ~25 MiB): a few at once, whatever the threads.
    with ThreadPoolExecutor(max(1, min(threads, 4))) as pool:
        list(pool.map(check, todo))
    report.packs = len(listed)
    report.corrupt.sort()
    for name, m in manifests:
        for f in m.files:
            for c in f.chunks:
                if c.digest.hex() not in present and c.digest.hex() not in unknown:
                    report.missing_chunks.append((name, c.digest.hex()))
    return report


def stats(store: Store) -> StoreStats:
    """Usage totals. Reads every manifest and every pack index; reads no chunk data."""
    s = StoreStats()
    for prefix in (f"{constants.PACKS_DIR}/", f"{constants.INDEX_DIR}/"):
        for info in store.backend.list(prefix):
            s.packs += prefix.startswith(constants.PACKS_DIR)
            s.stored_bytes += info.size
    s.chunks = len(store.chunk_index())
    manifests, _ = _all_manifests(store)
    s.manifests = len(manifests)
    by_key: dict[str, list[mf.Manifest]] = {}
    for _, m in manifests:
        by_key.setdefault(m.key.id, []).append(m)
    s.keys = len(by_key)
    unique: dict[bytes, int] = {}
    for ms in by_key.values():
        for f in mf.merge(ms).values():
            s.logical_bytes += f.size
            for c in f.chunks:
                unique[c.digest] = c.size
    s.unique_bytes = sum(unique.values())
    return s


@dataclass
class RepairReport:
    packs_quarantined: int = 0
    chunks_salvaged: int = 0  # intact chunks of damaged packs, packed again first
    indexes_quarantined: int = 0
    manifests_quarantined: int = 0


def repair(store: Store, report: VerifyReport) -> RepairReport:
    """Move what ``verify`` found damaged into ``quarantine/``, out of every reader's way.

    A damaged pack's intact chunks are first packed again (a new pack, published with its
    index), so only its damaged chunks go missing. A missing chunk is uploaded again by
    the next save that holds its bytes; files that need it are misses until then, never
    wrong bytes. A damaged index (one that fails its checks when read again) is
    quarantined too: its pack's chunks count as missing (gc removes the pack once it is
    older than the grace). What could merely not be read is left alone.
    """
    out = RepairReport()
    index = chunk_index.load(store.backend)
    rebuild = Rebuilder(store.backend, index)
    for pack_id, damaged in sorted(report.damaged_chunks.items()):
        pack = index.packs.get(pack_id)
        if pack is None:
            continue
        bad = {bytes.fromhex(d) for d in damaged}
        intact = [c.digest for c in pack.chunks if c.digest not in bad]
        out.chunks_salvaged += len(
            packs.copy_chunks(store.backend, pack, intact, skip_damaged=True, dictionaries=rebuild)
        )
        dest = f"{constants.QUARANTINE_DIR}/packs/{pack_id}{constants.PACK_SUFFIX}"
        if store.backend.move(packs.pack_key(pack_id), f"{dest}.{uuid.uuid4().hex[:8]}"):
            out.packs_quarantined += 1
            store.backend.delete(packs.index_key(pack_id))
    for key, _why in report.corrupt:
        if key.startswith(f"{constants.INDEX_DIR}/") and _still_damaged(store, key):
            dest = f"{constants.QUARANTINE_DIR}/index/{key.rsplit('/', 1)[-1]}"
            if store.backend.move(key, f"{dest}.{uuid.uuid4().hex[:8]}"):
                out.indexes_quarantined += 1
    for key, _why in report.invalid_manifests:
        dest = f"{constants.QUARANTINE_DIR}/manifests/{key.replace('/', '_')}"
        if store.backend.move(key, f"{dest}.{uuid.uuid4().hex[:8]}"):
            out.manifests_quarantined += 1
    return out


def _still_damaged(store: Store, key: str) -> bool:
    """Whether the index at ``key`` fails its checks when read again now (its name
    included): only then is it quarantined, never for a read that fails, nor for a newer
    format."""
    pack_id = packs.pack_id_from_key(key)
    if pack_id is None:
        return False
    try:
        chunk_index.read_index(store.backend, pack_id)
    except CorruptObject:
        return True
    except (CasstoreError, OSError):
        return False
    return False


@dataclass
class ModelUsage:
    model: str
    keys: int = 0
    logical_bytes: int = 0  # what loads of its keys write
    own_bytes: int = 0  # stored bytes of chunks only this model references
    shared_bytes: int = 0  # stored bytes of chunks it shares with other models


def usage_by_model(store: Store) -> list[ModelUsage]:
    """Who uses the space: per model fingerprint, its own and its shared stored bytes."""
    sizes = store.chunk_index().stored_sizes()
    manifests, _ = _all_manifests(store)
    by_key: dict[str, list[mf.Manifest]] = {}
    for _, m in manifests:
        by_key.setdefault(m.key.id, []).append(m)
    usage: dict[str, ModelUsage] = {}
    chunks_of: dict[str, set[bytes]] = {}
    for ms in by_key.values():
        model = ms[0].key.model
        u = usage.setdefault(model, ModelUsage(model))
        u.keys += 1
        for f in mf.merge(ms).values():
            u.logical_bytes += f.size
            chunks_of.setdefault(model, set()).update(c.digest for c in f.chunks)
    owners: dict[bytes, int] = {}
    for digests in chunks_of.values():
        for d in digests:
            owners[d] = owners.get(d, 0) + 1
    for model, digests in chunks_of.items():
        for d in digests:
            if owners[d] > 1:
                usage[model].shared_bytes += sizes.get(d, 0)
            else:
                usage[model].own_bytes += sizes.get(d, 0)
    return sorted(usage.values(), key=lambda u: u.own_bytes + u.shared_bytes, reverse=True)

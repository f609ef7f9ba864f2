"""Read-only inspection of a store: ``verify`` re-hashes every object, ``stats`` sums usage."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from casstore import constants, objects
from casstore import manifest as mf
from casstore.errors import CorruptObject, InvalidManifest, NotFound, UnsupportedManifest
from casstore.store import Store

if TYPE_CHECKING:
    from casstore.signing import TrustedKeys


@dataclass
class VerifyReport:
    chunks: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (object key, reason)
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
        return not (self.corrupt or self.invalid_manifests or self.missing_chunks)


@dataclass
class StoreStats:
    keys: int = 0
    manifests: int = 0
    chunks: int = 0
    stored_bytes: int = 0  # compressed chunk bytes on disk
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
    infos = list(store.backend.list(f"{constants.CHUNKS_DIR}/"))
    present: set[str] = set()
    lock = threading.Lock()
    done = 0

    def check(key: str) -> None:
        nonlocal done
        hexd = objects.digest_from_key(key)
        reason = None
        if hexd is None:
            reason = "not a chunk name"
        else:
            try:
                blob = store.backend.get(key, max_bytes=constants.MAX_CHUNK_OBJECT_BYTES)
                objects.decode_chunk(blob, bytes.fromhex(hexd))
            except CorruptObject as e:
                reason = str(e)
            except NotFound:
                return
        with lock:
            done += 1
            if reason is None and hexd is not None:
                present.add(hexd)
            else:
                report.corrupt.append((key, reason or "corrupt"))
        if progress is not None:
            progress(done, len(infos))

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(check, [i.key for i in infos]))
    report.chunks = len(infos)
    report.corrupt.sort()
    for name, m in manifests:
        for f in m.files:
            for c in f.chunks:
                if c.digest.hex() not in present:
                    report.missing_chunks.append((name, c.digest.hex()))
    return report


def stats(store: Store) -> StoreStats:
    """Usage totals. Reads every manifest and lists every chunk; reads no chunk data."""
    s = StoreStats()
    for info in store.backend.list(f"{constants.CHUNKS_DIR}/"):
        s.chunks += 1
        s.stored_bytes += info.size
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
    chunks_quarantined: int = 0
    manifests_quarantined: int = 0


def repair(store: Store, report: VerifyReport) -> RepairReport:
    """Move what ``verify`` found damaged into ``quarantine/``, out of every reader's way.

    A quarantined chunk counts as missing, so the next save that holds its bytes uploads it
    again; files that need it are misses until then, never wrong bytes.
    """
    out = RepairReport()
    for key, _why in report.corrupt:
        name = key.rsplit("/", 1)[-1]
        dest = f"{constants.QUARANTINE_DIR}/chunks/{name}.{uuid.uuid4().hex[:8]}"
        if store.backend.move(key, dest):
            out.chunks_quarantined += 1
    for key, _why in report.invalid_manifests:
        dest = f"{constants.QUARANTINE_DIR}/manifests/{key.replace('/', '_')}"
        if store.backend.move(key, f"{dest}.{uuid.uuid4().hex[:8]}"):
            out.manifests_quarantined += 1
    return out


@dataclass
class ModelUsage:
    model: str
    keys: int = 0
    logical_bytes: int = 0  # what loads of its keys write
    own_bytes: int = 0  # stored bytes of chunks only this model references
    shared_bytes: int = 0  # stored bytes of chunks it shares with other models


def usage_by_model(store: Store) -> list[ModelUsage]:
    """Who uses the space: per model fingerprint, its own and its shared stored bytes."""
    sizes = {}
    for info in store.backend.list(f"{constants.CHUNKS_DIR}/"):
        hexd = objects.digest_from_key(info.key)
        if hexd is not None:
            sizes[bytes.fromhex(hexd)] = info.size
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

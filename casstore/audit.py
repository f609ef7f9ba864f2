"""Read-only inspection of a store: ``verify`` re-hashes every object, ``stats`` sums usage."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from casstore import constants, objects
from casstore import manifest as mf
from casstore.errors import CorruptObject, InvalidManifest, NotFound
from casstore.store import Store


@dataclass
class VerifyReport:
    chunks: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (object key, reason)
    manifests: int = 0
    invalid_manifests: list[tuple[str, str]] = field(default_factory=list)
    missing_chunks: list[tuple[str, str]] = field(default_factory=list)  # (manifest, digest)

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


def _all_manifests(store: Store) -> tuple[list[tuple[str, mf.Manifest]], list[tuple[str, str]]]:
    good: list[tuple[str, mf.Manifest]] = []
    bad: list[tuple[str, str]] = []
    for info in store.backend.list(f"{constants.MANIFESTS_DIR}/"):
        try:
            m = mf.decode(store.backend.get(info.key), source=info.key)
        except NotFound:
            continue
        except InvalidManifest as e:
            bad.append((info.key, str(e)))
            continue
        if info.key.split("/")[1] != m.key.id:
            bad.append((info.key, f"stored under the wrong key id (belongs to {m.key.id})"))
            continue
        good.append((info.key, m))
    return good, bad


def verify(
    store: Store,
    *,
    threads: int = constants.DEFAULT_THREADS,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Decompress and re-hash every chunk; check every manifest and what it references."""
    report = VerifyReport()
    manifests, report.invalid_manifests = _all_manifests(store)
    report.manifests = len(manifests) + len(report.invalid_manifests)
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
                objects.decode_chunk(store.backend.get(key), bytes.fromhex(hexd))
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

"""Usage history: one small immutable record per load and per save, read back as figures.

Each load and save publishes a record (when, which key, what outcome, how many files and
bytes) as its own object, ``usage/<UTC day>/<ns>-<random>.rec``, with the store's
lock-free publish: concurrent replicas on many hosts never contend, never append to a
shared file, never rewrite a manifest, and none can lose another's record. gc merges a
finished day's records into one ``.recs`` object and deletes records past the retention;
every record carries its id, and readers count each id once, so a gc that crashes
between publishing the merged object and deleting what it merged counts nothing twice.

Recording is best effort: a read-only store, a full disk or any other error is logged at
DEBUG and never fails the load or save it records.
"""

from __future__ import annotations

import logging
import math
import socket
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import msgspec

from casstore import constants
from casstore.backends.base import Backend
from casstore.keys import CacheKey

log = logging.getLogger("casstore")

USAGE_DIR = "usage"
RECORD_SUFFIX = ".rec"
MERGED_SUFFIX = ".recs"
MAX_RECORD_BYTES = 64 * 1024
MAX_MERGED_BYTES = 256 * 1024 * 1024
DEFAULT_RETENTION = 90 * 86400.0
# Records dated further ahead than this are a broken clock (or a forgery): ignored by
# readers, deleted by gc, instead of counting in every window for years.
CLOCK_SLACK = 86400.0

# Outcomes.
LOAD_COMPLETE = "complete"  # every file restored or already present
LOAD_PARTIAL = "partial"  # some files missing (chunks lost or damaged)
LOAD_MISS = "miss"  # nothing saved for the key (or nothing a trusted key signed)
SAVE_SAVED = "saved"  # published a manifest
SAVE_UNCHANGED = "unchanged"  # nothing new
LOAD_OUTCOMES = (LOAD_COMPLETE, LOAD_PARTIAL, LOAD_MISS)
SAVE_OUTCOMES = (SAVE_SAVED, SAVE_UNCHANGED)


class Record(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """One load or save. Unknown fields are accepted: a newer casstore may add some."""

    id: str
    time: float
    op: str  # "load" or "save"
    outcome: str
    key_id: str
    model: str
    tree: str
    host: str
    files: int = 0  # load: files written; save: files new or changed
    bytes: int = 0  # load: bytes written; save: new bytes uploaded
    seconds: float = 0.0


_encoder = msgspec.msgpack.Encoder()
_record_decoder = msgspec.msgpack.Decoder(Record)
_merged_decoder = msgspec.msgpack.Decoder(list[Record])


def day_of(ts: float) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(ts))


def record(
    backend: Backend,
    op: str,
    outcome: str,
    key: CacheKey,
    *,
    files: int = 0,
    nbytes: int = 0,
    seconds: float = 0.0,
    now: float | None = None,
) -> None:
    """Publish one record; never raises (a record is worth less than the load it
    records)."""
    try:
        now = time.time() if now is None else now
        rid = f"{int(now * 1e9):020d}-{uuid.uuid4().hex[:12]}"
        rec = Record(
            id=rid,
            time=now,
            op=op,
            outcome=outcome,
            key_id=key.id,
            model=key.model,
            tree=key.extra.get("tree", "-"),
            host=socket.gethostname(),
            files=files,
            bytes=nbytes,
            seconds=round(seconds, 3),
        )
        name = f"{USAGE_DIR}/{day_of(now)}/{rid}{RECORD_SUFFIX}"
        backend.put_if_absent(name, _encoder.encode(rec))
    except Exception as e:
        log.debug("could not record %s of %s: %s", op, key, e)


def _days(backend: Backend) -> list[str]:
    return sorted(
        {
            parts[1]
            for info in backend.list(f"{USAGE_DIR}/")
            if len(parts := info.key.split("/")) == 3
        }
    )


def _objects(backend: Backend, day: str) -> list[str]:
    return sorted(
        info.key
        for info in backend.list(f"{USAGE_DIR}/{day}/")
        if info.key.endswith((RECORD_SUFFIX, MERGED_SUFFIX))
    )


def _plausible(rec: Record, latest: float) -> bool:
    """A record a reader counts: a finite time from the epoch up to ``latest``, known
    kinds, sane sizes. Anyone who can write the store can write records."""
    known = (rec.op == "load" and rec.outcome in LOAD_OUTCOMES) or (
        rec.op == "save" and rec.outcome in SAVE_OUTCOMES
    )
    return (
        known
        and math.isfinite(rec.time)
        and 0 <= rec.time <= min(latest, constants.MAX_MANIFEST_TIME)
        and 0 <= rec.files <= constants.MAX_FILES_PER_MANIFEST
        and 0 <= rec.bytes <= 2**63
        and math.isfinite(rec.seconds)
    )


def _read(backend: Backend, name: str, latest: float) -> list[Record] | None:
    """The plausible records of one object; None when it vanished or cannot be read or
    decoded (whatever a hostile object makes the decoder raise: a reader skips it)."""
    try:
        if name.endswith(MERGED_SUFFIX):
            found = _merged_decoder.decode(backend.get(name, max_bytes=MAX_MERGED_BYTES))
        else:
            found = [_record_decoder.decode(backend.get(name, max_bytes=MAX_RECORD_BYTES))]
    except Exception as e:
        log.debug("ignoring usage object %s: %s", name, e)
        return None
    return [r for r in found if _plausible(r, latest)]


def read(backend: Backend, since: float | None = None, *, now: float | None = None) -> list[Record]:
    """Every retained record (``since``: from that time on), each id once, oldest first.
    Records dated more than a day ahead of ``now`` are ignored."""
    latest = (time.time() if now is None else now) + CLOCK_SLACK
    first_day = day_of(since - CLOCK_SLACK) if since is not None else ""
    seen: dict[str, Record] = {}
    for day in _days(backend):
        if day < first_day:
            continue
        for name in _objects(backend, day):
            for rec in _read(backend, name, latest) or []:
                if since is None or rec.time >= since:
                    seen.setdefault(rec.id, rec)
    return sorted(seen.values(), key=lambda r: (r.time, r.id))


@dataclass
class CompactReport:
    days_merged: int = 0
    records_merged: int = 0
    objects_deleted: int = 0  # merged records and records past the retention


def compact(
    backend: Backend, *, now: float | None = None, retention: float = DEFAULT_RETENTION
) -> CompactReport:
    """Merge each finished day's records into one object (several when one would exceed
    the size readers accept); delete days older than ``retention`` and days dated more
    than a day ahead (a broken clock). Today's records stay as they are (replicas are
    still adding to them)."""
    now = time.time() if now is None else now
    report = CompactReport()
    today, oldest, newest = day_of(now), day_of(now - retention), day_of(now + CLOCK_SLACK)
    for day in _days(backend):
        names = _objects(backend, day)
        if day < oldest or day > newest:
            for name in names:
                report.objects_deleted += backend.delete(name)
            continue
        if day >= today or len(names) < 2:
            continue
        merged: dict[str, Record] = {}
        read_ok: list[str] = []
        for name in names:
            found = _read(backend, name, now + CLOCK_SLACK)
            if found is None:
                continue  # unreadable now: left as it is, never deleted unread
            read_ok.append(name)
            for rec in found:
                merged.setdefault(rec.id, rec)
        if len(read_ok) < 2:
            continue
        ordered = sorted(merged.values(), key=lambda r: (r.time, r.id))
        # Published before anything is deleted, and only what was read is deleted: a record
        # published meanwhile stays, and a crash in between leaves duplicates that readers
        # count once (by id).
        for part in _parts(ordered):
            stem = f"{int(now * 1e9):020d}-{uuid.uuid4().hex[:12]}"
            backend.put_if_absent(f"{USAGE_DIR}/{day}/{stem}{MERGED_SUFFIX}", part)
        for old in read_ok:
            report.objects_deleted += backend.delete(old)
        report.days_merged += 1
        report.records_merged += len(ordered)
    return report


def _parts(records: list[Record]) -> Iterator[bytes]:
    """``records`` as merged objects, each well under the size readers accept."""
    batch: list[Record] = []
    size = 0
    for rec in records:
        one = len(_encoder.encode(rec))
        if batch and size + one > MAX_MERGED_BYTES // 2:
            yield _encoder.encode(batch)
            batch, size = [], 0
        batch.append(rec)
        size += one
    if batch:
        yield _encoder.encode(batch)


@dataclass
class KeyUse:
    loads: int = 0
    last_load: float | None = None
    saves: int = 0


def by_key(records: Iterable[Record]) -> dict[str, KeyUse]:
    """Loads (restores that found the key) and saves per key id."""
    found: dict[str, KeyUse] = {}
    for r in records:
        use = found.setdefault(r.key_id, KeyUse())
        if r.op == "load" and r.outcome != LOAD_MISS:
            use.loads += 1
            use.last_load = max(use.last_load or 0.0, r.time)
        elif r.op == "save":
            use.saves += 1
    return found


@dataclass
class Summary:
    """Figures over a window, for ``casstore stats --since`` and ``--prometheus``."""

    since: float | None
    loads: dict[str, int] = field(
        default_factory=lambda: {LOAD_COMPLETE: 0, LOAD_PARTIAL: 0, LOAD_MISS: 0}
    )
    files_restored: int = 0
    bytes_served: int = 0  # bytes written by loads
    saves: dict[str, int] = field(default_factory=lambda: {SAVE_SAVED: 0, SAVE_UNCHANGED: 0})
    bytes_saved: int = 0  # new bytes uploaded by saves
    load_seconds: float = 0.0
    models: dict[str, dict[str, int]] = field(default_factory=dict)  # model -> outcome -> n

    @property
    def restores(self) -> int:
        return sum(self.loads.values())

    @property
    def hit_rate(self) -> float | None:
        """Loads that found the key, complete or partial, per load."""
        total = self.restores
        return (total - self.loads[LOAD_MISS]) / total if total else None


def summarize(records: Iterable[Record], since: float | None) -> Summary:
    s = Summary(since)
    for r in records:
        if r.op == "load" and r.outcome in LOAD_OUTCOMES:
            s.loads[r.outcome] = s.loads.get(r.outcome, 0) + 1
            s.files_restored += r.files
            s.bytes_served += r.bytes
            s.load_seconds += r.seconds
            per_model = s.models.setdefault(r.model, {})
            per_model[r.outcome] = per_model.get(r.outcome, 0) + 1
        elif r.op == "save" and r.outcome in SAVE_OUTCOMES:
            s.saves[r.outcome] = s.saves.get(r.outcome, 0) + 1
            s.bytes_saved += r.bytes
    return s


def iter_objects(backend: Backend) -> Iterator[str]:
    """Every usage object, for maintenance and tests."""
    for day in _days(backend):
        yield from _objects(backend, day)

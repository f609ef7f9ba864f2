"""A process in the gc stress test: ``saver``, ``loader`` or ``gc``, until a deadline.

Every file it saves carries its own checksum (``CSV1`` + BLAKE3 of the payload + payload),
so a loader can tell a wrong byte from a miss without knowing who saved what.

    python -m tests.stress_worker ROLE STORE_ROOT WORKDIR SECONDS ID [GRACE]
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

import blake3

from casstore import CacheKey, NotFound, Store, chunk_index, constants
from casstore import gc as gc_mod

MODELS = [f"m{i}" for i in range(6)]
MAGIC = b"CSV1"


def key(model: str) -> CacheKey:
    return CacheKey(torch="t", arch="a", model=model, extra={"tree": "inductor"})


def make_file(rng: random.Random) -> bytes:
    # A small pool of seeds for part of the content, so chunks are shared between saves:
    # a third of the files are whole "library" files that every writer produces alike
    # (whole-chunk reuse), the rest share a prefix (reuse of the chunks inside it).
    shared = random.Random(rng.randrange(8)).randbytes(rng.choice([0, 40_000, 300_000]))
    if rng.randrange(3) == 0:
        payload = random.Random(100 + rng.randrange(8)).randbytes(20_000)
    else:
        payload = shared + rng.randbytes(rng.randrange(1, 60_000))
    return MAGIC + blake3.blake3(payload).digest() + payload


def seed_aged_garbage(
    store: Store, work: Path, *, keys: int = 6, filler: int = 600, age: float = 7200.0
) -> int:
    """Fill the store as an hour-old deployment would: keys saved from the same file mix,
    all removed since (``casstore rm``), every chunk's mtime set ``age`` seconds back. gc then has
    real candidates, among them chunks the savers of the test are about to reuse.
    Returns the number of chunks no remaining key lists."""
    rng = random.Random("garbage")
    for i in range(keys):
        src = work / f"seed-{i}"
        for j in range(12):
            path = src / f"old-{i}/{j}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(make_file(rng))
        # Small unique files: garbage enough that a sweep lasts long enough for savers
        # to reuse candidates while it runs.
        for j in range(filler):
            path = src / f"filler-{i}/{j // 100}/{j}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(200))
        store.save(src, key(f"old{i}"))
        shutil.rmtree(src)
        gc_mod.remove_key(store, key(f"old{i}"))
    then = time.time() - age
    for prefix in (f"{constants.PACKS_DIR}/", f"{constants.INDEX_DIR}/"):
        for info in list(store.backend.list(prefix)):
            if store.root is not None:  # an object store's dates cannot be set: wait instead
                os.utime(store.root / info.key, (then, then))
    live = {c.digest for k in store.keys() for f in store.files(k.key).values() for c in f.chunks}
    candidates = [d.hex() for d in chunk_index.load(store.backend).digests() if d not in live]
    old_chunks_file(store).write_text("\n".join(candidates))
    return len(candidates)


def old_chunks_file(store: Store) -> Path:
    """Beside the store (for an object store, where $CASSTORE_TEST_OLD_CHUNKS says): the
    sweep candidates seeded by seed_aged_garbage, so savers can count how many of them
    they reused."""
    if store.root is None:
        return Path(os.environ.get("CASSTORE_TEST_OLD_CHUNKS", "/nonexistent/old-chunks"))
    return store.root.parent / f"{store.root.name}.old-chunks"


def intact(data: bytes) -> bool:
    return data[:4] == MAGIC and blake3.blake3(data[36:]).digest() == data[4:36]


def saver(store: Store, work: Path, deadline: float, wid: str) -> dict[str, object]:
    rng = random.Random(wid)
    saved = []
    errors: list[str] = []
    nbytes = 0
    reused = 0
    try:
        old = set(old_chunks_file(store).read_text().split())
    except FileNotFoundError:
        old = set()
    i = 0
    while time.monotonic() < deadline:
        model = rng.choice(MODELS)
        src = work / f"src-{wid}-{i}"
        files = {}
        for j in range(rng.randrange(3, 10)):
            path = f"{wid}-{i}/{j}.bin"  # unique: no save overrides another's path
            data = make_file(rng)
            (src / path).parent.mkdir(parents=True, exist_ok=True)
            (src / path).write_bytes(data)
            files[path] = blake3.blake3(data).hexdigest()
            nbytes += len(data)
        try:
            store.save(src, key(model), lock_timeout=0)
            saved.append({"model": model, "files": files})
            view = store.files(key(model))
            reused += sum(c.digest.hex() in old for p in files if p in view for c in view[p].chunks)
        except Exception as e:  # counted, and the load test fails on any
            errors.append(f"save: {type(e).__name__}: {e}")
        shutil.rmtree(src)
        i += 1
    return {"saves": saved, "saved_bytes": nbytes, "reused_old_chunks": reused, "errors": errors}


class Remember(logging.Handler):
    """Keeps the warnings a worker logs, so a test that fails can say why a load missed."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def loader(store: Store, work: Path, deadline: float, wid: str) -> dict[str, object]:
    rng = random.Random(wid)
    loads = misses = bad = files = nbytes = 0
    errors: list[str] = []
    warnings = Remember()
    logging.getLogger("casstore").addHandler(warnings)
    i = 0
    while time.monotonic() < deadline:
        dest = work / f"dst-{wid}-{i}"
        i += 1
        try:
            report = store.load(key(rng.choice(MODELS)), dest)
        except NotFound:
            continue
        except Exception as e:
            errors.append(f"load: {type(e).__name__}: {e}")
            continue
        loads += 1
        misses += len(report.missing)
        nbytes += report.bytes_written
        for p in dest.rglob("*.bin"):
            files += 1
            if not intact(p.read_bytes()):
                bad += 1
        shutil.rmtree(dest, ignore_errors=True)
    return {
        "loads": loads,
        "misses": misses,
        "bad": bad,
        "files": files,
        "loaded_bytes": nbytes,
        "errors": errors,
        "warnings": warnings.lines[-50:],
    }


def collector(store: Store, deadline: float, grace: float) -> dict[str, object]:
    runs = deleted = repacked = 0
    errors: list[str] = []
    while time.monotonic() < deadline:
        try:
            p = gc_mod.plan(store, gc_mod.Policy(grace=grace, temp_timeout=5))
            report = gc_mod.execute(store, p, threads=1)
            deleted += report.packs_deleted
            repacked += report.chunks_repacked
        except Exception as e:
            errors.append(f"gc: {type(e).__name__}: {e}")
        runs += 1
        time.sleep(0.05)
    return {
        "gc_runs": runs,
        "packs_deleted": deleted,
        "chunks_repacked": repacked,
        "errors": errors,
    }


def main() -> None:
    role, root, work, seconds, wid = sys.argv[1:6]
    grace = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0
    store = Store(root, threads=4)
    deadline = time.monotonic() + float(seconds)
    workdir = Path(work)
    if role == "saver":
        result = saver(store, workdir, deadline, wid)
    elif role == "loader":
        result = loader(store, workdir, deadline, wid)
    else:
        result = collector(store, deadline, grace)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""Compression benchmark: how many bytes a store of several real compile caches takes, by
layout, against one tar.gz per cache (the b10-style layout). Writes
docs/compression-benchmarks.md.

Corpora (real inductor caches of different models, each saved as its own key):

* GPU: six caches compiled on an NVIDIA H200 (torch 2.11.0+cu130, Triton 3.6) by
  ``benchmarks/bench_gpu.py``, kept in benchmarks/data/gpu-caches-h200.tar.xz;
* CPU: six caches compiled here by demo/compile_worker.py (the same model set).

Layouts, every one with chunk dedup across the caches, caches saved one after another:

* each chunk alone at zstd level 3: what format 1 stored (one object per chunk);
* casstore as it saves: a real ``Store.save`` of each cache, bytes of packs and indexes
  (blocks compressed against chunks earlier saves stored: casstore/dictionaries.py), and
  the same without dictionaries;
* packs at other zstd levels (casstore.packs.PackBuilder without dictionaries), to show
  what the level buys, with compression and decompression speeds.

Speeds of the PackBuilder rows are per core (compressing, decompressing blocks); those of
the real saves are end to end (``Store.save`` and ``Store.load`` of every cache, MB/s of
the caches' bytes).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import zstandard

from casstore import CacheKey, Store, chunking, constants, packs
from demo.replica import REPO

MODELS = ("mlp", "conv", "gpt", "gpt-wide", "gpt-deep", "bert")
GPU_CORPUS = REPO / "benchmarks/data/gpu-caches-h200.tar.xz"


@dataclass
class Row:
    layout: str
    stored: int
    compress_mb_s: float | None = None
    decompress_mb_s: float | None = None


def files_of(cache: Path) -> list[tuple[str, bytes]]:
    return [
        (str(p.relative_to(cache)), p.read_bytes())
        for p in sorted(cache.rglob("*"))
        if p.is_file() and not p.is_symlink()
    ]


def tar_gz_size(cache: Path) -> int:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(cache, arcname=".")
    return len(buf.getvalue())


def format1_bytes(caches: list[Path]) -> int:
    """What format 1 stored: each distinct chunk alone, zstd level 3."""
    cctx = zstandard.ZstdCompressor(level=3, write_content_size=True)
    seen: set[bytes] = set()
    total = 0
    for cache in caches:
        for _, data in files_of(cache):
            for c in chunking.cut(data):
                if c.digest not in seen:
                    seen.add(c.digest)
                    total += len(cctx.compress(data[c.offset : c.offset + c.length]))
    return total


def store_row(layout: str, caches: list[Path], work: Path, *, dictionaries: bool) -> Row:
    """A real save of each cache into one store (bytes of its packs and indexes), then a
    load of each into an empty directory; speeds end to end, MB/s of cache bytes."""
    root = work / ("store-dict" if dictionaries else "store-plain")
    saved = os.environ.get("CASSTORE_DICTIONARIES")
    os.environ["CASSTORE_DICTIONARIES"] = "1" if dictionaries else "0"
    try:
        store = Store(root, create=True)
        keys = [CacheKey(torch="t", arch="a", model=f"m{i}") for i in range(len(caches))]
        start = time.perf_counter()
        for cache, key in zip(caches, keys, strict=True):
            store.save(cache, key)
        save_seconds = time.perf_counter() - start
    finally:
        if saved is None:
            del os.environ["CASSTORE_DICTIONARIES"]
        else:
            os.environ["CASSTORE_DICTIONARIES"] = saved
    start = time.perf_counter()
    for i, key in enumerate(keys):
        report = Store(root).load(key, work / f"out-{root.name}-{i}")
        assert not report.missing, report.missing
    load_seconds = time.perf_counter() - start
    raw = sum(len(d) for c in caches for _, d in files_of(c))
    stored = sum(
        p.stat().st_size
        for d in (constants.PACKS_DIR, constants.INDEX_DIR)
        for p in (root / d).rglob("*")
        if p.is_file()
    )
    return Row(layout, stored, raw / save_seconds / 1e6, raw / load_seconds / 1e6)


def pack_bytes(caches: list[Path], *, small_level: int, large_level: int) -> Row:
    """Bytes of the packs and indexes the saves of ``caches`` would write."""
    stored: set[bytes] = set()
    total = 0
    raw = 0
    seconds = 0.0
    decompress_seconds = 0.0
    saved_small, saved_large = constants.SMALL_FILE_LEVEL, constants.LARGE_FILE_LEVEL
    constants.SMALL_FILE_LEVEL, constants.LARGE_FILE_LEVEL = small_level, large_level
    try:
        for cache in caches:
            files = files_of(cache)
            new: list[tuple[bytes, bytes, bool]] = []
            for _, data in files:
                small = len(data) < constants.STREAM_MIN_FILE_SIZE
                for c in chunking.cut(data):
                    if c.digest not in stored:
                        stored.add(c.digest)
                        new.append((c.digest, data[c.offset : c.offset + c.length], small))
            builder = packs.PackBuilder()
            start = time.perf_counter()
            sealed: list[packs.Sealed] = []
            for digest, data, small in new:
                sealed += builder.add(digest, data, small=small)
            sealed += builder.finish()
            seconds += time.perf_counter() - start
            raw += sum(len(d) for _, d, _ in new)
            for s in sealed:
                total += len(s.data) + len(packs.encode_index(s.index))
                start = time.perf_counter()
                for b in s.index.blocks:
                    packs.decode_block(s.data[b.offset : b.offset + b.length], b, "bench")
                decompress_seconds += time.perf_counter() - start
    finally:
        constants.SMALL_FILE_LEVEL, constants.LARGE_FILE_LEVEL = saved_small, saved_large
    return Row(
        "",
        total,
        raw / seconds / 1e6 if seconds else None,
        raw / decompress_seconds / 1e6 if decompress_seconds else None,
    )


def cpu_corpus(work: Path) -> list[Path]:
    caches = []
    for model in MODELS:
        cache = work / f"cpu-{model}"
        subprocess.run(
            [sys.executable, "-m", "demo.compile_worker", "--model", model],
            cwd=REPO,
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": str(work),
                "TORCHINDUCTOR_CACHE_DIR": str(cache),
                "TMPDIR": str(work / "tmp"),
            },
            check=True,
            capture_output=True,
            timeout=900,
        )
        caches.append(cache)
    return caches


def gpu_corpus(work: Path) -> list[Path]:
    target = work / "gpu"
    with tarfile.open(GPU_CORPUS) as tar:
        tar.extractall(target, filter="data")
    return sorted(p for p in target.iterdir() if p.is_dir())


def measure(name: str, caches: list[Path], work: Path) -> list[str]:
    raw = sum(len(d) for c in caches for _, d in files_of(c))
    files = sum(len(files_of(c)) for c in caches)
    tgz = sum(tar_gz_size(c) for c in caches)
    rows = [
        Row("one tar.gz per cache (b10-style)", tgz),
        Row("each chunk alone, zstd 3 (format 1)", format1_bytes(caches)),
        store_row(
            "casstore as it saves: packs, blocks compressed against stored chunks (a real "
            "`Store.save`, then `Store.load`, of each cache)",
            caches,
            work / name,
            dictionaries=True,
        ),
        store_row(
            "casstore without dictionaries (format 2: packs only)",
            caches,
            work / name,
            dictionaries=False,
        ),
    ]
    for layout, small, large in (
        (
            f"packs: small files level {constants.SMALL_FILE_LEVEL}, large level "
            f"{constants.LARGE_FILE_LEVEL} (the default)",
            constants.SMALL_FILE_LEVEL,
            constants.LARGE_FILE_LEVEL,
        ),
        ("packs: level 3 everywhere", 3, 3),
        ("packs: level 9 everywhere", 9, 9),
    ):
        row = pack_bytes(caches, small_level=small, large_level=large)
        row.layout = layout
        rows.append(row)
    lines = [
        f"### {name}: {len(caches)} caches, {files} files, {raw / 1e6:.1f} MB",
        "",
        "| layout | stored | vs tar.gz | compress MB/s | decompress MB/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r.layout} | {r.stored / 1e6:.2f} MB | {r.stored / tgz:.2f}x | "
            f"{f'{r.compress_mb_s:.0f}' if r.compress_mb_s else ''} | "
            f"{f'{r.decompress_mb_s:.0f}' if r.decompress_mb_s else ''} |"
        )
    return [*lines, ""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output", type=Path, default=REPO / "docs/compression-benchmarks.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="casstore-compression-") as tmp:
        work = Path(tmp)
        (work / "tmp").mkdir()
        sections = measure("GPU caches (H200)", gpu_corpus(work), work)
        sections += measure("CPU caches (this machine)", cpu_corpus(work), work)
    text = "\n".join(
        [
            "# Compression benchmarks",
            "",
            "Generated by `make bench` (benchmarks/bench_compression.py); do not edit by hand.",
            "",
            f"- when: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}",
            f"- machine: {platform.machine()}, Python {platform.python_version()}",
            "- each corpus: six real inductor caches of different models (mlp, conv, and"
            " GPT/BERT-style transformers of several sizes), saved one after another as"
            " separate keys; chunks already stored by an earlier save are not stored again",
            "- *stored*: bytes of the store's chunk objects, or packs plus their indexes;"
            " *vs tar.gz*: against the sum of one tar.gz per cache",
            "- speeds: for the two `casstore` rows, end to end (`Store.save` and"
            " `Store.load` of every cache into an empty directory, MB/s of the caches'"
            " bytes); for the `packs:` rows, compressing and decompressing blocks (per core)",
            "",
            *sections,
        ]
    )
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

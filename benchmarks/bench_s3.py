"""Object-store benchmark: casstore restore from ``s3://`` vs the b10-style layout (one
``tar.gz`` object: download it, extract it), side by side on one SeaweedFS S3 gateway.

Both are timed as commands in new processes, round after round, operations interleaved;
each figure is the median of the rounds. Also a cold save vs a re-save of the unchanged
tree, and the requests one restore makes (counted in-process on the backend's calls).
Results go to docs/s3-benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from benchmarks.bench_store import make_tree
from benchmarks.common import byte_compile, set_aside
from casstore import CacheKey, Store
from casstore.backends.s3 import S3Backend
from tests.seaweed import create_bucket, s3_gateway

KEY_ARGS = ["--torch", "2.13.0+cpu", "--arch", "bench", "--model", "bench"]
KEY = CacheKey(torch="2.13.0+cpu", arch="bench", model="bench", extra={"tree": "inductor"})

# Downloads one object with obstore (the client casstore uses) and extracts it with tar,
# as a b10-style restore does: in a new process, like `casstore load`.
_DOWNLOAD_AND_EXTRACT = """
import subprocess, sys
import obstore
from obstore.store import S3Store
bucket, key, dest = sys.argv[1:4]
store = S3Store(bucket, client_options={"allow_http": True})
data = bytes(obstore.get(store, key).bytes())
subprocess.run(["tar", "-xzf", "-", "-C", dest], input=data, check=True)
"""


def _counting(store: Store) -> Counter[str]:
    """Count the backend's requests (a listing counts once per call)."""
    counts: Counter[str] = Counter()
    backend = store.backend

    def counted(name: str, real: Callable[..., object]) -> Callable[..., object]:
        def wrapped(*args: object, **kwargs: object) -> object:
            counts[name] += 1
            return real(*args, **kwargs)

        return wrapped

    for name in ("get", "get_ranges", "put_if_absent", "stat", "delete", "list", "move"):
        setattr(backend, name, counted(name, getattr(backend, name)))
    return counts


def run(rounds: int, small_files: int, big_mb: list[int]) -> str:
    if rounds % 2 == 0:
        rounds += 1
    byte_compile()
    work = Path(tempfile.mkdtemp(prefix="casstore-s3bench-", dir=os.environ.get("BENCH_DIR")))
    # Also restored into tmpfs, where creating a file costs next to nothing (on this
    # machine's ext4 it costs 20-700 us, varying from one minute to the next).
    shm = Path(tempfile.mkdtemp(prefix="casstore-s3bench-", dir="/dev/shm"))
    mem_dst = shm / "dst"
    samples: dict[str, list[float]] = {}
    try:
        src, dst = work / "src", work / "dst"
        size = make_tree(src, small_files=small_files, big_mb=big_mb)
        nfiles = sum(1 for p in src.rglob("*") if p.is_file())
        archive = work / "cache.tar.gz"
        subprocess.run(["tar", "-czf", archive, "-C", src, "."], check=True)
        archive_bytes = archive.stat().st_size
        with s3_gateway(work / "seaweedfs") as endpoint:
            create_bucket(endpoint, "bench")
            env = {
                **os.environ,
                "AWS_ENDPOINT_URL": endpoint,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_REGION": "us-east-1",
            }
            os.environ.update({k: env[k] for k in env if k.startswith("AWS_")})
            warm, cold = "s3://bench/warm", "s3://bench/cold"
            cli = [sys.executable, "-m", "casstore"]

            def casstore(root: str, *args: str | Path) -> Callable[[], object]:
                argv = [*cli, "--root", root, *map(str, args), *KEY_ARGS]
                return lambda: subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)

            casstore(warm, "save", src)()
            store = Store(warm, create=False)
            store.backend.put_if_absent("b10/cache.tar.gz", archive.read_bytes())
            stored = sum(i.size for d in ("packs/", "index/") for i in store.backend.list(d))

            def b10_restore(into: Path) -> Callable[[], None]:
                def restore() -> None:
                    into.mkdir()
                    argv = [sys.executable, "-c", _DOWNLOAD_AND_EXTRACT, "bench"]
                    argv += ["warm/b10/cache.tar.gz", str(into)]
                    subprocess.run(argv, check=True, env=env)

                return restore

            def clear_dst() -> None:
                set_aside(dst)

            def clear_mem() -> None:  # in memory: no inode reuse to avoid, and RAM to give back
                shutil.rmtree(mem_dst, ignore_errors=True)

            def clear_cold() -> None:
                cold_store = S3Backend(cold)
                for info in list(cold_store.list("")):
                    cold_store.delete(info.key)

            ops: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
                "b10 restore (GET one tar.gz, tar -xzf)": (b10_restore(dst), clear_dst),
                "casstore load (empty destination)": (casstore(warm, "load", dst), clear_dst),
                "b10 restore into tmpfs": (b10_restore(mem_dst), clear_mem),
                "casstore load into tmpfs": (casstore(warm, "load", mem_dst), clear_mem),
                "casstore save (empty prefix)": (casstore(cold, "save", src), clear_cold),
                "casstore save, unchanged tree": (casstore(cold, "save", src), lambda: None),
            }
            for _ in range(rounds):
                for name, (fn, setup) in ops.items():
                    setup()
                    started = time.perf_counter()
                    fn()
                    samples.setdefault(name, []).append(time.perf_counter() - started)
            clear_dst()
            counted = Store(warm, create=False)
            counts = _counting(counted)
            report = counted.load(KEY, dst)
            resaver = Store(warm)
            resave_counts = _counting(resaver)
            resaver.save(src, KEY)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in samples.items()}
    b10 = med["b10 restore (GET one tar.gz, tar -xzf)"]
    load = med["casstore load (empty destination)"]
    save = med["casstore save (empty prefix)"]
    resave = med["casstore save, unchanged tree"]
    requests = sum(counts.values())
    lines = [
        "# Object-store benchmarks",
        "",
        "Generated by `make bench` (benchmarks/bench_s3.py); do not edit by hand.",
        "",
        f"- when: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; one SeaweedFS S3 gateway on loopback",
        f"- tree: {nfiles} files, {size / 2**20:.1f} MiB ({small_files} small sources and "
        f"pickles, binaries of {', '.join(map(str, big_mb))} MiB); tar.gz "
        f"{archive_bytes / 2**20:.1f} MiB, casstore packs and indexes {stored / 2**20:.1f} MiB",
        f"- {rounds} rounds, operations interleaved, each a command in a new process; "
        "median of the rounds; casstore's bytecode compiled first, as installing it does; "
        "restored trees set aside, not deleted, between runs (benchmarks/common.py)",
        "",
        "| operation | seconds | range | goal | |",
        "|---|---:|---:|---|---|",
    ]

    def row(name: str, goal: str = "", ok: bool | None = None) -> str:
        verdict = "" if ok is None else ("met" if ok else "**missed**")
        return (
            f"| {name} | {med[name]:.3f} | {min(samples[name]):.3f}–{max(samples[name]):.3f} "
            f"| {goal} | {verdict} |"
        )

    lines += [
        row("b10 restore (GET one tar.gz, tar -xzf)"),
        row(
            "casstore load (empty destination)",
            f"≥2× faster than the b10 restore (is {b10 / load:.2f}×)",
            b10 / load >= 2,
        ),
        row("b10 restore into tmpfs"),
        row(
            "casstore load into tmpfs",
            f"(no goal) {med['b10 restore into tmpfs'] / med['casstore load into tmpfs']:.2f}× "
            "faster than the b10 restore into tmpfs",
        ),
        row("casstore save (empty prefix)"),
        row(
            "casstore save, unchanged tree",
            f"≤0.2× the cold save (is {resave / save:.2f}×)",
            resave / save <= 0.2,
        ),
        "",
        f"One restore of the {report.files}-file key made {requests} calls: "
        + ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        + " (a `list` call is one request per 1,000 objects; a `get_ranges` call reads "
        "some blocks of one pack, ranges less than 1 MiB apart merged into one request).",
        "",
        f"An unchanged re-save made {sum(resave_counts.values())} calls: "
        + ", ".join(f"{n} {k}" for k, n in sorted(resave_counts.items()))
        + " (its intent, the listing of the pack indexes, one `HEAD` per pack it reuses, "
        "the key's manifests, its usage record).",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small-files", type=int, default=2000)
    parser.add_argument("--big-mb", default="1,2,5,10,20")
    parser.add_argument("--out", type=Path, default=Path("docs/s3-benchmarks.md"))
    args = parser.parse_args()
    report = run(args.rounds, args.small_files, [int(x) for x in args.big_mb.split(",")])
    print(report)
    args.out.write_text(report)


if __name__ == "__main__":
    main()

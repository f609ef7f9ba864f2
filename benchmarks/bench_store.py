"""Store benchmark: casstore save/restore vs ``cp -a`` and ``tar -czf``/``tar -xzf``.

Run with ``make bench``. Everything is measured side by side in one run on one generated
tree (the machines are shared and noisy, so only ratios within a run mean anything): the
operations take turns, round after round, and each figure is the median of the rounds.
casstore is timed as a command in a new process, like cp and tar. Results go to
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import byte_compile, filesystem_of, set_aside
from casstore import CacheKey, Store, signing

KEY = CacheKey(torch="2.13.0+cpu", arch="bench", model="bench")
_WORDS = (
    b"def kernel buf0 buf1 tmp0 tl.load tl.store xindex xmask triton_poi_fused "
    b"extern_kernels torch.ops aten mm relu sum reduce = + * ( ) : return import\n"
).split(b" ")


def _source_like(rng: random.Random, size: int) -> bytes:
    """Text that compresses like generated Python/C++ (repetitive identifiers)."""
    out = bytearray()
    while len(out) < size:
        out += b" ".join(rng.choice(_WORDS) for _ in range(12)) + b"\n"
    return bytes(out[:size])


def _binary_like(rng: random.Random, size: int) -> bytes:
    """Half random, half structured bytes, like a shared object or a PCH."""
    block = 64 * 1024
    parts = []
    for i in range(0, size, block):
        n = min(block, size - i)
        parts.append(rng.randbytes(n) if (i // block) % 2 else _source_like(rng, n))
    return b"".join(parts)


def make_tree(root: Path, *, small_files: int, big_mb: list[int], seed: int = 0) -> int:
    """An inductor-shaped tree: many small sources and pickles, a few large binaries."""
    rng = random.Random(seed)
    total = 0
    for i in range(small_files):
        sub = root / f"fxgraph/{i % 64:02x}" if i % 3 else root / f"triton/{i % 97:02x}"
        sub.mkdir(parents=True, exist_ok=True)
        if i % 4 == 0:
            data = rng.randbytes(rng.randrange(2_000, 60_000))  # pickles: incompressible
            name = f"entry{i}.pkl"
        else:
            data = _source_like(rng, rng.randrange(500, 24_000))
            name = f"k{i}.py"
        (sub / name).write_bytes(data)
        total += len(data)
    (root / "bin").mkdir(parents=True, exist_ok=True)
    for i, mb in enumerate(big_mb):
        data = _binary_like(rng, mb * 2**20)
        (root / "bin" / f"lib{i}.so").write_bytes(data)
        total += len(data)
    return total


@dataclass
class Op:
    """One timed operation: ``setup`` (untimed) then ``fn`` (timed), once per round."""

    name: str
    fn: Callable[[], object]
    setup: Callable[[], object]
    samples: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    def spread(self) -> str:
        return f"{min(self.samples):.3f}–{max(self.samples):.3f}"


def run_rounds(ops: list[Op], rounds: int) -> None:
    """Every operation once per round, rounds interleaved, so that a noisy minute on this
    shared machine hits every tool alike instead of one tool's runs."""
    for _ in range(rounds):
        for op in ops:
            op.setup()
            start = time.perf_counter()
            op.fn()
            op.samples.append(time.perf_counter() - start)


def _make_way(*paths: Path) -> Callable[[], None]:
    """Clear the way for the next run: outputs set aside (not deleted: see set_aside), and
    the previous run's writes flushed so that they do not slow the next one down."""

    def clean() -> None:
        for p in paths:
            set_aside(p)
        subprocess.run(["sync"], check=False)

    return clean


def _cli(root: Path, *args: str | Path) -> Callable[[], object]:
    """The casstore command, as a user runs it: a new process, like cp and tar."""
    argv = [sys.executable, "-m", "casstore", "--root", str(root), *map(str, args)]
    argv += ["--torch", KEY.torch, "--arch", KEY.arch, "--model", KEY.model, "--tree", "x"]
    return lambda: subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def _untar(archive: Path, dst: Path) -> Callable[[], None]:
    """`tar -xzf` of ``archive`` into a new directory ``dst``."""

    def untar() -> None:
        dst.mkdir()
        subprocess.run(["tar", "-xzf", archive, "-C", dst], check=True)

    return untar


def data_objects(store: Path) -> list[Path]:
    """The objects a save writes: packs, their indexes, manifests (not usage records,
    access markers or locks)."""
    return sorted(
        p
        for d in ("packs", "index", "manifests")
        for p in (store / d).rglob("*")
        if p.is_file() and not p.name.startswith(".tmp-")
    )


def fuse_rows(src: Path, rounds: int, work: Path) -> dict[str, Op]:
    """Restore from a store on a SeaweedFS FUSE mount into an empty local directory, against
    `tar -xzf` of a tar.gz of the same tree on the same mount."""
    from tests.seaweed import SeaweedFS

    fs = SeaweedFS(work / "seaweedfs")
    fs.start()
    try:
        mount = fs.mount("host1")
        store, archive, dst = mount / "store", mount / "cache.tar.gz", work / "fuse-dst"
        _cli(store, "save", src)()
        subprocess.run(["tar", "-czf", archive, "-C", src, "."], check=True)
        shm = Path(tempfile.mkdtemp(prefix="casstore-bench-", dir="/dev/shm"))
        mem_dst = shm / "dst"

        def clear() -> None:
            shutil.rmtree(mem_dst, ignore_errors=True)

        ops = {
            "fuse_tar_x": Op("`tar -xzf` from the mount", _untar(archive, dst), _make_way(dst)),
            "fuse_load": Op(
                "`casstore load` from the mount", _cli(store, "load", dst), _make_way(dst)
            ),
            "fuse_mem_tar_x": Op(
                "`tar -xzf` from the mount into tmpfs", _untar(archive, mem_dst), clear
            ),
            "fuse_mem_load": Op(
                "`casstore load` from the mount into tmpfs", _cli(store, "load", mem_dst), clear
            ),
        }
        try:
            run_rounds(list(ops.values()), rounds)
        finally:
            shutil.rmtree(shm, ignore_errors=True)
        return ops
    finally:
        fs.stop()


def memory_rows(src: Path, archive: Path, store: Path, rounds: int) -> dict[str, Op]:
    """The same restores into tmpfs (/dev/shm). Creating a file on this machine's ext4
    costs 20-700 us depending on the filesystem's state from one minute to the next (a bare
    `os.open(O_CREAT)` loop), which is most of a restore there and most of its noise; in
    memory what is left is each tool's own work."""
    shm = Path(tempfile.mkdtemp(prefix="casstore-bench-", dir="/dev/shm"))
    dst = shm / "dst"

    def clear() -> None:  # in memory: no inode reuse to avoid, and RAM to give back
        shutil.rmtree(dst, ignore_errors=True)

    try:
        ops = {
            "mem_cp": Op(
                "`cp -a` into tmpfs",
                lambda: subprocess.run(["cp", "-a", src, dst], check=True),
                clear,
            ),
            "mem_tar_x": Op("`tar -xzf` into tmpfs", _untar(archive, dst), clear),
            "mem_load": Op("`casstore load` into tmpfs", _cli(store, "load", dst), clear),
        }
        run_rounds(list(ops.values()), rounds)
        return ops
    finally:
        shutil.rmtree(shm, ignore_errors=True)


def run(rounds: int, small_files: int, big_mb: list[int]) -> str:
    if rounds % 2 == 0:
        rounds += 1  # an odd count, so the median is one measured run, not a mean of two
    byte_compile()
    work = Path(tempfile.mkdtemp(prefix="casstore-bench-", dir=os.environ.get("BENCH_DIR")))
    try:
        src = work / "src"
        size = make_tree(src, small_files=small_files, big_mb=big_mb)
        nfiles = sum(1 for p in src.rglob("*") if p.is_file())
        cold_store, warm_store = work / "cold-store", work / "warm-store"
        dst, archive = work / "dst", work / "cache.tar.gz"
        subprocess.run(["tar", "-czf", archive, "-C", src, "."], check=True)
        archive_bytes = archive.stat().st_size
        _cli(warm_store, "save", src)()  # the store restores read from
        stored = sum(p.stat().st_size for p in data_objects(warm_store))
        objects_per_save = len(data_objects(warm_store))
        before = set(data_objects(warm_store))
        _cli(warm_store, "save", src)()
        new_on_resave = len(set(data_objects(warm_store)) - before)
        # The same tree saved signed, restored by a loader that trusts only its key.
        signing_key, signed_store = work / "ci.pem", work / "signed-store"
        public = str(signing.generate(signing_key))
        _cli(signed_store, "save", src, "--signing-key", signing_key)()

        def restore_into_full() -> None:
            _cli(warm_store, "load", dst)()

        ops = {
            "cp": Op(
                "`cp -a`",
                lambda: subprocess.run(["cp", "-a", src, dst], check=True),
                _make_way(dst),
            ),
            "tar_c": Op(
                "`tar -czf`",
                lambda: subprocess.run(["tar", "-czf", archive, "-C", src, "."], check=True),
                _make_way(archive),
            ),
            "tar_x": Op("`tar -xzf`", _untar(archive, dst), _make_way(dst)),
            "save": Op(
                "`casstore save` (empty store)",
                _cli(cold_store, "save", src),
                _make_way(cold_store),
            ),
            "resave": Op(
                "`casstore save`, unchanged tree", _cli(warm_store, "save", src), lambda: None
            ),
            "load": Op(
                "`casstore load` (empty destination)", _cli(warm_store, "load", dst), _make_way(dst)
            ),
            "load_signed": Op(
                "`casstore load`, signed key, trusted keys set",
                _cli(signed_store, "load", dst, "--trusted-keys", public),
                _make_way(dst),
            ),
            "load_warm": Op(
                "`casstore load`, every file present",
                _cli(warm_store, "load", dst),
                restore_into_full,
            ),
            "api_save": Op(
                "`Store.save` in-process (empty store)",
                lambda: Store(cold_store).save(src, KEY),
                _make_way(cold_store),
            ),
            "api_save_nosync": Op(
                "`Store.save` in-process, fsync off",
                lambda: Store(cold_store, fsync=False).save(src, KEY),
                _make_way(cold_store),
            ),
        }
        # The interpreter's own start-up, which every `casstore` row above includes.
        ops["python"] = Op(
            "`python -c pass` (start-up alone)",
            lambda: subprocess.run([sys.executable, "-c", "pass"], check=True),
            lambda: None,
        )
        ops["cli"] = Op(
            "`casstore ls` (the command's fixed cost)",
            lambda: subprocess.run(
                [sys.executable, "-m", "casstore", "--root", str(warm_store), "ls"],
                check=True,
                stdout=subprocess.DEVNULL,
            ),
            lambda: None,
        )
        run_rounds(list(ops.values()), rounds)
        ops.update(memory_rows(src, archive, warm_store, rounds))
        ops.update(fuse_rows(src, rounds, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    o = {k: v.median for k, v in ops.items()}

    def row(key: str, goal: str = "", ok: bool | None = None) -> str:
        op = ops[key]
        verdict = "" if ok is None else ("met" if ok else "**missed**")
        return (
            f"| {op.name} | {op.median:.3f} | {op.spread()} | {size / op.median / 2**20:,.0f} "
            f"| {goal} | {verdict} |"
        )

    lines = [
        "# Benchmarks",
        "",
        "Generated by `make bench` (benchmarks/bench_store.py); do not edit by hand.",
        "",
        f"- when: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, {filesystem_of(work.parent)}",
        f"- tree: {nfiles} files, {size / 2**20:.1f} MiB ({small_files} small sources and "
        f"pickles, binaries of {', '.join(map(str, big_mb))} MiB)",
        f"- {rounds} rounds; each round runs every operation once, in the order of the table, "
        "so noise hits all alike. *seconds* is the median of the rounds (one measured run), "
        "*range* the fastest and slowest. Every run of a 'cold' row starts from an empty "
        "store or destination; the source tree is in the page cache for every tool alike. "
        "A run's output is set aside, not deleted, before the next run (deleting thousands "
        "of files right before creating as many makes ext4 skip the just-freed inodes, a "
        "cost of the benchmark, not of the tools: benchmarks/common.py), and flushed.",
        "- `casstore` rows run the command in a new process, as `cp` and `tar` do, so they "
        "include the interpreter's and the command's start-up (their own rows). `Store.save` "
        "rows are in-process. casstore's bytecode is compiled first, as installing it does.",
        "- casstore fsyncs every stored object (the fsync-off row shows the cost); cp and tar do "
        "not fsync.",
        f"- stored: casstore {stored / 2**20:.1f} MiB of packs, indexes and manifests; tar.gz "
        f"{archive_bytes / 2**20:.1f} MiB",
        f"- objects a save of the tree writes: {objects_per_save} (packs, their indexes, one "
        f"manifest): one per {nfiles / objects_per_save:.0f} files (goal: one per 20 files or "
        f"fewer objects: {'met' if nfiles / objects_per_save >= 20 else '**missed**'}); a "
        f"re-save of the unchanged tree writes {new_on_resave} (goal 0: "
        f"{'met' if new_on_resave == 0 else '**missed**'}; it still records the use: one "
        "usage record, the access marker)",
        "",
        "## Store on local disk",
        "",
        "| operation | seconds | range | MiB/s | goal | |",
        "|---|---:|---:|---:|---|---|",
        row("cp"),
        row("tar_c"),
        row("tar_x"),
        row("python"),
        row("cli"),
        row(
            "save",
            f"≥3× faster than tar -czf (is {o['tar_c'] / o['save']:.1f}×)",
            o["tar_c"] / o["save"] >= 3,
        ),
        row(
            "resave",
            f"≤0.3× the empty-store save (is {o['resave'] / o['save']:.2f}×)",
            o["resave"] / o["save"] <= 0.3,
        ),
        row(
            "load",
            f"≤1.5× cp -a (is {o['load'] / o['cp']:.2f}×); ≥3× faster than tar -xzf "
            f"(is {o['tar_x'] / o['load']:.1f}×)",
            o["load"] / o["cp"] <= 1.5 and o["tar_x"] / o["load"] >= 3,
        ),
        row(
            "load_signed",
            f"≤1.05× the unsigned load: signatures invisible (is "
            f"{o['load_signed'] / o['load']:.3f}×)",
            o["load_signed"] / o["load"] <= 1.05,
        ),
        row(
            "load_warm",
            f"≤0.2× the empty-destination load (is {o['load_warm'] / o['load']:.2f}×)",
            o["load_warm"] / o["load"] <= 0.2,
        ),
        row("api_save"),
        row(
            "api_save_nosync",
            f"fsync costs {100 * (o['api_save'] / o['api_save_nosync'] - 1):+.0f}% of a save",
        ),
        "",
        "## Restore into memory",
        "",
        "The same restores into tmpfs (/dev/shm), where creating a file costs next to nothing:",
        "on this machine's ext4 a bare `os.open(O_CREAT)` loop takes 20-700 us per file",
        "depending on the filesystem's state, most of a restore there and most of its noise.",
        "",
        "| operation | seconds | range | MiB/s | goal | |",
        "|---|---:|---:|---:|---|---|",
        row("mem_cp"),
        row("mem_tar_x"),
        row(
            "mem_load",
            f"(no goal) {o['mem_tar_x'] / o['mem_load']:.1f}× faster than tar -xzf, "
            f"{o['mem_load'] / o['mem_cp']:.1f}× cp -a",
        ),
        "",
        "## Restore from a network filesystem",
        "",
        "The store and a tar.gz of the same tree on one SeaweedFS FUSE mount (server and mount",
        "on this machine, over loopback); each restore into an empty local directory, on ext4",
        "(the goal) and in tmpfs (each tool's own work, without the cost of creating files on",
        "this machine's ext4).",
        "",
        "| operation | seconds | range | MiB/s | goal | |",
        "|---|---:|---:|---:|---|---|",
        row("fuse_tar_x"),
        row(
            "fuse_load",
            f"≥2× faster than tar -xzf from the mount (is {o['fuse_tar_x'] / o['fuse_load']:.1f}×)",
            o["fuse_tar_x"] / o["fuse_load"] >= 2,
        ),
        row("fuse_mem_tar_x"),
        row(
            "fuse_mem_load",
            f"(no goal) {o['fuse_mem_tar_x'] / o['fuse_mem_load']:.1f}× faster than tar -xzf "
            "into tmpfs",
        ),
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--small-files", type=int, default=2000)
    parser.add_argument("--big-mb", default="1,2,5,10,20,50")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"))
    args = parser.parse_args()
    report = run(args.rounds, args.small_files, [int(x) for x in args.big_mb.split(",")])
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


if __name__ == "__main__":
    main()

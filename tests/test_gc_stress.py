"""gc next to live savers and loaders, in real processes; gc killed with SIGKILL."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import blake3
import pytest

from casstore import CacheKey, Store, audit
from casstore import gc as gc_mod
from tests.helpers import read_tree, write_tree
from tests.load_mix import MixResult, run_mix
from tests.stress_worker import seed_aged_garbage

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gc_sweeps_while_savers_reuse_the_chunks_it_sweeps(tmp_path: Path) -> None:
    """An hour-old store with garbage; savers reuse old chunks (some of them sweep
    candidates) while gc loops with a grace far longer than any save: gc must delete
    garbage, and no completed save, no load, may miss a file."""
    root = tmp_path / "store"
    garbage = seed_aged_garbage(Store(root), tmp_path / "seed")
    assert garbage > 0
    mix = run_mix([root], tmp_path / "work", 8.0, savers=3, loaders=3, gc_grace=20.0)
    assert mix.errors == []
    assert mix.total("gc_runs") > 0 and mix.total("loads") > 0
    assert mix.total("packs_deleted") > 0, "gc must really sweep"
    assert mix.total("reused_old_chunks") > 0, "savers must reuse chunks gc saw as old"
    assert mix.total("bad") == 0 and mix.total("misses") == 0, mix.warnings
    assert_every_save_loads(Store(root), mix, tmp_path)


@pytest.mark.slow
def test_gc_with_no_grace_never_serves_a_wrong_byte(tmp_path: Path) -> None:
    """With grace 0 gc may delete chunks a save is about to list (a miss, then healed by
    the next save): allowed, but never a wrong byte and never an error."""
    root = tmp_path / "store"
    seed_aged_garbage(Store(root), tmp_path / "seed")
    mix = run_mix([root], tmp_path / "work", 6.0, savers=3, loaders=3, gc_grace=0.0)
    assert mix.errors == []
    assert mix.total("gc_runs") > 0 and mix.total("loads") > 0
    assert mix.total("packs_deleted") > 0
    assert mix.total("bad") == 0


def assert_every_save_loads(store: Store, mix: MixResult, tmp_path: Path) -> None:
    saved: dict[str, dict[str, str]] = {}
    for s in mix.saves:
        saved.setdefault(s["model"], {}).update(s["files"])
    assert saved
    for model, files in saved.items():
        key = CacheKey(torch="t", arch="a", model=model, extra={"tree": "inductor"})
        dest = tmp_path / f"final-{model}"
        report = store.load(key, dest)
        assert report.missing == []
        for path, digest in files.items():
            assert blake3.blake3((dest / path).read_bytes()).hexdigest() == digest
    assert audit.verify(store).ok


# `casstore gc --grace 0 --unsafe-grace -y --json`, reporting from inside: "executing N"
# once it has planned and starts to change the store (N packs to sweep or repack), "swept
# DONE N" after each pack, and "executed" when it is done (then its --json report). Its
# renames and deletes take 20 ms each, as on a slow network volume, so that a kill at a
# random moment lands anywhere in the run, not after a sweep of a few packs is over.
_GC = """
import sys, threading, time
from casstore import gc as gc_mod
from casstore.backends.fs import FileSystemBackend
from casstore.cli import main

def slow(method):
    def slowed(self, *args, **kwargs):
        time.sleep(0.02)
        return method(self, *args, **kwargs)
    return slowed

FileSystemBackend.move = slow(FileSystemBackend.move)
FileSystemBackend.delete = slow(FileSystemBackend.delete)

execute = gc_mod.execute
lock = threading.Lock()

def say(line):
    with lock:  # progress comes from gc's sweeping threads: one whole line at a time
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

def reporting_execute(store, plan, **kwargs):
    say(f"executing {len(plan.packs) + len(plan.repack)}")
    kwargs["progress"] = lambda done, total: say(f"swept {done} {total}")
    report = execute(store, plan, **kwargs)
    say("executed")
    return report

gc_mod.execute = reporting_execute
sys.argv = ["casstore", "gc", "--grace", "0", "--unsafe-grace", "-y", "--json"]
main()
"""


def kill_gc_while_it_runs(env: dict[str, str], rng: random.Random, log: Path) -> list[str]:
    """Start gc; once it reports executing, SIGKILL it at a random delay (0 to 0.3 s), or as
    soon as it has swept 3/4 of its packs if that comes first: either way before it is done.
    Returns the lines it wrote."""
    with log.open("w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-c", _GC], env=env, stdout=subprocess.PIPE, stderr=errors, text=True
        )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()

    def read(stream: IO[str]) -> None:
        for line in stream:
            lines.put(line)
        lines.put("")  # the end: the child has exited

    reader = threading.Thread(target=read, args=(proc.stdout,))
    reader.start()
    try:
        seen = [lines.get(timeout=120)]
        assert seen[0].startswith("executing "), (seen, log.read_text())
        chunks = int(seen[0].split()[1])
        assert chunks >= 10, "every round leaves 10 garbage packs to sweep"
        deadline = time.monotonic() + rng.uniform(0, 0.3)
        while (wait := deadline - time.monotonic()) > 0:
            try:
                seen.append(lines.get(timeout=wait))
            except queue.Empty:
                break
            if seen[-1].startswith("swept ") and int(seen[-1].split()[1]) >= chunks * 3 // 4:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    reader.join(timeout=60)
    seen += list(lines.queue)
    assert proc.returncode == -signal.SIGKILL, log.read_text()
    return seen


def test_gc_killed_at_random_points_leaves_a_sound_store(tmp_path: Path) -> None:
    """gc SIGKILLed 12 times, each time while it executes: the store stays sound (verify
    finds nothing wrong), every live key loads entirely, and a final gc finishes the work."""
    root = tmp_path / "store"
    store = Store(root, threads=4)
    rng = random.Random(42)
    live: dict[CacheKey, dict[str, bytes]] = {}
    env = {**os.environ, "CASSTORE_ROOT": str(root)}
    for round_ in range(12):
        # Give gc work: garbage from removed keys, live keys with several manifests.
        for i in range(12):
            k = CacheKey(torch="t", arch="a", model=f"r{round_}-{i}")
            # The removed keys (i < 10) leave 10 garbage packs, on top of what killed gcs
            # left unswept: more to sweep than gc gets done before it is killed.
            count, top = (100, 3000) if i < 10 else (30, 200_000)
            files = {f"d{j % 40}/f{j}": rng.randbytes(rng.randrange(1, top)) for j in range(count)}
            if i == 0:
                first_garbage = files
            if i == 10:
                # Five files of a removed key live on here: its pack is mostly dead, so gc
                # repacks those five before it sweeps the pack.
                files |= {f"reused/{p}": first_garbage[p] for p in list(first_garbage)[:5]}
            write_tree(tmp_path / "src" / k.id, files)
            store.save(tmp_path / "src" / k.id, k)
            if i < 10:
                gc_mod.remove_key(store, k)
            else:
                live[k] = files
                extra = {"late": rng.randbytes(1000)}
                write_tree(tmp_path / "src2" / k.id, extra)
                store.save(tmp_path / "src2" / k.id, k)
                live[k] = {**files, **extra}
        out = kill_gc_while_it_runs(env, rng, tmp_path / f"gc-{round_}.log")
        # Every round counts: the kill landed after gc began to execute, before it was done.
        assert "executed\n" not in out, f"round {round_}: the kill landed after gc was done"
    report = audit.verify(store)
    assert report.corrupt == [] and report.missing_chunks == [] and report.invalid_manifests == []
    for k, files in live.items():
        dest = tmp_path / "out" / k.id
        assert store.load(k, dest).missing == []
        assert {p: d for p, (d, _) in read_tree(dest).items()} == files
    # A final, uninterrupted gc finishes whatever the killed ones left.
    final = subprocess.run(
        [sys.executable, "-m", "casstore", "gc", "--grace", "0", "--unsafe-grace", "-y", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(final.stdout)["executed"] is True
    assert audit.verify(store).ok
    # Nothing left to sweep or repack: every removed key's pack is gone, and the five
    # files each round's live key reused from one now live in a pack of their own.
    # (One more run first: the final one's compactions renewed the packs their merged
    # manifests list, mostly dead ones among them, so its sweep rightly kept those.)
    gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=0)))
    left = gc_mod.plan(store, gc_mod.Policy(grace=0))
    assert (left.packs, left.repack) == ((), ())
    for k, files in live.items():
        dest = tmp_path / "again" / k.id
        assert store.load(k, dest).missing == []
        assert {p: d for p, (d, _) in read_tree(dest).items()} == files

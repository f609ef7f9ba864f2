"""gc next to live savers and loaders, in real processes; gc killed with SIGKILL."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

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
    assert mix.total("chunks_deleted") >= garbage // 2, "gc must really sweep"
    assert mix.total("reused_old_chunks") > 0, "savers must reuse chunks gc saw as old"
    assert mix.total("bad") == 0 and mix.total("misses") == 0
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
    assert mix.total("chunks_deleted") > 0
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


def test_gc_killed_at_random_points_leaves_a_sound_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = Store(root, threads=4)
    rng = random.Random(42)
    live: dict[CacheKey, dict[str, bytes]] = {}
    env = {**os.environ, "CASSTORE_ROOT": str(root)}
    kills = 0
    for round_ in range(12):
        # Give gc work: garbage from removed keys, live keys with several manifests.
        for i in range(3):
            k = CacheKey(torch="t", arch="a", model=f"r{round_}-{i}")
            # The removed key (i == 0) leaves ~1000 garbage chunks: enough sweep work
            # (~0.2 s) for the kill to land inside it, not only in interpreter start-up.
            count, top = (1000, 3000) if i == 0 else (30, 200_000)
            files = {f"d{j % 40}/f{j}": rng.randbytes(rng.randrange(1, top)) for j in range(count)}
            write_tree(tmp_path / "src" / k.id, files)
            store.save(tmp_path / "src" / k.id, k)
            if i == 0:
                gc_mod.remove_key(store, k)
            else:
                live[k] = files
                extra = {"late": rng.randbytes(1000)}
                write_tree(tmp_path / "src2" / k.id, extra)
                store.save(tmp_path / "src2" / k.id, k)
                live[k] = {**files, **extra}
        proc = subprocess.Popen(
            [sys.executable, "-m", "casstore", "gc", "--grace", "0", "-y"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.25, 0.8))  # interpreter start-up is ~0.25 s of it
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 6, "the kills must land while gc runs"
    report = audit.verify(store)
    assert report.corrupt == [] and report.missing_chunks == [] and report.invalid_manifests == []
    for k, files in live.items():
        dest = tmp_path / "out" / k.id
        assert store.load(k, dest).missing == []
        assert {p: d for p, (d, _) in read_tree(dest).items()} == files
    # A final, uninterrupted gc finishes whatever the killed ones left.
    final = subprocess.run(
        [sys.executable, "-m", "casstore", "gc", "--grace", "0", "-y", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(final.stdout)["executed"] is True
    assert audit.verify(store).ok

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

REPO = Path(__file__).resolve().parent.parent


def run_mix(root: Path, work: Path, seconds: float, grace: float) -> list[dict[str, object]]:
    work.mkdir(parents=True, exist_ok=True)
    Store(root)  # create the store before the processes race to
    roles = ["saver"] * 3 + ["loader"] * 3 + ["gc"]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.stress_worker",
                role,
                str(root),
                str(work),
                str(seconds),
                f"{role}{i}",
                str(grace),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, role in enumerate(roles)
    ]
    results = []
    for p in procs:
        out, errs = p.communicate(timeout=seconds + 120)
        assert p.returncode == 0, errs[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("grace", [0.0, 3600.0])
def test_savers_loaders_and_gc_together(tmp_path: Path, grace: float) -> None:
    root = tmp_path / "store"
    results = run_mix(root, tmp_path / "work", 8.0, grace)
    loads = [r for r in results if "loads" in r]
    gcs = [r for r in results if "gc_runs" in r]
    assert sum(int(r["loads"]) for r in loads) > 0 and int(gcs[0]["gc_runs"]) > 0  # type: ignore[call-overload]
    # Never a wrong byte, whatever the grace.
    assert sum(int(r["bad"]) for r in loads) == 0  # type: ignore[call-overload]
    if grace == 0.0:
        return  # aggressive gc may turn files into misses; that is allowed
    # With the normal grace, no completed save loses a file.
    store = Store(root)
    saved: dict[str, dict[str, str]] = {}
    for r in results:
        for s in r.get("saves", []):  # type: ignore[attr-defined]
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

"""The vLLM sidecar against a fake vLLM server process (tests/fake_vllm.py)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from casstore import CacheKey, Store
from casstore.keys import detect_key
from tests.helpers import read_tree

REPO = Path(__file__).resolve().parent.parent
KEY: CacheKey = detect_key("vmodel", {"tree": "vllm"})


def start_fake(
    root: Path, ready_after: float, late_after: float, *flags: str
) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fake_vllm",
            str(root),
            str(ready_after),
            str(late_after),
            *flags,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    return proc, int(first["port"])


def events(proc: subprocess.Popen[str]) -> dict[str, float]:
    assert proc.stdout is not None
    return {e["event"]: e["t"] for e in map(json.loads, proc.stdout.read().splitlines())}


def watch(store: Path, cache: Path, port: int, *args: str) -> subprocess.Popen[str]:
    """``casstore vllm watch`` as its own process, polling every 0.1 s."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "casstore",
            "--root",
            str(store),
            "vllm",
            "watch",
            "--cache-dir",
            str(cache),
            "--url",
            f"http://127.0.0.1:{port}/v1/models",
            "--poll",
            "0.1",
            "--model",
            "vmodel",
            *args,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def shared_tree(root: Path) -> dict[str, Any]:
    return {
        p: v
        for p, v in read_tree(root).items()
        if p.startswith("torch_compile_cache/") and not p.endswith(".tmp")
    }


def test_saves_after_quiet_then_incrementally_and_exits_with_the_server(tmp_path: Path) -> None:
    cache, store_root = tmp_path / "vllm", tmp_path / "store"
    fake, port = start_fake(cache, ready_after=1.5, late_after=4.0)
    car = watch(store_root, cache, port, "--quiet", "1", "--pid", str(fake.pid))
    time.sleep(1.5 + 4.0 + 3.5)  # past the late files and another quiet period
    fake.send_signal(signal.SIGTERM)
    fake.wait(timeout=10)
    seen = events(fake)
    _, errs = car.communicate(timeout=30)  # the sidecar exits with the server
    assert car.returncode == 0, errs
    store = Store(store_root)
    manifests = store.manifests(KEY)
    first_time, first = manifests[0][1].created_at, manifests[0][1]
    # The first save waited for the half-written file to finish and the quiet period.
    assert first_time >= seen["slow_done"] + 1.0 - 0.2
    paths = {f.path for f in first.files}
    assert "torch_compile_cache/1517964802/rank_0_0/computation_graph.py" in paths
    assert not any("late_shape" in p for p in paths)
    # A later, incremental save holds only the late artifact.
    later = [m for _, m in manifests[1:]]
    assert later and all(m.created_at >= seen["late_done"] for m in later)
    assert {f.path for m in later for f in m.files} == {
        "torch_compile_cache/1517964802/rank_0_0/inductor_cache/late_shape_64.py"
    }
    # Only the shared tree is stored, without torch's temp files.
    assert all(p.startswith("torch_compile_cache/") for p in store.files(KEY))
    # A fresh replica's restore reproduces the tree byte for byte.
    fresh = tmp_path / "fresh"
    restore = subprocess.run(
        [
            sys.executable,
            "-m",
            "casstore",
            "--root",
            str(store_root),
            "vllm",
            "restore",
            "--cache-dir",
            str(fresh),
            "--model",
            "vmodel",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert restore.returncode == 0 and "SUCCESS" in restore.stderr
    assert shared_tree(fresh) == shared_tree(cache)


def test_sigterm_makes_a_final_save(tmp_path: Path) -> None:
    cache, store_root = tmp_path / "vllm", tmp_path / "store"
    fake, port = start_fake(cache, ready_after=0.5, late_after=1.0)
    car = watch(store_root, cache, port, "--quiet", "600")
    try:
        time.sleep(4.0)  # everything written; the long quiet period never elapses
        assert car.poll() is None
        car.send_signal(signal.SIGTERM)
        _, errs = car.communicate(timeout=30)
        assert car.returncode == 0, errs
    finally:
        fake.kill()
        fake.wait()
    saved = set(Store(store_root).files(KEY))
    assert "torch_compile_cache/1517964802/rank_0_0/inductor_cache/late_shape_64.py" in saved


def test_server_never_ready_exits_3_without_saving(tmp_path: Path) -> None:
    cache, store_root = tmp_path / "vllm", tmp_path / "store"
    fake, port = start_fake(cache, 0.0, 0.0, "--never-ready")
    try:
        car = watch(store_root, cache, port, "--timeout", "1.5")
        _, errs = car.communicate(timeout=60)
    finally:
        fake.kill()
        fake.wait()
    assert car.returncode == 3, errs
    assert "not ready" in errs
    assert not (store_root / "manifests").exists() or not any((store_root / "manifests").iterdir())


def test_restore_with_nothing_saved_still_exits_0(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "casstore",
            "--root",
            str(tmp_path / "none"),
            "vllm",
            "restore",
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "DOES_NOT_EXIST" in proc.stderr

"""The vLLM sidecar against a fake vLLM server process (tests/fake_vllm.py)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from casstore import CacheKey, OperationStatus, Store, objects
from casstore.keys import detect_key
from casstore.vllm import Sidecar, SidecarOptions
from tests.fake_vllm import AOT
from tests.helpers import read_tree, temp_files, write_tree

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
        if p.startswith(("torch_compile_cache/", "torch_aot_compile/")) and not p.endswith(".tmp")
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
    assert f"{AOT_NEW}/rank_0_0/model" in paths  # vLLM's ahead-of-time artifact
    assert not any("late_shape" in p for p in paths)
    # A later, incremental save holds only the late artifact.
    later = [m for _, m in manifests[1:]]
    assert later and all(m.created_at >= seen["late_done"] for m in later)
    assert {f.path for m in later for f in m.files} == {
        "torch_compile_cache/1517964802/rank_0_0/inductor_cache/late_shape_64.py"
    }
    # Only the shared tree is stored, without torch's temp files.
    assert all(p.startswith("torch_compile_cache/") for p in store.files(KEY))
    assert not any("modelinfos" in p for p in store.files(KEY))
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


# --- restore units, ahead-of-time artifacts, size cap (in-process) --------------------------

H1 = "torch_compile_cache/1517964802"
H2 = "torch_compile_cache/2718281828"
AOT_NEW = AOT  # current vLLM: inside torch_compile_cache/
AOT_OLD = "torch_aot_compile/" + "cd" * 32  # earlier releases: at the cache root


def vllm_tree(artifact_size: int = 300_000) -> dict[str, bytes]:
    """A cache root as vLLM leaves it: per-hash JIT caches whose index
    (``vllm_compile_cache.py``) names artifacts beside it, and AOT artifacts in both
    layouts vLLM has used, each with its hash-level inductor cache."""
    rng = random.Random(5)
    tree: dict[str, bytes] = {}
    for h in (H1, H2):
        tree[f"{h}/rank_0_0/backbone/vllm_compile_cache.py"] = (
            b"{(None, 0, 'inductor_standalone'): 'artifact_shape_None_subgraph_0'}"
        )
        tree[f"{h}/rank_0_0/backbone/artifact_shape_None_subgraph_0"] = rng.randbytes(artifact_size)
        tree[f"{h}/rank_0_0/inductor_cache/fx/ab/entry"] = rng.randbytes(5_000)
    for aot in (AOT_NEW, AOT_OLD):
        tree[f"{aot}/rank_0_0/model"] = rng.randbytes(artifact_size)
        tree[f"{aot}/inductor_cache/fx/cd/entry"] = rng.randbytes(5_000)
    return tree


@pytest.fixture
def saved_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, bytes]]:
    monkeypatch.delenv("MAX_CACHE_SIZE_MB", raising=False)
    monkeypatch.delenv("CASSTORE_MODEL", raising=False)
    cache, store_root = tmp_path / "vllm", tmp_path / "store"
    tree = vllm_tree()
    write_tree(cache, {**tree, "modelinfos/m.json": b"{}"})
    car = Sidecar(SidecarOptions(cache_root=cache, root=store_root, model="vmodel"))
    assert car.save() is OperationStatus.SUCCESS
    return store_root, tree


def restore(store_root: Path, cache: Path) -> OperationStatus:
    opts = SidecarOptions(cache_root=cache, root=store_root, model="vmodel")
    return Sidecar(opts).restore()


def test_aot_artifacts_are_saved_in_both_layouts(
    tmp_path: Path, saved_vllm: tuple[Path, dict[str, bytes]]
) -> None:
    store_root, tree = saved_vllm
    assert set(Store(store_root).files(KEY)) == set(tree)  # modelinfos/ stays local
    assert restore(store_root, tmp_path / "fresh") is OperationStatus.SUCCESS
    assert {p: d for p, (d, _) in read_tree(tmp_path / "fresh").items()} == tree


def test_restore_units() -> None:
    from casstore.vllm import restore_unit

    assert restore_unit(f"{H1}/rank_0_0/backbone/vllm_compile_cache.py") == H1
    assert restore_unit(f"{AOT_NEW}/rank_1_0/model") == AOT_NEW
    assert restore_unit(f"{AOT_NEW}/inductor_cache/fx/cd/entry") == AOT_NEW
    assert restore_unit(f"{AOT_OLD}/rank_0_0/model") == AOT_OLD
    assert restore_unit("torch_compile_cache/loose_file") is None
    assert restore_unit("torch_compile_cache/torch_aot_compile/loose_file") is None


def test_restore_never_leaves_an_index_without_its_artifacts(
    tmp_path: Path, saved_vllm: tuple[Path, dict[str, bytes]]
) -> None:
    """vLLM asserts "Inductor cache lookup failed" when its index names an artifact that is
    not on disk: a hash directory with a lost chunk is not restored at all."""
    store_root, tree = saved_vllm
    store = Store(store_root)
    for path in (
        f"{H1}/rank_0_0/backbone/artifact_shape_None_subgraph_0",
        f"{AOT_NEW}/rank_0_0/model",
    ):
        (store_root / objects.chunk_key(store.files(KEY)[path].chunks[-1].digest)).unlink()
    fresh = tmp_path / "fresh"
    assert restore(store_root, fresh) is OperationStatus.SUCCESS
    got = {p: d for p, (d, _) in read_tree(fresh).items()}
    assert got == {p: d for p, d in tree.items() if not p.startswith((H1 + "/", AOT_NEW + "/"))}
    assert temp_files(fresh) == []


def test_restore_over_the_size_cap_is_an_error_that_writes_nothing(
    tmp_path: Path,
    saved_vllm: tuple[Path, dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store_root, tree = saved_vllm
    assert sum(map(len, tree.values())) > 2**20
    monkeypatch.setenv("MAX_CACHE_SIZE_MB", "1")
    fresh = tmp_path / "fresh"
    assert restore(store_root, fresh) is OperationStatus.ERROR
    assert not fresh.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "MAX_CACHE_SIZE_MB" in errors[0], errors

"""Why a replica misses: `casstore explain`, and the line a load logs when it misses.

The host's key is computed by the same code as load_compile_cache() (in the CLI's own
process, with the same environment); the store is then given keys that differ from it in
exactly one factor each."""

from __future__ import annotations

import json
import logging
import os
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest

from casstore import CacheKey, OperationStatus, Store, config, explain, load_compile_cache
from casstore.keys import detect_key
from tests import cpu_host
from tests.helpers import write_tree

MODEL = "explained"


def host_key(model: str = MODEL) -> CacheKey:
    """This host's key for the inductor tree, as load_compile_cache computes it."""
    return detect_key(model, {"tree": "inductor"})


def save_key(root: Path, key: CacheKey, tmp_path: Path, files: int = 2) -> None:
    src = tmp_path / f"src-{key.id}"
    write_tree(src, {f"fx/{i}.py": f"{key.id} {i}".encode() for i in range(files)})
    Store(root).save(src, key)


def explain_json(root: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CASSTORE_ROOT", "CASSTORE_MODEL", "CASSTORE_TRUSTED_KEYS")
    }
    proc = subprocess.run(
        [*cpu_host.cli(), "explain", "--model", MODEL, "--json", *args],
        capture_output=True,
        text=True,
        env={**base, "CASSTORE_ROOT": str(root), **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return doc


def changed(key: CacheKey, factor: str, value: str) -> CacheKey:
    if factor in ("torch", "arch", "model"):
        return msgspec.structs.replace(key, **{factor: value})
    return msgspec.structs.replace(key, extra={**key.extra, factor: value})


@pytest.mark.parametrize(
    ("factor", "value"),
    [
        ("torch", "2.12.0+cpu"),
        ("arch", "x86-64-v2-0123abcd"),
        ("python", "3.99"),
        ("triton", "9.9.9"),
        ("model", "another-model"),
    ],
)
def test_a_miss_names_the_one_factor_that_differs(tmp_path: Path, factor: str, value: str) -> None:
    here = host_key()
    stored = changed(here, factor, value)
    root = tmp_path / "store"
    save_key(root, stored, tmp_path)
    doc = explain_json(root)
    (inductor,) = [t for t in doc["trees"] if t["tree"] == "inductor"]
    assert inductor["key_id"] == here.id and inductor["status"] == "missing"
    nearest = inductor["nearest"][0]
    assert nearest["key_id"] == stored.id
    here_value = explain.factors(here).get(factor, explain.ABSENT)
    assert nearest["differences"] == [{"factor": factor, "stored": value, "here": here_value}]


def test_a_gpu_device_name_variant_is_named(tmp_path: Path) -> None:
    """H100 SXM vs PCIe: same arch, another device name, so another key."""
    here = CacheKey(
        torch="2.11.0+cu130",
        arch="sm_90",
        model="m",
        extra={"tree": "inductor", "device": "NVIDIA H100 80GB HBM3", "python": "3.11"},
    )
    stored = changed(here, "device", "NVIDIA H100 PCIe")
    (found,) = explain.nearest(here, [(stored, 1.0)])
    assert found.differences == (
        explain.Difference("device", "NVIDIA H100 PCIe", "NVIDIA H100 80GB HBM3"),
    )


def test_the_same_model_comes_first_then_the_fewest_differences(tmp_path: Path) -> None:
    here = host_key()
    two_off = changed(changed(here, "torch", "2.12.0+cpu"), "python", "3.10")
    one_off = changed(here, "torch", "2.11.0+cpu")
    other_model = changed(here, "model", "x")  # one factor, but another model
    root = tmp_path / "store"
    for key in (two_off, other_model, one_off):
        save_key(root, key, tmp_path)
    (inductor,) = [t for t in explain_json(root)["trees"] if t["tree"] == "inductor"]
    assert [n["key_id"] for n in inductor["nearest"]] == [one_off.id, two_off.id, other_model.id]


def test_a_found_key_reports_its_files_size_and_save_time(tmp_path: Path) -> None:
    root = tmp_path / "store"
    save_key(root, host_key(), tmp_path, files=3)
    doc = explain_json(root)
    assert doc["store"] is True and doc["model"] == MODEL
    (inductor,) = [t for t in doc["trees"] if t["tree"] == "inductor"]
    assert inductor["status"] == "found" and inductor["files"] == 3
    assert inductor["bytes"] > 0 and inductor["last_saved"].endswith("Z")
    assert inductor["signers"] == ["unsigned"] and inductor["nearest"] == []
    assert set(inductor["key"]) == {"torch", "arch", "model", "extra"}


def test_no_store_yet_is_a_miss_with_nothing_near(tmp_path: Path) -> None:
    doc = explain_json(tmp_path / "nothing-here")
    assert doc["store"] is False
    assert all(t["status"] == "missing" and t["nearest"] == [] for t in doc["trees"])
    assert not (tmp_path / "nothing-here").exists()


def test_the_human_output_names_factor_and_both_values(tmp_path: Path) -> None:
    root = tmp_path / "store"
    save_key(root, changed(host_key(), "torch", "2.12.0+cpu"), tmp_path)
    base = {k: v for k, v in os.environ.items() if k != "CASSTORE_ROOT"}
    proc = subprocess.run(
        [*cpu_host.cli(), "explain", "--model", MODEL],
        capture_output=True,
        text=True,
        env={**base, "CASSTORE_ROOT": str(root)},
    )
    assert proc.returncode == 0
    line = next(li for li in proc.stdout.splitlines() if li.strip().startswith("torch"))
    assert "2.12.0+cpu" in line and host_key().torch in line, proc.stdout


def test_a_key_saved_under_the_other_scope_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The org volume has nothing for this key, the deployment volume has it: the miss is
    the scope."""
    org, deployment = tmp_path / "org", tmp_path / "model"
    org.mkdir()
    deployment.mkdir()
    monkeypatch.setattr(config, "SCOPE_MOUNTS", {"org": str(org), "deployment": str(deployment)})
    monkeypatch.delenv("CASSTORE_ROOT", raising=False)
    monkeypatch.delenv("B10FS_CACHE_DIR", raising=False)
    here = host_key()
    save_key(deployment / "cas", here, tmp_path)
    choice = config.choose_root(None, "org")
    assert choice.source == config.ROOT_SCOPE_VOLUME
    found = explain.explain_host(choice, MODEL)
    (inductor,) = [t for t in found.trees if t.tree == "inductor"]
    assert inductor.status == explain.MISSING
    best = inductor.nearest[0]
    assert best.key == here and best.where == str(deployment / "cas")
    assert best.differences == (explain.Difference("scope", "deployment", "org"),)


def test_a_saved_key_no_trusted_key_signed_is_explained_as_such(tmp_path: Path) -> None:
    from casstore import signing

    root = tmp_path / "store"
    save_key(root, host_key(), tmp_path)
    public = signing.generate(tmp_path / "k.pem")
    doc = explain_json(root, env={"CASSTORE_TRUSTED_KEYS": str(public)})
    (inductor,) = [t for t in doc["trees"] if t["tree"] == "inductor"]
    assert inductor["status"] == "untrusted" and inductor["signers"] == ["unsigned"]


def test_a_missing_load_logs_one_line_naming_the_nearest_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # a precompiled-header tree of this test's own
    monkeypatch.setattr("tempfile.tempdir", None)
    root = tmp_path / "store"
    stored = changed(host_key(), "torch", "2.12.0+cpu")
    save_key(root, stored, tmp_path)
    caplog.clear()
    status = load_compile_cache(cache_dir=tmp_path / "cache", root=root, model=MODEL)
    assert status is OperationStatus.DOES_NOT_EXIST
    lines = [r.getMessage() for r in caplog.records if "no compile cache saved" in r.getMessage()]
    assert len(lines) == 1, lines
    assert stored.id[:12] in lines[0] and "torch 2.12.0+cpu here" in lines[0]
    (record,) = [r for r in caplog.records if "no compile cache saved" in r.getMessage()]
    assert record.levelno == logging.WARNING  # a key of this model is stored: a mismatch
    # A model nothing was saved for: the expected first deployment, logged at INFO.
    caplog.clear()
    load_compile_cache(cache_dir=tmp_path / "cache2", root=root, model="brand-new")
    (first,) = [r for r in caplog.records if "no compile cache saved" in r.getMessage()]
    assert first.levelno == logging.INFO and "no key of model 'brand-new'" in first.getMessage()


def test_the_vllm_sidecar_logs_the_explanation_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from casstore.vllm import Sidecar, SidecarOptions

    root = tmp_path / "store"
    stored = changed(detect_key(MODEL, {"tree": "vllm"}), "python", "3.99")
    save_key(root, stored, tmp_path)
    caplog.clear()
    car = Sidecar(SidecarOptions(cache_root=tmp_path / "vllm", root=root, model=MODEL))
    assert car.restore() is OperationStatus.DOES_NOT_EXIST
    (line,) = [r.getMessage() for r in caplog.records if "no compile cache" in r.getMessage()]
    assert line.startswith("vllm:") and "python 3.99 here" in line


def test_explaining_a_miss_is_bounded_in_time_and_quiet(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A key directory full of junk manifests (anyone who can write the store can make
    one) neither slows a missing load past the budget nor floods its log."""
    import time

    from casstore import constants

    root = tmp_path / "store"
    stored = changed(host_key(), "torch", "2.12.0+cpu")
    save_key(root, stored, tmp_path)
    junk = root / constants.MANIFESTS_DIR / ("f" * 32)
    junk.mkdir()
    for i in range(3000):
        (junk / f"{i:020d}-000000000000.manifest").write_bytes(b"junk")
    store = Store(root, create=False)
    caplog.clear()
    started = time.monotonic()
    explain.log_miss(store, host_key(), "test", budget=0.2)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed  # the listing plus at most the budget, never 3,000 reads
    lines = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert len(lines) == 1, [r.getMessage() for r in lines]

"""The CLI, run as a real subprocess the way users and cron jobs run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from casstore.keys import detect_cpu_isa
from tests import cpu_host
from tests.helpers import chunk_files, read_tree, write_tree

KEY_ARGS = ["--torch", "2.13.0+cpu", "--arch", "sm_90", "--model", "cli"]


def run(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "CASSTORE_ROOT": str(root)}
    # As `python -m casstore`, on a host whose GPU (if any) is hidden: keys are the CPU's.
    proc = subprocess.run([*cpu_host.cli(), *args], capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    write_tree(tmp_path / "src", {"fx/a.py": b"print(1)", "big.so": os.urandom(600_000)})
    out = run(tmp_path / "store", "save", str(tmp_path / "src"), *KEY_ARGS, "--json")
    return tmp_path / "store", json.loads(out.stdout)


def test_save_and_load_json_reports(tmp_path: Path, saved: tuple[Path, dict[str, object]]) -> None:
    root, report = saved
    assert report["files"] == 2 and report["new_chunks"] == len(chunk_files(root))
    assert isinstance(report["key_id"], str) and len(report["key_id"]) == 32
    out = run(root, "load", str(tmp_path / "dst"), *KEY_ARGS, "--json")
    loaded = json.loads(out.stdout)
    assert loaded["written"] == 2 and loaded["missing"] == []
    assert read_tree(tmp_path / "dst") == read_tree(tmp_path / "src")
    again = json.loads(run(root, "load", str(tmp_path / "dst"), *KEY_ARGS, "--json").stdout)
    assert (again["written"], again["skipped"]) == (0, 2)


def test_ls_show_and_load_by_id(tmp_path: Path, saved: tuple[Path, dict[str, object]]) -> None:
    root, report = saved
    keys = json.loads(run(root, "ls", "--json").stdout)
    assert [k["id"] for k in keys] == [report["key_id"]]
    assert keys[0]["key"]["arch"] == "sm_90" and keys[0]["files"] == 2
    prefix = str(report["key_id"])[:8]
    shown = json.loads(run(root, "show", prefix, "--json").stdout)
    assert sorted(f["path"] for f in shown["files"]) == ["big.so", "fx/a.py"]
    human = run(root, "show", prefix, "--files").stdout
    assert "sm_90" in human and "fx/a.py" in human
    run(root, "load", str(tmp_path / "by-id"), "--key", prefix)
    assert (tmp_path / "by-id" / "fx/a.py").read_bytes() == b"print(1)"


def test_verify_reports_each_damaged_chunk(
    tmp_path: Path, saved: tuple[Path, dict[str, object]]
) -> None:
    root, _ = saved
    assert json.loads(run(root, "verify", "--json").stdout)["ok"] is True
    damaged = chunk_files(root)[:2]
    for c in damaged:
        c.write_bytes(c.read_bytes()[:-3] + b"bad")
    proc = run(root, "verify", "--json", check=False)
    assert proc.returncode == 4
    report = json.loads(proc.stdout)
    assert sorted(k.rsplit("/", 1)[-1] for k, _ in report["corrupt"]) == sorted(
        c.name for c in damaged
    )
    load = run(root, "load", str(tmp_path / "dst"), *KEY_ARGS, check=False)
    assert load.returncode == 4 and "could not be restored" in load.stderr


def test_stats_reports_dedup(tmp_path: Path, saved: tuple[Path, dict[str, object]]) -> None:
    root, _ = saved
    run(root, "save", str(tmp_path / "src"), "--torch", "t", "--arch", "sm_90", "--model", "twin")
    s = json.loads(run(root, "stats", "--json").stdout)
    assert s["keys"] == 2 and s["manifests"] == 2
    assert s["logical_bytes"] == 2 * s["unique_bytes"]
    assert s["dedup_ratio"] == pytest.approx(2.0)


def test_errors_are_one_line_with_exit_codes(tmp_path: Path) -> None:
    missing = run(tmp_path / "nostore", "ls", check=False)
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error:")
    assert "Traceback" not in missing.stderr
    run(tmp_path / "store", "save", str(tmp_path), *KEY_ARGS)  # creates the store
    unknown = run(
        tmp_path / "store",
        "load",
        str(tmp_path / "d"),
        "--model",
        "nope",
        "--torch",
        "t",
        "--arch",
        "a",
        check=False,
    )
    assert unknown.returncode == 3 and "no saved cache" in unknown.stderr
    (tmp_path / "file").write_text("x")
    bad_root = run(tmp_path / "file", "save", str(tmp_path), *KEY_ARGS, check=False)
    assert bad_root.returncode == 1 and "not a directory" in bad_root.stderr
    assert len(bad_root.stderr.strip().splitlines()) == 1
    too_big = run(
        tmp_path / "store", "save", str(tmp_path), *KEY_ARGS, "--max-size-mb", "0", check=False
    )
    assert too_big.returncode == 1 and "cap" in too_big.stderr


def test_default_key_matches_this_host(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"a": b"1"})
    out = json.loads(run(tmp_path / "store", "save", str(tmp_path / "src"), "--json").stdout)
    assert out["key"]["torch"].startswith("2.13.0")
    assert out["key"]["arch"] == detect_cpu_isa()
    assert out["key"]["extra"]["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"


def test_import_casstore_stays_light() -> None:
    code = (
        "import sys, casstore; heavy = [m for m in ('torch', 'typer', 'rich', 'numpy') "
        "if m in sys.modules]; print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("model", ["m", "org/m@v1", "ünïcode ✓"])
def test_cli_default_key_matches_the_model_py_api(tmp_path: Path, model: str) -> None:
    """What save_compile_cache() stored, `casstore load --model M` finds with no key flags,
    for model names as people write them too."""
    write_tree(tmp_path / "A", {"fxgraph/x": b"graph"})
    code = (
        "import sys; from casstore import save_compile_cache; "
        "print(save_compile_cache(cache_dir=sys.argv[1], root=sys.argv[2], model=sys.argv[3]).name)"
    )
    out = subprocess.run(
        [*cpu_host.python(code), str(tmp_path / "A"), str(tmp_path / "store"), model],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "SUCCESS"
    run(tmp_path / "store", "load", str(tmp_path / "B"), "--model", model)
    assert (tmp_path / "B" / "fxgraph" / "x").read_bytes() == b"graph"


def test_gc_dry_run_then_execute_and_rm(
    tmp_path: Path, saved: tuple[Path, dict[str, object]]
) -> None:
    root, report = saved
    key_id = str(report["key_id"])
    removed = json.loads(run(root, "rm", key_id[:10], "--json").stdout)
    assert removed["manifests_deleted"] == 1
    chunks_before = len(chunk_files(root))
    dry = json.loads(run(root, "gc", "--grace", "0", "--dry-run", "--json").stdout)
    assert dry["executed"] is False and dry["plan"]["chunks_to_delete"] == chunks_before
    assert len(chunk_files(root)) == chunks_before  # a dry run changes nothing
    wet = json.loads(run(root, "gc", "--grace", "0", "-y", "--json").stdout)
    assert wet["report"]["chunks_deleted"] == chunks_before
    assert chunk_files(root) == []
    bad = run(root, "gc", "--grace", "soon", check=False)
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_verify_repair_and_du(tmp_path: Path, saved: tuple[Path, dict[str, object]]) -> None:
    root, _ = saved
    victim = chunk_files(root)[0]
    victim.write_bytes(b"rot")
    proc = run(root, "verify", "--repair", "--json", check=False)
    assert proc.returncode == 4
    assert json.loads(proc.stdout)["repaired"]["chunks_quarantined"] == 1
    assert not victim.exists()
    usage = json.loads(run(root, "du", "--json").stdout)
    assert [u["model"] for u in usage] == ["cli"] and usage[0]["keys"] == 1
    assert usage[0]["own_bytes"] == sum(c.stat().st_size for c in chunk_files(root))


# The CLI on a host whose GPU node is visible: the node's path is patched in, then the real
# entry point runs. PATH holds no nvidia-smi, so the CLI falls back to importing torch.
_CLI_ON_GPU_HOST = (
    "import sys; from casstore import keys; keys.GPU_DEVICE_PATHS = (sys.argv.pop(1),); "
    "from casstore.cli import main; sys.argv[0] = 'casstore'; main()"
)


@pytest.mark.parametrize("cuda_error", ["CUDA driver initialization failed", None])
def test_undeterminable_gpu_arch_is_a_one_line_error(
    tmp_path: Path, cuda_error: str | None
) -> None:
    """nvidia-smi missing and torch raising: exit 1 with one line, no store created. A CPU
    build of torch (CUDA unavailable, no error) keys as CPU: it compiles CPU kernels."""
    from tests.helpers import stand_in_torch

    site = stand_in_torch(
        tmp_path / "site", metadata_version="2.11.0", file_version="2.11.0", cuda_error=cuda_error
    )
    node = tmp_path / "nvidia0"
    node.touch()
    (tmp_path / "bin").mkdir()
    write_tree(tmp_path / "src", {"a": b"1"})
    env = {
        **os.environ,
        "PATH": str(tmp_path / "bin"),
        "PYTHONPATH": str(site),
        "CASSTORE_ROOT": str(tmp_path / "store"),
    }
    args = ["save", str(tmp_path / "src"), "--json"]
    proc = subprocess.run(
        [sys.executable, "-c", _CLI_ON_GPU_HOST, str(node), *args],
        capture_output=True,
        text=True,
        env=env,
    )
    if cuda_error is None:
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["key"]["arch"] == detect_cpu_isa()
        return
    assert proc.returncode == 1, proc.stdout
    assert proc.stderr.startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "GPU" in proc.stderr and cuda_error in proc.stderr
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize("via", ["--root", "CASSTORE_ROOT", "B10FS_CACHE_DIR"])
def test_url_root_is_a_usage_error(tmp_path: Path, via: str) -> None:
    url = "s3://bucket/cas"
    env = {k: v for k, v in os.environ.items() if k not in ("CASSTORE_ROOT", "B10FS_CACHE_DIR")}
    args = ["--root", url] if via == "--root" else []
    if via != "--root":
        env[via] = url
    for command in (["ls"], ["save", str(tmp_path), *KEY_ARGS]):
        proc = subprocess.run(
            [sys.executable, "-m", "casstore", *args, *command],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("error:") and url in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s3:").exists()


def test_load_max_size_refuses_an_oversized_key_before_writing(
    tmp_path: Path, saved: tuple[Path, dict[str, object]]
) -> None:
    store, _ = saved
    dest = tmp_path / "dst"
    proc = run(store, "load", str(dest), *KEY_ARGS, "--max-size", "500K", check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error:") and "cap" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not dest.exists()
    assert run(store, "load", str(dest), *KEY_ARGS, "--max-size", "1M").returncode == 0
    assert read_tree(dest) == read_tree(tmp_path / "src")


def test_a_directory_that_is_not_a_store_is_refused_by_save_and_load(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_tree(root, {"notes.txt": b"mine"})
    write_tree(tmp_path / "src", {"f": b"1"})
    key = ["--torch", "t", "--arch", "a"]
    for args in (["save", str(tmp_path / "src")], ["load", str(tmp_path / "dst")]):
        proc = subprocess.run(
            [sys.executable, "-m", "casstore", "--root", str(root), *args, *key],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 1, proc.stderr
        assert "is not a casstore" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in root.iterdir()) == ["notes.txt"]

"""The CLI, run as a real subprocess the way users and cron jobs run it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from casstore.backends.fs import FileSystemBackend
from casstore.keys import detect_cpu_isa
from tests import cpu_host
from tests.helpers import (
    corrupt_chunk,
    manifest_files,
    pack_files,
    read_tree,
    stored_chunks,
    write_tree,
)

KEY_ARGS = ["--torch", "2.13.0+cpu", "--arch", "sm_90", "--model", "cli"]


def run(
    root: Path | None, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI with ``CASSTORE_ROOT=root`` (unset when None) and ``env`` on top."""
    base = {k: v for k, v in os.environ.items() if k not in ("CASSTORE_ROOT", "B10FS_CACHE_DIR")}
    if root is not None:
        base["CASSTORE_ROOT"] = str(root)
    # As `python -m casstore`, on a host whose GPU (if any) is hidden: keys are the CPU's.
    proc = subprocess.run(
        [*cpu_host.cli(), *args], capture_output=True, text=True, env={**base, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {proc.stderr}")
    return proc


def one_line(proc: subprocess.CompletedProcess[str], code: int, *causes: str) -> str:
    """Exit ``code`` with one line on stderr, ``error: …``, naming every one of ``causes``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(c in lines[0] for c in causes), (causes, lines[0])
    return lines[0]


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, dict[str, object]]:
    write_tree(tmp_path / "src", {"fx/a.py": b"print(1)", "big.so": os.urandom(600_000)})
    out = run(tmp_path / "store", "save", str(tmp_path / "src"), *KEY_ARGS, "--json")
    return tmp_path / "store", json.loads(out.stdout)


def root_backend(root: Path) -> FileSystemBackend:
    return FileSystemBackend(root)


def test_save_and_load_json_reports(tmp_path: Path, saved: tuple[Path, dict[str, object]]) -> None:
    root, report = saved
    assert report["files"] == 2 and report["new_chunks"] == len(stored_chunks(root_backend(root)))
    assert report["packs"] == len(pack_files(root)) == 1
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
    assert [k["key_id"] for k in keys] == [report["key_id"]]
    assert keys[0]["key"]["arch"] == "sm_90" and keys[0]["files"] == 2
    prefix = str(report["key_id"])[:8]
    shown = json.loads(run(root, "show", prefix, "--json").stdout)
    assert sorted(f["path"] for f in shown["files"]) == ["big.so", "fx/a.py"]
    human = run(root, "show", prefix, "--files").stdout
    assert "sm_90" in human and "fx/a.py" in human
    run(root, "load", str(tmp_path / "by-id"), "--key", prefix)
    assert (tmp_path / "by-id" / "fx/a.py").read_bytes() == b"print(1)"


def test_output_and_logs_are_whole_though_the_command_skips_teardown(tmp_path: Path) -> None:
    """The command leaves without the interpreter's teardown (casstore.cli.common.finish):
    what it wrote must still all be out, block-buffered stdout of hundreds of KiB and the
    log lines of -v included."""
    files = {f"d{i % 40}/f{i}.py": f"x = {i}".encode() for i in range(3000)}
    write_tree(tmp_path / "src", files)
    saved = run(tmp_path / "store", "-v", "save", str(tmp_path / "src"), *KEY_ARGS, "--json")
    assert json.loads(saved.stdout)["files"] == 3000 and "saved" in saved.stderr
    shown = run(tmp_path / "store", "show", str(json.loads(saved.stdout)["key_id"]), "--json")
    assert len(shown.stdout) > 200_000
    assert sorted(f["path"] for f in json.loads(shown.stdout)["files"]) == sorted(files)
    missing = run(tmp_path / "store", "load", str(tmp_path / "dst"), "--model", "none", check=False)
    assert missing.returncode != 0 and "error" in missing.stderr
    # Written straight to sys.stdout, with no flush of its own, and block-buffered.
    buffered = {"PYTHONUNBUFFERED": ""}
    metrics = run(tmp_path / "store", "stats", "--prometheus", env=buffered).stdout
    assert metrics.endswith("\n") and "casstore_" in metrics


# The command with a stdout whose writes fail as on a full disk.
_FULL_STDOUT = r"""
import errno, io, sys
class Full(io.RawIOBase):
    def writable(self):
        return True
    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")
sys.stdout = io.TextIOWrapper(io.BufferedWriter(Full()), encoding="utf-8")
from casstore.cli import main
sys.argv[0] = "casstore"
main()
"""


def test_output_that_cannot_be_written_fails_the_command(tmp_path: Path) -> None:
    """`casstore stats --prometheus > metrics.tmp && mv ...`: on a full disk the exposition,
    written without a flush of its own, fails at the command's last flush; that must be
    an error, not an exit 0 with nothing written."""
    write_tree(tmp_path / "src", {"a.py": b"x = 1"})
    run(tmp_path / "store", "save", str(tmp_path / "src"), "--model", "m")
    proc = subprocess.run(
        [*cpu_host.python(_FULL_STDOUT), "stats", "--prometheus"],
        capture_output=True,
        text=True,
        env={**os.environ, "CASSTORE_ROOT": str(tmp_path / "store"), "PYTHONUNBUFFERED": ""},
    )
    assert proc.returncode == 1 and "could not write the output" in proc.stderr, proc.stderr


@pytest.mark.parametrize("fd", [1, 2])
def test_a_command_started_with_stdout_or_stderr_closed_succeeds(tmp_path: Path, fd: int) -> None:
    """A daemon, or `casstore save ... >&-`: Python then has no sys.stdout (or stderr)."""
    write_tree(tmp_path / "src", {"a.py": b"x = 1"})
    argv = [*cpu_host.cli(), "--root", str(tmp_path / "store"), "save", str(tmp_path / "src")]
    proc = subprocess.run(
        ["bash", "-c", f'exec "$@" {fd}>&-', "_", *argv, "--model", "m"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    assert run(tmp_path / "store", "ls", "--json").stdout.count('"model": "m"') == 1


def test_verify_reports_each_damaged_chunk(
    tmp_path: Path, saved: tuple[Path, dict[str, object]]
) -> None:
    root, _ = saved
    assert json.loads(run(root, "verify", "--json").stdout)["ok"] is True
    backend = root_backend(root)
    damaged = sorted(stored_chunks(backend))[:2]
    for d in damaged:
        corrupt_chunk(backend, d)
    (pack,) = pack_files(root)
    proc = run(root, "verify", "--json", check=False)
    assert proc.returncode == 4
    report = json.loads(proc.stdout)
    assert [k.rsplit("/", 1)[-1] for k, _ in report["corrupt"]] == [pack.name]
    assert report["damaged_chunks"] == {pack.name[:-5]: sorted(d.hex() for d in damaged)}
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
        "import sys, casstore; heavy = [m for m in ('torch', 'click', 'rich', 'numpy') "
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
    removed = json.loads(run(root, "rm", key_id[:10], "-y", "--json").stdout)
    assert removed["manifests_deleted"] == 1
    packs_before = len(pack_files(root))
    no_grace = ["--grace", "0", "--unsafe-grace"]
    dry = json.loads(run(root, "gc", *no_grace, "--dry-run", "--json").stdout)
    assert dry["executed"] is False and dry["plan"]["packs_to_delete"] == packs_before
    assert len(pack_files(root)) == packs_before  # a dry run changes nothing
    wet = json.loads(run(root, "gc", *no_grace, "-y", "--json").stdout)
    assert wet["report"]["packs_deleted"] == packs_before
    assert wet["report"]["indexes_deleted"] == packs_before
    assert pack_files(root) == [] and not list((root / "index").iterdir())
    bad = run(root, "gc", "--grace", "soon", check=False)
    assert bad.returncode == 2 and "not a duration" in bad.stderr


def test_verify_repair_and_du(tmp_path: Path, saved: tuple[Path, dict[str, object]]) -> None:
    root, _ = saved
    usage = json.loads(run(root, "du", "--json").stdout)
    assert [u["model"] for u in usage] == ["cli"] and usage[0]["keys"] == 1
    # Each chunk's share of its block's compressed bytes: about the whole pack.
    (pack,) = pack_files(root)
    assert 0.95 * pack.stat().st_size <= usage[0]["own_bytes"] <= pack.stat().st_size
    (victim,) = pack_files(root)
    victim.write_bytes(b"rot")
    proc = run(root, "verify", "--repair", "--json", check=False)
    assert proc.returncode == 4
    assert json.loads(proc.stdout)["repaired"]["packs_quarantined"] == 1
    assert not victim.exists()


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
    """A URL casstore cannot store to (only s3:// is one it can)."""
    url = "gs://bucket/cas"
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
    assert not (tmp_path / "gs:").exists()


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


# --- usage errors, exit codes, one line each ----------------------------------------------


@pytest.mark.parametrize(
    ("args", "cause"),
    [
        (["save", "{tmp}/missing", *KEY_ARGS], "does not exist"),
        (["save", "{tmp}/file", *KEY_ARGS], "is a file"),
        (["load", "{tmp}/file", *KEY_ARGS], "is a file"),
        (["gc", "--keep-last", "0"], "--keep-last"),
        (["ls", "--no-such-flag"], "--no-such-flag"),
        (["--threads", "0", "ls"], "--threads"),
        (["stats", "--by", "user"], "--by"),
        (["save", "{tmp}", "--extra", "novalue", *KEY_ARGS], "--extra"),
        (["save", "{tmp}", "--extra", "device=", *KEY_ARGS], "--extra"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path: Path, args: list[str], cause: str) -> None:
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    one_line(run(tmp_path / "store", *argv, check=False), 2, cause)
    assert not (tmp_path / "store").exists()


# A child that starts as root, imports what it needs (the CLI imports a command's module,
# and the store, only when the command runs; the s3 backend, which checks a --root, and
# portalocker are imported only when used), then (as root only) drops to nobody and runs
# the CLI: as root, permissions would not stop it.
_CLI_AS_NOBODY = r"""
import importlib, os, pwd, sys
import casstore.cli
for name in ("casstore.cli.store_cmds", "casstore.store", "casstore.backends.s3", "portalocker"):
    importlib.import_module(name)
if os.getuid() == 0:
    nobody = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(nobody.pw_gid)
    os.setuid(nobody.pw_uid)
sys.argv = ["casstore", *sys.argv[1:]]
casstore.cli.main()
"""


def test_an_unwritable_destination_is_one_line(tmp_path: Path) -> None:
    base = Path(tempfile.mkdtemp(prefix="casstore-cli-", dir="/tmp"))  # tmp_path is 0700
    try:
        os.chmod(base, 0o755)
        write_tree(base / "src", {f"d{i}/f{i}": os.urandom(1000) for i in range(6)})
        run(base / "store", "save", str(base / "src"), *KEY_ARGS)
        for p in [base / "store", *(base / "store").rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
        dest = base / "dst"
        dest.mkdir(mode=0o555)
        os.chmod(dest, 0o555)
        argv = ["--root", str(base / "store"), "load", str(dest), *KEY_ARGS]
        proc = subprocess.run(
            [*cpu_host.python(_CLI_AS_NOBODY), *argv],
            capture_output=True,
            text=True,
        )
        one_line(proc, 1, str(dest), "Permission denied")
        assert list(dest.iterdir()) == []
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_saving_an_empty_directory_says_nothing_was_saved(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    human = run(tmp_path / "store", "save", str(tmp_path / "empty"), *KEY_ARGS)
    assert "nothing saved" in human.stdout + human.stderr
    assert "holds no files" in human.stdout + human.stderr
    report = json.loads(
        run(tmp_path / "store", "save", str(tmp_path / "empty"), *KEY_ARGS, "--json").stdout
    )
    assert report["saved"] is False and report["files"] == 0
    assert json.loads(run(tmp_path / "store", "ls", "--json").stdout) == []


def test_gc_json_says_so_when_another_gc_runs(
    tmp_path: Path, saved: tuple[Path, dict[str, object]]
) -> None:
    from casstore import Store
    from casstore import gc as gc_mod

    root, _ = saved
    with gc_mod.gc_lock(Store(root)) as held:
        assert held
        proc = run(root, "gc", "--json")
    assert proc.returncode == 0
    doc = json.loads(proc.stdout)
    assert doc["executed"] is False and doc["busy"] is True
    assert "another gc" in doc["message"]


# --- maintenance that cannot surprise ------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["gc", "--max-age", "30"], "--max-age"),
        (["gc", "--max-size", "500"], "--max-size"),
        (["gc", "--grace", "3600"], "--grace"),
        (["load", "{tmp}/dst", *KEY_ARGS, "--max-size", "1000"], "--max-size"),
    ],
)
def test_sizes_and_durations_without_a_unit_are_refused(
    tmp_path: Path, saved: tuple[Path, dict[str, object]], args: list[str], option: str
) -> None:
    root, _ = saved
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    one_line(
        run(root, *argv, "--dry-run" if argv[0] == "gc" else "--json", check=False),
        2,
        option,
        "unit",
    )
    assert not (tmp_path / "dst").exists()


def test_a_grace_below_the_floor_needs_unsafe_grace(
    tmp_path: Path, saved: tuple[Path, dict[str, object]]
) -> None:
    root, _ = saved
    one_line(run(root, "gc", "--grace", "5m", "--dry-run", check=False), 2, "--unsafe-grace")
    one_line(
        run(root, "gc", "--dry-run", check=False, env={"CASSTORE_GC_GRACE": "1m"}),
        2,
        "--unsafe-grace",
    )
    assert run(root, "gc", "--grace", "5m", "--unsafe-grace", "--dry-run").returncode == 0
    assert run(root, "gc", "--grace", "10m", "--dry-run").returncode == 0


def test_rm_by_prefix_shows_the_key_and_asks(
    tmp_path: Path, saved: tuple[Path, dict[str, object]]
) -> None:
    root, report = saved
    key_id = str(report["key_id"])
    before = manifest_files(root)
    # Off a terminal nobody can answer: a prefix without -y is refused, naming the key.
    one_line(run(root, "rm", key_id[:6], check=False), 2, key_id, "-y")
    dry = run(root, "rm", key_id[:6], "--dry-run")
    assert key_id[:12] in dry.stdout and "model=cli" in dry.stdout
    dry_json = json.loads(run(root, "rm", key_id[:6], "--dry-run", "--json").stdout)
    assert dry_json["key_id"] == key_id and dry_json["deleted"] is False
    assert dry_json["manifests"] == 1
    assert manifest_files(root) == before
    gone = json.loads(run(root, "rm", key_id[:6], "-y", "--json").stdout)
    assert gone["key_id"] == key_id and gone["deleted"] is True
    assert gone["manifests_deleted"] == 1
    assert manifest_files(root) == []


def test_rm_by_full_id_needs_no_confirmation(
    tmp_path: Path, saved: tuple[Path, dict[str, object]]
) -> None:
    root, report = saved
    proc = run(root, "rm", str(report["key_id"]))
    assert str(report["key_id"])[:12] in proc.stdout
    assert manifest_files(root) == []


def test_gc_plan_shows_set_aside_keys_and_what_the_grace_keeps(tmp_path: Path) -> None:
    root = tmp_path / "store"
    old = ["--torch", "2.12.0+cpu", "--arch", "sm_90", "--model", "cli"]
    write_tree(tmp_path / "old", {"old.so": os.urandom(300_000)})
    write_tree(tmp_path / "new", {"new.so": os.urandom(300_000)})
    old_id = json.loads(run(root, "save", str(tmp_path / "old"), *old, "--json").stdout)["key_id"]
    run(root, "save", str(tmp_path / "new"), *KEY_ARGS)
    first = run(root, "gc", "--keep-last", "1", "--dry-run")
    assert f"set aside {old_id[:12]}" in first.stdout, first.stdout
    plan = json.loads(run(root, "gc", "--keep-last", "1", "--dry-run", "--json").stdout)["plan"]
    assert [d["key_id"] for d in plan["drop_keys"]] == [old_id]
    run(root, "gc", "--keep-last", "1", "-y")
    # Right after: the set-aside key waits a grace period (a save may still be in flight).
    waiting = run(root, "gc", "--dry-run")
    assert f"keep {old_id[:12]} set aside" in waiting.stdout, waiting.stdout
    plan = json.loads(run(root, "gc", "--dry-run", "--json").stdout)["plan"]
    assert plan["waiting_keys"] == [old_id] and plan["expire_keys"] == []
    # With a zero grace it is due: deleted, and the grace keeps nothing.
    second = run(root, "gc", "--dry-run", "--grace", "0", "--unsafe-grace")
    assert f"delete {old_id[:12]}" in second.stdout, second.stdout
    zero = ["--grace", "0", "--unsafe-grace", "--json"]
    plan = json.loads(run(root, "gc", "--dry-run", *zero).stdout)["plan"]
    assert plan["expire_keys"] == [old_id] and plan["restore_keys"] == []
    assert plan["packs_to_delete"] > 0 and plan["packs_kept_by_grace"] == 0


# --- conventions ----------------------------------------------------------------------------

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def test_version() -> None:
    import casstore

    proc = run(None, "--version")
    assert proc.stdout.strip() == f"casstore {casstore.__version__}"


def test_global_options_work_after_the_subcommand(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"a": b"1"})
    root = str(tmp_path / "store")
    run(None, "save", str(tmp_path / "src"), *KEY_ARGS, "--root", root, "--threads", "2", "-v")
    keys = json.loads(run(None, "ls", "--root", root, "--json").stdout)
    assert len(keys) == 1
    verbose = run(None, "load", str(tmp_path / "dst"), *KEY_ARGS, "--root", root, "-v")
    assert "loaded" in verbose.stderr  # the INFO log line
    # After the subcommand wins over before it.
    assert run(None, "--root", str(tmp_path / "none"), "ls", "--root", root).returncode == 0


def test_json_uses_key_id_and_iso_times(
    tmp_path: Path, saved: tuple[Path, dict[str, object]]
) -> None:
    root, report = saved
    key_id = report["key_id"]
    (listed,) = json.loads(run(root, "ls", "--json").stdout)
    assert listed["key_id"] == key_id and "id" not in listed
    assert ISO_UTC.match(listed["last_saved"]) and ISO_UTC.match(listed["last_used"])
    shown = json.loads(run(root, "show", str(key_id), "--json").stdout)
    assert shown["key_id"] == key_id and "id" not in shown
    assert all(ISO_UTC.match(m["created_at"]) for m in shown["manifests"])
    loaded = json.loads(run(root, "load", str(tmp_path / "d"), *KEY_ARGS, "--json").stdout)
    assert loaded["key_id"] == key_id
    gone = json.loads(run(root, "rm", str(key_id), "--json").stdout)
    assert gone["key_id"] == key_id and "id" not in gone


def test_ls_shows_every_factor_and_last_use(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_tree(tmp_path / "src", {"a": b"1"})
    for device in ("NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"):
        run(root, "save", str(tmp_path / "src"), *KEY_ARGS, "--extra", f"device={device}")
    table = run(root, "ls").stdout
    header = table.splitlines()[1]
    for column in ("tree", "device", "last used"):
        assert column in header, table
    assert "NVIDIA A100-SXM4-80GB" in table and "NVIDIA H100 80GB HBM3" in table
    rows = [line for line in table.splitlines() if "inductor" in line]
    assert len(rows) == 2


def test_cli_honours_casstore_scope_and_threads(tmp_path: Path) -> None:
    mounts = {"org": str(tmp_path / "org"), "deployment": str(tmp_path / "model")}
    (tmp_path / "model").mkdir()
    write_tree(tmp_path / "src", {"a": b"1"})
    code = (
        "import json, os, sys\nimport casstore.config as c\n"
        "c.SCOPE_MOUNTS = json.loads(os.environ['TEST_SCOPE_MOUNTS'])\n"
        "from casstore.cli import main\nsys.argv[0] = 'casstore'\nmain()\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("CASSTORE_ROOT", "B10FS_CACHE_DIR")}
    env |= {
        "HOME": str(tmp_path / "home"),
        "TEST_SCOPE_MOUNTS": json.dumps(mounts),
        "CASSTORE_SCOPE": "deployment",
        "CASSTORE_THREADS": "0",
    }
    proc = subprocess.run(
        [*cpu_host.python(code), "save", str(tmp_path / "src"), *KEY_ARGS],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "model" / "cas" / "manifests").is_dir()
    assert not (tmp_path / "home" / ".cache" / "casstore").exists()
    assert "CASSTORE_THREADS=0 is below 1" in proc.stderr


def test_help_shows_no_bool_noise() -> None:
    for args in (["--help"], ["gc", "--help"], ["vllm", "watch", "--help"]):
        text = run(None, *args).stdout
        assert "<bool>" not in text, text
        assert "--help" in text


# --- the vllm group's options -------------------------------------------------------------


@pytest.mark.parametrize("placement", ["group", "subcommand"])
def test_vllm_restore_options_work_before_and_after_restore(tmp_path: Path, placement: str) -> None:
    write_tree(tmp_path / "src", {"torch_compile_cache/abc/rank_0_0/x.py": b"artifact"})
    root = tmp_path / "store"
    run(root, "save", str(tmp_path / "src"), "--model", "vm", "--tree", "vllm")
    opts = ["--model", "vm", "--cache-dir", str(tmp_path / "vllm")]
    args = ["vllm", *opts, "restore"] if placement == "group" else ["vllm", "restore", *opts]
    env = {"HOME": str(tmp_path / "home"), "VLLM_CACHE_ROOT": "", "CASSTORE_MODEL": ""}
    proc = run(root, *args, env=env)
    assert "SUCCESS" in proc.stderr, proc.stderr
    restored = tmp_path / "vllm" / "torch_compile_cache" / "abc" / "rank_0_0" / "x.py"
    assert restored.read_bytes() == b"artifact"


@pytest.mark.parametrize(
    "args",
    [
        ["vllm", "--url", "http://127.0.0.1:9/v1/models", "restore"],
        ["vllm", "--pid", "1", "restore"],
        ["--threads", "4", "vllm", "restore"],
    ],
)
def test_vllm_options_restore_does_not_take_are_refused(tmp_path: Path, args: list[str]) -> None:
    option = next(a for a in args if a.startswith("--"))
    env = {"HOME": str(tmp_path / "home"), "VLLM_CACHE_ROOT": str(tmp_path / "vllm")}
    one_line(run(tmp_path / "store", *args, check=False, env=env), 2, option)


def test_without_the_cli_extra_the_command_says_how_to_get_it(tmp_path: Path) -> None:
    """model.py needs no CLI libraries; the command without them is one line, not a
    traceback."""
    (tmp_path / "click.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'click'\", name='click')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "casstore", "ls"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "error: the casstore command needs the 'cli' extra (click, rich): "
        "pip install 'casstore[cli]' (model.py's load/save calls work without it)"
    ]


# Runs `python -m casstore ARGS…` in this process (as a child sees no GPU), then prints
# its exit status and every module it imported, as JSON, as the last line on stderr.
_MODULES_IMPORTED_BY = r"""
import json, os, runpy, sys
sys.argv = ["casstore", *sys.argv[1:]]
code = None

def leave(status):  # the command leaves by os._exit: come back here instead
    raise SystemExit(status)

os._exit = leave
try:
    runpy.run_module("casstore", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
print(json.dumps({"code": code, "modules": sorted(sys.modules)}), file=sys.stderr)
"""
COMMAND_NAMES = (
    *("save", "load", "ls", "show", "verify", "stats", "du"),
    *("rm", "gc", "doctor", "explain", "keygen", "vllm"),
)
# None of these is needed to restore a key: the CLI's former libraries (typer, and the
# pydantic it needs), rich (tables and progress bars on a terminal), and the modules of
# other commands.
NOT_FOR_A_LOAD = (
    "typer",
    "pydantic",
    "rich",
    "casstore.gc",
    "casstore.audit",
    "casstore.cli.doctor",
)


def test_a_load_imports_only_what_it_needs(tmp_path: Path) -> None:
    """`casstore load` runs at every replica start: it imports its own command's module and
    the store, never the other commands' modules or libraries (nor pydantic, which typer
    needed: a TypeAdapter per parameter cost a 10-option command ~0.1 s)."""
    write_tree(tmp_path / "src", {"a.py": b"1"})
    root = tmp_path / "store"
    run(root, "save", str(tmp_path / "src"), "--model", "light")
    proc = subprocess.run(
        [
            *cpu_host.python(_MODULES_IMPORTED_BY),
            "--root",
            str(root),
            "load",
            "--model",
            "light",
            str(tmp_path / "dst"),
        ],
        capture_output=True,
        text=True,
    )
    found = json.loads(proc.stderr.strip().splitlines()[-1])
    assert found["code"] == 0, proc.stderr
    assert (tmp_path / "dst" / "a.py").read_bytes() == b"1"
    modules = set(found["modules"])
    assert {"casstore.cli.store_cmds", "casstore.store"} <= modules
    heavy = sorted(m for m in modules if m in NOT_FOR_A_LOAD or m.split(".")[0] in NOT_FOR_A_LOAD)
    assert heavy == [], heavy
    # Help still lists every command, with its one-line help.
    listed = run(None, "--help").stdout
    for name in COMMAND_NAMES:
        assert re.search(rf"^  {name} +\S", listed, flags=re.M), (name, listed)
    assert re.search(r"^  restore +\S", run(None, "vllm", "--help").stdout, flags=re.M)


def test_gc_with_a_root_never_warns_about_the_default_one(tmp_path: Path) -> None:
    """`casstore --root X gc` read the model.py settings, which resolve the default root:
    a warning that the local fallback store was being used, about a store gc never
    touched."""
    root = tmp_path / "store"
    write_tree(tmp_path / "src", {"a": b"1"})
    run(None, "--root", str(root), "save", str(tmp_path / "src"), *KEY_ARGS)
    proc = run(None, "--root", str(root), "gc", "--dry-run", env={"HOME": str(tmp_path)})
    assert "not mounted" not in proc.stderr and "local store" not in proc.stderr, proc.stderr

"""A store that cannot be reached must not go unnoticed: the local-fallback warning of the
model.py calls, and `casstore doctor`, run as subprocesses the way a team runs them."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests import cpu_host
from tests.helpers import write_tree

# Python run first in each child: the scope volumes are the test's directories, so a host
# that has /cache/org mounted checks the same thing as one that has not.
_MOUNTS = (
    "import json, os\nimport casstore.config as c\n"
    "c.SCOPE_MOUNTS = json.loads(os.environ['TEST_SCOPE_MOUNTS'])\n"
)
_CLI = _MOUNTS + "import sys\nfrom casstore.cli import main\nsys.argv[0] = 'casstore'\nmain()\n"


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """No store root set; HOME, the scope volumes and vLLM's cache under ``tmp_path``."""
    unset = ("CASSTORE_ROOT", "B10FS_CACHE_DIR", "CASSTORE_MODEL", "CASSTORE_SCOPE")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    mounts = {"org": str(tmp_path / "org"), "deployment": str(tmp_path / "model")}
    return env | {
        "HOME": str(tmp_path / "home"),
        "TEST_SCOPE_MOUNTS": json.dumps(mounts),
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        **extra,
    }


def doctor(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cpu_host.python(_CLI), "doctor", *args],
        capture_output=True,
        text=True,
        env=environment(tmp_path, **env),
    )


def model_py(tmp_path: Path, call: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``call`` (Python) in a child, with WARNING logging on stderr as a server has it."""
    code = (
        _MOUNTS + "import logging, sys\n"
        "logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(message)s')\n"
        "from casstore import load_compile_cache, save_compile_cache\n" + call
    )
    return subprocess.run(
        cpu_host.python(code),
        capture_output=True,
        text=True,
        env=environment(tmp_path, **env),
        check=True,
    )


def test_the_local_fallback_is_a_warning_once_per_process(tmp_path: Path) -> None:
    write_tree(tmp_path / "inductor", {"fxgraph/x": b"graph"})
    proc = model_py(
        tmp_path,
        "print(save_compile_cache().name, load_compile_cache().name, save_compile_cache())",
    )
    assert proc.stdout.split() == ["SUCCESS", "SKIPPED", "SKIPPED"]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 1, proc.stderr
    assert str(tmp_path / "home" / ".cache" / "casstore") in warnings[0]
    assert str(tmp_path / "org") in warnings[0] and "CASSTORE_ROOT" in warnings[0]


def test_doctor_on_a_healthy_store(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_tree(tmp_path / "inductor", {"fxgraph/x": b"graph"})
    saved = model_py(tmp_path, "print(save_compile_cache(model='m').name)", CASSTORE_ROOT=str(root))
    assert saved.stdout.strip() == "SUCCESS", saved.stderr
    proc = doctor(tmp_path, "--json", CASSTORE_ROOT=str(root), CASSTORE_MODEL="m")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    report = json.loads(proc.stdout)
    assert report["ok"] is True and report["problems"] == []
    assert report["root"] == str(root) and report["root_source"] == "CASSTORE_ROOT"
    assert report["scope"] == "org" and report["store"] == "ok"
    assert report["permissions"] == {"create": True, "renew": True, "delete": True}
    assert report["primitive"] in ("renameat2", "link", "rename")
    assert report["free_bytes"] > 0
    keys = {(k["user"], k["tree"]): k for k in report["keys"]}
    inductor = keys[("model.py", "inductor")]
    assert inductor["exists"] is True and inductor["key"]["model"] == "m"
    assert len(inductor["key_id"]) == 32
    assert keys[("vllm", "vllm")]["exists"] is False
    # The probe left nothing behind.
    assert sorted(p.name for p in (root / "locks").iterdir() if "doctor" in p.name) == []
    human = doctor(tmp_path, "--root", str(root), "--model", "m")
    assert human.returncode == 0, human.stderr
    assert str(root) in human.stdout and "--root" in human.stdout
    assert inductor["key_id"][:12] in human.stdout


def test_doctor_sees_the_key_the_vllm_sidecar_saved(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_tree(tmp_path / "vllm", {"torch_compile_cache/abc/rank_0_0/x.py": b"artifact"})
    code = (
        "from pathlib import Path\nfrom casstore.vllm import Sidecar, SidecarOptions\n"
        "options = SidecarOptions(cache_root=Path(os.environ['VLLM_CACHE_ROOT']), model='served')\n"
        "print(Sidecar(options).save().name)\n"
    )
    saved = model_py(tmp_path, code, CASSTORE_ROOT=str(root))
    assert saved.stdout.strip() == "SUCCESS", saved.stderr
    proc = doctor(tmp_path, "--json", "--model", "served", CASSTORE_ROOT=str(root))
    assert proc.returncode == 0, proc.stderr
    keys = {(k["user"], k["tree"]): k for k in json.loads(proc.stdout)["keys"]}
    assert keys[("vllm", "vllm")]["exists"] is True
    assert keys[("model.py", "inductor")]["exists"] is False


@pytest.mark.parametrize("output", ["human", "json"])
def test_doctor_gives_one_line_per_problem(tmp_path: Path, output: str) -> None:
    """No root set and no volume mounted (the local fallback), and that directory holds
    someone's files: two problems, one line each, exit 1."""
    fallback = tmp_path / "home" / ".cache" / "casstore"
    write_tree(fallback, {"notes.txt": b"mine"})
    proc = doctor(tmp_path, *(["--json"] if output == "json" else []))
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    problems = [line for line in lines if line.startswith("problem: ")]
    assert len(problems) == 2, proc.stderr
    assert any("local fallback" in p and "CASSTORE_ROOT" in p for p in problems), problems
    assert any("not a casstore" in p for p in problems), problems
    if output == "json":
        report = json.loads(proc.stdout)
        assert report["ok"] is False and len(report["problems"]) == 2
        assert report["root_source"] == "local fallback" and report["store"] == "not a store"
    assert sorted(p.name for p in fallback.iterdir()) == ["notes.txt"]


def test_doctor_with_no_store_yet_is_healthy_where_a_save_can_create_it(tmp_path: Path) -> None:
    (tmp_path / "org").mkdir()
    proc = doctor(tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["root"] == str(tmp_path / "org" / "cas")
    assert report["root_source"] == "scope volume" and report["store"] == "missing"
    assert not (tmp_path / "org" / "cas").exists()  # doctor creates nothing


def test_doctor_follows_casstore_scope(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    proc = doctor(tmp_path, "--json", CASSTORE_SCOPE="deployment", CASSTORE_THREADS="3")
    report = json.loads(proc.stdout)
    assert report["scope"] == "deployment" and report["threads"] == 3
    assert report["root"] == str(tmp_path / "model" / "cas")


def test_doctor_flags_a_root_whose_volume_seems_not_mounted(tmp_path: Path) -> None:
    """CASSTORE_ROOT names a store on a volume that is not mounted: its parent directory
    does not exist, and a save would quietly create the whole path on the local disk."""
    root = tmp_path / "cache" / "org" / "cas"
    proc = doctor(tmp_path, CASSTORE_ROOT=str(root))
    assert proc.returncode == 1, proc.stdout
    assert f"{root.parent} does not exist" in proc.stderr, proc.stderr
    assert not (tmp_path / "cache").exists()

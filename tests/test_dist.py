"""`make dist` builds the sdist and the wheel that README.md and docs/deploy.md install from,
and that wheel installs and runs: the package, its type information, the CLI and its extra."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "docs/deploy.md")


def _run(
    argv: list[str], *, timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=timeout
    )
    assert proc.returncode == 0, f"{argv} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_make_dist_builds_the_wheel_the_docs_install(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    # The Makefile's own recipe, with this interpreter's venv and a private output folder.
    _run(
        ["make", "dist", f"DIST={dist}", f"BIN={Path(sys.executable).parent}"],
        cwd=REPO,
        timeout=600,
    )
    built = sorted(p.name for p in dist.iterdir())
    wheels = [n for n in built if n.endswith(".whl")]
    sdists = [n for n in built if n.endswith(".tar.gz")]
    assert len(wheels) == 1 and len(sdists) == 1, built
    wheel, sdist = dist / wheels[0], dist / sdists[0]

    # Every wheel the docs tell people to install is the one `make dist` builds.
    for doc in DOCS:
        named = set(re.findall(r"dist/(casstore-[^\s'\"\[\]]+\.whl)", (REPO / doc).read_text()))
        assert named == {wheel.name}, f"{doc} names {named}, make dist builds {wheel.name}"

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(info).decode())
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(info.replace("METADATA", "entry_points.txt")).decode())
    for required in ("casstore/__init__.py", "casstore/py.typed", "casstore/vllm.py"):
        assert required in names
    assert any(n.startswith("casstore/backends/") for n in names)
    assert not any(n.split("/")[0] in {"tests", "demo", "benchmarks"} for n in names)
    # The `casstore` command and the module it runs, which needs the `cli` extra.
    target = entry_points["console_scripts"]["casstore"]
    module = target.split(":")[0].replace(".", "/")
    assert f"{module}.py" in names or f"{module}/__init__.py" in names, target
    assert "cli" in meta.get_all("Provides-Extra", [])
    cli_requires = [r for r in meta.get_all("Requires-Dist", []) if 'extra == "cli"' in r]
    assert any(r.startswith("click") for r in cli_requires), cli_requires
    assert any(r.startswith("rich") for r in cli_requires), cli_requires

    with tarfile.open(sdist) as tf:
        members = {m.split("/", 1)[1] for m in tf.getnames() if "/" in m}
    assert {"pyproject.toml", "README.md", "casstore/py.typed"} <= members

    # Installed as documented (`pip install 'dist/…whl[cli]'`); the dependencies are this
    # venv's, so no index is needed. The installed package is the wheel's, not the checkout.
    site = tmp_path / "site"
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-index",
            "--quiet",
            "--target",
            str(site),
            f"{wheel}[cli]",
        ],
        timeout=300,
    )
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    where = _run(
        [sys.executable, "-c", "import casstore; print(casstore.__file__)"],
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert where.stdout.strip() == str(site / "casstore" / "__init__.py")
    usage = _run([str(site / "bin" / "casstore"), "--help"], env=env, cwd=tmp_path, timeout=120)
    assert "vllm" in usage.stdout and "gc" in usage.stdout

"""The commands and snippets of README.md and docs/deploy.md, run as they are written there,
so the docs and what they promise cannot drift apart."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from casstore import Store
from tests import cpu_host
from tests.helpers import write_tree

REPO = Path(__file__).resolve().parent.parent
# Documents that give a command starting `vllm serve` next to the sidecar.
START_DOCS = ("README.md", "docs/deploy.md", "docs/vllm.md")
SYSTEM_PATH = "/usr/bin:/bin"

FAKE_VLLM = """#!/bin/sh
# Stands in for vLLM: records that it started, its pid and its arguments.
printf '%s\\n' "$$" "$*" > "$FAKE_VLLM_LOG"
"""
# Stands in for a working casstore: records each call's arguments.
FAKE_CASSTORE = """#!/bin/sh
printf '%s\\n' "$*" >> "$FAKE_CASSTORE_LOG"
"""

# Put first on PYTHONPATH: the CLI's `import click` then fails as where the `cli` extra
# is not installed.
NO_CLICK = "raise ModuleNotFoundError(\"No module named 'click'\", name='click')\n"


def code_blocks(doc: str, lang: str) -> list[str]:
    text = (REPO / doc).read_text()
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def server_start_commands(doc: str) -> list[list[str]]:
    """argv of each command in ``doc`` that starts `vllm serve`: a line of a ```sh block
    (run by sh), or a Kubernetes `command:` list in a ```yaml block, with `$$` reduced to
    `$` as Kubernetes does."""
    found: list[list[str]] = []
    for block in code_blocks(doc, "sh"):
        found += [["sh", "-c", line] for line in block.splitlines() if "vllm serve" in line]
    for block in code_blocks(doc, "yaml"):
        for line in block.splitlines():
            m = re.match(r"\s*command:\s*(\[.*\])\s*$", line)
            if m and "vllm serve" in m.group(1):
                argv = json.loads(m.group(1))
                assert all("$(" not in arg for arg in argv)  # no Kubernetes variable references
                found.append([arg.replace("$$", "$") for arg in argv])
    assert found, f"{doc} gives no command that starts vllm serve"
    return found


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    vllm = bin_dir / "vllm"
    vllm.write_text(FAKE_VLLM)
    vllm.chmod(0o755)
    return bin_dir


def _start(argv: list[str], tmp_path: Path, env: dict[str, str]) -> tuple[int, str, str]:
    """Run a documented start command; return the fake vLLM's pid and arguments, and
    stderr. Returns once every process it started has exited (they hold its pipes)."""
    log = tmp_path / "vllm-started"
    log.unlink(missing_ok=True)
    full_env = {
        **env,
        "HOME": str(tmp_path / "home"),
        "CASSTORE_ROOT": str(tmp_path / "store"),
        "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"),
        "FAKE_VLLM_LOG": str(log),
        "FAKE_CASSTORE_LOG": str(tmp_path / "casstore-calls"),
    }
    proc = subprocess.run(
        argv, cwd=tmp_path, env=full_env, capture_output=True, text=True, timeout=120, check=False
    )
    assert log.exists(), (
        f"vllm did not start: {argv} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    pid, args = log.read_text().splitlines()
    return int(pid), args, proc.stderr


@pytest.mark.parametrize("doc", START_DOCS)
def test_the_server_starts_when_casstore_is_not_installed(doc: str, tmp_path: Path) -> None:
    path = f"{_fake_bin(tmp_path)}:{SYSTEM_PATH}"
    assert shutil.which("casstore", path=path) is None
    for argv in server_start_commands(doc):
        _, args, _ = _start(argv, tmp_path, {"PATH": path})
        assert args.startswith("serve "), args


@pytest.mark.parametrize("doc", START_DOCS)
def test_the_server_starts_when_the_cli_extra_is_missing(doc: str, tmp_path: Path) -> None:
    """`casstore` is installed, but without `[cli]`: the command fails importing click."""
    bin_dir = _fake_bin(tmp_path)
    casstore = bin_dir / "casstore"
    casstore.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m casstore "$@"\n')
    casstore.chmod(0o755)
    blocker = tmp_path / "no-click"
    blocker.mkdir()
    (blocker / "click.py").write_text(NO_CLICK)
    env = {"PATH": f"{bin_dir}:{SYSTEM_PATH}", "PYTHONPATH": f"{blocker}{os.pathsep}{REPO}"}
    for argv in server_start_commands(doc):
        _, args, stderr = _start(argv, tmp_path, env)
        assert args.startswith("serve "), args
        assert "click" in stderr  # the sidecar really could not run


@pytest.mark.parametrize("doc", START_DOCS)
def test_the_watcher_follows_the_server_process(doc: str, tmp_path: Path) -> None:
    """With casstore working, the restore runs and the watcher is given vLLM's pid (the
    shell's, which `exec` hands to vLLM), so it exits, after a final save, with vLLM."""
    bin_dir = _fake_bin(tmp_path)
    (bin_dir / "casstore").write_text(FAKE_CASSTORE)
    (bin_dir / "casstore").chmod(0o755)
    calls = tmp_path / "casstore-calls"
    for argv in server_start_commands(doc):
        calls.unlink(missing_ok=True)
        pid, args, _ = _start(argv, tmp_path, {"PATH": f"{bin_dir}:{SYSTEM_PATH}"})
        assert args.startswith("serve "), args
        restore, watch = sorted(calls.read_text().splitlines())
        assert restore == "vllm restore"
        watch_args = shlex.split(watch)
        assert watch_args[:2] == ["vllm", "watch"], watch
        assert watch_args[watch_args.index("--pid") + 1] == str(pid), (watch, pid)


def test_readme_snippets_and_cli_lines_use_one_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """README.md's model.py snippet, its `Store` snippet and its `casstore save` line save
    under one key: run each as written (paths replaced by temp ones) into its own store."""
    py_blocks = code_blocks("README.md", "python")
    model_py = next(b for b in py_blocks if "save_compile_cache(" in b)
    direct = next(b for b in py_blocks if "Store(" in b)
    cli_line = next(
        line
        for b in code_blocks("README.md", "sh")
        for line in b.splitlines()
        if line.startswith("casstore save ")
    )
    cache = tmp_path / "cache"
    write_tree(cache, {"fxgraph/ab/entry": b"compiled" * 100, "triton/0/k.cubin": b"k" * 50})
    stores = {name: tmp_path / name for name in ("model_py", "direct", "cli")}

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    monkeypatch.setenv("CASSTORE_ROOT", str(stores["model_py"]))
    monkeypatch.setenv("CASSTORE_PRECOMPILED_HEADERS", "0")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.delenv("CASSTORE_MODEL", raising=False)
    exec(compile(ast.parse(model_py), "README model.py", "exec"), {})

    doc_cache, doc_root = "/tmp/torchinductor_me", "/cache/org/cas"
    assert doc_cache in direct and doc_root in direct and doc_cache in cli_line
    runnable = direct.replace(doc_cache, str(cache)).replace(doc_root, str(stores["direct"]))
    exec(compile(ast.parse(runnable), "README Store snippet", "exec"), {})

    argv = [str(cache) if a == doc_cache else a for a in shlex.split(cli_line)[1:]]
    proc = subprocess.run(
        [*cpu_host.cli(), "--root", str(stores["cli"]), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={k: v for k, v in os.environ.items() if k != "CASSTORE_MODEL"},
    )
    assert proc.returncode == 0, proc.stderr

    keys = {
        name: [i.key for i in Store(root, create=False).keys()] for name, root in stores.items()
    }
    assert all(len(found) == 1 for found in keys.values()), keys
    assert len({found[0].id for found in keys.values()}) == 1, keys

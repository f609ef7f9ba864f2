"""A store shared by several users through a group, with real uids: every writer must renew
the age of chunks another user wrote, or fail the save; never "refresh" without renewing.

Children start as root (so they can import casstore wherever the checkout lives), then
drop to an unprivileged uid and gid before touching the store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import manifest_files, pack_files, write_tree

GROUP = 47000
ALICE, BOB = 47001, 47002

CHILD = r"""
import json, os, sys
from casstore import CacheKey, Store
from casstore.errors import CasstoreError
# imported before dropping rights:
import casstore.store, casstore.backends.fs, casstore.locks, portalocker

uid, gid, umask = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3], 8)
root, src, model = sys.argv[4], sys.argv[5], sys.argv[6]
os.setgroups([gid])
os.setgid(gid)
os.setuid(uid)
os.umask(umask)

class _NoLateImports:  # where the checkout is unreadable to uid, a late import would fail
    def find_spec(self, name, path=None, target=None):
        raise ImportError(f"{name} imported after dropping privileges: import it above")

sys.meta_path.insert(0, _NoLateImports())
try:
    report = Store(root, threads=2).save(src, CacheKey(torch="t", arch="a", model=model))
    print(json.dumps({"manifest": report.manifest, "new_chunks": report.new_chunks}))
except CasstoreError as e:
    print(json.dumps({"error": str(e)}))
"""


def save_as(uid: int, umask: int, root: Path, src: Path, model: str) -> dict[str, object]:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            str(uid),
            str(GROUP),
            f"{umask:o}",
            str(root),
            str(src),
            model,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


@pytest.fixture
def team_volume() -> Iterator[Path]:
    """A directory every test user can reach (tmp_path may sit under a 0700 directory),
    with a store root owned by the team's group, setgid, as docs/deploy.md sets it up."""
    base = Path(tempfile.mkdtemp(prefix="casstore-team-", dir="/tmp"))
    try:
        os.chmod(base, 0o755)
        root = base / "cas"
        root.mkdir()
        os.chown(root, 0, GROUP)
        os.chmod(root, 0o2775)
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def shared_source(base: Path, name: str, files: dict[str, bytes]) -> Path:
    src = base / name
    write_tree(src, files)
    for p in [src, *src.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    return src


def test_a_teammate_renews_chunks_another_user_wrote(team_volume: Path) -> None:
    shared = os.urandom(30_000)  # one chunk
    root = team_volume / "cas"
    alice = save_as(ALICE, 0o002, root, shared_source(team_volume, "a", {"k.so": shared}), "a")
    assert alice["manifest"]
    (chunk,) = pack_files(root)
    assert chunk.stat().st_uid == ALICE and chunk.stat().st_gid == GROUP
    os.utime(chunk, (1000, 1000))  # "written long ago": gc's grace has run out
    bob = save_as(BOB, 0o002, root, shared_source(team_volume, "b", {"k.so": shared}), "b")
    assert bob["manifest"] and bob["new_chunks"] == 0
    assert chunk.stat().st_mtime > time.time() - 600  # renewed by Bob's save


def test_a_chunk_nobody_else_can_renew_fails_the_save_clearly(team_volume: Path) -> None:
    """Alice wrote with umask 022 (files 0644, directories 0755): Bob can neither renew her
    chunk nor replace it. His save must fail and publish no manifest."""
    shared = os.urandom(30_000)  # one chunk
    root = team_volume / "cas"
    assert save_as(ALICE, 0o022, root, shared_source(team_volume, "a", {"k.so": shared}), "a")[
        "manifest"
    ]
    (chunk,) = pack_files(root)
    os.utime(chunk, (1000, 1000))
    before = manifest_files(root)
    bob = save_as(BOB, 0o002, root, shared_source(team_volume, "b", {"k.so": shared}), "b")
    assert "cannot renew" in str(bob.get("error")), bob
    assert manifest_files(root) == before
    assert chunk.stat().st_mtime == 1000

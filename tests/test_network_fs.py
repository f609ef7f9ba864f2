"""The store on a real network filesystem: SeaweedFS mounted twice (two "hosts").

Writes go through host1, reads through host2 (and the other way round). flock is not
coordinated between the two mounts, so every test here runs without effective locks.
"""

from __future__ import annotations

import os
import pty
import random
import select
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings

from casstore import CacheKey, InvalidManifest, Store, audit, constants
from casstore import gc as gc_mod
from casstore import manifest as mf
from casstore.backends.fs import FileSystemBackend
from casstore.errors import NotFound
from tests.backend_conformance import BackendConformance
from tests.helpers import (
    KEY,
    corrupt_chunk,
    lose_chunk,
    pack_files,
    read_tree,
    temp_files,
    write_tree,
)
from tests.seaweed import wait_visible
from tests.test_store import trees

REPO = Path(__file__).resolve().parent.parent


class TestSeaweedBackend(BackendConformance):
    @pytest.fixture
    def backend(self, shared_dirs: tuple[Path, Path]) -> FileSystemBackend:
        return FileSystemBackend(shared_dirs[0] / "root")


def open_both(shared: tuple[Path, Path]) -> tuple[Store, Store]:
    one = Store(shared[0] / "store", threads=8)
    wait_visible(shared[1] / "store" / constants.LAYOUT_FILE)
    return one, Store(shared[1] / "store", threads=8)


def saved_visible(other: Path, manifest: str | None) -> None:
    if manifest is not None:
        wait_visible(other / "store" / manifest)


@given(tree=trees())
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_roundtrip_across_hosts(
    shared_dirs: tuple[Path, Path], tree: dict[str, tuple[bytes, int]]
) -> None:
    sub = f"rt-{uuid.uuid4().hex}"
    a, b = shared_dirs[0] / sub, shared_dirs[1] / sub
    a.mkdir()
    wait_visible(b)
    h1, h2 = open_both((a, b))
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "src", Path(tmp) / "dst"
        src.mkdir()
        write_tree(src, {p: d for p, (d, _) in tree.items()}, {p: m for p, (_, m) in tree.items()})
        report = h1.save(src, KEY)
        if not tree:
            return
        saved_visible(b, report.manifest)
        loaded = h2.load(KEY, dst)
        assert loaded.missing == [] and read_tree(dst) == tree


_SAVER = """
import sys
from casstore import Store, CacheKey
store = Store(sys.argv[1], threads=4)
for _ in range(3):
    store.save(sys.argv[2], CacheKey(torch="t", arch="a", model=sys.argv[3]), lock_timeout=0)
"""


@pytest.mark.parametrize("same_key", [False, True])
def test_concurrent_savers_on_two_hosts(
    shared_dirs: tuple[Path, Path], tmp_path: Path, same_key: bool
) -> None:
    """One saver per host at once, sharing chunks (and, in one case, the key): both saves
    load intact through either host. The per-key lock is not shared across these mounts."""
    rng = random.Random(9)
    shared = rng.randbytes(3 * 2**20)
    expected: dict[str, dict[str, bytes]] = {}
    procs = []
    for host, name in zip(shared_dirs, ("one", "two"), strict=True):
        tree = {f"{name}/{i}": rng.randbytes(rng.randrange(1, 300_000)) for i in range(20)}
        tree["shared.bin"] = shared
        write_tree(tmp_path / name, tree)
        model = "same" if same_key else name
        expected.setdefault(model, {}).update(tree)
        Store(host / "store")
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", _SAVER, str(host / "store"), str(tmp_path / name), model]
            )
        )
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    for host in shared_dirs:
        store = Store(host / "store")
        for model, files in expected.items():
            key = CacheKey(torch="t", arch="a", model=model)
            for _ in range(50):  # wait for the other host's manifests to propagate
                try:
                    if set(store.files(key)) >= set(files):
                        break
                except NotFound:
                    pass
                threading.Event().wait(0.2)
            dest = tmp_path / f"out-{host.name}-{model}"
            assert store.load(key, dest).missing == []
            assert {p: d for p, (d, _) in read_tree(dest).items()} == files
    assert temp_files(shared_dirs[0] / "store") == []


def test_corruption_on_one_host_never_yields_wrong_bytes_on_the_other(
    shared_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    h1, h2 = open_both(shared_dirs)
    rng = random.Random(4)
    tree = {f"f{i}": rng.randbytes(rng.choice([100, 50_000, 900_000])) for i in range(10)}
    write_tree(tmp_path / "src", tree)
    report = h1.save(tmp_path / "src", KEY)
    saved_visible(shared_dirs[1], report.manifest)
    listed = sorted({c.digest for f in h2.files(KEY).values() for c in f.chunks})
    for i, d in enumerate(rng.sample(listed, 4)):
        if i % 2:
            lose_chunk(h2.backend, d)
        else:
            corrupt_chunk(h2.backend, d)
    # Read through host1: it must notice (after its metadata cache catches up) or serve
    # the bytes it had; never anything else.
    dst = tmp_path / "dst"
    loaded = h1.load(KEY, dst)
    restored = {p: d for p, (d, _) in read_tree(dst).items()}
    assert set(restored) == set(tree) - set(loaded.missing)
    assert all(tree[p] == d for p, d in restored.items())
    v = audit.verify(h2)
    assert sum(len(d) for d in v.damaged_chunks.values()) == 2 and len(v.missing_chunks) >= 4


def test_hostile_manifest_from_another_host_is_refused(
    shared_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    h1, h2 = open_both(shared_dirs)
    doc = msgspec.to_builtins(mf.new_manifest(KEY, []))
    doc["files"] = [
        {
            "path": "../../escape",
            "size": 1,
            "mode": 0o644,
            "digest": b"\0" * 32,
            "chunks": [[b"\0" * 32, 1]],
        }
    ]
    name = f"{constants.MANIFESTS_DIR}/{KEY.id}/{mf.new_manifest_name(doc['created_at'])}"
    h2.backend.put_if_absent(name, mf.seal(msgspec.msgpack.encode(doc)))
    wait_visible(shared_dirs[0] / "store" / name)
    with pytest.raises(InvalidManifest):
        h1.load(KEY, tmp_path / "a" / "b" / "dst")
    assert not (tmp_path / "escape").exists() and not (tmp_path / "a" / "escape").exists()


def test_flock_on_these_mounts_is_not_coordinated(shared_dirs: tuple[Path, Path]) -> None:
    """docs/reliability.md: flock is not coordinated between the two mounts (so nothing in
    casstore may rely on it). Host1 holds the lock until told to let go; a second taker on
    the same mount is refused (the control: locking works at all), one on host2 is granted."""
    hold = (
        "import sys\nfrom pathlib import Path\nfrom casstore.locks import best_effort_lock\n"
        "with best_effort_lock(Path(sys.argv[1]), 0) as held:\n"
        "    print(held, flush=True)\n    sys.stdin.readline()\n"
    )
    probe = (
        "import sys\nfrom pathlib import Path\nfrom casstore.locks import best_effort_lock\n"
        "with best_effort_lock(Path(sys.argv[1]), 0) as held:\n    print(held)\n"
    )
    lock = "probe.lock"
    # Created and closed first: a file still open on one FUSE mount may not show on the
    # other until it is closed.
    (shared_dirs[0] / lock).touch()
    wait_visible(shared_dirs[1] / lock)
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(shared_dirs[0] / lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "True"

        def take(host: Path) -> str:
            return subprocess.run(
                [sys.executable, "-c", probe, str(host / lock)],
                capture_output=True,
                text=True,
                timeout=60,
                cwd=REPO,
            ).stdout.strip()

        assert take(shared_dirs[0]) == "False", "same mount: the held lock must exclude"
        assert take(shared_dirs[1]) == "True", "other mount: granted although held"
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=60)


# --- gc across hosts ------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def test_gc_on_one_host_while_the_other_resaves_the_same_data(
    shared_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """gc plans on host1 with every chunk a sweep candidate (their key was removed an hour
    ago); host2 saves the same data again (reusing, refreshing those chunks); gc executes on
    host1. Loading through host2 afterwards: nothing missing."""
    h1, h2 = open_both(shared_dirs)
    rng = random.Random(12)
    files = {f"k{i}.so": rng.randbytes(rng.choice([3000, 90_000, 700_000])) for i in range(12)}
    write_tree(tmp_path / "src", files)
    old = CacheKey(torch="t", arch="a", model="old")
    h1.save(tmp_path / "src", old)
    gc_mod.remove_key(h1, old)
    hour_ago = time.time() - 3600
    for c in pack_files(shared_dirs[0] / "store"):
        os.utime(c, (hour_ago, hour_ago))
    p = gc_mod.plan(h1, gc_mod.Policy(grace=600))
    assert len(p.packs) == len(pack_files(shared_dirs[0] / "store")) >= 1
    new = CacheKey(torch="t", arch="a", model="new")
    report = h2.save(tmp_path / "src", new)
    assert report.new_chunks == 0  # every chunk reused from the sweep candidates
    assert report.manifest is not None
    wait_visible(shared_dirs[0] / "store" / report.manifest)
    done = gc_mod.execute(h1, p)
    assert done.packs_deleted == 0 and done.packs_kept_late == len(p.packs)
    dest = tmp_path / "dst"
    assert h2.load(new, dest).missing == []
    assert {k: d for k, (d, _) in read_tree(dest).items()} == files
    assert audit.verify(h2).ok


def casstore_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "casstore", "--root", str(root), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )


CLI_KEY = ["--torch", "t", "--arch", "a", "--model", "prompt", "--tree", "inductor"]


def test_cli_gc_waiting_at_its_prompt_keeps_a_key_another_host_used(
    shared_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    """As a user would: save, wait, start `casstore gc --max-age 1s` at a terminal on host1;
    on host2 `casstore load` and `casstore save` one more file; answer y. The key must
    still restore every file, through either host."""
    root1, root2 = shared_dirs[0] / "store", shared_dirs[1] / "store"
    files = {"a.so": os.urandom(200_000), "b.py": b"compiled first"}
    write_tree(tmp_path / "src", files)
    saved = casstore_cli(root1, "save", str(tmp_path / "src"), *CLI_KEY)
    assert saved.returncode == 0, saved.stderr
    saved_at = time.time()
    wait_until(lambda: time.time() > saved_at + 1.5, "the key to age past --max-age")
    manifests_before = set((root1 / constants.MANIFESTS_DIR).rglob("*.manifest"))
    leader, follower = pty.openpty()
    gc = subprocess.Popen(
        [sys.executable, "-m", "casstore", "--root", str(root1), "gc", "--max-age", "1s"],
        stdin=follower,
        stdout=subprocess.PIPE,
        stderr=follower,
        cwd=REPO,
    )
    os.close(follower)
    prompt = b""
    while b"go ahead?" not in prompt:
        ready, _, _ = select.select([leader], [], [], 60)
        assert ready, f"no prompt from gc: {prompt!r}"
        prompt += os.read(leader, 4096)
    # Meanwhile, on host2: a replica loads the key and saves one more file.
    replica = tmp_path / "replica"
    wait_until(lambda: bool(list((root2 / constants.MANIFESTS_DIR).rglob("*.manifest"))), "key")
    assert casstore_cli(root2, "load", str(replica), *CLI_KEY).returncode == 0
    (replica / "c.py").write_bytes(b"compiled later")
    resaved = casstore_cli(root2, "save", str(replica), *CLI_KEY)
    assert resaved.returncode == 0, resaved.stderr
    # Host1 must see that use when gc re-checks the key (metadata crosses mounts lazily).
    wait_until(
        lambda: set((root1 / constants.MANIFESTS_DIR).rglob("*.manifest")) > manifests_before,
        "host2's manifest to reach host1",
    )
    os.write(leader, b"y\n")
    out, _ = gc.communicate(timeout=120)
    os.close(leader)
    assert gc.returncode == 0, out
    assert b"unused for" in out  # the plan did drop the key
    assert b"kept 1 used since planning" in out
    expected = {**files, "c.py": b"compiled later"}
    for root in (root1, root2):
        dest = tmp_path / f"check-{root.parent.name}"
        loaded = casstore_cli(root, "load", str(dest), *CLI_KEY)
        assert loaded.returncode == 0, loaded.stderr
        assert {k: d for k, (d, _) in read_tree(dest).items()} == expected


def test_the_fuse_mount_publishes_with_renameat2(shared_dirs: tuple[Path, Path]) -> None:
    """docs/reliability.md: renameat2(RENAME_NOREPLACE) works through `weed mount`, so the
    fast publish path runs there; this notices if a SeaweedFS upgrade changes that."""
    b = FileSystemBackend(shared_dirs[0] / "root")
    assert b.put_if_absent("x/y", b"one") is True
    assert b.primitive == "renameat2"
    assert b.put_if_absent("x/y", b"two") is False and b.primitive == "renameat2"

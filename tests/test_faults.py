"""Fault suite, on local disk and on the SeaweedFS FUSE mount: savers killed with SIGKILL,
damaged objects, full disks, read-only stores, a store removed mid-load, permissions."""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import blake3
import pytest

from casstore import CacheKey, OperationStatus, Store, audit, constants, load_compile_cache
from casstore import gc as gc_mod
from tests import cpu_host
from tests.helpers import (
    corrupt_chunk,
    lose_chunk,
    manifest_files,
    read_tree,
    temp_files,
    write_tree,
)

REPO = Path(__file__).resolve().parent.parent
KEY = CacheKey(torch="t", arch="a", model="faults")


@pytest.fixture(params=["local", "seaweedfs"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A directory for the store: local disk, or the network filesystem."""
    if request.param == "local":
        return tmp_path / "local"
    shared: tuple[Path, Path] = request.getfixturevalue("shared_dirs")
    return shared[0]


def sealed(rng: random.Random, size: int) -> bytes:
    """Self-checking content: 32-byte BLAKE3 of the payload, then the payload."""
    payload = rng.randbytes(size)
    return blake3.blake3(payload).digest() + payload


def intact(data: bytes) -> bool:
    return len(data) >= 32 and blake3.blake3(data[32:]).digest() == data[:32]


# A saver that saves, again and again until killed, trees whose every file differs from the
# previous tree's. All trees are written before the first save, and each save's "saved" line
# goes out in one write with the next save's "saving" line: from its first "saving" line on,
# the child is always inside a save, so a kill at any moment after it lands mid-save, which
# the last line it wrote (a "saving" line) shows. With a count, it stops after that many saves
# and writes "finished".
_SAVER = """
import json, random, sys
from pathlib import Path
import blake3
from casstore import CacheKey, Store
root, work, count = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
store = Store(root, threads=4)
key = CacheKey(torch="t", arch="a", model="faults")
rng = random.Random()
trees = []
for t in range(6):
    src = work / f"tree{t}"
    src.mkdir(parents=True)
    digests = {}
    for name, size in [(f"g{i}.bin", rng.randrange(1, 150_000)) for i in range(20)] + [
            ("big.so", 2**20)]:
        payload = rng.randbytes(size)
        data = blake3.blake3(payload).digest() + payload
        (src / name).write_bytes(data)
        digests[name] = blake3.blake3(data).hexdigest()
    trees.append((src, json.dumps({"saving": digests})))
print(trees[0][1], flush=True)
n = 0
while True:
    store.save(trees[n % len(trees)][0], key, lock_timeout=0)
    n += 1
    after = json.dumps({"finished": n}) if n == count else trees[n % len(trees)][1]
    print(json.dumps({"saved": n}) + "\\n" + after, flush=True)
    if n == count:
        break
"""


def saver(root: Path, work: Path, count: int) -> tuple[subprocess.Popen[str], str]:
    """Start a saver; return it once it has written its first "saving" line (and that line):
    interpreter start-up, imports and writing the trees are over, the first save begins."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, str(root), str(work), str(count)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith('{"saving"'), f"the saver did not start: {first!r}"
    return proc, first


def test_saver_killed_at_random_moments(where: Path, tmp_path: Path) -> None:
    """25 SIGKILLs per filesystem, each in the middle of a save: a load gives the last
    completed save, or entirely one whose manifest was published before the kill, never a
    mix, a partial or a wrong file; cleanup then removes the temp files left behind."""
    rng = random.Random(str(where))
    root = where / "store"
    Store(root)
    # One saver that is not killed: three completed saves, and how long one save takes here.
    proc, first = saver(root, tmp_path / "work-0", 3)
    started = time.monotonic()
    out = first + proc.communicate(timeout=300)[0]
    per_save = (time.monotonic() - started) / 3
    lines = [json.loads(line) for line in out.splitlines()]
    assert proc.returncode == 0 and lines[-1] == {"finished": 3}
    # What a load may give: the last completed save, or one killed after its manifest
    # was published (any killed since then, the newest published one wins).
    may_load = [lines[-3]["saving"]]
    for round_ in range(1, 26):
        proc, first = saver(root, tmp_path / f"work-{round_}", 0)
        # A random moment of the next three saves or so.
        time.sleep(rng.uniform(0, 3 * per_save))
        proc.send_signal(signal.SIGKILL)
        out = first + proc.communicate(timeout=60)[0]
        assert proc.returncode == -signal.SIGKILL
        lines = [json.loads(line) for line in out.splitlines()]
        assert "saving" in lines[-1], f"round {round_}: the kill did not land in a save"
        for line, after in itertools.pairwise(lines):
            if "saved" in after:
                may_load = [line["saving"]]
        may_load.append(lines[-1]["saving"])
        dest = tmp_path / f"dst{round_}"
        report = Store(root).load(KEY, dest)
        assert report.missing == []
        restored = {p: d for p, (d, _) in read_tree(dest).items()}
        assert all(intact(d) for d in restored.values()), "a restored file has wrong bytes"
        got = {p: blake3.blake3(d).hexdigest() for p, d in restored.items()}
        assert got in may_load, f"round {round_}: the load is not one whole save"
        shutil.rmtree(dest)
        shutil.rmtree(tmp_path / f"work-{round_}")
    store = Store(root)
    p = gc_mod.plan(store, gc_mod.Policy(temp_timeout=0, lock_timeout=0))
    assert p.temps, "killed savers leave temp files for cleanup to find"
    gc_mod.execute(store, p)
    assert temp_files(root) == []
    assert audit.verify(store).ok


def test_damage_is_reported_and_never_restored(where: Path, tmp_path: Path) -> None:
    rng = random.Random(3)
    root = where / "store"
    store = Store(root, threads=4)
    tree = {f"f{i}": sealed(rng, rng.randrange(1, 400_000)) for i in range(30)}
    write_tree(tmp_path / "src", tree)
    first = store.save(tmp_path / "src", KEY).manifest
    files = store.files(KEY)
    write_tree(tmp_path / "src2", {"later": sealed(rng, 1000)})
    later = store.save(tmp_path / "src2", KEY).manifest
    assert first and later
    # 9 chunks of the first save: 6 with wrong bytes (their packs rewritten so), 3 lost.
    listed = sorted({c.digest.hex() for f in files.values() for c in f.chunks})
    corrupt: set[str] = set()
    deleted: set[str] = set()
    for i, digest in enumerate(rng.sample(listed, 9)):
        if i % 3 == 2:
            lose_chunk(store.backend, bytes.fromhex(digest))
            deleted.add(digest)
        else:
            corrupt_chunk(store.backend, bytes.fromhex(digest))
            corrupt.add(digest)
    blob = (root / later).read_bytes()
    (root / later).write_bytes(blob[:40] + bytes([blob[40] ^ 1]) + blob[41:])
    report = audit.verify(store)
    lost = corrupt | deleted
    assert {d for ds in report.damaged_chunks.values() for d in ds} == corrupt
    damaged_packs = {f"{constants.PACKS_DIR}/{p[:2]}/{p}.pack" for p in report.damaged_chunks}
    assert {k for k, _ in report.corrupt} == damaged_packs
    # The intact manifest's references to every damaged or deleted chunk are missing ones.
    assert sorted(report.missing_chunks) == sorted((first, d) for d in lost)
    assert [k for k, _ in report.invalid_manifests] == [later]
    loaded = store.load(KEY, tmp_path / "dst")
    damaged = {p for p, f in files.items() if {c.digest.hex() for c in f.chunks} & lost}
    assert sorted(loaded.missing) == sorted(damaged)
    # Exactly the intact files, and not "later": its manifest is damaged, so not trusted.
    restored = {p: d for p, (d, _) in read_tree(tmp_path / "dst").items()}
    assert restored == {p: d for p, d in tree.items() if p not in damaged}
    cli = subprocess.run(
        [sys.executable, "-m", "casstore", "--root", str(root), "verify"],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 4
    named = cli.stdout.splitlines()
    assert sorted(line.split(":")[0] for line in named if "  damaged " in line) == sorted(
        f"  damaged {k}" for k in damaged_packs
    )
    assert sorted(line for line in named if "references missing chunk" in line) == sorted(
        f"  {first} references missing chunk {d}" for d in lost
    )
    assert [line.split(":")[0] for line in named if "invalid manifest" in line] == [
        f"  invalid manifest {later}"
    ]


# A child that starts as root, imports everything it will need, then drops to ``nobody``
# in-process and runs the CLI (``cli ARGS…``) or ``save_compile_cache`` (``api CACHE ROOT``).
# Exec'ing the child as nobody would make the test depend on where the checkout and the
# interpreter live: a clone in a 0700 directory, or a venv whose python links into a 0700
# /root, cannot even be imported from as nobody. Once privileges are dropped, any further
# import fails loudly, so a missing preload shows up on every machine, not just those. The
# CLI imports a command's module, and the store, only when that command runs: the module of
# the commands these tests run (save, load) is preloaded by name, with the store and what
# is imported only when used (the s3 backend, which checks a --root; portalocker).
_AS_NOBODY = r"""
import importlib, logging, os, pwd, sys
PRELOAD = (
    "casstore casstore.cli casstore.cli.store_cmds casstore.store casstore.backends.s3 "
    "casstore.compile_cache portalocker"
)
for name in PRELOAD.split():
    importlib.import_module(name)

class _NoLateImports:
    def find_spec(self, name, path=None, target=None):
        raise ImportError(f"{name} imported after dropping privileges: add it to PRELOAD")

nobody = pwd.getpwnam("nobody")
os.setgroups([])
os.setgid(nobody.pw_gid)
os.setuid(nobody.pw_uid)
sys.meta_path.insert(0, _NoLateImports())
mode, args = sys.argv[1], sys.argv[2:]
if mode == "cli":
    import casstore.cli
    sys.argv = ["casstore", *args]
    casstore.cli.main()
else:
    from casstore import save_compile_cache
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    print(save_compile_cache(cache_dir=args[0], root=args[1]).name)
"""


def as_nobody(mode: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cpu_host.python(_AS_NOBODY), mode, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )


def cli(root: Path, *args: str, user: str | None = None) -> subprocess.CompletedProcess[str]:
    if user is not None:
        assert user == "nobody"
        return as_nobody("cli", "--root", str(root), *args)
    argv = [sys.executable, "-m", "casstore", "--root", str(root), *args]
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, cause: str) -> None:
    """Exit ``code``, and on stderr one line, ``error: …``, that names ``cause``."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and cause in lines[0], proc.stderr


@pytest.fixture
def tmpfs(tmp_path: Path) -> object:
    point = tmp_path / "tmpfs"
    point.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)], check=True)
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


KEY_FLAGS = ["--torch", "t", "--arch", "a", "--model", "faults", "--tree", "x"]


def test_full_disk_store_and_destination(tmp_path: Path, tmpfs: Path) -> None:
    rng = random.Random(1)
    write_tree(tmp_path / "src", {f"f{i}": rng.randbytes(500_000) for i in range(8)})
    one_line_error(
        cli(tmpfs / "store", "save", str(tmp_path / "src"), *KEY_FLAGS),
        1,
        "No space left on device",
    )
    assert manifest_files(tmpfs / "store") == []
    assert cli(tmp_path / "store", "save", str(tmp_path / "src"), *KEY_FLAGS).returncode == 0
    one_line_error(
        cli(tmp_path / "store", "load", str(tmpfs / "dst"), *KEY_FLAGS),
        1,
        "No space left on device",
    )
    assert temp_files(tmpfs) == []
    source = read_tree(tmp_path / "src")
    assert all(source[p] == v for p, v in read_tree(tmpfs / "dst").items())


def test_read_only_store(tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"a": b"1"})
    assert cli(tmp_path / "store", "save", str(tmp_path / "src"), *KEY_FLAGS).returncode == 0
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(tmp_path / "store"), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        assert cli(ro, "load", str(tmp_path / "dst"), *KEY_FLAGS).returncode == 0
        assert (tmp_path / "dst" / "a").read_bytes() == b"1"
        write_tree(tmp_path / "src", {"b": b"2"})
        one_line_error(
            cli(ro, "save", str(tmp_path / "src"), *KEY_FLAGS), 1, "Read-only file system"
        )
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_permission_denied(tmp_path: Path) -> None:
    base = Path(f"/tmp/casstore-perm-{os.getpid()}")  # pytest's tmp dirs are 0700
    try:
        base.mkdir(mode=0o755)
        write_tree(base / "src", {"a": b"1"})
        os.chmod(base / "src", 0o755)
        os.chmod(base / "src" / "a", 0o644)
        assert cli(base / "store", "save", str(base / "src"), *KEY_FLAGS).returncode == 0
        for d in (base / "store").rglob("*"):
            os.chmod(d, 0o755 if d.is_dir() else 0o644)
        os.chmod(base / "store", 0o755)
        one_line_error(
            cli(
                base / "store",
                "save",
                str(base / "src"),
                "--model",
                "other",
                "--torch",
                "t",
                "--arch",
                "a",
                user="nobody",
            ),
            1,
            "Permission denied",
        )
        one_line_error(
            cli(base / "store", "load", str(base / "dst"), *KEY_FLAGS, user="nobody"),
            1,
            "Permission denied",
        )
        api = as_nobody("api", str(base / "src"), str(base / "store"))
        assert api.stdout.strip() == "ERROR", api.stderr
        # Its one ERROR record names the cause.
        errors = [line for line in api.stderr.splitlines() if line.startswith("ERROR:")]
        assert len(errors) == 1 and "Permission denied" in errors[0], api.stderr
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_store_removed_mid_load(where: Path, tmp_path: Path) -> None:
    rng = random.Random(8)
    root = where / "store"
    tree = {f"d{i % 7}/f{i}": sealed(rng, rng.randrange(1, 300_000)) for i in range(300)}
    write_tree(tmp_path / "src", tree)
    assert cli(root, "save", str(tmp_path / "src"), *KEY_FLAGS).returncode == 0
    dest = tmp_path / "dst"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "casstore",
            "--root",
            str(root),
            "--threads",
            "2",
            "load",
            str(dest),
            *KEY_FLAGS,
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 30
    while not dest.exists() and time.monotonic() < deadline:
        time.sleep(0.005)
    shutil.rmtree(root, ignore_errors=True)
    out, errs = proc.communicate(timeout=120)
    assert proc.returncode in (0, 1, 3, 4), errs
    assert "Traceback" not in errs
    assert temp_files(dest) == [] if dest.exists() else True
    written = {p: d for p, (d, _) in (read_tree(dest) if dest.exists() else {}).items()}
    assert all(data == tree[path] for path, data in written.items()), "a file has wrong bytes"
    if proc.returncode == 0:
        assert written == tree
    elif proc.returncode == 4:  # every file it did not write is reported missing, no other
        assert sorted(json.loads(out)["missing"]) == sorted(set(tree) - set(written))
    else:  # 1 or 3: the store was gone before the load could read the key
        assert errs.splitlines()[-1].startswith("error: "), errs


def test_huge_declared_sizes_and_chunk_counts(tmp_path: Path) -> None:
    """A manifest that declares a 1 TiB file of 2M chunks: refused quickly, no huge file."""
    import msgspec

    from casstore import constants
    from casstore import manifest as mf

    store = Store(tmp_path / "store")
    n = 2_000_000
    doc = msgspec.to_builtins(mf.new_manifest(KEY, []))
    doc["files"] = [
        {
            "path": "huge",
            "size": n * constants.CHUNK_MAX_SIZE,
            "mode": 0o644,
            "digest": b"\1" * 32,
            "chunks": [[b"\2" * 32, constants.CHUNK_MAX_SIZE]] * n,
        }
    ]
    name = f"{constants.MANIFESTS_DIR}/{KEY.id}/{mf.new_manifest_name(doc['created_at'])}"
    store.backend.put_if_absent(name, mf.seal(msgspec.msgpack.encode(doc)))
    started = time.monotonic()
    report = store.load(KEY, tmp_path / "dst")
    assert report.missing == ["huge"]
    assert time.monotonic() - started < 60
    assert list((tmp_path / "dst").iterdir()) == []


def test_non_utf8_path_in_manifest_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import msgspec

    from casstore import InvalidManifest, constants
    from casstore import manifest as mf
    from casstore.compile_cache import _trees
    from casstore.config import read_settings

    root, cache = tmp_path / "store", tmp_path / "d2"
    store = Store(root)
    # Under KEY, and under the key the model.py calls use for model "faults" here.
    model_key = _trees(read_settings(cache_dir=cache, root=root), "faults")[0].key
    for key in (KEY, model_key):
        body = msgspec.msgpack.encode(msgspec.to_builtins(mf.new_manifest(key, [])))
        # Splice a raw, invalid UTF-8 string into the files array.
        entry = msgspec.msgpack.encode(
            {"path": "PLACEHOLDER", "size": 0, "mode": 420, "digest": b"\0" * 32, "chunks": []}
        )
        entry = entry.replace(b"\xabPLACEHOLDER", b"\xab" + b"bad\xff\xfename\x00\x00"[:11])
        body = body.replace(b"\xa5files\x90", b"\xa5files\x91" + entry)
        name = f"{constants.MANIFESTS_DIR}/{key.id}/{mf.new_manifest_name(time.time())}"
        store.backend.put_if_absent(name, mf.seal(body))
    with pytest.raises(InvalidManifest):
        store.load(KEY, tmp_path / "dst")
    caplog.clear()
    status = load_compile_cache(cache_dir=cache, root=root, model="faults")
    assert status is OperationStatus.ERROR
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "InvalidManifest" in errors[0] and "utf-8" in errors[0], errors
    assert not cache.exists() or not any(cache.iterdir())

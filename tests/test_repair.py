"""``casstore verify --repair`` with every kind of damage at once (a flipped chunk, a
truncated chunk, a deleted chunk and a damaged manifest), on local disk and on the SeaweedFS
FUSE mount (damaged through one host, repaired through the other): what it quarantines,
what it still reports, and that the next saves heal the store."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from casstore import CacheKey, Store, audit, chunk_index, constants, packs
from casstore import manifest as mf
from tests.helpers import (
    corrupt_chunk,
    lose_chunk,
    manifest_files,
    read_tree,
    rewrite_pack_of,
    wait_until,
    write_tree,
)

REPO = Path(__file__).resolve().parent.parent
KEY = CacheKey(torch="t", arch="a", model="repair")


@pytest.fixture(params=["local", "seaweedfs"])
def hosts(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, Path]:
    """(the store root as the damaged host sees it, as the repairing host sees it): one
    local directory twice, or the two mounts of one SeaweedFS."""
    if request.param == "local":
        return tmp_path / "local" / "store", tmp_path / "local" / "store"
    shared: tuple[Path, Path] = request.getfixturevalue("shared_dirs")
    return shared[0] / "store", shared[1] / "store"


def damage_seen(store: Store) -> tuple[set[str], set[str], set[str]]:
    """(corrupt chunk keys, missing chunk digests, invalid manifest keys) as verify sees."""
    r = audit.verify(store)
    return (
        {k for k, _ in r.corrupt},
        {d for _, d in r.missing_chunks},
        {k for k, _ in r.invalid_manifests},
    )


def test_verify_repair_with_every_kind_of_damage_at_once(
    hosts: tuple[Path, Path], tmp_path: Path
) -> None:
    root, other = hosts
    rng = random.Random(7)
    tree = {f"f{i:02}.bin": rng.randbytes(rng.randrange(1000, 300_000)) for i in range(24)}
    later = {"later.bin": rng.randbytes(5000)}
    write_tree(tmp_path / "src", tree)
    write_tree(tmp_path / "src2", later)
    store = Store(root, threads=4)
    store.save(tmp_path / "src", KEY)
    store.save(tmp_path / "src2", KEY)  # a second manifest, damaged below
    view = store.files(KEY)
    flipped, truncated, deleted = (view[f"f0{i}.bin"].chunks[0].digest for i in range(3))
    corrupt_chunk(store.backend, flipped)
    rewrite_pack_of(store.backend, truncated, lambda d, b: b[:-1] + b"\0" if d == truncated else b)
    lose_chunk(store.backend, deleted)
    (damaged_pack,) = {loc.index.id for loc in chunk_index.load(store.backend).locate(flipped)}
    in_pack = len(chunk_index.read_index(store.backend, damaged_pack).chunks)
    damaged_manifest = manifest_files(root)[-1]  # the newer one: later.bin
    blob = damaged_manifest.read_bytes()
    damaged_manifest.write_bytes(blob[:40] + bytes([blob[40] ^ 0x01]) + blob[41:])
    manifest_key = damaged_manifest.relative_to(root).as_posix()
    corrupt_keys = {packs.pack_key(damaged_pack)}
    lost = {d.hex() for d in (flipped, truncated, deleted)}  # damaged chunks are missing too
    expected = (corrupt_keys, lost, {manifest_key})
    repairer = Store(other, threads=4)
    wait_until(
        lambda: damage_seen(repairer) == expected, 60, "the damage to show on the other host"
    )

    proc = subprocess.run(
        [sys.executable, "-m", "casstore", "--root", str(other), "verify", "--repair", "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 4, proc.stderr
    out = json.loads(proc.stdout)
    assert {k for k, _ in out["corrupt"]} == corrupt_keys
    assert {d for _, d in out["missing_chunks"]} == lost
    assert [k for k, _ in out["invalid_manifests"]] == [manifest_key]
    assert out["damaged_chunks"] == {damaged_pack: sorted(d.hex() for d in (flipped, truncated))}
    assert out["repaired"] == {
        "packs_quarantined": 1,
        "chunks_salvaged": in_pack - 2,  # every intact chunk of the damaged pack
        "indexes_quarantined": 0,
        "manifests_quarantined": 1,
    }

    # Damaged objects are out of every reader's way, kept in quarantine/ for inspection.
    quarantine = other / constants.QUARANTINE_DIR
    names = sorted(p.name.rsplit(".", 1)[0] for p in (quarantine / "packs").iterdir())
    assert names == [f"{damaged_pack}{constants.PACK_SUFFIX}"]
    assert len(list((quarantine / "manifests").iterdir())) == 1
    assert not (other / manifest_key).exists()
    # What is left: three chunks missing (two damaged, one lost), nothing corrupt.
    assert damage_seen(repairer) == (set(), lost, set())
    report = repairer.load(KEY, tmp_path / "partial")
    assert report.missing == ["f00.bin", "f01.bin", "f02.bin"]
    got = {p: d for p, (d, _) in read_tree(tmp_path / "partial").items()}
    assert got == {p: d for p, d in tree.items() if p not in report.missing}  # later.bin: gone

    # The next saves of replicas holding the files heal the store.
    assert repairer.save(tmp_path / "src", KEY).new_chunks == 3
    assert repairer.save(tmp_path / "src2", KEY).manifest is not None
    assert audit.verify(repairer).ok
    wait_until(lambda: audit.verify(store).ok, 60, "the healed store on the first host")
    assert store.load(KEY, tmp_path / "healed").missing == []
    assert {p: d for p, (d, _) in read_tree(tmp_path / "healed").items()} == {**tree, **later}


def test_repair_never_quarantines_a_manifest_of_a_newer_casstore(tmp_path: Path) -> None:
    """An older casstore's verify --repair must not remove what a newer one wrote (its
    chunks would then be swept)."""
    store = Store(tmp_path / "store")
    write_tree(tmp_path / "src", {"a": os.urandom(5000)})
    store.save(tmp_path / "src", KEY)
    (path,) = manifest_files(tmp_path / "store")
    body = msgspec.msgpack.decode(path.read_bytes()[len(constants.MANIFEST_MAGIC) + 32 :])
    body["compression_level"] = 3
    path.write_bytes(mf.seal(msgspec.msgpack.encode(body)))
    report = audit.verify(store)
    assert [k for k, _ in report.unsupported_manifests] == [
        str(path.relative_to(tmp_path / "store"))
    ]
    assert report.invalid_manifests == []
    assert audit.repair(store, report).manifests_quarantined == 0
    assert path.exists()

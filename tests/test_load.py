"""Load test: 16 savers and 16 loaders over both SeaweedFS mounts, with gc running."""

from __future__ import annotations

from pathlib import Path

import pytest

from casstore import CacheKey, Store
from casstore.errors import CasstoreError
from tests.helpers import stored_chunks, wait_until
from tests.load_mix import MixResult, run_mix
from tests.seaweed import wait_visible
from tests.stress_worker import seed_aged_garbage
from tests.test_gc_stress import assert_every_save_loads


def not_yet_visible(store: Store, mix: MixResult) -> list[str]:
    """Files of completed saves that ``store`` (the other mount) does not show yet: not
    listed by the key's manifests with the saved digest, or a chunk of theirs absent.
    Metadata reaches the other FUSE client asynchronously."""
    expected: dict[str, dict[str, str]] = {}
    for s in mix.saves:
        expected.setdefault(s["model"], {}).update(s["files"])
    absent: list[str] = []
    stored = stored_chunks(store.backend)
    for model, files in expected.items():
        key = CacheKey(torch="t", arch="a", model=model, extra={"tree": "inductor"})
        try:
            view = store.files(key)
        except CasstoreError:
            view = {}
        for path, digest in files.items():
            entry = view.get(path)
            shown = (
                entry is not None
                and entry.digest.hex() == digest
                and all(c.digest in stored for c in entry.chunks)
            )
            if not shown:
                absent.append(path)
    return absent


@pytest.mark.slow
def test_sixteen_savers_sixteen_loaders_two_hosts_with_gc(
    shared_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    roots = [shared_dirs[0] / "store", shared_dirs[1] / "store"]
    # An hour-old store of garbage: gc really sweeps (through host1) while savers on both
    # mounts reuse chunks among its candidates.
    garbage = seed_aged_garbage(Store(roots[0]), tmp_path / "seed", filler=200)
    wait_visible(roots[1] / "CASSTORE")
    mix = run_mix(roots, tmp_path / "work", 15.0, savers=16, loaders=16, gc_grace=20.0)
    print(
        f"\nload test: {mix.seconds:.1f}s, {len(mix.saves)} saves "
        f"({mix.total('saved_bytes') / 2**20:.1f} MiB), {mix.total('loads')} loads "
        f"({mix.total('loaded_bytes') / 2**20:.1f} MiB, {mix.total('files')} files checked), "
        f"{mix.total('misses')} misses, {mix.total('gc_runs')} gc runs deleting "
        f"{mix.total('packs_deleted')} packs ({garbage} garbage chunks), repacking "
        f"{mix.total('chunks_repacked')} chunks, "
        f"{len(mix.errors)} errors"
    )
    assert mix.errors == []
    assert mix.total("bad") == 0, "a loader restored a wrong byte"
    assert len(mix.saves) >= 16 and mix.total("loads") >= 16
    assert mix.total("packs_deleted") > 0, "gc must really sweep"
    assert mix.total("misses") == 0, mix.warnings
    other = Store(roots[1])
    wait_until(lambda: not not_yet_visible(other, mix), 60, "every save to show on host2")
    assert_every_save_loads(other, mix, tmp_path)

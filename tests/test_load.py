"""Load test: 16 savers and 16 loaders over both SeaweedFS mounts, with gc running."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from casstore import Store
from tests.load_mix import run_mix
from tests.seaweed import wait_visible
from tests.test_gc_stress import assert_every_save_loads


@pytest.mark.slow
def test_sixteen_savers_sixteen_loaders_two_hosts_with_gc(
    shared_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    roots = [shared_dirs[0] / "store", shared_dirs[1] / "store"]
    Store(roots[0])
    wait_visible(roots[1] / "CASSTORE")
    mix = run_mix(roots, tmp_path / "work", 15.0, savers=16, loaders=16, gc_grace=3600.0)
    print(
        f"\nload test: {mix.seconds:.1f}s, {len(mix.saves)} saves "
        f"({mix.total('saved_bytes') / 2**20:.1f} MiB), {mix.total('loads')} loads "
        f"({mix.total('loaded_bytes') / 2**20:.1f} MiB, {mix.total('files')} files checked), "
        f"{mix.total('misses')} misses, {mix.total('gc_runs')} gc runs, "
        f"{len(mix.errors)} errors"
    )
    assert mix.errors == []
    assert mix.total("bad") == 0, "a loader restored a wrong byte"
    assert len(mix.saves) >= 16 and mix.total("loads") >= 16
    time.sleep(2)  # let the last manifests reach host2's metadata cache
    assert_every_save_loads(Store(roots[1]), mix, tmp_path)

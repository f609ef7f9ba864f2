"""The model.py API: statuses, configuration, and real torch.compile warm starts."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from casstore import OperationStatus, Store, load_compile_cache, save_compile_cache
from casstore import config as cfg
from casstore import keys as keys_mod
from casstore.compile_cache import is_transient
from demo.replica import start_replica
from tests.helpers import lose_chunk, read_tree, stored_chunks, temp_files, write_tree


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in (
        "CASSTORE_ROOT",
        "B10FS_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
        "TRITON_CACHE_DIR",
        "CASSTORE_MODEL",
        "MAX_CACHE_SIZE_MB",
        "MAX_CONCURRENT_SAVES",
        "CASSTORE_STRICT_PATHS",
        "CASSTORE_SCOPE",
    ):
        monkeypatch.delenv(var, raising=False)
    # Each test gets its own default inductor dir (and so its own precompiled headers).
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr("tempfile.tempdir", None)


def fake_cache(root: Path, n: int = 6, size: int = 50_000) -> dict[str, bytes]:
    tree = {f"fxgraph/{i:02x}/entry{i}": os.urandom(size) for i in range(n)}
    tree["aotautograd/a/b"] = b"autograd entry"
    write_tree(root, tree)
    return tree


# --- status matrix -------------------------------------------------------------------------


def test_status_matrix_roundtrip(tmp_path: Path) -> None:
    root, a, b = tmp_path / "store", tmp_path / "A", tmp_path / "B"
    assert load_compile_cache(cache_dir=b, root=root) is OperationStatus.DOES_NOT_EXIST
    assert not root.exists()  # a load never creates the store
    root.mkdir()  # an empty volume directory, made ready by an admin
    assert load_compile_cache(cache_dir=b, root=root) is OperationStatus.DOES_NOT_EXIST
    assert save_compile_cache(cache_dir=a, root=root) is OperationStatus.SKIPPED  # no dir
    a.mkdir()
    assert save_compile_cache(cache_dir=a, root=root) is OperationStatus.SKIPPED  # empty
    tree = fake_cache(a)
    assert save_compile_cache(cache_dir=a, root=root) is OperationStatus.SUCCESS
    assert save_compile_cache(cache_dir=a, root=root) is OperationStatus.SKIPPED  # nothing new
    assert load_compile_cache(cache_dir=b, root=root) is OperationStatus.SUCCESS
    assert {p: d for p, (d, _) in read_tree(b).items()} == tree
    assert load_compile_cache(cache_dir=b, root=root) is OperationStatus.SKIPPED
    other = load_compile_cache(cache_dir=tmp_path / "C", root=root, model="other")
    assert other is OperationStatus.DOES_NOT_EXIST


def test_later_graphs_are_added_by_a_second_save(tmp_path: Path) -> None:
    root, a, b = tmp_path / "store", tmp_path / "A", tmp_path / "B"
    fake_cache(a)
    save_compile_cache(cache_dir=a, root=root)
    (a / "fxgraph" / "late").write_bytes(b"compiled after warm-up")
    assert save_compile_cache(cache_dir=a, root=root) is OperationStatus.SUCCESS
    load_compile_cache(cache_dir=b, root=root)
    assert (b / "fxgraph" / "late").read_bytes() == b"compiled after warm-up"


def test_env_configures_cache_dir_root_and_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = tmp_path / "A"
    fake_cache(a)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(a))
    monkeypatch.setenv("B10FS_CACHE_DIR", str(tmp_path / "b10"))  # alias of CASSTORE_ROOT
    monkeypatch.setenv("CASSTORE_MODEL", "flux")
    assert save_compile_cache() is OperationStatus.SUCCESS
    (key,) = [k.key for k in Store(tmp_path / "b10").keys()]
    assert key.model == "flux" and key.extra["tree"] == "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "B"))
    assert load_compile_cache() is OperationStatus.SUCCESS
    assert read_tree(tmp_path / "B") == read_tree(a)


def trees_saved(root: Path) -> dict[str, set[str]]:
    """tree name -> the paths its key lists."""
    store = Store(root)
    return {k.key.extra["tree"]: set(store.files(k.key)) for k in store.keys()}


def restored(root: Path) -> dict[str, bytes]:
    return {p: d for p, (d, _) in read_tree(root).items()}


TRITON_TREE = {
    "Q2X7RZPLKFU4/triton_poi_fused_add_0.cubin": b"\x7fELF" + bytes(range(256)) * 40,
    "Q2X7RZPLKFU4/triton_poi_fused_add_0.json": b'{"num_warps": 4}',
    "Q2X7RZPLKFU4/__grp__triton_poi_fused_add_0.json": b'{"child_paths": {}}',
}


def test_a_triton_cache_dir_apart_is_saved_and_restored_as_its_own_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, a, b = tmp_path / "store", tmp_path / "A", tmp_path / "B"
    inductor = fake_cache(a)
    write_tree(tmp_path / "triton", TRITON_TREE)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    assert cfg.read_settings(cache_dir=a).triton_cache_dir == tmp_path / "triton"
    assert save_compile_cache(cache_dir=a, root=root) is OperationStatus.SUCCESS
    assert trees_saved(root) == {"inductor": set(inductor), "triton": set(TRITON_TREE)}
    # A fresh replica whose Triton cache lives elsewhere again.
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton-b"))
    assert load_compile_cache(cache_dir=b, root=root) is OperationStatus.SUCCESS
    assert restored(b) == inductor
    assert restored(tmp_path / "triton-b") == TRITON_TREE


@pytest.mark.parametrize("where", ["inside", "same"])
def test_a_triton_cache_dir_inside_the_inductor_dir_is_not_a_tree_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    root, a, b = tmp_path / "store", tmp_path / "A", tmp_path / "B"
    inductor = fake_cache(a)
    sub = "triton/" if where == "inside" else ""
    write_tree(a, {sub + p: d for p, d in TRITON_TREE.items()})
    monkeypatch.setenv("TRITON_CACHE_DIR", str(a / sub))
    assert cfg.read_settings(cache_dir=a).triton_cache_dir is None
    assert save_compile_cache(cache_dir=a, root=root) is OperationStatus.SUCCESS
    everything = {**inductor, **{sub + p: d for p, d in TRITON_TREE.items()}}
    assert trees_saved(root) == {"inductor": set(everything)}  # saved once, with it
    monkeypatch.setenv("TRITON_CACHE_DIR", str(b / sub))
    assert load_compile_cache(cache_dir=b, root=root) is OperationStatus.SUCCESS
    assert restored(b) == everything


def test_torch_transient_files_are_not_saved(tmp_path: Path) -> None:
    a = tmp_path / "A"
    write_tree(
        a,
        {
            "fxgraph/x": b"entry",
            "fxgraph/.123.456.tmp": b"half",
            "locks/k.lock": b"",
            "fxgraph/.tmp-1234": b"ours",
        },
    )
    save_compile_cache(cache_dir=a, root=tmp_path / "store")
    load_compile_cache(cache_dir=tmp_path / "B", root=tmp_path / "store")
    assert list(read_tree(tmp_path / "B")) == ["fxgraph/x"]
    assert is_transient("a/.1.2.tmp") and is_transient("x.lock")
    assert not is_transient("fxgraph/ab.tmpl") and not is_transient("lockfile")


def test_size_cap_from_env_is_an_error_before_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_cache(tmp_path / "A", n=3, size=600_000)
    monkeypatch.setenv("MAX_CACHE_SIZE_MB", "1")
    status = save_compile_cache(cache_dir=tmp_path / "A", root=tmp_path / "store")
    assert status is OperationStatus.ERROR
    assert "MAX_CACHE_SIZE_MB" in caplog.text
    assert not list((tmp_path / "store").rglob("*.pack"))


def test_invalid_env_values_are_logged_with_fallback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MAX_CACHE_SIZE_MB", "lots")
    monkeypatch.setenv("MAX_CONCURRENT_SAVES", "999999")
    monkeypatch.setenv("CLEANUP_LOCK_TIMEOUT_SECONDS", "-5")
    s = cfg.read_settings()
    assert s.max_cache_size_mb == 1024
    assert s.max_concurrent_saves == cfg.MAX_CONCURRENT_SAVES_CAP
    assert s.lock_timeout_seconds == 30
    assert "MAX_CACHE_SIZE_MB='lots' is not an integer; using 1024" in caplog.text
    assert "MAX_CONCURRENT_SAVES=999999 exceeds the cap" in caplog.text
    assert "CLEANUP_LOCK_TIMEOUT_SECONDS=-5 is below 1" in caplog.text


def test_settings_are_read_when_called_not_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MAX_CACHE_SIZE_MB", "7")
    assert cfg.read_settings().max_cache_size_mb == 7
    monkeypatch.setenv("MAX_CACHE_SIZE_MB", "9")
    assert cfg.read_settings().max_cache_size_mb == 9


def test_strict_mode_enforces_platform_prefixes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/srv/cache")
    monkeypatch.setenv("LOCAL_WORK_DIR", "/srv/work")
    assert cfg.read_settings().cache_dir == Path("/srv/cache")  # not strict: anywhere goes
    monkeypatch.setenv("CASSTORE_STRICT_PATHS", "1")
    s = cfg.read_settings()
    assert s.cache_dir == cfg.default_inductor_cache_dir()
    assert s.local_work_dir == Path("/app")
    assert "TORCHINDUCTOR_CACHE_DIR=/srv/cache is outside the allowed prefixes" in caplog.text
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/cache/model/inductor")
    assert cfg.read_settings().cache_dir == Path("/cache/model/inductor")


def test_scopes_pick_their_volume(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cfg.read_settings(scope="deployment").scope == "deployment"
    assert cfg.read_settings(scope="model").scope == "deployment"
    assert cfg.read_settings(scope="bogus").scope == "org"
    monkeypatch.setattr(
        cfg, "SCOPE_MOUNTS", {"org": str(tmp_path / "org"), "deployment": str(tmp_path / "model")}
    )
    (tmp_path / "model").mkdir()
    assert cfg.read_settings(scope="deployment").root == tmp_path / "model" / "cas"
    assert cfg.read_settings(scope="org").root == Path.home() / ".cache" / "casstore"


def test_key_of_another_arch_is_never_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_cache(tmp_path / "A")
    save_compile_cache(cache_dir=tmp_path / "A", root=tmp_path / "store")
    monkeypatch.setattr(keys_mod, "detect_arch", lambda **_: ("x86-64-v3-00000000", {}))
    status = load_compile_cache(cache_dir=tmp_path / "B", root=tmp_path / "store")
    assert status is OperationStatus.DOES_NOT_EXIST
    assert not (tmp_path / "B").exists() or not any((tmp_path / "B").iterdir())


def one_error(caplog: pytest.LogCaptureFixture, *causes: str) -> None:
    """Since the last check, exactly one ERROR was logged, and it names every one of
    ``causes``: an ERROR for another reason (a GPU host's undetermined key, say) fails."""
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    caplog.clear()
    assert len(errors) == 1 and all(cause in errors[0] for cause in causes), errors


def test_never_raises_on_bad_roots_and_manifests(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_cache(tmp_path / "A")
    as_file = tmp_path / "file"
    as_file.write_bytes(b"not a dir")
    assert save_compile_cache(cache_dir=tmp_path / "A", root=as_file) is OperationStatus.ERROR
    one_error(caplog, "StoreUnavailable", "is not a directory")
    assert load_compile_cache(cache_dir=tmp_path / "B", root=as_file) is OperationStatus.ERROR
    one_error(caplog, "StoreUnavailable", f"no store at {as_file}")
    root = tmp_path / "store"
    assert save_compile_cache(cache_dir=tmp_path / "A", root=root) is OperationStatus.SUCCESS
    for m in root.rglob("*.manifest"):
        m.write_bytes(m.read_bytes()[:20])
    assert load_compile_cache(cache_dir=tmp_path / "B", root=root) is OperationStatus.ERROR
    one_error(caplog, "InvalidManifest", "is invalid")
    assert not (tmp_path / "B").exists() or read_tree(tmp_path / "B") == {}
    bad_type = load_compile_cache(cache_dir=tmp_path / "B", root=12345)  # type: ignore[arg-type]
    assert bad_type is OperationStatus.ERROR
    one_error(caplog, "TypeError")


@pytest.fixture
def mount_point(tmp_path: Path) -> Iterator[Path]:
    point = tmp_path / "mnt"
    point.mkdir()
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False, capture_output=True)


def _mount(args: list[str]) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


def test_full_disk_destination_is_an_error_without_partial_files(
    tmp_path: Path, mount_point: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_cache(tmp_path / "A", n=8, size=400_000)
    save_compile_cache(cache_dir=tmp_path / "A", root=tmp_path / "store")
    _mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)])
    status = load_compile_cache(cache_dir=mount_point / "cache", root=tmp_path / "store")
    assert status is OperationStatus.ERROR
    one_error(caplog, "No space left on device")
    assert temp_files(mount_point) == []
    source = {p: d for p, (d, _) in read_tree(tmp_path / "A").items()}
    for path, (data, _) in read_tree(mount_point / "cache").items():
        assert data == source[path]  # whatever was written is complete


def test_full_disk_store_is_an_error(
    tmp_path: Path, mount_point: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake_cache(tmp_path / "A", n=8, size=400_000)
    _mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)])
    status = save_compile_cache(cache_dir=tmp_path / "A", root=mount_point / "store")
    assert status is OperationStatus.ERROR
    one_error(caplog, "No space left on device")
    assert list((mount_point / "store").rglob("*.manifest")) == []


def test_read_only_store_loads_but_cannot_save(
    tmp_path: Path, mount_point: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = fake_cache(tmp_path / "A")
    save_compile_cache(cache_dir=tmp_path / "A", root=tmp_path / "store")
    _mount(["--bind", str(tmp_path / "store"), str(mount_point)])
    _mount(["-o", "remount,ro,bind", str(mount_point)])
    assert load_compile_cache(cache_dir=tmp_path / "B", root=mount_point) is (
        OperationStatus.SUCCESS
    )
    assert {p: d for p, (d, _) in read_tree(tmp_path / "B").items()} == tree
    (tmp_path / "A" / "new").write_bytes(b"new graph")
    assert save_compile_cache(cache_dir=tmp_path / "A", root=mount_point) is OperationStatus.ERROR
    one_error(caplog, "Read-only file system")


_HOLD_SLOT = """
import sys, time
from pathlib import Path
from casstore.locks import save_slot
with save_slot(Path(sys.argv[1]), 1, 0) as held:
    print(held, flush=True)
    time.sleep(30)
"""


def test_max_concurrent_saves_is_enforced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    Store(root)  # the store exists before any replica holds one of its save slots
    fake_cache(tmp_path / "A")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SLOT, str(root / "locks")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        monkeypatch.setenv("MAX_CONCURRENT_SAVES", "1")
        monkeypatch.setenv("CLEANUP_LOCK_TIMEOUT_SECONDS", "1")
        assert save_compile_cache(cache_dir=tmp_path / "A", root=root) is OperationStatus.SKIPPED
        assert "1 saves already running" in caplog.text
        monkeypatch.setenv("MAX_CONCURRENT_SAVES", "2")
        assert save_compile_cache(cache_dir=tmp_path / "A", root=root) is OperationStatus.SUCCESS
    finally:
        holder.kill()
        holder.wait()


def test_import_is_light_and_never_imports_torch() -> None:
    code = (
        "import sys\nfrom casstore import load_compile_cache, save_compile_cache, OperationStatus\n"
        "print(sorted(m for m in ('torch', 'typer', 'rich', 'blake3', 'zstandard') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- real torch.compile, one process per replica start ------------------------------------


def _replica(
    model: str, cache_dir: Path, tmpdir: Path, root: Path, *flags: str
) -> dict[str, object]:
    return start_replica(cache_dir, tmpdir, model, root, *flags)


@pytest.mark.slow
def test_real_torch_compile_warm_start_from_the_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Two models compiled cold on one 'replica', restored on a fresh one: torch hits its
    FX-graph and AOTAutograd caches, outputs match eager, and the models share chunks."""
    caplog.set_level(logging.WARNING)
    root = tmp_path / "store"
    cold = {
        m: _replica(m, tmp_path / f"A-{m}", tmp_path / "tmpA", root, "--save")
        for m in ("mlp", "conv")
    }
    for m, r in cold.items():
        assert r["save_status"] == "SUCCESS", m
        assert r["counters"] == {
            "fxgraph_cache_hit": 0,
            "fxgraph_cache_miss": 1,
            "autograd_cache_hit": 0,
            "autograd_cache_miss": 1,
        }
    for m in ("mlp", "conv"):
        # model.py's pattern: load, compile and warm up, then save whatever load returned.
        warm = _replica(m, tmp_path / f"B-{m}", tmp_path / f"tmpB-{m}", root, "--load", "--save")
        assert warm["load_status"] == "SUCCESS"
        assert warm["save_status"] == "SKIPPED", "a warm start has nothing new to upload"
        counters = warm["counters"]
        assert isinstance(counters, dict)
        assert counters["fxgraph_cache_hit"] >= 1 and counters["autograd_cache_hit"] >= 1
        assert counters["fxgraph_cache_miss"] == 0
        assert warm["matches_eager"] is True
        # The precompiled header came from the store, not from a rebuild.
        assert list((tmp_path / f"tmpB-{m}").rglob("precompiled_headers/*.gch"))

    store = Store(root)
    inductor = {k.key.model: k.key for k in store.keys() if k.key.extra.get("tree") == "inductor"}
    chunks = {
        m: {c.digest for f in store.files(k).values() for c in f.chunks}
        for m, k in inductor.items()
    }
    shared = chunks["mlp"] & chunks["conv"]
    assert shared, "identical artifacts of two models must be stored once"
    stored = stored_chunks(store.backend)
    assert shared <= stored
    pch_keys = [k for k in store.keys() if k.key.extra.get("tree") == "precompiled_headers"]
    assert len(pch_keys) == 1 and pch_keys[0].key.model == "_shared"


# --- roots and keys that must fail closed --------------------------------------------------


def test_undeterminable_gpu_arch_is_an_error_everywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A GPU is visible, nvidia-smi is missing and torch is not imported: the CPU key would
    let hosts with different GPUs share kernels, so every call returns ERROR instead."""
    from casstore.vllm import Sidecar, SidecarOptions

    root = tmp_path / "store"
    fake_cache(tmp_path / "A")
    assert save_compile_cache(cache_dir=tmp_path / "A", root=root) is OperationStatus.SUCCESS
    node = tmp_path / "nvidia0"
    node.touch()
    monkeypatch.setattr(keys_mod, "GPU_DEVICE_PATHS", (str(node),))
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.delitem(sys.modules, "torch", raising=False)

    assert load_compile_cache(cache_dir=tmp_path / "B", root=root) is OperationStatus.ERROR
    one_error(caplog, "KeyUndetermined", f"a GPU is visible ({node})")
    assert not (tmp_path / "B").exists()
    (tmp_path / "A" / "new").write_bytes(b"new graph")
    assert save_compile_cache(cache_dir=tmp_path / "A", root=root) is OperationStatus.ERROR
    one_error(caplog, "KeyUndetermined", f"a GPU is visible ({node})")
    vllm_cache = tmp_path / "vllm"
    write_tree(vllm_cache, {"torch_compile_cache/x/rank_0/model": b"graph"})
    sidecar = Sidecar(SidecarOptions(cache_root=vllm_cache, root=root, model="m"))
    assert sidecar.restore() is OperationStatus.ERROR
    assert sidecar.save() is OperationStatus.ERROR
    assert len(list(Store(root).keys())) == 1  # only the save made before the GPU appeared


@pytest.mark.parametrize("via", ["argument", "CASSTORE_ROOT", "B10FS_CACHE_DIR"])
def test_url_roots_are_errors_and_create_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, via: str
) -> None:
    """``gs://bucket/x`` is not a path (Path() would make it the local directory ``gs:``)
    nor a store casstore can reach (only ``s3://`` is)."""
    from casstore.errors import StoreUnavailable, UnsupportedRoot
    from casstore.vllm import Sidecar, SidecarOptions

    url = "gs://bucket/cas"
    monkeypatch.chdir(tmp_path)
    fake_cache(tmp_path / "A")
    root: str | None = url if via == "argument" else None
    if root is None:
        monkeypatch.setenv(via, url)
    assert save_compile_cache(cache_dir=tmp_path / "A", root=root) is OperationStatus.ERROR
    assert load_compile_cache(cache_dir=tmp_path / "B", root=root) is OperationStatus.ERROR
    sidecar = Sidecar(SidecarOptions(cache_root=tmp_path / "A", root=None))
    if root is None:
        assert sidecar.restore() is OperationStatus.ERROR
        assert sidecar.save() is OperationStatus.ERROR
    with pytest.raises(UnsupportedRoot, match="gs://bucket/cas"):
        cfg.read_settings(root=root)
    with pytest.raises(StoreUnavailable, match="gs://bucket/cas"):
        Store(url)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["A", "tmpdir"]


def test_load_over_the_size_cap_is_an_error_that_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    fake_cache(tmp_path / "A", n=3, size=600_000)
    assert save_compile_cache(cache_dir=tmp_path / "A", root=tmp_path / "store") is (
        OperationStatus.SUCCESS
    )
    monkeypatch.setenv("MAX_CACHE_SIZE_MB", "1")
    caplog.clear()
    status = load_compile_cache(cache_dir=tmp_path / "B", root=tmp_path / "store")
    assert status is OperationStatus.ERROR
    assert not (tmp_path / "B").exists()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "MAX_CACHE_SIZE_MB" in errors[0], errors


def test_partial_restore_is_healed_by_an_unconditional_save(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The documented pattern: load, warm up, then always save. A load that restored only
    some files logs a warning with counts; the save uploads what the replica compiled
    again, so the next replica gets everything; a save with nothing new is SKIPPED."""
    root, a, b, c = tmp_path / "store", tmp_path / "A", tmp_path / "B", tmp_path / "C"
    tree = fake_cache(a, n=4)
    assert save_compile_cache(cache_dir=a, root=root) is OperationStatus.SUCCESS
    store = Store(root)
    (key,) = [k.key for k in store.keys()]
    lost = "fxgraph/01/entry1"
    lose_chunk(store.backend, store.files(key)[lost].chunks[0].digest)
    caplog.clear()
    assert load_compile_cache(cache_dir=b, root=root) is OperationStatus.SUCCESS
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("restored 4 of 5 files, 1 missing" in w for w in warnings), warnings
    write_tree(b, {lost: tree[lost]})  # torch compiles the missing graph again
    # Same bytes as the saved entry: SKIPPED (nothing new to list), but the lost chunk is
    # uploaded again from them. Different bytes would be SUCCESS.
    healing = save_compile_cache(cache_dir=b, root=root)
    assert healing in (OperationStatus.SUCCESS, OperationStatus.SKIPPED)
    assert save_compile_cache(cache_dir=b, root=root) is OperationStatus.SKIPPED  # nothing new
    assert load_compile_cache(cache_dir=c, root=root) is OperationStatus.SUCCESS
    assert {p: d for p, (d, _) in read_tree(c).items()} == tree


# --- the first hour of a team -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["org/m@v1", "meta-llama/Llama-3.1-8B", "ünïcode model ✓", "x" * 300]
)
def test_model_names_as_people_write_them_save_and_load(tmp_path: Path, name: str) -> None:
    """CASSTORE_MODEL=org/m@v1 used to make every load ERROR (an invalid key), so a model.py
    that compiles only on DOES_NOT_EXIST ran eager forever."""
    root, a, b = tmp_path / "store", tmp_path / "A", tmp_path / "B"
    tree = fake_cache(a)
    assert save_compile_cache(cache_dir=a, root=root, model=name) is OperationStatus.SUCCESS
    assert load_compile_cache(cache_dir=b, root=root, model=name) is OperationStatus.SUCCESS
    assert {p: d for p, (d, _) in read_tree(b).items()} == tree
    other = load_compile_cache(cache_dir=tmp_path / "C", root=root, model=name + "2")
    assert other is OperationStatus.DOES_NOT_EXIST  # distinct names stay distinct keys


def test_a_directory_that_is_not_a_store_is_refused_by_load_and_save_alike(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Pointing CASSTORE_ROOT at someone's data must not turn it into a store on save
    while loads fail: both refuse, for the same stated reason, and nothing is written."""
    root = tmp_path / "home-dir"
    write_tree(root, {"notes.txt": b"mine", "projects/x.py": b"print()"})
    before = read_tree(root)
    a = tmp_path / "A"
    fake_cache(a)
    caplog.clear()
    assert load_compile_cache(cache_dir=tmp_path / "B", root=root) is OperationStatus.ERROR
    assert save_compile_cache(cache_dir=a, root=root) is OperationStatus.ERROR
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 2 and all("is not a casstore" in e for e in errors), errors
    assert read_tree(root) == before

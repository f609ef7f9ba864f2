"""The vLLM sidecar against a fake vLLM server process (tests/fake_vllm.py)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import pytest

from casstore import CacheKey, OperationStatus, Store
from casstore.errors import CasstoreError
from casstore.keys import detect_key
from casstore.vllm import Sidecar, SidecarOptions
from tests.fake_vllm import AOT
from tests.helpers import Lines, lose_chunk, read_tree, temp_files, wait_until, write_tree

REPO = Path(__file__).resolve().parent.parent
KEY: CacheKey = detect_key("vmodel", {"tree": "vllm"})


def start_fake(
    root: Path, ready_after: float, late_after: float, *flags: str
) -> tuple[subprocess.Popen[str], int, Lines]:
    """The fake server, its port, and its events as they come."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.fake_vllm",
            str(root),
            str(ready_after),
            str(late_after),
            *flags,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    return proc, int(first["port"]), Lines(proc.stdout)


def events(out: Lines) -> dict[str, float]:
    """The fake's events and their times, once it has exited."""
    return {e["event"]: e["t"] for e in map(json.loads, out.text().splitlines())}


def watch(store: Path, cache: Path, port: int, *args: str) -> tuple[subprocess.Popen[str], Lines]:
    """``casstore vllm watch`` as its own process, polling every 0.1 s, and its log."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "casstore",
            "--root",
            str(store),
            "vllm",
            "watch",
            "--cache-dir",
            str(cache),
            "--url",
            f"http://127.0.0.1:{port}/v1/models",
            "--poll",
            "0.1",
            "--model",
            "vmodel",
            *args,
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, Lines(proc.stderr)


def stop(*procs: subprocess.Popen[str]) -> None:
    """Kill what is still running (a test that failed early leaves nothing behind)."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def saved_paths(store_root: Path) -> set[str]:
    """The paths the key lists now (none while nothing is saved)."""
    try:
        return set(Store(store_root, create=False).files(KEY))
    except CasstoreError:
        return set()


def shared_tree(root: Path) -> dict[str, Any]:
    return {
        p: v
        for p, v in read_tree(root).items()
        if p.startswith(("torch_compile_cache/", "torch_aot_compile/")) and not p.endswith(".tmp")
    }


def test_saves_after_quiet_then_incrementally_and_exits_with_the_server(tmp_path: Path) -> None:
    cache, store_root = tmp_path / "vllm", tmp_path / "store"
    fake, port, fake_out = start_fake(cache, ready_after=1.5, late_after=4.0)
    car, car_log = watch(store_root, cache, port, "--quiet", "1", "--pid", str(fake.pid))
    late = "torch_compile_cache/1517964802/rank_0_0/inductor_cache/late_shape_64.py"
    try:
        wait_until(lambda: late in saved_paths(store_root), 60, "the late artifact's save")
        fake.send_signal(signal.SIGTERM)
        fake.wait(timeout=10)
        car.wait(timeout=30)  # the sidecar exits with the server
    finally:
        stop(car, fake)
    seen = events(fake_out)
    assert car.returncode == 0, car_log.text()
    store = Store(store_root)
    manifests = store.manifests(KEY)
    first_time, first = manifests[0].manifest.created_at, manifests[0].manifest
    # The first save waited for the half-written file to finish and the quiet period.
    assert first_time >= seen["slow_done"] + 1.0 - 0.2
    paths = {f.path for f in first.files}
    assert "torch_compile_cache/1517964802/rank_0_0/computation_graph.py" in paths
    assert f"{AOT_NEW}/rank_0_0/model" in paths  # vLLM's ahead-of-time artifact
    assert not any("late_shape" in p for p in paths)
    # A later, incremental save holds only the late artifact.
    later = [s.manifest for s in manifests[1:]]
    assert later and all(m.created_at >= seen["late_done"] for m in later)
    assert {f.path for m in later for f in m.files} == {late}
    # Only the shared tree is stored, without torch's temp files.
    assert all(p.startswith("torch_compile_cache/") for p in store.files(KEY))
    assert not any("modelinfos" in p for p in store.files(KEY))
    # A fresh replica's restore reproduces the tree byte for byte.
    fresh = tmp_path / "fresh"
    restore = subprocess.run(
        [
            sys.executable,
            "-m",
            "casstore",
            "--root",
            str(store_root),
            "vllm",
            "restore",
            "--cache-dir",
            str(fresh),
            "--model",
            "vmodel",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert restore.returncode == 0 and "SUCCESS" in restore.stderr
    assert shared_tree(fresh) == shared_tree(cache)


def test_sigterm_makes_a_final_save(tmp_path: Path) -> None:
    cache, store_root = tmp_path / "vllm", tmp_path / "store"
    fake, port, fake_out = start_fake(cache, ready_after=0.5, late_after=1.0)
    car, car_log = watch(store_root, cache, port, "--quiet", "600")
    try:
        fake_out.wait_for('"late_done"', 60)  # everything written
        car_log.wait_for("server ready", 60)  # watching; the 600 s quiet never elapses
        assert car.poll() is None
        car.send_signal(signal.SIGTERM)
        car.wait(timeout=30)
        assert car.returncode == 0, car_log.text()
    finally:
        stop(car, fake)
    saved = set(Store(store_root).files(KEY))
    assert "torch_compile_cache/1517964802/rank_0_0/inductor_cache/late_shape_64.py" in saved


def test_server_never_ready_exits_3_without_saving(tmp_path: Path) -> None:
    cache, store_root = tmp_path / "vllm", tmp_path / "store"
    fake, port, _ = start_fake(cache, 0.0, 0.0, "--never-ready")
    car, car_log = watch(store_root, cache, port, "--timeout", "1.5")
    try:
        car.wait(timeout=60)
    finally:
        stop(car, fake)
    errs = car_log.text()
    assert car.returncode == 3, errs
    assert "not ready" in errs
    assert not (store_root / "manifests").exists() or not any((store_root / "manifests").iterdir())


def test_restore_with_nothing_saved_still_exits_0(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "casstore",
            "--root",
            str(tmp_path / "none"),
            "vllm",
            "restore",
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "DOES_NOT_EXIST" in proc.stderr


# --- restore units, ahead-of-time artifacts, size cap (in-process) --------------------------

H1 = "torch_compile_cache/1517964802"
H2 = "torch_compile_cache/2718281828"
AOT_NEW = AOT  # current vLLM: inside torch_compile_cache/
AOT_OLD = "torch_aot_compile/" + "cd" * 32  # earlier releases: at the cache root


def vllm_tree(artifact_size: int = 300_000) -> dict[str, bytes]:
    """A cache root as vLLM leaves it: per-hash JIT caches whose index
    (``vllm_compile_cache.py``) names artifacts beside it, and AOT artifacts in both
    layouts vLLM has used, each with its hash-level inductor cache."""
    rng = random.Random(5)
    tree: dict[str, bytes] = {}
    for h in (H1, H2):
        tree[f"{h}/rank_0_0/backbone/vllm_compile_cache.py"] = (
            b"{(None, 0, 'inductor_standalone'): 'artifact_shape_None_subgraph_0'}"
        )
        tree[f"{h}/rank_0_0/backbone/artifact_shape_None_subgraph_0"] = rng.randbytes(artifact_size)
        tree[f"{h}/rank_0_0/inductor_cache/fx/ab/entry"] = rng.randbytes(5_000)
    for aot in (AOT_NEW, AOT_OLD):
        tree[f"{aot}/rank_0_0/model"] = rng.randbytes(artifact_size)
        tree[f"{aot}/inductor_cache/fx/cd/entry"] = rng.randbytes(5_000)
    return tree


@pytest.fixture
def saved_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, dict[str, bytes]]:
    monkeypatch.delenv("MAX_CACHE_SIZE_MB", raising=False)
    monkeypatch.delenv("CASSTORE_MODEL", raising=False)
    cache, store_root = tmp_path / "vllm", tmp_path / "store"
    tree = vllm_tree()
    write_tree(cache, {**tree, "modelinfos/m.json": b"{}"})
    car = Sidecar(SidecarOptions(cache_root=cache, root=store_root, model="vmodel"))
    assert car.save() is OperationStatus.SUCCESS
    return store_root, tree


def restore(store_root: Path, cache: Path) -> OperationStatus:
    opts = SidecarOptions(cache_root=cache, root=store_root, model="vmodel")
    return Sidecar(opts).restore()


def test_aot_artifacts_are_saved_in_both_layouts(
    tmp_path: Path, saved_vllm: tuple[Path, dict[str, bytes]]
) -> None:
    store_root, tree = saved_vllm
    assert set(Store(store_root).files(KEY)) == set(tree)  # modelinfos/ stays local
    assert restore(store_root, tmp_path / "fresh") is OperationStatus.SUCCESS
    assert {p: d for p, (d, _) in read_tree(tmp_path / "fresh").items()} == tree


def test_restore_units() -> None:
    from casstore.vllm import restore_unit

    assert restore_unit(f"{H1}/rank_0_0/backbone/vllm_compile_cache.py") == H1
    assert restore_unit(f"{AOT_NEW}/rank_1_0/model") == AOT_NEW
    assert restore_unit(f"{AOT_NEW}/inductor_cache/fx/cd/entry") == AOT_NEW
    assert restore_unit(f"{AOT_OLD}/rank_0_0/model") == AOT_OLD
    assert restore_unit("torch_compile_cache/loose_file") is None
    assert restore_unit("torch_compile_cache/torch_aot_compile/loose_file") is None


def test_restore_never_leaves_an_index_without_its_artifacts(
    tmp_path: Path, saved_vllm: tuple[Path, dict[str, bytes]]
) -> None:
    """vLLM asserts "Inductor cache lookup failed" when its index names an artifact that is
    not on disk: a hash directory with a lost chunk is not restored at all."""
    store_root, tree = saved_vllm
    store = Store(store_root)
    for path in (
        f"{H1}/rank_0_0/backbone/artifact_shape_None_subgraph_0",
        f"{AOT_NEW}/rank_0_0/model",
    ):
        lose_chunk(store.backend, store.files(KEY)[path].chunks[-1].digest)
    fresh = tmp_path / "fresh"
    assert restore(store_root, fresh) is OperationStatus.SUCCESS
    got = {p: d for p, (d, _) in read_tree(fresh).items()}
    assert got == {p: d for p, d in tree.items() if not p.startswith((H1 + "/", AOT_NEW + "/"))}
    assert temp_files(fresh) == []


def test_restore_over_the_size_cap_is_an_error_that_writes_nothing(
    tmp_path: Path,
    saved_vllm: tuple[Path, dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    store_root, tree = saved_vllm
    assert sum(map(len, tree.values())) > 2**20
    monkeypatch.setenv("MAX_CACHE_SIZE_MB", "1")
    fresh = tmp_path / "fresh"
    assert restore(store_root, fresh) is OperationStatus.ERROR
    assert not fresh.exists()
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "MAX_CACHE_SIZE_MB" in errors[0], errors


# --- the watch loop on a stepped clock: no real sleeping ------------------------------------


class SteppedSidecar(Sidecar):
    """The sidecar with its clock and waits stepped by the test: ``wait(s)`` moves time on
    by ``s`` at once and runs the actions scheduled up to then; the server answers 200
    from ``ready_at``. Each save is recorded with the time it ran and its outcome."""

    def __init__(self, options: SidecarOptions, *, ready_at: float = 0.0) -> None:
        self.now = 0.0
        self.ready_at = ready_at
        self.actions: list[tuple[float, Callable[[], object]]] = []
        self.attempts: list[tuple[float, OperationStatus]] = []
        super().__init__(options, clock=lambda: self.now, wait=self._step)

    def at(self, when: float, action: Callable[[], object]) -> None:
        self.actions.append((when, action))
        self.actions.sort(key=lambda a: a[0])

    def _step(self, seconds: float) -> bool:
        assert seconds > 0, "the watch must wait between polls"
        self.now += seconds
        assert self.now < 100_000, "the watch never stopped"
        while self.actions and self.actions[0][0] <= self.now:
            self.actions.pop(0)[1]()
        return self._stop.is_set()

    def _ready(self) -> bool:
        return self.now >= self.ready_at

    def save(self) -> OperationStatus:
        status = super().save()
        self.attempts.append((self.now, status))
        return status


JIT = "torch_compile_cache/1517964802/rank_0_0"


def stepped(tmp_path: Path, *, quiet: float = 30.0, poll: float = 2.0, **kw: Any) -> SteppedSidecar:
    opts = SidecarOptions(
        cache_root=tmp_path / "vllm",
        root=tmp_path / "store",
        model="vmodel",
        quiet=quiet,
        poll=poll,
        **kw,
    )
    return SteppedSidecar(opts)


def put(root: Path, rel: str, data: bytes) -> Callable[[], None]:
    return lambda: write_tree(root, {rel: data})


def stored(store_root: Path) -> dict[str, Any]:
    """What the key holds now: path -> whole-file digest."""
    return {p: f.digest for p, f in Store(store_root).files(KEY).items()}


def manifest_paths(store_root: Path) -> list[set[str]]:
    """The paths each of the key's manifests lists, oldest first."""
    return [{f.path for f in s.manifest.files} for s in Store(store_root).manifests(KEY)]


def digests(tree: dict[str, bytes]) -> dict[str, Any]:
    return {p: blake3.blake3(d).digest() for p, d in tree.items()}


@pytest.fixture
def _no_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("MAX_CACHE_SIZE_MB", "CASSTORE_MODEL", "CLEANUP_LOCK_TIMEOUT_SECONDS"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.usefixtures("_no_env")
def test_saves_only_after_the_quiet_period_at_poll_times(tmp_path: Path) -> None:
    car = stepped(tmp_path, quiet=30.0, poll=2.0)
    car.ready_at = 10.0
    cache = tmp_path / "vllm"
    early = {f"{JIT}/early.py": b"early kernel" * 100}
    write_tree(cache, early)
    car.at(5.0, put(cache, f"{JIT}/before_ready.py", b"compiled while starting"))
    car.at(20.0, put(cache, f"{JIT}/after_ready.py", b"compiled after ready"))
    car.at(100.0, put(cache, f"{JIT}/late_shape.py", b"compiled later"))
    car.at(200.0, car.stop)
    assert car.watch() == 0
    # Ready at 10; the last change is seen at 20; quiet 30 s later, at a poll: 50. The late
    # file is seen at 100 and saved at 130; nothing new at the stop, so no final save.
    assert car.attempts == [(50.0, OperationStatus.SUCCESS), (130.0, OperationStatus.SUCCESS)]
    assert manifest_paths(tmp_path / "store") == [
        {f"{JIT}/early.py", f"{JIT}/before_ready.py", f"{JIT}/after_ready.py"},
        {f"{JIT}/late_shape.py"},
    ]


@pytest.mark.usefixtures("_no_env")
def test_a_failed_save_is_retried_with_a_bounded_backoff(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A save that fails (here: a full store, six times running) leaves the content
    unsaved: it is tried again after 30, 60, 120, 240 s, then every 300 s (the cap),
    and saved by the first try that works."""
    import casstore.vllm as vllm_mod
    from casstore.compile_cache import save_tree as real

    failures = 6

    def flaky(*args: Any, **kwargs: Any) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(vllm_mod, "save_tree", flaky)
    car = stepped(tmp_path, quiet=30.0, poll=2.0)  # retry_max: 300 s by default
    tree = {f"{JIT}/a.py": b"kernel a" * 100, f"{JIT}/b.py": b"kernel b" * 100}
    car.at(1.0, lambda: write_tree(tmp_path / "vllm", tree))  # seen at the poll at 2 s
    car.at(2000.0, car.stop)
    assert car.watch() == 0
    error, ok = OperationStatus.ERROR, OperationStatus.SUCCESS
    assert car.attempts == [
        (32.0, error),
        (62.0, error),  # +30
        (122.0, error),  # +60
        (242.0, error),  # +120
        (482.0, error),  # +240
        (782.0, error),  # +300, the cap
        (1082.0, ok),  # +300
    ]
    assert stored(tmp_path / "store") == digests(tree)
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retries[-1].endswith("retrying in 300s"), retries


@pytest.mark.usefixtures("_no_env")
def test_content_whose_save_failed_is_saved_on_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every save in the loop fails; the server exits: the final save stores the content
    the failed saves did not."""
    import casstore.vllm as vllm_mod
    from casstore.compile_cache import save_tree as real

    broken = True

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if broken:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(vllm_mod, "save_tree", flaky)
    car = stepped(tmp_path, quiet=30.0, poll=2.0)

    def disk_freed_then_server_exits() -> None:
        nonlocal broken
        broken = False
        car.stop()

    tree = {f"{JIT}/a.py": b"kernel a" * 100}
    car.at(1.0, lambda: write_tree(tmp_path / "vllm", tree))
    car.at(100.0, disk_freed_then_server_exits)
    assert car.watch() == 0
    assert [s for _, s in car.attempts] == [OperationStatus.ERROR] * 2 + [OperationStatus.SUCCESS]
    assert car.attempts[-1][0] == 100.0  # the final save, on exit
    assert stored(tmp_path / "store") == digests(tree)


@pytest.mark.usefixtures("_no_env")
def test_a_file_changing_during_a_save_is_saved_by_a_later_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiler appends to a file while the first save reads it: the store skips it
    (changed while being read), and a later pass, once it has been quiet again, saves
    its final bytes."""
    import casstore.localfs as localfs_mod

    cache = tmp_path / "vllm"
    growing = f"{JIT}/computation_graph.py"
    tree = {f"{JIT}/early.py": b"early kernel" * 100, growing: b"graph piece\n" * 100}
    real_open = localfs_mod.open_stable
    appended: list[float] = []

    def open_while_written(f: localfs_mod.LocalFile) -> Any:
        opened = real_open(f)
        if f.rel == growing and not appended:
            with open(f.path, "ab") as fh:  # the writer goes on after the save opened it
                fh.write(b"more graph\n" * 100)
            appended.append(car.now)
        return opened

    monkeypatch.setattr(localfs_mod, "open_stable", open_while_written)
    car = stepped(tmp_path, quiet=30.0, poll=2.0)
    car.at(1.0, lambda: write_tree(cache, tree))  # seen at the poll at 2 s
    car.at(200.0, car.stop)
    assert car.watch() == 0
    assert appended == [32.0]  # during the first save
    assert manifest_paths(tmp_path / "store") == [{f"{JIT}/early.py"}, {growing}]
    final = (cache / growing).read_bytes()
    assert final == tree[growing] + b"more graph\n" * 100
    assert stored(tmp_path / "store")[growing] == blake3.blake3(final).digest()
    # Seen changed at the poll after the first save (34), saved 30 quiet seconds later.
    assert [t for t, _ in car.attempts] == [32.0, 64.0]


# --- readiness ----------------------------------------------------------------------------


class _AuthServer:
    """vLLM started with --api-key: /v1/models answers 401 without the key, /health 200."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200 if self.path == "/health" else 401)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("path", ["/health", "/v1/models"])
def test_a_server_behind_an_api_key_counts_as_ready(tmp_path: Path, path: str) -> None:
    """vLLM behind --api-key answers 401 on /v1/models: the sidecar used to wait its whole
    timeout there and never save. /health (the default) needs no key; a 401 elsewhere
    still means the server is up."""
    server = _AuthServer()
    try:
        opts = SidecarOptions(cache_root=tmp_path, url=server.base + path, timeout=5, poll=0.1)
        assert Sidecar(opts).wait_ready() is True
    finally:
        server.close()


def test_the_default_readiness_url_needs_no_api_key() -> None:
    assert SidecarOptions(cache_root=Path(".")).url.endswith("/health")

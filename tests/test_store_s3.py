"""The store on a real S3 gateway (SeaweedFS): saves, loads, dedup, damage through the S3
API, hostile manifests, and the intents that protect reused chunks from gc."""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from casstore import CacheKey, Store, audit, chunking, constants, localfs
from casstore import manifest as mf
from casstore.backends.s3 import S3Backend
from casstore.errors import StoreUnavailable
from casstore.intents import INTENTS_DIR
from tests.helpers import KEY, corrupt_chunk, lose_chunk, read_tree, wait_until, write_tree


def tree(root: Path) -> dict[str, bytes]:
    files = {f"fx/{i:03d}.py": os.urandom(3000) for i in range(40)}
    files["big.so"] = os.urandom(6 * 2**20)  # streamed: over the 4 MiB threshold
    files["empty"] = b""
    write_tree(root, files)
    return files


def test_save_and_load_through_s3(s3_url: str, tmp_path: Path) -> None:
    files = tree(tmp_path / "src")
    store = Store(s3_url)
    report = store.save(tmp_path / "src", KEY)
    assert report.manifest and report.changed_files == len(files)
    loaded = Store(s3_url, create=False).load(KEY, tmp_path / "dst")
    assert loaded.missing == [] and loaded.written == len(files)
    assert {p: d for p, (d, _) in read_tree(tmp_path / "dst").items()} == files
    # No intent is left behind, and a second save of the same tree uploads nothing.
    backend = S3Backend(s3_url)
    assert list(backend.list(f"{INTENTS_DIR}/")) == []
    again = store.save(tmp_path / "src", KEY)
    assert again.manifest is None and again.new_chunks == 0


def test_dedup_across_keys_and_verify(s3_url: str, tmp_path: Path) -> None:
    files = tree(tmp_path / "src")
    store = Store(s3_url)
    store.save(tmp_path / "src", KEY)
    other = CacheKey(torch="t", arch="a", model="other")
    assert store.save(tmp_path / "src", other).new_chunks == 0
    report = audit.verify(store)
    assert report.ok and report.manifests == 2
    assert sum(1 for _ in store.keys()) == 2 and len(files) == len(store.files(other))


def test_damage_through_the_s3_api_is_a_miss_never_wrong_bytes(s3_url: str, tmp_path: Path) -> None:
    write_tree(tmp_path / "src", {"a.py": b"a" * 5000, "b.py": b"b" * 5000})
    store = Store(s3_url)
    store.save(tmp_path / "src", KEY)
    backend = S3Backend(s3_url)
    ref_a = store.files(KEY)["a.py"].chunks[0]
    ref_b = store.files(KEY)["b.py"].chunks[0]
    # Through the S3 API: a.py's chunk rewritten with wrong bytes, b.py's lost.
    corrupt_chunk(backend, ref_a.digest)
    lose_chunk(backend, ref_b.digest)
    report = Store(s3_url, create=False).load(KEY, tmp_path / "dst")
    assert sorted(report.missing) == ["a.py", "b.py"]
    assert not (tmp_path / "dst" / "a.py").exists()
    found = audit.verify(store)
    assert len(found.corrupt) == 1 and len(found.missing_chunks) == 2  # corrupt counts too
    audit.repair(store, found)
    # The next save heals the store from its local bytes.
    store.save(tmp_path / "src", KEY)
    assert Store(s3_url, create=False).load(KEY, tmp_path / "dst2").missing == []


def test_hostile_manifests_written_through_s3_write_nothing_outside(
    s3_url: str, tmp_path: Path
) -> None:
    import msgspec

    store = Store(s3_url)
    write_tree(tmp_path / "src", {"ok.py": b"x"})
    store.save(tmp_path / "src", KEY)
    doc = msgspec.to_builtins(mf.new_manifest(KEY, []), builtin_types=(bytes,))
    doc["files"] = [
        {"path": "../escape", "size": 0, "mode": 0o644, "digest": b"\0" * 32, "chunks": []}
    ]
    name = f"{constants.MANIFESTS_DIR}/{KEY.id}/{mf.new_manifest_name(2e9)}"
    S3Backend(s3_url).put_if_absent(name, mf.seal(msgspec.msgpack.encode(doc)))
    report = Store(s3_url, create=False).load(KEY, tmp_path / "dst" / "inner")
    assert report.missing == [] and not (tmp_path / "dst" / "escape").exists()


def test_a_missing_bucket_and_a_fresh_prefix(s3_url: str) -> None:
    with pytest.raises(StoreUnavailable, match="no-such-bucket"):
        Store("s3://no-such-bucket/x")
    with pytest.raises(StoreUnavailable, match="not a casstore"):
        Store(s3_url, create=False)


def test_every_chunk_a_save_looks_for_was_announced_first(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order gc relies on: an intent listing every chunk of the tree exists before the
    save looks at what the store holds (the chunk index, a pack)."""
    files = tree(tmp_path / "src")
    store = Store(s3_url)
    backend = store.backend
    announced: set[bytes] = set()
    looks: list[tuple[str, bool]] = []  # (what, everything announced by then)
    wanted: set[bytes] = set()
    real_put, real_stat, real_list = backend.put_if_absent, backend.stat, backend.list

    def put(key: str, data: bytes) -> bool:
        if key.startswith(f"{INTENTS_DIR}/"):
            import msgspec

            announced.update(msgspec.msgpack.decode(data))
        return real_put(key, data)

    def stat(key: str):  # type: ignore[no-untyped-def]
        if key.startswith(f"{constants.PACKS_DIR}/"):
            looks.append((key, wanted <= announced))
        return real_stat(key)

    def listing(prefix: str):  # type: ignore[no-untyped-def]
        if prefix.startswith((f"{constants.INDEX_DIR}/", f"{constants.PACKS_DIR}/")):
            looks.append((prefix, wanted <= announced))
        yield from real_list(prefix)

    monkeypatch.setattr(backend, "put_if_absent", put)
    monkeypatch.setattr(backend, "stat", stat)
    monkeypatch.setattr(backend, "list", listing)
    wanted = digests_of(tmp_path / "src")
    store.save(tmp_path / "src", KEY)  # a first save: nothing to reuse
    many = {f"many/{i:04d}.py": os.urandom(1000) for i in range(600)}
    write_tree(tmp_path / "src", many)
    announced.clear()
    wanted = digests_of(tmp_path / "src")
    store.save(tmp_path / "src", KEY)  # reuses the first save's pack
    assert looks and all(ok for _, ok in looks), looks
    assert any(what.startswith(f"{constants.PACKS_DIR}/") for what, _ in looks)
    assert len(wanted) >= len(files) + len(many) - 1


def digests_of(src: Path) -> set[bytes]:
    return {c.digest for p in src.rglob("*") if p.is_file() for c in chunking.cut(p.read_bytes())}


def test_a_save_asks_about_packs_not_chunks_and_still_heals(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Hundreds of chunks in one pack: a save that reuses them asks about the pack, once;
    a chunk lost from the store is still packed again by the next save that holds it."""
    files = {f"f/{i:04d}.py": os.urandom(2000) for i in range(800)}
    write_tree(tmp_path / "src", files)
    store = Store(s3_url)
    store.save(tmp_path / "src", KEY)
    lost = store.files(KEY)["f/0007.py"].chunks[0].digest
    backend = store.backend
    lose_chunk(backend, lost)
    heads: list[str] = []
    real_stat = backend.stat

    def stat(key: str):  # type: ignore[no-untyped-def]
        heads.append(key)
        return real_stat(key)

    monkeypatch.setattr(backend, "stat", stat)
    report = store.save(tmp_path / "src", KEY)
    assert report.new_chunks == 1 and report.manifest is None  # healed, nothing new to list
    assert len([h for h in heads if h.startswith(f"{constants.PACKS_DIR}/")]) == 1
    monkeypatch.setattr(backend, "stat", real_stat)
    assert Store(s3_url, create=False).load(KEY, tmp_path / "dst").missing == []


def test_an_unchanged_resave_reads_each_file_once(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save to an object store reads the tree once to announce its chunks; a file whose
    chunks are all in the store is not read a second time (a re-save of an unchanged tree
    then costs one read of it, not two). Without the host's record of the files' states:
    with it, the re-save reads none (tests/test_statcache.py)."""
    monkeypatch.setenv("CASSTORE_STAT_CACHE", "off")
    files = tree(tmp_path / "src")
    store = Store(s3_url)
    store.save(tmp_path / "src", KEY)
    opened: Counter[str] = Counter()
    real_open = localfs.open_stable

    def counting(f: localfs.LocalFile):  # type: ignore[no-untyped-def]
        opened[f.rel] += 1
        return real_open(f)

    monkeypatch.setattr(localfs, "open_stable", counting)
    again = store.save(tmp_path / "src", KEY)
    assert again.manifest is None and again.new_chunks == 0
    assert opened == Counter(dict.fromkeys(files, 1)), opened


def test_a_file_changed_between_the_two_passes_is_saved_whole(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file rewritten after the first pass read it: the save packs what it reads then,
    its new chunks announced before they are looked for, and the key restores bytes that
    were really in the file, every chunk present."""
    src = tmp_path / "src"
    tree(src)
    store = Store(s3_url)
    store.save(src, KEY)
    write_tree(src, {"fx/001.py": os.urandom(3000), "big.so": os.urandom(5 * 2**20)})
    final = {"fx/001.py": os.urandom(3000), "big.so": os.urandom(5 * 2**20)}
    real_survey = Store._survey

    def survey_then_rewrite(self: Store, local, current, known):  # type: ignore[no-untyped-def]
        found = real_survey(self, local, current, known)
        write_tree(src, final)  # after the first pass, before the second
        return found

    monkeypatch.setattr(Store, "_survey", survey_then_rewrite)
    report = store.save(src, KEY)
    assert report.manifest is not None
    loaded = Store(s3_url, create=False).load(KEY, tmp_path / "dst")
    assert loaded.missing == []
    restored = {p: d for p, (d, _) in read_tree(tmp_path / "dst").items()}
    assert {p: restored[p] for p in final} == final
    assert audit.verify(Store(s3_url, create=False)).ok


def test_a_file_rewritten_after_the_first_pass_is_read_again(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file rewritten after the first pass read it, even when every chunk of what that
    pass read is stored, is listed as it is when the second pass gets to it."""
    src = tmp_path / "src"
    write_tree(src, {"a.py": b"A" * 5000, "b.py": b"B" * 5000})
    store = Store(s3_url)
    store.save(src, KEY)
    real_survey = Store._survey

    def survey_then_rewrite(self: Store, local, current, known):  # type: ignore[no-untyped-def]
        found = real_survey(self, local, current, known)
        write_tree(src, {"a.py": b"C" * 6000})  # what the first pass read is all stored
        return found

    monkeypatch.setattr(Store, "_survey", survey_then_rewrite)
    report = store.save(src, KEY)
    monkeypatch.setattr(Store, "_survey", real_survey)
    assert report.manifest is not None and report.changed_files == 1
    assert store.files(KEY)["a.py"].size == 6000
    Store(s3_url, create=False).load(KEY, tmp_path / "dst")
    assert (tmp_path / "dst/a.py").read_bytes() == b"C" * 6000


def test_a_large_file_unsettled_in_the_first_pass_is_announced_in_one_intent(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large file still changing while the first pass reads it is left to the second
    pass, but the chunks cut from it are announced with the rest: one intent for the save,
    not one per chunk."""
    src = tmp_path / "src"
    tree(src)
    store = Store(s3_url)
    backend = store.backend
    intents: list[str] = []
    real_put, real_unchanged = backend.put_if_absent, localfs.still_unchanged
    unsettled = iter([False])  # the first read of big.so (the first pass's) fails

    def put(key: str, data: bytes) -> bool:
        if key.startswith(f"{INTENTS_DIR}/"):
            intents.append(key)
        return real_put(key, data)

    def still_unchanged(fd: int, before: os.stat_result, bytes_read: int) -> bool:
        if before.st_size >= constants.STREAM_MIN_FILE_SIZE and not next(unsettled, True):
            return False
        return real_unchanged(fd, before, bytes_read)

    monkeypatch.setattr(backend, "put_if_absent", put)
    monkeypatch.setattr(localfs, "still_unchanged", still_unchanged)
    report = store.save(src, KEY)
    assert report.manifest is not None and "big.so" in store.files(KEY)
    assert len(intents) == 1, intents


def test_a_read_error_in_the_first_pass_leaves_the_file_to_the_second(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error while the first pass reads a large file (a network mount, a file
    replaced meanwhile) does not fail the save: the second pass reads the file again."""
    files = tree(tmp_path / "src")
    real_cut = chunking.cut_stream
    failures = iter([OSError(5, "Input/output error")])

    def cut_stream(stream):  # type: ignore[no-untyped-def]
        error = next(failures, None)
        if error is not None:
            raise error
        return real_cut(stream)

    monkeypatch.setattr(chunking, "cut_stream", cut_stream)
    store = Store(s3_url)
    report = store.save(tmp_path / "src", KEY)
    assert report.manifest is not None and report.skipped == []
    Store(s3_url, create=False).load(KEY, tmp_path / "dst")
    assert (tmp_path / "dst/big.so").read_bytes() == files["big.so"]


# --- s3:// roots wherever a root is accepted --------------------------------------------------


def run_cli(root: str, *args: str) -> subprocess.CompletedProcess[str]:
    from tests import cpu_host

    env = {k: v for k, v in os.environ.items() if k != "CASSTORE_ROOT"}
    return subprocess.run(
        [*cpu_host.cli(), *args],
        capture_output=True,
        text=True,
        env={**env, "CASSTORE_ROOT": root},
    )


def test_the_cli_on_an_s3_root(s3_url: str, tmp_path: Path) -> None:
    files = tree(tmp_path / "src")
    key_args = ["--torch", "2.13.0+cpu", "--arch", "sm_90", "--model", "s3"]
    saved = run_cli(s3_url, "save", str(tmp_path / "src"), *key_args, "--json")
    assert saved.returncode == 0, saved.stderr
    assert json.loads(saved.stdout)["saved"] is True
    loaded = run_cli(s3_url, "load", str(tmp_path / "dst"), *key_args, "--json")
    assert loaded.returncode == 0, loaded.stderr
    assert {p: d for p, (d, _) in read_tree(tmp_path / "dst").items()} == files
    (listed,) = json.loads(run_cli(s3_url, "ls", "--json").stdout)
    assert listed["files"] == len(files) and listed["loads"] == 1
    assert json.loads(run_cli(s3_url, "verify", "--json").stdout)["ok"] is True
    stats = json.loads(run_cli(s3_url, "stats", "--json").stdout)
    assert stats["keys"] == 1 and stats["usage"]["loads"]["complete"] == 1
    assert run_cli(s3_url, "show", listed["key_id"][:8]).returncode == 0
    assert json.loads(run_cli(s3_url, "du", "--json").stdout)[0]["model"] == "s3"
    planned = run_cli(s3_url, "gc", "--grace", "1h", "--dry-run", "--json")
    assert planned.returncode == 0 and json.loads(planned.stdout)["executed"] is False
    gc = run_cli(s3_url, "gc", "--grace", "1h", "-y", "--json")
    assert gc.returncode == 0 and json.loads(gc.stdout)["executed"] is True, gc.stderr
    doctor = json.loads(run_cli(s3_url, "doctor", "--json").stdout)
    assert doctor["store"] == "ok" and doctor["permissions"] == {
        "create": True,
        "renew": True,
        "delete": True,
    }
    rm = run_cli(s3_url, "rm", listed["key_id"], "-y")
    assert rm.returncode == 0 and json.loads(run_cli(s3_url, "ls", "--json").stdout) == []


def test_cli_errors_on_s3_are_one_line(s3_url: str, tmp_path: Path) -> None:
    missing = run_cli("s3://no-such-bucket/cas", "ls")
    assert missing.returncode == 1 and len(missing.stderr.strip().splitlines()) == 1
    assert "no-such-bucket" in missing.stderr
    fresh = run_cli(s3_url, "load", str(tmp_path / "d"), "--model", "x")
    assert fresh.returncode == 1 and "not a casstore" in fresh.stderr
    explained = run_cli("s3://no-such-bucket/cas", "explain", "--model", "x")
    assert explained.returncode == 1 and "no-such-bucket" in explained.stderr
    nothing_yet = run_cli(s3_url, "explain", "--model", "x", "--json")
    assert json.loads(nothing_yet.stdout)["store"] is False


def test_model_py_and_the_sidecar_on_an_s3_root(
    s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from casstore import OperationStatus, load_compile_cache, save_compile_cache
    from casstore.vllm import Sidecar, SidecarOptions

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    cache = tmp_path / "cache"
    assert load_compile_cache(cache_dir=cache, root=s3_url) is OperationStatus.DOES_NOT_EXIST
    write_tree(cache, {"fxgraph/a/entry": os.urandom(4000), "aotautograd/b": b"x"})
    assert save_compile_cache(cache_dir=cache, root=s3_url) is OperationStatus.SUCCESS
    monkeypatch.setenv("CASSTORE_ROOT", s3_url)
    assert load_compile_cache(cache_dir=tmp_path / "c2") is OperationStatus.SUCCESS
    assert read_tree(tmp_path / "c2") == read_tree(cache)
    bad = "s3://no-such-bucket/cas"
    assert load_compile_cache(cache_dir=tmp_path / "c3", root=bad) is OperationStatus.ERROR
    vcache = tmp_path / "vllm"
    write_tree(vcache, {"torch_compile_cache/1/rank_0_0/computation_graph.py": b"g"})
    assert Sidecar(SidecarOptions(cache_root=vcache, root=s3_url)).save().name == "SUCCESS"
    restored = Sidecar(SidecarOptions(cache_root=tmp_path / "v2", root=s3_url)).restore()
    assert restored is OperationStatus.SUCCESS
    unreachable = Sidecar(SidecarOptions(cache_root=tmp_path / "v3", root=bad)).restore()
    assert unreachable is OperationStatus.ERROR


@pytest.mark.slow
def test_a_server_killed_mid_save_leaves_a_store_that_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The object store dies (SIGKILL) while a save uploads: the save fails with one error
    in bounded time, never hangs; after a restart on the same data the store verifies,
    the key is either absent or whole, and the next save completes it."""
    import signal
    import sys
    import time

    from tests.seaweed import SeaweedFS, create_bucket

    files = {f"f{i:04d}.bin": os.urandom(40_000) for i in range(1500)}  # 60 MB: 4 packs
    write_tree(tmp_path / "src", files)
    server = SeaweedFS(tmp_path / "sw", s3=True)
    server.start()
    try:
        create_bucket(server.s3_endpoint, "casstore")
        env = {
            **os.environ,
            "AWS_ENDPOINT_URL": server.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_REGION": "us-east-1",
        }
        code = (
            "import sys\nfrom casstore import Store\nfrom tests.helpers import KEY\n"
            "Store(sys.argv[1]).save(sys.argv[2], KEY)\n"
        )
        saver = subprocess.Popen(
            [sys.executable, "-c", code, "s3://casstore/cas", str(tmp_path / "src")],
            env=env,
            cwd=Path(__file__).resolve().parent.parent,
            stderr=subprocess.PIPE,
            text=True,
        )
        watcher = S3Backend("s3://casstore/cas", env=env)
        wait_until(lambda: any(True for _ in watcher.list("packs/")), 120, "a first pack uploaded")
        assert saver.poll() is None, "the save ended before the server was killed"
        for proc in server.procs:
            proc.send_signal(signal.SIGKILL)
        started = time.monotonic()
        _out, err = saver.communicate(timeout=300)
        assert saver.returncode != 0 and time.monotonic() - started < 240
        assert "StoreUnavailable" in err or "cannot" in err, err[-2000:]
    finally:
        server.stop()
    restarted = SeaweedFS(tmp_path / "sw", s3=True, keep_data=True)
    restarted.start()
    try:
        for name, value in {
            "AWS_ENDPOINT_URL": restarted.s3_endpoint,
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
            "AWS_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)

        def reopened() -> bool:
            try:
                Store("s3://casstore/cas")
            except StoreUnavailable:
                return False  # the volume servers come back after the gateway
            return True

        wait_until(reopened, 90, "the restarted gateway to serve the store")
        store = Store("s3://casstore/cas")
        assert audit.verify(store).ok
        with pytest.raises(Exception, match="no saved cache"):
            store.load(KEY, tmp_path / "partial")
        store.save(tmp_path / "src", KEY)
        report = Store("s3://casstore/cas", create=False).load(KEY, tmp_path / "dst")
        assert report.missing == [] and len(read_tree(tmp_path / "dst")) == len(files)
    finally:
        restarted.stop()

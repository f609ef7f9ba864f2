"""Signed manifests and trusted keys: only artifacts from trusted writers are ever used.

Real keys (ed25519, made by `casstore keygen` or :func:`casstore.signing.generate`), real
processes for the CLI, model.py and the vLLM sidecar."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
from pathlib import Path

import msgspec
import pytest

from casstore import CacheKey, InvalidManifest, Store, constants, signing
from casstore import gc as gc_mod
from casstore import manifest as mf
from casstore.errors import InvalidKey, NotTrusted, UnsupportedManifest
from tests import cpu_host
from tests.helpers import KEY, manifest_files, pack_files, read_tree, write_tree

KEY_ARGS = ["--torch", "2.13.0+cpu", "--arch", "sm_90", "--model", "signed"]
CLI_KEY = CacheKey(torch="2.13.0+cpu", arch="sm_90", model="signed", extra={"tree": "inductor"})


def new_key(tmp_path: Path, name: str) -> tuple[Path, signing.PublicKey]:
    path = tmp_path / "keys" / name
    path.parent.mkdir(exist_ok=True)
    return path, signing.generate(path)


def trust(*keys: signing.PublicKey) -> signing.TrustedKeys:
    return signing.parse_trusted_keys(",".join(str(k) for k in keys))


def files_of(root: Path) -> dict[str, bytes]:
    return {p: data for p, (data, _mode) in read_tree(root).items()}


# --- keys and their text forms --------------------------------------------------------------


def test_generate_writes_a_private_key_readable_only_by_its_owner(tmp_path: Path) -> None:
    path, public = new_key(tmp_path, "ci.pem")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert signing.load_signing_key(path).public == public
    assert signing.parse_public_key(str(public)) == public
    assert str(public).startswith("ed25519:") and len(str(public)) == len("ed25519:") + 44
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        signing.generate(path)
    assert path.read_bytes() == before  # never replaced


@pytest.mark.parametrize(
    "text",
    ["", "ssh-ed25519 AAAA", "ed25519:", "ed25519:not base64!", "ed25519:" + "A" * 40],
)
def test_malformed_public_keys_are_refused(text: str) -> None:
    with pytest.raises(InvalidKey):
        signing.parse_public_key(text)


def test_trusted_keys_come_as_a_list_or_a_file(tmp_path: Path) -> None:
    _, a = new_key(tmp_path, "a")
    _, b = new_key(tmp_path, "b")
    listed = signing.parse_trusted_keys(f" {a}, {b} ")
    assert listed.keys == {a.raw, b.raw}
    keyfile = tmp_path / "trusted"
    keyfile.write_text(f"# CI of the team\n{a} ci-pipeline\n\n  {b}\n")
    assert signing.parse_trusted_keys(str(keyfile)).keys == {a.raw, b.raw}
    keyfile.write_text(f"{a}\nnot a key\n")
    with pytest.raises(InvalidKey, match="line 2"):
        signing.parse_trusted_keys(str(keyfile))
    keyfile.write_text("# nobody\n")
    with pytest.raises(InvalidKey, match="names no public key"):
        signing.parse_trusted_keys(str(keyfile))
    with pytest.raises(InvalidKey, match="neither"):
        signing.parse_trusted_keys(str(tmp_path / "missing"))


def test_a_private_key_file_that_is_not_one_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("hello")
    with pytest.raises(InvalidKey, match="not an unencrypted PEM private key"):
        signing.load_signing_key(bad)
    with pytest.raises(InvalidKey, match="cannot read"):
        signing.load_signing_key(tmp_path / "missing.pem")


# --- the signed manifest format ---------------------------------------------------------------


def signed_blob(tmp_path: Path) -> tuple[bytes, signing.SigningKey]:
    path, _ = new_key(tmp_path, "writer")
    key = signing.load_signing_key(path)
    entry = mf.FileEntry(
        path="a.py", size=1, mode=0o644, digest=b"\1" * 32, chunks=(mf.ChunkRef(b"\2" * 32, 1),)
    )
    return mf.encode(mf.new_manifest(KEY, [entry]), key), key


def reseal(blob: bytes, change: dict[str, object]) -> bytes:
    """The manifest with envelope fields changed and a correct outer digest, as an attacker
    who can write the store would make it."""
    body = blob[len(constants.MANIFEST_MAGIC) + constants.DIGEST_SIZE :]
    envelope = msgspec.msgpack.decode(body)
    for path, value in change.items():
        target = envelope
        *parents, last = path.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    return mf.seal(msgspec.msgpack.encode(envelope))


def test_a_signed_manifest_names_its_verified_signer(tmp_path: Path) -> None:
    blob, key = signed_blob(tmp_path)
    decoded = mf.decode_signed(blob)
    assert decoded.signer == key.public.raw
    assert decoded.manifest.files[0].path == "a.py"
    plain = mf.encode(decoded.manifest)
    assert mf.decode_signed(plain).signer is None


def test_a_reader_that_knows_no_signatures_sees_a_newer_format(tmp_path: Path) -> None:
    """Format-1 readers reject any other format, newer ones as *unsupported* (loads ignore
    them, gc keeps their chunks): never as a manifest they could use unchecked."""
    blob, _ = signed_blob(tmp_path)
    body = blob[len(constants.MANIFEST_MAGIC) + constants.DIGEST_SIZE :]
    header = msgspec.msgpack.decode(body)
    assert header["format"] == constants.SIGNED_MANIFEST_FORMAT_VERSION
    assert header["format"] > constants.MANIFEST_FORMAT_VERSION
    assert set(header) == {"format", "manifest", "signature"}  # no file list outside


def test_tampered_signatures_and_bodies_are_rejected(tmp_path: Path) -> None:
    blob, key = signed_blob(tmp_path)
    body = msgspec.msgpack.decode(blob[len(constants.MANIFEST_MAGIC) + constants.DIGEST_SIZE :])
    signature = bytearray(body["signature"]["signature"])
    signature[0] ^= 1
    document = msgspec.msgpack.decode(body["manifest"])
    document["files"][0]["mode"] = 0o4755  # setuid, say
    _, other = new_key(tmp_path, "other")
    forged = [
        reseal(blob, {"signature.signature": bytes(signature)}),
        reseal(blob, {"manifest": msgspec.msgpack.encode(document)}),
        reseal(blob, {"signature.public_key": other.raw}),  # claims another signer
        reseal(blob, {"signature.public_key": b"short"}),
    ]
    for bad in forged:
        with pytest.raises(InvalidManifest, match="signature does not verify"):
            mf.decode_signed(bad)
    with pytest.raises(UnsupportedManifest, match="does not know"):
        mf.decode_signed(reseal(blob, {"signature.algorithm": "ed448"}))
    # A signed envelope around another envelope is refused, not unwrapped twice.
    nested = mf.SignedEnvelope(
        format=2,
        manifest=body_of(blob),
        signature=mf.Signature("ed25519", key.public.raw, key.sign(body_of(blob))),
    )
    with pytest.raises(InvalidManifest, match="must wrap a format-1 document"):
        mf.decode_signed(mf.seal(msgspec.msgpack.encode(nested)))


def body_of(blob: bytes) -> bytes:
    return blob[len(constants.MANIFEST_MAGIC) + constants.DIGEST_SIZE :]


def signer_of(path: Path) -> bytes | None:
    return mf.decode_signed(path.read_bytes()).signer


# --- the store: trusted loads, signed saves ---------------------------------------------------


@pytest.fixture
def writers(tmp_path: Path) -> dict[str, signing.SigningKey]:
    return {
        name: signing.load_signing_key(new_key(tmp_path, f"{name}.pem")[0])
        for name in ("trusted", "other")
    }


def save_as(root: Path, src: Path, files: dict[str, bytes], key: signing.SigningKey | None) -> None:
    write_tree(src, files)
    Store(root, signing_key=key).save(src, KEY)


def test_a_loader_trusting_one_writer_restores_exactly_its_bytes(
    tmp_path: Path, writers: dict[str, signing.SigningKey]
) -> None:
    root = tmp_path / "store"
    first = {"fx/graph.py": b"trusted code", "kernel.so": os.urandom(70_000)}
    save_as(root, tmp_path / "a", first, writers["trusted"])
    # Later saves of the same key with other bytes: unsigned, and signed by another key.
    save_as(root, tmp_path / "b", {p: b"evil " + d for p, d in first.items()}, None)
    save_as(root, tmp_path / "c", {"fx/graph.py": b"other", "extra.py": b"x"}, writers["other"])

    trusted = Store(root, trusted=trust(writers["trusted"].public))
    trusted.load(KEY, tmp_path / "restored")
    assert files_of(tmp_path / "restored") == first
    # Without trusted keys every manifest counts and the newest wins, as always.
    Store(root).load(KEY, tmp_path / "anyone")
    assert files_of(tmp_path / "anyone")["fx/graph.py"] == b"other"


def test_untrusted_manifests_are_named_in_one_warning(
    tmp_path: Path, writers: dict[str, signing.SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    save_as(root, tmp_path / "a", {"a": b"1"}, writers["trusted"])
    save_as(root, tmp_path / "b", {"a": b"2"}, None)
    save_as(root, tmp_path / "c", {"a": b"3"}, writers["other"])
    caplog.clear()
    Store(root, trusted=trust(writers["trusted"].public)).load(KEY, tmp_path / "out")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "unsigned" in warnings[0] and str(writers["other"].public) in warnings[0]
    assert str(writers["trusted"].public) not in warnings[0]


def test_a_key_without_a_trusted_manifest_is_a_miss_that_writes_nothing(
    tmp_path: Path, writers: dict[str, signing.SigningKey]
) -> None:
    root = tmp_path / "store"
    save_as(root, tmp_path / "a", {"a.py": b"1"}, None)
    save_as(root, tmp_path / "b", {"b.py": b"2"}, writers["other"])
    loader = Store(root, trusted=trust(writers["trusted"].public))
    with pytest.raises(NotTrusted, match=r"no manifest .* is signed by a trusted key"):
        loader.load(KEY, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_signed_save_lists_files_only_others_listed_before(
    tmp_path: Path, writers: dict[str, signing.SigningKey]
) -> None:
    """A signed save skips only what its own signer already published: an unsigned save of
    the same file must not make a trusting loader miss it."""
    root = tmp_path / "store"
    tree = {"shared.py": b"same bytes", "own.py": b"mine"}
    save_as(root, tmp_path / "u", {"shared.py": b"same bytes"}, None)
    save_as(root, tmp_path / "s", tree, writers["trusted"])
    Store(root, trusted=trust(writers["trusted"].public)).load(KEY, tmp_path / "out")
    assert files_of(tmp_path / "out") == tree
    # Saving the same tree again with the same key publishes nothing.
    report = Store(root, signing_key=writers["trusted"]).save(tmp_path / "s", KEY)
    assert report.manifest is None


def test_a_manifest_with_a_bad_signature_is_invalid_for_every_reader(
    tmp_path: Path, writers: dict[str, signing.SigningKey]
) -> None:
    root = tmp_path / "store"
    save_as(root, tmp_path / "a", {"a.py": b"trusted"}, writers["trusted"])
    (path,) = manifest_files(root)
    envelope = msgspec.msgpack.decode(body_of(path.read_bytes()))
    document = msgspec.msgpack.decode(envelope["manifest"])
    document["files"][0]["mode"] = 0o777
    envelope["manifest"] = msgspec.msgpack.encode(document)
    path.write_bytes(mf.seal(msgspec.msgpack.encode(envelope)))
    for loader in (Store(root), Store(root, trusted=trust(writers["trusted"].public))):
        with pytest.raises(InvalidManifest, match="signature does not verify"):
            loader.load(KEY, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- gc never forges trust ----------------------------------------------------------------------


def three_saves(root: Path, tmp_path: Path, key: signing.SigningKey | None) -> dict[str, bytes]:
    tree: dict[str, bytes] = {}
    for i in range(3):
        tree[f"f{i}.py"] = os.urandom(100)
        save_as(root, tmp_path / f"s{i}", dict(tree), key)
    return tree


def test_gc_merges_signed_manifests_only_with_their_signers_key(
    tmp_path: Path, writers: dict[str, signing.SigningKey]
) -> None:
    root = tmp_path / "store"
    tree = three_saves(root, tmp_path, writers["trusted"])
    policy = gc_mod.Policy(grace=3600)
    # A gc without the key (or with another) leaves them: it cannot sign a merged one.
    for gc_key in (None, writers["other"]):
        store = Store(root, signing_key=gc_key)
        plan = gc_mod.plan(store, policy)
        assert not plan.compact and [k for k, _ in plan.uncompacted] == [KEY.id]
        gc_mod.execute(store, plan)
        assert len(manifest_files(root)) == 3
    store = Store(root, signing_key=writers["trusted"])
    report = gc_mod.execute(store, gc_mod.plan(store, policy))
    assert report.keys_compacted == 1
    (merged,) = manifest_files(root)
    assert mf.decode_signed(merged.read_bytes()).signer == writers["trusted"].public.raw
    Store(root, trusted=trust(writers["trusted"].public)).load(KEY, tmp_path / "out")
    assert files_of(tmp_path / "out") == tree


def test_gc_never_merges_manifests_of_several_signers(
    tmp_path: Path, writers: dict[str, signing.SigningKey]
) -> None:
    """Merged under the gc's key, the unsigned files would become trusted; merged unsigned,
    the trusted ones would lose their signature."""
    root = tmp_path / "store"
    save_as(root, tmp_path / "a", {"a.py": b"trusted"}, writers["trusted"])
    save_as(root, tmp_path / "b", {"b.py": b"anyone's"}, None)
    store = Store(root, signing_key=writers["trusted"])
    plan = gc_mod.plan(store, gc_mod.Policy(grace=3600))
    assert not plan.compact and "several signers" in dict(plan.uncompacted)[KEY.id]
    gc_mod.execute(store, plan)
    signers = {mf.decode_signed(p.read_bytes()).signer for p in manifest_files(root)}
    assert signers == {None, writers["trusted"].public.raw}
    # Decided again at execution: a plan made before the second signer appeared merges
    # nothing either.
    assert not gc_mod.compact_key(
        store, KEY.id, tuple(f"manifests/{KEY.id}/{p.name}" for p in manifest_files(root))
    )


def test_unsigned_manifests_still_merge(tmp_path: Path) -> None:
    root = tmp_path / "store"
    tree = three_saves(root, tmp_path, None)
    store = Store(root)
    assert gc_mod.execute(store, gc_mod.plan(store, gc_mod.Policy(grace=3600))).keys_compacted
    (merged,) = manifest_files(root)
    assert mf.decode_signed(merged.read_bytes()).signer is None
    Store(root).load(KEY, tmp_path / "out")
    assert files_of(tmp_path / "out") == tree


# --- the CLI, as users run it ---------------------------------------------------------------------


def cli(
    root: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CASSTORE_ROOT", "CASSTORE_SIGNING_KEY", "CASSTORE_TRUSTED_KEYS")
    }
    return subprocess.run(
        [*cpu_host.cli(), *args],
        capture_output=True,
        text=True,
        env={**base, "CASSTORE_ROOT": str(root), **(env or {})},
    )


def test_cli_keygen_save_load_ls_show_verify(tmp_path: Path) -> None:
    root = tmp_path / "store"
    keys = tmp_path / "keys"
    keys.mkdir()
    made = cli(root, "keygen", str(keys / "ci.pem"))
    assert made.returncode == 0, made.stderr
    public = made.stdout.strip()
    assert signing.parse_public_key(public)
    assert stat.S_IMODE((keys / "ci.pem").stat().st_mode) == 0o600
    again = cli(root, "keygen", str(keys / "ci.pem"))
    assert again.returncode == 1 and "never overwritten" in again.stderr
    assert cli(root, "keygen", "--public", str(keys / "ci.pem")).stdout.strip() == public
    other = cli(root, "keygen", str(keys / "other.pem")).stdout.strip()

    trusted_tree = {"fx/a.py": b"trusted", "k.so": os.urandom(40_000)}
    write_tree(tmp_path / "t", trusted_tree)
    write_tree(tmp_path / "u", {"fx/a.py": b"unsigned", "k.so": b"x"})
    write_tree(tmp_path / "o", {"fx/a.py": b"other"})
    saved = cli(root, "save", str(tmp_path / "t"), *KEY_ARGS, "--signing-key", str(keys / "ci.pem"))
    assert saved.returncode == 0 and public in saved.stdout, saved.stderr
    assert cli(root, "save", str(tmp_path / "u"), *KEY_ARGS).returncode == 0
    env_signed = {"CASSTORE_SIGNING_KEY": str(keys / "other.pem")}
    assert cli(root, "save", str(tmp_path / "o"), *KEY_ARGS, env=env_signed).returncode == 0

    # Trusted keys from the variable, as a file, and from the option.
    keyfile = tmp_path / "trusted.keys"
    keyfile.write_text(f"# CI\n{public}\n")
    by_env = cli(
        root,
        "load",
        str(tmp_path / "r1"),
        *KEY_ARGS,
        env={"CASSTORE_TRUSTED_KEYS": str(keyfile)},
    )
    assert by_env.returncode == 0, by_env.stderr
    assert files_of(tmp_path / "r1") == trusted_tree
    assert "unsigned" in by_env.stderr and other in by_env.stderr  # the one warning
    by_option = cli(root, "load", str(tmp_path / "r2"), *KEY_ARGS, "--trusted-keys", public)
    assert files_of(tmp_path / "r2") == trusted_tree, by_option.stderr

    # A trusted key that signed nothing here: a miss, exit 3, nothing written.
    _, stranger = new_key(tmp_path, "stranger.pem")
    miss = cli(root, "load", str(tmp_path / "r3"), *KEY_ARGS, "--trusted-keys", str(stranger))
    assert miss.returncode == 3 and "no manifest" in miss.stderr, miss.stderr
    assert not (tmp_path / "r3").exists()
    # Unreadable trusted keys fail closed: an error, never "trust everyone".
    broken = cli(root, "load", str(tmp_path / "r4"), *KEY_ARGS, "--trusted-keys", "ed25519:xx")
    assert broken.returncode == 1 and "not a public key" in broken.stderr
    assert not (tmp_path / "r4").exists()

    listed = json.loads(cli(root, "ls", "--json").stdout)
    assert listed[0]["signers"] == [public, "unsigned", other]
    table = cli(root, "ls").stdout
    assert signing.parse_public_key(public).short in table and "unsigned" in table
    shown = json.loads(
        cli(root, "show", CLI_KEY.id, "--json", env={"CASSTORE_TRUSTED_KEYS": public}).stdout
    )
    assert [(m["signer"], m["trusted"]) for m in shown["manifests"]] == [
        (public, True),
        (None, False),
        (other, False),
    ]

    verified = json.loads(cli(root, "verify", "--json", "--trusted-keys", public).stdout)
    assert verified["ok"] and verified["signers"] == {public: 1, "unsigned": 1, other: 1}
    assert len(verified["untrusted_manifests"]) == 2
    # Tamper with the trusted manifest's signature: verify reports it, exit 4.
    ci_raw = signing.parse_public_key(public).raw
    (trusted_manifest,) = [p for p in manifest_files(root) if signer_of(p) == ci_raw]
    envelope = msgspec.msgpack.decode(body_of(trusted_manifest.read_bytes()))
    envelope["signature"]["signature"] = bytes(64)
    trusted_manifest.write_bytes(mf.seal(msgspec.msgpack.encode(envelope)))
    damaged = cli(root, "verify")
    assert damaged.returncode == 4 and "signature does not verify" in damaged.stdout
    after = cli(root, "load", str(tmp_path / "r5"), *KEY_ARGS, "--trusted-keys", public)
    assert after.returncode == 3 and not (tmp_path / "r5").exists()


def test_cli_save_with_an_unreadable_signing_key_publishes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    write_tree(tmp_path / "src", {"a.py": b"1"})
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    proc = cli(root, "save", str(tmp_path / "src"), *KEY_ARGS, "--signing-key", str(bad))
    assert proc.returncode == 1 and "not an unencrypted PEM private key" in proc.stderr
    assert not root.exists()


# --- model.py and the vLLM sidecar, in processes of their own ---------------------------


MODEL_PY = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from casstore import load_compile_cache, save_compile_cache
call = load_compile_cache if sys.argv[1] == "load" else save_compile_cache
print(call(cache_dir=sys.argv[2], root=sys.argv[3], model="m").name)
"""


def model_py(
    what: str, cache_dir: Path, root: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("CASSTORE_SIGNING_KEY", "CASSTORE_TRUSTED_KEYS", "CASSTORE_ROOT")
    }
    base["TMPDIR"] = str(cache_dir.parent)  # precompiled headers: a tree of this test's own
    return subprocess.run(
        [*cpu_host.python(MODEL_PY), what, str(cache_dir), str(root)],
        capture_output=True,
        text=True,
        env={**base, **env},
    )


def test_model_py_signs_saves_and_loads_only_trusted_ones(tmp_path: Path) -> None:
    root = tmp_path / "store"
    ci_key, ci = new_key(tmp_path, "ci.pem")
    other_key, _ = new_key(tmp_path, "other.pem")
    trusted_tree = {"fxgraph/a/entry": os.urandom(5000), "aotautograd/b": b"trusted"}
    write_tree(tmp_path / "trusted", trusted_tree)
    write_tree(tmp_path / "unsigned", dict.fromkeys(trusted_tree, b"evil"))
    write_tree(tmp_path / "other", dict.fromkeys(trusted_tree, b"other"))
    sign = {"CASSTORE_SIGNING_KEY": str(ci_key)}
    assert model_py("save", tmp_path / "trusted", root, sign).stdout.strip() == "SUCCESS"
    assert model_py("save", tmp_path / "unsigned", root, {}).stdout.strip() == "SUCCESS"
    other_sign = {"CASSTORE_SIGNING_KEY": str(other_key)}
    assert model_py("save", tmp_path / "other", root, other_sign).stdout.strip() == "SUCCESS"

    trusting = {"CASSTORE_TRUSTED_KEYS": str(ci)}
    loaded = model_py("load", tmp_path / "restored", root, trusting)
    assert loaded.stdout.strip() == "SUCCESS", loaded.stderr
    assert files_of(tmp_path / "restored") == trusted_tree
    assert "no trusted key signed" in loaded.stderr

    _, stranger = new_key(tmp_path, "stranger.pem")
    miss = model_py("load", tmp_path / "nothing", root, {"CASSTORE_TRUSTED_KEYS": str(stranger)})
    assert miss.stdout.strip() == "DOES_NOT_EXIST", miss.stderr
    assert not (tmp_path / "nothing").exists()
    broken = model_py("load", tmp_path / "broken", root, {"CASSTORE_TRUSTED_KEYS": "ed25519:?"})
    assert broken.stdout.strip() == "ERROR" and "not a public key" in broken.stderr
    assert not (tmp_path / "broken").exists()

    # A save whose signing key cannot be read fails; it never saves unsigned instead.
    before = sorted(manifest_files(root))
    write_tree(tmp_path / "more", {"fxgraph/new": b"new"})
    failed = model_py("save", tmp_path / "more", root, {"CASSTORE_SIGNING_KEY": "/nonexistent"})
    assert failed.stdout.strip() == "ERROR" and "cannot read signing key" in failed.stderr
    assert sorted(manifest_files(root)) == before


def test_the_vllm_sidecar_honours_both_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from casstore.vllm import Sidecar, SidecarOptions

    root = tmp_path / "store"
    ci_key, ci = new_key(tmp_path, "ci.pem")
    cache = tmp_path / "vllm"
    unit = "torch_compile_cache/1234/rank_0_0"
    tree = {f"{unit}/computation_graph.py": b"graph", f"{unit}/inductor/x.py": b"kernel"}
    write_tree(cache, tree)
    monkeypatch.setenv("CASSTORE_SIGNING_KEY", str(ci_key))
    assert Sidecar(SidecarOptions(cache_root=cache, root=root)).save().name == "SUCCESS"
    (published,) = manifest_files(root)
    assert signer_of(published) == ci.raw
    # The option wins over the variable.
    _, other = new_key(tmp_path, "other.pem")
    write_tree(cache, {f"{unit}/inductor/y.py": b"more"})
    by_option = SidecarOptions(
        cache_root=cache, root=root, signing_key=str(tmp_path / "keys" / "other.pem")
    )
    assert Sidecar(by_option).save().name == "SUCCESS"
    assert {signer_of(p) for p in manifest_files(root)} == {ci.raw, other.raw}

    # Through the real CLI, with the variable: restores the trusted save...
    base = {k: v for k, v in os.environ.items() if k != "CASSTORE_ROOT"}
    restore = subprocess.run(
        [*cpu_host.cli(), "vllm", "restore", "--cache-dir", str(tmp_path / "r1")],
        capture_output=True,
        text=True,
        env={**base, "CASSTORE_ROOT": str(root), "CASSTORE_TRUSTED_KEYS": str(ci)},
    )
    assert "SUCCESS" in restore.stderr, restore.stderr
    assert files_of(tmp_path / "r1") == tree  # not y.py: another key signed it
    # ... and, trusting another key only, restores nothing.
    _, stranger = new_key(tmp_path, "stranger.pem")
    refused = subprocess.run(
        [*cpu_host.cli(), "vllm", "restore", "--cache-dir", str(tmp_path / "r2")],
        capture_output=True,
        text=True,
        env={**base, "CASSTORE_ROOT": str(root), "CASSTORE_TRUSTED_KEYS": str(stranger)},
    )
    assert "DOES_NOT_EXIST" in refused.stderr, refused.stderr
    assert "no manifest" in refused.stderr
    assert not (tmp_path / "r2").exists()


def test_doctor_reports_the_signing_key_and_trust_and_fails_on_unreadable_ones(
    tmp_path: Path,
) -> None:
    root = tmp_path / "store"
    key_path, public = new_key(tmp_path, "ci.pem")
    good = {"CASSTORE_SIGNING_KEY": str(key_path), "CASSTORE_TRUSTED_KEYS": str(public)}
    doc = json.loads(cli(root, "doctor", "--json", env=good).stdout)
    assert doc["signing_key"] == str(public) and doc["trusted_keys"] == 1
    bad = {
        "CASSTORE_SIGNING_KEY": str(tmp_path / "missing.pem"),
        "CASSTORE_TRUSTED_KEYS": "ed25519:??",
    }
    proc = cli(root, "doctor", env=bad)
    assert proc.returncode == 1
    problems = [line for line in proc.stderr.splitlines() if line.startswith("problem:")]
    assert any("CASSTORE_SIGNING_KEY" in p and "saves here fail" in p for p in problems)
    assert any("CASSTORE_TRUSTED_KEYS" in p and "loads here fail" in p for p in problems)


# --- found by review: each seen failing on the first version of signatures ------------------


@pytest.mark.parametrize("value", ["", "   "])
def test_trusted_keys_set_but_empty_fail_closed(tmp_path: Path, value: str) -> None:
    """An empty `--trusted-keys "$KEYS"` or a variable from a missing secret must not turn
    trust off: the load fails and writes nothing."""
    root = tmp_path / "store"
    write_tree(tmp_path / "src", {"a.py": b"anyone's"})
    assert cli(root, "save", str(tmp_path / "src"), *KEY_ARGS).returncode == 0
    by_env = cli(
        root, "load", str(tmp_path / "r1"), *KEY_ARGS, env={"CASSTORE_TRUSTED_KEYS": value}
    )
    assert by_env.returncode == 1 and "set but empty" in by_env.stderr, by_env.stderr
    by_option = cli(root, "load", str(tmp_path / "r2"), *KEY_ARGS, "--trusted-keys", value)
    assert by_option.returncode == 1 and "set but empty" in by_option.stderr
    loaded = model_py("load", tmp_path / "r3", root, {"CASSTORE_TRUSTED_KEYS": value})
    assert loaded.stdout.strip() == "ERROR", loaded.stderr
    assert not any((tmp_path / d).exists() for d in ("r1", "r2", "r3"))
    signed = cli(
        root, "save", str(tmp_path / "src"), *KEY_ARGS, env={"CASSTORE_SIGNING_KEY": value}
    )
    assert signed.returncode == 1 and "set but empty" in signed.stderr


def aged_save(
    root: Path, src: Path, key: CacheKey, signer: signing.SigningKey | None, at: float
) -> None:
    """A save of ``key`` that looks ``at`` seconds old to gc (manifest time and marker)."""
    write_tree(src, {"f.py": os.urandom(64)})
    store = Store(root, signing_key=signer)
    store.save(src, key)
    for path in (root / "manifests" / key.id).iterdir():
        blob = path.read_bytes()
        decoded = mf.decode_signed(blob)
        aged = msgspec.structs.replace(decoded.manifest, created_at=at)
        path.write_bytes(mf.encode(aged, signer))
    os.utime(root / Store.access_key(key.id), (at, at))


def test_writers_without_a_trusted_key_cannot_push_trusted_keys_out(
    tmp_path: Path, writers: dict[str, signing.SigningKey]
) -> None:
    """gc given the trusted keys ranks keys nobody trusted signed after every trusted one:
    a newer unsigned sibling key cannot make --keep-last or --max-size drop a trusted key,
    nor bring back a trusted key gc set aside."""
    import time

    root = tmp_path / "store"
    now = time.time()
    good = CacheKey(torch="2.13.0", arch="a", model="m", extra={"tree": "inductor"})
    evil = CacheKey(torch="2.13.0 ", arch="a", model="m", extra={"tree": "inductor"})
    aged_save(root, tmp_path / "g", good, writers["trusted"], now - 3 * 86400)
    aged_save(root, tmp_path / "e", evil, None, now + 86400)  # clock "ahead" on purpose
    trusting = Store(root, trusted=trust(writers["trusted"].public))
    room_for_one = max(p.stat().st_size for p in pack_files(root))
    for policy in (gc_mod.Policy(keep_last=1), gc_mod.Policy(max_size=room_for_one)):
        dropped = {d.state.key.torch for d in gc_mod.plan(trusting, policy).drop}
        assert "2.13.0" not in dropped, (policy, dropped)
    # Without trusted keys gc cannot tell them apart: the newest wins, as documented.
    plain = {d.state.key.torch for d in gc_mod.plan(Store(root), gc_mod.Policy(keep_last=1)).drop}
    assert plain == {"2.13.0"}
    # A trusted key set aside by retention does not come back for an unsigned save of it.
    aside = gc_mod.plan(trusting, gc_mod.Policy(max_age=86400))
    assert [d.state.key for d in aside.drop] == [good]
    gc_mod.execute(trusting, aside)
    write_tree(tmp_path / "u", {"f.py": b"unsigned"})
    Store(root).save(tmp_path / "u", good)
    later = gc_mod.plan(trusting, gc_mod.Policy(), now=time.time() + 7200)
    assert [(a.key_id, a.restore) for a in later.set_aside] == [(good.id, False)]
    assert [a.restore for a in gc_mod.plan(Store(root), gc_mod.Policy()).set_aside] == [True]


def test_show_prints_what_writers_wrote_literally(
    tmp_path: Path, writers: dict[str, signing.SigningKey]
) -> None:
    """Text from a manifest (its producer host) cannot restyle or hide show's verdict."""
    root = tmp_path / "store"
    write_tree(tmp_path / "src", {"a.py": b"x"})
    Store(root).save(tmp_path / "src", CLI_KEY)
    (path,) = manifest_files(root)
    m = mf.decode(path.read_bytes())
    fake = f"ci  {writers['trusted'].public}, trusted[conceal]"
    forged = msgspec.structs.replace(m, producer=msgspec.structs.replace(m.producer, host=fake))
    path.write_bytes(mf.encode(forged))
    env = {"CASSTORE_TRUSTED_KEYS": str(writers["trusted"].public), "FORCE_COLOR": "1"}
    shown = cli(root, "show", CLI_KEY.id, env=env)
    assert "[conceal]" in shown.stdout and "\x1b[8m" not in shown.stdout, shown.stdout
    assert "unsigned, NOT trusted" in shown.stdout


def test_a_newline_in_a_manifest_name_cannot_forge_a_log_line(
    tmp_path: Path, writers: dict[str, signing.SigningKey], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    save_as(root, tmp_path / "a", {"a.py": b"1"}, writers["trusted"])
    (path,) = manifest_files(root)
    (path.parent / "x\ncasstore: all manifests verified.manifest").write_bytes(
        mf.encode(mf.decode(path.read_bytes()))
    )
    caplog.clear()
    Store(root, trusted=trust(writers["trusted"].public)).load(KEY, tmp_path / "out")
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_compaction_refuses_when_another_signer_published_since_planning(
    tmp_path: Path, writers: dict[str, signing.SigningKey]
) -> None:
    root = tmp_path / "store"
    three_saves(root, tmp_path, writers["trusted"])
    store = Store(root, signing_key=writers["trusted"])
    plan = gc_mod.plan(store, gc_mod.Policy(grace=3600))
    assert [s.key_id for s in plan.compact] == [KEY.id]
    save_as(root, tmp_path / "late", {"late.py": b"other"}, writers["other"])
    assert gc_mod.execute(store, plan).keys_compacted == 0
    assert len(manifest_files(root)) == 4


def test_an_untrusted_save_or_a_touched_marker_cannot_reorder_trusted_keys(
    tmp_path: Path, writers: dict[str, signing.SigningKey]
) -> None:
    """With trusted keys, gc ranks by the newest *trusted* save: an unsigned manifest added
    to an old trusted key, or its access marker touched, does not make it the newest."""
    import time

    root = tmp_path / "store"
    now = time.time()
    old = CacheKey(torch="2.0", arch="a", model="m", extra={"tree": "inductor"})
    new = CacheKey(torch="2.1", arch="a", model="m", extra={"tree": "inductor"})
    aged_save(root, tmp_path / "o", old, writers["trusted"], now - 3 * 86400)
    aged_save(root, tmp_path / "n", new, writers["trusted"], now - 86400)
    write_tree(tmp_path / "u", {"evil.py": b"x"})
    Store(root).save(tmp_path / "u", old)  # unsigned, now
    os.utime(root / Store.access_key(old.id), (now, now))
    trusting = Store(root, trusted=trust(writers["trusted"].public))
    dropped = [d.state.key for d in gc_mod.plan(trusting, gc_mod.Policy(keep_last=1)).drop]
    assert dropped == [old]

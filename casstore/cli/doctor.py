"""``casstore doctor``: is the store this host would use the shared one, and usable?

It reports the root and how it was chosen, the scope, whether the root holds a store,
whether this user can create, renew and delete objects there (with a real probe file,
removed afterwards), the free space, the publish primitive the filesystem supports, the
signing key and trusted keys the environment names (unreadable ones are problems: saves
and loads fail closed on them), and the keys model.py and the vLLM sidecar would use
here, with whether each is saved (by a trusted signer, when trust is configured). It
exits 0 when nothing is wrong, else 1 with one line per problem on stderr.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import click

from casstore import config, constants, signing
from casstore.backends.fs import FileSystemBackend
from casstore.cli.common import (
    EXIT_ERROR,
    apply_globals,
    echo,
    emit_json,
    exit_with,
    global_options,
    io_threads,
    json_option,
    mib,
    nearest_existing,
    root_choice,
    say,
)
from casstore.errors import (
    CasstoreError,
    InvalidManifest,
    NotFound,
    NotTrusted,
    StoreUnavailable,
)
from casstore.keys import CacheKey
from casstore.store import Store

# Store states.
STORE_OK = "ok"
STORE_MISSING = "missing"  # no root yet: the first save creates it
STORE_EMPTY = "empty"  # an empty directory: the first save initialises it
STORE_FOREIGN = "not a store"  # a directory holding other files
STORE_UNUSABLE = "unusable"  # not a directory, another format, unreadable

_SOURCE_LABELS = {config.ROOT_ARGUMENT: "--root"}


@dataclasses.dataclass
class KeyCheck:
    user: str  # "model.py" or "vllm"
    tree: str
    key: CacheKey
    local_dir: str
    exists: bool


@dataclasses.dataclass
class Diagnosis:
    root: str
    root_source: str
    scope: str
    mount: str
    threads: int
    model: str
    store: str = STORE_UNUSABLE
    permissions: dict[str, bool | None] = dataclasses.field(
        default_factory=lambda: {"create": None, "renew": None, "delete": None}
    )
    free_bytes: int | None = None
    primitive: str | None = None
    signing_key: str | None = None  # the public key saves here sign with
    trusted_keys: int | None = None  # how many keys loads here trust (None: every manifest)
    keys: list[KeyCheck] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, object]:
        doc = dataclasses.asdict(self)
        doc["keys"] = [
            {
                "user": k.user,
                "tree": k.tree,
                "key_id": k.key.id,
                "key": k.key,
                "local_dir": k.local_dir,
                "exists": k.exists,
            }
            for k in self.keys
        ]
        return {"ok": self.ok, **doc}


def _open(found: Diagnosis, path: Path) -> Store | None:
    """The store at ``path``, or None; sets ``found.store``."""
    if not path.exists():
        found.store = STORE_MISSING
        if not path.parent.exists():
            # A save would create the whole path, on whatever disk holds its nearest
            # existing ancestor: typically the local disk under a volume not mounted.
            found.problems.append(
                f"{path.parent} does not exist: is the store's volume mounted? A save would "
                f"create {path} on the filesystem of {nearest_existing(path)}, shared with "
                "no other host"
            )
        return None
    if not path.is_dir():
        found.problems.append(f"store root {path} is not a directory")
        return None
    try:
        store = Store(path, threads=found.threads, create=False)
    except StoreUnavailable:
        try:
            entries = [p.name for p in path.iterdir() if p.name != "lost+found"]
        except OSError as listing:
            found.problems.append(f"cannot read store root {path}: {listing.strerror}")
            return None
        if entries:
            found.store = STORE_FOREIGN
            found.problems.append(
                f"{path} is not a casstore (no {constants.LAYOUT_FILE}) and holds other "
                "files; point the store root at a new or empty directory"
            )
        else:
            found.store = STORE_EMPTY
        return None
    except (CasstoreError, OSError) as e:
        found.problems.append(f"store {path} cannot be used: {e}")
        return None
    found.store = STORE_OK
    return store


def _open_object_store(found: Diagnosis, url: str) -> Store | None:
    """The store at ``url``, or None; sets ``found.store``, and probes create, renew
    (republish: object stores cannot renew in place) and delete with a real object."""
    from casstore.backends.s3 import S3Backend

    try:
        backend = S3Backend(url)
        backend.check()
    except (CasstoreError, OSError) as e:
        found.problems.append(str(e))
        return None
    store: Store | None = None
    try:
        store = Store(url, threads=found.threads, create=False)
        found.store = STORE_OK
    except StoreUnavailable:
        empty = not backend.holds_other_files()
        found.store = STORE_EMPTY if empty else STORE_FOREIGN
        if not empty:
            found.problems.append(
                f"{url} is not a casstore (no {constants.LAYOUT_FILE}) and holds other "
                "objects; point the store root at a new or empty prefix"
            )
    except (CasstoreError, OSError) as e:
        found.problems.append(f"store {url} cannot be used: {e}")
        return None
    name = f"{constants.LOCKS_DIR}/doctor-{uuid.uuid4().hex}"
    steps: tuple[tuple[str, Callable[[], object]], ...] = (
        ("create", lambda: backend.put_if_absent(name, b"")),
        ("renew", lambda: backend.republish(name, b"")),
        ("delete", lambda: backend.delete(name)),
    )
    for step, action in steps:
        try:
            action()
            found.permissions[step] = True
        except (CasstoreError, OSError) as e:
            found.permissions[step] = False
            found.problems.append(f"cannot {step} objects in {url}: {e}")
            break
    found.primitive = {
        True: "conditional put (If-None-Match)",
        False: "HEAD then PUT (the service refused If-None-Match)",
        None: None,
    }[backend.conditional_puts]
    return store


def _probe(found: Diagnosis, path: Path) -> None:
    """Create, renew and delete a probe object where the store puts its objects."""
    if found.store == STORE_MISSING:
        parent = nearest_existing(path)
        can = os.access(parent, os.W_OK | os.X_OK)
        found.permissions["create"] = can
        if not can:
            found.problems.append(
                f"cannot create the store root {path}: {parent} is not writable by this user"
            )
        return
    if found.store not in (STORE_OK, STORE_EMPTY):
        return
    backend = FileSystemBackend(path)
    # In locks/ of a store (in the root of an empty one), under a temp-file name: cleanup
    # removes it should this process die before it does.
    where = f"{constants.LOCKS_DIR}/" if found.store == STORE_OK else ""
    name = f"{where}{constants.TEMP_PREFIX}doctor-{uuid.uuid4().hex}"
    steps: tuple[tuple[str, Callable[[], bool]], ...] = (
        ("create", lambda: backend.put_if_absent(name, b"")),
        ("renew", lambda: backend.refresh(name)),
        ("delete", lambda: backend.delete(name)),
    )
    for step, action in steps:
        try:
            done = action()
        except OSError as e:
            done = False
            found.problems.append(
                f"cannot {step} objects in {path / where}: {e.strerror or e} "
                "(every writer needs the store's group and group-writable files; see "
                "docs/deploy.md)"
            )
        found.permissions[step] = done
        if step == "create":
            found.primitive = backend.primitive or None
        if not done:
            break
    if found.permissions["create"] and not found.permissions["delete"]:
        try:
            backend.delete(name)
        except OSError:
            pass


def _space(found: Diagnosis, path: Path, cap: int) -> None:
    try:
        st = os.statvfs(nearest_existing(path))
    except OSError as e:
        found.problems.append(f"cannot read the free space of {path}: {e.strerror}")
        return
    found.free_bytes = st.f_bavail * st.f_frsize
    if found.free_bytes < cap:
        found.problems.append(
            f"only {mib(found.free_bytes)} free at {path}, less than one cache "
            f"(MAX_CACHE_SIZE_MB={cap // 2**20})"
        )


def _keys(found: Diagnosis, store: Store | None, settings: config.Settings) -> None:
    from casstore import compile_cache, vllm
    from casstore.keys import detect_key

    def saved(key: CacheKey) -> bool:
        if store is None:
            return False
        try:
            return bool(store.manifests(key))
        except NotTrusted as e:
            found.problems.append(str(e))
            return False
        except NotFound:
            return False
        except InvalidManifest as e:
            found.problems.append(f"{e} (casstore verify --repair quarantines them)")
            return False

    try:
        for tree, local, key in compile_cache.planned_trees(settings, found.model):
            found.keys.append(KeyCheck("model.py", tree, key, str(local), saved(key)))
    except CasstoreError as e:
        found.problems.append(f"model.py's key cannot be determined: {e}")
    try:
        # The sidecar's key: the detected key with the tree factor "vllm" (casstore.vllm).
        key = detect_key(found.model, {"tree": "vllm"})
        cache_root = str(vllm.default_cache_root())
        found.keys.append(KeyCheck("vllm", "vllm", key, cache_root, saved(key)))
    except CasstoreError as e:
        found.problems.append(f"the vLLM sidecar's key cannot be determined: {e}")


def diagnose(model: str | None) -> Diagnosis:
    choice = root_choice(warn=False)  # reported as a problem instead
    path = choice.path
    found = Diagnosis(
        root=str(path),
        root_source=choice.source,
        scope=choice.scope,
        mount=choice.mount,
        threads=io_threads() or constants.DEFAULT_THREADS,
        model=config.model_fingerprint(model),
    )
    if choice.local_fallback:
        found.problems.append(
            f"store root {path} is the local fallback: {choice.mount} is not mounted and "
            "CASSTORE_ROOT is unset, so no other host shares this store (mount the volume "
            "or set CASSTORE_ROOT)"
        )
    settings = config.read_settings(root=path, scope=choice.scope)
    if isinstance(path, str):
        store = _open_object_store(found, path)
    else:
        store = _open(found, path)
        _probe(found, path)
        _space(found, path, settings.max_cache_size_mb * 2**20)
    trusted = _trust(found)
    if store is not None:
        store.trusted = trusted
    _keys(found, store, settings)
    return found


def _trust(found: Diagnosis) -> signing.TrustedKeys | None:
    try:
        key = signing.signing_key_from(None)
        found.signing_key = str(key.public) if key else None
    except CasstoreError as e:
        found.problems.append(f"${signing.SIGNING_KEY_VARIABLE}: {e}; saves here fail")
    try:
        trusted = signing.trusted_keys_from(None)
    except CasstoreError as e:
        found.problems.append(f"${signing.TRUSTED_KEYS_VARIABLE}: {e}; loads here fail")
        return None
    found.trusted_keys = len(trusted.keys) if trusted else None
    return trusted


@click.command()
@click.option(
    "--model",
    metavar="MODEL",
    envvar="CASSTORE_MODEL",
    show_envvar=True,
    help="Model fingerprint whose keys to check (default: $CASSTORE_MODEL or default).",
)
@json_option
@global_options
def doctor(
    model: str | None, as_json: bool, root: str | None, threads: int | None, verbose: bool
) -> None:
    """Check the store this host would use: root, access, space, keys; exit 1 on a problem."""
    apply_globals(root, threads, verbose)
    found = diagnose(model)
    if as_json:
        emit_json(found.to_json())
    else:
        _print(found)
    for problem in found.problems:
        say("problem", "red", problem)
    if not found.ok:
        exit_with(EXIT_ERROR)


def _yes(value: bool | None) -> str:
    return "?" if value is None else "yes" if value else "NO"


def _print(found: Diagnosis) -> None:
    source = _SOURCE_LABELS.get(found.root_source, found.root_source)
    perms = ", ".join(f"{step} {_yes(v)}" for step, v in found.permissions.items())
    free = mib(found.free_bytes) if found.free_bytes is not None else "?"
    echo(f"root       {found.root} (from {source})")
    echo(f"scope      {found.scope} (volume {found.mount})")
    echo(f"store      {found.store}")
    echo(f"access     {perms}")
    echo(f"free       {free}")
    echo(f"publish    {found.primitive or '?'}")
    echo(f"threads    {found.threads}")
    echo(f"signing    {found.signing_key or 'unsigned (no CASSTORE_SIGNING_KEY)'}")
    trusted = (
        f"{found.trusted_keys} keys: loads use only manifests they signed"
        if found.trusted_keys
        else "every manifest, signed or not (no CASSTORE_TRUSTED_KEYS)"
    )
    echo(f"trust      {trusted}")
    echo(f"keys of model {found.model}:")
    for k in found.keys:
        state = "saved" if k.exists else "not saved"
        echo(
            f"  {k.user:8} {k.tree:19} {k.key.id[:12]}  {state:9}  {k.key.describe()}"
            f"  <- {k.local_dir}"
        )
    count = len(found.problems)
    echo("ok" if found.ok else f"{count} problem{'s' if count > 1 else ''}")

"""Configuration read from the environment *when called*, never frozen at import.

The variables and defaults of b10-transfer are accepted with the same meaning, so a
deployment configured for it works unchanged. An invalid value never fails: it is logged
once, naming the variable and the fallback used. The one exception is a store root that is
a URL of a kind casstore does not store to (anything but ``s3://``): no fallback would
store where the operator meant, so it is an error (:class:`UnsupportedRoot`). See
docs/compile-cache.md.
"""

from __future__ import annotations

import getpass
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from casstore import constants
from casstore.errors import StoreUnavailable, UnsupportedRoot

log = logging.getLogger("casstore")

ORG_SCOPE = "org"
DEPLOYMENT_SCOPE = "deployment"
SCOPE_MOUNTS = {ORG_SCOPE: "/cache/org", DEPLOYMENT_SCOPE: "/cache/model"}

# b10-transfer's platform rules, enforced only in strict mode (CASSTORE_STRICT_PATHS=1):
# elsewhere they would stop casstore working with perfectly good directories.
STRICT_CACHE_DIR_PREFIXES = ("/tmp/", "/cache/", "~/.cache")
STRICT_WORK_DIR_PREFIXES = ("/app/", "/tmp/", "/cache/")


# A URL scheme (s3://, gs://, file://…). Path() collapses "//", so "s3://bucket/x" would
# silently become a local directory "s3:" under the working directory.
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


#: A store root: a directory, or an ``s3://BUCKET/PREFIX`` URL (kept as a string).
StoreRoot = Path | str


def is_s3_url(text: str) -> bool:
    """Whether a store root names an object store (an ``s3://`` URL)."""
    return text.startswith(constants.S3_SCHEME)


def check_root(raw: str | os.PathLike[str], variable: str | None = None) -> None:
    """Raise :class:`UnsupportedRoot` when ``raw`` (read from ``variable``, if named) is a
    URL casstore cannot store to (anything but a well-formed ``s3://BUCKET[/PREFIX]``).
    Call it on the raw value, before it becomes a Path."""
    text = os.fspath(raw)
    if not (isinstance(text, str) and _URL_RE.match(text)):
        return
    from casstore.backends.s3 import parse_url  # only for a URL: most roots are paths

    source = f" (from ${variable})" if variable else ""
    if not is_s3_url(text):
        raise UnsupportedRoot(
            f"store root {text}{source} is a URL casstore cannot store to; give a "
            "filesystem path or an s3://BUCKET/PREFIX URL (any S3-compatible service)"
        )
    try:
        parse_url(text)
    except StoreUnavailable as e:
        raise UnsupportedRoot(f"store root {text}{source}: {e}") from None


def root_path(raw: str | os.PathLike[str], variable: str | None = None) -> StoreRoot:
    """``raw`` as a store root: a path (``~`` expanded), or an ``s3://`` URL as it is;
    another URL is an error."""
    check_root(raw, variable)
    text = os.fspath(raw)
    if isinstance(text, str) and _URL_RE.match(text):
        return text.rstrip("/")
    return Path(raw).expanduser()


# Where a store root came from (:class:`RootChoice`).
ROOT_ARGUMENT = "argument"  # root= / --root
ROOT_SCOPE_VOLUME = "scope volume"  # /cache/org/cas, /cache/model/cas
ROOT_LOCAL_FALLBACK = "local fallback"  # ~/.cache/casstore: shared with no other host


@dataclass(frozen=True)
class RootChoice:
    """A store root and where it came from: ``argument``, ``CASSTORE_ROOT``,
    ``B10FS_CACHE_DIR``, ``scope volume`` or ``local fallback``."""

    path: StoreRoot
    source: str
    scope: str
    mount: str  # the scope's volume, mounted or not

    @property
    def local_fallback(self) -> bool:
        return self.source == ROOT_LOCAL_FALLBACK


_fallback_warned = False


def choose_root(
    root: str | os.PathLike[str] | None = None, scope: str | None = None, *, warn: bool = True
) -> RootChoice:
    """The store root: ``root``, else ``$CASSTORE_ROOT`` (or ``$B10FS_CACHE_DIR``), else the
    scope's volume, else a per-user cache.

    ``/cache/org/cas`` is used when ``/cache/org`` exists (``/cache/model/cas`` for the
    deployment scope); otherwise ``~/.cache/casstore``, so the tool works on a laptop. That
    store is shared with no other host, so choosing it is logged as a WARNING, once per
    process (``warn=False``: not logged, for a caller that reports it itself). A URL is an
    error (:class:`UnsupportedRoot`).
    """
    global _fallback_warned
    scope = read_scope(scope)
    mount = SCOPE_MOUNTS.get(scope, SCOPE_MOUNTS[ORG_SCOPE])
    if root is not None:
        return RootChoice(root_path(root), ROOT_ARGUMENT, scope, mount)
    for var in ("CASSTORE_ROOT", "B10FS_CACHE_DIR"):
        env = os.environ.get(var)
        if env:
            return RootChoice(root_path(env, var), var, scope, mount)
    if Path(mount).is_dir():
        return RootChoice(Path(mount) / "cas", ROOT_SCOPE_VOLUME, scope, mount)
    fallback = Path.home() / ".cache" / "casstore"
    if warn and not _fallback_warned:
        _fallback_warned = True
        log.warning(
            "%s is not mounted and CASSTORE_ROOT is unset: using the local store %s, which "
            "no other host shares (mount the volume or set CASSTORE_ROOT; `casstore doctor` "
            "checks the set-up)",
            mount,
            fallback,
        )
    return RootChoice(fallback, ROOT_LOCAL_FALLBACK, scope, mount)


def default_root(scope: str = ORG_SCOPE) -> StoreRoot:
    """The store root :func:`choose_root` picks when no root is given."""
    return choose_root(scope=scope).path


def read_scope(scope: str | None = None) -> str:
    """``scope``, else ``$CASSTORE_SCOPE``, else ``org``; ``model`` is the deployment scope.
    An unknown scope is logged and replaced by ``org``."""
    scope = (scope or os.environ.get("CASSTORE_SCOPE") or ORG_SCOPE).lower()
    if scope == "model":  # b10cache calls the deployment scope /cache/model
        scope = DEPLOYMENT_SCOPE
    if scope not in SCOPE_MOUNTS:
        log.warning("scope %r is not one of %s; using %s", scope, sorted(SCOPE_MOUNTS), ORG_SCOPE)
        scope = ORG_SCOPE
    return scope


def default_inductor_cache_dir() -> Path:
    """Where torch puts its inductor cache by default, computed as torch does
    (``torch._inductor.runtime.cache_dir_utils.default_cache_dir``) without importing it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid_{os.getuid()}"
    user = re.sub(r'[\\/:*?"<>|]', "_", user)
    return Path(tempfile.gettempdir()) / f"torchinductor_{user}"


def _env_int(name: str, default: int, low: int, cap: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        log.warning("%s=%r is not an integer; using %d", name, raw, default)
        return default
    if value < low:
        log.warning("%s=%d is below %d; using %d", name, value, low, default)
        return default
    if value > cap:
        log.warning("%s=%d exceeds the cap %d; using %d", name, value, cap, cap)
        return cap
    return value


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    log.warning("%s=%r is not a boolean; using %s", name, raw, int(default))
    return default


def _strict_ok(name: str, path: Path, prefixes: tuple[str, ...]) -> bool:
    text = os.fspath(path)
    allowed = [os.path.expanduser(p) for p in prefixes]
    if any(text == a.rstrip("/") or text.startswith(a.rstrip("/") + "/") for a in allowed):
        return True
    log.warning(
        "%s=%s is outside the allowed prefixes %s (strict mode)", name, text, ", ".join(prefixes)
    )
    return False


# Caps: the ceiling a variable may be raised to, as b10-transfer caps its knobs.
MAX_CACHE_SIZE_CAP_MB = 100 * 1024
MAX_CONCURRENT_SAVES_CAP = 1000
LOCK_TIMEOUT_CAP_SECONDS = 3600
INCOMPLETE_TIMEOUT_CAP_SECONDS = 24 * 3600


@dataclass(frozen=True)
class Settings:
    root: StoreRoot
    cache_dir: Path
    triton_cache_dir: Path | None  # only when set apart from the inductor cache dir
    local_work_dir: Path
    scope: str
    max_cache_size_mb: int
    max_concurrent_saves: int
    lock_timeout_seconds: int
    incomplete_timeout_seconds: int
    precompiled_headers: bool
    strict_paths: bool


def read_settings(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    scope: str | None = None,
) -> Settings:
    """The compile-cache settings, from arguments first, then the environment."""
    scope = read_scope(scope)
    strict = _env_bool("CASSTORE_STRICT_PATHS", False)

    default_cache = default_inductor_cache_dir()
    if cache_dir is not None:
        cache = Path(cache_dir).expanduser()
    else:
        env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        cache = Path(env).expanduser() if env else default_cache
    if strict and not _strict_ok("TORCHINDUCTOR_CACHE_DIR", cache, STRICT_CACHE_DIR_PREFIXES):
        log.warning("using the default %s instead", default_cache)
        cache = default_cache

    triton_env = os.environ.get("TRITON_CACHE_DIR")
    triton = Path(triton_env).expanduser() if triton_env else None
    if triton is not None and (triton == cache or cache in triton.parents):
        triton = None  # inside the inductor cache: saved with it

    work = Path(os.environ.get("LOCAL_WORK_DIR") or "/app")
    if strict and not _strict_ok("LOCAL_WORK_DIR", work, STRICT_WORK_DIR_PREFIXES):
        work = Path("/app")

    return Settings(
        root=root_path(root) if root is not None else default_root(scope),
        cache_dir=cache,
        triton_cache_dir=triton,
        local_work_dir=work,
        scope=scope,
        max_cache_size_mb=_env_int("MAX_CACHE_SIZE_MB", 1024, 1, MAX_CACHE_SIZE_CAP_MB),
        max_concurrent_saves=_env_int("MAX_CONCURRENT_SAVES", 50, 1, MAX_CONCURRENT_SAVES_CAP),
        lock_timeout_seconds=_env_int(
            "CLEANUP_LOCK_TIMEOUT_SECONDS", 30, 1, LOCK_TIMEOUT_CAP_SECONDS
        ),
        incomplete_timeout_seconds=_env_int(
            "CLEANUP_INCOMPLETE_TIMEOUT_SECONDS", 60, 1, INCOMPLETE_TIMEOUT_CAP_SECONDS
        ),
        precompiled_headers=_env_bool("CASSTORE_PRECOMPILED_HEADERS", True),
        strict_paths=strict,
    )


def model_fingerprint(model: str | None) -> str:
    """``model=``, else ``$CASSTORE_MODEL``, else ``default``; any name people write is
    accepted (see :func:`casstore.keys.model_label`)."""
    from casstore.keys import model_label

    return model_label(model or os.environ.get("CASSTORE_MODEL") or "default")


def threads() -> int | None:
    """``$CASSTORE_THREADS``; None when unset (each store then picks its default: more
    for an object store than for a filesystem)."""
    if not (os.environ.get("CASSTORE_THREADS") or "").strip():
        return None
    return _env_int("CASSTORE_THREADS", constants.DEFAULT_THREADS, 1, 256)


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d``, ``2w`` → seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a duration (e.g. 90s, 15m, 12h, 30d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_size(text: str) -> int:
    """``1000``, ``500M``, ``10G``, ``1.5T`` (binary units, optional ``iB``/``B``) → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a size (e.g. 500M, 10G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def index_cache_dir() -> Path | None:
    """Where this host keeps the pack indexes it has read (casstore/chunk_index.py):
    ``$CASSTORE_INDEX_CACHE``, else ``~/.cache/casstore/index``; ``off`` keeps none (each
    save then reads every index object of the store)."""
    return _host_cache("CASSTORE_INDEX_CACHE", "index")


def dictionaries_enabled() -> bool:
    """Whether saves compress blocks against chunks the store holds (casstore/
    dictionaries.py): ``$CASSTORE_DICTIONARIES``, on by default. Off, a save stores every
    block plain (loads of blocks other saves compressed so still rebuild their
    dictionaries): for stores where a restore's extra read of up to 4 MiB costs more than
    the bytes it saves."""
    return _env_bool("CASSTORE_DICTIONARIES", True)


def stat_cache_dir() -> Path | None:
    """Where this host records the state of the files it saved or restored, to skip reading
    (or hashing) unchanged ones next time (casstore/statcache.py): ``$CASSTORE_STAT_CACHE``,
    else ``~/.cache/casstore/stat``; ``off`` keeps none (every save reads every file)."""
    return _host_cache("CASSTORE_STAT_CACHE", "stat")


def _host_cache(variable: str, name: str) -> Path | None:
    """``$variable``, else ``~/.cache/casstore/<name>``; None for ``off`` (or no home)."""
    value = os.environ.get(variable, "").strip()
    if value.lower() in ("off", "0", "none"):
        return None
    if value:
        return Path(value).expanduser()
    try:
        return Path.home() / ".cache" / "casstore" / name
    except RuntimeError:  # no home directory
        return None

"""``load_compile_cache()`` / ``save_compile_cache()`` for model.py: drop-in for
b10-transfer's calls of the same names.

They never raise: every failure is logged once with its cause and returned as
``OperationStatus.ERROR``. They import nothing heavy at module level (no torch, no CLI
libraries); the store is imported when first called, so even a broken install returns
ERROR instead of failing model.py's import.

What is saved, as separate trees under keys that differ only in ``extra["tree"]``:

* ``inductor``: the inductor cache dir (``TORCHINDUCTOR_CACHE_DIR``), Triton's cache
  included when it lives inside, minus lock and temp files;
* ``triton``: ``TRITON_CACHE_DIR`` when it is set apart from the inductor cache dir;
* ``precompiled_headers`` (CPU only, model-independent key): inductor keeps its ~150 MB
  precompiled header in the *default* cache dir whatever ``TORCHINDUCTOR_CACHE_DIR`` says,
  and rebuilds it even on a warm cache. Shipping it under one key shared by every model
  makes warm starts fast; the store keeps one copy.
"""

from __future__ import annotations

import enum
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from casstore.config import Settings, StoreRoot
    from casstore.keys import CacheKey
    from casstore.store import LoadReport, SaveReport, Store

log = logging.getLogger("casstore")

SHARED_MODEL = "_shared"  # model fingerprint of trees that do not depend on the model


class OperationStatus(enum.Enum):
    """Outcome of a compile-cache call, as in b10-transfer."""

    SUCCESS = "success"
    SKIPPED = "skipped"
    ERROR = "error"
    DOES_NOT_EXIST = "does_not_exist"

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class _Tree:
    name: str
    path: Path
    key: CacheKey


# torch writes ``.<pid>.<thread>.tmp`` then renames; FileLock leaves ``*.lock`` files.
_TRANSIENT = re.compile(r"(^|/)\.[^/]*\.tmp$|\.lock$|(^|/)\.tmp-[^/]*$")


def is_transient(rel: str) -> bool:
    return _TRANSIENT.search(rel) is not None


def _trees(settings: Settings, model: str) -> list[_Tree]:
    import msgspec

    from casstore.config import default_inductor_cache_dir
    from casstore.keys import detect_key

    # Detect the environment once (on a GPU host without torch imported this runs
    # nvidia-smi); the trees' keys differ only in the tree factor and the model.
    base = detect_key(model)

    def key(tree: str, model_name: str = model) -> CacheKey:
        return msgspec.structs.replace(base, model=model_name, extra={**base.extra, "tree": tree})

    trees = [_Tree("inductor", settings.cache_dir, key("inductor"))]
    if settings.triton_cache_dir is not None:
        trees.append(_Tree("triton", settings.triton_cache_dir, key("triton")))
    pch = default_inductor_cache_dir() / "precompiled_headers"
    inside = settings.cache_dir == pch.parent or settings.cache_dir in pch.parents
    if settings.precompiled_headers and not inside:
        pch_key = key("precompiled_headers", SHARED_MODEL)
        if not pch_key.arch.startswith("sm_"):  # CPU builds only
            trees.append(_Tree("precompiled_headers", pch, pch_key))
    return trees


def planned_trees(settings: Settings, model: str) -> list[tuple[str, Path, CacheKey]]:
    """``(tree, local directory, key)`` of every tree :func:`load_compile_cache` and
    :func:`save_compile_cache` use with ``settings`` for ``model`` (a fingerprint, as
    :func:`casstore.config.model_fingerprint` gives), main tree first. Detects the key as
    they do: raises :class:`~casstore.errors.KeyUndetermined` where they would fail."""
    return [(t.name, t.path, t.key) for t in _trees(settings, model)]


def open_store(
    settings: Settings,
    *,
    create: bool,
    signing_key: str | None = None,
    trusted_keys: str | None = None,
    for_save: bool = False,
) -> Store:
    """The store the settings name, with the signing key (``signing_key``, else
    ``$CASSTORE_SIGNING_KEY``) when ``for_save``, and the trusted keys (``trusted_keys``,
    else ``$CASSTORE_TRUSTED_KEYS``).

    Both fail closed: a signing key that cannot be read fails the save (never an unsigned
    save instead) and unreadable trusted keys fail the load (never trust everyone
    instead), with :class:`~casstore.errors.InvalidKey`. A save only uses the trusted keys
    to warn that it saves what they ignore, so there they may be unreadable.
    """
    from casstore.config import threads
    from casstore.errors import InvalidKey
    from casstore.signing import signing_key_from, trusted_keys_from
    from casstore.store import Store

    signer = signing_key_from(signing_key) if for_save else None
    try:
        trusted = trusted_keys_from(trusted_keys)
    except InvalidKey:
        if not for_save:
            raise
        trusted = None
    return Store(
        settings.root, create=create, threads=threads(), signing_key=signer, trusted=trusted
    )


def no_store_yet(root: StoreRoot) -> bool:
    """Whether ``root`` is where a first save would start a store: a missing or empty
    directory (lost+found and temp files aside), or an empty bucket prefix. A bucket that
    cannot be reached raises."""
    if isinstance(root, str):
        from casstore.backends.s3 import S3Backend

        backend = S3Backend(root)
        backend.check()
        return not backend.holds_other_files()
    from casstore.backends.fs import FileSystemBackend

    return not root.exists() or (root.is_dir() and not FileSystemBackend(root).holds_other_files())


def save_slot_dir(root: StoreRoot) -> Path:
    """Where the ``MAX_CONCURRENT_SAVES`` slots of ``root`` are: its locks/ directory, or
    for an object store (which has no locks) a directory of this host's, per store."""
    if isinstance(root, Path):
        return root / "locks"
    import hashlib
    import tempfile

    digest = hashlib.sha256(root.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "casstore-save-slots" / digest


def save_tree(
    store: Store,
    settings: Settings,
    path: Path,
    key: CacheKey,
    exclude: Callable[[str], bool] = is_transient,
) -> SaveReport:
    """``store.save`` under the configured size cap and lock timeout."""
    return store.save(
        path,
        key,
        max_bytes=settings.max_cache_size_mb * 2**20,
        exclude=exclude,
        lock_timeout=settings.lock_timeout_seconds,
    )


def load_status(report: LoadReport) -> OperationStatus:
    """SUCCESS when files were restored (torch recompiles any that were missing: only a
    save after warm-up puts them back in the store), SKIPPED when all were already present,
    ERROR when none could be restored."""
    if report.written:
        return OperationStatus.SUCCESS
    return OperationStatus.ERROR if report.missing else OperationStatus.SKIPPED


def _opportunistic_cleanup(store: Store, settings: Settings) -> None:
    """Remove a few stale temp and lock files left by crashed replicas; bounded to ~50 ms
    so a save never pays for more than a moment of maintenance."""
    from casstore.gc import cleanup

    try:
        removed = cleanup(
            store,
            temp_timeout=settings.incomplete_timeout_seconds,
            lock_timeout=settings.lock_timeout_seconds,
        )
        if removed:
            log.info("removed %d stale temp/lock files", removed)
    except Exception as e:  # maintenance never fails a save
        log.debug("opportunistic cleanup failed: %s", e)


def load_compile_cache(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    model: str | None = None,
    scope: str | None = None,
) -> OperationStatus:
    """Restore this model's compile cache into the local cache dir.

    SUCCESS: files were restored (maybe not all: a partial restore is logged as a
    warning). SKIPPED: every file was already present. DOES_NOT_EXIST: nothing was saved
    for this key yet. ERROR: anything else (logged), e.g. a key larger than
    ``MAX_CACHE_SIZE_MB`` (nothing is written). Call it before the first ``torch.compile``
    call runs, and call :func:`save_compile_cache` after warm-up whatever it returned.
    """
    started = time.monotonic()
    try:
        from casstore.config import model_fingerprint, read_settings
        from casstore.errors import CacheTooLarge, NotFound, NotTrusted, StoreUnavailable

        settings = read_settings(cache_dir=cache_dir, root=root, scope=scope)
        trees = _trees(settings, model_fingerprint(model))
        main = trees[0]
        log.info("loading compile cache %s from %s into %s", main.key, settings.root, main.path)
        try:
            store = open_store(settings, create=False)
        except StoreUnavailable:
            # No store yet, where a save would start one (a missing directory, or one
            # holding nothing but lost+found and temp files; an empty bucket prefix):
            # nothing saved. The rule is the store's own, so load and save agree on what
            # is not a store.
            if not no_store_yet(settings.root):
                raise
            log.info("no store at %s yet", settings.root)
            return OperationStatus.DOES_NOT_EXIST
        cap = settings.max_cache_size_mb * 2**20
        try:
            report = store.load(main.key, main.path, max_bytes=cap)
        except NotTrusted as e:
            log.warning("compile cache not restored: %s", e)
            return OperationStatus.DOES_NOT_EXIST
        except NotFound:
            from casstore.explain import log_miss

            log_miss(store, main.key, "load_compile_cache")
            return OperationStatus.DOES_NOT_EXIST
        except CacheTooLarge as e:
            log.error("compile cache not restored: %s (raise MAX_CACHE_SIZE_MB)", e)
            return OperationStatus.ERROR
        for extra in trees[1:]:
            try:
                r = store.load(extra.key, extra.path, max_bytes=cap, record_miss=False)
                log.info("%s: %d files restored, %d present", extra.name, r.written, r.skipped)
            except NotFound:
                pass
            except Exception as e:  # a side tree never fails the main load
                log.warning("could not restore %s: %s", extra.name, e)
        log.info(
            "compile cache %s: %d files restored, %d already present, %d missing, "
            "%.1f MiB fetched in %.2fs",
            main.key,
            report.written,
            report.skipped,
            len(report.missing),
            report.bytes_fetched / 2**20,
            time.monotonic() - started,
        )
        if report.missing:  # the load logged a warning with the counts
            log.info(
                "torch recompiles the %d missing files; save_compile_cache() after warm-up "
                "stores them again",
                len(report.missing),
            )
        return load_status(report)
    except Exception as e:
        log.error("load_compile_cache failed: %s: %s", type(e).__name__, e)
        log.debug("load_compile_cache traceback", exc_info=True)
        return OperationStatus.ERROR


def save_compile_cache(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    root: str | os.PathLike[str] | None = None,
    model: str | None = None,
    scope: str | None = None,
) -> OperationStatus:
    """Save this model's compile cache to the store; only new chunks are uploaded.

    SUCCESS: new files were saved. SKIPPED: nothing new (or no cache dir / an empty one,
    or every save slot stayed busy). ERROR: anything else (logged).
    Call it after warm-up, once compilation has run.
    """
    started = time.monotonic()
    try:
        from casstore.config import model_fingerprint, read_settings
        from casstore.errors import CacheTooLarge
        from casstore.locks import save_slot

        settings = read_settings(cache_dir=cache_dir, root=root, scope=scope)
        trees = _trees(settings, model_fingerprint(model))
        main = trees[0]
        if not main.path.is_dir() or not any(main.path.iterdir()):
            log.info("%s is missing or empty; nothing to save", main.path)
            return OperationStatus.SKIPPED
        store = open_store(settings, create=True, for_save=True)
        with save_slot(
            save_slot_dir(settings.root),
            settings.max_concurrent_saves,
            settings.lock_timeout_seconds,
        ) as held:
            if not held:
                log.warning(
                    "%d saves already running on %s; skipping this one",
                    settings.max_concurrent_saves,
                    settings.root,
                )
                return OperationStatus.SKIPPED
            try:
                report = save_tree(store, settings, main.path, main.key)
            except CacheTooLarge as e:
                log.error("not saved: %s (raise MAX_CACHE_SIZE_MB)", e)
                return OperationStatus.ERROR
            for extra in trees[1:]:
                if not extra.path.is_dir():
                    continue
                try:
                    r = save_tree(store, settings, extra.path, extra.key)
                    log.info("%s: %d new chunks", extra.name, r.new_chunks)
                except Exception as e:  # a side tree never fails the main save
                    log.warning("could not save %s: %s", extra.name, e)
        _opportunistic_cleanup(store, settings)
        log.info(
            "saved compile cache %s: %d files, %d new or changed, %d new chunks "
            "(%.1f MiB) in %.2fs",
            main.key,
            report.files,
            report.changed_files,
            report.new_chunks,
            report.new_bytes / 2**20,
            time.monotonic() - started,
        )
        return OperationStatus.SUCCESS if report.manifest else OperationStatus.SKIPPED
    except Exception as e:
        log.error("save_compile_cache failed: %s: %s", type(e).__name__, e)
        log.debug("save_compile_cache traceback", exc_info=True)
        return OperationStatus.ERROR

"""The sidecar for vLLM (and any server that compiles inside its own process).

vLLM compiles while it starts, so model.py calls do not fit. The sidecar:

1. **restores** the store's copy of vLLM's compile cache into ``$VLLM_CACHE_ROOT``
   (default ``~/.cache/vllm``) before vLLM needs it;
2. **waits** until the server answers its readiness URL with HTTP 200 *and* the cache has
   been quiet (no file added or changed) for a while, then **saves**;
3. **keeps watching** while the server lives: new artifacts (shapes compiled later) are
   saved again, incrementally (only new chunks and a small manifest); a save that fails
   leaves its content unsaved and is retried after a bounded backoff
   (:meth:`Sidecar.retry_delay`);
4. exits when the watched server process exits (``pid``) or on SIGTERM, after a final save
   of anything not saved yet.

It never delays or breaks the server: every error is logged and the sidecar carries on or
exits cleanly. See docs/vllm.md for start commands and exit codes.

What is shared: ``torch_compile_cache/`` under the cache root, and ``torch_aot_compile/``
where an earlier vLLM writes its ahead-of-time artifacts at the root. vLLM names a
subdirectory by a hash of everything that shapes compilation (configs, torch settings, the
model's code), so two vLLM configurations of one model live side by side in one key and
never overwrite each other; restoring brings all of them and vLLM picks its own.

Each such hash directory is restored all-or-nothing (:func:`restore_unit`): vLLM's index
(``vllm_compile_cache.py``) names artifacts beside it, and an index whose artifact is absent
makes vLLM fail ("Inductor cache lookup failed") instead of compiling again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from casstore.compile_cache import (
    OperationStatus,
    is_transient,
    load_status,
    no_store_yet,
    open_store,
    save_tree,
)

if TYPE_CHECKING:
    from casstore.config import Settings, StoreRoot
    from casstore.keys import CacheKey

log = logging.getLogger("casstore")

# torch_compile_cache/: vLLM's compile cache, with (current releases, torch >= 2.10) its
# ahead-of-time artifacts in torch_compile_cache/torch_aot_compile/; torch_aot_compile/:
# where earlier releases put those at the cache root.
SHARED_SUBDIRS = ("torch_compile_cache", "torch_aot_compile")
AOT_SUBDIR = "torch_aot_compile"
# vLLM's /health answers 200 once the engine is up and needs no API key (/v1/models
# answers 401 when the server runs with --api-key).
DEFAULT_URL = "http://127.0.0.1:8000/health"
# Answers that mean "the server is up, it only wants credentials".
_UP_BUT_PROTECTED = {401, 403}

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_NEVER_READY = 3

Snapshot = dict[str, tuple[int, int]]


def default_cache_root() -> Path:
    """vLLM's cache root: ``$VLLM_CACHE_ROOT``, else ``$XDG_CACHE_HOME/vllm``, else
    ``~/.cache/vllm`` (vLLM's own rule)."""
    env = os.environ.get("VLLM_CACHE_ROOT")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "vllm"


@dataclass(frozen=True)
class SidecarOptions:
    cache_root: Path
    url: str = DEFAULT_URL
    timeout: float = 1800.0  # how long to wait for the server to become ready
    quiet: float = 30.0  # seconds without a change before a save
    poll: float = 2.0
    retry_max: float = 300.0  # the longest wait before retrying a failed save
    pid: int | None = None  # exit when this process exits
    model: str | None = None
    root: StoreRoot | None = None  # store root (default: as the model.py calls)
    scope: str | None = None
    signing_key: str | None = None  # default: $CASSTORE_SIGNING_KEY, as the model.py calls
    trusted_keys: str | None = None  # default: $CASSTORE_TRUSTED_KEYS


def restore_unit(rel: str) -> str | None:
    """The directory restored all-or-nothing with ``rel``: the hash directory holding it.

    ``torch_compile_cache/<hash>/`` (JIT: per-rank indexes and the artifacts they name),
    ``torch_compile_cache/torch_aot_compile/<hash>/`` and ``torch_aot_compile/<hash>/``
    (AOT: ``rank_<r>_<dp>/model`` and the inductor cache shared by the ranks). A file
    outside any hash directory is restored on its own (None).
    """
    parts = rel.split("/")
    if parts[0] == "torch_compile_cache" and len(parts) > 2:
        if parts[1] == AOT_SUBDIR:
            return "/".join(parts[:3]) if len(parts) > 3 else None
        return "/".join(parts[:2])
    if parts[0] == AOT_SUBDIR and len(parts) > 2:
        return "/".join(parts[:2])
    return None


def _shared(rel: str) -> bool:
    return any(rel == s or rel.startswith(s + "/") for s in SHARED_SUBDIRS)


def _excluded(rel: str) -> bool:
    """What a save leaves out: everything outside the shared subtrees, and transient
    files (torch's ``.tmp``, lock files)."""
    return not _shared(rel) or is_transient(rel)


def snapshot(cache_root: Path) -> Snapshot:
    """(size, mtime) of every file a save would take: cheap change detection."""
    found: Snapshot = {}
    for sub in SHARED_SUBDIRS:
        base = cache_root / sub
        for dirpath, _dirs, names in os.walk(base):
            for name in names:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, cache_root).replace(os.sep, "/")
                if _excluded(rel):
                    continue
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                found[rel] = (st.st_size, st.st_mtime_ns)
    return found


class Sidecar:
    """Restore, then watch and save. ``stop()`` (SIGTERM) ends the watch after a final save."""

    def __init__(
        self,
        options: SidecarOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[float], bool] | None = None,
    ) -> None:
        """``clock`` (seconds) and ``wait(seconds)`` (True once stopped) drive every timing
        of the watch: tests step them instead of sleeping. ``wait`` defaults to waiting
        for :meth:`stop`."""
        self.options = options
        self._stop = threading.Event()
        self._clock = clock
        self._wait = wait if wait is not None else self._stop.wait
        self.saves = 0
        self._settings_and_key: tuple[Settings, CacheKey] | None = None

    def stop(self) -> None:
        self._stop.set()

    # -- store access, through the same settings as the model.py calls ----------------

    def _tree(self) -> tuple[Settings, CacheKey]:
        """Settings and key, worked out once: the sidecar saves many times over its life,
        and detecting the key can run nvidia-smi."""
        if self._settings_and_key is None:
            from casstore.config import model_fingerprint, read_settings
            from casstore.keys import detect_key

            settings = read_settings(root=self.options.root, scope=self.options.scope)
            key = detect_key(model_fingerprint(self.options.model), {"tree": "vllm"})
            self._settings_and_key = (settings, key)
        return self._settings_and_key

    def restore(self) -> OperationStatus:
        """Load the saved vLLM cache into the cache root, each hash directory
        all-or-nothing (:func:`restore_unit`), within ``MAX_CACHE_SIZE_MB``. Never raises."""
        try:
            from casstore.errors import CacheTooLarge, NotFound, NotTrusted, StoreUnavailable

            settings, key = self._tree()
            log.info("vllm: restoring %s into %s", key, self.options.cache_root)
            try:
                store = open_store(settings, create=False, trusted_keys=self.options.trusted_keys)
                report = store.load(
                    key,
                    self.options.cache_root,
                    max_bytes=settings.max_cache_size_mb * 2**20,
                    group=restore_unit,
                )
            except NotTrusted as e:
                log.warning("vllm: not restored: %s", e)
                return OperationStatus.DOES_NOT_EXIST
            except NotFound:
                from casstore.explain import log_miss

                log_miss(store, key, "vllm")
                return OperationStatus.DOES_NOT_EXIST
            except StoreUnavailable as e:
                # No store yet (where a first save would start one) is nothing to restore;
                # a store that cannot be reached (a missing bucket, say) is an error.
                if not no_store_yet(settings.root):
                    raise
                log.info("vllm: nothing to restore (%s)", e)
                return OperationStatus.DOES_NOT_EXIST
            except CacheTooLarge as e:
                log.error("vllm: not restored: %s (raise MAX_CACHE_SIZE_MB)", e)
                return OperationStatus.ERROR
            log.info(
                "vllm: restored %d files (%d already present, %d missing) in %.2fs",
                report.written,
                report.skipped,
                len(report.missing),
                report.seconds,
            )
            return load_status(report)
        except Exception as e:
            log.error("vllm: restore failed: %s: %s", type(e).__name__, e)
            return OperationStatus.ERROR

    def save(self) -> OperationStatus:
        """Save what is new under the shared subtrees. Never raises."""
        try:
            from casstore.errors import CacheTooLarge

            settings, key = self._tree()
            if not self.options.cache_root.is_dir():
                return OperationStatus.SKIPPED
            store = open_store(
                settings,
                create=True,
                signing_key=self.options.signing_key,
                trusted_keys=self.options.trusted_keys,
                for_save=True,
            )
            try:
                report = save_tree(store, settings, self.options.cache_root, key, _excluded)
            except CacheTooLarge as e:
                log.error("vllm: not saved: %s (raise MAX_CACHE_SIZE_MB)", e)
                return OperationStatus.ERROR
            self.saves += report.manifest is not None
            log.info(
                "vllm: saved %d new or changed files, %d new chunks (%.1f MiB)%s",
                report.changed_files,
                report.new_chunks,
                report.new_bytes / 2**20,
                f"; skipped {len(report.skipped)} still being written" if report.skipped else "",
            )
            return OperationStatus.SUCCESS if report.manifest else OperationStatus.SKIPPED
        except Exception as e:
            log.error("vllm: save failed: %s: %s", type(e).__name__, e)
            return OperationStatus.ERROR

    # -- the watch loop -----------------------------------------------------------------

    def _server_alive(self) -> bool:
        pid = self.options.pid
        if pid is None:
            return True
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # exists, owned by someone else
        # A zombie child has exited too.
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.options.url, timeout=5) as resp:
                return bool(resp.status == 200)
        except urllib.error.HTTPError as e:
            return e.code in _UP_BUT_PROTECTED
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def wait_ready(self) -> bool:
        """Poll the readiness URL until HTTP 200; False on timeout, stop or server exit."""
        deadline = self._clock() + self.options.timeout
        while not self._stop.is_set() and self._server_alive():
            if self._ready():
                log.info("vllm: server ready at %s", self.options.url)
                return True
            if self._clock() > deadline:
                log.warning(
                    "vllm: %s not ready after %.0fs; not saving",
                    self.options.url,
                    self.options.timeout,
                )
                return False
            self._wait(self.options.poll)
        return False

    def watch(self) -> int:
        """Wait for readiness, then save each time the cache settles. Returns an exit code."""
        baseline = snapshot(self.options.cache_root)  # what restore put there
        if not self.wait_ready():
            if self._stop.is_set() or not self._server_alive():
                return self._final(baseline)
            return EXIT_NEVER_READY
        saved = baseline  # what the store holds
        seen = snapshot(self.options.cache_root)
        changed_at = retry_at = self._clock()
        failures = 0  # saves failed in a row
        while not self._stop.is_set() and self._server_alive():
            self._wait(self.options.poll)
            now_snap = snapshot(self.options.cache_root)
            now = self._clock()
            if now_snap != seen:
                seen, changed_at = now_snap, now
            elif seen != saved and now - changed_at >= self.options.quiet and now >= retry_at:
                if self.save() is OperationStatus.ERROR:
                    # Still unsaved: tried again once the cache is quiet and the backoff
                    # has passed, and by the final save at the latest.
                    failures += 1
                    delay = self.retry_delay(failures)
                    retry_at = self._clock() + delay
                    log.warning(
                        "vllm: save failed (%d in a row); retrying in %.0fs", failures, delay
                    )
                else:
                    saved, failures = seen, 0
        return self._final(saved)

    def retry_delay(self, failures: int) -> float:
        """How long to wait after ``failures`` failed saves in a row: the quiet period
        (at least one poll), doubled after each failure, at most ``retry_max``."""
        base = max(self.options.quiet, self.options.poll)
        return min(base * 2.0 ** min(failures - 1, 32), self.options.retry_max)

    def _final(self, saved: Snapshot) -> int:
        """On exit: save anything not in the store yet, new since the last save that worked
        (the server has stopped writing)."""
        if snapshot(self.options.cache_root) != saved:
            log.info("vllm: final save before exit")
            self.save()
        return EXIT_OK

    def run(self) -> int:
        """Restore, then watch: what ``casstore vllm`` does."""
        self.restore()
        return self.watch()

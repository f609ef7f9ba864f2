"""casstore: share torch.compile caches between replicas through one content-addressed store.

For model.py (drop-in for b10-transfer)::

    from casstore import load_compile_cache, save_compile_cache, OperationStatus

The store itself::

    from casstore import Store, CacheKey
    store = Store("/cache/org/cas")
    key = CacheKey(torch="2.13.0+cpu", arch="sm_90", model="m")
    store.save("/tmp/torchinductor_me", key)
    store.load(key, "/tmp/torchinductor_me")

Names are imported on first use (PEP 562), so ``from casstore import load_compile_cache``
loads only what model.py needs, and a broken optional dependency cannot break that import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from casstore._version import __version__

if TYPE_CHECKING:
    from casstore.compile_cache import OperationStatus, load_compile_cache, save_compile_cache
    from casstore.errors import (
        CacheTooLarge,
        CannotRenew,
        CasstoreError,
        CorruptObject,
        FormatMismatch,
        InvalidManifest,
        KeyUndetermined,
        LockTimeout,
        NotFound,
        StoreUnavailable,
        UnsafePath,
        UnsupportedManifest,
        UnsupportedRoot,
    )
    from casstore.keys import CacheKey, detect_key
    from casstore.store import KeyInfo, LoadReport, SaveReport, Store

__all__ = [
    "CacheKey",
    "CacheTooLarge",
    "CannotRenew",
    "CasstoreError",
    "CorruptObject",
    "FormatMismatch",
    "InvalidManifest",
    "KeyInfo",
    "KeyUndetermined",
    "LoadReport",
    "LockTimeout",
    "NotFound",
    "OperationStatus",
    "SaveReport",
    "Store",
    "StoreUnavailable",
    "UnsafePath",
    "UnsupportedManifest",
    "UnsupportedRoot",
    "__version__",
    "detect_key",
    "load_compile_cache",
    "save_compile_cache",
]

_ERRORS = (
    "CacheTooLarge",
    "CannotRenew",
    "CasstoreError",
    "CorruptObject",
    "FormatMismatch",
    "InvalidManifest",
    "KeyUndetermined",
    "LockTimeout",
    "NotFound",
    "StoreUnavailable",
    "UnsafePath",
    "UnsupportedManifest",
    "UnsupportedRoot",
)
_LAZY = {
    "OperationStatus": "casstore.compile_cache",
    "load_compile_cache": "casstore.compile_cache",
    "save_compile_cache": "casstore.compile_cache",
    "CacheKey": "casstore.keys",
    "detect_key": "casstore.keys",
    "KeyInfo": "casstore.store",
    "LoadReport": "casstore.store",
    "SaveReport": "casstore.store",
    "Store": "casstore.store",
    **dict.fromkeys(_ERRORS, "casstore.errors"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'casstore' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

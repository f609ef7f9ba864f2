"""casstore: share torch.compile caches between replicas through one content-addressed store.

Public API::

    from casstore import Store, CacheKey
    store = Store("/cache/org/cas")
    key = CacheKey(torch="2.13.0+cpu", arch="sm_90", model="m")
    store.save("/tmp/torchinductor_me", key)
    store.load(key, "/tmp/torchinductor_me")
"""

from casstore._version import __version__
from casstore.errors import (
    CacheTooLarge,
    CasstoreError,
    CorruptObject,
    FormatMismatch,
    InvalidManifest,
    LockTimeout,
    NotFound,
    StoreUnavailable,
    UnsafePath,
)
from casstore.keys import CacheKey, detect_key
from casstore.store import KeyInfo, LoadReport, SaveReport, Store

__all__ = [
    "CacheKey",
    "CacheTooLarge",
    "CasstoreError",
    "CorruptObject",
    "FormatMismatch",
    "InvalidManifest",
    "KeyInfo",
    "LoadReport",
    "LockTimeout",
    "NotFound",
    "SaveReport",
    "Store",
    "StoreUnavailable",
    "UnsafePath",
    "__version__",
    "detect_key",
]

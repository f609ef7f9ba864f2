"""Intents: how a saver on an object store protects the chunks it reuses from gc.

On a filesystem a saver renews each chunk it reuses (``utime``) and gc's sweep sees the new
age (docs/gc.md). An object store cannot renew an object's age in place. There, before a
save checks whether a chunk is present, it publishes an *intent*: a small object under
``intents/`` listing the digests it may list in its manifest. gc deletes a chunk by moving
it to ``trash/`` first; after each batch it lists the intents (and the manifests published
since it planned) and puts back every trashed chunk one of them lists. A saver that found
a chunk present had published its intent before looking, and gc looks at the intents after
deleting: whichever comes first, the chunk is either seen missing by the saver (which
uploads it from its local bytes) or given back by gc (docs/gc.md says what that needs,
and what gc does where an intent or a manifest cannot be read). The saver deletes its intents when
it is done; gc deletes intents older than its grace period (a save slower than the grace
is unprotected, as on a filesystem).

An intent object is ``intents/<ns>-<12 hex>.intent``: a MessagePack array of 32-byte
digests (docs/format.md).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable

import msgspec

from casstore.backends.base import Backend
from casstore.errors import NotFound

log = logging.getLogger("casstore")

INTENTS_DIR = "intents"
INTENT_SUFFIX = ".intent"
MAX_INTENT_BYTES = 64 * 2**20

_decoder = msgspec.msgpack.Decoder(list[bytes])


class Intent:
    """The intents of one save. Thread-safe: chunks may be announced from many threads."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.names: list[str] = []
        self._digests: set[bytes] = set()
        self._lock = threading.Lock()

    def announce(self, digests: Iterable[bytes]) -> None:
        """Publish the digests not announced yet; returns once they are (the caller may
        then look for those chunks)."""
        with self._lock:
            new = sorted(set(digests) - self._digests)
            if not new:
                return
            name = f"{INTENTS_DIR}/{time.time_ns():020d}-{uuid.uuid4().hex[:12]}{INTENT_SUFFIX}"
            self.backend.put_if_absent(name, msgspec.msgpack.encode(new))
            self.names.append(name)
            self._digests.update(new)

    def covers(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._digests

    def close(self) -> None:
        """Withdraw the intents (best effort: gc expires what is left)."""
        for name in self.names:
            try:
                self.backend.delete(name)
            except Exception as e:
                log.debug("could not delete intent %s: %s", name, e)
        self.names.clear()


class Active:
    """What the intents say now: the digests live intents list, the names of expired
    ones, and whether every live one could be read (if not, protect everything)."""

    def __init__(self) -> None:
        self.digests: set[bytes] = set()
        self.expired: list[str] = []
        self.complete = True

    def protects(self, digest: bytes) -> bool:
        return not self.complete or digest in self.digests


def active(backend: Backend, younger_than: float) -> Active:
    """The intents as they are now; those older than ``younger_than`` are expired (a save
    slower than gc's grace). One that cannot be read, for whatever reason, makes the
    answer incomplete: the caller then protects every chunk."""
    found = Active()
    for info in backend.list(f"{INTENTS_DIR}/"):
        if not info.key.endswith(INTENT_SUFFIX):
            continue
        if info.mtime < younger_than:
            found.expired.append(info.key)
            continue
        try:
            found.digests.update(_decoder.decode(backend.get(info.key, max_bytes=MAX_INTENT_BYTES)))
        except NotFound:
            continue  # withdrawn since the listing: its save is done
        except Exception as e:
            log.warning("intent %s cannot be read (%s): protecting every chunk", info.key, e)
            found.complete = False
    return found

"""The small protocol every backend implements.

Objects are immutable byte strings addressed by '/'-separated keys. The store above relies
on exactly these guarantees, and the conformance suite (tests/backend_conformance.py)
checks them for every backend:

* ``put_if_absent`` publishes atomically: a reader sees the whole object or nothing, never a
  prefix, whatever crashes; an existing object is never replaced by a different one.
* ``refresh`` answers "is it there?" and, when it is, renews its age, so a saver that reuses
  a chunk keeps gc's grace period from expiring under it (the REAPI FindMissingBlobs rule).
  It never answers "there" without renewing: an object it cannot renew raises
  :class:`casstore.errors.CannotRenew`, and the saver then republishes it.
* No method needs a lock for correctness.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from casstore.errors import CorruptObject


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float  # seconds since the epoch: last publish or refresh
    # What tells two versions of an object apart where mtime cannot (an object store's
    # times are whole seconds): its ETag. None on a filesystem (nanosecond mtimes).
    tag: str | None = None


class Backend(abc.ABC):
    """An object store for casstore. Implementations must be thread-safe."""

    #: Whether :meth:`refresh` renews an object's age in place (a filesystem's utime).
    #: Object stores cannot: savers protect the chunks they reuse with an intent object
    #: instead, and gc honours intents (docs/gc.md).
    renews_age: bool = True

    @abc.abstractmethod
    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        """The object's bytes. Raises :class:`casstore.NotFound` when absent, and
        :class:`casstore.CorruptObject` when it holds more than ``max_bytes`` (checked
        before reading it, so a hostile object cannot exhaust memory)."""

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """The bytes of each ``(offset, length)`` range of ``key``, in order: what a
        restore reads of a pack (one open, or one request per group of nearby ranges).
        Raises :class:`casstore.NotFound` when absent and :class:`casstore.CorruptObject`
        when a range reaches past the object's end. This default reads it whole."""
        data = self.get(key)
        out = []
        for offset, length in ranges:
            if offset < 0 or length < 0 or offset + length > len(data):
                raise CorruptObject(
                    f"{key} holds {len(data)} bytes; range {offset}+{length} is outside",
                    path=key,
                )
            out.append(data[offset : offset + length])
        return out

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes) -> bool:
        """Publish ``data`` under ``key`` atomically unless it exists. True if written."""

    @abc.abstractmethod
    def refresh(self, key: str) -> bool:
        """True if ``key`` exists, renewing its age; False if it does not. Raises
        :class:`casstore.errors.CannotRenew` when it exists but its age cannot be renewed."""

    def republish(self, key: str, data: bytes) -> None:
        """Store ``data`` (the bytes ``key`` already holds) again so that its age starts
        now: the way to renew an object that ``refresh`` cannot renew."""
        raise NotImplementedError(f"{type(self).__name__} cannot republish objects")

    @abc.abstractmethod
    def stat(self, key: str) -> ObjectInfo | None:
        """Size and age of ``key``, or None."""

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove ``key``; False if it was already gone."""

    @abc.abstractmethod
    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every published object whose key starts with ``prefix`` ('dir/' style)."""

    def move(self, src: str, dst: str) -> bool:
        """Rename ``src`` to ``dst`` unless ``dst`` exists; True if moved. Needed by gc's
        sweep and by quarantine; a backend without renames raises NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} cannot rename objects")

    def holds_other_files(self) -> bool:
        """Whether anything is stored here at all: where a new store may not start. A
        filesystem ignores what a fresh volume or a crashed first save leaves."""
        return any(True for _ in self.list(""))

    def describe(self) -> str:
        return type(self).__name__

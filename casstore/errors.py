"""The exception tree. Every error casstore raises derives from :class:`CasstoreError`.

Each subclass also mixes in the built-in exception a caller would naturally catch
(``except LookupError`` works for a missing key), the way huggingface_hub does.
"""

from __future__ import annotations


class CasstoreError(Exception):
    """Base class of every error raised by casstore."""


class NotFound(CasstoreError, LookupError):
    """No manifest (or object) exists for the requested key."""


class CorruptObject(CasstoreError, ValueError):
    """A stored object does not match its digest, or cannot be decoded."""

    def __init__(self, message: str, *, digest: str | None = None, path: str | None = None):
        super().__init__(message)
        self.digest = digest
        self.path = path


class InvalidManifest(CasstoreError, ValueError):
    """A manifest is malformed, of an unknown format, or names an unsafe path."""


class DictionaryUnavailable(CasstoreError):
    """A block's dictionary cannot be rebuilt now: one of its chunks is in no readable
    block without a dictionary. The block's own bytes are not known to be damaged."""


class UnsupportedIndex(CasstoreError):
    """A pack index this casstore cannot read although it may be valid (a newer format):
    never damage, never quarantined; its pack is left alone."""


class UnsupportedManifest(InvalidManifest):
    """A manifest this casstore cannot read although it may be valid: another format
    version, or a field this version does not know (written by a newer casstore)."""


class UnsafePath(InvalidManifest):
    """A manifest path would escape the destination (absolute, ``..``, through a symlink)."""


class FormatMismatch(CasstoreError, ValueError):
    """The store on disk was written with another format version or chunker parameters."""


class CacheTooLarge(CasstoreError, ValueError):
    """The tree to save exceeds the configured size cap; nothing was uploaded."""


class LockTimeout(CasstoreError, TimeoutError):
    """A best-effort lock could not be taken in time."""


class StoreUnavailable(CasstoreError, OSError):
    """The store root cannot be used (missing, not a directory, not writable)."""


class UnsupportedRoot(StoreUnavailable):
    """The store root is a URL casstore cannot store to (anything but ``s3://``)."""


class InvalidKey(CasstoreError, ValueError):
    """A signing key or a trusted public key cannot be read or parsed."""


class NotTrusted(NotFound):
    """A key has manifests, but none signed by a trusted key: a miss, nothing is written."""


class KeyUndetermined(CasstoreError, RuntimeError):
    """A GPU is visible but its arch cannot be determined, so no key would be honest."""


class CannotRenew(CasstoreError, PermissionError):
    """An object exists but this user cannot renew its age (another user's object on a
    store whose files are not group-writable, or a read-only store)."""

    def __init__(self, message: str, *, key: str | None = None):
        super().__init__(message)
        self.key = key

"""Storage backends: where chunk and manifest objects live."""

from casstore.backends.base import Backend, ObjectInfo
from casstore.backends.fs import FileSystemBackend

__all__ = ["Backend", "FileSystemBackend", "ObjectInfo"]

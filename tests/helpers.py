"""Shared test helpers: building trees, comparing them, poking at store internals."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from casstore import CacheKey, constants

KEY = CacheKey(torch="2.13.0+cpu", arch="x86-64-v3-test", model="unit")


def write_tree(root: Path, files: dict[str, bytes], modes: dict[str, int] | None = None) -> None:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        if modes and rel in modes:
            os.chmod(p, modes[rel])


def read_tree(root: Path) -> dict[str, tuple[bytes, int]]:
    """Every regular file under root (symlinks not followed) with its permission bits."""
    found: dict[str, tuple[bytes, int]] = {}
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                rel = p.relative_to(root).as_posix()
                found[rel] = (p.read_bytes(), stat.S_IMODE(st.st_mode))
    return found


def chunk_files(store_root: Path) -> list[Path]:
    return sorted(p for p in (store_root / constants.CHUNKS_DIR).rglob("*.zst"))


def manifest_files(store_root: Path) -> list[Path]:
    return sorted((store_root / constants.MANIFESTS_DIR).rglob("*.manifest"))


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(f"{constants.TEMP_PREFIX}*"))

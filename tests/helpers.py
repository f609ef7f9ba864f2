"""Shared test helpers: building trees, comparing them, poking at store internals."""

from __future__ import annotations

import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from casstore import CacheKey, chunk_index, chunking, constants, packs
from casstore.backends.base import Backend

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


def pack_files(store_root: Path) -> list[Path]:
    return sorted(p for p in (store_root / constants.PACKS_DIR).rglob(f"*{constants.PACK_SUFFIX}"))


def stored_chunks(backend: Backend) -> set[bytes]:
    """Digests of every chunk the store's packs hold, by their indexes."""
    return set(chunk_index.load(backend).digests())


def rewrite_pack_of(
    backend: Backend, digest: bytes, change: Callable[[bytes, bytes], bytes | None]
) -> str:
    """Rewrite the pack holding ``digest``: each of its chunks becomes ``change(digest,
    data)`` (None: left out), listed under its digest still. The old pack and its index
    go; returns the new pack's id. Damage to one chunk, precisely: ``change`` returning
    other bytes for it is a corrupt chunk, None a lost one."""
    index = chunk_index.load(backend)
    (loc, *_) = index.locate(digest)
    pack = loc.index
    builder = packs.PackBuilder()
    sealed: list[packs.Sealed] = []
    blocks = packs.read_blocks(backend, pack, range(len(pack.blocks)))
    for c in pack.chunks:
        data = blocks[c.block][c.offset : c.offset + c.size]
        new = change(c.digest, data)
        if new is not None:
            sealed += builder.add(c.digest, new, small=True)
    sealed += builder.finish()
    for one in sealed:
        packs.publish(backend, one)
    backend.delete(packs.pack_key(pack.id))
    backend.delete(packs.index_key(pack.id))
    return sealed[0].id if sealed else ""


def lose_chunk(backend: Backend, digest: bytes) -> None:
    """Make one chunk missing from the store (its pack rewritten without it)."""
    rewrite_pack_of(backend, digest, lambda d, data: None if d == digest else data)


def corrupt_chunk(backend: Backend, digest: bytes) -> None:
    """Make one chunk's stored bytes wrong (same size, listed under its digest)."""
    rewrite_pack_of(
        backend,
        digest,
        lambda d, data: bytes(b ^ 0xFF for b in data[:64]) + data[64:] if d == digest else data,
    )


def manifest_files(store_root: Path) -> list[Path]:
    return sorted((store_root / constants.MANIFESTS_DIR).rglob("*.manifest"))


def temp_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob(f"{constants.TEMP_PREFIX}*"))


def stand_in_torch(
    site: Path, *, metadata_version: str, file_version: str, cuda_error: str | None = None
) -> Path:
    """A fake torch package with its dist-info under ``site`` (put it on PYTHONPATH).

    Its metadata says ``metadata_version`` and its ``torch/version.py`` says
    ``file_version``, as a PyPI CUDA wheel's do (``2.11.0`` vs ``2.11.0+cu130``).
    ``torch.cuda.is_available()`` returns False, or raises RuntimeError(cuda_error).
    """
    pkg = site / "torch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "from torch import cuda\nfrom torch.version import __version__\n"
    )
    (pkg / "version.py").write_text(f"__version__ = {file_version!r}\ncuda = '13.0'\n")
    body = f"raise RuntimeError({cuda_error!r})" if cuda_error else "return False"
    (pkg / "cuda.py").write_text(f"def is_available():\n    {body}\n")
    info = site / f"torch-{metadata_version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: torch\nVersion: {metadata_version}\n"
    )
    (info / "RECORD").write_text(
        "".join(f"torch/{n},,\n" for n in ("__init__.py", "version.py", "cuda.py"))
        + f"{info.name}/METADATA,,\n{info.name}/RECORD,,\n"
    )
    return site


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds.
    Tests wait on the condition they need, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class Lines:
    """The lines a child process writes to a pipe, read by a thread as they come, so a
    test can wait for one without blocking on the pipe."""

    def __init__(self, stream: IO[str] | None) -> None:
        assert stream is not None
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float) -> None:
        wait_until(lambda: any(text in line for line in self.lines), timeout, repr(text))

    def text(self, timeout: float = 30.0) -> str:
        """Everything written, once the pipe is closed (the child has exited)."""
        self._thread.join(timeout)
        return "".join(self.lines)


def seal_chunk(digest: bytes, data: bytes) -> packs.Sealed:
    """``data``, listed under ``digest``, sealed alone in a pack (not published)."""
    builder = packs.PackBuilder()
    builder.add(digest, data, small=True)
    (sealed,) = builder.finish()
    return sealed


def single_chunk_pack(size: int = 20_000) -> tuple[bytes, packs.Sealed]:
    """Random bytes of ``size``, sealed alone in a pack (not published)."""
    data = os.urandom(size)
    return data, seal_chunk(chunking.digest(data), data)

"""What the benchmarks share: what the reports say about the machine they ran on, and how
runs are kept from timing each other's leftovers."""

from __future__ import annotations

import compileall
import uuid
from pathlib import Path

import casstore


def filesystem_of(path: Path) -> str:
    """The filesystem type under ``path`` and its mount point, read from /proc/mounts
    (the longest mount point that contains ``path``)."""
    best, found = "", "unknown filesystem"
    resolved = str(path.resolve())
    try:
        with open("/proc/mounts") as fh:
            for line in fh:
                parts = line.split()
                mount = parts[1]
                inside = resolved == mount or resolved.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, found = mount, f"{parts[2]} at {mount}"
    except OSError:
        pass
    return found


def set_aside(path: Path) -> None:
    """Move a run's output (a restored tree, a store, an archive) out of the way of the
    next run instead of deleting it; everything set aside goes with the benchmark's work
    directory at the end.

    Deleting thousands of files right before the next run creates as many would time the
    filesystem, not the tool: ext4 without a journal skips inodes freed in the last minute
    (five while their inode table block is unwritten) when it allocates new ones
    (``find_inode_bit``/``recently_deleted`` in fs/ext4/ialloc.c), scanning past each:
    on this machine's root filesystem that made creating a file up to four times dearer
    (0.13 ms to 0.5 ms), for cp, tar and casstore alike. A replica restores onto a disk
    nobody just emptied."""
    if not path.exists():
        return
    aside = path.parent / ".set-aside"
    aside.mkdir(exist_ok=True)
    path.rename(aside / uuid.uuid4().hex)


def byte_compile() -> None:
    """Write casstore's bytecode, as installing the package does: the command rows then
    time what users run, not compiling modules from source (which every start of a
    process with PYTHONDONTWRITEBYTECODE set, or a read-only checkout, would repeat)."""
    compileall.compile_dir(Path(casstore.__file__).parent, quiet=1)

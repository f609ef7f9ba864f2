"""An S3-compatible object store (AWS S3, GCS's S3 API, MinIO, Ceph RGW, SeaweedFS, R2) as a
casstore backend, through ``obstore`` (docs/decisions.md says why).

Roots are ``s3://BUCKET/PREFIX``. Endpoint, credentials and region come from the standard
AWS variables (``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``)
or, when ``AWS_PROFILE`` is set or no key is in the environment, the static credentials of
that profile in ``~/.aws/credentials`` and ``~/.aws/config``. A plain ``http://`` endpoint
is allowed because the URL says so. Every request has bounded timeouts and retries
(connect 5 s; a request at most 60 s; 3 retries within 60 s): a refused or unreachable
endpoint is an error in seconds, and one that accepts connections but never answers in
about a minute, never a hang.

What each operation relies on (docs/format.md, "Object stores"):

* ``put_if_absent``: ``PUT`` with ``If-None-Match: *``; where the service refuses
  conditional writes, a ``HEAD`` then a plain ``PUT``. Correctness never depends on the
  condition: chunk names are content digests and manifest names are unique, so a lost
  race replaces an object with identical bytes.
* Objects cannot have their age renewed in place, so this backend does not renew
  (:attr:`renews_age` is False): savers protect the chunks they reuse with an intent
  object instead (docs/gc.md, "Object stores").
* ``move`` is a copy then a delete: not atomic; a crash in between leaves both names.
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from casstore import constants
from casstore.backends.base import Backend, ObjectInfo
from casstore.config import is_s3_url
from casstore.errors import CannotRenew, CorruptObject, NotFound, StoreUnavailable

if TYPE_CHECKING:
    from obstore.store import S3Store

SCHEME = constants.S3_SCHEME
# Bounded everywhere: a refused connection fails within about CONNECT x RETRIES, a server
# that never answers within REQUEST_TIMEOUT (retries stop at RETRY_TIMEOUT).
CONNECT_TIMEOUT = timedelta(seconds=5)
REQUEST_TIMEOUT = timedelta(seconds=60)
MAX_RETRIES = 3
RETRY_TIMEOUT = timedelta(seconds=60)


def _not_found() -> tuple[type[BaseException], ...]:
    from obstore.exceptions import NotFoundError

    # obstore raises its NotFoundError from some calls and the built-in FileNotFoundError
    # from others.
    return (NotFoundError, FileNotFoundError)


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # no leading or trailing "/"; may be empty

    @property
    def url(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}".rstrip("/")


def parse_url(url: str) -> S3Location:
    """``s3://BUCKET[/PREFIX]`` → location. Raises :class:`StoreUnavailable` otherwise."""
    if not is_s3_url(url):
        raise StoreUnavailable(f"{url!r} is not an s3:// URL")
    rest = url[len(SCHEME) :]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")
    if not bucket or any(p in ("", ".", "..") for p in prefix.split("/") if prefix):
        raise StoreUnavailable(f"{url!r}: expected s3://BUCKET or s3://BUCKET/PREFIX")
    return S3Location(bucket, prefix)


def _profile_settings(env: dict[str, str]) -> dict[str, str]:
    """Static credentials and region of ``$AWS_PROFILE`` (else ``default``) from the shared
    files, as the AWS CLI reads them; {} when there are none."""
    profile = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE") or "default"
    home = Path(env.get("HOME") or Path.home())
    found: dict[str, str] = {}
    credentials = configparser.ConfigParser()
    credentials.read(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials")
    if credentials.has_section(profile):
        section = credentials[profile]
        for name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token"):
            if section.get(name):
                found[name] = section[name]
    config = configparser.ConfigParser()
    config.read(env.get("AWS_CONFIG_FILE") or home / ".aws" / "config")
    section_name = profile if profile == "default" else f"profile {profile}"
    if config.has_section(section_name):
        section = config[section_name]
        for name in ("region", "endpoint_url"):
            if section.get(name):
                found[name] = section[name]
    return found


def _store(location: S3Location, env: dict[str, str]) -> S3Store:
    from obstore.store import S3Store

    settings: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    # Passed explicitly, so that what ``env`` says is what is used (obstore would read the
    # process's own environment).
    if env.get("AWS_ACCESS_KEY_ID"):
        settings["access_key_id"] = env["AWS_ACCESS_KEY_ID"]
        settings["secret_access_key"] = env.get("AWS_SECRET_ACCESS_KEY", "")
        if env.get("AWS_SESSION_TOKEN"):
            settings["session_token"] = env["AWS_SESSION_TOKEN"]
    if env.get("AWS_PROFILE") or not env.get("AWS_ACCESS_KEY_ID"):
        profile = _profile_settings(env)
        if "aws_access_key_id" in profile and not env.get("AWS_ACCESS_KEY_ID"):
            settings["access_key_id"] = profile["aws_access_key_id"]
            settings["secret_access_key"] = profile.get("aws_secret_access_key", "")
            if "aws_session_token" in profile:
                settings["session_token"] = profile["aws_session_token"]
        region = region or profile.get("region")
        endpoint = endpoint or profile.get("endpoint_url")
    if endpoint:
        settings["endpoint"] = endpoint
    if region:
        settings["region"] = region
    client = {
        "connect_timeout": CONNECT_TIMEOUT,
        "timeout": REQUEST_TIMEOUT,
        "allow_http": bool(endpoint and endpoint.startswith("http://")),
    }
    retry = {"max_retries": MAX_RETRIES, "retry_timeout": RETRY_TIMEOUT}
    return S3Store(
        location.bucket,
        prefix=location.prefix or None,
        client_options=client,  # type: ignore[arg-type]
        retry_config=retry,  # type: ignore[arg-type]
        **settings,
    )


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")
    return key


class S3Backend(Backend):
    """Objects under ``s3://BUCKET/PREFIX``. Thread-safe (obstore's client is)."""

    renews_age = False

    def __init__(self, url: str, *, env: dict[str, str] | None = None) -> None:
        # Whether the service honoured If-None-Match (None: no publish yet); doctor shows it.
        self.conditional_puts: bool | None = None
        self.location = parse_url(url)
        self.url = self.location.url
        self._store = _store(self.location, dict(os.environ) if env is None else env)

    def describe(self) -> str:
        return self.url

    # --- errors -------------------------------------------------------------------------

    def _fail(self, error: Exception, what: str) -> StoreUnavailable:
        """One clear error for what is not about one object: a missing bucket, refused
        credentials, an endpoint that cannot be reached."""
        text = " ".join(str(error).split())
        if len(text) > 300:
            text = text[:300] + "…"
        return StoreUnavailable(f"{self.url}: cannot {what}: {type(error).__name__}: {text}")

    # --- the protocol ---------------------------------------------------------------------

    def get(self, key: str, *, max_bytes: int | None = None) -> bytes:
        import obstore

        try:
            result = obstore.get(self._store, _check_key(key))
            size = int(result.meta["size"])
            if max_bytes is not None and size > max_bytes:
                raise CorruptObject(
                    f"{key} holds {size} bytes, over the limit of {max_bytes}", path=key
                )
            return bytes(result.bytes())
        except _not_found():
            raise NotFound(f"no object {key}") from None
        except (CorruptObject, ValueError):
            raise
        except Exception as e:
            raise self._fail(e, f"read {key}") from e

    def get_ranges(self, key: str, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        import obstore

        if not ranges:
            return []
        if any(offset < 0 or length <= 0 for offset, length in ranges):
            raise CorruptObject(f"invalid range of {key}: {list(ranges)}", path=key)
        try:
            # obstore merges ranges less than 1 MiB apart into one request, and sends up
            # to ten requests at once.
            parts = obstore.get_ranges(
                self._store,
                _check_key(key),
                starts=[o for o, _ in ranges],
                lengths=[n for _, n in ranges],
            )
        except _not_found():
            raise NotFound(f"no object {key}") from None
        except ValueError:
            raise
        except Exception as e:
            if "range" in str(e).lower() and "not satisfiable" in str(e).lower():
                raise CorruptObject(f"a range of {key} is outside the object", path=key) from e
            raise self._fail(e, f"read {key}") from e
        out = [bytes(p) for p in parts]
        for (offset, length), got in zip(ranges, out, strict=True):
            if len(got) != length:
                raise CorruptObject(
                    f"{key}: range {offset}+{length} returned {len(got)} bytes", path=key
                )
        return out

    def put_if_absent(self, key: str, data: bytes) -> bool:
        import obstore
        from obstore.exceptions import AlreadyExistsError, NotSupportedError

        _check_key(key)
        try:
            obstore.put(self._store, key, data, mode="create")
            self.conditional_puts = True
            return True
        except AlreadyExistsError:
            self.conditional_puts = True
            return False
        except NotSupportedError:
            self.conditional_puts = False
            # A service without conditional writes: names are content digests or unique,
            # so a lost race can only replace an object with the same bytes.
            if self.stat(key) is not None:
                return False
            try:
                obstore.put(self._store, key, data)
            except Exception as e:
                raise self._fail(e, f"write {key}") from e
            return True
        except Exception as e:
            raise self._fail(e, f"write {key}") from e

    def refresh(self, key: str) -> bool:
        """S3 cannot renew an object's age in place: True/False for presence would lie
        about renewing, so a present object raises :class:`CannotRenew` (the caller
        republishes small objects; savers protect chunks with intents instead)."""
        if self.stat(key) is None:
            return False
        raise CannotRenew(f"{self.url}: objects cannot be renewed in place ({key})", key=key)

    def republish(self, key: str, data: bytes) -> None:
        import obstore

        try:
            obstore.put(self._store, _check_key(key), data)
        except Exception as e:
            raise self._fail(e, f"write {key}") from e

    def stat(self, key: str) -> ObjectInfo | None:
        import obstore

        try:
            meta = obstore.head(self._store, _check_key(key))
        except _not_found():
            return None
        except Exception as e:
            raise self._fail(e, f"stat {key}") from e
        return ObjectInfo(
            key, int(meta["size"]), meta["last_modified"].timestamp(), meta.get("e_tag")
        )

    def delete(self, key: str) -> bool:
        import obstore

        if self.stat(key) is None:
            return False
        try:
            obstore.delete(self._store, key)
        except Exception as e:
            raise self._fail(e, f"delete {key}") from e
        return True

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        import obstore

        base = prefix.rstrip("/")
        if base:
            _check_key(base)
        try:
            pages = obstore.list(self._store, prefix=base or None, chunk_size=1000)
            for page in pages:
                for meta in page:
                    path = str(meta["path"])
                    if base and not path.startswith(base + "/"):
                        continue  # obstore prefixes match whole segments; be exact
                    yield ObjectInfo(
                        path,
                        int(meta["size"]),
                        meta["last_modified"].timestamp(),
                        meta.get("e_tag"),
                    )
        except Exception as e:
            raise self._fail(e, f"list {prefix or '/'}") from e

    def move(self, src: str, dst: str) -> bool:
        """Copy then delete (S3 has no rename). False when ``dst`` exists or ``src`` is
        gone. Not atomic: a crash in between leaves both names, which gc's callers treat
        as the moved state (docs/gc.md)."""
        import obstore

        _check_key(src)
        _check_key(dst)
        if self.stat(dst) is not None:
            return False
        try:
            obstore.copy(self._store, src, dst)
        except _not_found():
            return False
        except Exception as e:
            raise self._fail(e, f"copy {src} to {dst}") from e
        try:
            obstore.delete(self._store, src)
        except Exception as e:
            raise self._fail(e, f"delete {src}") from e
        return True

    def check(self) -> None:
        """Raise :class:`StoreUnavailable` naming the cause when the bucket cannot be
        listed (missing bucket, refused credentials, unreachable endpoint)."""
        import obstore

        try:
            next(iter(obstore.list(self._store, chunk_size=1)), None)
        except Exception as e:
            raise self._fail(e, "list the bucket") from e

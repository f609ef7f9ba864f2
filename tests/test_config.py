"""Configuration from the environment: every capped variable at its edges, and the size
and duration parsers of the CLI (docs/compile-cache.md, "Environment variables")."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest

from casstore import config as cfg
from casstore import constants

# (variable, default, cap, how the value is read): the floor is 1 for every one of them.
CAPPED: list[tuple[str, int, int, Callable[[], int]]] = [
    ("MAX_CACHE_SIZE_MB", 1024, 102_400, lambda: cfg.read_settings().max_cache_size_mb),
    ("MAX_CONCURRENT_SAVES", 50, 1000, lambda: cfg.read_settings().max_concurrent_saves),
    (
        "CLEANUP_LOCK_TIMEOUT_SECONDS",
        30,
        3600,
        lambda: cfg.read_settings().lock_timeout_seconds,
    ),
    (
        "CLEANUP_INCOMPLETE_TIMEOUT_SECONDS",
        60,
        86_400,
        lambda: cfg.read_settings().incomplete_timeout_seconds,
    ),
    # Unset or empty: None, and a filesystem store then uses the default.
    (
        "CASSTORE_THREADS",
        constants.DEFAULT_THREADS,
        256,
        lambda: cfg.threads() or constants.DEFAULT_THREADS,
    ),
]
FLOOR = 1


def edge_cases(name: str, default: int, cap: int) -> list[tuple[str, int, str | None]]:
    """(raw value, value used, warning logged or None) at the cap and the floor."""
    cases: dict[str, tuple[int, str | None]] = {
        str(cap): (cap, None),
        str(cap + 1): (cap, f"{name}={cap + 1} exceeds the cap {cap}; using {cap}"),
        str(FLOOR): (FLOOR, None),
        str(FLOOR - 1): (default, f"{name}={FLOOR - 1} is below {FLOOR}; using {default}"),
        "0": (default, f"{name}=0 is below {FLOOR}; using {default}"),
        "-7": (default, f"{name}=-7 is below {FLOOR}; using {default}"),
        "2.5": (default, f"{name}='2.5' is not an integer; using {default}"),
        "lots": (default, f"{name}='lots' is not an integer; using {default}"),
        "": (default, None),
    }
    return [(raw, used, warning) for raw, (used, warning) in cases.items()]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, *_ in CAPPED:
        monkeypatch.delenv(name, raising=False)
    for var in ("CASSTORE_ROOT", "B10FS_CACHE_DIR", "TRITON_CACHE_DIR", "CASSTORE_STRICT_PATHS"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(("name", "default", "cap", "read"), CAPPED, ids=[c[0] for c in CAPPED])
def test_each_capped_variable_at_its_limits(
    name: str,
    default: int,
    cap: int,
    read: Callable[[], int],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    assert read() == default  # unset
    for raw, used, warning in edge_cases(name, default, cap):
        monkeypatch.setenv(name, raw)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="casstore"):
            value = read()
        logged = [
            r.getMessage()
            for r in caplog.records
            if r.levelno == logging.WARNING and name in r.getMessage()
        ]
        assert (value, logged) == (used, [warning] if warning else []), f"{name}={raw!r}"


# --- parse_duration / parse_size (casstore gc --max-age/--grace/--max-size, load --max-size) ---

DAY = 86400.0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("0", 0.0),
        ("90s", 90.0),
        ("15m", 900.0),
        ("12h", 43_200.0),
        ("30d", 30 * DAY),
        ("2w", 14 * DAY),
        ("1.5h", 5400.0),
        ("0.25d", DAY / 4),
        ("15M", 900.0),  # units in either case
        (" 15 m ", 900.0),
    ],
)
def test_parse_duration_accepts(text: str, seconds: float) -> None:
    assert cfg.parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        *("", "   ", "soon", "-5s", "-1", "+5s", "5x", "15mm", "h", ".5h", "5.h", "1.2.3h"),
        *("1e3", "nan", "inf", "5 s s", "5sm", "1,5h"),
    ],
)
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        cfg.parse_duration(text)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1000", 1000),
        ("0", 0),
        ("100b", 100),
        ("100B", 100),
        ("1k", 1024),
        ("1K", 1024),
        ("1KiB", 1024),
        ("1kb", 1024),
        ("500M", 500 * 2**20),
        ("500MiB", 500 * 2**20),
        ("500 MB", 500 * 2**20),
        ("10G", 10 * 2**30),
        ("2t", 2 * 2**40),
        ("1.5T", 3 * 2**39),
        ("1.5k", 1536),
        ("0.5G", 2**29),
        (" 2g ", 2 * 2**30),
    ],
)
def test_parse_size_accepts(text: str, size: int) -> None:
    assert cfg.parse_size(text) == size


@pytest.mark.parametrize(
    "text",
    [
        *("", "  ", "lots", "-1G", "-5", "+5G", "10X", "10GG", "1.2.3G", ".5G", "5.G", "G"),
        *("1e9", "10 G B", "10Gi", "10P", "nan", "inf", "1,5G"),
    ],
)
def test_parse_size_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        cfg.parse_size(text)

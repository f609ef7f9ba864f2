from __future__ import annotations

import logging
from pathlib import Path

import pytest

from casstore import Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "store", threads=4)


@pytest.fixture(autouse=True)
def _casstore_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="casstore")

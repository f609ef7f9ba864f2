"""The ``casstore`` command where the ``cli`` extra (click, rich) is not installed: one
line saying how to get it, instead of a traceback."""

from __future__ import annotations

import sys
from typing import NoReturn

CLI_LIBRARIES = frozenset({"click", "rich"})


def main() -> NoReturn:
    sys.stderr.write(
        "error: the casstore command needs the 'cli' extra (click, rich): "
        "pip install 'casstore[cli]' (model.py's load/save calls work without it)\n"
    )
    sys.exit(1)

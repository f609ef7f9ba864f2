"""Configuration read from the environment *when called*, never frozen at import."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from casstore import constants

log = logging.getLogger("casstore")


def default_root() -> Path:
    """The store root: ``$CASSTORE_ROOT``, else the org volume, else a per-user cache.

    ``/cache/org/cas`` is used when ``/cache/org`` exists (the shared volume is mounted);
    otherwise ``~/.cache/casstore`` so the tool works on a laptop, and the choice is logged.
    """
    env = os.environ.get("CASSTORE_ROOT")
    if env:
        return Path(env).expanduser()
    if Path(constants.ORG_CACHE_MOUNT).is_dir():
        return Path(constants.DEFAULT_ORG_ROOT)
    fallback = Path.home() / ".cache" / "casstore"
    log.info(
        "%s is not mounted; using the local store %s (set CASSTORE_ROOT to choose)",
        constants.ORG_CACHE_MOUNT,
        fallback,
    )
    return fallback

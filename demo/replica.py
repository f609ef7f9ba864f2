"""Start one simulated replica: a fresh process running demo/compile_worker.py with its own
inductor cache dir and its own TMPDIR (so even the precompiled header starts absent)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def start_replica(
    cache_dir: Path,
    tmpdir: Path,
    model: str,
    root: Path,
    *flags: str,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the worker; return its JSON result plus ``process_seconds``."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    full_env = {
        **os.environ,
        **(env or {}),
        "TORCHINDUCTOR_CACHE_DIR": str(cache_dir),
        "TMPDIR": str(tmpdir),
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "demo.compile_worker",
            "--model",
            model,
            "--root",
            str(root),
            *flags,
        ],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"replica failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    return result

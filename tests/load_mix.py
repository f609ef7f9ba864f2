"""Run a mix of saver, loader and gc processes (tests/stress_worker.py) against one store,
possibly through several mounts, and sum up what they did."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


@dataclass
class MixResult:
    seconds: float
    results: list[dict[str, Any]] = field(default_factory=list)

    def total(self, name: str) -> int:
        return sum(int(r.get(name, 0)) for r in self.results)

    @property
    def saves(self) -> list[dict[str, Any]]:
        return [s for r in self.results for s in r.get("saves", [])]

    @property
    def warnings(self) -> list[str]:
        return [w for r in self.results for w in r.get("warnings", [])]

    @property
    def errors(self) -> list[str]:
        return [e for r in self.results for e in r.get("errors", [])]


def run_mix(
    roots: list[Path] | list[str],
    work: Path,
    seconds: float,
    *,
    savers: int,
    loaders: int,
    gc_grace: float | None,
) -> MixResult:
    """``savers`` and ``loaders`` processes spread round-robin over ``roots`` (the same
    store seen through different mounts), plus one gc on the first root."""
    work.mkdir(parents=True, exist_ok=True)
    roles = [("saver", i) for i in range(savers)] + [("loader", i) for i in range(loaders)]
    if gc_grace is not None:
        roles.append(("gc", 0))
    started = time.monotonic()
    procs = []
    for n, (role, i) in enumerate(roles):
        root = roots[0] if role == "gc" else roots[n % len(roots)]
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tests.stress_worker",
                    role,
                    str(root),
                    str(work),
                    str(seconds),
                    f"{role}{i}",
                    str(gc_grace or 0),
                ],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    mix = MixResult(seconds=0.0)
    for p in procs:
        out, errs = p.communicate(timeout=seconds + 300)
        if p.returncode != 0:
            raise RuntimeError(f"worker failed: {errs[-3000:]}")
        mix.results.append(json.loads(out.strip().splitlines()[-1]))
    mix.seconds = time.monotonic() - started
    return mix

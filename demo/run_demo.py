"""``make demo``: a real torch.compile cold start, saved with casstore, restored on a fresh
"replica" (new process, empty inductor cache, empty TMPDIR), side by side.

Both replicas run model.py's pattern: ``load_compile_cache()``, compile and warm up, then
``save_compile_cache()`` whatever the load returned. The save uploads only what is new: on
the cold replica everything (SUCCESS), on the warm one nothing (SKIPPED). Saving
unconditionally is what puts back files a partial restore could not bring.

    python -m demo.run_demo [--model mlp|conv] [--root DIR]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from demo.replica import start_replica


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="conv", choices=["mlp", "conv"])
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="store root (default: a temporary store, removed afterwards)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="casstore-demo-"))
    root = args.root or work / "store"
    try:
        print(
            f"1/3 replica A: load_compile_cache(), cold torch.compile of '{args.model}', "
            "save_compile_cache()"
        )
        cold = start_replica(work / "cache-A", work / "tmp-A", args.model, root, "--load", "--save")
        print("2/3 wiping replica A's local cache")
        shutil.rmtree(work / "cache-A")
        shutil.rmtree(work / "tmp-A")
        print(
            "3/3 replica B: load_compile_cache() into an empty cache dir, torch.compile, "
            "save_compile_cache()"
        )
        warm = start_replica(work / "cache-B", work / "tmp-B", args.model, root, "--load", "--save")
        stored = sum(p.stat().st_size for p in root.rglob("*.zst"))
        logical = sum(p.stat().st_size for p in (work / "cache-B").rglob("*") if p.is_file())
        c, w = cold["counters"], warm["counters"]
        print()
        print("                     cold (A)    warm from store (B)")
        print(
            f"first call           {cold['first_call_seconds']:7.2f} s  "
            f"{warm['first_call_seconds']:7.2f} s  (+{warm['load_seconds']:.2f} s load)"
        )
        print(f"fxgraph cache hit    {c['fxgraph_cache_hit']:7d}    {w['fxgraph_cache_hit']:7d}")
        print(f"autograd cache hit   {c['autograd_cache_hit']:7d}    {w['autograd_cache_hit']:7d}")
        print(f"outputs match eager  {cold['matches_eager']!s:>7}    {warm['matches_eager']!s:>7}")
        print(f"statuses A           load {cold['load_status']}, save {cold['save_status']}")
        print(
            f"statuses B           load {warm['load_status']}, save {warm['save_status']} "
            "(saved unconditionally; SKIPPED: nothing new to upload)"
        )
        print(
            f"bytes stored         {stored / 2**20:.1f} MiB compressed "
            f"(inductor cache {logical / 2**20:.1f} MiB + precompiled header)"
        )
        speedup = cold["first_call_seconds"] / (warm["first_call_seconds"] + warm["load_seconds"])
        print(f"speed-up             {speedup:.1f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

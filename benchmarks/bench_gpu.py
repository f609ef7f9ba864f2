"""GPU compile-cache check, run on a machine with an NVIDIA GPU (CI has none).

``run`` compiles real models with torch.compile on the GPU, saves each inductor cache with
``save_compile_cache()``, then starts fresh processes as new replicas would: one on the
cache already local (the baseline), one restored by ``load_compile_cache()`` into an empty
cache dir, and one restored with an empty HOME too (no ``~/.triton/cache``). It checks that
the CLI computes the same key as model.py on this host (``casstore explain``), verifies the
store, and keeps every cold cache dir as a corpus for the compression measurements
(``gpu-caches.tar.xz``). Results go to ``results.json`` as each step finishes, so a run cut
short still reports what it did.

``report`` turns results.json into docs/gpu-benchmarks.md.

    python -m benchmarks.bench_gpu run --out DIR [--budget SECONDS]
    python -m benchmarks.bench_gpu report DIR/results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

from demo.replica import REPO

# Measured as replicas (cold, local, restored, restored with empty HOME); the others are
# compiled cold and saved only, for the cross-model corpus.
REPLICA_MODELS = ("gpt", "bert")
CORPUS_MODELS = ("mlp", "conv", "gpt-wide", "gpt-deep")


DEVICE = "cuda"


def worker(work: Path, model: str, cache: str, home: str, *flags: str) -> dict[str, Any]:
    """One fresh process of demo/compile_worker.py on the GPU."""
    env = {
        **os.environ,
        "TORCHINDUCTOR_CACHE_DIR": str(work / f"cache-{cache}"),
        "HOME": str(work / f"home-{home}"),
        "TMPDIR": str(work / f"tmp-{cache}"),
    }
    for d in ("HOME", "TMPDIR"):
        Path(env[d]).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [
            *(sys.executable, "-m", "demo.compile_worker", "--model", model),
            *("--device", DEVICE, "--root", str(work / "store"), *flags),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr[-2000:], "exit": proc.returncode}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - start
    result["log"] = [line for line in proc.stderr.splitlines() if "casstore" in line][-6:]
    return result


def cli(work: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "casstore", *args, "--root", str(work / "store")],
        cwd=REPO,
        env={**os.environ, "HOME": str(work / "home-shared")},
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    return {"exit": proc.returncode, "stdout": proc.stdout[-6000:], "stderr": proc.stderr[-2000:]}


KEY_WITHOUT_TORCH = """
import sys
from casstore.keys import detect_key
key = detect_key("gpt")
assert "torch" not in sys.modules
print(key)
"""


def host_facts() -> dict[str, Any]:
    import importlib.metadata

    import torch

    from casstore.keys import detect_key, installed_version

    try:
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except FileNotFoundError:
        gpu = "none (nvidia-smi not found)"
    return {
        "gpu": gpu,
        "torch.__version__": torch.__version__,
        "torch distribution": importlib.metadata.version("torch"),
        "triton": installed_version("triton") or "none",
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        # A process that never imports torch, as the CLI and the sidecar compute it.
        "key without torch imported (CLI, sidecar)": subprocess.run(
            [sys.executable, "-c", KEY_WITHOUT_TORCH],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip(),
        "key with torch imported (model.py)": str(detect_key("gpt", import_torch=True)),
    }


def run(out: Path, budget: float) -> None:
    deadline = time.monotonic() + budget
    work = Path("/tmp/casstore-gpu")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    results: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}

    def record(name: str, value: Any) -> None:
        results[name] = value
        (out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"{name}: {json.dumps(value)[:400]}", flush=True)

    record("host", host_facts())
    replicas: dict[str, Any] = {}
    for model in REPLICA_MODELS:
        rows = {
            "cold": worker(work, model, f"{model}-cold", "shared", "--save"),
            "local": worker(work, model, f"{model}-cold", "shared"),
            "restored": worker(work, model, f"{model}-restored", "shared", "--load"),
            "restored, empty HOME": worker(
                work, model, f"{model}-restored-nohome", f"empty-{model}", "--load"
            ),
        }
        replicas[model] = rows
        record("replicas", replicas)
    corpus: dict[str, Any] = {}
    for model in CORPUS_MODELS:
        if time.monotonic() > deadline - 90:
            corpus[model] = {"error": "skipped: out of time"}
            continue
        corpus[model] = worker(work, model, f"{model}-cold", "shared", "--save")
        record("corpus", corpus)
    record("explain gpt", cli(work, "explain", "--model", "gpt", "--json"))
    record("ls", cli(work, "ls", "--json"))
    record("verify", cli(work, "verify"))
    with tarfile.open(out / "gpu-caches.tar.xz", "w:xz", preset=6) as tar:
        for model in REPLICA_MODELS + CORPUS_MODELS:
            cache = work / f"cache-{model}-cold"
            if cache.is_dir():
                tar.add(cache, arcname=model)
    record("corpus tar.xz bytes", (out / "gpu-caches.tar.xz").stat().st_size)


def report(results_path: Path) -> str:
    r = json.loads(results_path.read_text())
    host = r["host"]
    lines = [
        "# GPU compile-cache check",
        "",
        "Generated by `python -m benchmarks.bench_gpu report` from a run of",
        "`python -m benchmarks.bench_gpu run` on a machine with a GPU (CI has none); do not edit",
        "by hand.",
        "",
        f"- when: {r['when']}",
        f"- GPU: {host['gpu']}; {host['cpus']} CPUs",
        f"- torch {host['torch.__version__']} (distribution version"
        f" {host['torch distribution']}), Triton {host['triton']}, Python {host['python']}",
        "- every column is a fresh process compiling the model with `torch.compile` on the GPU;"
        " seconds of its first call (synchronised), and the `load_compile_cache()` time in"
        " brackets",
        "- *local*: the cold run's own cache dir and HOME (what a restart on the same machine"
        " sees); *restored*: an empty inductor cache dir, then `load_compile_cache()`;"
        " *restored, empty HOME*: the same with an empty HOME, so `~/.triton/cache` is absent",
        "",
        "| model | cold | local | restored | restored, empty HOME |"
        " restored / local | hits (restored) | output matches eager |",
        "|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for model, rows in r.get("replicas", {}).items():
        cells = []
        for name in ("cold", "local", "restored", "restored, empty HOME"):
            row = rows[name]
            if "error" in row:
                cells.append("failed")
                continue
            cell = f"{row['first_call_seconds']:.2f}"
            if "load_seconds" in row:
                cell += f" (+{row['load_seconds']:.2f})"
            cells.append(cell)
        restored, local = rows["restored"], rows["local"]
        ratio = (
            f"{restored['first_call_seconds'] / local['first_call_seconds']:.2f}x"
            if "error" not in restored and "error" not in local
            else "-"
        )
        counters = restored.get("counters", {})
        hits = f"fx {counters.get('fxgraph_cache_hit')}, aot {counters.get('autograd_cache_hit')}"
        matches = all(rows[n].get("matches_eager") for n in rows)
        lines.append(
            f"| {model} | {' | '.join(cells)} | {ratio} | {hits} | {'yes' if matches else 'NO'} |"
        )
    corpus = r.get("corpus", {})
    if corpus:
        lines += [
            "",
            "Corpus models (compiled cold and saved, for the compression measurements):",
            "",
            "| model | cold first call | save |",
            "|---|---:|---:|",
        ]
        for model, row in corpus.items():
            if "error" in row:
                lines.append(f"| {model} | {row['error'][:60]} | |")
            else:
                lines.append(
                    f"| {model} | {row['first_call_seconds']:.2f} | {row['save_seconds']:.2f} |"
                )
    lines += [
        "",
        "Keys on this host (the CLI and the sidecar compute theirs without importing torch):",
        "",
        f"- without torch imported: `{host['key without torch imported (CLI, sidecar)']}`",
        f"- with torch imported (model.py): `{host['key with torch imported (model.py)']}`",
    ]
    explain = r.get("explain gpt", {})
    if explain:
        try:
            trees = json.loads(explain["stdout"])["trees"]
            found = ", ".join(f"{t['tree']}: {t['status']}" for t in trees)
        except (ValueError, KeyError):
            found = "output unreadable"
        lines.append(
            f"- `casstore explain --model gpt` (the CLI's key for what model.py saved):"
            f" exit {explain['exit']}, {found}"
        )
    verify = r.get("verify", {})
    if verify:
        lines.append(f"- `casstore verify` exit {verify['exit']}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--out", type=Path, required=True)
    run_parser.add_argument("--budget", type=float, default=420.0)
    # cpu: a dry run of the script's plumbing on a machine without a GPU.
    run_parser.add_argument("--device", default="cuda")
    report_parser = sub.add_parser("report")
    report_parser.add_argument("results", type=Path)
    report_parser.add_argument("--output", type=Path, default=REPO / "docs/gpu-benchmarks.md")
    args = parser.parse_args()
    if args.command == "run":
        global DEVICE
        DEVICE = args.device
        args.out.mkdir(parents=True, exist_ok=True)
        run(args.out, args.budget)
    else:
        args.output.write_text(report(args.results))
        print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

"""A stand-in for `vllm serve`, run as its own process: an HTTP server on 127.0.0.1 whose
readiness URL answers 503 then 200, and which writes a vLLM-shaped compile cache while it
"starts", including a file still being written when readiness flips, and later artifacts
(new shapes) a while after it is ready. Prints timestamped events as JSON lines.

    python -m tests.fake_vllm CACHE_ROOT READY_AFTER LATE_AFTER [--never-ready]
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

START = time.time()
HASHED = "torch_compile_cache/1517964802/rank_0_0"
# With torch >= 2.10, vLLM compiles ahead of time (VLLM_USE_AOT_COMPILE): one artifact per
# rank, and an inductor cache shared by the ranks, under a hash of the compile factors.
AOT = "torch_compile_cache/torch_aot_compile/" + "ab" * 32


def event(name: str, **extra: object) -> None:
    print(json.dumps({"event": name, "t": time.time(), **extra}), flush=True)


def main() -> None:
    root = Path(sys.argv[1])
    ready_after, late_after = float(sys.argv[2]), float(sys.argv[3])
    never_ready = "--never-ready" in sys.argv

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ready = not never_ready and time.time() - START >= ready_after
            self.send_response(200 if ready and self.path in ("/health", "/v1/models") else 503)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    event("listening", port=server.server_address[1])

    base = root / HASHED
    (base / "inductor_cache").mkdir(parents=True, exist_ok=True)
    (root / "modelinfos").mkdir(parents=True, exist_ok=True)
    (root / "modelinfos" / "not-shared.json").write_text("{}")  # outside the shared tree
    for i in range(3):
        (base / "inductor_cache" / f"early{i}.py").write_bytes(f"kernel {i}\n".encode() * 500)
        time.sleep(0.2)
    (root / AOT / "rank_0_0").mkdir(parents=True, exist_ok=True)
    (root / AOT / "inductor_cache").mkdir(parents=True, exist_ok=True)
    (root / AOT / "inductor_cache" / "aot_kernel.py").write_bytes(b"aot kernel\n" * 400)
    (root / AOT / "rank_0_0" / "model").write_bytes(b"aot compiled model\n" * 2000)
    event("early_done")
    # A file still being written when readiness flips: in place, piece by piece.
    with open(base / "computation_graph.py", "wb") as fh:
        while time.time() - START < ready_after + 1.0:
            fh.write(b"graph piece\n" * 1000)
            fh.flush()
            time.sleep(0.1)
    event("slow_done")
    while time.time() - START < ready_after + late_after:
        time.sleep(0.05)
    late = root / "torch_compile_cache/1517964802/rank_0_0/inductor_cache"
    (late / "late_shape_64.py").write_bytes(b"compiled later\n" * 300)
    (late / ".123.456.tmp").write_bytes(b"torch temp file")
    event("late_done")
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()

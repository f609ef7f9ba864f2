"""The SeaweedFS harness itself (``tests/seaweed.py``): two test sessions, or two xdist
workers, may draw the same port. A port taken between the draw and weed's bind, even by a
server that answers like a filer, must make it start again on fresh ports, and never let the
tests talk to a server that is not theirs."""

from __future__ import annotations

import http.server
import threading
import urllib.request
from pathlib import Path

import pytest

from tests import seaweed


class _Impostor(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_GET(self) -> None:
        _Impostor.requests += 1
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"not your filer")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_a_port_taken_meanwhile_is_retried_on_fresh_ports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    impostor = http.server.HTTPServer(("127.0.0.1", 0), _Impostor)
    taken = impostor.server_address[1]
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    draws: list[list[int]] = []
    real_free_ports = seaweed._free_ports

    def free_ports(n: int) -> list[int]:
        ports = real_free_ports(n)
        if not draws:
            ports[2] = taken  # the filer's port: another's filer answers on it
        draws.append(ports)
        return ports

    monkeypatch.setattr(seaweed, "_free_ports", free_ports)
    fs = seaweed.SeaweedFS(tmp_path)
    try:
        fs.start()
        assert len(draws) == 2, "weed could not bind the taken port: start() must retry"
        assert fs.filer == f"127.0.0.1:{draws[1][2]}" != f"127.0.0.1:{taken}"
        assert _Impostor.requests == 0, "start() took another's server for its own"
        assert b"not your filer" not in urllib.request.urlopen(f"http://{fs.filer}/").read()
        assert len(fs.procs) == 1 and fs.procs[0].poll() is None
    finally:
        fs.stop()
        impostor.shutdown()
        impostor.server_close()

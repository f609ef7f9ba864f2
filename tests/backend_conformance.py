"""One conformance suite for every backend: subclass and provide the ``backend`` fixture.

These are the guarantees casstore.store relies on (see casstore/backends/base.py).
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from casstore.backends.base import Backend
from casstore.errors import CannotRenew, CorruptObject, NotFound
from tests.helpers import wait_until


class BackendConformance:
    # Whether concurrent put_if_absent calls of one key publish exactly once. A backend
    # with no no-replace primitive (the plain-rename fallback) only promises that any
    # replacement is by identical bytes (docs/format.md).
    publishes_exactly_once = True

    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError

    def test_get_missing_raises_not_found(self, backend: Backend) -> None:
        with pytest.raises(NotFound):
            backend.get("chunks/abc/nothing.zst")
        with pytest.raises(LookupError):  # NotFound is also a LookupError
            backend.get("chunks/abc/nothing.zst")

    def test_put_then_get_roundtrip(self, backend: Backend) -> None:
        data = os.urandom(100_000)
        assert backend.put_if_absent("chunks/abc/x.zst", data) is True
        assert backend.get("chunks/abc/x.zst") == data
        info = backend.stat("chunks/abc/x.zst")
        assert info is not None and info.size == len(data)

    def test_put_if_absent_never_replaces(self, backend: Backend) -> None:
        assert backend.put_if_absent("manifests/k/a.manifest", b"first") is True
        assert backend.put_if_absent("manifests/k/a.manifest", b"second") is False
        assert backend.get("manifests/k/a.manifest") == b"first"

    def test_empty_object(self, backend: Backend) -> None:
        assert backend.put_if_absent("x/empty", b"") is True
        assert backend.get("x/empty") == b""

    def test_refresh_reports_presence_and_renews_age(self, backend: Backend) -> None:
        assert backend.refresh("chunks/000/none.zst") is False
        backend.put_if_absent("chunks/000/a.zst", b"a")
        before = backend.stat("chunks/000/a.zst")
        assert before is not None
        if not backend.renews_age:
            # Never "present" without renewing: a backend that cannot renew says so.
            with pytest.raises(CannotRenew):
                backend.refresh("chunks/000/a.zst")
            return
        time.sleep(0.02)
        assert backend.refresh("chunks/000/a.zst") is True
        after = backend.stat("chunks/000/a.zst")
        assert after is not None and after.mtime > before.mtime

    def test_republish_renews_age_with_the_same_bytes(self, backend: Backend) -> None:
        backend.put_if_absent("access/k", b"")
        before = backend.stat("access/k")
        assert before is not None

        def renewed() -> bool:  # object stores date objects to the second: poll, bounded
            backend.republish("access/k", b"")
            after = backend.stat("access/k")
            return after is not None and after.mtime > before.mtime

        wait_until(renewed, 10, "a republished object to be dated anew")
        assert backend.get("access/k") == b""

    def test_delete(self, backend: Backend) -> None:
        backend.put_if_absent("d/x", b"1")
        assert backend.delete("d/x") is True
        assert backend.delete("d/x") is False
        assert backend.stat("d/x") is None
        with pytest.raises(NotFound):
            backend.get("d/x")

    def test_list_by_prefix_shows_only_published(self, backend: Backend) -> None:
        for k in ("m/a/1", "m/a/2", "m/b/1", "n/1"):
            backend.put_if_absent(k, k.encode())
        assert sorted(i.key for i in backend.list("m/")) == ["m/a/1", "m/a/2", "m/b/1"]
        assert sorted(i.key for i in backend.list("m/a/")) == ["m/a/1", "m/a/2"]
        assert list(backend.list("zzz/")) == []
        sizes = {i.key: i.size for i in backend.list("m/")}
        assert sizes["m/a/1"] == len(b"m/a/1")

    def test_rejects_escaping_keys(self, backend: Backend) -> None:
        for bad in ("../x", "/abs", "a/../../b", "a//b", ""):
            with pytest.raises(ValueError):
                backend.put_if_absent(bad, b"x")

    def test_concurrent_writers_of_one_key_agree(self, backend: Backend) -> None:
        """Many threads publish the same content-addressed object: exactly one writes it
        (where the backend promises that), and a reader never sees a prefix."""
        data = os.urandom(2_000_000)
        results: list[bool] = []
        seen_bad: list[int] = []
        stop = threading.Event()

        def reader() -> None:
            while not stop.is_set():
                try:
                    got = backend.get("c/same")
                except NotFound:
                    continue
                if got != data:
                    seen_bad.append(len(got))

        r = threading.Thread(target=reader)
        r.start()
        threads = [
            threading.Thread(target=lambda: results.append(backend.put_if_absent("c/same", data)))
            for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stop.set()
        r.join()
        if self.publishes_exactly_once:
            assert results.count(True) == 1
        else:
            assert results.count(True) >= 1
        assert seen_bad == []
        assert backend.get("c/same") == data

    def test_move_never_replaces(self, backend: Backend) -> None:
        backend.put_if_absent("a/x", b"x")
        backend.put_if_absent("b/y", b"y")
        assert backend.move("a/x", "b/y") is False
        assert backend.get("a/x") == b"x" and backend.get("b/y") == b"y"
        assert backend.move("a/x", "c/z") is True
        assert backend.stat("a/x") is None and backend.get("c/z") == b"x"
        assert backend.move("a/x", "c/w") is False  # source gone

    def test_get_refuses_an_object_over_the_limit_before_reading_it(self, backend: Backend) -> None:
        backend.put_if_absent("c/big", os.urandom(10_000))
        with pytest.raises(CorruptObject, match="over the limit"):
            backend.get("c/big", max_bytes=9_999)
        assert len(backend.get("c/big", max_bytes=10_000)) == 10_000

    def test_get_ranges_reads_each_range_in_order(self, backend: Backend) -> None:
        data = os.urandom(3_000_000)
        backend.put_if_absent("packs/ab/p.pack", data)
        # Near and far ranges, out of order: a backend may merge near ones into one read.
        ranges = [(2_500_000, 100_000), (0, 10), (10, 5), (1_000_000, 1), (2_999_990, 10)]
        got = backend.get_ranges("packs/ab/p.pack", ranges)
        assert got == [data[o : o + n] for o, n in ranges]

    def test_get_ranges_refuses_a_range_past_the_end(self, backend: Backend) -> None:
        backend.put_if_absent("packs/ab/short.pack", b"0123456789")
        with pytest.raises(CorruptObject):
            backend.get_ranges("packs/ab/short.pack", [(5, 10)])
        with pytest.raises(NotFound):
            backend.get_ranges("packs/ab/absent.pack", [(0, 1)])

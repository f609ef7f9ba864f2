"""A Hypothesis state machine: saves, loads, compaction and corruption against a dict model.

The model holds, per key, the merged files a load must produce, and every version of every
path ever saved. Checked after every load: each file is either restored byte-identical, or
reported missing because one of its chunks was damaged, and then the destination holds
exactly what it held before the load (nothing, or an earlier version that an earlier load
restored) — never a wrong byte, never a torn file, never a missing file without cause.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from casstore import CacheKey, NotFound, Store, chunk_index, packs
from casstore import gc as gc_mod
from tests.helpers import corrupt_chunk, lose_chunk, read_tree, temp_files, write_tree

KEYS = [CacheKey(torch="t", arch="a", model=m) for m in ("m1", "m2", "m3")]
PATHS = ["a", "b/c", "b/d", "e/f/g", "h"]
SIZES = [0, 7, 40_000, 300_000, 900_000]


class StoreMachine(RuleBasedStateMachine):
    @initialize()
    def setup(self) -> None:
        self.tmp = Path(tempfile.mkdtemp())
        self.store = Store(self.tmp / "store", threads=3)
        self.model: dict[str, dict[str, bytes]] = {}
        self.history: dict[str, set[bytes]] = {}  # every version of each path ever saved
        self.damaged: set[bytes] = set()
        self.loads = 0

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    @rule(
        key=st.sampled_from(KEYS),
        files=st.dictionaries(
            st.sampled_from(PATHS),
            st.tuples(st.sampled_from(SIZES), st.integers(0, 3)),
            min_size=1,
            max_size=4,
        ),
    )
    def save(self, key: CacheKey, files: dict[str, tuple[int, int]]) -> None:
        # Few seeds, so different saves share content and chunks.
        tree = {
            p: random.Random(seed * 1000 + size).randbytes(size)
            for p, (size, seed) in files.items()
        }
        src = self.tmp / "src"
        shutil.rmtree(src, ignore_errors=True)
        write_tree(src, tree)
        self.store.save(src, key)
        self.model.setdefault(key.id, {}).update(tree)
        for p, data in tree.items():
            self.history.setdefault(p, set()).add(data)

    @precondition(lambda self: any(self.model.values()))
    @rule()
    def compact(self) -> None:
        """gc with a long grace: merges each key's manifests, deletes no chunk."""
        report = gc_mod.execute(self.store, gc_mod.plan(self.store, gc_mod.Policy()))
        assert report.packs_deleted == 0 and report.keys_dropped == 0

    @rule(key=st.sampled_from(KEYS), fresh=st.booleans())
    def load(self, key: CacheKey, fresh: bool) -> None:
        dst = self.tmp / f"dst-{key.model}"
        if fresh:
            shutil.rmtree(dst, ignore_errors=True)
        expected = self.model.get(key.id)
        if expected is None:
            try:
                self.store.load(key, dst)
            except NotFound:
                return
            raise AssertionError("load of a never-saved key succeeded")
        before = {p: d for p, (d, _) in read_tree(dst).items()} if dst.exists() else {}
        report = self.store.load(key, dst)
        self.loads += 1
        restored = {p: d for p, (d, _) in read_tree(dst).items()}
        view = self.store.files(key)
        assert set(view) == set(expected), "the merged view lost or invented a path"
        for path in report.missing:
            chunks = {c.digest for c in view[path].chunks}
            assert chunks & self.damaged, f"{path} missing without a damaged chunk"
        for path, data in expected.items():
            if path in report.missing:
                # Not restored: the target is left exactly as it was, which is nothing or
                # a version of this path that was saved at some point.
                assert restored.get(path) == before.get(path), f"{path} touched on a miss"
                assert path not in restored or restored[path] in self.history[path]
            else:
                assert restored.get(path) == data, f"{path} restored with wrong bytes"
        assert temp_files(dst) == []

    @precondition(lambda self: any(self.model.values()))
    @rule(data=st.data(), how=st.sampled_from(["flip", "truncate", "delete"]))
    def damage_chunk(self, data: st.DataObject, how: str) -> None:
        index = chunk_index.load(self.store.backend)
        digests = sorted(index.digests())
        if not digests:  # only empty files saved so far
            return
        victim = data.draw(st.sampled_from(digests))
        if victim in self.damaged:
            return  # its pack may be cut short already: nothing more to damage
        if how == "delete":
            lose_chunk(self.store.backend, victim)
            self.damaged.add(victim)
        elif how == "flip":
            corrupt_chunk(self.store.backend, victim)
            self.damaged.add(victim)
        else:  # the whole pack holding it, cut short: every chunk in it is damaged
            (loc, *_) = index.locate(victim)
            path = self.tmp / "store" / packs.pack_key(loc.index.pack)
            blob = path.read_bytes()
            path.write_bytes(blob[: len(blob) // 2])
            self.damaged.update(c.digest for c in loc.index.chunks)

    @invariant()
    def no_temp_files_in_store(self) -> None:
        if hasattr(self, "tmp"):
            assert temp_files(self.tmp / "store") == []


StoreMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=20, deadline=None, derandomize=True
)
TestStoreMachine = StoreMachine.TestCase

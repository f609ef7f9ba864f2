"""Restoring files from packs: every needed block is read once, and each chunk in it is
written into every file (and offset) that needs it.

A restore works from the chunks, not from the files: the store reads a few large ranges
per pack instead of one object per file. Each file to restore gets a temp file beside its
target, made (by the caller's ``create``) by the thread that brings its first chunk and
written through the same descriptor, so that most files (one chunk) cost one open; chunks
land in it with positioned writes, in whatever order their blocks arrive. A file is
finished when its last chunk is written; one whose chunk cannot be found or does not
match its digest is failed, and never published (the caller discards its temp file): a
damaged pack costs files, never wrong bytes.

A chunk may lie in several packs (two saves raced, gc repacked it): a block that cannot be
read is tried in the chunk's other packs, then in ``trash/`` (gc may be sweeping the pack
this very moment, about to give it back to a save that just listed it).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from casstore import localfs, packs
from casstore.backends.base import Backend
from casstore.chunk_index import ChunkIndex, Location, list_trashed
from casstore.errors import CasstoreError, CorruptObject, NotFound
from casstore.manifest import FileEntry
from casstore.packs import ChunkLoc, PackIndex

log = logging.getLogger("casstore")

# Blocks read (and held decompressed) by one task, by default: with 8 MiB blocks and at
# most MAX_READERS tasks at once, a restore holds 64-128 MiB of blocks whatever its size.
# One block per task from a filesystem: its files are written while the next block is
# decompressed on the other core (two per task left a core idle while both decompressed:
# a 2,003-file restore took 0.22-0.25 s in-process with two, 0.19-0.22 s with one, on 2
# cores). An object store gets two (neighbouring blocks read in one request: it pays per
# request).
BLOCKS_PER_READ = 1
MAX_READERS = 8
# Rounds of reading: the newest location of each chunk, then its others, newest first. A
# round whose only failures are packs that do not exist does not count (planted indexes
# name packs that were never there); the rest are bounded.
ROUNDS = 16
MAX_PASSES = 1000


# Errors that no other file would escape either: the whole restore stops at once.
FATAL_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})


@dataclass(eq=False)
class FileJob:
    """One file to restore: ``create()`` makes its temp file and returns its path and a
    descriptor open for writing (called once, by the thread that brings its first chunk);
    ``tmp`` is that path, once made, and ``made`` the (device, inode) it was made with,
    for a file of several chunks (each later chunk reopens it by name)."""

    entry: FileEntry
    create: Callable[[], tuple[str, int]]
    tmp: str | None = None
    made: tuple[int, int] | None = None
    remaining: int = 0  # chunk placements not yet written
    failed: str | None = None  # why, once failed
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards making tmp


def _open_temp(job: FileJob) -> int | None:
    """A descriptor of the job's temp file, open for writing (the file made on first use);
    None once the job failed. OSErrors that would stop any file (a full disk) propagate;
    others fail this file only."""
    with job.lock:
        if job.failed is not None:
            return None
        try:
            if job.tmp is not None:
                return _reopen(job.tmp, job.made)
            job.tmp, fd = job.create()
            if len(job.entry.chunks) > 1:
                try:
                    st = os.fstat(fd)
                except BaseException:
                    os.close(fd)
                    raise
                job.made = (st.st_dev, st.st_ino)
        except OSError as e:
            if e.errno in FATAL_ERRNOS:
                raise
            job.failed = f"could not open its temp file: {e.strerror or e}"
            return None
        return fd


def _reopen(tmp: str, made: tuple[int, int] | None) -> int:
    """The temp file ``tmp`` again, for a later chunk: the very file the load made, never
    a symlink or another file put in its place by whoever else can write the directory (a
    write through it would land outside the destination)."""
    fd, _ = localfs.open_checked(
        tmp,
        os.O_WRONLY,
        lambda st: (st.st_dev, st.st_ino) == made and localfs.made_here(st),
    )
    return fd


@dataclass
class Outcome:
    bytes_fetched: int = 0
    failed: list[FileJob] = field(default_factory=list)


class PackTrash:
    """Packs gc moved to ``trash/`` and has not settled yet, by pack id: listed on the
    first pack a restore cannot find, and once more if a later one is not in that list."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        self._names: dict[str, str] | None = None
        self._relisted = False
        self._lock = threading.Lock()

    def key_of(self, pack_id: str) -> str | None:
        with self._lock:
            if self._names is None:
                self._names = list_trashed(self._backend)
            elif pack_id not in self._names and not self._relisted:
                self._relisted = True
                self._names = list_trashed(self._backend)
            return self._names.get(pack_id)


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write ``data`` at ``offset``."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def fetch_files(
    backend: Backend,
    index: ChunkIndex,
    jobs: list[FileJob],
    *,
    threads: int,
    finished: Callable[[FileJob, int], None],
    trash: PackTrash | None = None,
    reload: Callable[[], ChunkIndex] | None = None,
    dictionaries: packs.Dictionaries | None = None,
    blocks_per_read: int = BLOCKS_PER_READ,
) -> Outcome:
    """Write every chunk of ``jobs`` into their temp files. ``finished(job, fd)`` is called
    (from a worker thread) as soon as a job's last chunk is written, with a descriptor of
    the temp file still open (closed once it returns: the file's mode and state are set
    and read through it, without another path lookup); failed jobs are
    returned, their ``failed`` saying why. OSErrors of writing (a full disk) propagate.
    ``reload()`` lists the indexes again, once, when a chunk has no location left.
    ``dictionaries`` rebuilds the dictionaries of blocks compressed with one (without it,
    such blocks count as unreadable and other locations are tried). ``blocks_per_read``:
    the blocks of one pack one task reads (neighbours in one request) and decompresses."""
    trash = trash if trash is not None else PackTrash(backend)
    outcome = Outcome()
    lock = threading.Lock()
    uses: dict[bytes, list[tuple[FileJob, int, int]]] = defaultdict(list)  # job, offset, size
    for job in jobs:
        offset = 0
        for ref in job.entry.chunks:
            uses[ref.digest].append((job, offset, ref.size))
            offset += ref.size
        job.remaining = len(job.entry.chunks)
    for job in jobs:
        if job.remaining == 0:  # an empty file
            fd = _open_temp(job)
            if fd is not None:
                try:
                    finished(job, fd)
                finally:
                    os.close(fd)
    # Packs by their raw id (PackIndex.pack): the hex id is for messages only.
    tried: dict[bytes, set[bytes]] = defaultdict(set)
    damaged_blocks: set[tuple[str, int]] = set()
    pending = set(uses)
    why: dict[bytes, str] = {}

    def deliver(loc: ChunkLoc, data: memoryview) -> None:
        for job, offset, size in uses[loc.digest]:
            with lock:
                if job.failed is not None:
                    continue
                if size != len(data):
                    # The manifest declares another size for these bytes: the file it
                    # describes cannot be these chunks.
                    job.failed = f"chunk {loc.digest.hex()} holds {len(data)} bytes, not {size}"
                    continue
            fd = _open_temp(job)
            if fd is None:
                continue
            try:
                try:
                    _write_all(fd, data, offset)
                except OSError as e:
                    if e.errno in FATAL_ERRNOS:
                        raise
                    with lock:
                        if job.failed is None:
                            job.failed = f"could not write its temp file: {e.strerror or e}"
                    continue
                with lock:
                    job.remaining -= 1
                    done = job.remaining == 0 and job.failed is None
                if done:
                    finished(job, fd)
            finally:
                os.close(fd)

    def read(task: tuple[PackIndex, list[int], dict[int, list[ChunkLoc]]]) -> set[bytes]:
        """Read some blocks of one pack and deliver their chunks; the digests it could
        not deliver."""
        index, numbers, wanted = task
        source = packs.pack_key(index.pack)
        failed: set[bytes] = set()
        try:
            blocks = _read(backend, trash, index, numbers, dictionaries)
        except (CasstoreError, OSError) as e:
            # Gone, unreadable (permissions, I/O), the store unreachable: these chunks'
            # other packs are tried next; only this pack's files are at stake.
            gone = isinstance(e, NotFound)
            with lock:
                (absent if gone else broken).add(index.pack)
            for n in numbers:
                for loc in wanted[n]:
                    why[loc.digest] = f"pack {index.id} is gone" if gone else str(e)
            return {loc.digest for n in numbers for loc in wanted[n]}
        for n in numbers:
            # Chunks are checked and written as views of their block: no copy of each.
            block = memoryview(blocks[n]) if n in blocks else None
            for loc in wanted[n]:
                if block is None:
                    why[loc.digest] = f"a block of pack {index.id} is damaged"
                    failed.add(loc.digest)
                    with lock:
                        damaged_blocks.add((index.id, n))
                    continue
                try:
                    data = packs.chunk_of(block, loc, source)
                except CorruptObject as e:
                    why[loc.digest] = str(e)
                    failed.add(loc.digest)
                    with lock:
                        damaged_blocks.add((index.id, n))
                    continue
                deliver(loc, data)
        with lock:
            outcome.bytes_fetched += sum(index.blocks[n].length for n in numbers if n in blocks)
        return failed

    absent: set[bytes] = set()  # packs in neither packs/ nor trash/: skipped for every chunk
    broken: set[bytes] = set()  # packs that failed otherwise this pass
    reloaded = False
    rounds = passes = 0

    def choices(where: ChunkIndex, digest: bytes) -> list[Location]:
        return [
            loc
            for loc in where.locate(digest)
            if loc.index.pack not in tried[digest] and loc.index.pack not in absent
        ]

    while pending and rounds < ROUNDS and passes < MAX_PASSES:
        passes += 1
        options = {digest: choices(index, digest) for digest in pending}
        if not reloaded and reload is not None and not all(options.values()):
            # A chunk with no location left: the listing of indexes may predate a pack
            # (gc repacked it, or another host's save is not visible yet): list again, once.
            try:
                index = reload()
                options = {digest: choices(index, digest) for digest in pending}
            except (CasstoreError, OSError) as e:
                log.warning("could not list the pack indexes again: %s", e)
            reloaded = True
        plan: dict[bytes, tuple[PackIndex, dict[int, list[ChunkLoc]]]] = {}
        unplaced: set[bytes] = set()
        for digest, left in options.items():
            if not left:
                unplaced.add(digest)
                why.setdefault(digest, f"chunk {digest.hex()} is in no pack of the store")
                continue
            loc = left[-1]  # the most recently published pack
            tried[digest].add(loc.index.pack)
            entry = plan.setdefault(loc.index.pack, (loc.index, defaultdict(list)))
            entry[1][loc.chunk.block].append(loc.chunk)
        tasks = []
        for pack_index, by_block in plan.values():
            numbers = sorted(by_block)
            for i in range(0, len(numbers), blocks_per_read):
                group = numbers[i : i + blocks_per_read]
                tasks.append((pack_index, group, {n: by_block[n] for n in group}))
        failed: set[bytes] = set(unplaced)
        broken.clear()
        damaged_before = len(damaged_blocks)
        with ThreadPoolExecutor(
            max(1, min(threads, MAX_READERS)), thread_name_prefix="casstore-read"
        ) as pool:
            for lost in pool.map(read, tasks):
                failed |= lost
        if broken or len(damaged_blocks) > damaged_before:
            rounds += 1  # something real failed, not only packs that do not exist
        pending = failed - unplaced
        for digest in unplaced:
            _fail(uses[digest], why[digest], lock)
    for digest in pending:
        _fail(uses[digest], why.get(digest, "unreadable"), lock)
    outcome.failed = [job for job in jobs if job.failed is not None]
    return outcome


def _fail(placements: list[tuple[FileJob, int, int]], why: str, lock: threading.Lock) -> None:
    with lock:
        for job, _, _ in placements:
            if job.failed is None:
                job.failed = why


def _read(
    backend: Backend,
    trash: PackTrash,
    index: PackIndex,
    numbers: list[int],
    dictionaries: packs.Dictionaries | None,
) -> dict[int, bytes]:
    """The blocks, decompressed; a damaged block is left out (the others still serve).
    NotFound when the pack is neither in packs/ nor in trash/; DictionaryUnavailable when
    a block's dictionary cannot be rebuilt."""
    try:
        return _read_isolating(backend, index, numbers, dictionaries)
    except NotFound:
        trash_key = trash.key_of(index.id)
        if trash_key is None:
            raise
        try:
            return _read_isolating(backend, index, numbers, dictionaries, trash_key)
        except NotFound:  # given back (or deleted) since the trash was listed
            return _read_isolating(backend, index, numbers, dictionaries)


def _read_isolating(
    backend: Backend,
    index: PackIndex,
    numbers: list[int],
    dictionaries: packs.Dictionaries | None,
    key: str | None = None,
) -> dict[int, bytes]:
    try:
        return packs.read_blocks(backend, index, numbers, key=key, dictionaries=dictionaries)
    except CorruptObject:
        if len(numbers) == 1:
            return {}
    out: dict[int, bytes] = {}
    for n in numbers:
        try:
            out.update(packs.read_blocks(backend, index, [n], key=key, dictionaries=dictionaries))
        except CorruptObject as e:
            log.warning("%s", e)
    return out

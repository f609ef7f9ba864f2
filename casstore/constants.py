"""Constants that are part of the on-disk format (see docs/format.md).

Changing any value in the FORMAT section changes how trees are cut and stored; it requires
a new ``FORMAT_VERSION``, because every writer in the organisation must cut the same way
for chunks to deduplicate.
"""

from __future__ import annotations

import os
from typing import Final

# --- FORMAT -------------------------------------------------------------------------------
# 3: blocks may be compressed with a dictionary of stored chunks (index format 2); a gc
# that does not know dictionaries would sweep the chunks they name, so such a casstore
# must not open the store at all. 2: chunks live in packs (packs/, index/); 1 stored one
# object per chunk (chunks/).
FORMAT_VERSION = 3
MANIFEST_FORMAT_VERSION = 1
# A signed manifest: an envelope holding a format-1 document and its signature.
SIGNED_MANIFEST_FORMAT_VERSION = 2

# FastCDC (2020 variant, normalised chunking level 1, default gear table). Sizes chosen in
# docs/decisions.md: inductor caches are thousands of small files (one chunk each) plus a
# few large binaries (precompiled headers ~150 MB, .so files) where a 1-byte change, such as
# an embedded build path, must only cost a few hundred KiB.
CHUNK_MIN_SIZE = 32 * 1024
CHUNK_AVG_SIZE = 128 * 1024
CHUNK_MAX_SIZE = 512 * 1024
CHUNK_NORMALIZED: Final = 1
CHUNK_SEED = 0

DIGEST_ALGORITHM = "blake3"
DIGEST_SIZE = 32  # bytes; hex form is 64 characters
COMPRESSION = "zstd"
ZSTD_LEVEL = 3

# Packs fan out on the first FANOUT_CHARS hex characters of their id (git's scheme): 256
# directories. (Three characters, 4096 dirs, made a first save of one object per chunk
# spend most of its time in mkdir; see docs/decisions.md.)
FANOUT_CHARS = 2

S3_SCHEME = "s3://"  # a store root with this prefix is an object store (backends/s3.py)
LAYOUT_FILE = "CASSTORE"
MANIFESTS_DIR = "manifests"
LOCKS_DIR = "locks"
QUARANTINE_DIR = "quarantine"
ACCESS_DIR = "access"  # access/<key id>: an empty marker whose mtime is the key's last load
TRASH_DIR = "trash"  # gc moves chunks here before deleting them (see docs/gc.md)
PACKS_DIR = "packs"  # packs/<hh>/<pack id>.pack: many chunks in zstd blocks (packs.py)
INDEX_DIR = "index"  # index/<pack id>.idx: where each chunk of a pack lies

# A manifest file starts with these bytes, then the BLAKE3-256 of the msgpack body.
MANIFEST_MAGIC = b"CASMF\x00"
PACK_SUFFIX = ".pack"
INDEX_SUFFIX = ".idx"
# A pack index starts with these bytes, then the BLAKE3-256 of the msgpack body.
INDEX_MAGIC = b"CASIX\x00"

# Packs (docs/decisions.md, "Packs and compression"). A block is one zstd frame of whole
# chunks: a compile cache's redundancy across files shows only in multi-MiB frames
# (measured on six GPU caches: 1 MiB blocks 0.66x of tar.gz, 4-8 MiB 0.41x). A pack closes
# once its blocks pass PACK_TARGET compressed bytes.
BLOCK_TARGET = 8 * 2**20
PACK_TARGET = 16 * 2**20
MANIFEST_SUFFIX = ".manifest"

# Temp files live in the directory of the object they become (cross-directory renames
# misbehave on some network filesystems) and carry this prefix plus a random suffix.
TEMP_PREFIX = ".tmp-"

# --- WRITER CHOICES (not format: any zstd level decodes the same way) ---------------------
# Blocks of small files' chunks, where compile caches repeat themselves: level 6 stores
# six GPU caches in 0.35x the bytes of their tar.gz at ~200 MB/s per core, level 3 in
# 0.41x at ~600 MB/s (docs/decisions.md). Large files' chunks (binaries): level 3.
SMALL_FILE_LEVEL = 6
LARGE_FILE_LEVEL = 3
# Cross-save compression (docs/decisions.md): a save compresses its blocks of small files'
# chunks with, as a zstd raw-content dictionary, chunks of plain small-file blocks that
# recent manifests list, up to DICTIONARY_TARGET bytes (on six GPU caches 4 MiB stored
# 0.24x of tar.gz, 2 MiB 0.30x, 1 MiB 0.35x, 8 MiB no better than 4). A block keeps its
# dictionary only when that makes it at most DICTIONARY_GAIN of its size compressed
# without one at DICTIONARY_ESTIMATE_LEVEL (fast; its own level is compressed only for a
# block stored plain); otherwise it is stored plain and feeds later saves' dictionaries.
DICTIONARY_TARGET = 4 * 2**20
DICTIONARY_GAIN = 0.7
DICTIONARY_ESTIMATE_LEVEL = 1
# Window and match-table sizes (log2) for blocks compressed with a dictionary: the window
# spans a dictionary and a block (4 + 9 MiB), the tables index a million positions (4 MiB
# each; larger ones found no more on the GPU caches, smaller ones lost most of it).
DICTIONARY_WINDOW_LOG = 24
DICTIONARY_TABLE_LOG = 20
# A dictionary costs a save (and every restore of the block) a read of up to 4 MiB of
# chunks: worth it only for a block of at least this much; smaller ones (a save healing a
# lost chunk, a few changed files) stay plain.
DICTIONARY_MIN_BLOCK = 256 * 1024
# Nor for a block that zstd level 1 leaves above this fraction of its size (random bytes,
# compressed files): reading and preparing the dictionary made saves of such trees 2.5-4x
# slower (20-40 ms -> 70-100 ms for 2.5 MB) for nothing.
DICTIONARY_INCOMPRESSIBLE = 0.9
# Blocks of one pack that lie closer than this are read with one range.
COALESCE_GAP = 2**20

# --- LIMITS (not format; defensive bounds on what a reader accepts) -------------------------
MAX_PACK_BYTES = 2**30
MAX_BLOCK_USIZE = BLOCK_TARGET + 2 * CHUNK_MAX_SIZE
MAX_INDEX_BYTES = 64 * 2**20
# A dictionary lists at most this many chunks, each once, and a reader rebuilds none
# larger than MAX_DICTIONARY_BYTES (a hostile index could list its largest chunks).
MAX_DICTIONARY_CHUNKS = 65536
MAX_DICTIONARY_BYTES = 2 * DICTIONARY_TARGET
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_FILE_SIZE = 1 << 40  # 1 TiB: a declared size above this is treated as hostile
MAX_PATH_BYTES = 4096
MAX_FILES_PER_MANIFEST = 10_000_000
# Files at least this large are cut from a stream instead of being read whole: memory per
# saving thread stays bounded whatever the size of the tree's largest file.
STREAM_MIN_FILE_SIZE = 4 * 2**20
MAX_MANIFEST_TIME = 4_102_444_800.0  # 2100-01-01: a later created_at is a broken clock

# --- DEFAULTS -----------------------------------------------------------------------------
ORG_CACHE_MOUNT = "/cache/org"
DEFAULT_ORG_ROOT = "/cache/org/cas"
# I/O threads: enough to hide network-filesystem latency, few enough not to thrash 2 cores.
DEFAULT_THREADS = min(32, 4 * (os.cpu_count() or 2))
# At least this many for an object store (s3://): each request waits a network round trip.
OBJECT_STORE_THREADS = 32

"""Content fingerprints: a digest of every byte of a shard, cached across restarts.

A shard's fingerprint covers its size, record count, schema and an xxh3-128
digest of all its bytes (DESIGN, "Content fingerprints"), so two workers that
agree on a fingerprint serve the same records. Computing the digest reads the
whole shard once, in large blocks; the result is kept in a small SQLite file
(`DigestCache`), keyed by the shard's path and version (`_files.shard_version`:
size, mtime_ns, ctime_ns and inode for a local file), so a restart over
unchanged shards reads none of them. A file rewritten in place whose size and
mtime were put back with `os.utime` still has a new ctime: it is read again.

The cache only saves time. When it cannot be used (no writable cache directory
in a container, a locked or damaged file) the worker says so once and reads
every shard; it never refuses to serve because of it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import xxhash

from shardstream.server._files import ShardPath, Stamp, open_shard, shard_version
from shardstream.server.errors import ShardChanged
from shardstream.v1.codec import FieldSpec

__all__ = [
    "ALGORITHM",
    "Digest",
    "DigestCache",
    "Digester",
    "file_digest",
    "shard_fingerprint",
]

log = logging.getLogger("shardstream.index")

ALGORITHM = "xxh3_128"  # of every byte: about 4.5 GB/s per core from the page cache
BLOCK = 8 << 20  # bytes read at a time (measured fastest of 1-16 MiB)
THREADS = min(4, os.cpu_count() or 1)  # shards hashed at once (xxhash releases the GIL)
PROGRESS_SECONDS = 5.0  # at most one progress line this often
CACHE_FILE = "digests.sqlite3"
CACHE_KEEP_SECONDS = 30 * 86400  # entries unused this long are dropped

_local = threading.local()  # each digest thread's read buffer


def file_digest(path: ShardPath, progress: Progress | None = None) -> str:
    """The hex xxh3-128 digest of every byte of a shard (local path or URL)."""
    h = xxhash.xxh3_128()
    buf = getattr(_local, "buffer", None)
    if buf is None:  # one per thread, reused: a fresh 8 MiB per small shard costs more
        buf = _local.buffer = bytearray(BLOCK)
    view = memoryview(buf)
    if isinstance(path, Path):
        with open(path, "rb", buffering=0) as local:
            while n := local.readinto(buf):
                h.update(view[:n])
                if progress is not None:
                    progress.read(n)
    else:
        with open_shard(path) as remote:
            while data := remote.read(BLOCK):
                h.update(data)
                if progress is not None:
                    progress.read(len(data))
    return h.hexdigest()


def shard_fingerprint(
    size: int, records: int, schema: Sequence[FieldSpec], digest: str, params: str = ""
) -> str:
    """A shard's fingerprint: its size, record count, schema and content digest, and the
    options outside the file that shape its records (`ShardMeta.params`), if any."""
    h = hashlib.blake2b(digest_size=12)
    h.update(f"{size}:{records}:{';'.join(map(str, schema))}:{ALGORITHM}:{digest}".encode())
    if params:
        h.update(b"\0params\0" + params.encode())
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Digest:
    """A shard's content digest and the stamp of the file it was computed from."""

    digest: str
    size: int
    stamp: Stamp  # `shard_stat` before reading (the file was the same after)
    cached: bool  # from the cache, without reading the file


class DigestCache:
    """Content digests by (path, version), in `DIR/digests.sqlite3`. Thread-safe;
    every method swallows the cache's own failures (logged once) and then does
    nothing, so a worker without a usable cache only reads more."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / CACHE_FILE
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._broken = False

    def get(self, path: ShardPath, version: tuple[int | str, ...]) -> str | None:
        with self._lock:
            db = self._connect()
            if db is None:
                return None
            try:
                row = db.execute(
                    "SELECT digest, used FROM digests WHERE path = ? AND version = ? "
                    "AND algorithm = ?",
                    (str(path), json.dumps(version), ALGORITHM),
                ).fetchone()
                if row is not None and row[1] < time.time() - 86400:
                    db.execute(
                        "UPDATE digests SET used = ? WHERE path = ? AND algorithm = ?",
                        (int(time.time()), str(path), ALGORITHM),
                    )
            except sqlite3.Error as exc:
                self._give_up(exc)
                return None
            return None if row is None else str(row[0])

    def put(self, path: ShardPath, version: tuple[int | str, ...], digest: str) -> None:
        with self._lock:
            db = self._connect()
            if db is None:
                return
            try:
                db.execute(
                    "INSERT OR REPLACE INTO digests (path, algorithm, version, digest, used) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (str(path), ALGORITHM, json.dumps(version), digest, int(time.time())),
                )
            except sqlite3.Error as exc:
                self._give_up(exc)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _connect(self) -> sqlite3.Connection | None:
        if self._db is not None or self._broken:
            return self._db
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            try:
                db.execute("PRAGMA journal_mode = WAL")  # several workers on one host
                db.execute("PRAGMA synchronous = NORMAL")  # a lost entry is only read again
                db.execute(
                    "CREATE TABLE IF NOT EXISTS digests (path TEXT NOT NULL, "
                    "algorithm TEXT NOT NULL, version TEXT NOT NULL, digest TEXT NOT NULL, "
                    "used INTEGER NOT NULL, PRIMARY KEY (path, algorithm)) WITHOUT ROWID"
                )
                db.execute(
                    "DELETE FROM digests WHERE used < ?", (int(time.time()) - CACHE_KEEP_SECONDS,)
                )
            except BaseException:
                db.close()
                raise
        except (OSError, sqlite3.Error) as exc:
            self._give_up(exc)
            return None
        self._db = db
        return db

    def _give_up(self, exc: Exception) -> None:
        self._broken = True
        if self._db is not None:
            self._db.close()
            self._db = None
        log.warning(
            "digest cache %s cannot be used (%s): shards are read in full at every start; "
            "give a writable --cache-dir (SHARDSTREAM_CACHE_DIR), or 'off'",
            self.path,
            exc,
        )


class Progress:
    """Counts what indexing read and logs it now and then (from any thread)."""

    def __init__(self, dataset: str, shards: int) -> None:
        self.dataset = dataset
        self.shards = shards
        self.done = 0
        self.cached = 0
        self.bytes = 0
        self._lock = threading.Lock()
        self._start = self._logged = time.monotonic()

    def read(self, n: int) -> None:
        with self._lock:
            self.bytes += n
            self._maybe_log()

    def finished(self, *, cached: bool) -> None:
        with self._lock:
            self.done += 1
            self.cached += cached
            self._maybe_log()

    def _maybe_log(self) -> None:
        now = time.monotonic()
        if now - self._logged >= PROGRESS_SECONDS:
            self._logged = now
            log.info("dataset %r: indexing, %s", self.dataset, self.summary(now))

    def summary(self, now: float | None = None) -> str:
        seconds = max((now or time.monotonic()) - self._start, 1e-9)
        return (
            f"{self.done}/{self.shards} shards, {self.cached} digests from the cache, "
            f"{self.bytes / 1e9:.2f} GB read in {seconds:.1f}s "
            f"({self.bytes / 1e9 / seconds:.2f} GB/s)"
        )


class Digester:
    """Computes (or finds in a cache) the content digests of shards, a few at a time
    in threads of its own. Use `async with`."""

    def __init__(self) -> None:
        self._caches: dict[Path, DigestCache] = {}
        self._threads = ThreadPoolExecutor(THREADS, thread_name_prefix="shardstream-digest")

    async def digest(self, path: ShardPath, progress: Progress, cache_dir: Path | None) -> Digest:
        """The digest of a shard; `ShardChanged` if it changed while it was read, OSError
        if it cannot be read. `cache_dir`: where the cache is, None for no cache."""
        cache = None
        if cache_dir is not None:
            cache = self._caches.get(cache_dir) or self._caches.setdefault(
                cache_dir, DigestCache(cache_dir)
            )
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, _digest, path, progress, cache)

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: self._threads.shutdown(wait=True, cancel_futures=True)
        )
        for cache in self._caches.values():
            cache.close()

    async def __aenter__(self) -> Digester:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


def _digest(path: ShardPath, progress: Progress, cache: DigestCache | None) -> Digest:
    stamp, version = shard_version(path)
    if cache is not None and version is not None:
        found = cache.get(path, version)
        if found is not None:
            progress.finished(cached=True)
            return Digest(found, stamp[0], stamp, cached=True)
    digest = file_digest(path, progress)
    if shard_version(path) != (stamp, version):
        raise ShardChanged("it changed while it was being read")
    if cache is not None and version is not None:
        cache.put(path, version, digest)
    progress.finished(cached=False)
    return Digest(digest, stamp[0], stamp, cached=False)

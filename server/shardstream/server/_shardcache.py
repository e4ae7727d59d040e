"""A local cache of the shards of an fsspec data root (`--shard-cache-dir`).

Under a URL data root (`s3://`, `gs://`, ...) every open of a shard reads it
from the store. With a shard cache, the first open downloads the shard whole
into a local directory and later opens (a later epoch, another decoding
process, a restarted worker, another worker sharing the directory) read that
copy:

    DIR/index.sqlite3   entries (URL, the store's version, size, content digest,
                        the copy's stat, last use) and the digests each worker
                        run indexed (a run checks against its own only)
    DIR/shards/NAME     the copies; NAME is a hash of the URL and its file name
    DIR/locks/NAME      a lock file per entry (flock)
    DIR/index.lock      taken (flock) while a worker creates or checks the index

A copy is served only while (1) the store reports the version it was downloaded
at (`_files.shard_version`: size and every time, checksum, ETag or version it
reports), (2) the copy's stat (size, mtime, ctime, inode) is the one recorded
after the download, so a copy changed or truncated on disk is downloaded again,
never served (a write can put the mtime back with `os.utime`, not the ctime),
and (3) its xxh3-128 digest, computed while it was downloaded, is the digest the
worker indexed for that version (`expect`, once indexing is done). A download
whose digest differs from the indexed one is refused with `ShardChanged`.

Downloads go to a temporary name, renamed into place under the entry's
exclusive lock, so processes opening the same shard at once download it once:
the others wait for the lock, then read the copy. Readers hold a shared lock
only while they find and open a copy. Eviction takes an entry's lock without
waiting (it skips entries being opened or downloaded) and unlinks the copy; a
reader that has it open reads on (Linux frees the space when it closes it).

The copies, and the downloads under way, stay within `max_bytes`: before a
download, the least recently used copies are evicted until it fits. A shard
larger than the bound, or one that finds no room because every other entry is
being read or downloaded, is read from the store without a copy; so is every
shard of a store that reports only sizes (no version to check a copy against).

The cache only saves reads. If it fails at run time (disk full, index damaged),
the process says so once and reads from the store from then on. Hits, misses
and evictions are counted in shared memory of the server (`Counters`), which
decoding processes add to; `collector` serves them to Prometheus.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import secrets
import socket
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import xxhash

from shardstream.server import _files
from shardstream.server._cachestats import (
    EVICTIONS,
    HITS,
    MISSES,
    CacheCollector,
    CacheStatistics,
    Counters,
)
from shardstream.server._decoding import process_init as decoding_process_init
from shardstream.server._files import Stamp, filesystem, open_url, shard_version, stat_stamp
from shardstream.server._fingerprint import ALGORITHM, BLOCK
from shardstream.server._shm import BlockHandle
from shardstream.server.errors import ShardChanged

if TYPE_CHECKING:
    from shardstream.server._catalog import Catalog
    from shardstream.server._config import WorkerConfig

__all__ = [
    "CacheSettings",
    "CacheStatistics",
    "Counters",
    "ShardDiskCache",
    "install",
    "open_cache",
    "process_init",
    "uninstall",
]

log = logging.getLogger("shardstream.cache")

INDEX_FILE = "index.sqlite3"
INDEX_LOCK = "index.lock"
KEEP_SECONDS = 30 * 86400  # indexed digests not seen by a worker for this long are dropped
_PART = "~"  # NAME~PID-THREAD.part: a download under way (names never hold a '~')

_SCHEMA = (
    # pending: 1 while it is being downloaded (its size counts towards the bound)
    "CREATE TABLE IF NOT EXISTS entries (name TEXT PRIMARY KEY, url TEXT NOT NULL, "
    "version TEXT NOT NULL, size INTEGER NOT NULL, digest TEXT NOT NULL, "
    "local TEXT NOT NULL, used INTEGER NOT NULL, pending INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS entries_used ON entries (used)",
    # per worker run (`owner`): a digest another run indexed says nothing of this run's
    "CREATE TABLE IF NOT EXISTS indexed_by (owner TEXT NOT NULL, url TEXT NOT NULL, "
    "stamp TEXT NOT NULL, digest TEXT NOT NULL, seen INTEGER NOT NULL, "
    "PRIMARY KEY (owner, url, stamp)) WITHOUT ROWID",
    "DROP TABLE IF EXISTS indexed",  # of earlier versions, shared by every run
)
_TOUCH = "(SELECT COALESCE(MAX(used), 0) + 1 FROM entries)"  # a logical clock: LRU order


@dataclass(frozen=True, slots=True)
class CacheSettings:
    """What a decoding process needs to use its server's shard cache."""

    directory: Path
    max_bytes: int
    root: str
    counters: Counters
    owner: str  # the worker run whose indexed digests apply
    log_level: int  # of the server's "shardstream.cache" logger
    log_format: str | None  # of the server's log handler; None: it has none


@dataclass(frozen=True, slots=True)
class _Want:
    """A shard as the store reports it now."""

    url: str
    stamp: Stamp
    version: tuple[int | str, ...]

    @property
    def size(self) -> int:
        return self.stamp[0]


@dataclass(slots=True)
class _Evictions:
    """The entries evicted in one write transaction, and the locks held on them."""

    locks: contextlib.ExitStack[bool | None]
    names: list[str] = field(default_factory=list)


class _CacheFailure(Exception):
    """The cache's own disk or index failed (its cause says how), not the store."""


@contextlib.contextmanager
def _local() -> Iterator[None]:
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        raise _CacheFailure(exc) from exc


def _text(value: tuple[int | str, ...]) -> str:
    return json.dumps(value)


def entry_name(url: str) -> str:
    """The name of a URL's copy: a hash of the URL, then its file name (for people)."""
    digest = hashlib.blake2b(url.encode(), digest_size=12).hexdigest()
    base = re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1])[-64:]
    return f"{digest}-{base}"


class ShardDiskCache:
    """Local copies of URL shards in `directory`, at most `max_bytes` of them; safe
    to use from several threads, processes and workers at once. Call `prepare` once
    (the server) before other processes use the directory."""

    def __init__(
        self,
        directory: Path,
        max_bytes: int,
        *,
        root: str = "",
        counters: Counters | None = None,
        owner: str = "",
    ) -> None:
        if max_bytes < 1:
            raise ValueError(f"the shard cache's max_bytes must be positive, got {max_bytes}")
        self.directory = directory
        self.max_bytes = max_bytes
        self.root = _canonical(root)  # the URLs it caches ("" for all)
        self._counters = counters if counters is not None else Counters()
        # The worker run this cache serves (its decoding processes get the same): the
        # digests it checks copies and downloads against are the ones this run indexed.
        self.owner = owner or f"{socket.gethostname()}/{os.getpid()}/{secrets.token_hex(8)}"
        self._shards = directory / "shards"
        self._locks = directory / "locks"
        self._threads = threading.local()  # each thread's index connection
        self._connections: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        self._broken = False

    @classmethod
    def from_settings(cls, settings: CacheSettings) -> ShardDiskCache:
        return cls(
            settings.directory,
            settings.max_bytes,
            root=settings.root,
            counters=settings.counters,
            owner=settings.owner,
        )

    def settings(self) -> CacheSettings:
        """For decoding processes: the same directory, bound and counters."""
        handler = next((h for h in logging.getLogger().handlers if h.formatter), None)
        return CacheSettings(
            directory=self.directory,
            max_bytes=self.max_bytes,
            root=self.root,
            counters=self._counters,
            owner=self.owner,
            log_level=log.getEffectiveLevel(),
            log_format=None if handler is None or handler.formatter is None
            else handler.formatter._fmt,
        )  # fmt: skip

    def covers(self, url: str) -> bool:
        return not self.root or url.startswith(self.root + "/")

    # -- the server's side ---------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directory and its index, drop what killed processes left (partial
        downloads, copies changed on disk, files the index does not know), and evict down
        to the bound. OSError saying so if the directory cannot be used."""
        try:
            for d in (self.directory, self._shards, self._locks):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            try:
                self._create()
            except sqlite3.DatabaseError as exc:
                if exc.sqlite_errorname not in ("SQLITE_NOTADB", "SQLITE_CORRUPT"):
                    raise
                log.warning("shard cache: the index %s is damaged (%s): starting anew",
                            self.directory / INDEX_FILE, exc)  # fmt: skip
                self.close_connections()
                for suffix in ("", "-wal", "-shm"):
                    (self.directory / f"{INDEX_FILE}{suffix}").unlink(missing_ok=True)
                self._create()
            self._tidy()
        except (OSError, sqlite3.Error) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise OSError(
                f"cannot use the shard cache directory {self.directory}: {why}; give a "
                "writable local directory (--shard-cache-dir)"
            ) from None

    def _create(self) -> None:
        # SQLite does not wait (busy timeout) to change the journal mode while another
        # connection has the file open: workers starting together on one directory
        # failed with "database is locked". They take turns here instead.
        fd = os.open(self.directory / INDEX_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            db = self._db()
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                db.execute("PRAGMA journal_mode = WAL")  # readers do not wait for writers
            for statement in _SCHEMA:
                db.execute(statement)
        finally:
            os.close(fd)  # and the lock with it

    def _tidy(self) -> None:
        evicted = 0
        with self._write_evicting() as (db, ev):
            db.execute("DELETE FROM indexed_by WHERE seen < ?", (int(time.time()) - KEEP_SECONDS,))
            host = socket.gethostname()
            for (owner,) in db.execute("SELECT DISTINCT owner FROM indexed_by").fetchall():
                where, _, pid = owner.rpartition("/")[0].rpartition("/")
                if where == host and pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                    db.execute("DELETE FROM indexed_by WHERE owner = ?", (owner,))  # run over
            for name, local, pending in db.execute(
                "SELECT name, local, pending FROM entries"
            ).fetchall():
                try:
                    whole = not pending and _text(stat_stamp(os.stat(self._shards / name))) == local
                except FileNotFoundError:
                    whole = False
                if not whole:
                    self._evict(db, ev, name)  # skipped if a process of another worker holds it
            known = {name for (name,) in db.execute("SELECT name FROM entries")}
            leftovers: dict[str, list[Path]] = {}  # files of no entry, partial downloads
            for path in [*self._shards.iterdir(), *self._locks.iterdir()]:
                name = path.name.split(_PART, 1)[0]
                if name not in known or (path.parent == self._shards and path.name != name):
                    leftovers.setdefault(name, []).append(path)
            for name, paths in leftovers.items():
                with self._locked(name, exclusive=True, blocking=False) as held:
                    if held:  # else a process (of another worker) is at it
                        for path in paths:
                            path.unlink(missing_ok=True)
                        if name not in known:
                            (self._locks / name).unlink(missing_ok=True)
            total = db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
            for name, size in db.execute("SELECT name, size FROM entries ORDER BY used").fetchall():
                if total <= self.max_bytes:
                    break
                if self._evict(db, ev, name):
                    total -= size
                    evicted += 1
        self._counters.add(EVICTIONS, evicted)

    def expect(self, catalog: Catalog) -> None:
        """Record the digest the worker indexed for each URL shard (after indexing):
        from then on, copies of another content are not served, and downloads of
        another content are refused. Logs the shards that cannot be kept."""
        now = int(time.time())
        rows, large, unversioned = [], [], 0
        for ds in catalog.datasets.values():
            for s in ds.shards:
                if isinstance(s.path, str) and self.covers(s.path):
                    rows.append(
                        (self.owner, s.path, _text(s.stamp), f"{ALGORITHM}:{s.digest}", now)
                    )
                    unversioned += s.stamp[1] == ""
                    if s.size > self.max_bytes:
                        large.append(s.size)
        try:
            with _local(), self._write() as db:
                db.executemany("INSERT OR REPLACE INTO indexed_by VALUES (?, ?, ?, ?, ?)", rows)
        except _CacheFailure as exc:
            self._give_up(exc.__cause__)
        if large:
            log.warning(
                "shard cache: %d shard(s) are larger than --shard-cache-bytes (%d bytes; the "
                "largest has %d): they are read from the data root at every open",
                len(large), self.max_bytes, max(large),
            )  # fmt: skip
        if unversioned:
            log.warning(
                "shard cache: the data root reports only the size of %d shard(s), no time, "
                "checksum or version to check a copy against: they are read from it at "
                "every open", unversioned,
            )  # fmt: skip

    def statistics(self) -> CacheStatistics:
        hits, misses, evictions = self._counters.values()
        try:
            (size,) = (
                self._db()
                .execute("SELECT COALESCE(SUM(size), 0) FROM entries WHERE pending = 0")
                .fetchone()
            )
        except sqlite3.Error:
            size = 0
        return CacheStatistics(hits=hits, misses=misses, evictions=evictions, bytes=int(size))

    def collector(self) -> CacheCollector:
        """A Prometheus collector of `statistics` (`WorkerMetrics.add_collector`)."""
        return CacheCollector(self.statistics)

    def close(self) -> None:
        """Stop using the cache in this process (idempotent)."""
        uninstall(self)
        self.close_connections()
        self._counters.close()

    def close_connections(self) -> None:
        with self._guard:
            for db in self._connections:
                db.close()
            self._connections.clear()
            self._threads = threading.local()

    # -- every process's side ------------------------------------------------------------

    def open(self, url: str) -> IO[bytes]:
        """A shard's local copy, downloaded first if need be; the shard itself (read
        from the store) if it cannot be kept. The store's errors are raised as they
        are; `ShardChanged` if it changed, or differs from what was indexed."""
        stamp, version = shard_version(url)
        if version is None or stamp[0] > self.max_bytes or self._broken:
            self._counters.add(MISSES)
            return open_url(url)
        want, name = _Want(url, stamp, version), entry_name(url)
        counted = False
        try:
            with _local():
                self._indexed(want)  # ShardChanged before any download, if it changed
            with _local(), self._locked(name, exclusive=False):
                found = self._open_copy(name, want, quiet=True)
            if found is None:
                with contextlib.ExitStack() as held:
                    with _local():
                        held.enter_context(self._locked(name, exclusive=True))
                        found = self._open_copy(name, want, quiet=False)
                    if found is None:  # nobody downloaded it while this process waited
                        self._counters.add(MISSES)
                        counted = True
                        return self._fetch(name, want)
        except _CacheFailure as exc:
            self._give_up(exc.__cause__)
            if not counted:
                self._counters.add(MISSES)
            return open_url(url)
        self._counters.add(HITS)
        return found

    def _open_copy(self, name: str, want: _Want, *, quiet: bool) -> IO[bytes] | None:
        """The entry's copy, opened, if it may be served (see the module docstring)."""
        db = self._db()
        row = db.execute(
            "SELECT url, version, digest, local FROM entries WHERE name = ? AND pending = 0",
            (name,),
        ).fetchone()
        if row is None:
            return None
        url, version, digest, local = row
        why = ""
        if url != want.url or version != _text(want.version):
            why = "it changed in the data root"
        else:
            indexed = self._indexed(want)
            if indexed is not None and indexed != digest:
                why = f"the copy's digest {digest} is not the one indexed, {indexed}"
        path = self._shards / name
        f = None
        if not why:
            try:
                f = open(path, "rb")  # noqa: SIM115
            except FileNotFoundError:
                why = "the copy is gone"
        if f is not None and _text(stat_stamp(os.fstat(f.fileno()))) != local:
            f.close()
            f, why = None, "the copy was changed or truncated on disk"
        if f is None:
            if not quiet:  # a changed shard is news, a damaged copy a warning
                level = logging.INFO if why.startswith("it changed") else logging.WARNING
                log.log(level, "shard cache: %s: %s (%s); downloading it", want.url, why, path)
            return None
        try:
            db.execute(f"UPDATE entries SET used = {_TOUCH} WHERE name = ?", (name,))
        except BaseException:
            f.close()
            raise
        return f

    def _fetch(self, name: str, want: _Want) -> IO[bytes]:
        """Download a shard into its entry (whose exclusive lock is held) and open the
        copy; the shard itself, from the store, if it finds no room."""
        with _local():
            room = self._reserve(name, want)
        if not room:
            log.debug("shard cache: no room for %s (every copy is in use)", want.url)
            return open_url(want.url)
        part = self._shards / f"{name}{_PART}{os.getpid()}-{threading.get_ident()}.part"
        final = self._shards / name
        try:
            digest = self._download(want, part)
            with _local():
                os.replace(part, final)
                local = _text(stat_stamp(os.stat(final)))
                with self._write() as db:
                    db.execute(
                        "UPDATE entries SET digest = ?, local = ?, pending = 0 WHERE name = ?",
                        (digest, local, name),
                    )
                return open(final, "rb")
        except BaseException:
            with contextlib.suppress(OSError, sqlite3.Error):
                part.unlink(missing_ok=True)
                final.unlink(missing_ok=True)
                with self._write() as db:
                    db.execute("DELETE FROM entries WHERE name = ?", (name,))
            raise

    def _reserve(self, name: str, want: _Want) -> bool:
        """Room for a download (the entry's exclusive lock held): drop the entry's old
        copy, evict the least recently used until the entries fit the bound with this
        one, and enter it as pending; False if they cannot be made to fit."""
        evicted = 0
        try:
            with self._write_evicting() as (db, ev):
                db.execute("DELETE FROM entries WHERE name = ?", (name,))
                (self._shards / name).unlink(missing_ok=True)
                for part in self._shards.glob(glob.escape(name + _PART) + "*"):
                    part.unlink(missing_ok=True)  # of a process killed while downloading
                total = db.execute("SELECT COALESCE(SUM(size), 0) FROM entries").fetchone()[0]
                if total + want.size > self.max_bytes:
                    for victim, size, pending in db.execute(
                        "SELECT name, size, pending FROM entries ORDER BY used"
                    ).fetchall():
                        if total + want.size <= self.max_bytes:
                            break
                        if self._evict(db, ev, victim):
                            total -= size
                            evicted += not pending  # a pending one whose download died
                if total + want.size > self.max_bytes:
                    return False
                db.execute(
                    f"INSERT INTO entries VALUES (?, ?, ?, ?, '', '', {_TOUCH}, 1)",
                    (name, want.url, _text(want.version), want.size),
                )
                return True
        finally:
            self._counters.add(EVICTIONS, evicted)

    def _evict(self, db: sqlite3.Connection, ev: _Evictions, name: str) -> bool:
        """Remove an entry (in `_write_evicting`'s transaction) unless a process holds its
        lock; its files go once the transaction commits."""
        if not ev.locks.enter_context(self._locked(name, exclusive=True, blocking=False)):
            return False
        db.execute("DELETE FROM entries WHERE name = ?", (name,))
        ev.names.append(name)
        log.debug("shard cache: evicted %s", name)
        return True

    @contextlib.contextmanager
    def _write_evicting(self) -> Iterator[tuple[sqlite3.Connection, _Evictions]]:
        """`_write`, where entries may be evicted: their locks stay held, and their files
        stay, until the transaction commits, so a process that still finds an entry also
        finds its copy. Then the copies go (and partial downloads, listed once: not once
        per eviction), then their lock files and locks (waiters lock a new file)."""
        with contextlib.ExitStack() as locks:
            ev = _Evictions(locks)
            with self._write() as db:
                yield db, ev
            if ev.names:
                parts: dict[str, list[Path]] = {}
                for path in self._shards.iterdir():
                    if _PART in path.name:
                        parts.setdefault(path.name.split(_PART, 1)[0], []).append(path)
                for name in ev.names:
                    (self._shards / name).unlink(missing_ok=True)
                    for part in parts.get(name, ()):
                        part.unlink(missing_ok=True)
                    (self._locks / name).unlink(missing_ok=True)

    def _download(self, want: _Want, part: Path) -> str:
        """Copy a shard from the store into `part`; its digest, checked against the
        digest indexed for this version, if any."""
        t0 = time.monotonic()
        h = xxhash.xxh3_128()
        n = 0
        with _local():
            sink = open(part, "wb")  # noqa: SIM115
        try:
            with open_url(want.url) as src:
                while data := src.read(BLOCK):
                    h.update(data)
                    n += len(data)
                    with _local():
                        sink.write(data)
            with _local():
                sink.close()
        finally:
            with contextlib.suppress(OSError):
                sink.close()
        seconds = time.monotonic() - t0
        digest = f"{ALGORITHM}:{h.hexdigest()}"
        if n != want.size or shard_version(want.url) != (want.stamp, want.version):
            raise ShardChanged(
                "it changed while it was being downloaded into the shard cache; restart the "
                "worker to index it again"
            )
        with _local():
            indexed = self._indexed(want)
        if indexed is not None and indexed != digest:
            raise ShardChanged(
                f"its content differs from the one indexed (downloaded {digest}, indexed "
                f"{indexed}) though its size and time did not change; restart the worker "
                "to index it again"
            )
        log.info(
            "shard cache: downloaded %s, %d bytes in %.2fs (%.1f MB/s)",
            want.url, n, seconds, n / 1e6 / max(seconds, 1e-6),
        )  # fmt: skip
        return digest

    # -- locks and the index -------------------------------------------------------------

    def _indexed(self, want: _Want) -> str | None:
        """The digest this worker run indexed for this version of the shard, if it has
        indexed the shard yet. `ShardChanged` if it indexed another size or time: a copy
        or download now would serve content the catalog does not describe (the stat the
        read checked a moment ago may already be out of date)."""
        rows = (
            self._db()
            .execute(
                "SELECT stamp, digest FROM indexed_by WHERE owner = ? AND url = ?",
                (self.owner, want.url),
            )
            .fetchall()
        )
        stamp = _text(want.stamp)
        for indexed_stamp, digest in rows:
            if indexed_stamp == stamp:
                return str(digest)
        if rows:
            raise ShardChanged(
                f"it changed since it was indexed (the data root reports {stamp}, indexed "
                f"{rows[0][0]}); restart the worker to index it again"
            )
        return None

    @contextlib.contextmanager
    def _locked(self, name: str, *, exclusive: bool, blocking: bool = True) -> Iterator[bool]:
        """An entry's lock (flock on DIR/locks/NAME): whether it was taken (always when
        `blocking`). The file may be removed by whoever holds it exclusively (eviction),
        so a lock taken on a file no longer at the path is taken again."""
        path = self._locks / name
        how = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, how)
            except BlockingIOError:
                os.close(fd)
                yield False
                return
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            yield True
        finally:
            os.close(fd)

    def _db(self) -> sqlite3.Connection:
        """This thread's connection to the index; a new one if the index file was
        replaced (deleted, and created anew by a worker starting on the directory): two
        indexes in use would each keep their copies within the bound, not together."""
        path = self.directory / INDEX_FILE
        db: sqlite3.Connection | None = getattr(self._threads, "db", None)
        if db is not None and not db.in_transaction:
            try:
                replaced = os.stat(path).st_ino != self._threads.inode
            except OSError:
                replaced = False  # gone: the next statement says so, if it matters
            if replaced:
                log.warning("shard cache: the index %s was replaced: using the new one", path)
                with self._guard:
                    self._connections.remove(db)
                db.close()
                db = None
        if db is None:
            db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA synchronous = NORMAL")  # a lost entry is only downloaded again
            self._threads.db = db
            self._threads.inode = os.stat(path).st_ino
            with self._guard:
                self._connections.append(db)
        return db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _give_up(self, exc: BaseException | None) -> None:
        if not self._broken:
            self._broken = True
            log.warning(
                "shard cache %s cannot be used (%s): this process reads shards from the data "
                "root from now on; give --shard-cache-dir a writable local disk with room for "
                "--shard-cache-bytes",
                self.directory,
                exc,
            )


def _canonical(root: str) -> str:
    """A URL root as the catalog writes its shards' URLs (no trailing '/')."""
    if not root:
        return ""
    try:
        fs, inner = filesystem(root)
    except (ImportError, ValueError):
        return root.rstrip("/")
    return str(fs.unstrip_protocol(inner.rstrip("/")))


# -- the caches this process opens URL shards through -----------------------------------


def open_cache(config: WorkerConfig) -> ShardDiskCache:
    """A worker's shard cache (`config.shard_cache_dir`), prepared, and installed in
    this process (its threads decode, or digest, shards); OSError if it is unusable."""
    assert config.shard_cache_dir is not None
    cache = ShardDiskCache(
        config.shard_cache_dir, config.shard_cache_bytes, root=str(config.data_root)
    )
    try:
        cache.prepare()
    except BaseException:
        cache.close()
        raise
    install(cache)
    return cache


_installed: list[ShardDiskCache] = []
_installed_lock = threading.Lock()


def install(cache: ShardDiskCache) -> None:
    """Open this process's shards under `cache.root` through `cache` (`_files.open_shard`)."""
    with _installed_lock:
        _installed.append(cache)
        _files.url_opener = _open_url


def uninstall(cache: ShardDiskCache) -> None:
    with _installed_lock:
        if cache in _installed:
            _installed.remove(cache)
        if not _installed:
            _files.url_opener = None


def _open_url(url: str) -> IO[bytes]:
    for cache in reversed(_installed):
        if cache.covers(url):
            return cache.open(url)
    return open_url(url)


def process_init(server: int, block: BlockHandle | None, settings: CacheSettings) -> None:
    """`_decoding.process_init`, then this decoding process reads shards through its
    server's shard cache (and logs what the cache does as the server does)."""
    decoding_process_init(server, block)
    if settings.log_format is not None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(settings.log_format))
        log.addHandler(handler)
        log.setLevel(settings.log_level)
        log.propagate = False
    install(ShardDiskCache.from_settings(settings))

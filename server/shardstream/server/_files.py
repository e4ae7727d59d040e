"""Shard files under a local data root or an fsspec URL data root.

A shard path is a `pathlib.Path` for a local data root (opened and stat'ed
through the operating system, exactly as before) or the shard's full URL
`str` for a URL data root (`memory://...`, `file:///...`, `s3://...`), which
goes through fsspec (optional: `pip install 'shardstream[fsspec]'`).

Decoders open shards with `open_shard` (a seekable binary file either way; in a
process with a shard cache, `_shardcache`, a URL shard's local copy) and the
catalog and `read_chunk` compare `shard_stat` stamps to notice a changed file.
A local shard's stamp is (size, mtime_ns, ctime_ns, inode): `os.utime` can
put a modification time back, but not the change time, so a file rewritten in
place with its size and mtime restored still gets a new stamp (so does any other
change to its inode: mode, owner, links). A `file://` (or `local://`) shard is a
local file under another name: it is stat'ed and opened through the operating
system and gets the same stamp. Any other URL shard's stamp is its size plus every
time, checksum and identity the filesystem reports (`_STAMP_KEYS`: `mtime`,
`LastModified`, `updated`, `created`, which the in-memory filesystem renews on
every write, `ETag`, `md5Hash`, `crc32c`, `generation`, an HTTP server's
`Last-Modified`...); where it reports none, only the size is compared.

Reads pin a shard to its indexed stamp (`pinned`): while pinned, every open of a
local shard fstats the file it opened and refuses one that is not the indexed file
(`ShardChanged`), so a file renamed over the shard, or a symlink swapped in,
between the stamp check and the open is never decoded in its place.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import io
import os
import posixpath
import re
import threading
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

from shardstream.server.errors import ShardChanged

__all__ = [
    "FSSPEC_HINT",
    "GONE",
    "ShardCache",
    "ShardPath",
    "Stamp",
    "check_opened",
    "describe_change",
    "glob_url",
    "is_url",
    "local_file",
    "open_shard",
    "open_url",
    "pinned",
    "pinned_stamp",
    "redact",
    "shard_stat",
    "shard_version",
    "sibling",
    "stat_stamp",
    "url_root",
]

ShardPath = Path | str  # Path: a local file; str: the URL of a file under an fsspec data root
# (size, mtime_ns, ctime_ns, inode) locally (`file://` URLs too); (size, "key=value ...")
# for other URLs
Stamp = tuple[int, int, int, int] | tuple[int, int | str]
# Errors that say a shard file is gone (a changed shard); any other OSError may pass (EIO,
# EMFILE, a store's timeout): the read is tried again.
GONE = (FileNotFoundError, NotADirectoryError)

FSSPEC_HINT = "pip install 'shardstream[fsspec]'"
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")
_CHECKSUM_KEYS = ("ETag", "etag", "md5Hash", "md5", "crc32c", "checksum")
_IDENTITY_KEYS = ("ino", "generation", "VersionId", "version_id")
# What a URL shard's stamp compares besides its size: every time, checksum and identity a
# filesystem reports (HTTP servers report headers). Not VersionId: s3fs reports it on a
# HEAD but not in a listing, so one shard's stamp would differ between processes.
_STAMP_KEYS = (
    *_MTIME_KEYS,
    "ctime",
    "Last-Modified",
    *_CHECKSUM_KEYS,
    "Content-MD5",
    "Digest",
    "ino",
    "generation",
    "islink",
    "destination",
)
# fsspec protocols of the local filesystem: their shards are stat'ed and opened as local
# files (`local_file`), so they are checked exactly as a local data root's are.
_LOCAL_PROTOCOLS = ("file", "local")
# Per thread: {shard path: the stamp every open of it must find} (`pinned`).
_pins = threading.local()
# The user information of a URL (`user:password@`, or a token alone): up to the last "@"
# before the path, so a password holding "@" is hidden whole.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/?#\s]*)@")


def is_url(path: object) -> bool:
    """Whether a data root or shard path is an fsspec URL (`PROTOCOL://...`)."""
    return isinstance(path, str) and "://" in path


def redact(text: str) -> str:
    """`text` (a URL, or a message naming some) with the secret of every URL's user
    information hidden: `http://alice:***@host/...`, `s3://***@bucket/...` for a bare
    token. Data roots and shard URLs pass through it wherever they are logged or told to
    a client."""
    return _USERINFO.sub(_hide, text) if "@" in text else text


# Azure's URLs name a container before the "@" (`abfs://container@account...`), no secret.
_CONTAINER_SCHEMES = ("abfs://", "abfss://", "az://", "wasb://", "wasbs://", "adl://")


def _hide(match: re.Match[str]) -> str:
    scheme = match["scheme"]
    if scheme.lower() in _CONTAINER_SCHEMES and ":" not in match["userinfo"]:
        return match[0]
    user, colon, _ = match["userinfo"].partition(":")
    return f"{scheme}{user}:***@" if colon else f"{scheme}***@"


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of a URL and the path within it (ImportError without fsspec)."""
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise ImportError(f"URL data roots need fsspec: {FSSPEC_HINT}") from None
    fs, path = url_to_fs(url)
    return fs, str(path)


# Opens URL shards in a process with a shard cache (set by `_shardcache.install`,
# which reads them from a local copy); None: `open_url`.
url_opener: Callable[[str], IO[bytes]] | None = None


def local_file(path: ShardPath) -> Path | str | None:
    """The local file a shard is opened as: a `Path`, or a `file://` URL's path where no
    shard cache reads URL shards (`url_opener`); None: it is opened through fsspec or the
    cache."""
    if isinstance(path, Path):
        return path
    return None if url_opener is not None else _local_url(path)


def _stat_path(path: ShardPath) -> Path | str | None:
    """The local file a shard is stat'ed as (a `file://` URL's too); None for other URLs."""
    return path if isinstance(path, Path) else _local_url(path)


@functools.lru_cache(maxsize=1 << 16)
def _local_url(url: str) -> str | None:
    if url.partition("://")[0].lower() not in _LOCAL_PROTOCOLS:
        return None
    return filesystem(url)[1]


def open_shard(path: ShardPath) -> IO[bytes]:
    """A binary file of a shard, with random access (seek, read, readinto); close it.

    While the shard is `pinned` in this thread, the file opened must be the pinned one
    (`ShardChanged` if not): a local file is checked by an fstat of what was opened."""
    local = local_file(path)
    if local is None:
        assert isinstance(path, str)
        return open_url(path) if url_opener is None else url_opener(path)
    f = open(local, "rb")  # noqa: SIM115
    try:
        if pinned_stamp(path) is not None:
            check_opened(path, stat_stamp(os.fstat(f.fileno())))
    except BaseException:
        f.close()
        raise
    return f


@contextlib.contextmanager
def pinned(path: ShardPath, stamp: Stamp) -> Iterator[None]:
    """While the block runs, every open of shard `path` in this thread must find the file
    of `stamp` (`open_shard`, and decoders that open it themselves call `check_opened`):
    a file renamed over the shard, or a symlink swapped in, after its stamp was checked is
    refused with `ShardChanged`, never decoded in its place."""
    pins: dict[ShardPath, Stamp] = _pins.__dict__.setdefault("stamps", {})
    before = pins.get(path)
    pins[path] = stamp
    try:
        yield
    finally:
        if before is None:
            pins.pop(path, None)
        else:
            pins[path] = before


def pinned_stamp(path: ShardPath) -> Stamp | None:
    """The stamp `path` is pinned to in this thread, if it is."""
    pins: dict[ShardPath, Stamp] | None = getattr(_pins, "stamps", None)
    return None if not pins else pins.get(path)


def check_opened(path: ShardPath, opened: Stamp) -> None:
    """Refuse a file just opened for a pinned shard when it is not the pinned one."""
    want = pinned_stamp(path)
    if want is not None and opened != want:
        raise ShardChanged(describe_change(want, opened))


def describe_change(stamp: Stamp, now: Stamp) -> str:
    """Why a shard whose stamp is now `now` is not the one indexed with `stamp`."""
    what = (
        f"size {stamp[0]} -> {now[0]} bytes"
        if now[0] != stamp[0]
        else "same size, but its modification time, inode or checksum differs"
    )
    return f"the shard changed since it was indexed ({what}); restart the worker to index it again"


def open_url(url: str) -> IO[bytes]:
    """The file at a URL, read through fsspec (never through the shard cache), as a
    standard buffered reader: fsspec's files lack `readline(size)`, which the line
    formats read by (large `readinto`s still go to fsspec's file directly)."""
    fs, inner = filesystem(url)
    return io.BufferedReader(fs.open(inner, "rb"), buffer_size=1 << 16)


def shard_stat(path: ShardPath) -> Stamp:
    """A shard's stamp: (size, mtime_ns, ctime_ns, inode) locally (`file://` URLs too);
    see the module docstring for other URLs."""
    local = _stat_path(path)
    if local is not None:
        return stat_stamp(os.stat(local))
    fs, inner = filesystem(str(path))
    return info_stamp(fs.info(inner))


def stat_stamp(st: os.stat_result) -> Stamp:
    """The stamp of a local file from its `os.stat` / `os.fstat` result."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def shard_version(path: ShardPath) -> tuple[Stamp, tuple[int | str, ...] | None]:
    """A shard's stamp and what identifies this version of its content, to cache its
    digest by: locally (`file://` URLs too) the stamp again; for a URL its size and every
    time, checksum, inode or version the filesystem reports, or None when it reports
    nothing but the size."""
    if _stat_path(path) is not None:
        stamp = shard_stat(path)
        return stamp, stamp
    fs, inner = filesystem(str(path))
    info = fs.info(inner)
    found: list[int | str] = []
    for key in (*_MTIME_KEYS, *_CHECKSUM_KEYS, *_IDENTITY_KEYS):
        value = info.get(key)
        if value is not None:
            found += [key, _nanoseconds(value) if key in _MTIME_KEYS else str(value)]
    return info_stamp(info), ((int(info["size"]), *found) if found else None)


def info_stamp(info: dict[str, Any]) -> Stamp:
    """A URL shard's stamp from its fsspec info: its size and every time, checksum and
    identity reported (`_STAMP_KEYS`, as "key=value ..."; "" when none is)."""
    found = []
    for key in _STAMP_KEYS:
        value = info.get(key)
        if value is not None:
            found.append(f"{key}={_nanoseconds(value) if key in _MTIME_KEYS else value}")
    return (int(info["size"]), " ".join(found))


def _nanoseconds(value: object) -> int | str:
    if isinstance(value, datetime.datetime):
        return round(value.timestamp() * 1e9)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return round(value * 1e9)
    return str(value)  # e.g. an ISO 8601 string: compared as it is


def sibling(path: ShardPath, name: str) -> ShardPath:
    """The file called `name` in the same directory as a shard."""
    if isinstance(path, Path):
        return path.parent / name
    return f"{path.rsplit('/', 1)[0]}/{name}"


def url_root(root: str) -> str:
    """The canonical URL of a data root; ValueError (or ImportError) if it is unusable."""
    if "::" in root:
        raise ValueError(
            f"chained fsspec URLs ({root!r}) are not supported as a data root: give the plain "
            "URL (e.g. s3://bucket/train), and --shard-cache-dir DIR to keep shards on local disk"
        )
    fs, inner = filesystem(root)
    inner = _normalised(inner.rstrip("/"))
    if not fs.isdir(inner or fs.root_marker or "/"):
        raise ValueError("it is not a directory (or it cannot be listed)")
    return str(fs.unstrip_protocol(inner))


def _normalised(inner: str) -> str:
    """A path within a filesystem with "." and ".." parts resolved; where the filesystem
    keeps whole URLs (http), only the URL's path is normalised, never `scheme://host`."""
    if "://" in inner:
        parts = urllib.parse.urlsplit(inner)
        path = _normalised(parts.path.rstrip("/"))
        return urllib.parse.urlunsplit(parts._replace(path=path))
    return posixpath.normpath(inner) if inner else inner


def glob_url(root: str, pattern: str) -> list[tuple[str, str]]:
    """(shard id, URL) of the files under the URL `root` that `pattern` matches, sorted.

    ValueError if the pattern leaves the root or a match is not under it.
    """
    if pattern.startswith("/") or ".." in pattern.split("/"):
        raise ValueError(f"the glob {pattern!r} must stay inside the data root (relative, no '..')")
    fs, inner = filesystem(root)
    inner = inner.rstrip("/")
    local = "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)
    real_root = os.path.realpath(inner or "/") if local else ""
    found = []
    matches: dict[str, dict[str, Any]] = fs.glob(f"{inner}/{pattern}", detail=True)
    for match, info in matches.items():
        name = posixpath.normpath(match) if match.startswith("/") else match
        kind = info.get("type")
        if local and info.get("islink"):  # fsspec lists a symlink as "other": follow it
            kind = "file" if os.path.isfile(name) else kind
        if kind != "file":
            continue
        rel = name[len(inner) + 1 :] if name.startswith(inner + "/") else ""
        if not rel or any(part in ("", ".", "..") for part in rel.split("/")):
            raise ValueError(f"{fs.unstrip_protocol(match)} is outside the data root {root}")
        if local:
            real = os.path.realpath(name)
            if os.path.commonpath([real, real_root]) != real_root:
                raise ValueError(
                    f"{fs.unstrip_protocol(match)} resolves to {real}, outside the data root "
                    f"{root}; refusing to serve it"
                )
        found.append((rel, str(fs.unstrip_protocol(name))))
    found.sort()
    return found


T = TypeVar("T")


class ShardCache(Generic[T]):
    """What a decoder keeps per shard between reads (an index of offsets, row groups...):
    built on first use, built again when the shard's stamp changes, the least recently
    used dropped beyond `limit`. Safe to use from several decoding threads."""

    def __init__(
        self,
        build: Callable[[ShardPath], T],
        limit: int,
        stamp: Callable[[ShardPath], Hashable] = shard_stat,
    ) -> None:
        self._build = build
        self._stamp = stamp
        self._limit = limit
        self._lock = threading.Lock()
        self._items: OrderedDict[ShardPath, tuple[Hashable, T]] = OrderedDict()

    def get(self, path: ShardPath) -> T:
        stamp = self._stamp(path)
        with self._lock:
            cached = self._items.get(path)
            if cached is not None and cached[0] == stamp:
                self._items.move_to_end(path)
                return cached[1]
        value = self._build(path)  # outside the lock: other shards need not wait
        with self._lock:
            self._items[path] = (stamp, value)
            self._items.move_to_end(path)
            while len(self._items) > self._limit:
                self._items.popitem(last=False)
        return value

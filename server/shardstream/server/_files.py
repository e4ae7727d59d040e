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
change to its inode: mode, owner, links). A URL shard's stamp is its size plus,
from what the filesystem reports, the first of: a modification time (`mtime`,
`LastModified`, `last_modified`, `updated`, `modified`, or `created`, which the
in-memory filesystem renews on every write), else a content checksum or ETag
(`ETag`, `etag`, `md5Hash`, `md5`, `crc32c`, `checksum`), else nothing (only
the size is compared).
"""

from __future__ import annotations

import datetime
import os
import posixpath
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

__all__ = [
    "FSSPEC_HINT",
    "GONE",
    "ShardCache",
    "ShardPath",
    "Stamp",
    "glob_url",
    "is_url",
    "open_shard",
    "open_url",
    "shard_stat",
    "shard_version",
    "sibling",
    "stat_stamp",
    "url_root",
]

ShardPath = Path | str  # Path: a local file; str: the URL of a file under an fsspec data root
# (size, mtime_ns, ctime_ns, inode) locally; (size, mtime_ns or checksum) for URLs
Stamp = tuple[int, int, int, int] | tuple[int, int | str]
# Errors that say a shard file is gone (a changed shard); any other OSError may pass (EIO,
# EMFILE, a store's timeout): the read is tried again.
GONE = (FileNotFoundError, NotADirectoryError)

FSSPEC_HINT = "pip install 'shardstream[fsspec]'"
_MTIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")
_CHECKSUM_KEYS = ("ETag", "etag", "md5Hash", "md5", "crc32c", "checksum")
_IDENTITY_KEYS = ("ino", "generation", "VersionId", "version_id")


def is_url(path: object) -> bool:
    """Whether a data root or shard path is an fsspec URL (`PROTOCOL://...`)."""
    return isinstance(path, str) and "://" in path


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


def open_shard(path: ShardPath) -> IO[bytes]:
    """A binary file of a shard, with random access (seek, read, readinto); close it."""
    if isinstance(path, Path):
        return open(path, "rb")
    if url_opener is not None:
        return url_opener(path)
    return open_url(path)


def open_url(url: str) -> IO[bytes]:
    """The file at a URL, read through fsspec (never through the shard cache)."""
    fs, inner = filesystem(url)
    f: IO[bytes] = fs.open(inner, "rb")
    return f


def shard_stat(path: ShardPath) -> Stamp:
    """A shard's stamp: (size, mtime_ns, ctime_ns, inode) locally; see the module
    docstring for URLs."""
    if isinstance(path, Path):
        return stat_stamp(os.stat(path))
    fs, inner = filesystem(path)
    return info_stamp(fs.info(inner))


def stat_stamp(st: os.stat_result) -> Stamp:
    """The stamp of a local file from its `os.stat` / `os.fstat` result."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def shard_version(path: ShardPath) -> tuple[Stamp, tuple[int | str, ...] | None]:
    """A shard's stamp and what identifies this version of its content, to cache its
    digest by: locally the stamp again; for a URL its size and every time, checksum,
    inode or version the filesystem reports (a `file://` root reports the ctime as
    `created`), or None when it reports nothing but the size."""
    if isinstance(path, Path):
        stamp = shard_stat(path)
        return stamp, stamp
    fs, inner = filesystem(path)
    info = fs.info(inner)
    found: list[int | str] = []
    for key in (*_MTIME_KEYS, *_CHECKSUM_KEYS, *_IDENTITY_KEYS):
        value = info.get(key)
        if value is not None:
            found += [key, _nanoseconds(value) if key in _MTIME_KEYS else str(value)]
    return info_stamp(info), ((int(info["size"]), *found) if found else None)


def info_stamp(info: dict[str, Any]) -> Stamp:
    size = int(info["size"])
    for key in _MTIME_KEYS:
        value = info.get(key)
        if value is not None:
            return (size, _nanoseconds(value))
    for key in _CHECKSUM_KEYS:
        value = info.get(key)
        if value is not None:
            return (size, str(value))
    return (size, "")


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
    inner = inner.rstrip("/")
    if inner:
        inner = posixpath.normpath(inner)
    if not fs.isdir(inner or fs.root_marker or "/"):
        raise ValueError("it is not a directory (or it cannot be listed)")
    return str(fs.unstrip_protocol(inner))


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

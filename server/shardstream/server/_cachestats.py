"""The shard cache's counters (`_shardcache`): hits, misses and evictions kept in shared
memory of the server, which its decoding processes add to, and their Prometheus export."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing import reduction
from multiprocessing.context import get_spawning_popen
from typing import Any

__all__ = ["EVICTIONS", "HITS", "MISSES", "CacheCollector", "CacheStatistics", "Counters"]

HITS, MISSES, EVICTIONS = range(3)  # the fields of `Counters`


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    hits: int  # opens served from a local copy
    misses: int  # other opens: downloaded, or read from the store without a copy
    evictions: int  # copies removed to make room for others
    bytes: int  # of the copies in the directory now (of every worker sharing it)


class Counters:
    """Hits, misses and evictions in anonymous shared memory (`memfd_create`) of the
    server, added to by its decoding processes under an fcntl lock.

    Picklable only as an argument of a process being spawned (its descriptor then
    travels with the spawn, as `_shm.BlockHandle` does)."""

    _SIZE = 3 * 8

    def __init__(self, fd: int = -1) -> None:
        if fd < 0:
            fd = os.memfd_create("shardstream-shard-cache", os.MFD_CLOEXEC)
            os.ftruncate(fd, self._SIZE)
        self._fd = fd
        self._map: mmap.mmap | None = mmap.mmap(fd, self._SIZE)
        self._lock = threading.Lock()  # fcntl locks do not exclude this process's threads

    def add(self, field: int, n: int = 1) -> None:
        with self._lock:
            if self._map is None or not n:
                return
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                (value,) = struct.unpack_from("<q", self._map, 8 * field)
                struct.pack_into("<q", self._map, 8 * field, value + n)
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)

    def values(self) -> tuple[int, int, int]:
        with self._lock:
            if self._map is None:
                return (0, 0, 0)
            hits, misses, evictions = struct.unpack_from("<3q", self._map)
            return hits, misses, evictions

    def close(self) -> None:
        with self._lock:
            if self._map is not None:
                self._map.close()
                self._map = None
                os.close(self._fd)

    def __reduce__(self) -> tuple[Any, ...]:
        if get_spawning_popen() is None:
            raise TypeError("Counters can only be passed to a process being spawned")
        return (_rebuild_counters, (reduction.DupFd(self._fd),))


def _rebuild_counters(fd: Any) -> Counters:
    return Counters(fd.detach())


class CacheCollector:
    """The shard cache's statistics as Prometheus metrics."""

    def __init__(self, statistics: Callable[[], CacheStatistics]) -> None:
        self._statistics = statistics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self._statistics()
        yield CounterMetricFamily(
            "shardstream_shard_cache_hits", "shard opens served from a local copy", value=s.hits
        )
        yield CounterMetricFamily(
            "shardstream_shard_cache_misses",
            "shard opens downloaded, or read from the data root without a copy",
            value=s.misses,
        )
        yield CounterMetricFamily(
            "shardstream_shard_cache_evictions",
            "local copies removed to make room",
            value=s.evictions,
        )
        yield GaugeMetricFamily(
            "shardstream_shard_cache_bytes",
            "bytes of the local copies in the shard cache directory",
            value=s.bytes,
        )

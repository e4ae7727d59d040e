"""Direct reads: chunks that are file bytes are read into their messages by the server
process (`_direct`), byte for byte what a decoding process makes, and only for them."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.server._decoding import read_chunk
from shardstream.server._direct import new_message, read_direct
from shardstream.server._files import shard_stat
from shardstream.server._npz import NpzDecoder
from shardstream.server.errors import ShardChanged
from shardstream.v1.codec import FieldSpec

from conftest import running_workers

RECORDS = 37
NPZ = "shardstream.server._npz:NpzDecoder"
ARRAYS: dict[str, Any] = {
    "id": np.arange(RECORDS, dtype=np.int64),
    "image": np.random.default_rng(1).random((RECORDS, 5, 4, 3), dtype=np.float32),
    "label": (np.arange(RECORDS) % 7).astype(np.uint8),
    "mask": np.arange(RECORDS * 3).reshape(RECORDS, 3) % 2 == 0,
    "half": np.linspace(0, 1, RECORDS * 2).reshape(RECORDS, 2).astype(np.float16),
}
SCHEMA = tuple(FieldSpec(k, v.dtype.name, v.shape[1:]) for k, v in ARRAYS.items())


def _shard(path: Path, save: Any = np.savez, **arrays: Any) -> Path:
    save(path, **(arrays or ARRAYS))
    return path


class Transforming(NpzDecoder):
    name = "test-transforming-npz"

    def read(self, path: Any, start: int, count: int) -> dict[str, np.ndarray[Any, Any]]:
        out = super().read(path, start, count)
        out["label"] = out["label"] + 1
        return out


def test_new_message_is_a_bytes_object_filled_in_place() -> None:
    assert new_message is not None  # CPython
    message, view = new_message(1000)
    view[:] = bytes(range(200)) * 5
    view.release()
    assert type(message) is bytes and message == bytes(range(200)) * 5
    assert hash(message) == hash(bytes(range(200)) * 5)


@pytest.mark.parametrize(
    ("start", "count", "shard_id"),
    [(0, RECORDS, "s.npz"), (0, 1, ""), (5, 17, "dir/" + "x" * 300 + ".npz"), (36, 1, "s")],
)
def test_a_direct_read_is_the_chunk_a_decoding_process_makes(
    tmp_path: Path, start: int, count: int, shard_id: str
) -> None:
    path = _shard(tmp_path / "s.npz")
    stamp = shard_stat(path)
    direct = read_direct(NPZ, path, stamp, start, count, SCHEMA, shard_id)
    assert direct is not None
    assert direct == read_chunk(NPZ, path, stamp, start, count, SCHEMA, shard_id)


@pytest.mark.parametrize(
    "kind", ["deflated", "big-endian", "fortran-order", "transforming subclass"]
)
def test_chunks_that_are_not_file_bytes_are_decoded(tmp_path: Path, kind: str) -> None:
    """Deflated, big-endian and Fortran-order members, and a decoder that transforms
    its records, give no byte ranges: those chunks go to a decoding process."""
    ref = NPZ
    if kind == "deflated":
        path = _shard(tmp_path / "s.npz", np.savez_compressed)
    elif kind == "big-endian":
        path = _shard(tmp_path / "s.npz", id=ARRAYS["id"].astype(">i8"))
    elif kind == "fortran-order":
        path = _shard(tmp_path / "s.npz", id=np.asfortranarray(np.ones((RECORDS, 3))))
    else:
        path = _shard(tmp_path / "s.npz")
        ref = f"{__name__}:Transforming"
    schema = NpzDecoder().index(path).schema
    assert read_direct(ref, path, shard_stat(path), 0, 5, schema, "s.npz") is None


def test_a_shard_changed_since_indexing_is_refused(tmp_path: Path) -> None:
    path = _shard(tmp_path / "s.npz")
    stamp = shard_stat(path)
    _shard(
        path, label=np.zeros(RECORDS, np.uint8), **{k: ARRAYS[k] for k in ARRAYS if k != "label"}
    )
    os.utime(path, ns=(stamp[1] + 10**9, stamp[1] + 10**9))
    with pytest.raises(ShardChanged, match="changed since it was indexed"):
        read_direct(NPZ, path, stamp, 0, 5, SCHEMA, "s.npz")
    path.unlink()
    with pytest.raises(ShardChanged, match="cannot be opened"):
        read_direct(NPZ, path, stamp, 0, 5, SCHEMA, "s.npz")


async def test_a_worker_reads_stored_shards_without_its_decoding_process(
    npz_root: Path,
) -> None:
    """With its only decoding process stopped (SIGSTOP), a worker still serves a whole
    epoch of stored npz shards, byte-identical to the epoch its decoding process makes
    when direct reads are off."""
    epochs = {}
    for direct in (False, True):
        async with running_workers(npz_root, 1, processes=1, direct_reads=direct) as (w,):
            (decoding,) = w._executor.pids()  # type: ignore[union-attr]
            if direct:
                os.kill(decoding, signal.SIGSTOP)
            try:
                async with Loader([w.address], dataset="train", batch_size=64) as loader:
                    epochs[direct] = [b async for b in loader.epoch(0)]
            finally:
                os.kill(decoding, signal.SIGCONT)
    assert len(epochs[True]) == len(epochs[False]) > 1
    for a, b in zip(epochs[True], epochs[False], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k])


class _Uncached:
    """`os.preadv` as on a file whose bytes are not in the page cache (while `on`): a read
    that may not wait for the disk (RWF_NOWAIT) gets EAGAIN, as Linux answers it, or
    EOPNOTSUPP, as a file system without it does; others read."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, errno_: int = 11) -> None:
        self.on, self.refused, self._errno = True, 0, errno_
        self._real = os.preadv
        monkeypatch.setattr(os, "preadv", self)

    def __call__(self, fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if self.on and flags & os.RWF_NOWAIT:
            self.refused += 1
            raise OSError(self._errno, os.strerror(self._errno))
        return self._real(fd, buffers, offset, flags)


@pytest.mark.parametrize("errno_", [11, 95])  # EAGAIN (not cached), EOPNOTSUPP
def test_a_read_on_the_event_loop_never_waits_for_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, errno_: int
) -> None:
    """`read_direct_now` (what the event loop calls) reads a chunk whose bytes are all in
    the page cache, and says LATER where the kernel would have to wait for the disk (or
    cannot say), for an I/O thread to read it; the bytes are the same either way."""
    from shardstream.server._direct import LATER, message_for, read_direct_now

    path = _shard(tmp_path / "s.npz")
    job = (NPZ, path, shard_stat(path), 3, 30, SCHEMA, "s.npz")
    expected = read_chunk(*job)
    message, room = message_for(job)
    uncached = _Uncached(monkeypatch, errno_)
    assert read_direct_now(room, *job) == LATER and uncached.refused == 1
    assert read_direct(*job) == expected  # a thread's read: it may wait
    uncached.on = False  # in the page cache: the real preadv with RWF_NOWAIT
    assert read_direct_now(room, *job) == len(message)
    room.release()
    assert message == expected


@pytest.mark.parametrize("lane", [False, True])
async def test_chunks_not_in_the_page_cache_are_read_in_threads(
    tmp_path: Path, lane: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose shards are not in the page cache serves the same epoch (on the
    socket and through a same-host lane): every chunk the event loop cannot read at once
    is read by an I/O thread."""
    from shardstream.server import make_dataset

    make_dataset(tmp_path, shards=3, records=300, shape=(16, 16, 3))
    async with running_workers(tmp_path, 1, processes=1) as (w,):
        async with Loader([w.address], dataset="train", batch_size=32,
                          same_host_lane=lane, network_lane=lane) as loader:  # fmt: skip
            cached = [b async for b in loader.epoch(0)]
            uncached = _Uncached(monkeypatch)
            evicted = [b async for b in loader.epoch(0)]
            assert uncached.refused >= loader.plan(0).read_count  # every chunk, at least
            if lane:
                assert sum(loader.statistics().lane_bytes_by_worker.values()) > 0
    assert len(cached) == len(evicted) == 10
    for a, b in zip(cached, evicted, strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)


async def test_a_shard_that_cannot_be_opened_for_a_moment_is_read_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EMFILE (the worker out of descriptors for a moment) when a direct read opens its
    shard: the chunk is decoded instead (or the read resumed), and the worker stays in use. Was:
    "the shard cannot be opened any more", FAILED_PRECONDITION, the worker left out for
    good (or, alone, the epoch ended with ShardChangedError)."""
    import errno

    from shardstream.server import _direct, make_dataset

    make_dataset(tmp_path, shards=3, records=300, shape=(16, 16, 3))
    real, calls = os.open, [0]

    def short_of_descriptors(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if str(path).endswith(".npz"):
            calls[0] += 1
            if calls[0] % 3 == 0:
                raise OSError(errno.EMFILE, "Too many open files")
        return real(path, flags, *args, **kw)

    async with running_workers(tmp_path, 1, processes=1) as (w,):  # direct reads: here
        monkeypatch.setattr(_direct.os, "open", short_of_descriptors)
        async with Loader([w.address], dataset="train", batch_size=32, read_bytes=8192,
                          backoff_base=0.02, backoff_cap=0.1, same_host_lane=False, network_lane=False) as loader:  # fmt: skip
            ids = [int(i) for b in [b async for b in loader.epoch(0)] for i in b["id"]]
            assert not any(c.excluded for c in loader._pool.conns)  # type: ignore[union-attr]
    assert sorted(ids) == list(range(300))
    assert calls[0] >= 3  # refused opens: read again, or decoded instead

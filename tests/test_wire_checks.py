"""The client checks every chunk against the schema the workers described and the shard
it asked for: a worker that lies is refused by name, and the read goes on elsewhere."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.client._wire import is_retryable, worker_error
from shardstream.client.errors import ConfigError, MessageTooLargeError, ProtocolError

from conftest import RECORDS, collect_epoch, ids_of, running_workers
from faultproxy import FaultProxy, Trickle
from liar import LIES, lying_worker

OPTS = {"dataset": "train", "batch_size": 16, "read_bytes": 2048, "chunk_bytes": 512,
        "retry_deadline": 20.0}  # fmt: skip
CHECKED = [lie for lie in LIES if lie != "oversize"]


@pytest.mark.parametrize("lie", CHECKED)
async def test_a_lying_worker_is_refused_by_name(npz_root: Path, lie: str) -> None:
    async with running_workers(npz_root, 1) as (worker,), lying_worker(worker.address, lie) as liar:
        async with Loader([liar], **OPTS) as loader:
            with pytest.raises(ProtocolError) as caught:
                await collect_epoch(loader, 0)
    error = caught.value
    assert error.worker == liar and error.dataset == "train" and error.shard.endswith(".npz")
    assert liar in str(error)


@pytest.mark.parametrize("lie", ["dtype", "duplicate", "other-shard", "shape-later"])
async def test_reads_of_a_lying_worker_go_on_elsewhere_exactly_once(
    npz_root: Path, lie: str
) -> None:
    async with running_workers(npz_root, 1) as (worker,), lying_worker(worker.address, lie) as liar:
        async with Loader([liar, worker.address], **OPTS) as loader:
            batches = await collect_epoch(loader, 0)
            stats = loader.statistics()
    ids = ids_of(batches)
    assert np.array_equal(np.sort(ids), np.arange(RECORDS))
    assert all(b["image"].dtype == np.uint8 and b["image"].shape[1:] == (4, 4, 3) for b in batches)
    assert stats.resumes_by_worker.get(liar, 0) >= 1  # it got a read, and lost it


async def test_a_message_over_the_receive_limit_is_no_busy_worker(npz_root: Path) -> None:
    """RESOURCE_EXHAUSTED for a message too large is raised at once, naming the option,
    instead of being retried like a full worker until the retry deadline."""
    async with running_workers(npz_root, 1) as (worker,):
        async with lying_worker(worker.address, "oversize") as liar:
            async with Loader([liar], max_message_bytes=1 << 20, **OPTS) as loader:
                with pytest.raises(MessageTooLargeError, match="max_message_bytes"):
                    await collect_epoch(loader, 0)


def test_busy_and_too_large_are_told_apart() -> None:
    class Error(grpc.aio.AioRpcError):
        def __init__(self, code: grpc.StatusCode, trailing: tuple[tuple[str, str], ...]) -> None:
            super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), "x")

    busy = Error(grpc.StatusCode.RESOURCE_EXHAUSTED, (("shardstream-busy", "1"),))
    too_large = Error(grpc.StatusCode.RESOURCE_EXHAUSTED, ())
    assert is_retryable(busy) and not is_retryable(too_large)
    assert isinstance(worker_error(too_large, worker="w"), MessageTooLargeError)
    assert is_retryable(Error(grpc.StatusCode.UNAVAILABLE, ()))


async def test_records_larger_than_a_message_are_refused_at_start(npz_root: Path) -> None:
    async with running_workers(npz_root, 1) as (worker,):
        with pytest.raises(ConfigError, match="raise max_message_bytes to at least"):
            async with Loader([worker.address], max_message_bytes=1000, **OPTS):
                pass


async def test_a_straggling_worker_does_not_stall_the_rank(npz_root: Path) -> None:
    """A worker that trickles its data just fast enough never to hit `idle_timeout`:
    its reads move to the healthy worker once they fall far behind the fleet's pace, and
    the epoch completes exactly once (with a stuck rank it would take minutes: the
    trickle gives the slow worker's reads ~50 s each)."""
    async with running_workers(npz_root, 2) as (fast, slow), FaultProxy(slow.address) as proxy:
        async with Loader(
            [fast.address, proxy.address], straggler_seconds=0.5, idle_timeout=30.0, **OPTS
        ) as loader:
            proxy.set_mode(Trickle(64))  # ~20 s for one 2 KiB read's first message
            batches = await collect_epoch(loader, 0)
            stats = loader.statistics()
    assert np.array_equal(np.sort(ids_of(batches)), np.arange(RECORDS))
    assert stats.stragglers >= 1
    assert stats.reads_by_worker[fast.address] > stats.reads_by_worker[proxy.address]

"""The client checks every chunk against the schema the workers described and the shard
it asked for: a worker that lies is refused by name, and the read goes on elsewhere."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.client._fetch import Broken, FetchCounters, _Patience
from shardstream.client._wire import Piece, check_piece, decode_response, is_retryable, worker_error
from shardstream.client.errors import (
    ConfigError,
    MessageTooLargeError,
    ProtocolError,
    WorkersUnavailableError,
)
from shardstream.v1 import shardstream_pb2 as pb
from shardstream.v1.codec import FieldSpec

from conftest import RECORDS, collect_epoch, ids_of, running_workers
from faultproxy import FaultProxy, Trickle
from liar import LIES, RAGGED_LIES, lying_worker

OPTS = {"dataset": "train", "batch_size": 16, "read_bytes": 2048, "chunk_bytes": 512,
        "retry_deadline": 20.0}  # fmt: skip
CHECKED = [lie for lie in LIES if lie not in ("oversize", "huge-status", *RAGGED_LIES)]


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


async def test_a_description_over_the_receive_limit_is_no_busy_worker(npz_root: Path) -> None:
    """The same at start: a dataset's description over max_message_bytes was retried
    until describe_timeout, then reported as WorkersUnavailableError."""
    async with running_workers(npz_root, 1) as (worker,):
        with pytest.raises(MessageTooLargeError, match="max_message_bytes"):
            async with Loader(
                [worker.address], **{**OPTS, "max_message_bytes": 100, "describe_timeout": 5}
            ):
                pass


def test_busy_and_too_large_are_told_apart() -> None:
    class Error(grpc.aio.AioRpcError):
        def __init__(
            self, code: grpc.StatusCode, trailing: tuple[tuple[str, str], ...], details: str = "x"
        ) -> None:
            super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing), details)

    busy = Error(grpc.StatusCode.RESOURCE_EXHAUSTED, (("shardstream-busy", "1"),))
    too_large = Error(grpc.StatusCode.RESOURCE_EXHAUSTED, ())
    assert is_retryable(busy) and not is_retryable(too_large)
    metadata = Error(
        grpc.StatusCode.RESOURCE_EXHAUSTED, (), "received metadata size exceeds hard limit"
    )
    assert is_retryable(metadata)  # a worker's status too large to read: not a size option
    assert isinstance(worker_error(too_large, worker="w"), MessageTooLargeError)
    assert is_retryable(Error(grpc.StatusCode.UNAVAILABLE, ()))


async def test_a_status_over_the_metadata_limit_is_a_broken_stream_not_a_size_option(
    npz_root: Path,
) -> None:
    """A worker's status with 20 KB of details reaches the client as RESOURCE_EXHAUSTED
    ("received metadata size exceeds ...limit"). Was: taken for a message over
    max_message_bytes, which ended the epoch (MessageTooLargeError naming the wrong option)
    even with a healthy worker beside it. Now: the stream is broken, the read goes on
    elsewhere, exactly once; with no other worker, WorkersUnavailableError saying why."""
    async with running_workers(npz_root, 1) as (worker,):
        async with lying_worker(worker.address, "huge-status") as liar:
            async with Loader([liar, worker.address], **OPTS) as loader:
                batches = await collect_epoch(loader, 0)
                stats = loader.statistics()
            assert np.array_equal(np.sort(ids_of(batches)), np.arange(RECORDS))
            assert stats.resumes_by_worker.get(liar, 0) >= 1
            alone = {**OPTS, "retry_deadline": 1.0}
            async with Loader([liar], **alone) as loader:
                with pytest.raises(WorkersUnavailableError, match="metadata size"):
                    await collect_epoch(loader, 0)


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


# -- a stream's patience: one timer per stream, its verdicts, and outside cancellation ------------


class _SilentCall:
    """A stream whose next message never comes (until cancelled)."""

    async def read(self) -> object:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


def _patience(
    *, idle: float, room: bool = False, gap: float = 0.0, seen: int = 0
) -> tuple[_Patience, SimpleNamespace, FetchCounters]:
    options = SimpleNamespace(
        idle_timeout=idle, straggler_factor=8.0, straggler_seconds=0.1, straggler_moves=2
    )
    counters = FetchCounters()
    counters.pace.gap, counters.pace.seen = gap, seen
    progress = SimpleNamespace(moves=0)
    pool = SimpleNamespace(has_room_besides=lambda conn: room)
    return _Patience(None, progress, options, pool, counters), progress, counters  # type: ignore[arg-type]


async def test_a_silent_stream_is_given_up_after_the_idle_timeout() -> None:
    async def run() -> object:
        patience, _, _ = _patience(idle=0.3)
        try:
            return await patience.read(_SilentCall())  # type: ignore[arg-type]
        finally:
            patience.close()

    outcome = await asyncio.wait_for(run(), 30)
    assert isinstance(outcome, Broken) and outcome.suspect
    assert outcome.why == "no data for 0.3s"


async def test_a_straggling_stream_moves_when_another_worker_has_room() -> None:
    async def run() -> tuple[object, int, int]:
        # the fleet sends a message every 10 ms: 0.1 s without one is a straggler's
        patience, progress, counters = _patience(idle=30.0, room=True, gap=0.01, seen=8)
        try:
            outcome = await patience.read(_SilentCall())  # type: ignore[arg-type]
        finally:
            patience.close()
        return outcome, progress.moves, counters.stragglers

    outcome, moves, stragglers = await asyncio.wait_for(run(), 30)
    assert isinstance(outcome, Broken) and outcome.why.startswith("straggling")
    assert (moves, stragglers) == (1, 1)


async def test_cancelling_a_waiting_stream_from_outside_is_not_taken_for_a_verdict() -> None:
    """The epoch closing while a stream waits: the cancellation propagates, also when the
    patience timer gives its verdict at the same moment."""
    for verdict_too in (False, True):
        patience, _, _ = _patience(idle=0.0 if verdict_too else 30.0)
        task = asyncio.ensure_future(patience.read(_SilentCall()))  # type: ignore[arg-type]
        await asyncio.sleep(0)  # the task waits for its message now
        task.cancel()
        if verdict_too:
            patience._look()  # the timer's look, before the task resumes: two cancellations
        with pytest.raises(asyncio.CancelledError):
            await task
        patience.close()


@pytest.mark.parametrize(("data", "ok"), [(b"\x00\x01", True), (b"\x00\x02", False),
                                          (b"\xff\x01", False)])  # fmt: skip
def test_bool_bytes_other_than_0_or_1_are_refused(data: bytes, ok: bool) -> None:
    """The wire says a BOOL element is one byte, 0 or 1. numpy keeps any byte in a bool
    array, and a uint8 view, a sum or a copy to another language would see the lie."""
    schema = (FieldSpec("flag", "bool", ()),)
    tensor = pb.Tensor(name="flag", dtype=pb.DTYPE_BOOL, shape=[2], data=data)
    chunk = pb.Chunk(start=0, count=2, shard="s", tensors=[tensor])
    piece = decode_response(pb.ReadResponse(chunk=chunk).SerializeToString())
    assert isinstance(piece, Piece)
    if ok:
        check_piece(piece, schema, "s")
    else:
        with pytest.raises(ProtocolError, match="BOOL byte other than 0 or 1"):
            check_piece(piece, schema, "s")

"""One planned read, carried to completion across worker failures.

A read streams records [start, start + count) of a shard. If its stream fails
or is cut, or its worker drains or goes silent, the read goes on from the
first record not yet received, on the best worker available. Records are
handed to `put` in order, exactly once; a stream that was given up on is
cancelled, so nothing it would still send is ever seen.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from shardstream.client._planner import Read
from shardstream.client._pool import Conn, WorkerPool
from shardstream.client._wire import (
    RETRYABLE,
    End,
    Piece,
    ShardDesc,
    decode_response,
    encode_read,
    worker_error,
)
from shardstream.client.errors import DataLossError, ProtocolError

log = logging.getLogger("shardstream.client")


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchOptions:
    dataset: str
    seed: int
    max_chunk_records: int
    idle_timeout: float  # seconds without a message before a stream is given up
    retry_deadline: float  # seconds without progress before WorkersUnavailableError
    on_error: str = "raise"  # "skip": a record the worker cannot decode becomes a Hole
    journal: Callable[[dict[str, object]], None] | None = None  # resumes and skips, for a ledger


@dataclass(frozen=True, slots=True)
class Hole:
    """Records [start, start + count) of a shard that were skipped as bad."""

    start: int
    count: int


@dataclass
class FetchCounters:
    resumes: int = 0  # reads continued on a fresh stream after a failure or drain
    retries_by_worker: dict[str, int] | None = None
    skipped: int = 0  # records skipped as bad (on_error="skip")
    skipped_seen: set[tuple[str, int]] = field(default_factory=set)  # logged once each

    def count(self, address: str) -> None:
        self.resumes += 1
        if self.retries_by_worker is None:
            self.retries_by_worker = {}
        self.retries_by_worker[address] = self.retries_by_worker.get(address, 0) + 1


async def fetch(
    read: Read,
    shard: ShardDesc,
    *,
    pool: WorkerPool,
    options: FetchOptions,
    put: Callable[[int, int, Piece | Hole], None],
    counters: FetchCounters,
    first: Conn | None = None,
) -> None:
    """Stream `read` into `put(seq, offset, piece)` until every record arrived; the
    first attempt goes to `first` if given (acquired from the pool by the caller)."""
    loop = asyncio.get_running_loop()
    received = 0
    attempts: dict[str, str] = {}
    deadline = loop.time() + options.retry_deadline
    end_of_read = read.start + read.count
    bad: set[int] = set()  # records (shard indices) to skip
    try:
        while received < read.count:
            position = read.start + received
            if position in bad:
                put(read.seq, received, Hole(position, 1))
                received += 1
                continue
            wanted = min([b for b in bad if b > position], default=end_of_read) - position
            if first is not None:
                conn, first = first, None
            else:
                conn = await pool.acquire(deadline, attempts)
            request = encode_read(
                dataset=options.dataset,
                shard=shard.id,
                start=position,
                count=wanted,
                seed=options.seed,
                fingerprint=shard.fingerprint,
                max_chunk_records=options.max_chunk_records,
            )
            call = conn.read_stub().read(request)
            sent_here = 0
            try:
                end: End | None = None
                while True:
                    async with asyncio.timeout(options.idle_timeout):
                        msg = await call.read()
                    if msg is grpc.aio.EOF:
                        break
                    try:
                        item = _decode(msg, read.start + received, position + wanted)
                    except ProtocolError as exc:
                        raise ProtocolError(
                            str(exc), worker=conn.address, dataset=options.dataset, shard=shard.id
                        ) from None
                    if isinstance(item, End):
                        end = item
                        break
                    put(read.seq, received, item)
                    received += item.count
                    sent_here += item.count
                    deadline = loop.time() + options.retry_deadline
                if end is None:
                    raise _Cut("the stream ended without its end message")
                if end.records_sent != sent_here:
                    raise ProtocolError(
                        f"the end message counts {end.records_sent} records, {sent_here} arrived",
                        worker=conn.address,
                        dataset=options.dataset,
                        shard=shard.id,
                    )
                if end.draining:
                    pool.mark_down(conn, "draining", delay=options.retry_deadline)
                    counters.count(conn.address)
                    _journal(options, conn, shard, read.start + received, "draining")
                elif sent_here != wanted:
                    raise ProtocolError(
                        f"the stream ended complete after {sent_here} of {wanted} records",
                        worker=conn.address,
                        dataset=options.dataset,
                        shard=shard.id,
                    )
                else:
                    pool.mark_ok(conn)
            except TimeoutError:
                why = f"no data for {options.idle_timeout:g}s"
                _give_up(pool, conn, attempts, why, counters)
                _journal(options, conn, shard, read.start + received, why)
                pool.suspect(conn)  # silent: maybe frozen; wait for its health service
            except _Cut as exc:
                _give_up(pool, conn, attempts, str(exc), counters)
                _journal(options, conn, shard, read.start + received, str(exc))
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    error = worker_error(exc, worker=conn.address, dataset=options.dataset)
                    record = error.record
                    if (
                        options.on_error == "skip"
                        and isinstance(error, DataLossError)
                        and record is not None
                        and read.start + received <= record < end_of_read
                        and record not in bad
                    ):
                        bad.add(record)
                        counters.skipped += 1
                        if options.journal is not None:
                            options.journal({"kind": "skip", "shard": shard.id, "record": record})
                        if (shard.id, record) not in counters.skipped_seen:
                            counters.skipped_seen.add((shard.id, record))
                            log.warning("skipping a bad record: %s", error)
                        continue
                    raise error from None
                why = f"{exc.code().name}: {exc.details()}"
                _give_up(pool, conn, attempts, why, counters)
                _journal(options, conn, shard, read.start + received, why)
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    pool.suspect(conn)
            finally:
                call.cancel()
                pool.release(conn)
    finally:
        if first is not None:  # never used (e.g. nothing left to read)
            pool.release(first)


class _Cut(Exception):
    pass


def _journal(options: FetchOptions, conn: Conn, shard: ShardDesc, record: int, why: str) -> None:
    if options.journal is not None:
        options.journal(
            {"kind": "resume", "worker": conn.address, "shard": shard.id, "record": record,
             "why": why}
        )  # fmt: skip


def _give_up(
    pool: WorkerPool, conn: Conn, attempts: dict[str, str], why: str, counters: FetchCounters
) -> None:
    attempts[conn.address] = why
    pool.mark_down(conn, why)
    counters.count(conn.address)


def _decode(msg: bytes, expected: int, limit: int) -> Piece | End:
    """A streamed message, checked to continue the read at `expected`, not past `limit`."""
    item = decode_response(msg)
    if isinstance(item, Piece) and (
        item.start != expected or item.count < 1 or item.start + item.count > limit
    ):
        raise ProtocolError(
            f"chunk of records [{item.start}, {item.start + item.count}) does not continue "
            f"the request at {expected} (up to {limit})"
        )
    return item

"""One planned read, carried to completion across worker failures.

A read streams records [start, start + count) of a shard. If its stream fails
or is cut, or its worker drains or goes silent, the read goes on from the
first record not yet received, on the best worker available. Records are
handed to `put` in order, exactly once; a stream that was given up on is
cancelled, so nothing it would still send is ever seen.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

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
from shardstream.client.errors import ProtocolError


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchOptions:
    dataset: str
    seed: int
    max_chunk_records: int
    idle_timeout: float  # seconds without a message before a stream is given up
    retry_deadline: float  # seconds without progress before WorkersUnavailableError


@dataclass
class FetchCounters:
    resumes: int = 0  # reads continued on a fresh stream after a failure or drain
    retries_by_worker: dict[str, int] | None = None

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
    put: Callable[[int, int, Piece], None],
    counters: FetchCounters,
) -> None:
    """Stream `read` into `put(seq, offset, piece)` until every record arrived."""
    loop = asyncio.get_running_loop()
    received = 0
    attempts: dict[str, str] = {}
    deadline = loop.time() + options.retry_deadline
    while received < read.count:
        conn = await pool.acquire(deadline, attempts)
        request = encode_read(
            dataset=options.dataset,
            shard=shard.id,
            start=read.start + received,
            count=read.count - received,
            seed=options.seed,
            fingerprint=shard.fingerprint,
            max_chunk_records=options.max_chunk_records,
        )
        call = conn.stub.read(request)
        sent_here = 0
        try:
            end: End | None = None
            while True:
                async with asyncio.timeout(options.idle_timeout):
                    msg = await call.read()
                if msg is grpc.aio.EOF:
                    break
                try:
                    item = _decode(msg, read, received)
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
            elif received != read.count:
                raise ProtocolError(
                    f"the stream ended complete after {received} of {read.count} records",
                    worker=conn.address,
                    dataset=options.dataset,
                    shard=shard.id,
                )
            else:
                pool.mark_ok(conn)
        except TimeoutError:
            _give_up(pool, conn, attempts, f"no data for {options.idle_timeout:g}s", counters)
            pool.suspect(conn)  # silent: maybe frozen; wait for its health service
        except _Cut as exc:
            _give_up(pool, conn, attempts, str(exc), counters)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE:
                raise worker_error(exc, worker=conn.address, dataset=options.dataset) from None
            _give_up(pool, conn, attempts, f"{exc.code().name}: {exc.details()}", counters)
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                pool.suspect(conn)
        finally:
            call.cancel()
            pool.release(conn)


class _Cut(Exception):
    pass


def _give_up(
    pool: WorkerPool, conn: Conn, attempts: dict[str, str], why: str, counters: FetchCounters
) -> None:
    attempts[conn.address] = why
    pool.mark_down(conn, why)
    counters.count(conn.address)


def _decode(msg: bytes, read: Read, received: int) -> Piece | End:
    item = decode_response(msg)
    if isinstance(item, Piece):
        expected = read.start + received
        if item.start != expected or item.count < 1 or received + item.count > read.count:
            raise ProtocolError(
                f"chunk of records [{item.start}, {item.start + item.count}) does not continue "
                f"the read at {expected} ({read.count - received} records left)"
            )
    return item

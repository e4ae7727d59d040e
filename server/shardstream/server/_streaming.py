"""The chunk streamer: a read's records as serialized chunks, decoded one ahead.

    streamer = ChunkStreamer(config, executor, metrics, buffers, draining=is_draining)
    async for message in streamer.stream(dataset, shard, args):
        ...  # ReadResponse{chunk} bytes, then one ReadResponse{end}

Chunks are sized to `chunk_bytes` (and to what a message may carry, and to the
client's `max_chunk_records`). The next chunk is decoding while the current
one is sent. With decoding processes, chunks come back through shared-memory
slots (`_shm`); with threads, as bytes. A decoding process that dies fails the
read of its chunk with `ProcessDiedError` (UNAVAILABLE; the client resumes it).
A drain ends the stream at the next chunk boundary with an `End` that says so;
the client resumes elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Any

from shardstream.server._catalog import Dataset, Shard
from shardstream.server._config import WorkerConfig
from shardstream.server._decoding import read_chunk, read_chunk_into
from shardstream.server._metrics import WorkerMetrics
from shardstream.server._ragged import read_ragged_chunks
from shardstream.server._shm import ChunkBuffers
from shardstream.server._wire import ReadArgs, encode_end
from shardstream.server.errors import (
    DataLossError,
    DecodeError,
    ProcessDiedError,
    RequestError,
    ShardChanged,
    ShardChangedError,
)
from shardstream.v1.codec import chunk_limit, estimated_record_bytes, is_ragged

log = logging.getLogger("shardstream.worker")


class ChunkStreamer:
    """Streams checked reads (see `_requests.check_read`); one per servicer."""

    def __init__(
        self,
        config: WorkerConfig,
        executor: Executor,
        metrics: WorkerMetrics,
        buffers: ChunkBuffers | None,
        *,
        draining: Callable[[], bool],
    ) -> None:
        self._config = config
        self._executor = executor
        self._metrics = metrics
        self._buffers = buffers  # shared memory to decoding processes; None: threads
        self._draining = draining

    def chunk_records(self, ds: Dataset, args: ReadArgs, shard: Shard | None = None) -> int:
        """Records per chunk: `chunk_bytes`' worth, fitting a message and the client's cap.
        With ragged fields, records per decoding job, from the shard's average bytes per
        record (the job then cuts chunks from the records' actual bytes)."""
        per_record = max(1, ds.record_bytes)
        if is_ragged(ds.schema) and shard is not None:
            per_record = estimated_record_bytes(ds.schema, -(-shard.size // max(1, shard.records)))
        by_size = max(1, self._config.chunk_bytes // per_record)
        by_max = max(
            1, chunk_limit(ds.schema, len(args.shard.encode()), self._config.max_message_bytes)
        )
        n = min(by_size, by_max)
        if args.max_chunk_records > 0:
            n = min(n, args.max_chunk_records)
        return n

    async def stream(
        self, ds: Dataset, shard: Shard, args: ReadArgs
    ) -> AsyncGenerator[bytes, None]:
        """Chunks of [start, start + count), decoding one chunk ahead, then the end. Close it
        (`aclose`) when stopping early: that cancels the chunk decoding ahead."""
        loop = asyncio.get_running_loop()
        step = self.chunk_records(ds, args, shard)
        end = args.start + args.count
        starts = range(args.start, end, step)
        ragged = is_ragged(ds.schema)
        sizes = (self._config.chunk_bytes, self._config.max_message_bytes)
        # The request's seed and epoch: what the transforms' randomness depends on.
        chain = ds.pipeline and replace(ds.pipeline, seed=args.seed, epoch=args.epoch)

        def submit(s: int) -> asyncio.Future[Any]:
            submitted[0] = loop.time()
            job = (ds.decoder, shard.path, shard.stamp, s, min(step, end - s), ds.schema, shard.id)
            if ragged:  # chunks cut from actual bytes, returned as bytes (no shared memory)
                return asyncio.ensure_future(self._decode_ragged((*job, *sizes, chain)))
            if self._buffers is None:
                return loop.run_in_executor(self._executor, read_chunk, *job, chain)
            return asyncio.ensure_future(self._decode_shared(self._buffers, (*job, chain)))

        submitted = [0.0]
        pending = submit(starts[0]) if starts else None
        sent = 0
        try:
            for i, s in enumerate(starts):
                assert pending is not None
                try:
                    data = await pending
                except (DecodeError, ShardChanged) as exc:
                    raise _data_error(ds, shard, s, exc) from exc
                took = loop.time() - submitted[0]
                pending = submit(starts[i + 1]) if i + 1 < len(starts) else None
                parts: list[tuple[int, bytes]] = data if ragged else [(min(step, end - s), data)]
                for n, message in parts:
                    yield message
                    sent += n
                    self._metrics.chunk(ds.name, n, len(message), took)
                    took = 0.0
                    if self._draining() and sent < args.count:
                        at = args.start + sent
                        log.info("draining: ending a stream of %s at record %d", shard.id, at)
                        self._metrics.drained()
                        yield encode_end(sent, draining=True)
                        return
            yield encode_end(sent, draining=False)
        finally:
            if pending is not None:
                pending.cancel()

    async def _decode_ragged(self, job: tuple[Any, ...]) -> list[tuple[int, bytes]]:
        """`read_ragged_chunks` in the executor; a dead decoding process as ProcessDiedError."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, read_ragged_chunks, *job)
        except BrokenProcessPool as exc:
            _, _, _, start, count, _, shard_id, *_ = job
            raise ProcessDiedError(
                f"shard {shard_id!r}, records {start}-{start + count - 1}: {exc}; resume the read",
                shard=shard_id,
                record=start,
            ) from exc

    async def _decode_shared(self, buffers: ChunkBuffers, job: tuple[Any, ...]) -> bytes:
        """Decode in a process, through a shared-memory slot (bounded: one chunk per slot)."""
        try:
            return await self._decode_into(buffers, job)
        except BrokenProcessPool as exc:  # its process died; it is dead and reaped by now
            _, _, _, start, count, _, shard_id, *_ = job
            raise ProcessDiedError(
                f"shard {shard_id!r}, records {start}-{start + count - 1}: {exc}; resume the read",
                shard=shard_id,
                record=start,
            ) from exc

    async def _decode_into(self, buffers: ChunkBuffers, job: tuple[Any, ...]) -> bytes:
        index = await buffers.acquire()
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._executor, read_chunk_into, index, *job)
        except BaseException:
            buffers.release(index)
            raise
        try:
            nbytes = await asyncio.shield(future)
        except asyncio.CancelledError:
            # The process may still be writing into the slot: free it only when done.
            future.add_done_callback(lambda _: buffers.release(index))
            raise
        except BaseException:
            buffers.release(index)
            raise
        try:
            return buffers.take(index, nbytes)
        finally:
            buffers.release(index)


def _data_error(ds: Dataset, shard: Shard, start: int, exc: Exception) -> RequestError:
    """A decoding process's error, as the request error naming where it happened."""
    cls: type[RequestError] = ShardChangedError
    record = start
    if isinstance(exc, DecodeError):
        cls = DataLossError
        record = start if exc.record is None else exc.record
    return cls(
        f"dataset {ds.name!r}, shard {shard.id!r}, record {record}: {exc}",
        dataset=ds.name,
        shard=shard.id,
        record=record,
    )

"""The chunk streamer: a read's records as serialized chunks, decoded one ahead.

    streamer = ChunkStreamer(config, executor, metrics, buffers, draining=is_draining)
    async for message in streamer.stream(dataset, shard, args):
        ...  # ReadResponse{chunk} bytes, then one ReadResponse{end}

Chunks are sized to `chunk_bytes` (and to what a message may carry, and to the
client's `max_chunk_records`); those of a dataset with transforms also to about
`CHUNK_SECONDS` of decoding and transforms (`Dataset.seconds_per_record`). On a
same-host lane, chunks read straight from their files are sized to the lane's slot
instead, up to a whole read: what each chunk costs (its messages, parsing,
hand-overs) is then paid once a read; where one finds no free slot, the rest of the
read goes on the socket in message-sized chunks. The next chunk is decoding while
the current one is sent (a chunk read on the event loop, all in the page cache, is
read when it is due: `_inline`). With decoding processes, chunks come back through
shared-memory slots (`_shm`); with threads, as bytes. A decoding process that dies
fails the read of its chunk with `ProcessDiedError` (UNAVAILABLE; the client resumes
it). A drain ends the stream at the next chunk boundary with an `End` that says so;
the client resumes elsewhere.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Executor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import replace
from typing import Any

from shardstream._common.loops import wait_done
from shardstream.server._catalog import Dataset, Shard
from shardstream.server._config import WorkerConfig
from shardstream.server._decoding import read_chunk, read_chunk_into
from shardstream.server._direct import (
    LATER,
    message_for,
    open_direct,
    read_direct_into,
    read_direct_now,
    send_direct,
)
from shardstream.server._lanes import Lane, Lanes
from shardstream.server._metrics import WorkerMetrics
from shardstream.server._ragged import read_ragged_chunks
from shardstream.server._shm import ChunkBuffers
from shardstream.server._wire import ReadArgs, encode_end, encode_shared
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

LaneTo = tuple[Lane, int]  # a client's lane and its id of the read
# Streams running at most this many: chunks read straight from files whose bytes are all
# in the page cache are read on the event loop (`read_direct_now`), without the hop to an
# I/O thread and back (measured: ~15% of the server's CPU per GB on the socket path).
# With more, the I/O threads spread the copies from the page cache over the cores.
INLINE_STREAMS = 4
# The most work a chunk (or, with ragged fields, a decoding job) of a dataset with
# transforms is given, in seconds a record took through the decoder and the transforms at
# start-up (`Dataset.seconds_per_record`). A client waits `idle_timeout` (30 s by default)
# for its next chunk before it gives the read up and resumes it elsewhere, so a chunk must
# be far quicker than that: 0.5 s leaves 60x for records or a busy host slower than the
# sample, with a chunk's own costs (a decoding job, a message) still well under 1% of it.
# Without this, chunks were sized by bytes only: 4 MiB of 40-byte records at 2 ms a record
# is 200 s of work, and no chunk ever arrived.
CHUNK_SECONDS = 0.5
# What a chunk job gives: a message, or a SharedChunk message and the chunk's size (in a
# lane); None: a lane-sized chunk that is to go as messages instead.
Sent = bytes | tuple[bytes, int] | None


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
        lanes: Lanes | None = None,
        network_lanes: Lanes | None = None,
    ) -> None:
        self._config = config
        self._executor = executor
        self._metrics = metrics
        self._buffers = buffers  # shared memory to decoding processes; None: threads
        self._lanes = lanes  # same-host lanes of clients (`_lanes`); None: off
        self._network_lanes = network_lanes  # network lanes of clients; None: off
        # Datasets whose chunks need decoding (no direct reads: `_direct`), by name.
        self._decoded: set[str] = set()
        self._draining = draining
        self._running = 0  # streams running now

    def chunk_records(self, ds: Dataset, args: ReadArgs, shard: Shard | None = None) -> int:
        """Records per chunk: `chunk_bytes`' worth, fitting a message and the client's cap,
        and with transforms about `CHUNK_SECONDS` of their work. With ragged fields, records
        per decoding job, from the shard's average bytes per record (the job then cuts
        chunks from the records' actual bytes), and as many seconds of work."""
        per_record = max(1, ds.record_bytes)
        if is_ragged(ds.schema) and shard is not None:
            per_record = estimated_record_bytes(ds.schema, -(-shard.size // max(1, shard.records)))
        by_size = max(1, self._config.chunk_bytes // per_record)
        by_max = max(
            1, chunk_limit(ds.schema, len(args.shard.encode()), self._config.max_message_bytes)
        )
        n = min(by_size, by_max)
        if ds.pipeline is not None and ds.seconds_per_record > 0:
            n = min(n, max(1, int(CHUNK_SECONDS / ds.seconds_per_record)))
        if args.max_chunk_records > 0:
            n = min(n, args.max_chunk_records)
        return n

    def lane_chunk_records(self, ds: Dataset, args: ReadArgs, lane: Lane) -> int:
        """Records per chunk of a read whose chunks go into `lane` straight from their
        files: what a slot holds (not bounded by a message), at most the client's
        `lane_chunk_records` (0: its `max_chunk_records`), the most it asked for, even
        where that is fewer than a message holds; at least one."""
        fits = chunk_limit(ds.schema, len(args.shard.encode()), lane.slot_bytes)
        cap = args.lane_chunk_records or args.max_chunk_records
        if cap > 0:
            fits = min(fits, cap)
        return max(1, fits)

    def _direct(self, ds: Dataset, chain: object, ragged: bool) -> bool:
        """Whether the dataset's chunks are read straight from their files (`_direct`)."""
        return (
            self._buffers is not None
            and not chain
            and not ragged
            and self._config.direct_reads
            and ds.name not in self._decoded
        )

    async def stream(
        self, ds: Dataset, shard: Shard, args: ReadArgs
    ) -> AsyncGenerator[bytes, None]:
        """Chunks of [start, start + count), decoding one chunk ahead (but those read on the
        event loop), then the end. Close it
        (`aclose`) when stopping early: that cancels the chunk decoding ahead."""
        loop = asyncio.get_running_loop()
        step = self.chunk_records(ds, args, shard)
        end = args.start + args.count
        ragged = is_ragged(ds.schema)
        sizes = (self._config.chunk_bytes, self._config.max_message_bytes)
        # The request's seed and epoch: what the transforms' randomness depends on.
        chain = ds.pipeline and replace(ds.pipeline, seed=args.seed, epoch=args.epoch)

        lane = None if self._lanes is None or not args.lane else self._lanes.get(args.lane)
        to = None if lane is None else (lane, args.lane_stream)
        # A network lane: each chunk, made as for the socket, is sent into the client's slot
        net = self._network_lanes
        net_lane = None if net is None or lane is not None or not args.lane else net.get(args.lane)
        small = step  # a message's worth: what a chunk that goes on the socket holds
        if net_lane is not None and self._direct(ds, chain, ragged):  # whole reads, sent
            to = (net_lane, args.lane_stream)  # into the client's slots from the file
            step = self.lane_chunk_records(ds, args, net_lane)
        elif lane is not None and self._direct(ds, chain, ragged):
            step = self.lane_chunk_records(ds, args, lane)
        elif lane is not None and args.lane_chunk_records > 0:  # the most a lane chunk holds
            step = min(step, args.lane_chunk_records)

        def submit(s: int) -> _Job:
            """The chunk job at `s`, timed from now to its result."""
            now = loop.time()
            return _Job(loop, now, s, *job_at(s))

        def job_at(s: int) -> tuple[int, asyncio.Future[Any]]:
            """(records, future) of the chunk job at `s`."""
            n = min(step, end - s)
            direct = self._direct(ds, chain, ragged)
            if n > small and not direct:  # lane-sized chunks only where read straight in
                n = small
            job = (ds.decoder, shard.path, shard.stamp, s, n, ds.schema, shard.id)
            if ragged:  # chunks cut from actual bytes, returned as bytes (no shared memory)
                return n, asyncio.ensure_future(self._decode_ragged((*job, *sizes, chain)))
            buffers = self._buffers
            if buffers is None:
                decoded = loop.run_in_executor(self._executor, read_chunk, *job, chain)
                if to is None:
                    return n, decoded
                return n, asyncio.ensure_future(_to_lane(decoded, job, to))
            if direct:
                return n, asyncio.ensure_future(self._read_direct(ds, buffers, job, to, small))
            return n, asyncio.ensure_future(self._decode_shared(buffers, (*job, chain), to))

        def inline() -> bool:
            """Whether the next chunk is to be read on the event loop when it is due
            (nothing ahead: there is no other core to read it on meanwhile)."""
            return (
                to is None and self._running <= INLINE_STREAMS and self._direct(ds, chain, ragged)
            )

        at = args.start  # the next chunk's first record
        pending: _Job | None = None
        sent = 0
        self._running += 1
        try:
            while at < end:
                count = min(step, end - at)
                data: Sent | list[tuple[int, bytes, int]] = None
                if pending is None and inline():
                    began = loop.time()
                    job = (ds.decoder, shard.path, shard.stamp, at, count, ds.schema, shard.id)
                    try:
                        data = self._inline(ds, job)
                    except (DecodeError, ShardChanged) as exc:
                        raise _data_error(ds, shard, at, exc) from exc
                    took = loop.time() - began
                if data is None:  # from a job: decoded, read in a thread, or in a lane
                    ahead = pending or submit(at)
                    count = ahead.records
                    try:
                        data = await ahead.future
                    except (DecodeError, ShardChanged) as exc:
                        raise _data_error(ds, shard, ahead.start, exc) from exc
                    pending = None
                    if data is None:  # a lane-sized chunk found no slot: the rest as messages
                        step = small
                        continue
                    # Its own time: done (maybe long) before, while the client took the last.
                    took = ahead.seconds()
                    if at + count < end and not inline():
                        pending = submit(at + count)
                self._metrics.job(ds.name, took)  # once a job, however many chunks it makes
                first = at  # the next message's first record
                at += count
                # (records, message, bytes of the records' data)
                out: list[tuple[int, bytes, int]]
                if isinstance(data, list):  # ragged: cut by their data's bytes, given with them
                    out = data
                else:  # a message, or one in a lane: the records' bytes are fixed
                    message = data[0] if isinstance(data, tuple) else data
                    out = [(count, message, count * ds.record_bytes)]
                for n, message, nbytes in out:
                    # Counted as handed to gRPC: a stream that stalls is closed at this
                    # yield, with its last chunk sent once its client reads.
                    self._metrics.chunk(ds.name, n, nbytes)
                    # (a read whose chunks go into the lane in their jobs sends none
                    # here: its frames go one after the other, in its chunks' order)
                    if net_lane is not None and net is not None and to is None:
                        slot = await net_lane.send(args.lane_stream, message, net.stall)
                        if slot is not None:
                            message = encode_shared(first, n, shard.id, slot, len(message))
                    yield message
                    first += n
                    sent += n
                    if self._draining() and sent < args.count:
                        at = args.start + sent
                        log.info("draining: ending a stream of %s at record %d", shard.id, at)
                        self._metrics.drained()
                        yield encode_end(sent, draining=True)
                        return
            yield encode_end(sent, draining=False)
        finally:
            self._running -= 1
            if pending is not None:
                pending.future.cancel()

    def _inline(self, ds: Dataset, job: tuple[Any, ...]) -> bytes | None:
        """A chunk read straight from its file on the event loop (`read_direct_now`); None
        where it is not all in the page cache (read it in a thread), or needs decoding
        (then so do the dataset's next ones: it is added to `_decoded`)."""
        message, room = message_for(job)
        try:
            size = self._now(ds, room, job)
        finally:
            room.release()
        if size == LATER:
            return None
        if size is None or size != len(message):
            self._decoded.add(ds.name)
            return None
        return message

    async def _decode_ragged(self, job: tuple[Any, ...]) -> list[tuple[int, bytes, int]]:
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

    async def _read_direct(
        self,
        ds: Dataset,
        buffers: ChunkBuffers,
        job: tuple[Any, ...],
        to: LaneTo | None,
        small: int,
    ) -> Sent:
        """A chunk of file bytes read into its message (`_direct`: on the event loop where
        it is all in the page cache, else in an I/O thread), in a lane's slot if one is
        free; one that needs decoding goes to a decoding process, as
        do the dataset's next ones. None for a chunk of more than `small` records (sized
        for a lane's slot) that finds no slot (or needs decoding)."""
        if to is not None:
            shared = await self._read_direct_to_lane(job, *to)
            if shared is not None:
                return shared
        if job[4] > small:  # sized for the lane: the caller sends it as messages instead
            return None
        # All in the page cache: read it here and now (a chunk submitted ahead while more
        # streams ran, or one on the socket beside a lane).
        if self._running <= INLINE_STREAMS:
            message = self._inline(ds, job)
            if message is not None:
                return message
        if ds.name in self._decoded:  # it needs decoding (`_inline` found out)
            return await self._decode_shared(buffers, (*job, None), to)
        loop = asyncio.get_running_loop()
        index = await buffers.acquire()  # the slots bound the chunks in flight either way
        # The message is made here, on the event loop, so that its memory comes from the
        # main heap that the idle trim hands back (`_writes.TrimWhenIdle`), not from an
        # I/O thread's malloc arena; the thread only fills it.
        message, room = message_for(job)
        future = loop.run_in_executor(None, read_direct_into, room, *job)

        def done(_: object = None) -> None:  # the thread no longer writes into the message
            room.release()
            buffers.release(index)
            kept.clear()

        kept = [message]  # the thread fills it: keep it alive until then
        try:
            await wait_done(future)  # cancelled here, the thread still writes: see below
        except asyncio.CancelledError:
            future.add_done_callback(done)
            raise
        done()
        try:
            size = future.result()
        except (DecodeError, ShardChanged):
            raise
        except Exception:  # e.g. the decoder does not load here: decode in its processes
            log.warning("dataset %r: direct reads failed; decoding instead", ds.name, exc_info=True)
            size = None
        if size == len(message):
            return message
        self._decoded.add(ds.name)
        return await self._decode_shared(buffers, (*job, None), to)

    def _now(self, ds: Dataset, buffer: memoryview, job: tuple[Any, ...]) -> int | None:
        """`read_direct_now` on the event loop: LATER (read it in a thread), the size, or
        None where the chunk needs decoding (as a failed direct read: logged)."""
        try:
            return read_direct_now(buffer, *job)
        except (DecodeError, ShardChanged):
            raise
        except Exception:  # e.g. the decoder does not load here: decode in its processes
            log.warning("dataset %r: direct reads failed; decoding instead", ds.name, exc_info=True)
            return None

    async def _read_direct_to_lane(
        self, job: tuple[Any, ...], lane: Lane, stream: int
    ) -> tuple[bytes, int] | None:
        """`read_direct` into a free slot of `lane`: the SharedChunk message and the chunk's
        size; None if no slot is free or the chunk needs decoding."""
        if lane.network:
            return await self._read_direct_to_network(job, lane, stream)
        slot = lane.acquire(stream)
        if slot is None:
            return None
        size: int | None = LATER
        if self._running <= INLINE_STREAMS:  # all in the page cache: read it here and now
            try:
                size = read_direct_now(lane.slot(slot), *job)
            except BaseException:
                lane.written(slot, sent=False)
                raise
        if size == LATER:
            loop = asyncio.get_running_loop()
            future = loop.run_in_executor(None, read_direct_into, lane.slot(slot), *job)
            try:
                await wait_done(future)
            except asyncio.CancelledError:  # the thread may still write into the slot
                future.add_done_callback(lambda _: lane.written(slot, sent=False))
                raise
            try:
                size = future.result()
            except BaseException:
                lane.written(slot, sent=False)
                raise
        if size is None:
            lane.written(slot, sent=False)
            return None
        lane.written(slot, sent=True)
        _, _, _, start, count, _, shard_id = job
        return encode_shared(start, count, shard_id, slot, size), size

    async def _read_direct_to_network(
        self, job: tuple[Any, ...], lane: Lane, stream: int
    ) -> tuple[bytes, int] | None:
        """A chunk of file bytes sent from its file into a free slot of a network lane's
        client (`send_direct`: no copy in this process): the SharedChunk message and the
        chunk's size; None if no slot is free, the chunk needs decoding, or the lane ended
        (the caller reads it again as messages)."""
        slot = lane.acquire(stream)
        if slot is None:
            return None
        try:
            opened = open_direct(job)
        except BaseException:
            lane.written(slot, sent=False)
            raise
        if opened is None:
            lane.written(slot, sent=False)
            return None
        fd, stamp, pieces, ranges, size = opened
        write = functools.partial(send_direct, fd, stamp, pieces, ranges)
        timeout = self._config.stream_stall_timeout
        sending = asyncio.ensure_future(lane.send_into(slot, stream, size, write, timeout))
        sending.add_done_callback(lambda _: os.close(fd))  # the thread is done with it
        if not await asyncio.shield(sending):
            return None
        _, _, _, start, count, _, shard_id = job
        return encode_shared(start, count, shard_id, slot, size), size

    async def _decode_shared(
        self, buffers: ChunkBuffers, job: tuple[Any, ...], to: LaneTo | None = None
    ) -> bytes | tuple[bytes, int]:
        """Decode in a process, through a shared-memory slot (bounded: one chunk per slot)."""
        try:
            return await self._decode_into(buffers, job, to)
        except BrokenProcessPool as exc:  # its process died; it is dead and reaped by now
            _, _, _, start, count, _, shard_id, *_ = job
            raise ProcessDiedError(
                f"shard {shard_id!r}, records {start}-{start + count - 1}: {exc}; resume the read",
                shard=shard_id,
                record=start,
            ) from exc

    async def _decode_into(
        self, buffers: ChunkBuffers, job: tuple[Any, ...], to: LaneTo | None
    ) -> bytes | tuple[bytes, int]:
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
            if to is not None and not to[0].network:  # into the client's lane: one copy
                lane, stream = to
                slot = lane.acquire(stream)
                if slot is not None:
                    lane.slot(slot)[:nbytes] = buffers.view(index, nbytes)
                    lane.written(slot, sent=True)
                    _, _, _, start, count, _, shard_id, *_ = job
                    return encode_shared(start, count, shard_id, slot, nbytes), nbytes
            return buffers.take(index, nbytes)
        finally:
            buffers.release(index)


async def _to_lane(
    decoded: asyncio.Future[bytes], job: tuple[Any, ...], to: LaneTo
) -> bytes | tuple[bytes, int]:
    """A chunk decoded in a thread, put into a free slot of the client's lane (else as is)."""
    message = await decoded
    lane, stream = to
    slot = None if lane.network else lane.acquire(stream)
    if slot is None:
        return message
    if len(message) > lane.slot_bytes:
        lane.written(slot, sent=False)
        return message
    lane.slot(slot)[: len(message)] = message
    lane.written(slot, sent=True)
    _, _, _, start, count, _, shard_id = job
    return encode_shared(start, count, shard_id, slot, len(message)), len(message)


class _Job:
    """A chunk job (`records` from `start`) and its time, from submission to its result
    (a done callback's: a job done ahead waits for no client)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        submitted: float,
        start: int,
        records: int,
        future: asyncio.Future[Any],
    ) -> None:
        self.start, self.records, self.future = start, records, future
        self._loop = loop
        self._submitted = submitted
        self._done: float | None = None
        future.add_done_callback(self._on_done)

    def _on_done(self, _: object) -> None:
        self._done = self._loop.time()

    def seconds(self) -> float:
        """From submission to its result (to now, if its callback has not run yet)."""
        done = self._loop.time() if self._done is None else self._done
        return done - self._submitted


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

"""The Worker service: thin handlers over the catalog and the chunk streamer.

Handlers take a request's bytes, decode and check them (`_wire`, `_requests`),
and return domain objects or write serialized chunks (`_streaming`); `_wire`
encodes replies. Refusals are `errors.RequestError`s, which become gRPC status
codes in one place, `_status`.

A stream's every write must complete within `stream_stall_timeout`: a client
that reads nothing for that long (its HTTP/2 window stays full) has its stream
ended with `StalledError`, so it keeps neither a `max_streams` slot nor decoded
chunks; the status reaches it after the chunk gRPC still holds for it, if it
ever reads, and it resumes the read. Until its client reads or leaves, such a
stream still holds that one chunk, so stalled streams count too: at most
`max_streams` run, and running plus stalled ones stay under `2 * max_streams`.
Once no stream runs or waits for a second, freed heap is handed back to the
kernel (glibc's `malloc_trim`), so a worker returns near its baseline memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import sys
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import Executor

import grpc

from shardstream.server._catalog import Catalog, Dataset, Shard
from shardstream.server._config import WorkerConfig
from shardstream.server._metrics import WorkerMetrics
from shardstream.server._requests import check_read, find_dataset, ready
from shardstream.server._shm import ChunkBuffers
from shardstream.server._status import REFUSALS, FinishOnError, StatusOnError, shown
from shardstream.server._streaming import ChunkStreamer
from shardstream.server._wire import decode_describe, decode_list, decode_read
from shardstream.server.errors import BusyError, DrainingError, StalledError

log = logging.getLogger("shardstream.worker")

TRIM_AFTER_IDLE = 1.0  # seconds without streams before freed heap is handed back


class WorkerServicer:
    def __init__(
        self,
        config: WorkerConfig,
        executor: Executor,
        metrics: WorkerMetrics | None = None,
        buffers: ChunkBuffers | None = None,
    ) -> None:
        self._config = config
        self.metrics = metrics or WorkerMetrics()
        self._streamer = ChunkStreamer(
            config, executor, self.metrics, buffers, draining=self.is_draining
        )
        self.catalog: Catalog | None = None  # set by the Worker once indexing is done
        self.draining = False  # set by the Worker's drain: refuse streams, end running ones
        self.active = 0  # streams running now
        self.stalled = 0  # streams ended for a client reading nothing, not yet left by it
        self.idle = asyncio.Event()  # set while no stream runs
        self.idle.set()
        self._streams_since_trim = 0
        self._trim: asyncio.TimerHandle | None = None
        self._closed = False

    def is_draining(self) -> bool:
        return self.draining

    def close(self) -> None:
        """Cancel the pending heap trim (the Worker calls this once its server stopped)."""
        self._closed = True
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None

    async def describe(self, request: bytes, context: grpc.aio.ServicerContext) -> Dataset:
        async with StatusOnError(context, self.metrics):
            return find_dataset(self.catalog, decode_describe(request))

    async def list_datasets(
        self, request: bytes, context: grpc.aio.ServicerContext
    ) -> list[Dataset]:
        async with StatusOnError(context, self.metrics):
            decode_list(request)
            return list(ready(self.catalog).datasets.values())

    async def read(self, request: bytes, context: grpc.aio.ServicerContext) -> None:
        """Write a read's chunks, then its End; a refusal or failure sets the status."""
        async with FinishOnError(context, self.metrics):
            args = decode_read(request)
            if self.draining:
                raise DrainingError("the worker is draining")
            self._admit()
            ds, shard = check_read(self.catalog, args)
            self.active += 1
            self._streams_since_trim += 1
            self.idle.clear()
            self.metrics.stream(ds.name, +1)
            try:
                await self._send(context, self._streamer.stream(ds, shard, args), ds, shard)
            finally:
                self.active -= 1
                self.metrics.stream(ds.name, -1)
                if self.active == 0:
                    self.idle.set()
                self._maybe_idle()

    def _admit(self) -> None:
        limit = self._config.max_streams
        if self.active >= limit or self.active + self.stalled >= 2 * limit:
            held = f" and holds {self.stalled} stalled ones" if self.stalled else ""
            raise BusyError(
                f"the worker already serves {self.active} streams{held} (--max-streams {limit})"
            )

    async def _send(
        self,
        context: grpc.aio.ServicerContext,
        messages: AsyncGenerator[bytes, None],
        ds: Dataset,
        shard: Shard,
    ) -> None:
        """Write `messages`, each within the stall timeout, else end with StalledError."""
        timeout = self._config.stream_stall_timeout
        async with contextlib.aclosing(messages):  # cancels the chunk decoding ahead
            # Headers first: a status set after a write that timed out must not carry them.
            sent = await _within(timeout, context.send_initial_metadata(()))
            if sent:
                async for message in messages:
                    if not await _within(timeout, context.write(message)):
                        sent = False
                        break
        if not sent:
            self._stall(context)
            REFUSALS.log(
                logging.INFO,
                "stalled",
                "ended a stream of shard %s of dataset %r: its client read nothing for %gs",
                shown(repr(shard.id)),
                ds.name,
                timeout,
            )
            raise StalledError(
                f"ended the stream of shard {shard.id!r} of dataset {ds.name!r}: the client "
                f"read nothing for {timeout:g}s (--stream-stall-timeout); resume it elsewhere",
                dataset=ds.name,
                shard=shard.id,
            )

    def _stall(self, context: grpc.aio.ServicerContext) -> None:
        """Count a stalled stream until gRPC is done with it (its client read or left)."""
        self.stalled += 1

        def done(_: object) -> None:
            self.stalled -= 1
            self._maybe_idle()

        add_done_callback: Callable[[Callable[[object], None]], None]
        add_done_callback = context.add_done_callback
        add_done_callback(done)

    def _maybe_idle(self) -> None:
        """Once no stream runs or stalls for TRIM_AFTER_IDLE, hand freed heap back."""
        if self.active or self.stalled or self._closed or not self._streams_since_trim:
            return
        if self._trim is not None:
            self._trim.cancel()
        self._trim = asyncio.get_running_loop().call_later(TRIM_AFTER_IDLE, self._trim_heap)

    def _trim_heap(self) -> None:
        self._trim = None
        if self.active or self.stalled or self._closed:
            return
        self._streams_since_trim = 0
        trim_heap()


async def _within(seconds: float, write: Awaitable[object]) -> bool:
    """Await `write`; False if it did not complete within `seconds` (HTTP/2 flow control:
    the client reads nothing)."""
    try:
        async with asyncio.timeout(seconds):
            await write
    except TimeoutError:
        return False
    return True


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None
    return trim


def trim_heap() -> bool:
    """Hand the heap's free pages back to the kernel (glibc `malloc_trim(0)`, every arena);
    False where malloc is not glibc's."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True

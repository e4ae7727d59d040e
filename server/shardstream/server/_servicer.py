"""The Worker service: thin handlers over the catalog and the chunk streamer.

Handlers take requests `_wire` decoded, check them (`_requests`), and return
domain objects or serialized chunks (`_streaming`); `_wire` encodes replies.
Refusals are `errors.RequestError`s, which become gRPC status codes in one
place, `_status.StatusOnError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Executor

import grpc

from shardstream.server._catalog import Catalog, Dataset
from shardstream.server._config import WorkerConfig
from shardstream.server._metrics import WorkerMetrics
from shardstream.server._requests import check_read, find_dataset, ready
from shardstream.server._shm import ChunkBuffers
from shardstream.server._status import StatusOnError
from shardstream.server._streaming import ChunkStreamer
from shardstream.server._wire import ReadArgs
from shardstream.server.errors import BusyError, DrainingError


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
        self.idle = asyncio.Event()  # set while no stream runs
        self.idle.set()

    def is_draining(self) -> bool:
        return self.draining

    async def describe(self, name: str, context: grpc.aio.ServicerContext) -> Dataset:
        async with StatusOnError(context, self.metrics):
            return find_dataset(self.catalog, name)

    async def list_datasets(self, _: object, context: grpc.aio.ServicerContext) -> list[Dataset]:
        async with StatusOnError(context, self.metrics):
            return list(ready(self.catalog).datasets.values())

    async def read(self, args: ReadArgs, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async with StatusOnError(context, self.metrics):
            if self.draining:
                raise DrainingError("the worker is draining")
            if self.active >= self._config.max_streams:
                raise BusyError(f"the worker already serves {self.active} streams (--max-streams)")
            ds, shard = check_read(self.catalog, args)
            self.active += 1
            self.idle.clear()
            self.metrics.stream(ds.name, +1)
            try:
                async for message in self._streamer.stream(ds, shard, args):
                    yield message
            finally:
                self.active -= 1
                self.metrics.stream(ds.name, -1)
                if self.active == 0:
                    self.idle.set()

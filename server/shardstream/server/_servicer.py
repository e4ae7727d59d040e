"""The Worker service: thin handlers over the catalog and the decoding pool.

Handlers take decoded requests and return domain objects or serialized
chunks; `_wire` does the protobuf side. Domain errors become gRPC status codes
in one place, `_StatusOnError`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

import grpc

from shardstream.server._catalog import Catalog, Dataset, Shard
from shardstream.server._config import WorkerConfig
from shardstream.server._decoders import DecodeError
from shardstream.server._decoding import ShardChanged, read_chunk, read_chunk_into
from shardstream.server._metrics import WorkerMetrics
from shardstream.server._shm import ChunkBuffers
from shardstream.server._wire import CHUNK_OVERHEAD, ReadArgs, encode_end

log = logging.getLogger("shardstream.worker")


class RequestError(Exception):
    """A request the worker will not serve; carries its status code and context."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        dataset: str = "",
        shard: str = "",
        record: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.dataset = dataset
        self.shard = shard
        self.record = record


class WorkerServicer:
    def __init__(
        self,
        config: WorkerConfig,
        executor: Executor,
        metrics: WorkerMetrics | None = None,
        buffers: ChunkBuffers | None = None,
    ) -> None:
        self._config = config
        self._executor = executor
        self._buffers = buffers  # shared memory to decoding processes; None: threads
        self.metrics = metrics or WorkerMetrics()
        self.catalog: Catalog | None = None
        self.draining = False
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()

    def is_draining(self) -> bool:
        return self.draining

    def _dataset(self, name: str) -> Dataset:
        if self.catalog is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "the worker is still indexing")
        try:
            return self.catalog.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.catalog.datasets))
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"unknown dataset {name!r}; this worker serves: {known}",
                dataset=name,
            ) from None

    async def describe(self, name: str, context: grpc.aio.ServicerContext) -> Dataset:
        async with _StatusOnError(context, self.metrics):
            return self._dataset(name)

    async def list_datasets(self, _: object, context: grpc.aio.ServicerContext) -> list[Dataset]:
        async with _StatusOnError(context, self.metrics):
            if self.catalog is None:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the worker is still indexing")
            return list(self.catalog.datasets.values())

    def _validate(self, args: ReadArgs) -> tuple[Dataset, Shard]:
        ds = self._dataset(args.dataset)
        sid = args.shard
        if "\0" in sid or sid.startswith(("/", "\\")) or ".." in sid.replace("\\", "/").split("/"):
            raise RequestError(
                grpc.StatusCode.PERMISSION_DENIED,
                f"shard id {sid!r} would leave the data root; shard ids are the relative "
                "paths that DescribeDataset lists",
                dataset=ds.name,
                shard=sid,
            )
        shard = ds.by_id.get(sid)
        if shard is None:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"dataset {ds.name!r} has no shard {args.shard!r}",
                dataset=ds.name,
                shard=args.shard,
            )
        if args.start < 0 or args.count < 0 or args.start + args.count > shard.records:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"records [{args.start}, {args.start + args.count}) are outside shard "
                f"{shard.id!r} of dataset {ds.name!r}, which has {shard.records} records",
                dataset=ds.name,
                shard=shard.id,
            )
        if args.shard_fingerprint and args.shard_fingerprint != shard.fingerprint:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"shard {shard.id!r} of dataset {ds.name!r} has fingerprint {shard.fingerprint}, "
                f"the client expects {args.shard_fingerprint}: the data differs between workers",
                dataset=ds.name,
                shard=shard.id,
            )
        return ds, shard

    def _chunk_records(self, ds: Dataset, args: ReadArgs) -> int:
        per_record = max(1, ds.record_bytes)
        by_size = max(1, self._config.chunk_bytes // per_record)
        by_max = max(1, (self._config.max_message_bytes - CHUNK_OVERHEAD) // per_record)
        n = min(by_size, by_max)
        if args.max_chunk_records > 0:
            n = min(n, args.max_chunk_records)
        return n

    async def read(self, args: ReadArgs, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        async with _StatusOnError(context, self.metrics):
            if self.draining:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "the worker is draining")
            if self.active >= self._config.max_streams:
                raise RequestError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the worker already serves {self.active} streams (--max-streams)",
                )
            ds, shard = self._validate(args)
            self.active += 1
            self.idle.clear()
            self.metrics.stream(ds.name, +1)
            try:
                async for message in self._stream(ds, shard, args):
                    yield message
            finally:
                self.active -= 1
                self.metrics.stream(ds.name, -1)
                if self.active == 0:
                    self.idle.set()

    async def _stream(self, ds: Dataset, shard: Shard, args: ReadArgs) -> AsyncIterator[bytes]:
        """Chunks of [start, start + count), decoding one chunk ahead, then the end."""
        loop = asyncio.get_running_loop()
        step = self._chunk_records(ds, args)
        end = args.start + args.count
        starts = range(args.start, end, step)

        def submit(s: int) -> asyncio.Future[bytes]:
            submitted[0] = loop.time()
            args = (ds.decoder, shard.path, shard.stamp, s, min(step, end - s), ds.schema)
            if self._buffers is None:
                return loop.run_in_executor(self._executor, read_chunk, *args)
            return asyncio.ensure_future(self._decode_shared(self._buffers, args))

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
                yield data
                n = min(step, end - s)
                sent += n
                self.metrics.chunk(ds.name, n, len(data), took)
                if self.is_draining() and sent < args.count:
                    log.info("draining: ending a stream of %s at record %d", shard.id, s + step)
                    self.metrics.drained()
                    yield encode_end(sent, draining=True)
                    return
            yield encode_end(sent, draining=False)
        finally:
            if pending is not None:
                pending.cancel()

    async def _decode_shared(self, buffers: ChunkBuffers, args: tuple[Any, ...]) -> bytes:
        """Decode in a process, through a shared-memory buffer (bounded: one per slot)."""
        index = await buffers.acquire()
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._executor, read_chunk_into, buffers.name(index), *args)
        try:
            nbytes = await asyncio.shield(job)
        except asyncio.CancelledError:
            # The process may still be writing into the buffer: free it only when done.
            job.add_done_callback(lambda _: buffers.release(index))
            raise
        except BaseException:
            buffers.release(index)
            raise
        try:
            return buffers.take(index, nbytes)
        finally:
            buffers.release(index)


def _data_error(ds: Dataset, shard: Shard, start: int, exc: Exception) -> RequestError:
    code, record = grpc.StatusCode.FAILED_PRECONDITION, start
    if isinstance(exc, DecodeError):
        code = grpc.StatusCode.DATA_LOSS
        record = start if exc.record is None else exc.record
    return RequestError(
        code,
        f"dataset {ds.name!r}, shard {shard.id!r}, record {record}: {exc}",
        dataset=ds.name,
        shard=shard.id,
        record=record,
    )


class _StatusOnError:
    """`async with _StatusOnError(context, metrics):` turns a RequestError into a status."""

    def __init__(self, context: grpc.aio.ServicerContext, metrics: WorkerMetrics) -> None:
        self._context = context
        self._metrics = metrics

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if not isinstance(exc, RequestError):
            return
        self._metrics.error(exc.code.name)
        metadata = [
            ("shardstream-dataset", _header_safe(exc.dataset)),
            ("shardstream-shard", _header_safe(exc.shard)),
        ]
        if exc.record is not None:
            metadata.append(("shardstream-record", str(exc.record)))
        if exc.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
            log.warning("%s: %s", exc.code.name, exc)
        await self._context.abort(exc.code, str(exc), trailing_metadata=tuple(metadata))


def _header_safe(value: str) -> str:
    """Printable ASCII (gRPC metadata refuses anything else), escaped, bounded."""
    return value.encode("unicode_escape").decode("ascii")[:512]

"""The worker's lifecycle: decoding pool, gRPC server, health, drain.

    async with Worker(config) as worker:     # indexes, then reports SERVING
        print(worker.address)
        await worker.wait_closed()           # until drain() / aclose()

The decoding pool is created (and, for processes, started with `spawn`)
before the gRPC server, so no process is ever forked after gRPC is running.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from types import TracebackType

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardstream.server._catalog import Indexed, build_catalog, index_shard
from shardstream.server._config import WorkerConfig
from shardstream.server._decoders import register_plugins
from shardstream.server._decoding import process_init, process_ready
from shardstream.server._files import ShardPath
from shardstream.server._metrics import WorkerMetrics
from shardstream.server._servicer import WorkerServicer
from shardstream.server._shm import ChunkBuffers
from shardstream.server._wire import SERVICE, service_handler

log = logging.getLogger("shardstream.worker")

__all__ = ["Worker"]


def grpc_options(config: WorkerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Accept client keepalive pings (every >= 5 s, also without active calls),
        # so clients can detect a hung worker without being sent GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


class Worker:
    """One worker server. Not reusable: start once, close once."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._executor: Executor | None = None
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._servicer: WorkerServicer | None = None
        self._buffers: ChunkBuffers | None = None
        self._port = 0
        self.metrics_port: int | None = None  # where Prometheus metrics are served, if enabled
        self._closed = asyncio.Event()
        self._state = "new"

    @property
    def port(self) -> int:
        if self._state == "new":
            raise RuntimeError("the worker is not started; use `async with Worker(...)`")
        return self._port

    @property
    def address(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        elif ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    async def start(self) -> None:
        if self._state != "new":
            raise RuntimeError(f"the worker cannot start: it is {self._state}")
        self._state = "starting"
        cfg = self.config
        loop = asyncio.get_running_loop()
        plugins = register_plugins(cfg.decoders)
        if plugins:
            log.info("plug-in formats: %s", ", ".join(plugins))
        if cfg.processes:
            ctx = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                cfg.processes, mp_context=ctx, initializer=process_init
            )
            pids = await asyncio.gather(
                *(loop.run_in_executor(self._executor, process_ready) for _ in range(cfg.processes))
            )
            log.debug("decoding processes: %s", sorted(set(pids)))
        else:
            self._executor = ThreadPoolExecutor(
                max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="shardstream-decode"
            )
        security = cfg.security.load()  # reads the TLS files and token once
        metrics = WorkerMetrics()
        if cfg.metrics_port is not None:
            self.metrics_port = metrics.enable(cfg.host, cfg.metrics_port)
        if cfg.processes:  # chunks come back through shared memory, a few per process
            self._buffers = ChunkBuffers(2 * cfg.processes + 2, cfg.max_message_bytes)
        self._servicer = WorkerServicer(cfg, self._executor, metrics, self._buffers)
        self._server = grpc.aio.server(
            options=grpc_options(cfg), interceptors=security.interceptors()
        )
        self._server.add_generic_rpc_handlers((service_handler(self._servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        credentials = security.credentials()
        if credentials is None:
            self._port = self._server.add_insecure_port(cfg.address)
        else:
            self._port = self._server.add_secure_port(cfg.address, credentials)
        if self._port == 0:
            raise OSError(f"cannot listen on {cfg.address}")
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        self._state = "indexing"
        log.info(
            "listening on %s (%s%s); indexing %d dataset(s)",
            self.address,
            "mTLS" if cfg.security.mtls else "TLS" if cfg.security.tls else "no TLS",
            ", bearer token required" if cfg.security.auth_token_file else "",
            len(cfg.datasets),
        )

        executor = self._executor

        async def index(ref: str, path: ShardPath) -> Indexed:
            return await loop.run_in_executor(executor, index_shard, ref, path)

        t0 = time.perf_counter()
        try:
            catalog = await build_catalog(
                cfg.data_root, cfg.datasets, index, cfg.max_message_bytes - 1024
            )
        except BaseException:
            await self.aclose()
            raise
        self._servicer.catalog = catalog
        for ds in catalog.datasets.values():
            log.info(
                "dataset %r: %d shards, %d records, format %s, schema [%s], fingerprint %s",
                ds.name,
                len(ds.shards),
                ds.total_records,
                ds.format,
                ", ".join(map(str, ds.schema)),
                ds.fingerprint,
            )
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._state = "serving"
        log.info("serving on %s (indexed in %.2fs)", self.address, time.perf_counter() - t0)

    async def drain(self, grace: float | None = None) -> None:
        """Stop taking streams, let running ones end at a record boundary, then close."""
        if self._state in ("closing", "closed"):
            await self._closed.wait()
            return
        grace = self.config.grace_seconds if grace is None else grace
        self._state = "closing"
        await self._health.enter_graceful_shutdown()
        if self._servicer is not None:
            self._servicer.draining = True
            log.info("draining: %d stream(s) running, grace %.1fs", self._servicer.active, grace)
            try:
                await asyncio.wait_for(self._servicer.idle.wait(), grace)
            except TimeoutError:
                log.warning("drain grace of %.1fs over; cancelling running streams", grace)
        await self._shutdown()

    async def aclose(self) -> None:
        """Stop at once: running streams are cancelled (idempotent)."""
        if self._state == "closed":
            return
        self._state = "closing"
        await self._shutdown()

    async def _shutdown(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: executor.shutdown(wait=True, cancel_futures=True)
            )
        if self._buffers is not None:
            self._buffers.close()
            self._buffers = None
        self._state = "closed"
        self._closed.set()
        log.info("stopped")

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

"""The worker's lifecycle: decoding pool, gRPC server, health, drain.

    async with Worker(config) as worker:     # indexes, then reports SERVING
        print(worker.address)
        await worker.wait_closed()           # until drain() / aclose()

The decoding pool is created (and, for processes, started with `spawn`)
before the gRPC server, so no process is ever forked after gRPC is running.
A decoding process that dies is replaced (`_pool`); if one cannot be, the
worker reports NOT_SERVING, stops, and `wait_closed` raises `OSError`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import resource
import socket
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardstream._common.hosts import url_host
from shardstream.server._catalog import (
    Catalog,
    CatalogError,
    Indexed,
    build_catalog,
    index_shard,
    probe_pipeline,
    timed_sample,
)
from shardstream.server._config import TransformSpec, WorkerConfig
from shardstream.server._decoders import register_plugins
from shardstream.server._decoding import process_init
from shardstream.server._files import ShardPath
from shardstream.server._lanes import Lanes
from shardstream.server._metrics import WorkerMetrics
from shardstream.server._pool import DecodingPool
from shardstream.server._security import (
    BearerTokenInterceptor,
    RequestGuard,
    security_warnings,
)
from shardstream.server._servicer import WorkerServicer
from shardstream.server._shardcache import ShardDiskCache, open_cache
from shardstream.server._shardcache import process_init as cached_process_init
from shardstream.server._shm import ChunkBuffers
from shardstream.server._watches import WatchGuard
from shardstream.server._wire import SERVICE, dataset_info, service_handler
from shardstream.v1.codec import FieldSpec

log = logging.getLogger("shardstream.worker")

__all__ = ["Worker"]


MAX_REQUEST_BYTES = 64 * 1024  # requests are a few ids and numbers; larger: RESOURCE_EXHAUSTED
FDS_BESIDES_CONNECTIONS = 256  # open files the worker needs besides its connections


def grpc_options(config: WorkerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", min(MAX_REQUEST_BYTES, config.max_message_bytes)),
        # Accept client keepalive pings (every >= 5 s, also without active calls),
        # so clients can detect a hung worker without being sent GOAWAY.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5000),
        ("grpc.http2.max_ping_strikes", 0),
        # A port already bound (by another worker) is an error, not a shared port that
        # would hand a client's connections to either worker.
        ("grpc.so_reuseport", 0),
        # Hostile or broken peers: connections over the cap are closed before their
        # handshake, handshakes that make no progress end, idle connections get GOAWAY,
        # and one connection cannot open every stream the worker has.
        ("grpc.max_allowed_incoming_connections", config.max_connections),
        ("grpc.server_handshake_timeout_ms", int(config.stream_stall_timeout * 1000)),
        ("grpc.max_connection_idle_ms", int(config.idle_connection_timeout * 1000)),
        ("grpc.max_concurrent_streams", config.max_streams_per_connection),
        # Connections age out: GOAWAY, then what still runs on them is cut a stall timeout
        # later. gRPC gives a handler no way to reset its own stream, so this is what ends
        # a stalled stream whose client never reads (and frees the chunk gRPC holds for it).
        ("grpc.max_connection_age_ms", int(config.max_connection_age * 1000)),
        ("grpc.max_connection_age_grace_ms", int(config.stream_stall_timeout * 1000)),
    ]


def listen_address(host: str, port: int) -> str:
    """HOST:PORT as a server listens on it ([...] around an IPv6 host)."""
    return f"{url_host(host)}:{port}"


def _bind_error(address: str, host: str, port: int) -> OSError:
    """Why `address` could not be bound, found by binding it once more without gRPC."""
    bare = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in bare else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((bare, port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return OSError(
                f"cannot listen on {address}: port {port} is already in use (another "
                f"worker?); choose another --port, or stop what listens there",
            )
        return OSError(f"cannot listen on {address}: {exc.strerror or exc}")
    return OSError(f"cannot listen on {address}")


def _fit_open_files(connections: int) -> int:
    """Raise this process's open-files limit to fit `connections` and what else the worker
    opens, as far as the hard limit allows; returns the connections that fit."""
    want = connections + FDS_BESIDES_CONNECTIONS
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    except (OSError, ValueError):
        return connections
    if soft == resource.RLIM_INFINITY or soft >= want:
        return connections
    fit = max(1, soft - FDS_BESIDES_CONNECTIONS)
    log.warning(
        "--max-connections %d needs %d open files, the limit is %d (ulimit -n): "
        "accepting at most %d connections",
        connections,
        want,
        soft,
        fit,
    )
    return fit


def _check_descriptions(catalog: Catalog, max_message_bytes: int) -> None:
    """CatalogError for a dataset whose description (DescribeDataset's answer) is larger
    than a message may carry: no client could learn it, though health says SERVING;
    a warning where only the list of all of them is (`shardstream inspect` without a
    dataset name)."""
    total = 0
    for ds in catalog.datasets.values():
        size = dataset_info(ds).ByteSize()
        total += size
        if size > max_message_bytes:
            raise CatalogError(
                f"dataset {ds.name!r}: its description ({len(ds.shards)} shards and their "
                f"ids) takes {size} bytes, more than a message may carry "
                f"(--max-message-bytes {max_message_bytes}): raise --max-message-bytes to "
                f"at least {size + 1024} (and the loaders' max_message_bytes with it), or "
                "pack the data into fewer shards"
            )
    if total > max_message_bytes:
        log.warning(
            "the list of all datasets takes %d bytes, more than a message may carry "
            "(--max-message-bytes %d): listing them fails; name one to describe it",
            total, max_message_bytes,
        )  # fmt: skip


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class _Health(health.aio.HealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's servicer with `List`, which its aio servicer lacks: the
    generated base raised NotImplementedError, an ERROR and a traceback in the log for
    every call, which health's openness to callers without a token let anyone repeat."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> health_pb2.HealthListResponse:
        statuses = dict(self._server_status)
        return health_pb2.HealthListResponse(
            statuses={k: health_pb2.HealthCheckResponse(status=v) for k, v in statuses.items()}
        )


class Worker:
    """One worker server. Not reusable: start once, close once."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self._executor: Executor | None = None
        self._shard_cache: ShardDiskCache | None = None  # --shard-cache-dir
        self._server: grpc.aio.Server | None = None
        self._health = _Health()
        self._servicer: WorkerServicer | None = None
        self._buffers: ChunkBuffers | None = None
        self._lanes: Lanes | None = None
        self._network_lanes: Lanes | None = None
        self._failure: BaseException | None = None  # decoding processes cannot be replaced
        self._failing: asyncio.Task[None] | None = None  # the drain that failure started
        self._port = 0
        self.metrics_port: int | None = None  # where Prometheus metrics are served, if enabled
        self._metrics: WorkerMetrics | None = None
        self._closed = asyncio.Event()
        self._state = "new"

    @property
    def port(self) -> int:
        if self._state == "new":
            raise RuntimeError("the worker is not started; use `async with Worker(...)`")
        return self._port

    @property
    def address(self) -> str:
        """Where a client on this host connects (127.0.0.1 for a wildcard host)."""
        host = self.config.host
        if host in ("0.0.0.0", "::", "[::]", ""):
            host = "127.0.0.1"
        return listen_address(host, self.port)

    @property
    def listen_address(self) -> str:
        """What the worker listens on, e.g. 0.0.0.0:50051 (`address` to connect to it)."""
        return listen_address(self.config.host, self.port)

    async def start(self) -> None:
        """Decoding pool, then the gRPC server (NOT_SERVING), then indexing, then SERVING."""
        if self._state != "new":
            raise RuntimeError(f"the worker cannot start: it is {self._state}")
        self._state = "starting"
        plugins = register_plugins(self.config.decoders)
        if plugins:
            log.info("plug-in formats: %s", ", ".join(plugins))
        await self._start_decoding()
        await self._start_server()
        await self._index()

    async def _start_decoding(self) -> None:
        """Decoding processes (spawned, before gRPC runs) or threads."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        if cfg.shard_cache_dir is not None:  # before any process reads a shard
            self._shard_cache = await asyncio.to_thread(open_cache, cfg)
        if not cfg.processes:
            self._executor = ThreadPoolExecutor(
                max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="shardstream-decode"
            )
            return
        # Chunks come back through shared memory, a few per process (see `_shm`).
        self._buffers = ChunkBuffers(2 * cfg.processes + 2, cfg.max_message_bytes)
        pool = DecodingPool(
            cfg.processes,
            initializer=process_init if self._shard_cache is None else cached_process_init,
            initargs=(os.getpid(), self._buffers.handle())
            + (() if self._shard_cache is None else (self._shard_cache.settings(),)),
            on_failure=lambda exc: loop.call_soon_threadsafe(self._pool_failed, exc),
        )
        self._executor = pool
        try:
            pids = await loop.run_in_executor(None, pool.start)
        except BaseException:
            await self.aclose()
            raise
        log.debug("decoding processes: %s", sorted(pids))

    def _open_lanes(self) -> Lanes | None:
        """Same-host lanes (`_lanes`), where they are on; None otherwise (or where there
        are no abstract Unix sockets: not Linux)."""
        cfg = self.config
        if not cfg.lanes:
            return None
        lanes = Lanes(
            slots=cfg.lane_slots, slot_bytes=cfg.max_message_bytes, max_lanes=cfg.max_lanes
        )
        try:
            lanes.start()
        except OSError as exc:
            log.warning("same-host lanes are off: %s", exc)
            return None
        return lanes

    def _open_network_lanes(self) -> Lanes | None:
        """Network lanes (`_lanes`), where they are on and the worker serves without TLS
        (their connection is not encrypted); None otherwise, or where the port is taken."""
        cfg = self.config
        if not cfg.network_lanes:
            return None
        if cfg.security.tls:
            log.info("network lanes are off: this worker serves TLS (clients get bytes)")
            return None
        lanes = Lanes(
            slots=cfg.lane_slots,
            slot_bytes=cfg.max_message_bytes,
            max_lanes=cfg.max_lanes,
            network=True,
            host=cfg.host,
            port=cfg.network_lane_port,
            stall=cfg.stream_stall_timeout,
        )
        try:
            lanes.start()
        except OSError as exc:
            log.warning("network lanes are off: port %d: %s", cfg.network_lane_port, exc)
            return None
        log.info("network lanes on port %d", lanes.port)
        return lanes

    async def _start_server(self) -> None:
        """The gRPC server on its port, health NOT_SERVING until indexing is done."""
        cfg = self.config
        assert self._executor is not None
        security = cfg.security.load()  # reads the TLS files and token once
        for warning in security_warnings(cfg.security, security.tokens or (), _loopback(cfg.host)):
            log.warning("%s", warning)
        metrics = self._metrics = WorkerMetrics()
        if cfg.metrics_port is not None:
            self.metrics_port = metrics.enable(cfg.host, cfg.metrics_port, self._executor)
            guarded = cfg.security.tls or cfg.security.auth_token_file is not None
            if guarded and not _loopback(cfg.host):
                log.warning(
                    "metrics on port %d of %s are served without the TLS or token gRPC asks "
                    "for: dataset names and counters are open to whoever reaches the port "
                    "(firewall it, or keep --host on loopback)",
                    self.metrics_port, cfg.host,
                )  # fmt: skip
            if self._shard_cache is not None:
                metrics.add_collector(self._shard_cache.collector())
        self._lanes = self._open_lanes()
        self._network_lanes = self._open_network_lanes()
        metrics.watch_lanes({"same-host": self._lanes, "network": self._network_lanes})
        self._servicer = WorkerServicer(
            cfg, self._executor, metrics, self._buffers, self._lanes, self._network_lanes
        )
        fitted = replace(cfg, max_connections=_fit_open_files(cfg.max_connections))
        token = security.interceptors()  # the token first: nothing reads a refused call
        accepts = next((t.accepts for t in token if isinstance(t, BearerTokenInterceptor)), None)
        watches = WatchGuard(
            max_untrusted=fitted.health_watches,
            seconds=cfg.health_watch_seconds,
            trusted=accepts,
        )
        self._server = grpc.aio.server(
            options=grpc_options(fitted), interceptors=[*token, watches, RequestGuard()]
        )
        self._server.add_generic_rpc_handlers((service_handler(self._servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        credentials = security.credentials()
        try:
            if credentials is None:
                self._port = self._server.add_insecure_port(cfg.address)
            else:
                self._port = self._server.add_secure_port(cfg.address, credentials)
        except RuntimeError:  # gRPC says only "Failed to bind"; find out why
            await self.aclose()
            raise _bind_error(cfg.address, cfg.host, cfg.port) from None
        if self._port == 0:
            await self.aclose()
            raise OSError(f"cannot listen on {cfg.address}")
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        self._state = "indexing"
        log.info(
            "listening on %s (%s%s); indexing %d dataset(s)",
            self.listen_address,
            "mTLS" if cfg.security.mtls else "TLS" if cfg.security.tls else "no TLS",
            ", bearer token required" if cfg.security.auth_token_file else "",
            len(cfg.datasets),
        )

    async def _index(self) -> None:
        """Index every dataset in the decoding pool, then report SERVING."""
        cfg = self.config
        loop = asyncio.get_running_loop()
        executor, servicer = self._executor, self._servicer
        assert executor is not None and servicer is not None

        async def index(ref: str, path: ShardPath) -> Indexed:
            return await loop.run_in_executor(executor, index_shard, ref, path)

        async def probe(
            ref: str,
            path: ShardPath,
            schema: tuple[FieldSpec, ...],
            transforms: tuple[TransformSpec, ...],
            shard_id: str,
            record: int,
        ) -> tuple[FieldSpec, ...]:
            return await loop.run_in_executor(
                executor, probe_pipeline, ref, path, schema, transforms, shard_id, record
            )

        async def measure(*args: Any) -> tuple[int, int, float]:
            return await loop.run_in_executor(executor, timed_sample, *args)

        t0 = time.perf_counter()
        try:
            catalog = await build_catalog(
                cfg.data_root, cfg.datasets, index, cfg.max_message_bytes - 1024, probe, measure
            )
            _check_descriptions(catalog, cfg.max_message_bytes)
        except BaseException:
            await self.aclose()
            raise
        servicer.catalog = catalog
        if self._shard_cache is not None:  # copies must now match what was indexed
            await asyncio.to_thread(self._shard_cache.expect, catalog)
        for ds in catalog.datasets.values():
            log.info(
                "dataset %r: %d shards, %d records, format %s, schema [%s], fingerprint %s%s%s",
                ds.name,
                len(ds.shards),
                ds.total_records,
                ds.format,
                ", ".join(map(str, ds.schema)),
                ds.fingerprint,
                f", {ds.mean_record_bytes} bytes a record (mean of a sample)"
                if ds.mean_record_bytes
                else "",
                f", {ds.seconds_per_record * 1e3:.3g} ms a record through the transforms "
                "(median of a sample)"
                if ds.seconds_per_record
                else "",
            )
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._state = "serving"
        log.info("serving on %s (indexed in %.2fs)", self.listen_address, time.perf_counter() - t0)

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
        if self._servicer is not None:
            self._servicer.close()
        if self._metrics is not None:
            self._metrics.close()
        if self._lanes is not None:
            self._lanes.close()
            self._lanes = None
        if self._network_lanes is not None:
            self._network_lanes.close()
            self._network_lanes = None
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: executor.shutdown(wait=True, cancel_futures=True)
            )
        if self._buffers is not None:
            self._buffers.close()
            self._buffers = None
        if self._shard_cache is not None:
            self._shard_cache.close()
            self._shard_cache = None
        self._state = "closed"
        self._closed.set()
        log.info("stopped")

    def _pool_failed(self, exc: BaseException) -> None:
        """A decoding process died and cannot be replaced: NOT_SERVING, drain, stop."""
        if self._failure is not None or self._state in ("closing", "closed"):
            return
        self._failure = exc
        log.error("decoding processes cannot be replaced (%s): stopping", exc)
        self._failing = asyncio.ensure_future(self.drain())

    async def wait_closed(self) -> None:
        """Until the worker is closed; `OSError` if it stopped because decoding
        processes died and could not be replaced (so a CLI exits non-zero)."""
        await self._closed.wait()
        if self._failing is not None:
            await self._failing
        if self._failure is not None:
            raise OSError(
                f"stopped: decoding processes died and cannot be replaced ({self._failure})"
            ) from self._failure

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

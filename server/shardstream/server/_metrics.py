"""Worker metrics for Prometheus (`--metrics-port`; needs `shardstream[metrics]`).

shardstream_streams_active{dataset}           read streams running now
shardstream_streams_stalled                   streams ended for a client that reads nothing,
                                              whose last chunk gRPC still holds
shardstream_records_sent_total{dataset}       records handed to gRPC to send (or put in a
                                              client's same-host lane), counted as each chunk
                                              is: a stalled stream's last chunk counts, though
                                              its client may never read it
shardstream_bytes_sent_total{dataset}         the same records' data: their tensors' bytes (and
                                              ragged fields' lengths, 8 bytes a record each),
                                              on the socket and through a lane alike; no
                                              message headers nor padding
shardstream_chunk_seconds{dataset}            histogram: one decoding job, from its submission
                                              to its result (decode + serialize, with the wait
                                              for a decoding process or a slot), not the wait
                                              for the client to take it; one observation a
                                              chunk, but a job of a dataset with ragged fields
                                              is observed once for all the chunks cut from it
shardstream_stream_errors_total{code}         streams refused or failed, by gRPC status; a
                                              stalled stream (UNAVAILABLE) counts when it stalls
shardstream_streams_drained_total             streams ended early by a drain
shardstream_decoding_processes                decoding processes (0: --processes 0, threads)
shardstream_decoding_utilization              share of their time the decoding processes were
                                              busy, 0..1, over the last 10 s or more (since
                                              the newest earlier scrape at least that old, of
                                              those kept: one a 0.1 s, so that no scrape rate
                                              shortens the span): the per-worker scaling signal
                                              (chunks read directly, `_direct`, use no
                                              decoding process)
shardstream_decoding_busy_seconds_total       their busy seconds, all added: rate() / processes
                                              is the same share over any PromQL range
shardstream_shard_cache_hits_total            shard opens served from the shard cache's local
                                              copies (--shard-cache-dir; all four only then)
shardstream_shard_cache_misses_total          other shard opens: downloaded, or read uncached
shardstream_shard_cache_evictions_total       copies evicted to stay within --shard-cache-bytes
shardstream_shard_cache_bytes                 bytes of the copies in the cache directory now
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from shardstream._common.hosts import bare_host, url_host
from shardstream._common.metricshttp import MetricsServer
from shardstream.server._pool import DecodingPool

if TYPE_CHECKING:
    from shardstream.server._lanes import Lanes

log = logging.getLogger("shardstream.worker")

UTILIZATION_WINDOW = 10.0  # seconds: the shortest span `shardstream_decoding_utilization` covers
# Seconds between the busy readings kept for it: scrapes closer than this to the last kept
# reading are answered but not kept, so at most WINDOW / RESOLUTION + 2 are, at any rate.
UTILIZATION_RESOLUTION = 0.1


class WorkerMetrics:
    """Counts what the servicer does; a no-op until `enable` is called."""

    def __init__(self) -> None:
        self._on = False
        self._m: dict[str, Any] = {}
        self._server: MetricsServer | None = None

    def close(self) -> None:
        """Stop serving the metrics over HTTP (idempotent)."""
        if self._server is not None:
            self._server.close()

    def enable(self, host: str, port: int, executor: Executor | None = None) -> int:
        """Create the metrics and serve them over HTTP (`MetricsServer`: GET /metrics, one
        thread, a bounded number of connections, each closed after a few seconds); returns
        the port (0 picks one).
        `executor`: the worker's decoding processes (a `DecodingPool`), for their
        utilization."""
        try:
            import prometheus_client as prom
        except ImportError:
            raise ValueError(
                "--metrics-port needs prometheus-client: pip install 'shardstream[metrics]'"
            ) from None
        registry = self._registry = prom.CollectorRegistry()
        self._m = {
            "active": prom.Gauge("shardstream_streams_active", "read streams running now",
                                 ["dataset"], registry=registry),
            "stalled": prom.Gauge("shardstream_streams_stalled",
                                  "streams whose client reads nothing, not yet left by it",
                                  registry=registry),
            "records": prom.Counter("shardstream_records_sent",
                                    "records handed to gRPC to send (or put in a lane)",
                                    ["dataset"], registry=registry),
            "bytes": prom.Counter("shardstream_bytes_sent",
                                  "data bytes of those records (tensor data and ragged lengths, "
                                  "no message headers nor padding), socket and lane alike",
                                  ["dataset"], registry=registry),
            "seconds": prom.Histogram(
                "shardstream_chunk_seconds",
                "one chunk's decoding job, submitted to done (decode + serialize, with "
                "queueing; not the wait on the client); ragged: one per job of chunks",
                ["dataset"], registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            ),
            "errors": prom.Counter("shardstream_stream_errors",
                                   "streams refused or failed (a stall: when it happens)",
                                   ["code"], registry=registry),
            "drained": prom.Counter("shardstream_streams_drained",
                                    "streams ended early by a drain", registry=registry),
        }  # fmt: skip
        pool = executor if isinstance(executor, DecodingPool) else None
        registry.register(_DecodingCollector(pool))
        self._server = MetricsServer(
            lambda: (prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST), host=host, port=port
        )
        shown = url_host(host)
        try:
            bound = self._server.start()
        except OSError as exc:
            why = exc.strerror or str(exc) or type(exc).__name__
            raise OSError(
                f"cannot serve metrics on --host {shown} --metrics-port {port}: {why}; "
                "pick another --metrics-port (0: any free one) or --host"
            ) from exc
        self._on = True
        # It listens on the first address the host resolves to (localhost: 127.0.0.1, say).
        address = self._server.address
        listening = "" if address == bare_host(host) else f" (listening on {url_host(address)})"
        log.info("metrics on http://%s:%d/metrics%s", shown, bound, listening)
        return bound

    def stream(self, dataset: str, delta: int) -> None:
        if self._on:
            self._m["active"].labels(dataset).inc(delta)

    def stalled(self, delta: int) -> None:
        if self._on:
            self._m["stalled"].inc(delta)

    def chunk(self, dataset: str, records: int, nbytes: int) -> None:
        """A chunk handed to gRPC (or put in a lane): `nbytes` of its records' data."""
        if self._on:
            self._m["records"].labels(dataset).inc(records)
            self._m["bytes"].labels(dataset).inc(nbytes)

    def job(self, dataset: str, seconds: float) -> None:
        """A chunk's decoding job took `seconds` from its submission to its result."""
        if self._on:
            self._m["seconds"].labels(dataset).observe(seconds)

    def error(self, code: str) -> None:
        if self._on:
            self._m["errors"].labels(code).inc()

    def drained(self) -> None:
        if self._on:
            self._m["drained"].inc()

    def add_collector(self, collector: Any) -> None:
        """Serve what `collector.collect()` yields too (e.g. the shard cache's counts)."""
        if self._on:
            self._registry.register(collector)

    def watch_lanes(self, lanes: Mapping[str, Lanes | None]) -> None:
        """Serve the lanes' counts, per kind ("same-host", "network"; None: that kind off)."""
        self.add_collector(_LaneCollector(lanes))


class _LaneCollector:
    """Lanes open, opened, and the chunks they carried (not the gRPC stream), read from
    the worker's `Lanes` at each scrape."""

    def __init__(self, lanes: Mapping[str, Lanes | None]) -> None:
        self._lanes = dict(lanes)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        open_now = GaugeMetricFamily(
            "shardstream_lanes_open", "lanes open now, per kind", labels=["kind"]
        )
        opened = CounterMetricFamily(
            "shardstream_lanes_opened", "lanes opened, all told, per kind", labels=["kind"]
        )
        chunks = CounterMetricFamily(
            "shardstream_lane_chunks",
            "chunks sent through lanes instead of as bytes on the gRPC stream, per kind",
            labels=["kind"],
        )
        for kind, lanes in self._lanes.items():
            if lanes is None:
                continue
            open_now.add_metric([kind], lanes.open_lanes())
            opened.add_metric([kind], lanes.opened)
            chunks.add_metric([kind], lanes.chunks_sent())
        yield open_now
        yield opened
        yield chunks


class _DecodingCollector:
    """How busy the decoding processes are, read from the pool at each scrape."""

    def __init__(
        self,
        pool: DecodingPool | None,
        *,
        window: float = UTILIZATION_WINDOW,
        resolution: float = UTILIZATION_RESOLUTION,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._window = window
        self._resolution = resolution
        self._clock = clock
        self._lock = threading.Lock()  # scrapes run in the HTTP server's thread
        # (time, busy seconds) readings, `resolution` apart at least: the oldest is the
        # newest one at least `window` old, so there are at most window / resolution + 2.
        self._readings: deque[tuple[float, float]] = deque()
        if pool is not None:
            self._readings.append((clock(), pool.busy_seconds()))

    def readings(self) -> int:
        """Readings kept now (bounded whatever the scrape rate)."""
        return len(self._readings)

    def utilization(self) -> float:
        """Busy share of the processes from the newest kept reading at least `window` old
        (or the first one) to now."""
        assert self._pool is not None
        now, busy = self._clock(), self._pool.busy_seconds()
        with self._lock:
            readings = self._readings
            if now - readings[-1][0] >= self._resolution:
                readings.append((now, busy))
            while len(readings) > 1 and readings[1][0] <= now - self._window:
                readings.popleft()
            then, busy_then = readings[0]
        span = (now - then) * self._pool.processes
        return min(1.0, max(0.0, (busy - busy_then) / span)) if span > 0 else 0.0

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        pool = self._pool
        yield GaugeMetricFamily(
            "shardstream_decoding_processes",
            "decoding processes (0: decoding in threads of the server, --processes 0)",
            value=pool.processes if pool is not None else 0,
        )
        if pool is None:
            return
        yield GaugeMetricFamily(
            "shardstream_decoding_utilization",
            f"share of time the decoding processes were busy, over the last "
            f"{self._window:g} s or more",
            value=self.utilization(),
        )
        yield CounterMetricFamily(
            "shardstream_decoding_busy_seconds",
            "seconds the decoding processes spent on jobs, all added",
            value=pool.busy_seconds(),
        )

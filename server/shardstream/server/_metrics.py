"""Worker metrics for Prometheus (`--metrics-port`; needs `shardstream[metrics]`).

shardstream_streams_active{dataset}           read streams running now
shardstream_streams_stalled                   streams ended for a client that reads nothing,
                                              whose last chunk gRPC still holds
shardstream_records_sent_total{dataset}       records streamed
shardstream_bytes_sent_total{dataset}         chunk bytes streamed
shardstream_chunk_seconds{dataset}            histogram: decode + serialize one chunk,
                                              including the wait for a decoding process
shardstream_stream_errors_total{code}         streams refused or failed, by gRPC status
shardstream_streams_drained_total             streams ended early by a drain
shardstream_decoding_processes                decoding processes (0: --processes 0, threads)
shardstream_decoding_utilization              share of their time the decoding processes were
                                              busy, 0..1, over the last 10 s or more (since
                                              the newest earlier scrape at least that old):
                                              the per-worker scaling signal (chunks read
                                              directly, `_direct`, use no decoding process)
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
from collections.abc import Iterator
from concurrent.futures import Executor
from typing import Any

from shardstream._common.metricshttp import MetricsServer
from shardstream.server._pool import DecodingPool

log = logging.getLogger("shardstream.worker")

UTILIZATION_WINDOW = 10.0  # seconds: the shortest span `shardstream_decoding_utilization` covers


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
            "records": prom.Counter("shardstream_records_sent", "records streamed",
                                    ["dataset"], registry=registry),
            "bytes": prom.Counter("shardstream_bytes_sent", "chunk bytes streamed",
                                  ["dataset"], registry=registry),
            "seconds": prom.Histogram(
                "shardstream_chunk_seconds", "decode + serialize one chunk, with queueing",
                ["dataset"], registry=registry,
                buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            ),
            "errors": prom.Counter("shardstream_stream_errors", "streams refused or failed",
                                   ["code"], registry=registry),
            "drained": prom.Counter("shardstream_streams_drained",
                                    "streams ended early by a drain", registry=registry),
        }  # fmt: skip
        pool = executor if isinstance(executor, DecodingPool) else None
        registry.register(_DecodingCollector(pool))
        self._server = MetricsServer(
            lambda: (prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST), host=host, port=port
        )
        bound = self._server.start()
        self._on = True
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stream(self, dataset: str, delta: int) -> None:
        if self._on:
            self._m["active"].labels(dataset).inc(delta)

    def stalled(self, delta: int) -> None:
        if self._on:
            self._m["stalled"].inc(delta)

    def chunk(self, dataset: str, records: int, nbytes: int, seconds: float) -> None:
        if self._on:
            self._m["records"].labels(dataset).inc(records)
            self._m["bytes"].labels(dataset).inc(nbytes)
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


class _DecodingCollector:
    """How busy the decoding processes are, read from the pool at each scrape."""

    def __init__(self, pool: DecodingPool | None) -> None:
        self._pool = pool
        self._window = UTILIZATION_WINDOW
        self._lock = threading.Lock()  # scrapes run in the HTTP server's thread
        # (time, busy seconds) readings: the oldest is the newest one at least `window` old.
        self._readings: deque[tuple[float, float]] = deque(maxlen=1024)
        if pool is not None:
            self._readings.append((time.monotonic(), pool.busy_seconds()))

    def utilization(self) -> float:
        """Busy share of the processes from the newest reading at least `window` old
        (or the first one) to now."""
        assert self._pool is not None
        now, busy = time.monotonic(), self._pool.busy_seconds()
        with self._lock:
            readings = self._readings
            readings.append((now, busy))
            while len(readings) > 2 and readings[1][0] <= now - self._window:
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

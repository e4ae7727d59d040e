"""Worker metrics for Prometheus (`--metrics-port`; needs `shardstream[metrics]`).

shardstream_streams_active{dataset}           read streams running now
shardstream_records_sent_total{dataset}       records streamed
shardstream_bytes_sent_total{dataset}         chunk bytes streamed
shardstream_chunk_seconds{dataset}            histogram: decode + serialize one chunk,
                                              including the wait for a decoding process
shardstream_stream_errors_total{code}         streams refused or failed, by gRPC status
shardstream_streams_drained_total             streams ended early by a drain
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("shardstream.worker")


class WorkerMetrics:
    """Counts what the servicer does; a no-op until `enable` is called."""

    def __init__(self) -> None:
        self._on = False
        self._m: dict[str, Any] = {}

    def enable(self, host: str, port: int) -> int:
        """Create the metrics and serve them over HTTP; returns the port (0 picks one)."""
        try:
            import prometheus_client as prom
        except ImportError:
            raise ValueError(
                "--metrics-port needs prometheus-client: pip install 'shardstream[metrics]'"
            ) from None
        registry = prom.CollectorRegistry()
        self._m = {
            "active": prom.Gauge("shardstream_streams_active", "read streams running now",
                                 ["dataset"], registry=registry),
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
        server, _thread = prom.start_http_server(port, addr=host, registry=registry)
        self._on = True
        bound = int(server.server_address[1])
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    def stream(self, dataset: str, delta: int) -> None:
        if self._on:
            self._m["active"].labels(dataset).inc(delta)

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

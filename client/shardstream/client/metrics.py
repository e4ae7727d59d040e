"""Prometheus export of a loader's statistics (needs `shardstream[metrics]`).

    from shardstream.client.metrics import serve_metrics
    port = serve_metrics(loader, port=9100)     # http://host:9100/metrics

Every scrape reads `loader.statistics()`: batches, records and bytes delivered,
seconds the consumer waited for data, and for each batch as a histogram
(`shardstream_client_data_wait_seconds`), resumed reads by worker, reads
running by worker, skipped records and the deepest reorder buffer. Every series
is labelled with the loader's dataset and rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from shardstream._common.metricshttp import MetricsServer
from shardstream.client._loader import Loader
from shardstream.client._sync import SyncLoader

__all__ = ["serve_metrics"]


class _LoaderCollector:
    def __init__(self, loader: Loader, labels: dict[str, str]) -> None:
        self._loader = loader
        self._labels = labels

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        s = self._loader.statistics()
        names, values = list(self._labels), list(self._labels.values())
        for name, doc, value in (
            ("shardstream_client_batches", "batches delivered", s.batches),
            ("shardstream_client_records", "records delivered", s.records),
            ("shardstream_client_bytes", "bytes delivered", s.bytes),
            ("shardstream_client_wait_seconds", "time the consumer waited", s.wait_seconds),
            ("shardstream_client_records_skipped", "bad records skipped", s.records_skipped),
            ("shardstream_client_stragglers", "reads moved off a straggling worker",
             s.stragglers),
            ("shardstream_client_epochs_completed", "epochs iterated to the end",
             s.epochs_completed),
        ):  # fmt: skip
            counter = CounterMetricFamily(name, doc, labels=names)
            counter.add_metric(values, value)
            yield counter
        for name, doc, by_worker in (
            ("shardstream_client_resumes", "reads resumed elsewhere", s.resumes_by_worker),
            ("shardstream_client_reads", "read streams started", s.reads_by_worker),
            ("shardstream_client_lane_bytes", "bytes received through a same-host lane",
             s.lane_bytes_by_worker),
        ):  # fmt: skip
            family = CounterMetricFamily(name, doc, labels=[*names, "worker"])
            for worker, n in by_worker.items():
                family.add_metric([*values, worker], n)
            yield family
        running = GaugeMetricFamily(
            "shardstream_client_reads_in_flight", "reads running", labels=[*names, "worker"]
        )
        for worker, n in s.reads_in_flight.items():
            running.add_metric([*values, worker], n)
        yield running
        depth = GaugeMetricFamily(
            "shardstream_client_max_reorder_depth", "deepest reorder buffer", labels=names
        )
        depth.add_metric(values, s.max_reorder_depth)
        yield depth
        wait = HistogramMetricFamily(
            "shardstream_client_data_wait_seconds",
            "time the consumer waited for each batch it received",
            labels=names,
        )
        buckets = [(floatToGoString(bound), n) for bound, n in s.data_wait.cumulative()]
        wait.add_metric(values, buckets, sum_value=s.data_wait.seconds)
        yield wait


def serve_metrics(loader: Loader | SyncLoader, *, port: int = 0, host: str = "127.0.0.1") -> int:
    """Serve the loader's statistics over HTTP for Prometheus until the loader closes;
    returns the port."""
    if isinstance(loader, SyncLoader):
        loader = loader._loader  # its figures are the Loader's it runs
    if loader.closed:
        raise RuntimeError("serve_metrics() on a loader that is closed: nothing to serve")
    try:
        import prometheus_client as prom
    except ImportError:
        raise ImportError(
            "serve_metrics needs prometheus-client: pip install 'shardstream[metrics]'"
        ) from None
    registry = prom.CollectorRegistry()
    labels = {"dataset": loader.config.dataset, "rank": str(loader.config.rank)}
    registry.register(_LoaderCollector(loader, labels))
    # GET /metrics on one thread, a bounded number of connections, each closed after a
    # few seconds (`MetricsServer`), for as long as the loader is open.
    server = MetricsServer(
        lambda: (prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST), host=host, port=port
    )
    bound = server.start()
    loader.on_close(server.close)
    return bound

"""Scaling a fleet: a worker added to a running epoch gets reads through `dns:///`
re-resolution, exactly once; the signals an autoscaler reads (the workers' decoding
utilization, the ranks' data-wait histogram) measure what they claim."""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader, SyncLoader
from shardstream.client._ledger import audit
from shardstream.server import _metrics
from shardstream.server._process import WorkerProcess

from conftest import RECORDS, running_workers, worker_processes

NAME = "workers.scaling.test"  # resolved by the fake below only


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """NAME resolves to the addresses in dns["answer"] (as the A records of a headless
    Service or a compose service would), through the resolver the client really uses
    (`socket.getaddrinfo`, which the event loop runs); every other name is resolved as
    usual. dns["asked"] counts the look-ups of NAME."""
    state: dict[str, Any] = {"answer": [], "asked": 0}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != NAME:
            return real(host, port, *args, **kwargs)
        state["asked"] += 1
        return [
            (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, int(port)))
            for ip in state["answer"]
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return state


async def test_a_worker_added_to_a_running_epoch_gets_reads_exactly_once(
    npz_root: Path, tmp_path: Path, dns: dict[str, Any]
) -> None:
    """One worker behind a name; mid-epoch a second worker process starts and the name
    resolves to it too (a scale-up). The rank picks it up without a restart, sends it
    reads, and still receives every record exactly once (ids and the ledger audit)."""
    ledger = tmp_path / "ledger"
    with contextlib.ExitStack() as stack:
        (first,) = stack.enter_context(worker_processes(npz_root, 1, "--host", "127.0.0.1"))
        dns["answer"].append("127.0.0.1")
        options: dict[str, Any] = {
            "dataset": "train", "batch_size": 50, "shuffle": True, "seed": 11,
            "read_bytes": 4096,  # ~64 records a read: ~32 reads an epoch
            "max_inflight_reads": 2, "reads_ahead": 2, "prefetch_batches": 1,
            "resolve_interval": 0.05, "ledger_dir": str(ledger),
        }  # fmt: skip
        async with Loader([f"dns:///{NAME}:{first.port}"], **options) as loader:
            epoch = loader.epoch(0)
            ids = [(await anext(epoch))["id"]]
            assert set(loader.statistics().reads_by_worker) == {first.address}

            # Scale up: the same port on another loopback address, as pods share a port.
            args = ["--data-root", str(npz_root), "--dataset", "train=*.npz", "--processes",
                    "0", "--chunk-bytes", "16384", "--host", "127.0.0.2", "--port",
                    str(first.port)]  # fmt: skip
            second = stack.enter_context(await asyncio.to_thread(WorkerProcess.start, args))
            dns["answer"].append("127.0.0.2")
            assert second.address == f"127.0.0.2:{first.port}"

            # The rank re-resolves the name, watches the new worker's health and uses it
            # once it is SERVING; meanwhile the epoch waits for its consumer (bounded).
            deadline = time.monotonic() + 30
            while not any(c.address == second.address and c.serving for c in loader._pool.conns):  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the added worker was never taken up"
                await asyncio.sleep(0.02)
            ids += [batch["id"] async for batch in epoch]
            stats = loader.statistics()
    assert dns["asked"] >= 2, "the name was not resolved again"
    got = np.concatenate(ids)
    assert len(got) == RECORDS and np.array_equal(np.sort(got), np.arange(RECORDS))
    assert stats.reads_by_worker[first.address] > 0
    assert stats.reads_by_worker[second.address] > 0, stats.reads_by_worker
    assert stats.resumes == 0  # nothing failed: scaling up is not a failure
    [epoch0] = list(audit(ledger))
    assert epoch0.ok and epoch0.expected == epoch0.received == RECORDS


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


def _sample(text: str, name: str) -> float:
    """The value of the one sample `name` (with any labels) in a scrape."""
    found = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert len(found) == 1, f"{name}: {found}\n{text}"
    return float(found[0])


async def test_decoding_utilization_rises_under_load_and_data_wait_counts_every_batch(
    csv_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """csv shards: every chunk is decoded in the decoding process (npz chunks that are
    file bytes as they stand are read directly by the server, without one)."""
    pytest.importorskip("prometheus_client", reason="needs shardstream[metrics]")
    from shardstream.client.metrics import serve_metrics

    monkeypatch.setattr(_metrics, "UTILIZATION_WINDOW", 0.2)  # seconds, not 10: a quick idle
    datasets = ("train=part-*:csv",)
    async with running_workers(csv_root, 1, datasets, processes=1, metrics_port=0) as (worker,):
        assert worker.metrics_port is not None
        port = worker.metrics_port

        async def utilization() -> float:
            text = await asyncio.to_thread(_scrape, port)
            assert _sample(text, "shardstream_decoding_processes") == 1
            return _sample(text, "shardstream_decoding_utilization")

        # Idle (indexing over, no reads): the window's share falls to exactly 0.
        deadline = time.monotonic() + 30
        while (idle := await utilization()) != 0.0:
            assert time.monotonic() < deadline, f"an idle worker reports {idle}"
        busy_before = _sample(await asyncio.to_thread(_scrape, port),
                              "shardstream_decoding_busy_seconds_total")  # fmt: skip

        async with Loader([worker.address], dataset="train", batch_size=40, read_bytes=4096,
                          rank=0, world_size=1) as loader:  # fmt: skip
            client_port = serve_metrics(loader)
            batches = 0
            seen = 0.0
            deadline = time.monotonic() + 60
            while seen == 0.0:  # under load, it rises (epochs until a scrape sees it)
                assert time.monotonic() < deadline, "utilization never rose under load"
                async for _ in loader.epoch(loader.statistics().epochs_completed):
                    batches += 1
                    if batches % 10 == 0 and seen == 0.0:
                        seen = await utilization()
            assert 0.0 < seen <= 1.0
            text = await asyncio.to_thread(_scrape, port)
            assert _sample(text, "shardstream_decoding_busy_seconds_total") > busy_before

            wait = loader.statistics().data_wait
            assert wait.count == batches == loader.statistics().batches
            assert 0.0 < wait.seconds <= loader.statistics().wait_seconds
            client = await asyncio.to_thread(_scrape, client_port)
    # The same histogram in the rank's Prometheus export, labelled with dataset and rank.
    family = "shardstream_client_data_wait_seconds"
    assert _sample(client, f"{family}_count") == batches
    assert math.isclose(_sample(client, f"{family}_sum"), wait.seconds, rel_tol=1e-9)
    buckets = []
    for labels, value in re.findall(rf"^{family}_bucket{{([^}}]*)}} (\S+)$", client, re.M):
        pairs = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        assert pairs.pop("le") and pairs == {"dataset": "train", "rank": "0"}, labels
        buckets.append((re.search(r'le="([^"]+)"', labels).group(1), float(value)))  # type: ignore[union-attr]
    assert [float(le) for le, _ in buckets] == [*wait.bounds, math.inf]
    counts = [n for _, n in buckets]
    assert counts == sorted(counts) and counts[-1] == batches  # cumulative


def test_sync_loader_data_wait_counts_the_batches_its_caller_received(npz_root: Path) -> None:
    with worker_processes(npz_root, 1) as (worker,):
        with SyncLoader([worker.address], dataset="train", batch_size=64) as loader:
            got = [batch["id"] for batch in loader.epoch(0)]
            half = loader.batches_per_epoch() // 2
            for i, _ in enumerate(loader.epoch(1)):  # stopped early: counts what it received
                if i + 1 == half:
                    break
            stats = loader.statistics()
    assert np.array_equal(np.sort(np.concatenate(got)), np.arange(RECORDS))
    assert stats.data_wait.count == len(got) + half
    assert sum(stats.data_wait.counts) == stats.data_wait.count

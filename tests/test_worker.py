"""Worker internals with real servers: decoding processes, plug-in formats, health, limits."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardstream.client import Loader, check_health
from shardstream.server import DatasetSpec, Worker, WorkerConfig
from shardstream.server._catalog import CatalogError

import pid_decoder  # noqa: F401  (registers the "pid" format)
from conftest import collect_epoch, ids_of, running_workers


def pid_dataset(root: Path, shards: int = 4, records: int = 200) -> Path:
    for i in range(shards):
        (root / f"{i}.pid").write_text(str(records))
    return root


async def test_decoding_uses_several_processes_and_a_plugin_format(tmp_path: Path) -> None:
    pid_dataset(tmp_path)
    async with running_workers(tmp_path, 1, datasets=("train=*.pid",), processes=2) as (worker,):
        async with Loader(
            [worker.address],
            dataset="train",
            batch_size=10,
            read_bytes=16 * 10,
            chunk_bytes=16 * 10,
        ) as loader:
            batches = await collect_epoch(loader, 0)
    ids = ids_of(batches)
    assert sorted(ids.tolist()) == [s * 1000 + r for s in range(4) for r in range(200)]
    pids = set(np.concatenate([b["pid"] for b in batches]).tolist())
    assert len(pids) == 2 and os.getpid() not in pids  # two spawned decoding processes


async def test_health_is_not_serving_before_indexing_and_after_drain(npz_root: Path) -> None:
    config = WorkerConfig(
        data_root=npz_root, datasets=(DatasetSpec.parse("train=*.npz"),), port=0, processes=0
    )
    worker = Worker(config)
    await worker.start()
    try:
        assert await check_health(worker.address) == (True, f"{worker.address}: SERVING")
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            await worker.drain(grace=5)
            second = await watch.read()
            assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await worker.aclose()


async def test_schema_differences_between_shards_refuse_start(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", id=np.arange(3), x=np.zeros((3, 2), np.float32))
    np.savez(tmp_path / "b.npz", id=np.arange(3), x=np.zeros((3, 4), np.float32))
    with pytest.raises(CatalogError, match=r"shard 'b.npz' has schema .*x:float32\[4\]"):
        async with running_workers(tmp_path, 1):
            pass


async def test_records_larger_than_a_message_refuse_start(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", big=np.zeros((2, 200_000), np.uint8))
    with pytest.raises(CatalogError, match="more than a message may carry"):
        async with running_workers(
            tmp_path, 1, max_message_bytes=128 * 1024, chunk_bytes=64 * 1024
        ):
            pass


async def test_chunks_stay_under_the_max_message_size(tmp_path: Path) -> None:
    """Large records: the worker chunks them, a client with a small max still receives all."""
    np.savez(tmp_path / "a.npz", id=np.arange(64), x=np.ones((64, 60_000), np.uint8))
    async with running_workers(
        tmp_path, 1, max_message_bytes=256 * 1024, chunk_bytes=128 * 1024
    ) as (worker,):
        async with Loader(
            [worker.address],
            dataset="train",
            batch_size=16,
            max_message_bytes=256 * 1024,
            chunk_bytes=4 << 20,
        ) as loader:
            batches = await collect_epoch(loader, 0)
    assert np.array_equal(ids_of(batches), np.arange(64))
    assert all(b["x"].shape == (16, 60_000) and b["x"].all() for b in batches)


async def test_prometheus_metrics(npz_root: Path) -> None:
    import urllib.request

    pytest.importorskip("prometheus_client", reason="needs shardstream[metrics]")
    async with running_workers(npz_root, 1, metrics_port=0) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=100) as loader:
            await collect_epoch(loader, 0)
            with pytest.raises(Exception, match="unknown dataset"):
                async with Loader([worker.address], dataset="nope", batch_size=1):
                    pass
        url = f"http://127.0.0.1:{worker.metrics_port}/metrics"
        text = (
            await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        ).decode()
    assert 'shardstream_records_sent_total{dataset="train"} 2000.0' in text
    assert 'shardstream_streams_active{dataset="train"} 0.0' in text
    assert "shardstream_streams_stalled 0.0" in text
    assert 'shardstream_chunk_seconds_count{dataset="train"}' in text
    assert "shardstream_bytes_sent_total" in text
    assert 'shardstream_stream_errors_total{code="NOT_FOUND"} 1.0' in text


async def test_shared_memory_buffers_survive_cancelled_streams(npz_root: Path) -> None:
    """Streams cancelled mid-chunk must return their buffers (else reads would block)."""
    async with running_workers(npz_root, 1, processes=1, chunk_bytes=4096) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=10, read_bytes=8192,
                          chunk_bytes=4096, max_inflight_reads=8) as loader:  # fmt: skip
            for i in range(30):
                async for _ in loader.epoch(i % 3):
                    break
            ids = ids_of(await collect_epoch(loader, 0))
    assert np.array_equal(ids, np.arange(2000))


async def test_health_watches_end_after_a_while_and_loaders_watch_again(npz_root: Path) -> None:
    """Each health Watch ends after half --stream-stall-timeout, with OK and the trailer
    `shardstream-rewatch` (so connections that only watch can go idle); a loader watches
    again at once, never taking the worker for gone: an epoch over many such ends needs
    no new description of the worker and resumes no read."""
    async with running_workers(npz_root, 1, stream_stall_timeout=0.2) as (worker,):
        async with grpc.aio.insecure_channel(worker.address) as channel:
            call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            replies = [r.status async for r in call]
            assert replies == [health_pb2.HealthCheckResponse.SERVING]
            assert await call.code() == grpc.StatusCode.OK
            assert ("shardstream-rewatch", "1") in tuple(await call.trailing_metadata())
        async with Loader([worker.address], dataset="train", batch_size=100,
                          read_bytes=4096) as loader:  # fmt: skip
            (conn,) = loader._pool.conns
            ids = []
            async for batch in loader.epoch(0):
                ids.append(batch["id"])
                assert conn.verified and conn.serving and not conn.last_error
                await asyncio.sleep(0.02)  # a slow consumer: the epoch spans many watches
            assert loader.statistics().resumes == 0
    assert sorted(np.concatenate(ids).tolist()) == list(range(2000))


async def test_health_list_answers_without_an_error_in_the_log(
    npz_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """grpcio-health-checking's aio servicer lacks `List`: every call, open to callers
    without a token as health is, logged an ERROR and a traceback (1,040 calls: 1 MB)."""
    async with running_workers(npz_root, 1) as (worker,):
        async with grpc.aio.insecure_channel(worker.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with caplog.at_level(logging.WARNING):
                for _ in range(20):
                    reply = await stub.List(health_pb2.HealthListRequest())
    serving = health_pb2.HealthCheckResponse.SERVING
    assert {k: v.status for k, v in reply.statuses.items()} == {
        "": serving,
        "shardstream.v1.Worker": serving,
    }
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []

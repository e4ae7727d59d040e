"""End to end: real gRPC workers on ephemeral ports, real loaders, real data."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader, SyncLoader
from shardstream.client.errors import ConfigError, DatasetMismatchError, NotFoundError
from shardstream.server import make_dataset

from conftest import RECORDS, SHAPE, collect_epoch, ids_of, running_workers


async def run_ranks(
    addresses: list[str], world_size: int, epochs: int, **options: object
) -> dict[tuple[int, int], list[dict[str, np.ndarray]]]:
    """{(rank, epoch): batches} for every rank, ranks running concurrently."""
    out: dict[tuple[int, int], list[dict[str, np.ndarray]]] = {}

    async def rank(r: int) -> None:
        async with Loader(
            addresses, dataset="train", rank=r, world_size=world_size, **options
        ) as loader:
            for e in range(epochs):
                out[(r, e)] = await collect_epoch(loader, e)

    async with asyncio.TaskGroup() as tg:
        for r in range(world_size):
            tg.create_task(rank(r))
    return out


async def test_three_workers_four_ranks_exactly_once_and_deterministic(npz_root: Path) -> None:
    opts = {"batch_size": 32, "seed": 7, "shuffle": True, "read_bytes": 4096}
    async with running_workers(npz_root, 3) as workers:
        many = await run_ranks([w.address for w in workers], 4, 2, **opts)
        one = await run_ranks([workers[0].address], 4, 2, **opts)

    for epoch in range(2):
        ids = np.concatenate([ids_of(many[(r, epoch)]) for r in range(4)])
        assert len(ids) == RECORDS
        assert np.array_equal(np.sort(ids), np.arange(RECORDS))  # exactly once
        steps = {len(many[(r, epoch)]) for r in range(4)}
        assert steps == {-(-RECORDS // 4 // 32)}  # equal steps (500 records: 15 full + 1 of 20)
        for r in range(4):
            a, b = many[(r, epoch)], one[(r, epoch)]
            assert np.array_equal(ids_of(a), ids_of(b))  # 3 workers == 1 worker
            for batch in a:
                # Fields stay aligned: the synthetic label is id % 10, the image derives from id.
                assert np.array_equal(batch["label"], batch["id"] % 10)
                assert batch["image"].shape == (len(batch["id"]), *SHAPE)
                assert batch["image"].dtype == np.uint8
    for r in range(4):
        assert not np.array_equal(ids_of(many[(r, 0)]), ids_of(many[(r, 1)]))


async def test_batches_match_the_plan_and_the_shards(npz_root: Path) -> None:
    """Contents, not just ids: each delivered row equals the record on disk."""
    shards = sorted(npz_root.glob("*.npz"))
    images = np.concatenate([np.load(p)["image"] for p in shards])
    async with (
        running_workers(npz_root, 2) as workers,
        Loader(
            [w.address for w in workers],
            dataset="train",
            batch_size=50,
            rank=1,
            world_size=3,
            seed=3,
            shuffle=True,
            shuffle_window=64,
            drop_last=True,
        ) as loader,
    ):
        batches = await collect_epoch(loader, 0)
        plan = loader.plan(0)
    assert len(batches) == plan.batches == (RECORDS // 3) // 50
    assert all(len(b["id"]) == 50 for b in batches)
    ids = ids_of(batches)
    assert len(np.unique(ids)) == len(ids)
    for batch in batches:
        assert np.array_equal(batch["image"], images[batch["id"]])


async def test_pad_and_keep_last_partial_batch(tmp_path: Path) -> None:
    make_dataset(tmp_path, shards=3, records=101, shape=(2,))
    async with running_workers(tmp_path, 2) as workers:
        out = await run_ranks(
            [w.address for w in workers], 4, 1, batch_size=10, remainder="pad", drop_last=False
        )
    per_rank = [ids_of(out[(r, 0)]) for r in range(4)]
    assert [len(x) for x in per_rank] == [26] * 4  # ceil(101 / 4)
    assert [len(b["id"]) for b in out[(0, 0)]] == [10, 10, 6]
    ids = np.concatenate(per_rank)
    assert set(ids.tolist()) == set(range(101))
    assert np.array_equal(ids[101:], np.arange(3))  # the pad wraps around to the start


async def test_csv_dataset(csv_root: Path) -> None:
    async with running_workers(csv_root, 2, datasets=("train=part-*:csv",)) as workers:
        out = await run_ranks([w.address for w in workers], 2, 1, batch_size=16, shuffle=True)
    ids = np.concatenate([ids_of(out[(r, 0)]) for r in range(2)])
    # 1003 // 2 * 2: one record, the last of the shuffled sequence, is dropped.
    assert len(ids) == 1_002 and len(np.unique(ids)) == 1_002
    assert set(ids.tolist()) <= set(range(1_003))
    batch = out[(0, 0)][0]
    assert batch["image"].shape == (16, 2, 3)
    assert batch["image"].dtype == np.uint8


async def test_sync_loader_yields_the_async_batches(npz_root: Path) -> None:
    async with running_workers(npz_root, 2) as workers:
        addresses = [w.address for w in workers]
        opts = {
            "dataset": "train",
            "batch_size": 64,
            "rank": 1,
            "world_size": 2,
            "seed": 5,
            "shuffle": True,
        }
        async with Loader(addresses, **opts) as loader:
            expected = ids_of(await collect_epoch(loader, 1))

        def sync_run() -> tuple[np.ndarray, int]:
            with SyncLoader(addresses, **opts) as sync:
                got = ids_of(list(sync.epoch(1)))
                # Leaving an epoch early stops it; the next one starts cleanly.
                for _ in sync.epoch(0):
                    break
                return got, len(list(sync.epoch(0)))

        got, n0 = await asyncio.to_thread(sync_run)
    assert np.array_equal(got, expected)
    assert n0 == -(-(RECORDS // 2) // 64)


async def test_break_early_then_next_epoch(npz_root: Path) -> None:
    async with (
        running_workers(npz_root, 1) as workers,
        Loader([workers[0].address], dataset="train", batch_size=8, prefetch_batches=2) as loader,
    ):
        async for _ in loader.epoch(0):
            break
        full = await collect_epoch(loader, 0)
        stats = loader.statistics()
    assert np.array_equal(ids_of(full), np.arange(RECORDS))
    assert stats.epochs_completed == 1
    assert stats.records == RECORDS + 8
    assert stats.resumes == 0


async def test_workers_that_disagree_are_refused_by_name(npz_root: Path, tmp_path: Path) -> None:
    make_dataset(tmp_path, shards=8, records=RECORDS + 1, shape=SHAPE)
    async with running_workers(npz_root, 1) as a, running_workers(tmp_path, 1) as b:
        with pytest.raises(DatasetMismatchError) as info:
            async with Loader([a[0].address, b[0].address], dataset="train", batch_size=8):
                pass
    message = str(info.value)
    assert a[0].address in message and b[0].address in message
    assert "shard-00000.npz" in message and "records" in message


async def test_unknown_dataset_is_a_typed_error(npz_root: Path) -> None:
    async with running_workers(npz_root, 1) as workers:
        with pytest.raises(NotFoundError) as info:
            async with Loader([workers[0].address], dataset="nope", batch_size=8):
                pass
    assert info.value.worker == workers[0].address
    assert "unknown dataset 'nope'" in str(info.value)


async def test_options_are_validated_before_connecting() -> None:
    with pytest.raises(ConfigError, match="batch_size must be positive, got 0"):
        Loader(["127.0.0.1:1"], dataset="train", batch_size=0)
    with pytest.raises(ConfigError, match="rank must be in"):
        Loader(["127.0.0.1:1"], dataset="train", batch_size=1, rank=2, world_size=2)
    with pytest.raises(ConfigError, match="unknown loader option"):
        Loader(["127.0.0.1:1"], dataset="train", batch_size=1, shuffel=True)


async def test_dns_name_spreads_reads_over_every_address_and_picks_up_new_ones(
    npz_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `dns:///` target stands for every address it resolves to. Real DNS with several
    A records cannot run here, so the resolver's answer is faked; the workers are real,
    on three loopback addresses sharing one port."""
    from shardstream.client import _resolve

    async with running_workers(npz_root, 1, host="127.0.0.2") as (first,):
        port = first.port
        async with running_workers(npz_root, 1, host="127.0.0.1", port=port) as (_second,):
            answer = [f"127.0.0.2:{port}", f"127.0.0.1:{port}"]

            async def fake_resolve(target: str) -> list[str]:
                assert target == f"dns:///fleet.test:{port}"
                return list(answer)

            monkeypatch.setattr(_resolve, "resolve", fake_resolve)
            async with Loader([f"dns:///fleet.test:{port}"], dataset="train", batch_size=50,
                              read_bytes=4096, resolve_interval=0.05) as loader:  # fmt: skip
                ids = ids_of(await collect_epoch(loader, 0))
                reads = loader.statistics().reads_by_worker
                assert np.array_equal(ids, np.arange(RECORDS))
                assert set(reads) == set(answer) and all(n > 0 for n in reads.values())
                async with running_workers(npz_root, 1, host="127.0.0.3", port=port) as (third,):
                    answer.append(f"127.0.0.3:{port}")
                    for epoch in range(1, 50):  # until the re-resolved worker has served
                        ids = ids_of(await collect_epoch(loader, epoch))
                        assert np.array_equal(ids, np.arange(RECORDS))
                        if loader.statistics().reads_by_worker.get(third.address, 0):
                            break
                    assert loader.statistics().reads_by_worker.get(third.address, 0) > 0


async def test_dns_name_of_localhost(npz_root: Path) -> None:
    async with running_workers(npz_root, 1) as (worker,), Loader(
        [f"dns:///localhost:{worker.port}"], dataset="train", batch_size=100
    ) as loader:  # fmt: skip
        assert len(await collect_epoch(loader, 0)) == RECORDS // 100
        assert loader.statistics().reads_by_worker.get(f"127.0.0.1:{worker.port}", 0) > 0


async def test_client_statistics_and_prometheus_export(npz_root: Path) -> None:
    import urllib.request

    pytest.importorskip("prometheus_client", reason="needs shardstream[metrics]")
    from shardstream.client.metrics import serve_metrics

    async with running_workers(npz_root, 2) as workers, Loader(
        [w.address for w in workers], dataset="train", batch_size=100, rank=0, world_size=1
    ) as loader:  # fmt: skip
        port = serve_metrics(loader)
        await collect_epoch(loader, 0)
        url = f"http://127.0.0.1:{port}/metrics"
        text = (
            await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
        ).decode()
        stats = loader.statistics()
    assert stats.batches == 20 and stats.records == RECORDS and stats.epochs_completed == 1
    assert stats.batches_per_second > 0 and stats.megabytes_per_second > 0
    assert 'shardstream_client_records_total{dataset="train",rank="0"} 2000.0' in text
    assert 'shardstream_client_epochs_completed_total{dataset="train",rank="0"} 1.0' in text
    assert "shardstream_client_reads_in_flight" in text
    for worker, n in stats.reads_by_worker.items():  # every counter of the statistics
        assert (
            f'shardstream_client_reads_total{{dataset="train",rank="0",worker="{worker}"}} {n}.0'
            in text
        )
    assert 'shardstream_client_stragglers_total{dataset="train",rank="0"} 0.0' in text


async def test_a_paused_consumer_bounds_the_reads_started(npz_root: Path) -> None:
    """Memory is bounded: with the consumer paused, at most `reads_ahead` reads beyond
    what was consumed are started, however many the epoch has (here 200)."""
    async with running_workers(npz_root, 1) as (worker,), Loader(
        [worker.address], dataset="train", batch_size=10, read_bytes=10 * 64,
        reads_ahead=4, max_inflight_reads=2, prefetch_batches=1,
    ) as loader:  # fmt: skip
        assert len(loader.plan(0).reads) == 200
        epoch = loader.epoch(0)
        await anext(epoch)

        def started() -> int:
            return sum(loader.statistics().reads_by_worker.values())

        # Until the pipeline stands still with its window full: nothing in flight and at
        # least `reads_ahead` reads started beyond the one consumed (a moment between two
        # reads has nothing in flight too, but not yet the whole window started).
        deadline = time.monotonic() + 60  # only bounds a hang
        while any(loader.statistics().reads_in_flight.values()) or started() < 1 + 4:
            assert time.monotonic() < deadline, f"the window never filled: {started()} reads"
            await asyncio.sleep(0.01)
        started_reads = started()
        await epoch.aclose()
    assert started_reads <= 1 + 4 + 2  # consumed + reads_ahead + the prefetched batch's slack


@pytest.mark.parametrize("share", [1, 3])
async def test_reads_start_in_plan_order_within_each_workers_share(
    npz_root: Path, share: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New reads start in plan order and no worker runs more than `reads_per_worker` of
    them, even with room for more in `max_inflight_reads`; the epoch stays exact."""
    from shardstream.client import _pipeline
    from shardstream.client._pool import WorkerPool

    started: list[int] = []
    busiest = [0]
    real_fetch, real_acquire = _pipeline.fetch, WorkerPool._acquire

    async def fetch(read: object, *args: object, **kw: object) -> None:
        started.append(read.seq)  # type: ignore[attr-defined]
        await real_fetch(read, *args, **kw)  # type: ignore[arg-type]

    async def acquire(self: WorkerPool, *args: object, **kw: object) -> object:
        conn = await real_acquire(self, *args, **kw)  # type: ignore[arg-type]
        busiest[0] = max(busiest[0], conn.outstanding)
        return conn

    monkeypatch.setattr(_pipeline, "fetch", fetch)
    monkeypatch.setattr(WorkerPool, "_acquire", acquire)
    async with running_workers(npz_root, 2) as workers:
        async with Loader([w.address for w in workers], dataset="train", batch_size=16,
                          read_bytes=2048, max_inflight_reads=8, reads_per_worker=share) as loader:  # fmt: skip
            ids = ids_of(await collect_epoch(loader, 0))
            assert sum(loader._pool.in_flight().values()) == 0  # every slot given back
    assert np.array_equal(np.sort(ids), np.arange(RECORDS))
    assert len(started) > 8 and started == sorted(started)
    assert busiest[0] == share


@pytest.mark.parametrize("connections", [1, 3])
async def test_reads_use_every_connection_to_a_worker(
    npz_root: Path, connections: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`connections_per_worker=N` spreads reads over N TCP connections to each worker
    (the worker sees N peer ports), and the epoch stays exact."""
    from shardstream.server._servicer import WorkerServicer

    peers: set[str] = set()
    real_read = WorkerServicer.serve_read

    async def serve_read(self: WorkerServicer, request: bytes, context: Any) -> None:
        peers.add(context.peer())
        await real_read(self, request, context)

    monkeypatch.setattr(WorkerServicer, "serve_read", serve_read)
    async with running_workers(npz_root, 1) as workers:
        async with Loader([workers[0].address], dataset="train", batch_size=16, read_bytes=2048,
                          connections_per_worker=connections) as loader:  # fmt: skip
            ids = ids_of(await collect_epoch(loader, 0))
    assert np.array_equal(np.sort(ids), np.arange(RECORDS))
    assert len(peers) == connections, peers


async def test_sync_loader_closed_during_an_epoch_ends_it_with_a_clear_error(
    npz_root: Path,
) -> None:
    """Closing a SyncLoader while another thread is in the middle of an epoch: that
    thread's next step raises instead of waiting forever for a batch."""
    import threading

    async with running_workers(npz_root, 1) as workers:

        def run() -> tuple[int, BaseException | None]:
            sync = SyncLoader([workers[0].address], dataset="train", batch_size=8)
            sync.open()
            first, closed = threading.Event(), threading.Event()
            outcome: list[BaseException | None] = [None]
            seen = [0]

            def consume() -> None:
                try:
                    for _ in sync.epoch(0):
                        seen[0] += 1
                        first.set()
                        closed.wait(30)
                except BaseException as exc:  # what the training loop would see
                    outcome[0] = exc

            thread = threading.Thread(target=consume)
            thread.start()
            assert first.wait(30)
            sync.close()
            closed.set()
            thread.join(30)
            assert not thread.is_alive()
            return seen[0], outcome[0]

        seen, error = await asyncio.to_thread(run)
    assert seen == 1
    assert isinstance(error, RuntimeError) and "closed during the epoch" in str(error)

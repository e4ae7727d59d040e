"""Workers that come back as other workers: restarted over other data or other
transforms, or the whole fleet drained and restarted on the same ports. A loader must
never deliver records of another description, nor wait out its retry deadline for
workers that are serving again."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.client._health import suspect
from shardstream.client._workers import Conn
from shardstream.client.errors import ShardChangedError
from shardstream.server import Worker, make_dataset
from shardstream.server._config import DatasetSpec, TransformSpec
from shardstream.server._process import WorkerProcess

from conftest import worker_config

RECORDS = 1200
OPTS: dict[str, Any] = {"dataset": "train", "batch_size": 20, "read_bytes": 16 * 1024,
                        "backoff_base": 0.05, "backoff_cap": 0.5, "idle_timeout": 2.0,
                        "retry_deadline": 60.0, "same_host_lane": False, "network_lane": False}  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("restarts")
    make_dataset(root, shards=4, records=RECORDS, shape=(8, 8, 3))
    return root


def flipping(data: Path, p: float, port: int = 0) -> Worker:
    """A worker whose dataset mirrors each image with probability `p`."""
    flip = TransformSpec(fn="shardstream.server.transforms:horizontal_flip", params={"p": p})
    spec = DatasetSpec(name="train", pattern="*.npz", transforms=(flip,))
    return Worker(dataclasses.replace(worker_config(data), datasets=(spec,), port=port))


def test_a_suspected_worker_is_described_again() -> None:
    """A worker whose stream went silent may have been killed and restarted: its health
    watch then sees only the new process SERVING. Was: `suspect()` kept `verified`, so a
    worker restarted with other transforms got reads without being described again (in
    about half the trials of a SIGKILL mid-read)."""
    conn = Conn("127.0.0.1:1", None, None, None)  # type: ignore[arg-type]
    conn.verified = conn.serving = True
    suspect(conn)
    assert not conn.verified and not conn.serving and conn.rewatch


def restarted_as(worker: Worker, other: Worker) -> None:
    """`worker` serves what `other` serves from now on, on its own port and connections:
    as if restarted with `other`'s configuration, without the connection coming back
    (which a loader would notice: here its check before reads could not)."""
    assert worker._servicer is not None and other._servicer is not None
    worker._servicer.catalog = other._servicer.catalog


async def epoch_after_a_restart(a: Worker, b: Worker, c: Worker) -> tuple[list[int], list[str]]:
    """Epoch 0 from workers `a` and `b`, `a` serving what `c` serves from its start: the
    ids delivered, and the addresses left out."""
    async with Loader([a.address, b.address], **OPTS) as loader:
        restarted_as(a, c)
        ids = [int(i) for batch in [x async for x in loader.epoch(0)] for i in batch["id"]]
        return ids, [x.address for x in loader._pool.conns if x.excluded]  # type: ignore[union-attr]


async def test_a_worker_restarted_with_other_transforms_serves_no_read(data: Path) -> None:
    """Each read names the fingerprint of the description the plan was made from (it
    covers the transforms): a worker with another refuses it, and gets no more reads; the
    read goes on elsewhere. Was: a worker restarted with other transforms, whose
    restart the loader missed (a SIGKILL racing its health watch, about half the
    trials), served mirrored images into the epoch."""
    async with flipping(data, 0.0) as a, flipping(data, 0.0) as b, flipping(data, 1.0) as c:
        reference = [x async for x in _images(b.address)]
        async with Loader([a.address, b.address], **OPTS) as loader:
            restarted_as(a, c)
            got = {int(i): img for batch in [b async for b in loader.epoch(0)]
                   for i, img in zip(batch["id"], batch["image"], strict=True)}  # fmt: skip
            (excluded,) = [c for c in loader._pool.conns if c.excluded]  # type: ignore[union-attr]
    assert excluded.address == a.address and "other transforms" in excluded.excluded
    assert sorted(got) == list(range(RECORDS))
    assert all(np.array_equal(got[i], img) for i, img in reference)  # nothing mirrored


async def _images(address: str) -> Any:
    async with Loader([address], **OPTS) as loader:
        async for batch in loader.epoch(0):
            for i, img in zip(batch["id"], batch["image"], strict=True):
                yield int(i), img


async def test_a_worker_whose_data_changed_is_left_out_and_the_epoch_goes_on(
    data: Path, tmp_path: Path
) -> None:
    """A worker restarted over shards of the same names and sizes but other bytes refuses
    reads planned from the others' (FAILED_PRECONDITION): it is left out and the read goes
    on elsewhere. Was: ShardChangedError ended the epoch, though another worker served the
    agreed data. With no other worker left, that error is what the loader raises."""
    other = tmp_path / "other"
    make_dataset(other, shards=4, records=RECORDS, shape=(8, 8, 3), seed=9)
    async with (
        Worker(worker_config(data)) as a,
        Worker(worker_config(data)) as b,
        Worker(worker_config(other)) as c,
    ):
        ids, excluded = await epoch_after_a_restart(a, b, c)
        assert sorted(ids) == list(range(RECORDS))
        assert excluded == [a.address]
        async with Loader([b.address], **OPTS) as loader:
            restarted_as(b, c)
            with pytest.raises(ShardChangedError, match="other data"):
                async for _ in loader.epoch(0):
                    pass


async def test_a_fleet_drained_and_restarted_on_its_ports_goes_on_at_once(data: Path) -> None:
    """`docker compose restart`: every worker gets SIGTERM with reads in flight (they end
    them at a record boundary), and is back on its port a moment later. Was: a drained
    stream put its worker in backoff for the whole retry deadline, which its SERVING
    again did not lift: no batch for 60 s, then WorkersUnavailableError naming
    'draining' for workers that were serving."""
    args = ["--data-root", str(data), "--dataset", "train=*.npz", "--processes", "0",
            "--chunk-bytes", "1024"]  # fmt: skip
    worker = WorkerProcess.start(args)
    restarted: list[WorkerProcess] = []
    try:
        async with Loader([worker.address], **{**OPTS, "chunk_bytes": 1024}) as loader:
            # A read the loader counts in flight may already be sent whole on a loaded
            # machine, so that nothing is drained: restart again, an epoch later, until
            # a drain cuts a read (each epoch must be exactly once either way).
            for epoch in range(6):
                ids: list[int] = []
                restarts = len(restarted)
                async for batch in loader.epoch(epoch):
                    ids.extend(int(i) for i in batch["id"])
                    in_flight = loader.statistics().reads_in_flight.get(worker.address)
                    if len(restarted) == restarts and in_flight:
                        port = worker.port
                        worker.signal(signal.SIGTERM)
                        assert await asyncio.to_thread(worker.proc.wait, 60) == 0
                        worker.close()
                        worker = await asyncio.to_thread(
                            WorkerProcess.start, [*args, "--port", str(port)]
                        )
                        restarted.append(worker)
                assert len(restarted) > restarts, "no read was in flight"
                assert sorted(ids) == list(range(RECORDS))
                if loader.statistics().resumes:
                    break
            drained = loader.statistics().resumes
            (conn,) = loader._pool.conns  # type: ignore[union-attr]
            backoff = conn.down_until  # lifted when it served again (was: drain + 60 s)
        assert backoff == 0.0
        assert drained >= 1, f"no read was drained in {len(restarted)} restarts"
    finally:
        worker.close()
        for w in restarted:
            w.close()


async def test_a_worker_left_out_and_restarted_with_the_agreed_data_is_used_again(
    data: Path, tmp_path: Path
) -> None:
    """A worker left out because its data differed gets no reads until it goes away;
    restarted (a new process) with the agreed data, it is described again and used, as
    its error says ("restart the worker"). Was: left out for good, so the epoch ended
    with WorkersUnavailableError when the other worker went, though it served the data."""
    other = tmp_path / "other"
    make_dataset(other, shards=4, records=RECORDS, shape=(8, 8, 3), seed=9)
    async with Worker(worker_config(data)) as a, Worker(worker_config(other)) as c:
        b = Worker(worker_config(data))
        await b.start()
        try:
            async with Loader([a.address, b.address], **OPTS) as loader:
                restarted_as(a, c)
                ids = [int(i) for batch in [x async for x in loader.epoch(0)] for i in batch["id"]]
                (conn,) = [x for x in loader._pool.conns if x.address == a.address]  # type: ignore[union-attr]
                assert sorted(ids) == list(range(RECORDS)) and conn.excluded
                port = a.port
                await a.aclose()
                async with Worker(worker_config(data, port=port)):
                    loop = asyncio.get_running_loop()
                    deadline = loop.time() + 30  # bounds a hang only
                    while conn.excluded or not conn.serving:
                        assert loop.time() < deadline, "the restarted worker is not back"
                        await asyncio.sleep(0.02)
                    await b.aclose()
                    again = [int(i) for x in [y async for y in loader.epoch(1)] for i in x["id"]]
            assert sorted(again) == list(range(RECORDS))
        finally:
            await b.aclose()


@pytest.mark.parametrize("serves", ["renamed shards", "another dataset"])
async def test_a_worker_serving_other_names_is_left_out_not_the_epoch(
    data: Path, tmp_path: Path, serves: str
) -> None:
    """A worker restarted over the data's next version, whose shards have other names
    (or under another dataset name): the read's fingerprint is checked before its shard
    is looked up, so it is a worker with other data (left out, the read goes on), not a
    NOT_FOUND that ends the epoch, as it was."""
    other = tmp_path / "other"
    make_dataset(other, shards=4, records=RECORDS, shape=(8, 8, 3), seed=9)
    for path in list(other.glob("*.npz")):
        path.rename(path.with_name("v2-" + path.name))
    name = "train" if serves == "renamed shards" else "next"
    async with (
        Worker(worker_config(data)) as a,
        Worker(worker_config(data)) as b,
        Worker(worker_config(other, datasets=(f"{name}=*.npz",))) as c,
    ):
        ids, excluded = await epoch_after_a_restart(a, b, c)
    assert sorted(ids) == list(range(RECORDS))
    assert excluded == [a.address]


async def test_epochs_that_ended_leave_only_their_statistics(data: Path) -> None:
    """A loader kept every epoch's iterator for `statistics()`, with its plan and its
    ledger (16 bytes a record): client memory grew by each epoch, +63 MB an epoch over 4M
    records with a ledger, +1.9 MB an epoch of 20k shards without. An epoch's iterator
    now goes once the next starts; its statistics stay."""
    import gc
    import weakref

    async with Worker(worker_config(data)) as w, Loader([w.address], **OPTS) as loader:
        first = loader.epoch(0)
        n = sum([len(b["id"]) async for b in first])
        gone = weakref.ref(first)
        del first
        second = loader.epoch(1)
        async for _ in second:
            break
        gc.collect()
        assert gone() is None
        stats = loader.statistics().epochs
        assert stats[0].records == n == RECORDS and stats[0].completed
        assert not stats[1].completed
        await second.aclose()


async def test_a_description_larger_than_a_message_refuses_the_start(tmp_path: Path) -> None:
    """45k shards with long ids: the worker said SERVING, but no DescribeDataset answer
    could be sent ("Sent message larger than max"), and the loader's error advised
    raising the loader's limit, which could not help. The worker now refuses to start,
    naming --max-message-bytes and the size it needs."""
    from shardstream.server._catalog import CatalogError

    make_dataset(tmp_path, shards=2, records=4, shape=(1,))
    (first,) = sorted(tmp_path.glob("*.npz"))[:1]
    for i in range(400):  # 400 shards of ~200-byte ids: ~90 KB of description
        (tmp_path / f"{'x' * 180}-{i:04d}.npz").write_bytes(first.read_bytes())
    config = worker_config(tmp_path, max_message_bytes=64 * 1024, chunk_bytes=16 * 1024)
    with pytest.raises(CatalogError, match=r"raise --max-message-bytes to at least \d+"):
        async with Worker(config):
            pass
    async with Worker(dataclasses.replace(config, max_message_bytes=256 * 1024)) as w:
        async with Loader([w.address], **OPTS) as loader:
            assert len(loader.dataset.shards) == 402


def test_a_torch_iterable_keeps_its_position_through_a_refused_reopen(
    data: Path, tmp_path: Path
) -> None:
    """Closed at batch 9, reopened against its worker restarted with other data: the
    reopen is refused (StateMismatchError), and the position kept at close() stays. Was:
    the iterable counted as open with the position never applied, so its state said
    batch 0 and the next iteration delivered the whole epoch again, silently."""
    torch_data = pytest.importorskip("shardstream.client.torch")
    from shardstream.client.errors import StateMismatchError

    other = tmp_path / "other"
    make_dataset(other, shards=3, records=RECORDS // 2, shape=(8, 8, 3), seed=9)
    args = ["--dataset", "train=*.npz", "--processes", "0"]
    worker = WorkerProcess.start(["--data-root", str(data), *args])
    port, ids = worker.port, []
    try:
        iterable = torch_data.ShardstreamIterable([worker.address], **OPTS)
        for i, batch in enumerate(iterable):
            ids += batch["id"].tolist()
            if i == 8:
                break
        iterable.close()
        kept = iterable.state_dict()
        worker.close()
        worker = WorkerProcess.start(["--data-root", str(other), "--port", str(port), *args])
        with pytest.raises(StateMismatchError):
            next(iter(iterable))
        assert iterable.state_dict() == kept
        worker.close()
        worker = WorkerProcess.start(["--data-root", str(data), "--port", str(port), *args])
        ids += [i for batch in iterable for i in batch["id"].tolist()]  # the rest of epoch 0
        iterable.close()
    finally:
        worker.close()
    assert kept["batches"] == 9 and sorted(ids) == list(range(RECORDS))


async def test_the_only_worker_serving_other_data_is_named_not_a_deadline(
    data: Path, tmp_path: Path
) -> None:
    """The only worker, restarted (a new process on its port) over other data, is
    described again and left out at once: the error says so. Was: "no worker could serve
    ... before the retry deadline", 0.2 s into a 60 s deadline."""
    from shardstream.client.errors import ShardChangedError, WorkersUnavailableError

    other = tmp_path / "other"
    make_dataset(other, shards=4, records=RECORDS, shape=(8, 8, 3), seed=9)
    args = ["--dataset", "train=*.npz", "--processes", "0"]
    worker = WorkerProcess.start(["--data-root", str(data), *args])
    try:
        async with Loader([worker.address], **OPTS) as loader:
            port = worker.port
            worker.close()
            worker = await asyncio.to_thread(
                WorkerProcess.start, ["--data-root", str(other), "--port", str(port), *args]
            )
            started = asyncio.get_running_loop().time()
            with pytest.raises((WorkersUnavailableError, ShardChangedError)) as caught:
                [b async for b in loader.epoch(0)]
            took = asyncio.get_running_loop().time() - started
    finally:
        worker.close()
    assert took < OPTS["retry_deadline"] / 2
    assert "retry deadline" not in str(caught.value), caught.value
    assert "fingerprint" in str(caught.value)

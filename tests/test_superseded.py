"""A consumer waiting for a batch is woken at once, with a clear RuntimeError, when its
epoch is superseded or its loader closed; a superseded epoch never ends as complete."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from shardstream.client import Loader, SyncLoader

from conftest import running_workers
from faultproxy import BlackHole, FaultProxy, Pass

OPTS = {"dataset": "train", "batch_size": 16, "read_bytes": 2048}


@pytest.mark.parametrize("how", ["next epoch", "aclose"])
async def test_waiting_consumer_is_woken(npz_root: Path, how: str) -> None:
    async with running_workers(npz_root, 1) as workers:
        async with FaultProxy(workers[0].address) as proxy:
            loader = Loader([proxy.address], prefetch_batches=1, **OPTS)
            await loader.start()
            try:
                proxy.set_mode(Pass())
                epoch0 = loader.epoch(0)
                first = await anext(epoch0)
                assert len(first["id"]) == 16
                proxy.set_mode(BlackHole())
                waiting = await _blocked_consumer(epoch0)
                if how == "next epoch":
                    loader.epoch(1)
                    match = r"superseded by loader.epoch\(1\)"
                else:
                    await loader.aclose()
                    match = "closed during epoch 0"
                with pytest.raises(RuntimeError, match=match):
                    await asyncio.wait_for(waiting, 10)
                with pytest.raises(RuntimeError, match=match):  # and on every later call
                    await anext(epoch0)
                assert not epoch0.completed
            finally:
                await loader.aclose()


async def _blocked_consumer(epoch: Any) -> asyncio.Future[Any]:
    """A task awaiting the epoch's next batch once every buffered batch is taken (the
    network is a black hole by then): a condition on the queue, not a timing."""
    while True:
        waiting = asyncio.ensure_future(anext(epoch))
        while not waiting.done() and not epoch._queue._getters:  # noqa: ASYNC110 (a poll)
            await asyncio.sleep(0.001)
        if not waiting.done():
            return waiting
        waiting.result()  # a batch that was still buffered


async def test_sync_loader_epoch_from_another_thread_wakes_the_first(npz_root: Path) -> None:
    async with running_workers(npz_root, 1) as workers:
        async with FaultProxy(workers[0].address) as proxy:
            sync = SyncLoader([proxy.address], prefetch_batches=1, **OPTS)
            await asyncio.to_thread(sync.open)
            try:
                first = sync.epoch(0)
                await asyncio.to_thread(next, first)
                proxy.set_mode(BlackHole())

                def drain() -> None:
                    for _ in first:  # blocks once the buffered batches are gone
                        pass

                a = asyncio.ensure_future(asyncio.to_thread(drain))
                second = sync.epoch(1)
                b = asyncio.ensure_future(asyncio.to_thread(next, second))
                with pytest.raises(RuntimeError, match=r"superseded by SyncLoader.epoch\(1\)"):
                    await asyncio.wait_for(a, 10)
            finally:
                await asyncio.to_thread(sync.close)
            with pytest.raises(RuntimeError, match="closed"):
                await asyncio.wait_for(b, 10)


async def test_close_on_another_thread_ends_an_epoch_it_overtakes(
    npz_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `close` on one thread while another thread's epoch is starting ends that epoch
    with a clear RuntimeError; it does not leave it waiting forever for a batch (nor the
    close waiting on it)."""
    async with running_workers(npz_root, 1) as workers:
        sync = SyncLoader([workers[0].address], **OPTS)
        await asyncio.to_thread(sync.open)
        starting = threading.Event()
        real_epoch = sync._loader.epoch

        def epoch_held_until_close(epoch: int) -> Any:  # on the loop's thread, in its start
            iterator = real_epoch(epoch)
            starting.set()
            while not sync._closing:  # a poll of the condition: `close` has begun
                time.sleep(0.001)
            return iterator

        monkeypatch.setattr(sync._loader, "epoch", epoch_held_until_close)
        outcome: list[object] = []

        def consume() -> None:
            try:
                outcome.append(next(sync.epoch(0)))
            except RuntimeError as exc:
                outcome.append(exc)

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        assert await asyncio.to_thread(starting.wait, 20)
        await asyncio.wait_for(asyncio.to_thread(sync.close), 20)
        await asyncio.to_thread(consumer.join, 20)
        assert not consumer.is_alive(), "the epoch still waits for a batch after close"
        (error,) = outcome
        assert isinstance(error, RuntimeError), error
        assert "closed" in str(error)

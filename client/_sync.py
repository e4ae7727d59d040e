"""A synchronous face for ordinary training loops: the event loop runs in a
background thread; iteration blocks the caller until the next batch is ready.

    with SyncLoader(addresses, dataset="train", batch_size=64) as loader:
        for epoch in range(3):
            for batch in loader.epoch(epoch):
                ...
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

from shardstream.client._epoch import EpochIterator
from shardstream.client._loader import Loader
from shardstream.client._options import LoaderStatistics
from shardstream.client._planner import RankPlan
from shardstream.client._rebatch import Batch
from shardstream.v1.codec import FieldSpec

T = TypeVar("T")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    return loop


class SyncLoader:
    """`Loader` for synchronous code; takes the same arguments."""

    def __init__(self, addresses: Sequence[str] | str, **options: Any) -> None:
        self._loader = Loader(addresses, **options)  # validates options here, in the caller
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> Any:
        return self._loader.config

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the SyncLoader is not open; use `with SyncLoader(...)`")
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result()

    def open(self) -> None:
        if self._loop is not None:
            raise RuntimeError("the SyncLoader is already open")
        loop = self._loop = _new_loop()
        self._thread = threading.Thread(
            target=loop.run_forever, name="shardstream-loader", daemon=True
        )
        self._thread.start()
        try:
            self._call(self._loader.start())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop reads, close connections and the background loop (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._loader.aclose(), loop).result()
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> SyncLoader:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def schema(self) -> tuple[FieldSpec, ...]:
        return self._loader.schema

    def plan(self, epoch: int) -> RankPlan:
        return self._loader.plan(epoch)

    def batches_per_epoch(self) -> int:
        return self._loader.batches_per_epoch()

    def statistics(self) -> LoaderStatistics:
        return self._loader.statistics()

    @property
    def start_epoch(self) -> int:
        return self._loader.start_epoch

    def state_dict(self) -> dict[str, Any]:
        return self._loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], *, override: bool = False) -> None:
        self._loader.load_state_dict(state, override=override)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch; leaving the loop early stops the epoch's reads."""

        async def start() -> EpochIterator:
            return self._loader.epoch(epoch)

        iterator = self._call(start())
        try:
            while True:
                try:
                    yield self._call(iterator.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if self._loop is not None:
                self._call(iterator.aclose())

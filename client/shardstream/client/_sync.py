"""A synchronous face for ordinary training loops: the event loop runs in a
background thread; iteration blocks the caller until the next batch is ready.

    with SyncLoader(addresses, dataset="train", batch_size=64) as loader:
        for epoch in range(3):
            for batch in loader.epoch(epoch):
                ...
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import gc
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar, cast

from shardstream._common import new_event_loop
from shardstream.client._loader import Loader
from shardstream.client._options import LoaderStatistics
from shardstream.client._pipeline import END, EpochIterator, Failure
from shardstream.client._planner import RankPlan
from shardstream.client._rebatch import Batch
from shardstream.v1.codec import FieldSpec

T = TypeVar("T")


class SyncLoader:
    """`Loader` for synchronous code; takes the same arguments."""

    def __init__(self, addresses: Sequence[str] | str, **options: Any) -> None:
        self._loader = Loader(addresses, **options)  # validates options here, in the caller
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._handoffs: set[_Handoff] = set()  # of the epochs being iterated
        self._position: _Position | None = None  # of the epoch iterated last
        self._closing = False
        # Guards `_closing` and `_handoffs` between the threads that iterate epochs and the
        # one that closes: a call or an epoch either starts before `close` looks (and is
        # ended by it) or sees that it is closing.
        self._lock = threading.Lock()
        self._pid = os.getpid()  # of the process that opened it: a forked child cannot use it

    def __reduce__(self) -> Any:
        raise TypeError(
            "a SyncLoader cannot be pickled: it holds connections and a thread of this "
            "process. Pass the addresses and options to the other process and open one "
            "there (ShardstreamIterable, for torch, does this when pickled)"
        )

    def _check_process(self) -> None:
        if os.getpid() != self._pid:
            raise RuntimeError(
                f"this SyncLoader was opened in process {self._pid}; a forked child "
                f"({os.getpid()}) cannot use it, as its thread and connections stay in the "
                "parent (nor open another: grpc.aio does not survive a fork). Start such "
                "processes with the spawn method, and open a loader there"
            )

    @property
    def config(self) -> Any:
        return self._loader.config

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop's thread and wait for it; `_Closed` if `close` ends it
        (or has begun)."""
        self._check_process()
        with self._lock:
            if self._loop is None or self._closing:
                coro.close()
                if self._closing:
                    raise _Closed("the SyncLoader is being closed")
                self._refuse_closed()
                raise RuntimeError("the SyncLoader is not open; use `with SyncLoader(...)`")
            fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return fut.result()
        except CancelledError:  # `close` cancelled it with every task of its loop
            raise _Closed("the SyncLoader was closed") from None

    @property
    def closed(self) -> bool:
        """Whether it was closed (or failed to open): a SyncLoader opens once."""
        return self._loader.closed

    def _refuse_closed(self) -> None:
        if self._loader.closed:
            raise RuntimeError(
                "this SyncLoader is closed (or failed to open), and cannot be opened again: "
                "create a new SyncLoader"
            )

    def open(self) -> None:
        if self._loop is not None:
            self._check_process()
            raise RuntimeError("the SyncLoader is already open")
        self._refuse_closed()
        self._closing = False
        self._pid = os.getpid()
        loop = self._loop = new_event_loop()
        loop.set_exception_handler(_quiet_grpc_poller)
        self._thread = threading.Thread(
            target=_run_loop, args=(loop,), name="shardstream-loader", daemon=True
        )
        self._thread.start()
        _open.add(self)
        # Dropped without close(): its loop closes the loader and ends its own thread.
        self._dropped = weakref.finalize(self, _release_dropped, loop, self._loader, self._pid)
        self._dropped.atexit = False  # at exit, `_close_at_exit` closes what is still open
        try:
            self._call(self._loader.start())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop reads, close connections and the background loop (idempotent)."""
        self._close(None)

    def _close(self, timeout: float | None) -> None:
        """`close`, waiting at most `timeout` seconds for the loop (at exit: a loop that
        does not answer must not keep the process from ending)."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None or self._closing:
                return
            if os.getpid() != self._pid:  # a forked child: the loop is the parent's
                self._loop = self._thread = None
                return
            self._closing = True  # no call nor epoch starts from here on
            handoffs = list(self._handoffs)
        _open.discard(self)
        self._dropped.detach()
        for handoff in handoffs:  # a loop in another thread must not wait forever
            handoff.abort(RuntimeError("the SyncLoader was closed during the epoch"))
        pumps = [h.pump for h in handoffs if h.pump is not None]

        async def shut() -> None:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            await self._loader.aclose()
            # Calls other threads started before `_closing` was set, still running: their
            # callers get `_Closed` rather than wait on a loop that stops.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        try:
            asyncio.run_coroutine_threadsafe(shut(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            if not thread.is_alive():
                loop.close()
            with self._lock:
                self._loop = self._thread = None
                self._closing = False

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

    def plan(self, epoch: int, *, whole: bool = False) -> RankPlan:
        return self._loader.plan(epoch, whole=whole)

    def batches_per_epoch(self) -> int:
        return self._loader.batches_per_epoch()

    def statistics(self) -> LoaderStatistics:
        return self._loader.statistics()

    @property
    def start_epoch(self) -> int:
        return self._loader.start_epoch

    def state_dict(self) -> dict[str, Any]:
        """The position of the batches this thread has received (not of those the loader
        has prepared ahead): restoring it yields exactly the rest."""
        with self._lock:  # an epoch starting on the loop's thread sets `_position`
            pos = self._position
            if pos is None:
                return self._loader.state_dict()
            # If the next epoch has just started (it hands out nothing until `_position`
            # is set), the loader's own position is the caller's.
            return self._loader._state_at_or_current(
                pos.iterator, pos.batches, completed=pos.completed
            )

    def load_state_dict(self, state: Mapping[str, Any], *, override: bool = False) -> None:
        """`Loader.load_state_dict`: an epoch being iterated ends (it raises RuntimeError
        from then on) and `state_dict()` is the loaded state until the next epoch."""
        if self._loop is None:
            self._loader.load_state_dict(state, override=override)
            return
        self._check_process()

        async def load() -> None:  # on the loop's thread, where the epoch runs
            self._loader.load_state_dict(state, override=override)
            with self._lock:
                self._position = None
                running = list(self._handoffs)
            for handoff in running:  # batches already handed over go too
                handoff.abort(
                    RuntimeError(
                        "this epoch was superseded by load_state_dict(): an epoch can only "
                        "be iterated until a state is loaded or the next epoch starts"
                    )
                )

        self._call(load())

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of one epoch; leaving the loop early stops the epoch's reads.

        A task on the loader's thread moves ready batches into a small hand-off queue
        (`HANDOFF_BATCHES`), so taking a ready batch costs the caller no round trip to
        that thread: only a lock, and a wake-up of the thread when the queue was full.
        """
        loop = self._loop
        if loop is None:
            self._refuse_closed()
            raise RuntimeError("the SyncLoader is not open; use `with SyncLoader(...)`")
        self._check_process()
        handoff = _Handoff(loop, HANDOFF_BATCHES)

        async def start() -> tuple[EpochIterator, _Position, asyncio.Task[None]]:
            # The position `state_dict` reports moves to the new epoch here, on the
            # loop's thread, whatever the caller's does meanwhile (a Ctrl-C included).
            iterator = self._loader.epoch(epoch)
            with self._lock:
                position = self._position = _Position(iterator)
            iterator.external_wait = True  # the caller's own waiting is counted below
            iterator.ledger_by_caller = True  # and what it receives is what it got
            handoff.pump = self._loader._spawn(_pump(iterator, handoff))
            return iterator, position, handoff.pump

        async def stop(iterator: EpochIterator, task: asyncio.Task[None]) -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await iterator.aclose()

        with self._lock:  # registered before it starts, so that a `close` ends it
            if self._closing:
                raise _Closed("the SyncLoader is being closed")
            superseded = list(self._handoffs)
            self._handoffs.add(handoff)
        for other in superseded:  # a loop in another thread must not wait forever
            other.abort(
                RuntimeError(
                    f"this epoch was superseded by SyncLoader.epoch({epoch}): an epoch can "
                    "only be iterated until the next one starts"
                )
            )
        try:
            # `position`: what the caller has received (the pump and hand-off run ahead).
            iterator, position, task = self._call(start())
        except BaseException:
            with self._lock:
                self._handoffs.discard(handoff)
            raise
        began = time.perf_counter()
        try:
            while True:
                self._check_process()  # in a forked child nothing would fill the hand-off
                t0 = time.perf_counter()
                item = handoff.get()
                waited = time.perf_counter() - t0
                iterator.counters.wait_seconds += waited
                if item is END:
                    position.completed = True
                    return
                if isinstance(item, Failure):
                    raise item.error
                iterator.delivered(position.batches)
                position.batches += 1
                iterator.counters.waited_for_batch(waited)
                # The epoch's duration as the caller sees it (the loader runs ahead).
                iterator.counters.seconds = time.perf_counter() - began
                yield cast(Batch, item)
        finally:
            iterator.finish_ledger()
            handoff.close()
            with self._lock:
                self._handoffs.discard(handoff)
            self._stop_epoch(stop(iterator, task))

    def _stop_epoch(self, stop: Coroutine[Any, Any, None]) -> None:
        """Stop an epoch left early, from wherever its generator is finalized: the
        caller's thread waits for it; the loop's own thread (a garbage collection there)
        and a process that is exiting or forked cannot wait, and do not."""
        loop = self._loop
        if (
            loop is None
            or self._closing
            or os.getpid() != self._pid
            or sys.is_finalizing()
            or self._thread is None
            or not self._thread.is_alive()
        ):
            stop.close()  # closed, or going: `close` (or the exit) ends the reads
        elif threading.current_thread() is self._thread:  # waiting would wait on itself

            async def quietly() -> None:
                with contextlib.suppress(Exception):  # nobody is there to hear of it
                    await stop

            try:
                self._loader._spawn(quietly())
            except RuntimeError:  # the loader is closing: that ends the reads
                stop.close()
        else:
            with contextlib.suppress(_Closed):  # a close from another thread ends it too
                self._call(stop)


# SyncLoaders open in this process, closed at exit if their users did not: before the
# interpreter's teardown, while their thread can still run.
_open: weakref.WeakSet[SyncLoader] = weakref.WeakSet()


def _quiet_grpc_poller(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: grpc's one poller of the process wakes every loop
    that made calls, and hands each completion to its call's loop. A completion of a
    loader closed just before (its cancelled calls) finds that loop closed, and a
    wake-up another loop took first finds nothing to read: both print a traceback from
    `PollerCompletionQueue._handle_events` though nothing failed (grpc/grpc#25364).
    Those two are dropped; everything else goes to the default handler."""
    exc = context.get("exception")
    if "PollerCompletionQueue._handle_events" in str(context.get("message", "")) and (
        isinstance(exc, BlockingIOError)
        or (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed")
    ):
        return
    loop.default_exception_handler(context)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    """The loop's thread: run until stopped, then end the loop's default executor's
    threads (the lane's set-up runs there) and close the loop, so that a loader dropped
    without `close()` leaves no thread behind (`close()` closes it too: a no-op then)."""
    try:
        loop.run_forever()
    finally:
        if not sys.is_finalizing():
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_default_executor())
                loop.close()


def _release_dropped(loop: asyncio.AbstractEventLoop, loader: Loader, pid: int) -> None:
    """A SyncLoader that became garbage while open: its loop closes the loader, ends
    what else runs there and stops, which ends its thread (the loader's tasks and two
    threads were left behind, and "Task was destroyed but it is pending!"). Nothing
    waits here: a finalizer runs on whichever thread collects."""
    if os.getpid() != pid or loop.is_closed() or sys.is_finalizing():
        return

    async def shut() -> None:
        try:
            await loader.aclose()
        finally:
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            asyncio.get_running_loop().stop()

    def start() -> None:
        loop.create_task(shut())

    with contextlib.suppress(RuntimeError):  # closed meanwhile
        loop.call_soon_threadsafe(start)


EXIT_CLOSE_SECONDS = 10.0


@atexit.register
def _close_at_exit() -> None:
    """Close what is open, then collect the closed loaders' channels: grpc stops its
    process-wide poller thread when the last channel goes, and that must happen now.
    Left to the interpreter's teardown, the thread wakes when it can no longer run and
    the process can abort ("terminate called without an active exception") after a
    job that did everything right."""
    for loader in list(_open):
        with contextlib.suppress(Exception):
            loader._close(EXIT_CLOSE_SECONDS)
    gc.collect()


class _Closed(RuntimeError):
    """A call or an epoch that `SyncLoader.close`, on another thread, ended or refused."""


@dataclass
class _Position:
    """How far the caller has got in an epoch: batches received, and whether its end."""

    iterator: EpochIterator
    batches: int = 0
    completed: bool = False


# Batches a SyncLoader holds ready in the caller's thread, beyond `prefetch_batches`. The
# loop's task refills the hand-off once it is down to half of that, not after every batch:
# waking the loop's thread costs the caller a context switch on a busy host (~70 us
# measured on 2 cores), which the caller counts as waiting for data.
HANDOFF_BATCHES = 4


class _Handoff:
    """A bounded queue from the event loop's thread (put) to the caller's (get): a C
    `SimpleQueue` (a get blocks without the GIL, a put wakes it with no Python-level
    condition), with the count that bounds it kept under a lock."""

    def __init__(self, loop: asyncio.AbstractEventLoop, capacity: int) -> None:
        self._loop = loop
        self._capacity = capacity
        self._items: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._queued = 0  # put and not yet taken
        self._space = asyncio.Event()  # used only on the loop's thread
        self._putter_waits = False
        self._closed = False
        self.pump: asyncio.Task[None] | None = None  # the task filling it

    async def put(self, item: object) -> None:
        """Called on the loop's thread; waits while the queue is full."""
        while True:
            with self._lock:
                if self._closed:
                    return
                if self._queued < self._capacity:
                    self._queued += 1
                    self._items.put(item)
                    return
                self._putter_waits = True
                self._space.clear()
            await self._space.wait()

    def get(self) -> object:
        """Called on the caller's thread; blocks until an item is there."""
        item = self._items.get()
        with self._lock:
            self._queued -= 1
            wake = self._putter_waits and self._queued <= self._capacity // 2
            if wake:
                self._putter_waits = False
        if wake:
            self._wake_putter()
        return item

    def _wake_putter(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(self._space.set)

    def _drop_all(self) -> None:
        """Drop what is queued (called holding the lock)."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._items.get_nowait()
        self._queued = 0

    def abort(self, error: BaseException) -> None:
        """End the queue with `error` for the getter (called on any thread)."""
        with self._lock:
            self._closed = True
            self._drop_all()
            self._queued = 1
            self._items.put(Failure(error))
            self._putter_waits = False  # its task is cancelled next

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_all()
            wake = self._putter_waits
        if wake:
            self._wake_putter()


async def _pump(iterator: EpochIterator, handoff: _Handoff) -> None:
    try:
        async for batch in iterator:
            await handoff.put(batch)
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # handed to the caller, who raises it
        await handoff.put(Failure(exc))
        if not isinstance(exc, Exception):
            raise
    else:
        await handoff.put(END)

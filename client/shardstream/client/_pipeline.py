"""One epoch of one rank: planned reads in, exact batches out, in plan order.

    feed ──starts reads (bounded)──> fetch tasks ──> ReorderBuffer ──> produce
                                                                        │
    consumer <── bounded queue of batches (prefetch) <── Rebatcher <────┘

Every task belongs to the epoch's TaskGroup, which lives in one task owned
by the Loader. Errors travel down the batch queue and are raised in the
consumer; the end of the epoch is the end of iteration.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import time
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shardstream._common.loops import wait_done
from shardstream.client._fetch import FetchCounters, FetchOptions, Hole, fetch
from shardstream.client._ledger import LedgerWriter
from shardstream.client._planner import RankPlan, Read
from shardstream.client._pool import WorkerPool
from shardstream.client._ragged import batch_nbytes
from shardstream.client._rebatch import Batch, Rebatcher
from shardstream.client._reorder import ReorderBuffer
from shardstream.client._tasks import first_error
from shardstream.client._wire import Piece, ShardDesc
from shardstream.client.errors import ProtocolError
from shardstream.v1.codec import RAGGED_RECORD_GUESS
from shardstream.v1.ragged import Ragged, concat

log = logging.getLogger("shardstream.client")

SIZE_WARNING_RATIO = 4  # records this many times larger than planned: a warning


def _about(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


# Upper bounds (seconds) of the data-wait histogram's buckets (`LoaderStatistics.data_wait`).
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class EpochCounters:
    batches: int = 0
    records: int = 0
    bytes: int = 0
    wait_seconds: float = 0.0  # time the consumer waited for a batch
    max_reorder_depth: int = 0
    seconds: float = 0.0  # from the first batch asked for to the last one handed over
    # Batches received by the consumer by how long it waited for each (bucket i: at most
    # WAIT_BUCKETS[i] seconds; the last: longer), and those waits added.
    wait_counts: list[int] = field(default_factory=lambda: [0] * (len(WAIT_BUCKETS) + 1))
    batch_wait_seconds: float = 0.0

    def add(self, other: EpochCounters) -> None:
        self.batches += other.batches
        self.records += other.records
        self.bytes += other.bytes
        self.wait_seconds += other.wait_seconds
        self.max_reorder_depth = max(self.max_reorder_depth, other.max_reorder_depth)
        self.wait_counts = [a + b for a, b in zip(self.wait_counts, other.wait_counts, strict=True)]
        self.batch_wait_seconds += other.batch_wait_seconds

    def waited_for_batch(self, seconds: float) -> None:
        """The consumer received a batch after waiting `seconds` for it."""
        self.wait_counts[bisect.bisect_left(WAIT_BUCKETS, seconds)] += 1
        self.batch_wait_seconds += seconds


class EndOfEpoch:
    """The last item of an epoch's batch queue (and of a SyncLoader's hand-off)."""


@dataclass(frozen=True, slots=True)
class Failure:
    """An error on its way down the batch queue, raised in the consumer."""

    error: BaseException


END = EndOfEpoch()


@dataclass(frozen=True, kw_only=True, slots=True)
class PipelineOptions:
    """What an epoch's pipeline needs of the loader's options
    (`LoaderConfig.pipeline_options()`)."""

    max_inflight_reads: int  # read streams running at once
    reads_ahead: int  # reads started but not consumed: bounds memory
    prefetch_batches: int  # batches ready before the consumer asks
    lag_warning_seconds: float = 10.0  # warn this often while no batch comes


class EpochIterator:
    """`async for batch in loader.epoch(e)`: dict[str, ndarray] batches, in plan order."""

    def __init__(
        self,
        plan: RankPlan,
        shards: tuple[ShardDesc, ...],
        *,
        pool: WorkerPool,
        fetch_options: FetchOptions,
        options: PipelineOptions,
        spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task[None]],
        guard: Callable[[], None] | None = None,
        counters: FetchCounters,
        empty: Batch,
        ledger: LedgerWriter | None = None,
        formatter: Callable[[Batch], Batch] | None = None,
        sized_for: tuple[int, int, bool] = (0, 0, False),
        budget: tuple[int, int] | None = None,
    ) -> None:
        self.plan = plan
        # Reads of ragged records: (bytes a record was planned at, bytes the reads held and
        # in flight may take): a read starts only while they fit, whatever the records
        # turn out to weigh (one at a time where one is larger). None: records of a fixed
        # size, bounded by counting reads.
        self._budget = budget
        self._held = 0  # bytes of pieces received and not yet taken by the consumer
        self._seen = [0, 0]  # bytes and records received this epoch
        self._in_flight: dict[int, int] = {}  # read seq -> records not yet received
        self.max_held_bytes = 0
        # (bytes per record the reads were sized for, read_bytes) of a dataset whose sizes
        # the plan could only guess (ragged values): checked once a read's worth arrived.
        self._sized_for = sized_for
        self._empty = empty
        self._format = formatter  # ragged fields as the consumer asked (`_ragged`)
        self._ledger = ledger
        self._lag_warning = options.lag_warning_seconds
        self._depth = 0  # chunks held in the reorder buffer now
        self._shards = shards
        self._pool = pool
        self._fetch_options = fetch_options
        self._max_inflight = options.max_inflight_reads
        self._reads_ahead = options.reads_ahead  # widened for a wider shuffle window
        self._queue: asyncio.Queue[Batch | EndOfEpoch | Failure] = asyncio.Queue(
            options.prefetch_batches
        )
        self._spawn = spawn
        self._guard = guard  # raises where the epoch cannot be iterated (another loop...)
        self._task: asyncio.Task[None] | None = None
        # The consumer's wait for the next item, kept when the consumer is cancelled while
        # waiting (`asyncio.wait_for(it.__anext__(), t)`): the item it takes is the next
        # call's, never lost.
        self._getter: asyncio.Future[Batch | EndOfEpoch | Failure] | None = None
        self._finished = False
        self.completed = False  # iterated to its end
        self._abandoned: str | None = None  # why it can no longer be iterated
        self._began = 0.0  # when the first batch was asked for
        self._fetch_counters = counters
        self.counters = EpochCounters()
        self._emitted = 0
        self._ready = asyncio.Event()  # a fetch put data in the reorder buffer
        self._progress = asyncio.Event()  # the consumer freed a read slot
        # Set by a consumer that counts its own waiting (SyncLoader's hand-off).
        self.external_wait = False
        # The ledger's batch lines are the caller's to write as batches reach its consumer
        # (`delivered`, `finish_ledger`): a SyncLoader's pump takes batches ahead of it.
        self.ledger_by_caller = False

    @property
    def finished(self) -> bool:
        return self._finished

    def __aiter__(self) -> EpochIterator:
        return self

    async def __anext__(self) -> Batch:
        if self._guard is not None:
            self._guard()
        if self._abandoned is not None:
            raise RuntimeError(self._abandoned)
        if self._finished:
            raise StopAsyncIteration
        if self._task is None:
            self._task = self._spawn(self._run())
            self._began = time.perf_counter()
        t0 = time.perf_counter()
        item = await self._next_item()
        waited = time.perf_counter() - t0
        if not self.external_wait:
            self.counters.wait_seconds += waited
        if self._abandoned is not None:  # woken by abandon() while waiting
            raise RuntimeError(self._abandoned)
        if self._finished:  # woken by aclose() while waiting
            raise StopAsyncIteration
        if isinstance(item, EndOfEpoch):
            self.counters.seconds = time.perf_counter() - self._began
            self._finished = self.completed = True
            if not self.ledger_by_caller:
                self._close_ledger()
            raise StopAsyncIteration
        if isinstance(item, Failure):
            self._finished = True
            if not self.ledger_by_caller:
                self._close_ledger()
            raise item.error
        c = self.counters
        if self._ledger is not None and not self.ledger_by_caller:
            self._ledger.batch(c.batches)
        c.batches += 1
        if not self.external_wait:
            c.waited_for_batch(waited)
        c.records += len(next(iter(item.values())))
        c.bytes += batch_nbytes(item)
        c.seconds = time.perf_counter() - self._began
        if self._sized_for[0] and c.records >= self.plan.read_records:
            self._check_sizes()
        return item if self._format is None else self._format(item)

    def _check_sizes(self) -> None:
        """Warn (once) when records are far larger than the plan guessed: a read then holds
        that much more than `read_bytes`, and so does the loader's memory bound."""
        planned, read_bytes, measured = self._sized_for
        self._sized_for = (0, 0, False)
        actual = self.counters.bytes / max(1, self.counters.records)
        ratio = actual / planned
        if ratio < SIZE_WARNING_RATIO:
            return
        log.warning(
            "records average %d bytes, %.0fx the %d bytes reads were sized for (%s), so a "
            "read may hold up to %s where read_bytes is %s, and the loader's memory bound "
            "(reads_ahead x read_bytes) grows as much; read_bytes=%d keeps reads near %s",
            actual, ratio, planned,
            "the mean the workers measured on a sample of the dataset's records: these are "
            "larger" if measured else
            f"a ragged, string or bytes value counts as {RAGGED_RECORD_GUESS} bytes: the "
            "workers did not measure the dataset's records",
            _about(int(self.plan.read_records * actual)), _about(read_bytes),
            max(1, int(read_bytes / ratio)), _about(read_bytes),
        )  # fmt: skip

    async def _next_item(self) -> Batch | EndOfEpoch | Failure:
        """The next queue item; while none comes, a warning every `lag_warning` seconds.
        A caller cancelled while waiting leaves the wait to the next call, with whatever
        item it has taken meanwhile."""
        getter = self._getter
        if getter is None:
            if not self._queue.empty():
                return self._queue.get_nowait()
            getter = self._getter = asyncio.ensure_future(self._queue.get())
        waited = 0.0
        while not await wait_done(getter, self._lag_warning):
            waited += self._lag_warning
            running = {a: n for a, n in self._pool.in_flight().items() if n}
            log.warning(
                "data input is slow: no batch for %.3g s (epoch %d, after batch %d of %d; "
                "reads running %s; %d chunks wait in the reorder buffer; %d resumed so far)",
                waited, self.plan.epoch, self.counters.batches, self.plan.batches,
                running or "none", self._depth, self._fetch_counters.resumes,
            )  # fmt: skip
        self._getter = None
        return getter.result()

    def _close_ledger(self) -> None:
        if self._ledger is not None:
            self._ledger.close()

    def delivered(self, index: int) -> None:
        """Batch `index` reached the consumer (with `ledger_by_caller`; any thread)."""
        if self._ledger is not None:
            self._ledger.batch(index)

    def finish_ledger(self) -> None:
        """The consumer is done with the epoch (with `ledger_by_caller`; any thread)."""
        self._close_ledger()

    async def aclose(self) -> None:
        """Stop the epoch early: cancel its reads (idempotent). A consumer waiting for a
        batch meanwhile sees the end of iteration; the epoch does not count as completed."""
        task = self._stop()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)

    def abandon(self, why: str) -> None:
        """Stop the epoch because it can no longer be iterated (the loader started
        another epoch, or closed): a consumer waiting for a batch, and any later one,
        gets `RuntimeError(why)` at once. The cancelled reads finish in the background."""
        if self._abandoned is None and not self.completed:
            self._abandoned = why
        self._stop()

    def _stop(self) -> asyncio.Task[None] | None:
        """Cancel the pipeline and wake a waiting consumer (whose `__anext__` then looks at
        `_finished` / `_abandoned`); the task, if one was running."""
        self._finished = True
        self._close_ledger()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()  # before draining: it puts nothing more into the queue
        else:
            task = None
        while not self._queue.empty():
            self._queue.get_nowait()
        if self._getter is not None and self._getter.done():
            # a batch a cancelled wait took and nobody will ask for (it may view a lane's
            # memory: the iterator, which a SyncLoader keeps for its position, must not
            # hold it past the epoch)
            self._getter = None
        self._queue.put_nowait(END)  # the wake-up; never taken as the epoch's end
        # (a wait left by a cancelled consumer takes it, and ends)
        return task

    async def _run(self) -> None:
        try:
            await self._produce()
        except asyncio.CancelledError:
            raise
        except BaseExceptionGroup as group:
            await self._queue.put(Failure(first_error(group)))
        except Exception as exc:
            await self._queue.put(Failure(exc))
        else:
            await self._queue.put(END)

    async def _produce(self) -> None:
        # Counts are given read by read as they start: memory follows the reads in flight,
        # not the plan's length (a plan is computed as it is looked at).
        buffer: ReorderBuffer[Piece | Hole] = ReorderBuffer(self.plan.read_count, self._reads_ahead)
        rebatcher = Rebatcher(self.plan.batch_size, self._empty)
        await self._produce_in(buffer, rebatcher)
        if self._emitted != self.plan.batches:
            raise ProtocolError(
                f"epoch {self.plan.epoch} produced {self._emitted} batches, "
                f"the plan has {self.plan.batches}"
            )

    async def _produce_in(
        self,
        buffer: ReorderBuffer[Piece | Hole],
        rebatcher: Rebatcher,
    ) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._feed(tg, buffer))
            ready: deque[Piece | Hole] = deque()  # released in plan order, not yet used
            for window in self.plan.windows:
                pieces: list[Piece | Hole] = []
                got = 0
                while got < window.records:  # reads never straddle windows
                    if not ready:
                        # One piece at a time: a read's slot is freed only when its data has
                        # gone on to the rebatcher, so memory stays within `reads_ahead`.
                        items = buffer.pop(limit=1)
                        if not items:
                            self._ready.clear()
                            await self._ready.wait()
                            continue
                        ready.extend(items)
                        self._progress.set()
                        self._depth = buffer.depth() + len(ready)
                        self.counters.max_reorder_depth = max(
                            self.counters.max_reorder_depth, self._depth
                        )
                    piece = ready.popleft()
                    if self._budget is not None:
                        self._held -= _nbytes(piece)
                        self._progress.set()
                    got += piece.count
                    if window.take is not None:
                        pieces.append(piece)
                    elif isinstance(piece, Hole):
                        await self._emit(rebatcher.feed_holes(piece.count))
                    else:
                        await self._emit(rebatcher.feed(piece.arrays))
                if window.take is not None:
                    shuffled = _shuffled(rebatcher, pieces, window.take)  # clears `pieces`
                    await self._emit(shuffled)
            await self._emit(rebatcher.feed_holes(self.plan.trailing_holes))
            last = rebatcher.flush()
            if last is not None:
                await self._emit([last])

    def _over_budget(self, read: Read, head: int) -> bool:
        """Whether `read` (of ragged records) would take the bytes held and in flight past
        the budget; never for the read the consumer waits for (`head`: the first not yet
        delivered), so that it always starts. A record weighs what the plan said, or what
        they weighed so far if more."""
        if self._budget is None or read.seq <= head:
            return False
        planned, limit = self._budget
        seen_bytes, seen_records = self._seen
        per_record = max(planned, seen_bytes / seen_records if seen_records else 0)
        coming = sum(self._in_flight.values()) + read.count
        return self._held + per_record * coming > limit

    async def _emit(self, batches: Iterable[Batch]) -> None:
        for batch in batches:
            self._emitted += 1
            await self._queue.put(batch)

    async def _feed(self, tg: asyncio.TaskGroup, buffer: ReorderBuffer[Piece | Hole]) -> None:
        slots = asyncio.Semaphore(self._max_inflight)
        done = [0]  # reads of this epoch completed

        def share() -> int:
            # Slow start: one read per worker at first, one more per completed read (up to
            # `reads_per_worker`), so the first reads get the workers to themselves and
            # the first batches are not held up by reads that are needed later.
            return 1 + done[0]

        def put(seq: int, offset: int, piece: Piece | Hole) -> None:
            buffer.put(seq, offset, piece.count, piece)
            if self._budget is not None:
                size = _nbytes(piece)
                self._held += size
                self.max_held_bytes = max(self.max_held_bytes, self._held)
                self._seen[0] += size
                self._seen[1] += piece.count
                if seq in self._in_flight:
                    self._in_flight[seq] -= piece.count
            self._ready.set()

        async def one(read: Read, started: asyncio.Event) -> None:
            try:
                await fetch(
                    read,
                    self._shards[read.shard],
                    pool=self._pool,
                    options=self._fetch_options,
                    put=put,
                    counters=self._fetch_counters,
                    share=share,
                    started=started.set,
                )
                done[0] += 1
            finally:
                started.set()
                slots.release()
                if self._in_flight.pop(read.seq, None) is not None:
                    self._progress.set()  # its bytes are all counted as held now

        for window in self.plan.windows:
            if window.take is not None:  # delivered only once all of its reads are in
                buffer.widen(len(window.reads))
            for read in window.reads:
                while not buffer.admits(read.seq) or (
                    window.take is None and self._over_budget(read, buffer.head)
                ):
                    self._progress.clear()
                    await self._progress.wait()
                await slots.acquire()
                # Reads start one at a time, in plan order, each on a worker running fewer
                # than its share of reads: the data needed first is asked for first.
                buffer.expect(read.seq, read.count)
                if self._budget is not None:
                    self._in_flight[read.seq] = read.count
                started = asyncio.Event()
                tg.create_task(one(read, started))
                await started.wait()


def _nbytes(piece: Piece | Hole) -> int:
    """Bytes a received piece holds (its arrays; a Ragged's values and offsets)."""
    if isinstance(piece, Hole):
        return 0
    total = 0
    for column in piece.arrays.values():
        if isinstance(column, Ragged):
            total += column.values.nbytes + column.offsets.nbytes
        else:
            total += getattr(column, "nbytes", 0)
    return total


def _shuffled(
    rebatcher: Rebatcher, pieces: list[Piece | Hole], take: np.ndarray[Any, Any]
) -> Iterator[Batch]:
    """Push a whole window's records in `take` order; skipped records stay holes."""
    data = [p for p in pieces if isinstance(p, Piece)]
    if not data:
        return rebatcher.feed_holes(len(take))
    arrays = {k: concat([p.arrays[k] for p in data]) for k in data[0].arrays}
    mask = None
    if len(data) != len(pieces):
        valid = np.concatenate([np.full(p.count, isinstance(p, Piece)) for p in pieces])
        row = np.cumsum(valid) - 1  # slot -> row in `arrays`
        mask = valid[take]
        take = row[take][mask]
    # The received reads are copied: let them go before the window is copied once more in
    # its order, so a window is held twice only for that copy, and once while delivered.
    data.clear()
    pieces.clear()
    return rebatcher.feed({k: v[take] for k, v in arrays.items()}, mask)

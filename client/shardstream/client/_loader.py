"""The Loader: one rank's view of a dataset served by a fleet of workers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import sys
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Unpack

from shardstream._common.malloc import tune_malloc
from shardstream.client._fetch import FetchCounters
from shardstream.client._ledger import LedgerWriter
from shardstream.client._options import (
    EpochStatistics,
    LoaderConfig,
    LoaderOptions,
    LoaderStatistics,
    WaitHistogram,
)
from shardstream.client._pipeline import EpochCounters, EpochIterator
from shardstream.client._planner import RankPlan
from shardstream.client._pool import WorkerPool
from shardstream.client._ragged import empty_batch, extra_names, format_batch
from shardstream.client._ranks import discover
from shardstream.client._resume import Interruption, resume_plan
from shardstream.client._state import LoaderState
from shardstream.client._tasks import TaskScope
from shardstream.client._wire import DatasetDesc
from shardstream.client.errors import ConfigError, StateMismatchError
from shardstream.v1.codec import (
    FieldSpec,
    chunk_limit,
    chunk_overhead,
    is_ragged,
    record_bytes,
)

log = logging.getLogger("shardstream.client")

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class _Live:
    iterator: EpochIterator
    history: tuple[Interruption, ...]  # of its plan (a resumed epoch's interruptions)


class Loader:
    """Streams one rank's batches of a dataset from a fleet of workers.

        async with Loader(["w1:50051", "w2:50051"], dataset="train", batch_size=64,
                          rank=r, world_size=n, seed=7, shuffle=True) as loader:
            for epoch in range(3):
                async for batch in loader.epoch(epoch):
                    ...  # dict[str, numpy.ndarray], first dimension = batch

    Batches may be read-only views of received messages; copy what you modify. Ragged
    fields (variable length, strings, bytes) come padded or flat, as the `ragged`
    option says (see `_ragged`).
    """

    def __init__(
        self,
        addresses: Sequence[str] | str,
        *,
        state: Mapping[str, Any] | None = None,
        override_state_checks: bool = False,
        **options: Unpack[LoaderOptions],
    ) -> None:
        if isinstance(addresses, str):
            addresses = [a for a in addresses.split(",") if a]
        if not addresses:
            raise ConfigError("at least one worker address is needed")
        if len(set(addresses)) != len(addresses):
            raise ConfigError(f"worker addresses must be distinct, got {list(addresses)}")
        values: dict[str, Any] = dict(options)
        known = {f.name for f in fields(LoaderConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown loader option(s) {unknown}; known: {sorted(known)}")
        # Rank and world size not given are discovered now, to check the options, and
        # again when the loader starts (a loader made before the process group starts,
        # at a script's top level say, opens inside the training loop) and at every
        # epoch (opened too soon, it must not deliver another rank's part).
        self._discovered = tuple(k for k in ("rank", "world_size") if values.get(k) is None)
        if self._discovered:
            self._discover(values, strict=False)
        self.config = LoaderConfig(**values)
        self.addresses = tuple(addresses)
        self._pool: WorkerPool | None = None
        self._desc: DatasetDesc | None = None
        self._tasks = TaskScope("loader")  # epochs' pipelines, and epochs being stopped
        # The current epoch and its plan's history, replaced as one: a wrapper's thread
        # reading the position never pairs an epoch with another's history.
        self._live: _Live | None = None
        self._fetch_counters = FetchCounters()
        self._past = EpochCounters()  # epochs before the current one
        # each epoch's last iterator while it is the loader's current one, then only what
        # `statistics()` reports of it (an iterator holds its plan and ledger: epochs after
        # epochs would keep them all)
        self._by_epoch: dict[int, EpochIterator | _Ended] = {}
        self._epochs_completed = 0
        self._started_at = 0.0
        self._state = "new"
        self._resume: LoaderState | None = None  # applies to the epoch it names
        self._pending_state = state
        self._override = override_state_checks
        self._check_sizes = True  # warn if ragged records are far larger than the plan guessed
        # Where it was started: its tasks and connections belong to that loop and process.
        self._home: tuple[asyncio.AbstractEventLoop, int] | None = None
        self._iterators: weakref.WeakSet[EpochIterator] = weakref.WeakSet()
        self._dropped: weakref.finalize[Any, Loader] | None = None
        self._closers: list[Callable[[], None]] = []  # `on_close`

    def _discover(self, values: dict[str, Any], *, strict: bool) -> str:
        """Fill in the discovered rank and world size; where they came from."""
        try:
            rank, world_size, source = discover(strict=strict)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        found = {"rank": rank, "world_size": world_size}
        values.update({k: found[k] for k in self._discovered})
        return source

    def _rediscover(self, when: str) -> None:
        """Discover the rank and world size again (strictly); at start, take them; later,
        a change is an error: this loader's plan is another rank's."""
        if not self._discovered:
            return
        values = {k: getattr(self.config, k) for k in ("rank", "world_size")}
        source = self._discover(values, strict=True)
        if when == "start":
            self.config = replace(self.config, **values)  # checked again
            log.info("rank %d of %d (from %s)", values["rank"], values["world_size"], source)
        elif (values["rank"], values["world_size"]) != (self.config.rank, self.config.world_size):
            raise ConfigError(
                f"this loader opened as rank {self.config.rank} of {self.config.world_size} "
                f"(discovered), but {source} now says rank {values['rank']} of "
                f"{values['world_size']}: it would deliver another rank's records. Open it "
                "after the process group is initialised (e.g. not len() or state_dict() at "
                "the script's top level), or pass rank= and world_size="
            )

    # lifecycle -------------------------------------------------------------

    def __reduce__(self) -> Any:
        raise TypeError(
            "a Loader cannot be pickled: it holds connections and tasks of this process. "
            "Pass the addresses and options to the other process and open one there"
        )

    async def start(self) -> None:
        """Connect and check that the workers agree on the dataset."""
        if self._state != "new":
            raise RuntimeError(f"Loader.start() on a loader that is {self._state}")
        self._state = "starting"
        try:
            self._rediscover("start")
        except BaseException:
            self._state = "closed"
            raise
        loop, pid = self._home = asyncio.get_running_loop(), os.getpid()
        cfg = self.config
        if cfg.tune_malloc:
            tune_malloc()  # once per process is enough; repeating it is harmless
        self._pool = WorkerPool(self.addresses, cfg.pool_options())
        # Dropped without aclose(): its loop closes its tasks and connections (which
        # reference none of it: the loader itself is what becomes garbage).
        self._dropped = weakref.finalize(
            self, _close_dropped, loop, pid, self._tasks, self._pool, self._iterators
        )
        self._dropped.atexit = False
        try:
            await self._tasks.__aenter__()
            self._desc = await self._pool.start()
            if self._pending_state is not None:
                self.load_state_dict(self._pending_state, override=self._override)
            self.plan(0)  # refuse impossible options now, not at the first epoch
            self._chunk_limit()  # and records that no message of ours can hold
            self._check_ragged_names()
        except BaseException:
            await self.aclose()
            raise
        self._state = "open"
        self._started_at = time.monotonic()

    @property
    def closed(self) -> bool:
        """Whether `aclose()` ran (also after a failed start): a loader opens once."""
        return self._state == "closed"

    def on_close(self, close: Callable[[], None]) -> None:
        """Call `close` when the loader closes (what serves its figures, say)."""
        self._closers.append(close)

    async def aclose(self) -> None:
        """Cancel running reads and close connections (idempotent)."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._dropped is not None:
            self._dropped.detach()
        closers, self._closers = self._closers, []
        for close in closers:
            close()
        try:
            if self._current is not None:
                old = self._current.plan.epoch
                self._current.abandon(f"the loader was closed during epoch {old}")
            await self._tasks.aclose()
        finally:
            if self._pool is not None:
                await _close_pool(self._pool)

    def _check_home(self) -> None:
        if self._home is not None:
            _check_home(*self._home)

    async def __aenter__(self) -> Loader:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # data ------------------------------------------------------------------

    @property
    def dataset(self) -> DatasetDesc:
        if self._desc is None:
            if self._state == "closed":
                raise RuntimeError(
                    "the loader closed before it had started (its start failed or was "
                    "interrupted), so it knows no dataset: create a new one"
                )
            raise RuntimeError(
                "the loader is not started: `async with Loader(...)`, or `with "
                "SyncLoader(...)` (or its open())"
            )
        return self._desc

    @property
    def schema(self) -> tuple[FieldSpec, ...]:
        return self.dataset.schema

    def plan(self, epoch: int, *, whole: bool = False) -> RankPlan:
        """This rank's plan for an epoch (pure; no I/O); the rest of it after a restored
        state, unless `whole`."""
        desc = self.dataset
        cfg = self.config
        per_record = desc.sizing_bytes
        read_records = max(1, cfg.read_bytes // per_record)
        if read_records >= cfg.batch_size:  # reads aligned to batches: zero-copy batches
            read_records -= read_records % cfg.batch_size
        history = () if whole else self._history(epoch)
        try:
            return resume_plan(
                [s.records for s in desc.shards],
                epoch=epoch,
                rank=cfg.rank,
                world_size=cfg.world_size,
                options=cfg.plan_options(desc.record_bytes),
                read_records=read_records,
                history=history,
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def _history(self, epoch: int) -> tuple[Interruption, ...]:
        if self._resume is None or self._resume.epoch != epoch:
            return ()
        return self._resume.interruptions()

    # state -----------------------------------------------------------------

    @property
    def start_epoch(self) -> int:
        """The epoch to continue with: 0, or the one a restored state points at."""
        return 0 if self._resume is None else self._resume.epoch

    @property
    def _current(self) -> EpochIterator | None:
        live = self._live
        return None if live is None else live.iterator

    def state_dict(self) -> dict[str, Any]:
        """This rank's position: restoring it (also with another world size, when every rank
        saved at the same step) yields exactly the rest of the epoch. Before the loader
        has started (or after a start that failed), a state it was given is its position."""
        if self._desc is None and self._pending_state is not None:
            return dict(self._pending_state)
        live = self._live
        if live is None:
            return self._state_of(None, 0, completed=False)
        it = live.iterator
        return self._state_of(live, it.counters.batches, completed=it.completed)

    def state_at(
        self, iterator: EpochIterator | None, batches: int, *, completed: bool
    ) -> dict[str, Any]:
        """The state after the consumer received `batches` batches of `iterator` (the
        current epoch), or its end (`completed`): for wrappers that hand batches on, such
        as `SyncLoader`, whose caller may be behind what the iterator has produced."""
        live = self._live
        if iterator is None:
            return self._state_of(None, 0, completed=False)
        if live is None or iterator is not live.iterator:
            raise RuntimeError("state_at() of an epoch that is no longer the loader's current")
        return self._state_of(live, batches, completed=completed)

    def _state_at_or_current(
        self, iterator: EpochIterator, batches: int, *, completed: bool
    ) -> dict[str, Any]:
        """`state_at`, or `state_dict` once another epoch has started (from a wrapper's
        thread, which learns of the new epoch after the loader's thread started it)."""
        live = self._live
        if live is not None and iterator is live.iterator:
            return self._state_of(live, batches, completed=completed)
        return self.state_dict()

    def _state_of(self, live: _Live | None, batches: int, *, completed: bool) -> dict[str, Any]:
        cfg = self.config
        epoch = 0
        history: tuple[Interruption, ...] = ()
        resume = self._resume
        if live is not None:
            epoch, history = live.iterator.plan.epoch, live.history
            if completed or batches >= live.iterator.plan.batches:  # every batch received
                epoch, batches, history = epoch + 1, 0, ()
        elif resume is not None:
            epoch, history = resume.epoch, resume.interruptions()
        options = cfg.plan_dict(self.dataset.record_bytes)
        return LoaderState(
            dataset=cfg.dataset,
            fingerprint=self.dataset.fingerprint,
            epoch=epoch,
            batches=batches,
            world_size=cfg.world_size,
            rank=cfg.rank,
            history=history,
            options=options,
        ).to_dict()

    def load_state_dict(self, state: Mapping[str, Any], *, override: bool = False) -> None:
        """Continue from a saved position: `epoch(state["epoch"])` yields the rest of that
        epoch. Refuses a state of another dataset or plan options unless `override`."""
        loaded = LoaderState.from_dict(state)
        cfg = self.config
        diffs = loaded.check(
            dataset=cfg.dataset,
            fingerprint=self.dataset.fingerprint,
            options=cfg.plan_dict(self.dataset.record_bytes),
        )
        if diffs and not override:
            raise StateMismatchError(
                "the saved state does not fit this loader: "
                + "; ".join(diffs)
                + " (to continue from its epoch and step anyway: load_state_dict(state, "
                "override=True), or Loader(..., override_state_checks=True))"
            )
        if diffs:
            log.warning("restoring a state that differs: %s", "; ".join(diffs))
        previous, self._resume = self._resume, loaded
        try:
            self.plan(loaded.epoch)  # a state past its epoch's end: StateMismatchError now
        except BaseException:
            self._resume = previous
            raise
        self._supersede(
            "was superseded by load_state_dict(): an epoch can only be iterated until a "
            "state is loaded or the next epoch starts"
        )

    def _supersede(self, why: str, *, forget: bool = True) -> None:
        """End the current epoch, if any, for what comes next (a loaded state, or another
        epoch): its iterator raises RuntimeError; with `forget`, the position is no longer
        its (else it stays until the next epoch replaces it, in one assignment)."""
        live = self._live
        if forget:
            self._live = None
        if live is not None:
            live.iterator.abandon(f"epoch {live.iterator.plan.epoch} {why}")
            self._past.add(live.iterator.counters)
            self._epochs_completed += live.iterator.completed

    def batches_per_epoch(self) -> int:
        """Batches every rank gets in an epoch (the same on every rank), whole: after a
        restored state, the epoch it names has `state["batches"]` fewer left."""
        return self.plan(0, whole=True).batches

    def epoch(self, epoch: int) -> EpochIterator:
        """The batches of one epoch, as an async iterator. Starting an epoch stops
        the previous one if it is still running."""
        if self._state != "open":
            raise RuntimeError(f"Loader.epoch() on a loader that is {self._state}")
        assert self._pool is not None and self._home is not None
        self._check_home()
        self._rediscover("epoch")
        self._supersede(
            f"was superseded by loader.epoch({epoch}): an epoch can only be iterated until "
            "the next one starts",
            forget=False,
        )
        cfg = self.config
        plan = self.plan(epoch)
        history = self._history(epoch)
        per_record = self.dataset.sizing_bytes
        chunk = max(1, min(cfg.chunk_bytes // per_record, self._chunk_limit()))
        if is_ragged(self.schema):  # the worker cuts chunks from the records' actual bytes
            chunk = self._chunk_limit()
        if chunk >= cfg.batch_size:
            chunk -= chunk % cfg.batch_size
        ledger = None
        if cfg.ledger_dir is not None:
            ledger = LedgerWriter(Path(cfg.ledger_dir), self._ledger_header(plan), plan)
        iterator = EpochIterator(
            plan,
            self.dataset.shards,
            pool=self._pool,
            fetch_options=cfg.fetch_options(
                max_chunk_records=chunk,
                # on a lane, a chunk may be a whole read (ragged ones are cut by the worker)
                lane_chunk_records=0 if is_ragged(self.schema) else plan.read_records,
                schema=self.schema,
                journal=None if ledger is None else ledger.event,
                epoch=epoch,
                fingerprint=self.dataset.fingerprint,
            ),
            options=cfg.pipeline_options(),
            spawn=self._tasks.spawn,  # (nothing the epoch's tasks hold leads to the loader)
            guard=functools.partial(_check_home, *self._home),
            counters=self._fetch_counters,
            empty=empty_batch(self.schema),
            ledger=ledger,
            formatter=self._formatter(),
            sized_for=(per_record, cfg.read_bytes, bool(self.dataset.record_bytes))
            if self._check_sizes and is_ragged(self.schema)
            else (0, 0, False),
            # ragged records: reads start while their bytes fit (the memory bound)
            budget=(per_record, cfg.reads_ahead * cfg.read_bytes)
            if is_ragged(self.schema)
            else None,
        )
        self._check_sizes = False  # once per loader
        self._live = _Live(iterator, history)
        for e, it in self._by_epoch.items():
            if isinstance(it, EpochIterator):
                self._by_epoch[e] = _Ended(it.counters, it.completed)
        self._by_epoch[epoch] = iterator
        self._iterators.add(iterator)
        return iterator

    def _ledger_header(self, plan: RankPlan) -> dict[str, Any]:
        cfg = self.config
        return {
            "dataset": cfg.dataset,
            "fingerprint": self.dataset.fingerprint,
            "shard_ids": [s.id for s in self.dataset.shards],
            "shard_records": [s.records for s in self.dataset.shards],
            "options": cfg.plan_dict(self.dataset.record_bytes),
            "epoch": plan.epoch,
            "world_size": plan.world_size,
            "rank": plan.rank,
            "batches": plan.batches,
            "history": [[h.world_size, h.batches] for h in self._history(plan.epoch)],
        }

    def _chunk_limit(self) -> int:
        """Most records a message this loader accepts can hold; ConfigError if none."""
        longest = max((len(s.id.encode()) for s in self.dataset.shards), default=0)
        limit = chunk_limit(self.schema, longest, self.config.max_message_bytes)
        if limit < 1:
            need = record_bytes(self.schema) + chunk_overhead(self.schema, longest)
            raise ConfigError(
                f"a record of dataset {self.config.dataset!r} takes {record_bytes(self.schema)} "
                f"bytes, which with a chunk's headers is more than max_message_bytes="
                f"{self.config.max_message_bytes}: raise max_message_bytes to at least {need} "
                "(and the workers' --max-message-bytes too)"
            )
        return limit

    def _formatter(self) -> Callable[[dict[str, Any]], dict[str, Any]] | None:
        """How batches with ragged fields reach the consumer (None: no ragged field)."""
        if not is_ragged(self.schema):
            return None
        schema, mode, pad_to = self.schema, self.config.ragged, self.config.pad_to
        return lambda batch: format_batch(batch, schema, mode, pad_to)

    def _check_ragged_names(self) -> None:
        """Refuse a schema whose fields clash with the arrays ragged fields add."""
        names = {f.name for f in self.schema}
        for added, field in extra_names(self.schema, self.config.ragged).items():
            if added in names:
                raise ConfigError(
                    f"dataset {self.config.dataset!r} has a field {added!r}, the name the "
                    f"ragged field {field!r} adds with ragged={self.config.ragged!r}: rename "
                    "one of them on the workers, or use the other ragged mode"
                )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a background task of this loader (in its TaskScope)."""
        return self._tasks.spawn(coro)

    def statistics(self) -> LoaderStatistics:
        total = EpochCounters()
        total.add(self._past)
        completed = self._epochs_completed
        if self._current is not None:
            total.add(self._current.counters)
            completed += self._current.completed
        fc = self._fetch_counters
        conns = self._pool.conns if self._pool is not None else []
        return LoaderStatistics(
            epochs_completed=completed,
            batches=total.batches,
            records=total.records,
            bytes=total.bytes,
            wait_seconds=total.wait_seconds,
            resumes=fc.resumes,
            resumes_by_worker=dict(fc.retries_by_worker or {}),
            max_reorder_depth=total.max_reorder_depth,
            records_skipped=fc.skipped,
            stragglers=fc.stragglers,
            reads_in_flight={c.address: c.outstanding for c in conns},
            seconds=time.monotonic() - self._started_at if self._started_at else 0.0,
            reads_by_worker={c.address: c.assigned for c in conns},
            lane_bytes_by_worker={c.address: c.lane.bytes for c in conns if c.lane is not None},
            epochs={
                e: EpochStatistics(
                    batches=it.counters.batches,
                    records=it.counters.records,
                    bytes=it.counters.bytes,
                    wait_seconds=it.counters.wait_seconds,
                    seconds=it.counters.seconds,
                    completed=it.completed,
                )
                for e, it in sorted(self._by_epoch.items())
            },
            data_wait=WaitHistogram(
                counts=tuple(total.wait_counts), seconds=total.batch_wait_seconds
            ),
        )


@dataclass(frozen=True, slots=True)
class _Ended:
    """What `statistics()` tells of an epoch that is no longer the loader's current one."""

    counters: EpochCounters
    completed: bool


def _check_home(loop: asyncio.AbstractEventLoop, pid: int) -> None:
    """RuntimeError unless called in process `pid` and, if on an event loop, on `loop`:
    where a loader started, its connections and tasks are (elsewhere its epochs hang)."""
    if os.getpid() != pid:
        raise RuntimeError(
            f"this Loader was started in process {pid}; a forked child ({os.getpid()}) "
            "cannot use it, as its connections and tasks stay in the parent (nor open "
            "another: grpc.aio does not survive a fork). Start such processes with the "
            "spawn method, and open a loader there"
        )
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:  # a plain call (`epoch()`); iterating it is checked on the loop
        return
    if running is not loop:
        raise RuntimeError(
            "this Loader was started on another event loop, where its connections and "
            "tasks run: use it on that loop only (one asyncio.run() around every epoch), "
            "or use a SyncLoader, which runs its own loop in a thread"
        )


async def _close_pool(pool: WorkerPool) -> None:
    """Close a loader's connections and lanes."""
    try:
        await pool.aclose()
    finally:
        for conn in pool.conns:
            conn.release()
        # Unmap the closed lanes that chunks still view only from the cancelled reads'
        # frames (reference cycles): a worker counts a lane's memory against its budget
        # for as long as a client maps it, which would otherwise last until a collection
        # ran. Batches the caller still holds keep theirs mapped.
        lanes = [c.lane for c in pool.conns if c.lane is not None and c.lane.mapped]
        if lanes:
            gc.collect()
            for lane in lanes:
                lane.close()


_closing: set[asyncio.Task[None]] = set()  # dropped loaders being closed (tasks held)


def _close_dropped(
    loop: asyncio.AbstractEventLoop,
    pid: int,
    tasks: TaskScope,
    pool: WorkerPool,
    iterators: weakref.WeakSet[EpochIterator],
) -> None:
    """A Loader that became garbage while open: its loop ends its epochs (an iterator the
    caller still holds raises RuntimeError), tasks and connections, which otherwise ran
    for as long as the loop did. Nothing waits here: a finalizer runs on whichever
    thread collects."""
    if os.getpid() != pid or loop.is_closed() or sys.is_finalizing():
        return
    log.warning(
        "a Loader was garbage-collected while open: closing its reads and connections; "
        "close loaders with `async with Loader(...)` or `await loader.aclose()`"
    )

    async def shut() -> None:
        for iterator in list(iterators):
            iterator.abandon(
                "its Loader was garbage-collected while open: keep a reference to the "
                "loader for as long as its epochs are iterated"
            )
        try:
            await tasks.aclose()
        finally:
            await _close_pool(pool)

    def start() -> None:
        task = loop.create_task(shut())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
        loop.call_soon_threadsafe(start)

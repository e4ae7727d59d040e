"""Connections to the workers: health, agreement, least-outstanding choice, backoff.

Each worker has a channel and a task that watches its health service. A
worker gets new reads only while its last health report was SERVING, it is not
in backoff after a failure, and it described the dataset as the others do.
A worker that drains (NOT_SERVING) or dies is left alone; when it is back
(SERVING again, e.g. restarted on the same port) it is described again before
it gets reads, so a worker restarted with other data is never used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc

from shardstream.client._resolve import DNS_PREFIX, resolve_all
from shardstream.client._security import ClientSecurity, call_metadata, secure_channel
from shardstream.client._wire import (
    RETRYABLE,
    DatasetDesc,
    HealthWatch,
    WorkerStub,
    worker_error,
)
from shardstream.client.errors import DatasetMismatchError, WorkersUnavailableError

log = logging.getLogger("shardstream.client")


@dataclass(eq=False)
class Conn:
    """One worker address and what the client knows of it."""

    address: str
    channel: grpc.aio.Channel
    stub: WorkerStub
    health: HealthWatch
    serving: bool = True  # last health report (assumed until the first one)
    watch_call: grpc.aio.UnaryStreamCall | None = None
    rewatch: bool = False  # the watch call was cancelled to ask again
    outstanding: int = 0  # reads running on it
    failures: int = 0  # consecutive failures, for backoff
    down_until: float = 0.0  # loop time before which it gets no reads
    last_error: str = ""
    verified: bool = False  # it described the dataset as the others do
    excluded: str = ""  # why it never gets reads (it disagrees on the dataset)
    assigned: int = field(default=0)  # reads ever given, for tie-breaking
    # Further connections for reads (`connections_per_worker` > 1): reads take `stub` and
    # these in turn, so their messages arrive on several TCP connections at once.
    extra: list[tuple[grpc.aio.Channel, WorkerStub]] = field(default_factory=list)

    def read_stub(self) -> WorkerStub:
        """The stub of the connection the next read goes on (round robin)."""
        if not self.extra:
            return self.stub
        turn = self.assigned % (len(self.extra) + 1)
        return self.stub if turn == 0 else self.extra[turn - 1][1]

    def channels(self) -> list[grpc.aio.Channel]:
        return [self.channel, *(c for c, _ in self.extra)]


def describe_difference(a: DatasetDesc, b: DatasetDesc) -> str:
    """What differs between two descriptions, in a few words."""
    if a.schema != b.schema:
        return f"schema [{', '.join(map(str, a.schema))}] vs [{', '.join(map(str, b.schema))}]"
    ids_a, ids_b = [s.id for s in a.shards], [s.id for s in b.shards]
    if ids_a != ids_b:
        only_a = sorted(set(ids_a) - set(ids_b))[:3]
        only_b = sorted(set(ids_b) - set(ids_a))[:3]
        return (
            f"{len(ids_a)} vs {len(ids_b)} shards "
            f"(only in the first: {only_a}, only in the second: {only_b})"
        )
    for sa, sb in zip(a.shards, b.shards, strict=True):
        if sa.records != sb.records:
            return f"shard {sa.id!r} has {sa.records} vs {sb.records} records"
        if sa.fingerprint != sb.fingerprint:
            return f"shard {sa.id!r} has fingerprint {sa.fingerprint} vs {sb.fingerprint}"
    return f"fingerprint {a.fingerprint} vs {b.fingerprint}"


_START_GRACE = 2.0  # seconds other workers get to answer once one has


class _NotYet(Exception):
    """A worker that had not answered when the start went on without it."""


def _outcome(task: asyncio.Future[DatasetDesc]) -> DatasetDesc | BaseException:
    if not task.done() or task.cancelled():
        return _NotYet()
    return task.exception() or task.result()


class WorkerPool:
    """Chooses a worker for each read: healthy, agreeing, least outstanding."""

    def __init__(
        self,
        targets: Sequence[str],
        *,
        dataset: str,
        channel_options: Sequence[tuple[str, int | str]],
        backoff_base: float,
        backoff_cap: float,
        describe_timeout: float,
        security: ClientSecurity | None = None,
        resolve_interval: float = 30.0,
        reads_per_worker: int = 4,
        connections_per_worker: int = 1,
    ) -> None:
        self.dataset = dataset
        self._reads_per_worker = reads_per_worker
        self._connections = connections_per_worker
        self.targets = tuple(targets)
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._describe_timeout = describe_timeout
        self._resolve_interval = resolve_interval
        self._channel_options = tuple(channel_options)
        self._security = security
        self._metadata = call_metadata(security)  # reads a token file once
        self.conns: list[Conn] = []
        self.desc: DatasetDesc | None = None
        self._rng = random.Random()
        self._changed = asyncio.Event()  # a worker became available
        self._watchers: list[asyncio.Task[None]] = []

    def _add(self, address: str) -> Conn:
        channel = secure_channel(address, self._channel_options, self._security)
        conn = Conn(address, channel, WorkerStub(channel, self._metadata), HealthWatch(channel))
        for _ in range(self._connections - 1):  # each channel its own TCP connection
            extra = secure_channel(address, self._channel_options, self._security)
            conn.extra.append((extra, WorkerStub(extra, self._metadata)))
        self.conns.append(conn)
        return conn

    async def start(self) -> DatasetDesc:
        """Describe the dataset on every worker; refuse if those that answer disagree."""
        addresses, unresolved = await resolve_all(self.targets)
        if not addresses:
            raise WorkersUnavailableError("no worker address could be resolved", unresolved)
        for address in addresses:
            self._add(address)
        results = await self._describe_all()
        answered: list[tuple[Conn, DatasetDesc]] = []
        failed: dict[str, str] = {}
        for conn, res in zip(self.conns, results, strict=True):
            if isinstance(res, _NotYet):
                failed[conn.address] = conn.last_error or "did not answer in time"
                continue
            if isinstance(res, grpc.aio.AioRpcError) and res.code() not in RETRYABLE:
                raise worker_error(res, worker=conn.address, dataset=self.dataset)
            if isinstance(res, grpc.aio.AioRpcError):
                failed[conn.address] = f"{res.code().name}: {res.details()}"
                conn.last_error = failed[conn.address]
            elif isinstance(res, BaseException):
                raise res
            else:
                answered.append((conn, res))
        if not answered:
            raise WorkersUnavailableError(
                f"no worker described dataset {self.dataset!r} within {self._describe_timeout}s",
                {**unresolved, **failed},
            )
        ref_conn, ref = answered[0]
        for conn, desc in answered[1:]:
            if desc.fingerprint != ref.fingerprint or desc.shards != ref.shards:
                raise DatasetMismatchError(
                    f"workers disagree on dataset {self.dataset!r}: {ref_conn.address} and "
                    f"{conn.address} differ: {describe_difference(ref, desc)}"
                )
        for conn, _ in answered:
            conn.verified = True
        for conn in self.conns:
            conn.serving = conn.verified
        for address, err in failed.items():
            log.warning("worker %s did not answer at start (%s); will try it later", address, err)
        self.desc = ref
        loop = asyncio.get_running_loop()
        self._watchers = [loop.create_task(self._watch(c)) for c in self.conns]
        if any(t.startswith(DNS_PREFIX) for t in self.targets):
            self._watchers.append(loop.create_task(self._re_resolve()))
        return ref

    async def _describe_all(self) -> list[DatasetDesc | BaseException]:
        """Every worker's description; once one has answered, the others get a short
        grace (a down replica must not hold up the start; it is checked when it is back)."""
        tasks = [asyncio.ensure_future(self._describe_patiently(c)) for c in self.conns]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            while pending and not any(t.exception() is None for t in done):
                more, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                done |= more
            if pending:
                await asyncio.wait(pending, timeout=_START_GRACE)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return [_outcome(t) for t in tasks]

    async def _re_resolve(self) -> None:
        """Add workers that a dns: name resolves to since the start."""
        while True:
            await asyncio.sleep(self._resolve_interval)
            addresses, errors = await resolve_all(self.targets)
            for target, error in errors.items():
                log.warning("%s: %s", target, error)
            known = {c.address for c in self.conns}
            for address in addresses:
                if address not in known:
                    log.info("worker %s joined; checking it before it gets reads", address)
                    conn = self._add(address)
                    conn.serving = False
                    self._watchers.append(asyncio.get_running_loop().create_task(self._watch(conn)))

    async def _describe_patiently(self, conn: Conn) -> DatasetDesc:
        """Describe the dataset, retrying transient failures until `describe_timeout`; the
        last failure keeps its reason (e.g. a TLS handshake error), which waiting for the
        channel to be ready would hide behind DEADLINE_EXCEEDED."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._describe_timeout
        delay = self._backoff_base
        while True:
            remaining = deadline - loop.time()
            try:
                return await conn.stub.describe(
                    self.dataset, timeout=max(0.1, remaining), wait_for_ready=False
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or loop.time() + delay >= deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._backoff_cap)

    async def _watch(self, conn: Conn) -> None:
        """Keep `conn.serving` current from the worker's health service."""
        while True:
            call = conn.watch_call = conn.health.watch()
            try:
                async for reply in call:
                    serving = conn.health.is_serving(reply)
                    if serving and not conn.serving:
                        log.info("worker %s is serving", conn.address)
                        self._changed.set()
                    elif not serving and conn.serving:
                        log.info("worker %s is not serving; no new reads", conn.address)
                    conn.serving = serving
                conn.last_error = "health watch ended"
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not conn.rewatch or (task is not None and task.cancelling()):
                    raise
            except grpc.aio.AioRpcError as exc:
                conn.last_error = f"{exc.code().name}: {exc.details()}"
            finally:
                call.cancel()
            conn.serving = False
            if not conn.rewatch:  # the worker went away: describe it again when back
                conn.verified = False
                await asyncio.sleep(self._backoff_base)
            conn.rewatch = False

    def suspect(self, conn: Conn) -> None:
        """No reads for `conn` until its health service answers SERVING again."""
        conn.serving = False
        conn.rewatch = True
        if conn.watch_call is not None:
            conn.watch_call.cancel()

    async def _verify(self, conn: Conn) -> bool:
        assert self.desc is not None
        try:
            desc = await conn.stub.describe(
                self.dataset, timeout=self._describe_timeout, wait_for_ready=False
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in RETRYABLE:
                conn.excluded = f"{exc.code().name}: {exc.details()}"
                log.error("worker %s cannot serve dataset %r: %s", conn.address, self.dataset,
                          conn.excluded)  # fmt: skip
            else:
                self.mark_down(conn, f"{exc.code().name}: {exc.details()}")
            return False
        if desc.fingerprint != self.desc.fingerprint or desc.shards != self.desc.shards:
            conn.excluded = describe_difference(self.desc, desc)
            log.error(
                "worker %s serves a different dataset %r (%s); it gets no reads",
                conn.address,
                self.dataset,
                conn.excluded,
            )
            return False
        conn.verified = True
        return True

    async def acquire(
        self,
        deadline: float,
        attempts: dict[str, str],
        *,
        share: Callable[[], int] | None = None,
    ) -> Conn:
        """The best worker for a read; waits out backoff until `deadline` (loop time).

        `share`: only a worker running fewer than `min(share(), reads_per_worker)` reads
        will do; while every usable worker runs its share, wait (without a deadline: that
        is no failure) for a read to end. New reads start this way, one at a time and in
        plan order; a read resuming elsewhere takes the least busy worker at once."""
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            usable = [c for c in self.conns if not c.excluded and c.serving and c.down_until <= now]
            ready = usable
            if share is not None:
                limit = min(share(), self._reads_per_worker)
                ready = [c for c in usable if c.outstanding < limit]
            if usable and not ready:
                # Every usable worker runs its share of reads: wait for one to end (a stuck
                # read ends by its own idle timeout).
                self._changed.clear()
                await self._changed.wait()
                continue
            if ready:
                conn = min(ready, key=lambda c: (c.outstanding, c.assigned))
                if not conn.verified and not await self._verify(conn):
                    attempts[conn.address] = conn.excluded or conn.last_error
                    continue
                conn.outstanding += 1
                conn.assigned += 1
                return conn
            if now >= deadline or all(c.excluded for c in self.conns):
                for c in self.conns:
                    attempts.setdefault(c.address, c.excluded or c.last_error or "not serving")
                raise WorkersUnavailableError(
                    f"no worker could serve dataset {self.dataset!r} before the retry deadline",
                    attempts,
                )
            backoffs = [c.down_until for c in self.conns if c.serving and not c.excluded]
            wake = min([*backoffs, deadline])
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), max(0.0, wake - now))

    def in_flight(self) -> dict[str, int]:
        return {c.address: c.outstanding for c in self.conns}

    def release(self, conn: Conn) -> None:
        conn.outstanding -= 1
        self._changed.set()  # a read slot on this worker is free

    def mark_ok(self, conn: Conn) -> None:
        conn.failures = 0

    def mark_down(self, conn: Conn, error: str, *, delay: float | None = None) -> None:
        """Give a worker no new reads for a while (capped exponential backoff, jittered)."""
        conn.failures += 1
        conn.last_error = error
        if delay is None:
            delay = min(self._backoff_cap, self._backoff_base * 2 ** (conn.failures - 1))
            delay *= 0.5 + self._rng.random() / 2
        conn.down_until = asyncio.get_running_loop().time() + delay
        log.info("worker %s: %s; no new reads for %.2fs", conn.address, error, delay)

    async def aclose(self) -> None:
        for task in self._watchers:
            task.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        await asyncio.gather(*(ch.close() for c in self.conns for ch in c.channels()))

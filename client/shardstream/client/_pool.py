"""The workers of one loader, and which of them gets the next read.

    pool = WorkerPool(targets, options)
    desc = await pool.start()           # connect, agree on the dataset, start watching
    async with pool.lease(deadline, attempts) as conn:
        ...                             # one stream on `conn`; the slot is freed on exit
    await pool.aclose()

The jobs around it live in their own modules: what the client knows of a
worker (`_workers`), start-up agreement and re-verification (`_agreement`),
health watching (`_health`), DNS re-resolution (`_resolve`). The pool owns
their background tasks (a `TaskScope`) and chooses: a worker gets a read
while its last health report was SERVING, it is not in backoff after a
failure, and it described the dataset as the others do; among those, the
least busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from shardstream.client._agreement import Describing, agree, verify
from shardstream.client._health import suspect, watch_health
from shardstream.client._lanes import ClientLane, NetworkLane, open_lane, open_network_lane
from shardstream.client._resolve import DNS_PREFIX, follow_names, resolve_all, split_host_port
from shardstream.client._security import CallMetadata, ClientSecurity, secure_channel
from shardstream.client._tasks import TaskScope
from shardstream.client._wire import DatasetDesc, HealthWatch, WorkerStub
from shardstream.client._workers import Conn
from shardstream.client.errors import ConfigError, WorkerError, WorkersUnavailableError

log = logging.getLogger("shardstream.client")

RETIRE_AFTER = 2  # complete resolutions in a row without a worker's address: it is gone

__all__ = ["Conn", "PoolOptions", "WorkerPool"]

# Seconds a loader's start waits for its lanes: a network lane whose port a firewall drops
# opens (or fails) in the background after that, its reads on the gRPC stream meanwhile.
LANE_START_WAIT = 1.0


@dataclass(frozen=True, kw_only=True, slots=True)
class PoolOptions:
    """What the pool needs of the loader's options (`LoaderConfig.pool_options()`)."""

    dataset: str
    channel_options: tuple[tuple[str, int | str], ...]
    backoff_base: float
    backoff_cap: float
    describe_timeout: float
    security: ClientSecurity | None = None
    resolve_interval: float = 30.0
    reads_per_worker: int = 4
    connections_per_worker: int = 1
    same_host_lane: bool = True
    lane_slots: int = 0  # chunks the loader may hold at once: the slots its lanes ask for
    lane_slot_bytes: int = 0  # its largest chunk, a whole read: what a slot should hold
    # A worker on another host fills slots of this process's memory over a plain TCP
    # connection (`_lanes.NetworkLane`), where it offers one; never with TLS.
    network_lane: bool = True
    network_lane_slots: int = 0  # whole reads the loader may hold at once (its memory)
    max_message_bytes: int = 0  # a network lane's slots may be this large, or lane_slot_bytes


class WorkerPool:
    """Chooses a worker for each read: healthy, agreeing, least outstanding."""

    def __init__(self, targets: Sequence[str], options: PoolOptions) -> None:
        self.targets = tuple(targets)
        self.options = options
        self.dataset = options.dataset
        self._describing = Describing(
            dataset=options.dataset,
            timeout=options.describe_timeout,
            backoff_base=options.backoff_base,
            backoff_cap=options.backoff_cap,
        )
        self._metadata = CallMetadata(options.security)  # a token file, followed
        self.conns: list[Conn] = []
        self.desc: DatasetDesc | None = None
        self._rng = random.Random()
        self._changed = asyncio.Event()  # a worker became available, or a slot free
        # the last worker's that broke the contract, or whose data differs from the plan's
        self.violation: WorkerError | None = None
        self._scope = TaskScope("worker pool")
        self._watches: dict[str, asyncio.Task[None]] = {}  # each worker's health watch
        # Workers whose address the last `n` complete resolutions of the names lacked.
        self._absent: dict[str, int] = {}

    # lifecycle -------------------------------------------------------------

    async def start(self) -> DatasetDesc:
        """Describe the dataset on every worker; refuse if those that answer disagree."""
        await self._scope.__aenter__()
        addresses, unresolved = await self._resolve_first()
        if not addresses:
            raise WorkersUnavailableError(
                f"no worker address could be resolved within {self.options.describe_timeout}s",
                unresolved,
            )
        for address in addresses:
            self._add(address)
        self.desc = await agree(self.conns, self._describing, unresolved)
        for conn in self.conns:
            conn.serving = conn.verified
            self._watches[conn.address] = self._scope.spawn(self._watch(conn))
        if self._lanes_wanted():  # quick either way (a socket, or none), but for a firewall
            opening = [self._scope.spawn(self._open_lane(c)) for c in self.conns if c.verified]
            if opening:  # that drops a network lane's connect: it goes on in the background
                await asyncio.wait(opening, timeout=LANE_START_WAIT)
        if any(t.startswith(DNS_PREFIX) for t in self.targets):
            interval = self.options.resolve_interval
            self._scope.spawn(follow_names(self.targets, interval, self._resolved))
        return self.desc

    async def _resolve_first(self) -> tuple[list[str], dict[str, str]]:
        """The targets' addresses. While none resolves (a headless service before its
        first pod is ready has no address: NXDOMAIN), resolve again with backoff, until
        `describe_timeout`, as for workers that refuse connections."""
        for target in self.targets:
            if target.startswith(DNS_PREFIX):
                try:
                    split_host_port(target)
                except ValueError as exc:
                    raise ConfigError(str(exc)) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.describe_timeout
        delay, warned = self.options.backoff_base, False
        while True:
            addresses, unresolved = await resolve_all(self.targets)
            left = deadline - loop.time()
            if addresses or left <= 0:
                return addresses, unresolved
            if not warned:
                warned = True
                log.warning(
                    "no worker address resolves yet (%s); resolving again for up to %.3g s",
                    "; ".join(f"{t}: {e}" for t, e in unresolved.items()),
                    left,
                )
            await asyncio.sleep(min(delay, left))
            delay = min(2 * delay, max(self.options.backoff_cap, self.options.backoff_base))

    async def aclose(self) -> None:
        """Stop watching and close every channel and lane (idempotent)."""
        try:
            await self._scope.aclose()
        finally:
            self._watches.clear()  # ended tasks: their tracebacks hold calls and channels
            for conn in self.conns:
                if conn.lane is not None:
                    conn.lane.close()
            channels = [ch for c in self.conns for ch in c.channels()]
            await asyncio.gather(*(ch.close() for ch in channels))

    async def __aenter__(self) -> WorkerPool:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _add(self, address: str) -> Conn:
        opts = self.options
        channel = secure_channel(address, opts.channel_options, opts.security)
        conn = Conn(
            address,
            channel,
            WorkerStub(channel, self._metadata),
            HealthWatch(channel, self._metadata),  # the token: never refused a watch
        )
        for _ in range(opts.connections_per_worker - 1):  # each channel its own connection
            extra = secure_channel(address, opts.channel_options, opts.security)
            conn.extra.append((extra, WorkerStub(extra, self._metadata)))
        self.conns.append(conn)
        return conn

    def _resolved(self, addresses: list[str], complete: bool) -> None:
        """The names resolved again: workers new to them join; one whose address
        `RETIRE_AFTER` complete resolutions in a row lacked (a replaced pod, a scaled-down
        replica) is let go once it runs no read: its connections, health watch and lane
        would otherwise stay for the loader's life, one set per address ever seen."""
        for address in addresses:
            self._joined(address)
        if not complete:  # a name that did not resolve this time says nothing of its workers
            return
        found = set(addresses)
        for conn in list(self.conns):
            if conn.address in found:
                self._absent.pop(conn.address, None)
                continue
            absent = self._absent[conn.address] = self._absent.get(conn.address, 0) + 1
            if absent >= RETIRE_AFTER and conn.outstanding == 0:
                self._retire(conn)

    def _retire(self, conn: Conn) -> None:
        log.info("worker %s no longer resolves from its name: closing its connection", conn.address)
        self.conns.remove(conn)
        self._absent.pop(conn.address, None)
        watch = self._watches.pop(conn.address, None)
        if watch is not None:
            watch.cancel()
        if conn.lane is not None:
            conn.lane.close("its worker's address is gone")
        channels = conn.channels()
        conn.release()

        async def close() -> None:
            await asyncio.gather(*(ch.close() for ch in channels))

        self._scope.spawn(close())

    def _joined(self, address: str) -> None:
        """A worker that a dns: name resolves to since the start: checked before reads."""
        if any(c.address == address for c in self.conns):
            return
        log.info("worker %s joined; checking it before it gets reads", address)
        conn = self._add(address)
        conn.serving = False
        self._watches[address] = self._scope.spawn(self._watch(conn))
        if self._lanes_wanted():
            self._scope.spawn(self._open_lane(conn))

    def _network_lanes(self) -> bool:
        """Whether to ask for network lanes: wanted, and no TLS (their bytes are plain)."""
        security = self.options.security
        return self.options.network_lane and (security is None or not security.tls)

    def _lanes_wanted(self) -> bool:
        return self.options.same_host_lane or self._network_lanes()

    async def _open_lane(self, conn: Conn) -> None:
        """A same-host lane to `conn`'s worker, where it offers one on this host, else a
        network lane; its reads use it from then on (until then, and without one, chunks
        come as bytes)."""
        conn.lane_opening = True
        try:
            lane: ClientLane | NetworkLane | None = None
            if self.options.same_host_lane:
                lane = await open_lane(
                    conn.stub,
                    slots=self.options.lane_slots,
                    slot_bytes=self.options.lane_slot_bytes,
                )
            if lane is None and self._network_lanes():
                try:
                    host, _ = split_host_port(conn.address)
                except ValueError:  # not host:port (a unix: socket, say): no network lane
                    host = ""
                if host:
                    lane = await open_network_lane(
                        conn.stub,
                        host,
                        slots=self.options.network_lane_slots,
                        slot_bytes=self.options.lane_slot_bytes,
                        most_slot_bytes=max(
                            self.options.lane_slot_bytes, self.options.max_message_bytes
                        ),
                    )
        finally:
            conn.lane_opening = False
        if lane is not None and conn not in self.conns:  # let go meanwhile (`_retire`)
            lane.close("its worker's address is gone")
            return
        conn.lane = lane

    def lane_lost(self, conn: Conn) -> None:
        """`conn`'s lane ended (its worker restarted, say): ask for a new one."""
        if conn.lane is not None and not conn.lane.alive and not conn.lane_opening:
            conn.lane.close("it ended")  # (its memory goes with the last array viewing it)
            conn.lane = None
            self._scope.spawn(self._open_lane(conn))

    async def _watch(self, conn: Conn) -> None:
        def back() -> None:
            # Serving again after a drain: a new process (a draining one never serves
            # again), described again first; the drain's hold was for the old one. Other
            # backoffs stay: a worker that fails while its health says SERVING must not
            # be retried at once, again and again.
            if conn.drained:
                conn.drained = False
                conn.down_until = 0.0
            # A restarted worker: its lane (or the last try at one, made while it was
            # down) is gone with the old process; ask the new one.
            lost = conn.lane is None or not conn.lane.alive
            if lost and self._lanes_wanted() and not conn.lane_opening:
                if conn.lane is not None:
                    conn.lane.close("its worker restarted")
                conn.lane = None
                self._scope.spawn(self._open_lane(conn))
            self._changed.set()

        await watch_health(conn, on_serving=back, pause=self.options.backoff_base)

    # choosing ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def lease(
        self,
        deadline: float,
        attempts: dict[str, str],
        *,
        share: Callable[[], int] | None = None,
    ) -> AsyncIterator[Conn]:
        """The best worker for one stream, held until the block ends.

        Waits out backoff until `deadline` (loop time), then raises
        `WorkersUnavailableError` with `attempts` (address -> last error). `share`:
        only a worker running fewer than `min(share(), reads_per_worker)` reads will
        do; while every usable worker runs its share, wait (without a deadline: that is
        no failure) for a read to end. New reads start this way, in plan order; a read
        resuming elsewhere takes the least busy worker at once."""
        conn = await self._acquire(deadline, attempts, share)
        try:
            yield conn
        finally:
            conn.outstanding -= 1
            self._changed.set()  # a read slot on this worker is free

    async def _acquire(
        self, deadline: float, attempts: dict[str, str], share: Callable[[], int] | None
    ) -> Conn:
        loop = asyncio.get_running_loop()
        while True:
            self._scope.check()  # a failed watcher is a bug: say so
            now = loop.time()
            usable = [c for c in self.conns if not c.excluded and c.serving and c.down_until <= now]
            ready = usable if share is None else self._within_share(usable, share())
            if ready:
                conn = min(ready, key=lambda c: (c.outstanding, c.assigned))
                # (a worker let go while it was being described is chosen no more)
                if await self._agrees(conn, attempts) and conn in self.conns:
                    conn.outstanding += 1
                    conn.assigned += 1
                    return conn
            elif usable:  # every usable worker runs its share: wait for a read to end
                await self._wait(None)
            else:
                self._give_up_if_due(now, deadline, attempts)
                backoffs = [c.down_until for c in self.conns if c.serving and not c.excluded]
                await self._wait(min([*backoffs, deadline]) - now)

    def _within_share(self, usable: list[Conn], share: int) -> list[Conn]:
        limit = min(share, self.options.reads_per_worker)
        return [c for c in usable if c.outstanding < limit]

    async def _agrees(self, conn: Conn, attempts: dict[str, str]) -> bool:
        """Whether `conn` describes the dataset as at the start (asked once after it was
        away); a transient failure puts it in backoff."""
        if conn.verified:
            return True
        assert self.desc is not None
        why = await verify(conn, self.desc, self._describing)
        if why is None:
            return True
        if not conn.excluded:
            self.mark_down(conn, why)
        attempts[conn.address] = conn.excluded or conn.last_error
        return False

    def _give_up_if_due(self, now: float, deadline: float, attempts: dict[str, str]) -> None:
        if now < deadline and not all(c.excluded for c in self.conns):
            return
        for c in self.conns:
            attempts.setdefault(c.address, c.excluded or c.last_error or "not serving")
        if now < deadline:  # every worker was left out: waiting would not change that
            raise WorkersUnavailableError(
                f"every worker of dataset {self.dataset!r} was left out, none serves the "
                "data this loader's plan was made from (restart them with that data)",
                attempts,
            )
        raise WorkersUnavailableError(
            f"no worker could serve dataset {self.dataset!r} before the retry deadline",
            attempts,
        )

    async def _wait(self, timeout: float | None) -> None:
        """Until a worker may have become available (or `timeout` seconds)."""
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._changed.wait(), None if timeout is None else max(0, timeout)
            )

    # what happened -----------------------------------------------------------

    def in_flight(self) -> dict[str, int]:
        return {c.address: c.outstanding for c in self.conns}

    def mark_ok(self, conn: Conn) -> None:
        conn.failures = 0

    def mark_down(
        self, conn: Conn, error: str, *, delay: float | None = None, drained: bool = False
    ) -> None:
        """Give a worker no new reads for a while (capped exponential backoff, jittered);
        `drained`: until it serves again (a restart), at most `delay` seconds."""
        conn.drained = drained
        conn.failures += 1
        conn.last_error = error
        if delay is None:
            opts = self.options
            delay = min(opts.backoff_cap, opts.backoff_base * 2 ** (conn.failures - 1))
            delay *= 0.5 + self._rng.random() / 2
        conn.down_until = asyncio.get_running_loop().time() + delay
        log.info("worker %s: %s; no new reads for %.2fs", conn.address, error, delay)

    def has_room_besides(self, conn: Conn) -> bool:
        """Whether another worker could take a read now (usable and under its share)."""
        now = asyncio.get_running_loop().time()
        return any(
            c is not conn
            and not c.excluded
            and c.serving
            and c.down_until <= now
            and c.outstanding < self.options.reads_per_worker
            for c in self.conns
        )

    def exclude(self, conn: Conn, why: str, error: WorkerError | None = None) -> None:
        """No more reads for a worker that broke the wire contract (for this loader)."""
        conn.excluded = why
        if error is not None:
            self.violation = error
        log.error("worker %s gets no more reads: %s", conn.address, why)
        self._changed.set()  # whoever waits for it should look again

    def unusable_for(self) -> WorkerError | None:
        """What left no worker to read from, where every one is excluded and one of them
        broke the contract (else None: they may be down, or disagree on the dataset)."""
        if self.violation is not None and all(c.excluded for c in self.conns):
            return self.violation
        return None

    def suspect(self, conn: Conn) -> None:
        """No reads for `conn` until its health service answers SERVING again."""
        suspect(conn)

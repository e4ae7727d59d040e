"""One planned read, carried to completion across worker failures.

A read streams records [start, start + count) of a shard. If its stream fails
or is cut, or its worker drains or goes silent, the read goes on from the
first record not yet received, on the best worker available. Records are
handed to `put` in order, exactly once; a stream that was given up on is
cancelled, so nothing it would still send is ever seen.

Two parts: `_stream` runs one stream on one worker and says how it ended (an
`Outcome`); `fetch` is the policy that decides what happens next (go on
elsewhere, skip a bad record, or raise).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc

from shardstream._common.loops import TIMER_SLACK
from shardstream.client._lanes import ClientLane, LaneClosedError, NetworkLane
from shardstream.client._planner import Read
from shardstream.client._pool import Conn, WorkerPool
from shardstream.client._wire import (
    Piece,
    ShardDesc,
    SharedRef,
    StreamEnd,
    check_piece,
    decode_response,
    encode_read,
    is_retryable,
    metadata_overflow,
    worker_error,
)
from shardstream.client.errors import (
    DataLossError,
    ProtocolError,
    ShardChangedError,
    WorkerError,
    WorkersUnavailableError,
)
from shardstream.v1.codec import FieldSpec

log = logging.getLogger("shardstream.client")


@dataclass(frozen=True, kw_only=True, slots=True)
class FetchOptions:
    dataset: str
    seed: int
    max_chunk_records: int
    # On a same-host lane: records one chunk may hold there, a whole read (a chunk in a
    # lane is not bounded by the message size); 0: max_chunk_records.
    lane_chunk_records: int = 0
    idle_timeout: float  # seconds without a message before a stream is given up
    # A stream whose next message is `straggler_factor` times later than the fleet's usual
    # gap between messages (and at least `straggler_seconds` late) is moved to another
    # worker with room for it, at most `straggler_moves` times per read.
    straggler_factor: float = 8.0
    straggler_seconds: float = 2.0
    straggler_moves: int = 2
    retry_deadline: float  # seconds without progress before WorkersUnavailableError
    schema: tuple[FieldSpec, ...] = ()  # every chunk is checked against it
    on_error: str = "raise"  # "skip": a record the worker cannot decode becomes a Hole
    epoch: int = 0  # sent with `seed`: the workers' per-record randomness depends on both
    # The description's fingerprint the plan was made from: a worker with another refuses
    fingerprint: str = ""
    journal: Callable[[dict[str, object]], None] | None = None  # resumes and skips, for a ledger


@dataclass(frozen=True, slots=True)
class Hole:
    """Records [start, start + count) of a shard that were skipped as bad."""

    start: int
    count: int


@dataclass
class Pace:
    """The fleet's usual gap between two messages of a stream (a moving average)."""

    gap: float = 0.0  # seconds; 0 until the first gap is seen
    seen: int = 0

    def observe(self, seconds: float) -> None:
        self.seen += 1
        weight = max(1 / self.seen, 0.05)  # a plain mean at first, then an EWMA
        self.gap += weight * (seconds - self.gap)

    def late(self, options: FetchOptions) -> float:
        """Seconds after which a stream's next message is a straggler's."""
        if self.seen < 8:
            return options.idle_timeout  # no pace known yet
        return max(options.straggler_seconds, options.straggler_factor * self.gap)


@dataclass
class FetchCounters:
    resumes: int = 0  # reads continued on a fresh stream after a failure or drain
    stragglers: int = 0  # reads moved off a worker far slower than the fleet
    pace: Pace = field(default_factory=Pace)
    retries_by_worker: dict[str, int] | None = None
    skipped: int = 0  # records skipped as bad (on_error="skip")
    skipped_seen: set[tuple[str, int]] = field(default_factory=set)  # logged once each

    def count(self, address: str) -> None:
        self.resumes += 1
        if self.retries_by_worker is None:
            self.retries_by_worker = {}
        self.retries_by_worker[address] = self.retries_by_worker.get(address, 0) + 1


# How one stream ended ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Complete:
    """Every record asked for arrived, and the end message says so."""


@dataclass(frozen=True, slots=True)
class Drained:
    """The worker ended the stream early at a record boundary: it is draining."""


@dataclass(frozen=True, slots=True)
class Broken:
    """The stream failed in a way another worker may not: cut, silent or a transient status."""

    why: str
    # No new reads for the worker until its health service answers SERVING again: it
    # went silent (maybe frozen) or failed; not for a cut stream or a full worker.
    suspect: bool = False


@dataclass(frozen=True, slots=True)
class Violated:
    """The worker broke the wire contract (a chunk off the schema, of another shard, out
    of order, a wrong count): it gets no more reads, and the read goes on elsewhere."""

    error: ProtocolError


@dataclass(frozen=True, slots=True)
class Refused:
    """A status that retrying would not change (as a typed error)."""

    error: WorkerError


Outcome = Complete | Drained | Broken | Violated | Refused


@dataclass
class _Progress:
    """Where a read stands: records received so far, and records to skip as bad."""

    read: Read
    shard: ShardDesc
    received: int = 0
    moves: int = 0  # times moved off a straggling worker
    bad: set[int] = field(default_factory=set)  # shard indices
    # the last worker that broke the contract, or whose data differs
    violation: WorkerError | None = None

    @property
    def position(self) -> int:
        return self.read.start + self.received

    @property
    def end(self) -> int:
        return self.read.start + self.read.count

    def wanted(self) -> int:
        """Records to ask for from `position`: up to the next bad record or the end."""
        nxt = min([b for b in self.bad if b > self.position], default=self.end)
        return nxt - self.position


async def fetch(
    read: Read,
    shard: ShardDesc,
    *,
    pool: WorkerPool,
    options: FetchOptions,
    put: Callable[[int, int, Piece | Hole], None],
    counters: FetchCounters,
    share: Callable[[], int] | None = None,
    started: Callable[[], None] | None = None,
) -> None:
    """Stream `read` into `put(seq, offset, piece)` until every record arrived.

    The first stream takes a worker within `share` (see `WorkerPool.lease`) and then
    calls `started()`; streams that resume the read take the least busy worker."""
    loop = asyncio.get_running_loop()
    progress = _Progress(read, shard)
    attempts: dict[str, str] = {}
    deadline = loop.time() + options.retry_deadline

    def deliver(item: Piece) -> None:
        nonlocal deadline
        put(read.seq, progress.received, item)
        progress.received += item.count
        deadline = loop.time() + options.retry_deadline

    while progress.received < read.count:
        if progress.position in progress.bad:
            put(read.seq, progress.received, Hole(progress.position, 1))
            progress.received += 1
            continue
        try:
            async with pool.lease(deadline, attempts, share=share) as conn:
                if started is not None:
                    started()
                share = started = None
                outcome = await _stream(conn, progress, options, deliver, pool, counters)
        except WorkersUnavailableError as exc:
            violation = progress.violation or pool.unusable_for()
            if violation is not None:  # what made the workers unusable
                raise violation from exc
            raise
        _decide(outcome, conn, progress, pool, options, counters, attempts)


def _decide(
    outcome: Outcome,
    conn: Conn,
    progress: _Progress,
    pool: WorkerPool,
    options: FetchOptions,
    counters: FetchCounters,
    attempts: dict[str, str],
) -> None:
    """What a stream's outcome means for the worker and the read (raises to fail it)."""
    if isinstance(outcome, Complete):
        pool.mark_ok(conn)
    elif isinstance(outcome, Drained):
        pool.mark_down(conn, "draining", delay=options.retry_deadline, drained=True)
        counters.count(conn.address)
        _journal(options, conn, progress.shard, progress.position, "draining")
    elif isinstance(outcome, Broken):
        attempts[conn.address] = outcome.why
        pool.mark_down(conn, outcome.why)
        counters.count(conn.address)
        _journal(options, conn, progress.shard, progress.position, outcome.why)
        if outcome.suspect:
            pool.suspect(conn)
    elif isinstance(outcome, Violated) or isinstance(outcome.error, ShardChangedError):
        # It broke the wire contract, or its data (or transforms) is not what the plan was
        # made from (restarted over other data, a file changed under it): it gets no more
        # reads, and the read goes on elsewhere; with no other worker, this is the error.
        progress.violation = outcome.error
        attempts[conn.address] = str(outcome.error)
        pool.exclude(conn, str(outcome.error), outcome.error)
        counters.count(conn.address)
        why = "protocol error" if isinstance(outcome, Violated) else "data differs"
        _journal(options, conn, progress.shard, progress.position, why)
    elif not _skip(outcome.error, progress, options, counters):
        raise outcome.error


def _skip(
    error: WorkerError,
    progress: _Progress,
    options: FetchOptions,
    counters: FetchCounters,
) -> bool:
    """With on_error="skip", note a bad record of this read to be skipped; whether it was."""
    record = error.record
    if (
        options.on_error != "skip"
        or not isinstance(error, DataLossError)
        or record is None
        or not progress.position <= record < progress.end
        or record in progress.bad
    ):
        return False
    progress.bad.add(record)
    counters.skipped += 1
    shard_id = progress.shard.id
    if options.journal is not None:
        options.journal({"kind": "skip", "shard": shard_id, "record": record})
    if (shard_id, record) not in counters.skipped_seen:
        counters.skipped_seen.add((shard_id, record))
        log.warning("skipping a bad record: %s", error)
    return True


async def _stream(
    conn: Conn,
    progress: _Progress,
    options: FetchOptions,
    deliver: Callable[[Piece], None],
    pool: WorkerPool,
    counters: FetchCounters,
) -> Outcome:
    """One stream of the read's next records on `conn`: each chunk checked and delivered.

    Raises `ProtocolError` for a message that breaks the wire contract."""
    wanted = progress.wanted()
    limit = progress.position + wanted
    lane = conn.lane if conn.lane is not None and conn.lane.alive else None
    if lane is None and conn.lane is not None:
        pool.lane_lost(conn)
    stream = 0 if lane is None else lane.new_stream()
    request = encode_read(
        dataset=options.dataset,
        shard=progress.shard.id,
        start=progress.position,
        count=wanted,
        seed=options.seed,
        fingerprint=progress.shard.fingerprint,
        max_chunk_records=options.max_chunk_records,
        epoch=options.epoch,
        lane="" if lane is None else lane.id,
        lane_stream=stream,
        lane_chunk_records=0 if lane is None else options.lane_chunk_records,
        dataset_fingerprint=options.fingerprint,
    )
    call = conn.read_stub().read(request)
    sent = 0
    patience = _Patience(conn, progress, options, pool, counters)
    try:
        while True:
            msg = await patience.read(call)
            if isinstance(msg, Broken):
                return msg
            if msg is grpc.aio.EOF:
                return Broken("the stream ended without its end message")
            item = decode_response(msg)
            if isinstance(item, SharedRef) and isinstance(lane, NetworkLane):
                try:  # its frame comes on the lane's own connection
                    waited = await patience.wait(lane.arrival(item.slot, stream))
                except LaneClosedError as exc:
                    return Broken(f"its network lane closed: {exc}")
                if isinstance(waited, Broken):
                    return waited
            item = _checked(item, progress.position, limit, options, progress.shard, lane, stream)
            if isinstance(item, StreamEnd):
                return _ending(item, sent, wanted)
            deliver(item)
            sent += item.count
    except LaneClosedError as exc:  # closed under it (its worker restarted, say)
        return Broken(f"its lane closed: {exc}")
    except ProtocolError as exc:
        return Violated(
            ProtocolError(
                str(exc), worker=conn.address, dataset=options.dataset, shard=progress.shard.id
            )
        )
    except grpc.aio.AioRpcError as exc:
        if not is_retryable(exc):
            return Refused(worker_error(exc, worker=conn.address, dataset=options.dataset))
        busy = exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not metadata_overflow(exc)
        return Broken(f"{exc.code().name}: {exc.details()}", suspect=not busy)
    finally:
        patience.close()
        call.cancel()
        if lane is not None:
            lane.end(stream)


class _Patience:
    """Reads a stream's messages, giving the stream up where the next one is too late:
    nothing for `idle_timeout` (the worker may be frozen), or a straggler, far slower
    than the fleet, while another worker has room for the rest of the read.

    The stream's task awaits each message itself; one timer per stream looks at the
    message awaited now when it fires (moved on at most every 0.25 s while messages
    come), and cancels the wait with the reason to give the stream up: no task, no
    timer per message."""

    TICK = 0.25  # seconds between two looks at a late message

    def __init__(
        self,
        conn: Conn,
        progress: _Progress,
        options: FetchOptions,
        pool: WorkerPool,
        counters: FetchCounters,
    ) -> None:
        self._conn = conn
        self._progress = progress
        self._options = options
        self._pool = pool
        self._counters = counters
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._began: float | None = None  # when the message awaited now was asked for
        self._timer: asyncio.TimerHandle | None = None
        self._verdict: Broken | None = None

    async def read(self, call: grpc.aio.UnaryStreamCall) -> Any:
        """The stream's next message (or EOF), or the Broken outcome that gives it up."""
        return await self.wait(call.read(), pace=True)

    async def wait(self, awaitable: Awaitable[Any], *, pace: bool = False) -> Any:
        """What `awaitable` gives (the stream's next message, or its bytes in a network
        lane), or the Broken outcome that gives the stream up. `pace`: the wait counts in
        the fleet's pace (the gap between messages)."""
        loop = self._loop
        self._task = asyncio.current_task()  # the task to cancel with a verdict
        began = self._began = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(began + self._patience(0.0), self._look)
        try:
            msg = await awaitable
        except asyncio.CancelledError:
            verdict, self._verdict = self._verdict, None
            if verdict is not None and self._task is not None and self._task.uncancel() == 0:
                return verdict  # cancelled by `_look` alone
            raise
        finally:
            self._began = None
        if pace:
            self._counters.pace.observe(loop.time() - began)
        return msg

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _patience(self, waited: float) -> float:
        """Seconds from the request of the awaited message to its next look: when it is
        late (or the idle timeout), then every TICK while it stays late."""
        late = self._counters.pace.late(self._options)
        due = late if waited + TIMER_SLACK < late else waited + self.TICK
        return min(self._options.idle_timeout, due)

    def _look(self) -> None:
        self._timer = None
        began = self._began
        if began is None or self._task is None:  # nothing awaited: the next read arms it
            return
        loop, options, progress = self._loop, self._options, self._progress
        waited = loop.time() - began
        if waited + TIMER_SLACK >= options.idle_timeout:
            self._verdict = Broken(f"no data for {options.idle_timeout:g}s", suspect=True)
        elif (
            waited + TIMER_SLACK >= self._counters.pace.late(options)
            and progress.moves < options.straggler_moves
            and self._pool.has_room_besides(self._conn)
        ):
            progress.moves += 1
            self._counters.stragglers += 1
            self._verdict = Broken(
                f"straggling: no message for {waited:.3g}s, the fleet sends one every "
                f"{self._counters.pace.gap:.3g}s"
            )
        else:  # not late yet (a later message), or late with nowhere better to go
            self._timer = loop.call_at(began + self._patience(waited), self._look)
            return
        self._task.cancel()


def _ending(end: StreamEnd, sent: int, wanted: int) -> Outcome:
    """The outcome an end message gives, checked against what arrived."""
    if end.records_sent != sent:
        raise ProtocolError(f"the end message counts {end.records_sent} records, {sent} arrived")
    if end.draining:
        return Drained()
    if sent != wanted:
        raise ProtocolError(f"the stream ended complete after {sent} of {wanted} records")
    return Complete()


def _checked(
    item: Piece | StreamEnd | SharedRef,
    expected: int,
    limit: int,
    options: FetchOptions,
    shard: ShardDesc,
    lane: ClientLane | NetworkLane | None = None,
    stream: int = 0,
) -> Piece | StreamEnd:
    """A streamed message (decoded), checked to continue the read at `expected`, not
    past `limit`, and (a chunk) to hold records of `shard` as the schema describes them.
    A chunk in a lane is taken where it lies, and must be the chunk its reference says."""
    if isinstance(item, SharedRef):
        if lane is None:
            raise ProtocolError("a chunk in a lane, on a read that named none")
        ref = item
        try:
            item = decode_response(lane.take(ref.slot, ref.size, stream))
        except ValueError as exc:
            raise ProtocolError(str(exc)) from None
        if not isinstance(item, Piece) or (item.start, item.count, item.shard) != (
            ref.start,
            ref.count,
            ref.shard,
        ):
            raise ProtocolError("a lane's slot does not hold the chunk named")
    if isinstance(item, Piece):
        if item.start != expected or item.count < 1 or item.start + item.count > limit:
            raise ProtocolError(
                f"chunk of records [{item.start}, {item.start + item.count}) does not continue "
                f"the request at {expected} (up to {limit})"
            )
        check_piece(item, options.schema, shard.id)
    return item


def _journal(options: FetchOptions, conn: Conn, shard: ShardDesc, record: int, why: str) -> None:
    if options.journal is not None:
        options.journal(
            {"kind": "resume", "worker": conn.address, "shard": shard.id, "record": record,
             "why": why}
        )  # fmt: skip

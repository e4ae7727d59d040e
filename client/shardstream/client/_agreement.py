"""Start-up agreement: every worker that answers describes the dataset the same way.

At start every worker is asked to describe the dataset (retrying transient
failures until `describe_timeout`); once one has answered, the others get a
short grace, so a down replica does not hold up the start: it is described
when it is back, before it gets any read (`verify`). Workers that answer
differently refuse the start, naming both and the difference; so does a
description that cannot be right (`ProtocolError` naming the worker: shard ids
twice, an unknown dtype, an empty schema, ...). A worker back later with either
gets no reads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from shardstream.client._wire import DatasetDesc, is_retryable, worker_error
from shardstream.client._workers import Conn, describe_difference
from shardstream.client.errors import (
    DatasetMismatchError,
    ProtocolError,
    WorkersUnavailableError,
)

log = logging.getLogger("shardstream.client")

START_GRACE = 2.0  # seconds other workers get to answer once one has


@dataclass(frozen=True, kw_only=True, slots=True)
class Describing:
    """How to ask for a description."""

    dataset: str
    timeout: float  # seconds to keep asking a worker
    backoff_base: float  # first pause after a transient failure, doubling...
    backoff_cap: float  # ...up to this


class _NotYet(Exception):
    """A worker that had not answered when the start went on without it."""


async def agree(conns: Sequence[Conn], how: Describing, unresolved: dict[str, str]) -> DatasetDesc:
    """The dataset as the workers that answer describe it; marks them verified.

    Raises the worker's typed error for a refusal that retrying cannot change,
    `ProtocolError` for a description that cannot be right, `WorkersUnavailableError`
    when none answered, `DatasetMismatchError` when two differ."""
    results = await _describe_all(conns, how)
    answered: list[tuple[Conn, DatasetDesc]] = []
    failed: dict[str, str] = {}
    for conn, res in zip(conns, results, strict=True):
        if isinstance(res, DatasetDesc):
            answered.append((conn, res))
        elif isinstance(res, _NotYet):
            failed[conn.address] = conn.last_error or "did not answer in time"
        elif isinstance(res, grpc.aio.AioRpcError) and is_retryable(res):
            failed[conn.address] = conn.last_error = f"{res.code().name}: {res.details()}"
        elif isinstance(res, grpc.aio.AioRpcError):
            raise worker_error(res, worker=conn.address, dataset=how.dataset)
        else:
            raise res
    if not answered:
        raise WorkersUnavailableError(
            f"no worker described dataset {how.dataset!r} within {how.timeout}s",
            {**unresolved, **failed},
        )
    ref_conn, ref = answered[0]
    measured = next((d.record_bytes for _, d in answered if d.record_bytes), 0)
    if measured and not ref.record_bytes:  # workers of an older version measure nothing
        ref = dataclasses.replace(ref, record_bytes=measured)
    for conn, desc in answered[1:]:
        if differs(ref, desc):
            raise DatasetMismatchError(
                f"workers disagree on dataset {how.dataset!r}: {ref_conn.address} and "
                f"{conn.address} differ: {describe_difference(ref, desc)}"
            )
    for conn, _ in answered:
        conn.verified = True
    for address, err in failed.items():
        log.warning("worker %s did not answer at start (%s); will try it later", address, err)
    return ref


def differs(a: DatasetDesc, b: DatasetDesc, *, sizes: bool = True) -> bool:
    """Whether two workers' descriptions are not of the same records: the schema counts
    too, whatever the fingerprints say (a worker's fingerprint need not cover it). With
    `sizes`, so do two measured record sizes that differ (they size the reads, hence the
    plan); a worker that measured none (an older version) agrees with any."""
    return (
        a.fingerprint != b.fingerprint
        or a.shards != b.shards
        or a.schema != b.schema
        or (sizes and bool(a.record_bytes and b.record_bytes) and a.record_bytes != b.record_bytes)
    )


async def verify(conn: Conn, ref: DatasetDesc, how: Describing) -> str | None:
    """Describe the dataset on a worker that was away; None if it agrees, else why not.

    A worker that refuses for good, serves other data or describes it impossibly is
    excluded for good (`conn.excluded`); a transient failure leaves it to the caller's backoff."""
    try:
        desc = await conn.stub.describe(how.dataset, timeout=how.timeout, wait_for_ready=False)
    except grpc.aio.AioRpcError as exc:
        why = f"{exc.code().name}: {exc.details()}"
        if not is_retryable(exc):
            conn.excluded = why
            log.error("worker %s cannot serve dataset %r: %s", conn.address, how.dataset, why)
        return why
    except ProtocolError as exc:  # a description that cannot be right: as if it disagreed
        conn.excluded = str(_naming(exc, conn, how))
        log.error("%s; it gets no reads", conn.excluded)
        return conn.excluded
    if differs(ref, desc, sizes=False):  # the reads are planned: their size is decided
        conn.excluded = describe_difference(ref, desc)
        log.error(
            "worker %s serves a different dataset %r (%s); it gets no reads",
            conn.address,
            how.dataset,
            conn.excluded,
        )
        return conn.excluded
    conn.verified = True
    return None


async def _describe_all(
    conns: Sequence[Conn], how: Describing
) -> list[DatasetDesc | BaseException]:
    """Every worker's description; once one has answered, the others get a short grace."""
    tasks = [asyncio.ensure_future(_describe_patiently(c, how)) for c in conns]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        while pending and not any(t.exception() is None for t in done):
            more, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            done |= more
        if pending:
            await asyncio.wait(pending, timeout=START_GRACE)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [_outcome(t) for t in tasks]


def _outcome(task: asyncio.Future[DatasetDesc]) -> DatasetDesc | BaseException:
    if not task.done() or task.cancelled():
        return _NotYet()
    return task.exception() or task.result()


async def _describe_patiently(conn: Conn, how: Describing) -> DatasetDesc:
    """Describe the dataset, retrying transient failures until `how.timeout`; the last
    failure keeps its reason (e.g. a TLS handshake error), which waiting for the
    channel to be ready would hide behind DEADLINE_EXCEEDED."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + how.timeout
    delay = how.backoff_base
    while True:
        remaining = deadline - loop.time()
        try:
            return await conn.stub.describe(
                how.dataset, timeout=max(0.1, remaining), wait_for_ready=False
            )
        except grpc.aio.AioRpcError as exc:
            left = deadline - loop.time()
            if not is_retryable(exc) or left <= 0:
                raise
        except ProtocolError as exc:
            raise _naming(exc, conn, how) from None
        await asyncio.sleep(min(delay, left))  # the last try at the deadline, not before
        delay = min(delay * 2, how.backoff_cap)


def _naming(exc: ProtocolError, conn: Conn, how: Describing) -> ProtocolError:
    """A description's ProtocolError (raised where no worker is known) naming the worker."""
    if exc.worker:
        return exc
    return ProtocolError(str(exc), worker=conn.address, dataset=how.dataset, code=exc.code)

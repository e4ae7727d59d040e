"""Domain errors to gRPC status codes: the one table and the one place that uses it.

    async with StatusOnError(context, metrics):
        ...  # a RequestError raised here aborts the call with its status

    async with FinishOnError(context, metrics):      # a stream: never waits on its client
        ...  # a RequestError raised here ends the handler; gRPC sends the status after

The status carries the error's message, and its context as trailing metadata
(`shardstream-dataset`, `shardstream-shard`, `shardstream-record`), which the
client turns into its own `WorkerError`. Whatever a client sent is bounded
(`shown`) before it is echoed or logged, and refusals are logged at most a few
lines a second per status code (`LogLimit`), with a count of the lines left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from shardstream.server._files import redact
from shardstream.server._metrics import WorkerMetrics
from shardstream.server.errors import (
    BadRangeError,
    BusyError,
    DataLossError,
    DrainingError,
    MalformedRequestError,
    NoLaneError,
    NotReadyError,
    ProcessDiedError,
    RequestError,
    ShardChangedError,
    ShardIOError,
    ShardOutsideRootError,
    StalledError,
    UnknownDatasetError,
    UnknownShardError,
)

log = logging.getLogger("shardstream.worker")

STATUS: dict[type[RequestError], grpc.StatusCode] = {
    NotReadyError: grpc.StatusCode.UNAVAILABLE,
    DrainingError: grpc.StatusCode.UNAVAILABLE,
    ProcessDiedError: grpc.StatusCode.UNAVAILABLE,
    StalledError: grpc.StatusCode.UNAVAILABLE,
    ShardIOError: grpc.StatusCode.UNAVAILABLE,
    BusyError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnknownDatasetError: grpc.StatusCode.NOT_FOUND,
    UnknownShardError: grpc.StatusCode.NOT_FOUND,
    ShardOutsideRootError: grpc.StatusCode.PERMISSION_DENIED,
    BadRangeError: grpc.StatusCode.INVALID_ARGUMENT,
    MalformedRequestError: grpc.StatusCode.INVALID_ARGUMENT,
    ShardChangedError: grpc.StatusCode.FAILED_PRECONDITION,
    NoLaneError: grpc.StatusCode.FAILED_PRECONDITION,
    DataLossError: grpc.StatusCode.DATA_LOSS,
}

BUSY_HEADER = "shardstream-busy"
SHOWN_CHARS = 256  # characters of a client-sent string a status or a log line shows
MESSAGE_CHARS = 2048  # characters of a status message (it names at most a few such strings)

# Refusals a client retries elsewhere: routine, so counted but not logged as warnings.
_ROUTINE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def shown(text: str, limit: int = SHOWN_CHARS) -> str:
    """`text` bounded for a status or a log line: at most `limit` characters, then
    '…(N bytes)' giving the whole length when it is longer."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text.encode('utf-8', 'surrogatepass'))} bytes)"


class LogLimit:
    """Logs at most `per_second` lines a second of each kind; the next line logged of a
    kind says how many were left out, so a flood of refusals costs a few lines."""

    def __init__(
        self,
        logger: logging.Logger,
        per_second: int = 5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._per_second = per_second
        self._clock = clock
        self._kinds: dict[str, list[float]] = {}  # kind -> [window start, lines, left out]

    def log(self, level: int, kind: str, message: str, *args: Any) -> bool:
        """Log `message % args` unless `kind` is over its rate; True if it was logged."""
        now = self._clock()
        state = self._kinds.setdefault(kind, [now, 0, 0])
        if now - state[0] >= 1.0:
            state[0], state[1] = now, 0
        if state[1] >= self._per_second:
            state[2] += 1
            return False
        state[1] += 1
        if state[2]:
            message += " (and %d more like it in the last seconds, not logged)"
            args = (*args, int(state[2]))
            state[2] = 0
        self._log.log(level, message, *args)
        return True

    def left_out(self, kind: str) -> int:
        """Lines of `kind` left out and not yet counted in a logged line."""
        state = self._kinds.get(kind)
        return 0 if state is None else int(state[2])


REFUSALS = LogLimit(log)  # refusals of callers that bring no LogLimit of their own


def status_code(exc: RequestError) -> grpc.StatusCode:
    """The status of `exc`: its class's entry in `STATUS`, or its nearest base's."""
    for cls in type(exc).__mro__:
        code = STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL  # a RequestError without an entry: a bug, still an answer


def _refusal(
    exc: RequestError, metrics: WorkerMetrics, refusals: LogLimit
) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """`exc` as a status: its code, bounded message and metadata; counted and logged."""
    code = status_code(exc)
    metrics.error(code.name)
    message = redact(str(exc))  # a shard's URL may hold the data root's password
    for value in (exc.shard, exc.dataset):  # ids a client sent, bounded where echoed
        if len(value) > SHOWN_CHARS:
            message = message.replace(repr(value), repr(shown(value))).replace(value, shown(value))
    message = shown(message, MESSAGE_CHARS)
    metadata = [
        ("shardstream-dataset", _header_safe(exc.dataset)),
        ("shardstream-shard", _header_safe(exc.shard)),
    ]
    if exc.record is not None:
        metadata.append(("shardstream-record", str(exc.record)))
    if isinstance(exc, BusyError):
        # RESOURCE_EXHAUSTED is also gRPC's code for a message over a size limit,
        # which no retry cures: this tells a client the worker is only full.
        metadata.append((BUSY_HEADER, "1"))
    if code not in _ROUTINE:
        refusals.log(logging.WARNING, code.name, "%s: %s", code.name, message)
    return code, message, tuple(metadata)


class _OnError:
    """What both blocks below hold: the call, the metrics, where refusals are logged (a
    worker's own `LogLimit`; `REFUSALS` by default)."""

    def __init__(
        self,
        context: grpc.aio.ServicerContext,
        metrics: WorkerMetrics,
        refusals: LogLimit | None = None,
    ) -> None:
        self._context = context
        self._metrics = metrics
        self._refusals = refusals or REFUSALS

    async def __aenter__(self) -> None:
        return None


class StatusOnError(_OnError):
    """`async with StatusOnError(context, metrics):` turns a RequestError into a status."""

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if not isinstance(exc, RequestError):
            return
        code, message, metadata = _refusal(exc, self._metrics, self._refusals)
        await self._context.abort(code, message, trailing_metadata=metadata)


class FinishOnError(_OnError):
    """`async with FinishOnError(context, metrics):` for a stream's handler: a RequestError
    sets the call's status and ends the block, and gRPC sends the status once the messages
    before it are out. Unlike `abort`, nothing waits here for a client that reads nothing."""

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> bool:
        if not isinstance(exc, RequestError):
            return False
        code, message, metadata = _refusal(exc, self._metrics, self._refusals)
        self._context.set_code(code)
        self._context.set_details(message)
        self._context.set_trailing_metadata(metadata)
        return True


def _header_safe(value: str) -> str:
    """Printable ASCII (gRPC metadata refuses anything else), escaped, bounded."""
    escaped = value.encode("unicode_escape").decode("ascii")
    return escaped if len(escaped) <= 512 else shown(escaped, 400).replace("…", "...")

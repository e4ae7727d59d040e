"""Domain errors to gRPC status codes: the one table and the one place that uses it.

    async with StatusOnError(context, metrics):
        ...  # a RequestError raised here aborts the call with its status

The status carries the error's message, and its context as trailing metadata
(`shardstream-dataset`, `shardstream-shard`, `shardstream-record`), which the
client turns into its own `WorkerError`.
"""

from __future__ import annotations

import logging

import grpc

from shardstream.server._metrics import WorkerMetrics
from shardstream.server.errors import (
    BadRangeError,
    BusyError,
    DataLossError,
    DrainingError,
    NotReadyError,
    RequestError,
    ShardChangedError,
    ShardOutsideRootError,
    UnknownDatasetError,
    UnknownShardError,
)

log = logging.getLogger("shardstream.worker")

STATUS: dict[type[RequestError], grpc.StatusCode] = {
    NotReadyError: grpc.StatusCode.UNAVAILABLE,
    DrainingError: grpc.StatusCode.UNAVAILABLE,
    BusyError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    UnknownDatasetError: grpc.StatusCode.NOT_FOUND,
    UnknownShardError: grpc.StatusCode.NOT_FOUND,
    ShardOutsideRootError: grpc.StatusCode.PERMISSION_DENIED,
    BadRangeError: grpc.StatusCode.INVALID_ARGUMENT,
    ShardChangedError: grpc.StatusCode.FAILED_PRECONDITION,
    DataLossError: grpc.StatusCode.DATA_LOSS,
}

BUSY_HEADER = "shardstream-busy"

# Refusals a client retries elsewhere: routine, so counted but not logged as warnings.
_ROUTINE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})


def status_code(exc: RequestError) -> grpc.StatusCode:
    """The status of `exc`: its class's entry in `STATUS`, or its nearest base's."""
    for cls in type(exc).__mro__:
        code = STATUS.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL  # a RequestError without an entry: a bug, still an answer


class StatusOnError:
    """`async with StatusOnError(context, metrics):` turns a RequestError into a status."""

    def __init__(self, context: grpc.aio.ServicerContext, metrics: WorkerMetrics) -> None:
        self._context = context
        self._metrics = metrics

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, exc_type: object, exc: BaseException | None, tb: object) -> None:
        if not isinstance(exc, RequestError):
            return
        code = status_code(exc)
        self._metrics.error(code.name)
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
            log.warning("%s: %s", code.name, exc)
        await self._context.abort(code, str(exc), trailing_metadata=tuple(metadata))


def _header_safe(value: str) -> str:
    """Printable ASCII (gRPC metadata refuses anything else), escaped, bounded."""
    return value.encode("unicode_escape").decode("ascii")[:512]

"""Exceptions raised by the shardstream client.

    ShardstreamError
     ├── ConfigError              bad loader options (also a ValueError)
     ├── DatasetMismatchError     workers disagree on a dataset's shards, counts or schema
     ├── StateMismatchError       a saved loader state does not fit this dataset or these options
     ├── WorkersUnavailableError  no worker could serve a read before the retry deadline
     └── WorkerError              a worker refused or failed a request; never retried
          ├── DataLossError       corrupt or truncated shard, record not matching the schema
          ├── ShardChangedError   a shard's content differs from what the plan was made from
          ├── NotFoundError       unknown dataset or shard
          ├── InvalidRequestError a request the worker considers malformed
          ├── AccessDeniedError   missing or wrong credentials
          ├── MessageTooLargeError a message over a gRPC size limit (max_message_bytes)
          └── ProtocolError       a stream that breaks the wire contract
               └── ReorderError   a chunk that does not fit the plan order (duplicate, gap)

Transient transport failures (a worker dying, a reset connection, a draining
or overloaded worker) are not errors for the caller: the read resumes on
another worker. They surface only as `WorkersUnavailableError` once no worker
has made progress for the configured deadline.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "AccessDeniedError",
    "ConfigError",
    "DataLossError",
    "DatasetMismatchError",
    "InvalidRequestError",
    "MessageTooLargeError",
    "NotFoundError",
    "ProtocolError",
    "ReorderError",
    "ShardChangedError",
    "ShardstreamError",
    "StateMismatchError",
    "WorkerError",
    "WorkersUnavailableError",
]


class ShardstreamError(Exception):
    """Base of every error shardstream raises on purpose."""


class ConfigError(ShardstreamError, ValueError):
    """Loader options that cannot work; the message says which and why."""


class DatasetMismatchError(ShardstreamError):
    """Workers describe the same dataset differently."""


class StateMismatchError(ShardstreamError):
    """A saved state was made for another dataset, seed, batch size or plan option."""


class WorkersUnavailableError(ShardstreamError):
    """No worker served a read within the retry deadline.

    `attempts` maps each address tried to the last error seen from it.
    """

    def __init__(self, message: str, attempts: Mapping[str, str]) -> None:
        detail = "; ".join(f"{addr}: {err}" for addr, err in sorted(attempts.items()))
        super().__init__(f"{message} ({detail})" if detail else message)
        self.attempts = dict(attempts)


class WorkerError(ShardstreamError):
    """A worker's answer that retrying elsewhere would not change."""

    def __init__(
        self,
        message: str,
        *,
        worker: str = "",
        dataset: str = "",
        shard: str = "",
        record: int | None = None,
        code: str = "",
    ) -> None:
        where = ", ".join(
            part
            for part in (
                f"worker {worker}" if worker else "",
                f"dataset {dataset!r}" if dataset else "",
                f"shard {shard!r}" if shard else "",
                f"record {record}" if record is not None else "",
            )
            if part
        )
        super().__init__(f"{message} [{where}]" if where else message)
        self.worker = worker
        self.dataset = dataset
        self.shard = shard
        self.record = record
        self.code = code


class DataLossError(WorkerError):
    """The worker could not decode records (gRPC DATA_LOSS)."""


class ShardChangedError(WorkerError):
    """A shard differs from the one the plan was made for (FAILED_PRECONDITION)."""


class NotFoundError(WorkerError):
    """Unknown dataset or shard (NOT_FOUND)."""


class InvalidRequestError(WorkerError):
    """The worker refused the request as malformed (INVALID_ARGUMENT, OUT_OF_RANGE)."""


class AccessDeniedError(WorkerError):
    """Credentials missing or refused (UNAUTHENTICATED, PERMISSION_DENIED)."""


class MessageTooLargeError(WorkerError):
    """A message over a gRPC size limit (RESOURCE_EXHAUSTED without the worker's busy
    mark): raise the client's `max_message_bytes` or lower the worker's chunk size."""


class ProtocolError(WorkerError):
    """A message or stream that breaks the wire contract."""


class ReorderError(ProtocolError):
    """A chunk that does not fit the plan order: a duplicate, a gap, or outside the window."""

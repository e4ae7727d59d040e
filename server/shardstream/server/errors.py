"""Exceptions raised by the shardstream worker.

    Exception
     ├── CatalogError                start-up: a dataset cannot be served as configured
     ├── DecodeError                 bad shard content: corrupt, truncated, off its schema
     ├── ShardChanged                a shard file is not the one indexed (size, mtime, checksum)
     └── RequestError                a request the worker refuses or fails; one status each:
          ├── NotReadyError          UNAVAILABLE          still indexing
          ├── DrainingError          UNAVAILABLE          shutting down; no new streams
          ├── ProcessDiedError       UNAVAILABLE          a decoding process died mid-read
          ├── StalledError           UNAVAILABLE          no reads for --stream-stall-timeout
          ├── ShardIOError           UNAVAILABLE          an I/O error reading a shard
          ├── BusyError              RESOURCE_EXHAUSTED   --max-streams streams running
          ├── UnknownDatasetError    NOT_FOUND            no such dataset
          ├── UnknownShardError      NOT_FOUND            no such shard in the dataset
          ├── ShardOutsideRootError  PERMISSION_DENIED    a shard id leaving the data root
          ├── BadRangeError          INVALID_ARGUMENT     records outside the shard
          ├── MalformedRequestError  INVALID_ARGUMENT     unparsable, or ids too long
          ├── ShardChangedError      FAILED_PRECONDITION  fingerprint differs, ShardChanged
          ├── NoLaneError            FAILED_PRECONDITION  no same-host lane (off, or all taken)
          └── DataLossError          DATA_LOSS            a DecodeError while streaming

`CatalogError` stops the worker at start-up. `DecodeError` (raised by decoders,
plug-ins included) and `ShardChanged` come from decoding processes, without the
request's context: the chunk streamer re-raises them as `DataLossError` and
`ShardChangedError`, naming the dataset, shard and record. Each `RequestError`
becomes a gRPC status in one place, `_status.StatusOnError`, through the table
`_status.STATUS`; the client sees the matching `shardstream.client.errors` class,
or, for UNAVAILABLE and RESOURCE_EXHAUSTED, resumes the read on another worker.
A decoding process that dies (the OOM killer, a crash in native code) fails the
chunk it was decoding as `ProcessDiedError`; the worker replaces the process.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadRangeError",
    "BusyError",
    "CatalogError",
    "DataLossError",
    "DecodeError",
    "DrainingError",
    "MalformedRequestError",
    "NoLaneError",
    "NotReadyError",
    "ProcessDiedError",
    "RequestError",
    "ShardChanged",
    "ShardChangedError",
    "ShardIOError",
    "ShardOutsideRootError",
    "StalledError",
    "UnknownDatasetError",
    "UnknownShardError",
]


class CatalogError(Exception):
    """A dataset cannot be served as configured (start-up refuses)."""


class DecodeError(Exception):
    """The shard's content is bad: corrupt, truncated, or not matching its schema.

    `record` is the index (within the shard) of the first bad record, when known.
    """

    def __init__(self, message: str, *, record: int | None = None) -> None:
        super().__init__(message)
        self.record = record

    def __reduce__(self) -> tuple[Any, ...]:  # keep `record` across process boundaries
        return (_rebuild_decode_error, (str(self), self.record))


def _rebuild_decode_error(message: str, record: int | None) -> DecodeError:
    return DecodeError(message, record=record)


class ShardChanged(Exception):
    """The shard file is not the one that was indexed (size, mtime or checksum differ)."""


class RequestError(Exception):
    """A request the worker will not serve, with the dataset, shard and record it names."""

    def __init__(
        self, message: str, *, dataset: str = "", shard: str = "", record: int | None = None
    ) -> None:
        super().__init__(message)
        self.dataset = dataset
        self.shard = shard
        self.record = record


class NotReadyError(RequestError):
    """The worker is still indexing its datasets (UNAVAILABLE: try again, or elsewhere)."""


class DrainingError(RequestError):
    """The worker is draining and takes no new streams (UNAVAILABLE)."""


class StalledError(RequestError):
    """The stream's client read nothing for `--stream-stall-timeout` (UNAVAILABLE): the
    stream is ended so that it holds no slot and no decoded chunks; the client resumes."""


class ShardIOError(RequestError):
    """Reading a shard failed with an I/O error (EIO, a network store's timeout): another
    worker, or this one later, may read it (UNAVAILABLE). A shard that is gone, or not
    the one indexed, is `ShardChangedError`."""


class ProcessDiedError(RequestError):
    """The decoding process of a chunk died; it is replaced (UNAVAILABLE: resume the read)."""


class BusyError(RequestError):
    """The worker already runs `--max-streams` streams (RESOURCE_EXHAUSTED)."""


class UnknownDatasetError(RequestError):
    """The worker serves no dataset of that name (NOT_FOUND)."""


class UnknownShardError(RequestError):
    """The dataset has no shard of that id (NOT_FOUND)."""


class ShardOutsideRootError(RequestError):
    """A shard id that would name a file outside the data root (PERMISSION_DENIED)."""


class BadRangeError(RequestError):
    """A record range outside the shard (INVALID_ARGUMENT)."""


class MalformedRequestError(RequestError):
    """Request bytes that do not parse, or ids longer than any the worker serves
    (INVALID_ARGUMENT)."""


class ShardChangedError(RequestError):
    """The shard differs from the one the client planned for (FAILED_PRECONDITION)."""


class NoLaneError(RequestError):
    """OpenLane: this worker has no same-host lane to give (off, or its most are open)."""


class DataLossError(RequestError):
    """Records the decoder could not read (DATA_LOSS)."""

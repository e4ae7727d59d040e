"""The client's side of the wire: the only client module that touches `*_pb2`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from shardstream.client._chunkparse import is_chunk, parse_chunk
from shardstream.client._security import ClientSecurity, secure_channel
from shardstream.client.errors import (
    AccessDeniedError,
    DataLossError,
    InvalidRequestError,
    NotFoundError,
    ProtocolError,
    ShardChangedError,
    WorkerError,
)
from shardstream.v1 import shardstream_pb2 as pb
from shardstream.v1.codec import FieldSpec, dtype_from_code

SERVICE = "shardstream.v1.Worker"

Arrays = dict[str, np.ndarray[Any, Any]]


@dataclass(frozen=True, slots=True)
class ShardDesc:
    id: str
    records: int
    fingerprint: str


@dataclass(frozen=True, slots=True)
class DatasetDesc:
    """What a worker says of a dataset."""

    name: str
    format: str
    shards: tuple[ShardDesc, ...]
    schema: tuple[FieldSpec, ...]
    fingerprint: str

    @property
    def total_records(self) -> int:
        return sum(s.records for s in self.shards)


@dataclass(frozen=True, slots=True)
class Piece:
    """Records [start, start + count) of a shard, decoded to arrays."""

    start: int
    count: int
    arrays: Arrays


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """A Read stream's last message: how many records it sent, and why it ended."""

    records_sent: int
    draining: bool


def _dataset_desc(info: pb.DatasetInfo) -> DatasetDesc:
    return DatasetDesc(
        name=info.name,
        format=info.format,
        shards=tuple(ShardDesc(s.id, s.records, s.fingerprint) for s in info.shards),
        schema=tuple(
            FieldSpec(name=f.name, dtype=dtype_from_code(f.dtype).name, shape=tuple(f.shape))
            for f in info.schema
        ),
        fingerprint=info.fingerprint,
    )


def encode_read(
    *,
    dataset: str,
    shard: str,
    start: int,
    count: int,
    seed: int,
    fingerprint: str,
    max_chunk_records: int,
) -> bytes:
    return pb.ReadRequest(
        dataset=dataset,
        shard=shard,
        start=start,
        count=count,
        seed=seed,
        shard_fingerprint=fingerprint,
        max_chunk_records=max_chunk_records,
    ).SerializeToString()


def decode_response(data: bytes) -> Piece | StreamEnd:
    """Turn one streamed message into a Piece (arrays viewing the message) or an End."""
    if is_chunk(data):
        try:
            start, count, arrays = parse_chunk(data)
        except ValueError as exc:
            raise ProtocolError(f"malformed chunk: {exc}") from None
        return Piece(start, count, arrays)
    try:
        msg = pb.ReadResponse.FromString(data)
    except DecodeError as exc:
        raise ProtocolError(f"malformed message: {exc}") from None
    kind = msg.WhichOneof("kind")
    if kind == "end":
        return StreamEnd(msg.end.records_sent, msg.end.reason == pb.END_REASON_DRAINING)
    raise ProtocolError("a streamed message is neither a chunk nor an end")


class WorkerStub:
    """The Worker service's methods on one channel, with our codecs and call metadata."""

    def __init__(
        self, channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] = ()
    ) -> None:
        self._metadata = metadata
        self._read = channel.unary_stream(
            f"/{SERVICE}/Read", request_serializer=None, response_deserializer=None
        )
        self._describe = channel.unary_unary(
            f"/{SERVICE}/DescribeDataset",
            request_serializer=pb.DescribeDatasetRequest.SerializeToString,
            response_deserializer=pb.DatasetInfo.FromString,
        )
        self._list = channel.unary_unary(
            f"/{SERVICE}/ListDatasets",
            request_serializer=pb.ListDatasetsRequest.SerializeToString,
            response_deserializer=pb.ListDatasetsResponse.FromString,
        )

    def read(self, request: bytes) -> grpc.aio.UnaryStreamCall:
        """Start a Read stream (`request` from `encode_read`)."""
        return self._read(request, metadata=self._metadata)

    async def describe(
        self, dataset: str, *, timeout: float, wait_for_ready: bool = True
    ) -> DatasetDesc:
        info = await self._describe(
            pb.DescribeDatasetRequest(dataset=dataset),
            timeout=timeout,
            wait_for_ready=wait_for_ready,
            metadata=self._metadata,
        )
        return _dataset_desc(info)

    async def list_datasets(self, *, timeout: float) -> list[DatasetDesc]:
        reply = await self._list(
            pb.ListDatasetsRequest(), timeout=timeout, wait_for_ready=True, metadata=self._metadata
        )
        return [_dataset_desc(d) for d in reply.datasets]


# Status codes after which the same read may succeed elsewhere or later.
RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,  # RST_STREAM, GOAWAY mid-stream
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,  # cancelled by the server or a proxy, not by us
    }
)

_ERRORS: Mapping[grpc.StatusCode, type[WorkerError]] = {
    grpc.StatusCode.DATA_LOSS: DataLossError,
    grpc.StatusCode.FAILED_PRECONDITION: ShardChangedError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequestError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequestError,
    grpc.StatusCode.UNAUTHENTICATED: AccessDeniedError,
    grpc.StatusCode.PERMISSION_DENIED: AccessDeniedError,
}


def worker_error(exc: grpc.aio.AioRpcError, *, worker: str, dataset: str = "") -> WorkerError:
    """The typed error for a non-retryable status, with the worker's details."""
    meta = {k: v for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str)}
    record = meta.get("shardstream-record")
    cls = _ERRORS.get(exc.code(), WorkerError)
    return cls(
        exc.details() or exc.code().name,
        worker=worker,
        dataset=meta.get("shardstream-dataset") or dataset,
        shard=meta.get("shardstream-shard", ""),
        record=int(record) if record and record.isdigit() else None,
        code=exc.code().name,
    )


async def check_health(
    address: str,
    service: str = "",
    *,
    timeout: float = 5.0,
    security: ClientSecurity | None = None,
) -> tuple[bool, str]:
    """Ask a worker's standard health service; (serving?, a one-line reason)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    what = f"{address} service {service!r}" if service else address
    async with secure_channel(address, (), security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            return False, f"{what}: {exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{what}: {status}"


class HealthWatch:
    """`Watch` on a worker's health service: an async iterator of SERVING or not."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        self._stub = health_pb2_grpc.HealthStub(channel)
        self._request = health_pb2.HealthCheckRequest(service=SERVICE)
        self._serving = health_pb2.HealthCheckResponse.SERVING

    def watch(self) -> grpc.aio.UnaryStreamCall:
        """A new Watch call; it waits for the worker to be reachable."""
        return self._stub.Watch(self._request, wait_for_ready=True)

    def is_serving(self, reply: Any) -> bool:
        return bool(reply.status == self._serving)

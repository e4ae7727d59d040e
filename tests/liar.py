"""A worker that lies: it answers like the real worker it fronts, but rewrites the
chunks of every Read stream (wrong dtype, shape, fields, shard, oversize...), for tests
of what a client accepts on the wire."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardstream.v1 import shardstream_pb2 as pb
from shardstream.v1.codec import dtype_code, dtype_from_code

SERVICE = "shardstream.v1.Worker"
Lie = Callable[[pb.Chunk, int], None]  # rewrites the n-th chunk of a stream in place


def _tensor(chunk: pb.Chunk, name: str) -> pb.Tensor:
    return next(t for t in chunk.tensors if t.name == name)


def _retype(chunk: pb.Chunk, _: int) -> None:
    t = _tensor(chunk, "image")
    values = np.frombuffer(t.data, dtype_from_code(t.dtype)).astype(np.uint16)
    t.dtype = dtype_code(values.dtype)  # type: ignore[assignment]
    t.data = values.tobytes()


def _reshape(chunk: pb.Chunk, n: int) -> None:
    t = _tensor(chunk, "image")
    t.ClearField("shape")
    t.shape.extend([chunk.count, 12, 4])  # the same bytes, another per-record shape


def _reshape_later(chunk: pb.Chunk, n: int) -> None:
    if n > 0:
        _reshape(chunk, n)


def _drop(chunk: pb.Chunk, _: int) -> None:
    kept = [t for t in chunk.tensors if t.name != "label"]
    chunk.ClearField("tensors")
    chunk.tensors.extend(kept)


def _rename(chunk: pb.Chunk, _: int) -> None:
    _tensor(chunk, "label").name = "labels"


def _extra(chunk: pb.Chunk, _: int) -> None:
    chunk.tensors.add(
        name="extra", dtype=pb.DTYPE_UINT8, shape=[chunk.count], data=bytes(chunk.count)
    )


def _duplicate(chunk: pb.Chunk, _: int) -> None:
    t = _tensor(chunk, "id")
    fake = np.zeros(chunk.count, np.int64)
    chunk.tensors.add(name="id", dtype=t.dtype, shape=list(t.shape), data=fake.tobytes())


def _empty(chunk: pb.Chunk, _: int) -> None:
    chunk.ClearField("tensors")


def _other_shard(chunk: pb.Chunk, _: int) -> None:
    chunk.shard = "someone-else.npz"


def _oversize(chunk: pb.Chunk, _: int) -> None:
    chunk.tensors.add(name="pad", dtype=pb.DTYPE_UINT8, shape=[0], data=b"")
    chunk.tensors[-1].data = bytes(2 << 20)  # 2 MiB: over a 1 MiB receive limit
    chunk.tensors[-1].ClearField("shape")
    chunk.tensors[-1].shape.extend([2 << 20])


def _wrapping_lengths(chunk: pb.Chunk, _: int) -> None:
    """Lengths that add up to the values' count only modulo 2**64: records 1 and 2
    claim 2**63 - 1 values each, record 0 takes what they had plus 2."""
    t = _tensor(chunk, "tokens")
    lengths = list(t.lengths)
    if len(lengths) >= 3:
        big = (1 << 63) - 1
        lengths[:3] = [lengths[0] + lengths[1] + lengths[2] + 2, big, big]
        t.ClearField("lengths")
        t.lengths.extend(lengths)


def _split_character(chunk: pb.Chunk, _: int) -> None:
    """A string record boundary moved into a two-byte character: the values stay valid
    UTF-8 as a whole, two records do not."""
    t = _tensor(chunk, "caption")
    lengths, data = list(t.lengths), bytes(t.data)
    ends = np.cumsum(lengths)
    for i in range(len(lengths) - 1):  # a record ending in a two-byte character
        if lengths[i] >= 2 and data[ends[i] - 2] & 0xE0 == 0xC0:
            lengths[i] -= 1
            lengths[i + 1] += 1
            t.ClearField("lengths")
            t.lengths.extend(lengths)
            return


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details


def _huge_status(chunk: pb.Chunk, n: int) -> None:
    """After one chunk, UNAVAILABLE with 20 KB of details: over gRPC's 16 KiB limit on
    received metadata, so the client sees RESOURCE_EXHAUSTED, not what was meant."""
    if n == 1:
        raise Abort(grpc.StatusCode.UNAVAILABLE, "x" * 20_000)


def _overcount(end: pb.End) -> None:
    end.records_sent += 5


def _honest(chunk: pb.Chunk, n: int) -> None:
    pass


LIES: dict[str, Lie] = {
    "dtype": _retype, "shape": _reshape, "shape-later": _reshape_later, "missing": _drop,
    "renamed": _rename, "extra": _extra, "duplicate": _duplicate, "no-tensors": _empty,
    "other-shard": _other_shard, "oversize": _oversize,
    "wrapping-lengths": _wrapping_lengths, "split-character": _split_character,
    "huge-status": _huge_status, "overcount": _honest,
}  # fmt: skip
END_LIES: dict[str, Callable[[pb.End], None]] = {"overcount": _overcount}
RAGGED_LIES = ("wrapping-lengths", "split-character")  # for a dataset with tokens, caption


@contextlib.asynccontextmanager
async def lying_worker(upstream: str, lie: str) -> AsyncIterator[str]:
    """A server on 127.0.0.1:<ephemeral> fronting `upstream`, telling `lie` in every
    Read stream; yields its address."""
    rewrite = LIES[lie]
    channel = grpc.aio.insecure_channel(upstream)
    describe = channel.unary_unary(f"/{SERVICE}/DescribeDataset")
    read = channel.unary_stream(f"/{SERVICE}/Read")

    async def on_describe(request: bytes, context: Any) -> bytes:
        reply: bytes = await describe(request)
        return reply

    async def on_read(request: bytes, context: Any) -> AsyncIterator[bytes]:
        n = 0
        async for data in read(request):
            msg = pb.ReadResponse.FromString(data)
            try:
                if msg.WhichOneof("kind") == "chunk":
                    rewrite(msg.chunk, n)
                    n += 1
                elif msg.WhichOneof("kind") == "end" and lie in END_LIES:
                    END_LIES[lie](msg.end)
            except Abort as abort:
                await context.abort(abort.code, abort.details)
            yield msg.SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "DescribeDataset": grpc.unary_unary_rpc_method_handler(on_describe),
            "Read": grpc.unary_stream_rpc_method_handler(on_read),
        },
    )
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
    server.add_generic_rpc_handlers((handler,))
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for service in ("", SERVICE):
        await checks.set(service, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)
        await channel.close()

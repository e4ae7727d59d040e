"""A worker's description is checked before anything is planned from it: one that cannot be
right refuses the start with a ProtocolError naming the worker; a huge but possible one
(10**15 records) starts at once."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from shardstream.client import Loader
from shardstream.client._agreement import Describing, verify
from shardstream.client._wire import HealthWatch, WorkerStub, _dataset_desc
from shardstream.client._workers import Conn
from shardstream.client.errors import DatasetMismatchError, ProtocolError
from shardstream.v1 import shardstream_pb2 as pb

SERVICE = "shardstream.v1.Worker"
UINT8 = 6  # shardstream.v1.DType


def info(
    shards: list[tuple[str, int]] | None = None,
    schema: list[tuple[str, int, list[int]]] | None = None,
    total: int = 0,
) -> pb.DatasetInfo:
    """A DatasetInfo of dataset 'train' as a worker could send it (defaults: a good one)."""
    shards = [("part-000", 100), ("part-001", 100)] if shards is None else shards
    schema = [("x", UINT8, [3]), ("id", 5, [])] if schema is None else schema
    return pb.DatasetInfo(
        name="train",
        format="npz",
        shards=[pb.ShardInfo(id=i, records=n, fingerprint=f"f{i}") for i, n in shards],
        schema=[pb.FieldSpec(name=n, dtype=d, shape=s) for n, d, s in schema],  # type: ignore[arg-type]
        fingerprint="0123456789abcdef",
        total_records=total,
    )


@contextlib.asynccontextmanager
async def describing(answer: pb.DatasetInfo) -> AsyncIterator[str]:
    """A worker on 127.0.0.1 that answers DescribeDataset with `answer` and is SERVING."""

    async def describe(request: bytes, context: Any) -> bytes:
        return answer.SerializeToString()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE, {"DescribeDataset": grpc.unary_unary_rpc_method_handler(describe)}
            ),
        )
    )
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    for name in ("", SERVICE):
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


IMPOSSIBLE = {
    "duplicate shard ids": (
        info(shards=[("part-000", 100), ("part-000", 100)]), "lists shard 'part-000' twice"),
    "a shard without an id": (info(shards=[("", 100)]), "a shard without an id"),
    "a shard with negative records": (
        info(shards=[("part-000", 100), ("part-001", -5)]), "gives shard 'part-001' -5 records"),
    "more records than 2**53": (
        info(shards=[("part-000", 2**52), ("part-001", 2**52 + 1)]), "more than 2\\*\\*53"),
    "a total that is not the shards'": (info(total=7), "claims 7 records, its shards 200"),
    "an unknown dtype code": (
        info(schema=[("x", 99, [3])]), "gives field 'x' the unknown dtype code 99"),
    "an empty schema": (info(schema=[]), "no fields"),
    "duplicate field names": (
        info(schema=[("x", UINT8, [3]), ("x", UINT8, [2])]), "lists field 'x' twice"),
    "a field without a name": (info(schema=[("", UINT8, [3])]), "a field without a name"),
    "a negative dimension": (info(schema=[("x", UINT8, [3, -1])]), r"the shape \[3, -1\]"),
    "an absurd record size": (info(schema=[("x", UINT8, [2**40, 2**40])]), "the shape"),
    "an overflowing shape": (info(schema=[("x", UINT8, [2**62, 4])]), "the shape"),
    "too many dimensions": (info(schema=[("x", UINT8, [1] * 40)]), "the shape"),
}  # fmt: skip


@pytest.mark.parametrize(("answer", "match"), IMPOSSIBLE.values(), ids=IMPOSSIBLE.keys())
async def test_an_impossible_description_refuses_the_start_naming_the_worker(
    answer: pb.DatasetInfo, match: str
) -> None:
    async with describing(answer) as address:
        with pytest.raises(ProtocolError, match=match) as caught:
            async with Loader([address], dataset="train", batch_size=4, describe_timeout=5):
                pass
    assert caught.value.worker == address and caught.value.dataset == "train"
    assert f"worker {address}" in str(caught.value)


async def test_a_good_description_starts() -> None:
    async with describing(info(total=200)) as address:
        async with Loader([address], dataset="train", batch_size=4) as loader:
            assert loader.dataset.total_records == 200
            assert [f.name for f in loader.schema] == ["x", "id"]


async def test_a_worker_back_with_an_impossible_description_gets_no_reads() -> None:
    """After the start, a worker is described again before its first read (`verify`): one
    whose description cannot be right is left out for good, with the reason."""
    reference = _dataset_desc(info())
    how = Describing(dataset="train", timeout=5, backoff_base=0.1, backoff_cap=1)
    async with describing(info(schema=[])) as address:
        channel = grpc.aio.insecure_channel(address)
        try:
            conn = Conn(address, channel, WorkerStub(channel), HealthWatch(channel))
            why = await verify(conn, reference, how)
        finally:
            await channel.close()
    assert why is not None and why == conn.excluded
    assert f"worker {address}" in why and "no fields" in why
    assert not conn.verified


async def test_a_description_of_1e15_records_starts_at_once() -> None:
    """Was: 14.9 million reads planned at the start for rank 0 of 8 (1-byte records, 8 MiB
    reads then; 16 MiB now), 40 to 80 s and 2.6 GB before `start()` returned."""
    huge = info(shards=[(f"part-{i:03d}", 250_000_000_000_000) for i in range(4)],
                schema=[("x", UINT8, [])])  # fmt: skip
    async with describing(huge) as address:
        t0 = time.perf_counter()
        async with Loader([address], dataset="train", batch_size=64, rank=0, world_size=8,
                          shuffle=True, seed=3) as loader:  # fmt: skip
            plan = loader.plan(0)
            assert plan.records == 10**15 // 8
            assert loader.batches_per_epoch() == 10**15 // 8 // 64
            assert len(plan.windows[0].reads) == -(-(10**15 // 8) // (16 << 20))
        assert time.perf_counter() - t0 < 5


UINT16 = pb.DTYPE_UINT16


@pytest.mark.parametrize("first", ["uint8", "uint16"])
async def test_workers_with_one_fingerprint_but_two_schemas_refuse_the_start(first: str) -> None:
    """The same fingerprint and shards, another schema: a worker whose fingerprint does
    not cover its schema (a bug, or another pipeline) must not decide the dtype by the
    order of the addresses. Was: the first-listed worker's schema won, the other one was
    excluded mid-epoch for 'breaking the contract'."""
    narrow, wide = info(), info(schema=[("x", UINT16, [3]), ("id", 5, [])])
    answers = (narrow, wide) if first == "uint8" else (wide, narrow)
    async with describing(answers[0]) as a, describing(answers[1]) as b:
        with pytest.raises(DatasetMismatchError, match="schema") as caught:
            async with Loader([a, b], dataset="train", batch_size=4, describe_timeout=5):
                pass
    assert a in str(caught.value) and b in str(caught.value)
    # a worker that comes back later with the other schema is left out, with the reason
    how = Describing(dataset="train", timeout=5, backoff_base=0.1, backoff_cap=1)
    async with describing(wide) as address:
        channel = grpc.aio.insecure_channel(address)
        try:
            conn = Conn(address, channel, WorkerStub(channel), HealthWatch(channel))
            why = await verify(conn, _dataset_desc(narrow), how)
        finally:
            await channel.close()
    assert why is not None and why == conn.excluded and "schema" in why
    assert not conn.verified


def ragged_info(record_bytes: int) -> pb.DatasetInfo:
    """`info()` with a string field (ragged) and a measured mean record size."""
    answer = info()
    answer.schema.append(pb.FieldSpec(name="text", dtype=pb.DTYPE_STRING, ragged=True))
    answer.record_bytes = record_bytes
    return answer


@pytest.mark.parametrize("record_bytes", [1, 3 + 8 + 7, 2**31, 2**62])
async def test_an_impossible_record_size_refuses_the_start(record_bytes: int) -> None:
    """The measured mean size sizes every read: one below what a record of the schema
    takes at least (3 bytes of x, 8 of id, 8 of the text's length) would make reads of
    millions of records; one above what a message can carry, reads of one record."""
    async with describing(ragged_info(record_bytes)) as address:
        with pytest.raises(ProtocolError, match="on average") as caught:
            async with Loader([address], dataset="train", batch_size=4, describe_timeout=5):
                pass
    assert caught.value.worker == address


async def test_a_measured_record_size_sizes_the_reads() -> None:
    async with describing(ragged_info(3 + 8 + 8 + 4096)) as address:
        async with Loader([address], dataset="train", batch_size=4, read_bytes=1 << 20) as ld:
            assert ld.dataset.record_bytes == 4115
            assert ld.plan(0).read_records == (1 << 20) // 4115 // 4 * 4
    # a worker that does not measure: the guess, 1 KiB a ragged value
    async with describing(ragged_info(0)) as address:
        async with Loader([address], dataset="train", batch_size=4, read_bytes=1 << 20) as ld:
            assert ld.dataset.record_bytes == 0
            assert ld.plan(0).read_records == (1 << 20) // (3 + 8 + 8 + 1024) // 4 * 4


async def test_workers_that_measured_other_record_sizes_refuse_the_start() -> None:
    """The same fingerprint, another measured size (workers of two versions, or
    transforms whose code differs): their reads would be cut differently, so the plan
    depends on which worker answered first."""
    async with describing(ragged_info(500)) as a, describing(ragged_info(900)) as b:
        with pytest.raises(DatasetMismatchError, match="measured mean size, 500 vs 900"):
            async with Loader([a, b], dataset="train", batch_size=4, describe_timeout=5):
                pass


async def test_workers_that_do_not_measure_agree_with_those_that_do() -> None:
    """A rolling upgrade: workers of the version before measured no record size (0).
    They serve the same records, so a fleet of both starts, with the size one measured;
    and a worker back later with another size is used (the reads are planned). Was: the
    start refused, and each upgraded worker was left out until none was left."""
    async with describing(ragged_info(0)) as old, describing(ragged_info(900)) as new:
        async with Loader([old, new], dataset="train", batch_size=4, describe_timeout=5) as ld:
            assert ld.dataset.record_bytes == 900
    how = Describing(dataset="train", timeout=5, backoff_base=0.1, backoff_cap=1)
    async with describing(ragged_info(700)) as address:
        channel = grpc.aio.insecure_channel(address)
        try:
            conn = Conn(address, channel, WorkerStub(channel), HealthWatch(channel))
            assert await verify(conn, _dataset_desc(ragged_info(900)), how) is None
        finally:
            await channel.close()
    assert conn.verified and not conn.excluded

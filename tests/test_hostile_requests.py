"""Requests are read only once trusted, and nothing a client sends floods the log or a status.

An in-process worker with a bearer token, on 127.0.0.1, and raw gRPC calls.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2

from shardstream.server import Worker
from shardstream.server._security import ServerSecurity
from shardstream.server._status import LogLimit, shown
from shardstream.v1 import shardstream_pb2 as pb

from conftest import worker_config

TOKEN = "hostile-test-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
READ = "/shardstream.v1.Worker/Read"
DESCRIBE = "/shardstream.v1.Worker/DescribeDataset"
LIST = "/shardstream.v1.Worker/ListDatasets"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
HEALTH_WATCH = "/grpc.health.v1.Health/Watch"
JUNK = b"\xff\xff\xff\xff\x0f junk, not a protobuf message"


@pytest.fixture
async def worker(npz_root: Path, tmp_path: Path) -> AsyncIterator[Worker]:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    config = worker_config(npz_root, security=ServerSecurity(auth_token_file=token))
    async with Worker(config) as w:
        yield w


@pytest.fixture
async def channel(worker: Worker) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(worker.address) as ch:
        yield ch


async def call(
    channel: grpc.aio.Channel, method: str, request: bytes, metadata: object = AUTH
) -> grpc.aio.AioRpcError:
    """The error `request` gets (a stream's messages are read to its end)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        if method in (READ, HEALTH_WATCH):
            async for _ in channel.unary_stream(method)(request, metadata=metadata, timeout=10):
                pass
        else:
            await channel.unary_unary(method)(request, metadata=metadata, timeout=10)
    return err.value


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], caplog.text[:2000]
    assert "Traceback" not in caplog.text, caplog.text[:2000]


def read(shard: str = "shard-00000.npz", dataset: str = "train") -> bytes:
    return pb.ReadRequest(dataset=dataset, shard=shard, start=0, count=1).SerializeToString()


async def test_the_token_is_checked_before_the_request_is_read(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for method in (READ, DESCRIBE, LIST):
        err = await call(channel, method, JUNK, metadata=())
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        assert "missing bearer token" in str(err.details())
    no_tracebacks(caplog)
    assert "deserializ" not in caplog.text.lower()


async def test_junk_requests_are_invalid_argument_in_one_line(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for method, name in ((READ, "ReadRequest"), (DESCRIBE, "DescribeDatasetRequest"),
                         (LIST, "ListDatasetsRequest")):  # fmt: skip
        err = await call(channel, method, JUNK)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        details = str(err.details())
        assert f"the request is not a {name}" in details and len(details) < 200, details
    no_tracebacks(caplog)


async def test_junk_health_requests_are_invalid_argument_too(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    """Health stays open without a token, and gRPC decodes its requests itself."""
    caplog.set_level(logging.DEBUG)
    for method in (HEALTH_CHECK, HEALTH_WATCH):
        err = await call(channel, method, JUNK, metadata=())
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err
        assert len(str(err.details())) < 400
    check = channel.unary_unary(HEALTH_CHECK)
    ok = await check(health_pb2.HealthCheckRequest().SerializeToString(), timeout=10)
    assert health_pb2.HealthCheckResponse.FromString(ok).status == 1  # SERVING
    no_tracebacks(caplog)


async def test_ids_a_client_sends_are_bounded_where_echoed_and_logged(
    worker: Worker, channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # Longer than any served id: refused before it is looked up, quoting 64 characters.
    err = await call(channel, READ, read(shard="s" * 60_000))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "shard id in the request has 60000 bytes" in str(err.details())
    assert len(str(err.details())) < 300
    # Over the request limit: gRPC refuses it unread.
    err = await call(channel, READ, read(shard="s" * (3 << 20)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "sss" not in str(err.details()) and len(str(err.details())) < 300
    # Unknown ids up to the limit: the status and its metadata show 256 characters of them.
    for request, code in (
        (read(shard="u" * 4000), grpc.StatusCode.NOT_FOUND),
        (read(dataset="d" * 4000), grpc.StatusCode.NOT_FOUND),
        (read(shard="../" + "x" * 3000), grpc.StatusCode.PERMISSION_DENIED),
    ):
        err = await call(channel, READ, request)
        assert err.code() == code, err
        details = str(err.details())
        assert "…(" in details and len(details) < 1200, details
        metadata = dict(err.trailing_metadata() or ())
        assert all(len(str(v)) < 600 for v in metadata.values()), metadata
    err = await call(
        channel, DESCRIBE, pb.DescribeDatasetRequest(dataset="d" * 4000).SerializeToString()
    )
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "…(4000 bytes)" in str(err.details()) and len(str(err.details())) < 1200
    assert max(len(r.getMessage()) for r in caplog.records) < 1500
    no_tracebacks(caplog)


async def test_a_flood_of_refusals_logs_a_few_lines(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "shardstream.worker")
    for _ in range(100):
        await call(channel, READ, JUNK)  # INVALID_ARGUMENT
        await call(channel, READ, read(), metadata=())  # UNAUTHENTICATED
    lines = [r.getMessage() for r in caplog.records]
    invalid = [line for line in lines if line.startswith("INVALID_ARGUMENT")]
    refused = [line for line in lines if line.startswith("refused")]
    assert 1 <= len(invalid) < 30 and 1 <= len(refused) < 30, lines


def test_log_limit_counts_the_lines_it_leaves_out(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limit = LogLimit(logging.getLogger("test.limit"), per_second=2, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, "test.limit"):
        logged = [limit.log(logging.WARNING, "A", "a %d", i) for i in range(5)]
        assert logged == [True, True, False, False, False]
        assert limit.log(logging.WARNING, "B", "b")  # each kind has its own rate
        assert limit.left_out("A") == 3
        now[0] += 1.0
        assert limit.log(logging.WARNING, "A", "a %d", 5)
    assert [r.getMessage() for r in caplog.records] == [
        "a 0",
        "a 1",
        "b",
        "a 5 (and 3 more like it in the last seconds, not logged)",
    ]
    assert limit.left_out("A") == 0


def test_shown_bounds_text() -> None:
    assert shown("abc") == "abc"
    assert shown("é" * 300) == "é" * 256 + "…(600 bytes)"

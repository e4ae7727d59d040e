"""The worker's limits on clients: options, their flags and variables, and their gRPC settings."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardstream._common.args import UsageParser
from shardstream.server import DatasetSpec, WorkerConfig
from shardstream.server._servicer import peer_host, stalled_share
from shardstream.server._worker import Worker, grpc_options
from shardstream.server._writes import StallWatch
from shardstream.server.cli import add_worker_args, config_from_args

FLAGS = ["--data-root", "/data", "--dataset", "train=*.npz"]


def parse(*argv: str) -> WorkerConfig:
    parser = UsageParser(prog="shardstream-worker")
    add_worker_args(parser)
    return config_from_args(parser.parse_args([*FLAGS, *argv]))


def config(**kw: object) -> WorkerConfig:
    return WorkerConfig(data_root="/data", datasets=(DatasetSpec.parse("t=*.npz"),), **kw)  # type: ignore[arg-type]


def test_defaults_flags_and_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("STREAM_STALL_TIMEOUT", "MAX_CONNECTIONS", "MAX_STREAMS_PER_CONNECTION",
                 "IDLE_CONNECTION_TIMEOUT", "MAX_CONNECTION_AGE", "MAX_HEALTH_WATCHES"):  # fmt: skip
        monkeypatch.delenv(f"SHARDSTREAM_{name}", raising=False)
    c = parse()
    assert (c.stream_stall_timeout, c.max_connections, c.max_streams_per_connection,
            c.idle_connection_timeout) == (30.0, 4096, 16, 300.0)  # fmt: skip
    assert (c.max_connection_age, c.max_health_watches, c.health_watches) == (600.0, None, 2048)
    assert c.health_watch_seconds == 15.0
    c = parse("--stream-stall-timeout", "2.5", "--max-connections", "100",
              "--max-streams-per-connection", "4", "--idle-connection-timeout", "60",
              "--max-connection-age", "120", "--max-health-watches", "7")  # fmt: skip
    assert (c.stream_stall_timeout, c.max_connections, c.max_streams_per_connection,
            c.idle_connection_timeout) == (2.5, 100, 4, 60.0)  # fmt: skip
    assert (c.max_connection_age, c.max_health_watches, c.health_watches) == (120.0, 7, 7)
    monkeypatch.setenv("SHARDSTREAM_STREAM_STALL_TIMEOUT", "7")
    monkeypatch.setenv("SHARDSTREAM_MAX_CONNECTIONS", "9")
    monkeypatch.setenv("SHARDSTREAM_MAX_CONNECTION_AGE", "30")
    c = parse("--max-connections", "10")  # a flag wins over its variable
    assert (c.stream_stall_timeout, c.max_connections, c.max_connection_age) == (7.0, 10, 30.0)
    assert c.health_watches == 5


def test_grpc_settings() -> None:
    options = dict(
        grpc_options(
            config(
                stream_stall_timeout=2.5,
                max_connections=100,
                max_streams_per_connection=4,
                idle_connection_timeout=60,
            )
        )
    )
    assert options["grpc.so_reuseport"] == 0
    assert options["grpc.max_allowed_incoming_connections"] == 100
    assert options["grpc.max_concurrent_streams"] == 4
    assert options["grpc.server_handshake_timeout_ms"] == 2500
    assert options["grpc.max_connection_idle_ms"] == 60_000
    assert options["grpc.max_receive_message_length"] == 64 * 1024  # requests are small
    # Connections age out; what still runs on them gets a stall timeout, then is cut.
    assert options["grpc.max_connection_age_ms"] == 600_000
    assert options["grpc.max_connection_age_grace_ms"] == 2500


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"stream_stall_timeout": 0}, "stream_stall_timeout must be a number of seconds in (0"),
        ({"stream_stall_timeout": float("nan")}, "stream_stall_timeout must be"),
        ({"idle_connection_timeout": -1}, "idle_connection_timeout must be"),
        ({"max_connections": 0}, "max_connections must be in [1, 2147483647], got 0"),
        ({"max_streams_per_connection": 0}, "max_streams_per_connection must be in [1,"),
        ({"max_connection_age": 0}, "max_connection_age must be a number of seconds in (0"),
        ({"max_health_watches": 0}, "max_health_watches must be in [1, 2147483647], got 0"),
    ],
)
def test_config_refuses_bad_limits(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as err:
        config(**kw)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--stream-stall-timeout", "0"], ["'0'", "expected a number of seconds > 0"]),
        (["--max-connections", "many"], ["'many'", "expected an integer in [1,"]),
        (["--max-streams-per-connection", "0"], ["'0'", "expected an integer in [1,"]),
        (["--max-connection-age", "-1"], ["'-1'", "expected a number of seconds > 0"]),
        (["--max-health-watches", "none"], ["'none'", "expected an integer in [1,"]),
    ],
)
def test_bad_flags_are_one_line_usage_errors(args: list[str], words: list[str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHARDSTREAM_")}
    r = subprocess.run(
        [sys.executable, "-m", "shardstream.server", *FLAGS, *args],
        capture_output=True, text=True, timeout=60, env=clean, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert all(word in line for word in words), line


async def test_listen_address_and_address(npz_root: Path) -> None:
    c = WorkerConfig(data_root=npz_root, datasets=(DatasetSpec.parse("train=*.npz"),),
                     host="0.0.0.0", port=0, processes=0)  # fmt: skip
    async with Worker(c) as w:
        assert w.listen_address == f"0.0.0.0:{w.port}"
        assert w.address == f"127.0.0.1:{w.port}"  # what a client on this host dials


async def test_a_port_in_use_is_refused_in_process(npz_root: Path) -> None:
    spec = (DatasetSpec.parse("train=*.npz"),)
    async with Worker(WorkerConfig(data_root=npz_root, datasets=spec, port=0, processes=0)) as a:
        second = Worker(WorkerConfig(data_root=npz_root, datasets=spec, port=a.port, processes=0))
        with pytest.raises(OSError, match=f"port {a.port} is already in use"):
            await second.start()
        await second.wait_closed()  # closed again, nothing left running


# -- stalled streams: counted per client host -----------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:10.0.0.7:5123", "10.0.0.7"),
        ("ipv6:[::1]:5123", "::1"),
        ("ipv6:%5B::1%5D:5123", "::1"),
        ("ipv6:[::FFFF:127.0.0.1]:80", "127.0.0.1"),  # an IPv4 client on a dual-stack port
        ("ipv6:[fd00::2]:1", "fd00::2"),
        ("unix:/run/w.sock", "unix:/run/w.sock"),
    ],
)
def test_the_client_host_of_a_peer(peer: str, host: str) -> None:
    assert peer_host(peer) == host


async def test_a_host_holding_its_share_of_stalled_streams_gets_no_more() -> None:
    """Streams its clients read nothing of count against their host: at its share
    (--max-streams / 4), once the worker is half full, its new reads are refused, while
    other hosts are admitted up to --max-streams running and 2 x --max-streams running
    plus stalled."""
    from concurrent.futures import ThreadPoolExecutor

    from shardstream.server._servicer import WorkerServicer
    from shardstream.server.errors import BusyError

    with ThreadPoolExecutor(1) as executor:
        servicer = WorkerServicer(config(max_streams=8), executor)
        assert stalled_share(8) == 2 and stalled_share(3) == 1
        servicer.stalled, servicer.stalled_by = 2, {"10.0.0.7": 2}
        servicer._admit("10.0.0.7")  # over its share, but the worker is not half full
        servicer.active = 6
        with pytest.raises(BusyError, match=r"clients on 10\.0\.0\.7 hold 2 streams they read"):
            servicer._admit("10.0.0.7")
        servicer._admit("10.0.0.8")  # another host: served
        servicer.stalled, servicer.stalled_by = 9, {"10.0.0.7": 1, **{f"h{i}": 1 for i in range(8)}}
        servicer.active = 7
        with pytest.raises(BusyError, match="already serves 7 streams and holds 9 stalled"):
            servicer._admit("10.0.0.8")  # the worker's own bound still holds
        servicer.close()


# -- the stall watch: one timer per stream, not one per write ------------------------------------


async def test_a_write_that_waits_past_the_stall_timeout_is_reported_while_it_waits() -> None:
    """`on_stall` runs once, while the write still waits; the write then completes."""
    stalls: list[bool] = []
    release, reported = asyncio.Event(), asyncio.Event()

    def on_stall() -> None:
        stalls.append(release.is_set())
        reported.set()

    watch = StallWatch(0.2, on_stall)
    write = asyncio.ensure_future(watch.write(release.wait()))
    await asyncio.wait_for(reported.wait(), 30)
    assert stalls == [False] and watch.stalled() and not write.done()
    release.set()
    await write
    watch.close()
    assert stalls == [False]


async def test_writes_that_each_complete_never_stall_however_long_the_stream() -> None:
    """Many writes, each well within the timeout, over several timeouts in all: the one
    timer moves on with the writes and never reports a stall."""
    loop = asyncio.get_running_loop()
    stalls: list[int] = []
    watch = StallWatch(0.5, lambda: stalls.append(1))
    began = loop.time()
    while loop.time() - began < 1.6:  # past three timeouts: the timer fired and moved on
        await watch.write(asyncio.sleep(0.01))
    watch.close()
    assert not stalls and not watch.stalled()


async def test_a_failed_write_means_the_client_left() -> None:
    async def fails() -> None:
        raise RuntimeError("the RPC is already finished")

    watch = StallWatch(5.0, lambda: None)
    with pytest.raises(asyncio.CancelledError, match="the write failed"):
        await watch.write(fails())
    watch.close()

"""Clients that never read, flood connections or reuse a port cannot take a worker down.

Real worker processes on 127.0.0.1 (their memory is read from /proc/PID/status) and
raw gRPC clients for the misbehaviour; the legitimate client is a `Loader`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shardstream.client import ClientSecurity, Loader
from shardstream.server import DatasetSpec, Worker, WorkerConfig
from shardstream.server._process import WorkerProcess
from shardstream.server._security import ServerSecurity
from shardstream.v1 import shardstream_pb2 as pb

from conftest import collect_epoch, ids_of, ipv6_loopback, until

MiB = 1 << 20
RECORDS = 6_000  # of 3 KiB: 18 MB, so a stream has chunks left to hold
CHUNK = 2 * MiB
READ = "/shardstream.v1.Worker/Read"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


@pytest.fixture(scope="module")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("big")
    image = np.random.default_rng(0).integers(0, 255, (RECORDS, 32, 32, 3), dtype=np.uint8)
    np.savez(root / "a.npz", id=np.arange(RECORDS), image=image)
    return root


def status_mb(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak) of a process, in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(value.split()[0]) / 1024
    return values


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextlib.contextmanager
def worker(root: Path, *extra: str) -> Iterator[WorkerProcess]:
    args = ["--data-root", str(root), "--dataset", "train=*.npz", "--processes", "1", *extra]
    with WorkerProcess.start(args) as w:
        yield w


@contextlib.asynccontextmanager
async def never_read(address: str, streams: int, connections: int) -> AsyncIterator[list]:
    """`streams` Read calls over `connections` connections, whose messages nobody reads."""
    request = pb.ReadRequest(dataset="train", shard="a.npz", start=0, count=RECORDS)
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", -1)]
    channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(connections)]
    calls = [
        channels[i % connections].unary_stream(READ)(request.SerializeToString())
        for i in range(streams)
    ]
    try:
        yield calls
    finally:
        for call in calls:
            call.cancel()
        for channel in channels:
            await channel.close()


async def started(calls: list, n: int, timeout: float = 30) -> None:
    """Wait until `n` of `calls` have their response headers: the worker runs them."""
    waits = [asyncio.ensure_future(call.initial_metadata()) for call in calls]
    deadline = time.monotonic() + timeout
    try:
        while sum(w.done() for w in waits) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{sum(w.done() for w in waits)} of {n} streams started")
            await asyncio.wait([w for w in waits if not w.done()], timeout=left,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
    finally:
        for w in waits:
            w.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def one_epoch(address: str, **options: object) -> np.ndarray:
    opts: dict[str, object] = {"batch_size": 500, "retry_deadline": 60.0, "tune_malloc": False}
    opts.update(options)
    async with Loader([address], dataset="train", **opts) as loader:  # type: ignore[arg-type]
        return ids_of(await collect_epoch(loader, 0))


# -- streams whose clients read nothing ---------------------------------------------------------


async def test_never_read_streams_end_memory_stays_bounded_and_returns(big_root: Path) -> None:
    """64 streams opened and never read, each on its own connection (so the per-connection
    limit does not hold them back): they are ended after --stream-stall-timeout, a Loader
    on another host (::1, where there is one) is served meanwhile, the worker's peak stays
    under the README's bound, and once the streams are abandoned its memory returns near
    its baseline. (Clients on the never-reading host itself are refused meanwhile: its
    stalled streams are over its share.)"""
    max_streams = 64
    other_host = ipv6_loopback()
    extra = ("--host", "::") if other_host else ()
    with worker(big_root, *extra, "--chunk-bytes", str(CHUNK), "--stream-stall-timeout",
                "2") as w:  # fmt: skip
        attacker = f"127.0.0.1:{w.port}"  # w.address: [::1] on a dual-stack worker
        assert sorted((await one_epoch(w.address)).tolist()) == list(range(RECORDS))  # warm
        baseline = status_mb(w.pid)["VmRSS"]
        async with never_read(attacker, 64, 64) as calls:
            await started(calls, 64)
            if other_host:
                ids = await one_epoch(w.address)  # retries while the worker is full
                assert sorted(ids.tolist()) == list(range(RECORDS))
            await until(lambda: any("its client read nothing for 2s" in line for line in w.log),
                        30, "the never-read streams ended")  # fmt: skip
            assert not any(call.done() for call in calls)  # still open: served meanwhile
            peak = status_mb(w.pid)["VmHWM"]
            # README "Resource bounds": running streams hold 3 chunks, stalled ones 2; at
            # most --max-streams run, and running + stalled stay under 2 x --max-streams.
            bound = baseline + 5 * max_streams * CHUNK / MiB
            assert peak < bound + 64, (baseline, peak, bound)
        await until(
            lambda: status_mb(w.pid)["VmRSS"] < baseline + 48,
            30,
            f"worker memory back near its baseline of {baseline:.0f} MB "
            f"(now {status_mb(w.pid)['VmRSS']:.0f} MB)",
        )
        assert w.terminate() == 0


async def test_one_connection_cannot_take_every_stream(big_root: Path) -> None:
    """A client opening 64 streams on one connection gets --max-streams-per-connection of
    them; another client is served at once: none of its reads is refused (and retried),
    while the first client's streams all stay open (their stall timeout is never reached
    here, so nothing but the per-connection limit can leave room)."""
    stall = "600"
    with worker(big_root, "--chunk-bytes", str(CHUNK), "--max-streams-per-connection", "8",
                "--stream-stall-timeout", stall) as w:  # fmt: skip
        async with never_read(w.address, 64, 1) as calls:
            await started(calls, 8)
            async with Loader([w.address], dataset="train", batch_size=500,
                              tune_malloc=False) as loader:  # fmt: skip
                ids = ids_of(await collect_epoch(loader, 0))
                stats = loader.statistics()
            assert sorted(ids.tolist()) == list(range(RECORDS))
            assert stats.resumes == 0  # no read refused as RESOURCE_EXHAUSTED
            assert not any(call.done() for call in calls)
        assert w.terminate() == 0


async def test_a_stalled_client_reads_what_was_sent_then_unavailable(big_root: Path) -> None:
    """A client that stops reading gets its stream ended; when it reads again it gets the
    chunks already on their way, then UNAVAILABLE naming the stall, and resumes."""
    with worker(big_root, "--chunk-bytes", str(CHUNK), "--stream-stall-timeout", "1") as w:
        async with never_read(w.address, 1, 1) as (call,):
            await started([call], 1)
            await until(
                lambda: any("its client read nothing for 1s" in line for line in w.log),
                30,
                "the worker ending the stalled stream",
            )
            received = 0
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for message in call:
                    received += 1
                    assert pb.ReadResponse.FromString(message).HasField("chunk")
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "read nothing for 1s (--stream-stall-timeout)" in str(err.value.details())
            assert 1 <= received < RECORDS * 3072 // CHUNK
        assert w.terminate() == 0


def in_process(root: Path, **kw: object) -> WorkerConfig:
    """A worker on this test's event loop (its servicer's counts can be looked at)."""
    options: dict[str, object] = {"processes": 0, "port": 0, "chunk_bytes": CHUNK}
    options.update(kw)
    return WorkerConfig(data_root=root, datasets=(DatasetSpec.parse("train=*.npz"),), **options)  # type: ignore[arg-type]


@pytest.mark.skipif(not ipv6_loopback(), reason="needs ::1 beside 127.0.0.1: two client hosts")
async def test_clients_that_stall_streams_on_many_connections_keep_no_other_host_out(
    big_root: Path,
) -> None:
    """A client host (127.0.0.1) opening never-read streams on 32 connections, each opened
    again as soon as it ends, so that as many streams as it can get stall: once it holds
    its share of stalled streams, its new reads are refused, and a loader on another host
    (::1) is served (before: the attacker held every slot, running plus stalled, and every
    other client got RESOURCE_EXHAUSTED for as long as it went on, health SERVING)."""
    limit = 4
    config = in_process(big_root, host="::", max_streams=limit, stream_stall_timeout=1.0)
    async with Worker(config) as w:
        servicer = w._servicer
        assert servicer is not None
        refused = [0]
        stop = asyncio.Event()

        async def attack() -> None:
            request = pb.ReadRequest(dataset="train", shard="a.npz", start=0, count=RECORDS)
            options = [("grpc.use_local_subchannel_pool", 1),
                       ("grpc.max_receive_message_length", -1)]  # fmt: skip
            channels = [grpc.aio.insecure_channel(f"127.0.0.1:{w.port}", options=options)
                        for _ in range(32)]  # fmt: skip
            calls: list = [None] * len(channels)
            try:
                while not stop.is_set():
                    for i, channel in enumerate(channels):
                        call = calls[i]
                        if call is None or call.done():
                            if (
                                call is not None
                                and await call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                            ):
                                refused[0] += 1
                            calls[i] = channel.unary_stream(READ)(request.SerializeToString())
                    await asyncio.sleep(0.05)  # the attacker's pace, not a wait
            finally:
                for call in calls:
                    if call is not None:
                        call.cancel()
                for channel in channels:
                    await channel.close()

        attacker = asyncio.ensure_future(attack())
        try:
            await until(lambda: servicer.stalled >= limit, 30, f"{limit} stalled streams")
            seen = refused[0]
            await until(lambda: refused[0] > seen, 30, "the attacker refused while they stall")
            ids = await one_epoch(
                f"[::1]:{w.port}", retry_deadline=15.0, same_host_lane=False, network_lane=False
            )
            assert sorted(ids.tolist()) == list(range(RECORDS))
            assert list(servicer.stalled_by) == ["127.0.0.1"]  # the attacker's, none of ::1
        finally:
            stop.set()
            await attacker
        await until(lambda: servicer.stalled == 0, 30, "the abandoned streams gone")


async def test_a_stream_whose_client_never_reads_ends_with_its_connections_age(
    big_root: Path,
) -> None:
    """A client that keeps its connection up (it answers pings) but never reads its
    stream: the stream stalls, and the connection's age (--max-connection-age, then
    --stream-stall-timeout) ends it, so the worker holds neither a slot nor the chunk
    gRPC had for it (before: both held for as long as the client kept the connection);
    the client then gets what was on its way and UNAVAILABLE."""
    config = in_process(big_root, stream_stall_timeout=1.0, max_connection_age=2.0)
    async with Worker(config) as w:
        servicer = w._servicer
        assert servicer is not None
        async with never_read(w.address, 1, 1) as (call,):
            await started([call], 1)
            await until(lambda: servicer.stalled == 1, 30, "the stream stalled")
            await until(lambda: servicer.stalled == 0, 30, "the stalled stream ended")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in call:
                    pass
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE


PAUSED_CLIENT = """
import sys
from shardstream.client import SyncLoader
with SyncLoader([sys.argv[1]], dataset="train", batch_size=500, same_host_lane=False, network_lane=False,
                retry_deadline=60.0, tune_malloc=False) as loader:
    for batch in loader.epoch(0):
        print(" ".join(map(str, batch["id"].tolist())), flush=True)
"""


async def test_a_paused_client_loses_its_stalled_stream_to_the_connection_age_and_resumes(
    big_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A loader process stopped (SIGSTOP: a trainer frozen, say) as its first read starts,
    for longer than the stall timeout and the connection's age: its stream stalls and is
    cut with its connection. Continued (SIGCONT), the loader resumes the read (the cut
    stream is retryable: UNAVAILABLE) and delivers the epoch exactly once, in the order
    of one without a pause."""
    config = in_process(big_root, stream_stall_timeout=1.0, max_connection_age=2.0)
    async with Worker(config) as w:
        servicer = w._servicer
        assert servicer is not None
        async with Loader([w.address], dataset="train", batch_size=500, same_host_lane=False, network_lane=False,
                          tune_malloc=False) as loader:  # fmt: skip
            reference = [b["id"].tolist() for b in await collect_epoch(loader, 0)]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", PAUSED_CLIENT, w.address,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        streamer, stream = servicer._streamer, servicer._streamer.stream
        stopped = []

        def stop_the_client_first(*args: object) -> object:
            """At the first read, before anything of it is written: the client stops."""
            if not stopped:
                proc.send_signal(signal.SIGSTOP)
                stopped.append(time.monotonic())
            return stream(*args)  # type: ignore[arg-type]

        monkeypatch.setattr(streamer, "stream", stop_the_client_first)
        try:
            await until(lambda: servicer.stalled >= 1, 30, "the stopped client's stream stalled")
            await until(lambda: servicer.stalled == 0 and servicer.active == 0, 30,
                        "the stalled stream gone while its client stays stopped")  # fmt: skip
            assert proc.returncode is None
            proc.send_signal(signal.SIGCONT)
            out, _ = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0
        got = [list(map(int, line.split())) for line in out.decode().splitlines()]
        assert got == reference


# -- connections ---------------------------------------------------------------------------------


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the worker has closed `sock` (EOF or reset), reading without waiting what
    it sent before (a server's HTTP/2 SETTINGS)."""
    sock.setblocking(False)
    try:
        while sock.recv(4096):
            pass
    except BlockingIOError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


async def test_connections_over_the_cap_are_closed_and_idle_handshakes_end(
    big_root: Path,
) -> None:
    """Raw TCP connections that never speak HTTP/2: those over --max-connections are
    closed at once, the rest after --stream-stall-timeout, and the worker's open files
    stay bounded; then a Loader is served. "At once" is a condition: the 32 over the cap
    are closed while the 8 it holds are all still open, waiting for their timeout."""
    cap, stall = 8, 5
    with worker(big_root, "--max-connections", str(cap), "--stream-stall-timeout", str(stall)) as w:
        fds = open_fds(w.pid)
        host, port = w.address.rsplit(":", 1)
        with contextlib.ExitStack() as stack:
            socks = [
                stack.enter_context(socket.create_connection((host, int(port)), timeout=5))
                for _ in range(40)
            ]
            closed: set[int] = set()

            def over_the_cap_closed() -> bool:
                closed.update(i for i, s in enumerate(socks) if i in closed or closed_by_peer(s))
                return len(closed) >= 40 - cap

            await until(over_the_cap_closed, 60, f"{40 - cap} connections closed")
            assert len(closed) == 40 - cap  # the held ones wait for their handshake timeout
            assert open_fds(w.pid) <= fds + cap + 4
            held = [s for i, s in enumerate(socks) if i not in closed]
            await until(lambda: all(map(closed_by_peer, held)), 60, "handshakes timed out")
        ids = await one_epoch(w.address)
        assert sorted(ids.tolist()) == list(range(RECORDS))
        assert w.terminate() == 0


async def test_health_watches_without_a_token_cannot_hold_every_connection(
    big_root: Path, tmp_path: Path
) -> None:
    """--max-connections connections that each keep a health Watch running (watched again
    whenever the worker ends one): at most half of them get a watch without the token, the
    others are refused at once, left idle and closed, and a loader with the token is
    served (before: the watches held every connection for good, and token holders were
    closed out as over the cap)."""
    token = tmp_path / "token"
    token.write_text("secret\n")
    cap = 8
    config = in_process(big_root, max_connections=cap, idle_connection_timeout=1.0,
                        stream_stall_timeout=10.0,
                        security=ServerSecurity(auth_token_file=token))  # fmt: skip
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with Worker(config) as w:
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(w.address, options=options) for _ in range(cap)]
        first: dict[int, str] = {}  # how each connection's first watch went
        stop = asyncio.Event()

        async def hold(i: int) -> None:
            """Keep a watch running on connection `i`; give up once one is refused."""
            stub = health_pb2_grpc.HealthStub(channels[i])
            while not stop.is_set():
                call = stub.Watch(health_pb2.HealthCheckRequest(), wait_for_ready=True)
                try:
                    async for _ in call:
                        first.setdefault(i, "watching")
                except grpc.aio.AioRpcError as exc:
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                        first.setdefault(i, "refused")
                        return
                    if not stop.is_set():
                        raise

        holders = [asyncio.ensure_future(hold(i)) for i in range(cap)]
        try:
            await until(lambda: len(first) == cap, 30, "every connection's first watch")
            ids = await one_epoch(
                w.address, retry_deadline=15.0, security=ClientSecurity(auth_token="secret")
            )
            assert sorted(ids.tolist()) == list(range(RECORDS))
            assert list(first.values()).count("watching") == cap // 2
        finally:
            stop.set()
            for c in channels:
                await c.close()
            await asyncio.gather(*holders, return_exceptions=True)


# -- ports ---------------------------------------------------------------------------------------


def start_worker(root: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shardstream.server", "--data-root", str(root),
         "--dataset", "train=*.npz", "--processes", "0", *extra],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_port_in_use_is_refused_naming_it(npz_root: Path) -> None:
    with WorkerProcess.start(
        ["--data-root", str(npz_root), "--dataset", "train=*.npz", "--processes", "0"]
    ) as first:
        second = start_worker(npz_root, "--port", str(first.port))
        try:
            out, err = second.communicate(timeout=60)
        finally:
            if second.poll() is None:
                second.kill()
                second.communicate()
        assert second.returncode == 1, (out, err)
        assert out == ""
        assert f"port {first.port} is already in use" in err, err
        assert first.terminate() == 0


def test_a_wildcard_host_prints_what_it_listens_on(npz_root: Path) -> None:
    proc = start_worker(npz_root, "--host", "0.0.0.0", "--port", "0")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("serving 0.0.0.0:"), line
        port = int(line.rsplit(":", 1)[1])
        assert port > 0
        # Clients on this host still reach it through the loopback address.
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert f"listening on 0.0.0.0:{port}" in err

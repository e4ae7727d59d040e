"""Clients that never read, flood connections or reuse a port cannot take a worker down.

Real worker processes on 127.0.0.1 (their memory is read from /proc/PID/status) and
raw gRPC clients for the misbehaviour; the legitimate client is a `Loader`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.server._process import WorkerProcess
from shardstream.v1 import shardstream_pb2 as pb

from conftest import collect_epoch, ids_of

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


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


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
    is served meanwhile, the worker's peak stays under the README's bound, and once the
    streams are abandoned its memory returns near its baseline."""
    max_streams = 64
    with worker(big_root, "--chunk-bytes", str(CHUNK), "--stream-stall-timeout", "2") as w:
        assert sorted((await one_epoch(w.address)).tolist()) == list(range(RECORDS))  # warm
        baseline = status_mb(w.pid)["VmRSS"]
        async with never_read(w.address, 64, 64) as calls:
            await started(calls, 64)
            ids = await one_epoch(w.address)  # retries while the worker is full
            assert sorted(ids.tolist()) == list(range(RECORDS))
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

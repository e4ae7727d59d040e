"""The Prometheus endpoint (`--metrics-port`, `serve_metrics`): GET /metrics from one
thread, a bounded number of connections, each closed after a few seconds, so idle or slow
connections cost neither threads nor unbounded open files, and never lock a scraper out."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardstream._common.metricshttp import DEFAULT_MAX_CONNECTIONS, MetricsServer
from shardstream.server._process import WorkerProcess

from conftest import ipv6_loopback, until, worker_processes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other side closed `sock` (EOF or reset), reading what it sent first."""
    sock.setblocking(False)
    try:
        while sock.recv(65536):
            pass
    except BlockingIOError:
        return False
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


def threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def scrape(port: int, path: str = "/metrics") -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@contextlib.contextmanager
def idle_connections(port: int, n: int) -> Iterator[list[socket.socket]]:
    with contextlib.ExitStack() as stack:
        yield [
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            for _ in range(n)
        ]


async def test_idle_connections_cost_no_threads_and_metrics_still_answer(npz_root: Path) -> None:
    """200 connections to the worker's metrics port that send nothing: the worker's
    threads do not grow (before: a thread each, for as long as they stayed open), its
    open files stay within the connection cap, a scrape is answered while they are open
    (the oldest idle ones make room), and the held ones are closed after the timeout."""
    pytest.importorskip("prometheus_client", reason="needs shardstream[metrics]")
    args = ["--data-root", str(npz_root), "--dataset", "train=*.npz", "--processes", "0",
            "--metrics-port", "0"]  # fmt: skip
    with WorkerProcess.start(args) as w:
        line = next(line for line in w.log if "metrics on http://" in line)
        match = re.search(r":(\d+)/metrics", line)
        assert match is not None, line
        port = int(match.group(1))
        assert (await asyncio.to_thread(scrape, port))[0] == 200  # the server is warm
        base_threads, base_fds = threads(w.pid), open_fds(w.pid)
        n = 200
        with idle_connections(port, n) as socks:
            closed: set[int] = set()

            def settled() -> bool:
                closed.update(i for i, s in enumerate(socks) if i in closed or closed_by_peer(s))
                # Either the worker closed all but its cap, or it grew threads for them.
                return (
                    len(closed) >= n - DEFAULT_MAX_CONNECTIONS or threads(w.pid) > base_threads + 50
                )

            await until(settled, 30, "the worker dealing with 200 idle connections")
            assert threads(w.pid) <= base_threads + 2, (base_threads, threads(w.pid))
            assert open_fds(w.pid) <= base_fds + DEFAULT_MAX_CONNECTIONS + 4
            status, body = await asyncio.to_thread(scrape, port)
            assert status == 200 and b"shardstream_decoding_processes 0.0" in body
            held = [s for i, s in enumerate(socks) if i not in closed]
            await until(lambda: all(map(closed_by_peer, held)), 30, "idle connections closed")
        assert threads(w.pid) <= base_threads + 2
        assert w.terminate() == 0


def test_only_get_metrics_is_served_and_slow_requests_are_cut() -> None:
    renders = []

    def render() -> tuple[bytes, str]:
        renders.append(1)
        return b"up 1\n", "text/plain; version=0.0.4"

    server = MetricsServer(render, max_connections=2, timeout=1.0)
    port = server.start()
    try:
        assert scrape(port) == (200, b"up 1\n")
        assert scrape(port, "/metrics?name[]=up") == (200, b"up 1\n")
        assert scrape(port, "/")[0] == 404
        assert scrape(port, "/other")[0] == 404
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.0 405 ")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"y" * 9000)
            assert s.recv(4096).startswith(b"HTTP/1.0 431 ")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metr")  # and never the rest: cut after the timeout
            assert s.recv(4096) == b""
        assert len(renders) == 2
    finally:
        server.close()
    assert server.connections() == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_new_connection_takes_the_place_of_the_oldest_idle_one() -> None:
    server = MetricsServer(lambda: (b"up 1\n", "text/plain"), max_connections=2, timeout=30)
    port = server.start()
    try:
        with idle_connections(port, 2) as (first, second):
            deadline = time.monotonic() + 10
            while server.connections() < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert scrape(port) == (200, b"up 1\n")  # the oldest idle one made room
            first.settimeout(5)
            assert first.recv(1) == b""
            assert not closed_by_peer(second)
    finally:
        server.close()


@pytest.mark.skipif(not ipv6_loopback(), reason="needs the IPv6 loopback address")
def test_a_bracketed_ipv6_host_serves_metrics_there(npz_root: Path) -> None:
    """`--host [::1]` (the form gRPC addresses and URLs take): the metrics listen on ::1
    and the log gives their URL with the brackets (before: the worker did not start,
    "Name or service not known")."""
    pytest.importorskip("prometheus_client", reason="needs shardstream[metrics]")
    args = ["--data-root", str(npz_root), "--dataset", "train=*.npz", "--processes", "0",
            "--host", "[::1]", "--metrics-port", "0"]  # fmt: skip
    with WorkerProcess.start(args) as w:
        line = next(line for line in w.log if "metrics on http://" in line)
        match = re.search(r"metrics on http://\[::1\]:(\d+)/metrics$", line)
        assert match is not None, line
        url = f"http://[::1]:{match.group(1)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.status == 200 and b"shardstream_decoding_processes" in reply.read()
        assert w.terminate() == 0


def test_a_metrics_port_that_cannot_be_had_names_the_option_and_the_host() -> None:
    pytest.importorskip("prometheus_client", reason="needs shardstream[metrics]")
    from shardstream.server._metrics import WorkerMetrics

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        metrics = WorkerMetrics()
        with pytest.raises(OSError, match=rf"--host 127\.0\.0\.1 --metrics-port {port}: .*in use"):
            metrics.enable("127.0.0.1", port)
        metrics.close()
    metrics = WorkerMetrics()
    with pytest.raises(OSError, match=r"--host no-such-host\.invalid --metrics-port 0: "):
        metrics.enable("no-such-host.invalid", 0)
    metrics.close()


def test_a_host_name_listens_on_its_first_address_and_says_which(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("prometheus_client", reason="needs shardstream[metrics]")
    from shardstream.server._metrics import WorkerMetrics

    first = socket.getaddrinfo("localhost", 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    expected = str(first[0][4][0])
    metrics = WorkerMetrics()
    with caplog.at_level("INFO", logger="shardstream.worker"):
        port = metrics.enable("localhost", 0)
    try:
        shown = f"[{expected}]" if ":" in expected else expected
        assert f"metrics on http://localhost:{port}/metrics (listening on {shown})" in caplog.text
        host = shown.strip("[]")
        with socket.create_connection((host, port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.0 200 ")
    finally:
        metrics.close()


def test_a_loaders_metrics_endpoint_closes_with_the_loader(npz_root: Path) -> None:
    """`serve_metrics` could not be stopped: each call left a thread and its sockets,
    serving a closed loader's figures for the life of the process."""
    from shardstream.client import SyncLoader
    from shardstream.client.metrics import serve_metrics

    with worker_processes(npz_root, 1) as (worker,):
        threads = 0
        for n in range(4):
            if n == 1:  # after the first: what any loader leaves in a process (grpc's own)
                threads = threading.active_count()
            with SyncLoader(worker.address, dataset="train", batch_size=64) as loader:
                port = serve_metrics(loader)
                status, body = scrape(port)
                assert status == 200 and b"shardstream_client" in body
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=10).close()
        assert threading.active_count() == threads
        with pytest.raises(RuntimeError, match="closed"):
            serve_metrics(loader)

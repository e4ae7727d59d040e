"""The fault-injection proxy in tests/faultproxy.py, against plain asyncio servers."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from faultproxy import BlackHole, FaultProxy, Pass, ResetAfter, Statistics, Trickle

CHUNK = 64 * 1024
Body = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def pattern(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


class Upstream:
    """A server on 127.0.0.1:<ephemeral> running `body` per connection; owns its handlers."""

    def __init__(self, body: Body) -> None:
        self._body = body
        self.tasks: set[asyncio.Task[object]] = set()
        self._server: asyncio.Server | None = None
        self.address = ""

    async def __aenter__(self) -> Upstream:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self._body(reader, writer)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()


def source(n: int) -> Body:
    """Sends `n` bytes of `pattern` on connect, then closes."""

    async def body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(pattern(n))
        await writer.drain()

    return body


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()


@contextlib.asynccontextmanager
async def connect(address: str) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


async def read_all(reader: asyncio.StreamReader) -> tuple[bytes, BaseException | None]:
    """Everything up to EOF, or up to the error that ended the stream."""
    got = bytearray()
    try:
        while chunk := await reader.read(CHUNK):
            got += chunk
    except ConnectionError as exc:
        return bytes(got), exc
    return bytes(got), None


async def test_pass_forwards_exact_bytes_both_ways() -> None:
    sent = pattern(300_000)[::-1]
    async with Upstream(echo) as up, FaultProxy(up.address) as proxy:
        assert proxy.address == f"127.0.0.1:{proxy.port}" and proxy.port != 0
        async with connect(proxy.address) as (reader, writer):

            async def send() -> None:
                writer.write(sent)
                await writer.drain()

            sending = asyncio.create_task(send())
            back = await reader.readexactly(len(sent))
            await sending
        assert back == sent
    async with Upstream(source(200_000)) as up, FaultProxy(up.address) as proxy:
        async with connect(proxy.address) as (reader, _):
            got, error = await read_all(reader)  # the upstream's close becomes our EOF
        assert (got, error) == (pattern(200_000), None)
    assert proxy.statistics() == Statistics(
        connections=1, resets=0, bytes_to_upstream=0, bytes_to_client=200_000, active=0
    )


async def test_reset_after_repeats_on_every_connection() -> None:
    async with Upstream(source(200_000)) as up, FaultProxy(up.address) as proxy:
        proxy.set_mode(ResetAfter(1000, repeat=True))
        for _ in range(3):
            async with connect(proxy.address) as (reader, _):
                got, error = await read_all(reader)
            # An RST, not an EOF: StreamReader.read raises ConnectionResetError (ECONNRESET)
            # once the bytes that came before it have been read.
            assert isinstance(error, ConnectionResetError)
            assert 1000 <= len(got) < 1000 + CHUNK
            assert got == pattern(1000)  # the proxy cuts the crossing chunk at the mark
        assert proxy.mode == ResetAfter(1000, repeat=True)
        stats = proxy.statistics()
        assert (stats.connections, stats.resets, stats.bytes_to_client) == (3, 3, 3000)


async def test_reset_after_once_resets_only_the_next_connection() -> None:
    async with Upstream(echo) as echo_up, Upstream(source(200_000)) as up:
        async with FaultProxy(up.address) as proxy:
            proxy.set_mode(ResetAfter(1000, repeat=False))
            async with connect(proxy.address) as (reader, _):
                got, error = await read_all(reader)
            assert isinstance(error, ConnectionResetError) and got == pattern(1000)
            assert proxy.mode == Pass()
            for _ in range(2):
                async with connect(proxy.address) as (reader, _):
                    assert await read_all(reader) == (pattern(200_000), None)
            assert proxy.statistics().resets == 1
        async with FaultProxy(echo_up.address) as proxy:  # connections already open: untouched
            async with connect(proxy.address) as (reader, writer):
                proxy.set_mode(ResetAfter(0, repeat=False))
                writer.write(pattern(5000))
                assert await reader.readexactly(5000) == pattern(5000)
            assert proxy.statistics().resets == 0


async def test_reset_after_reaches_existing_connections() -> None:
    async with Upstream(echo) as up, FaultProxy(up.address) as proxy:
        async with connect(proxy.address) as (reader, writer):
            writer.write(pattern(3000))
            assert await reader.readexactly(3000) == pattern(3000)
            proxy.set_mode(ResetAfter(2000, repeat=True))  # already past the mark: reset now
            with pytest.raises(ConnectionResetError):
                await reader.read(1)
        async with connect(proxy.address) as (reader, writer):
            writer.write(pattern(3000))
            got, error = await read_all(reader)
            assert isinstance(error, ConnectionResetError) and got == pattern(2000)
        assert proxy.statistics().resets == 2


async def test_black_hole_keeps_connections_open_and_drops_data() -> None:
    async with Upstream(echo) as up, FaultProxy(up.address) as proxy:
        async with connect(proxy.address) as (old_reader, old_writer):
            old_writer.write(b"before")
            assert await old_reader.readexactly(6) == b"before"
            proxy.set_mode(BlackHole())
            async with connect(proxy.address) as (reader, writer):  # new ones are accepted
                for r, w in ((old_reader, old_writer), (reader, writer)):
                    w.write(b"ping")
                    await w.drain()
                    with pytest.raises(TimeoutError):
                        await asyncio.wait_for(r.read(1), 0.5)
                    assert not r.at_eof() and not w.is_closing()
                assert proxy.statistics().active == 2
                proxy.set_mode(Pass())
                # The black hole dropped "ping" silently; the connection itself still works.
                old_writer.write(b"pong")
                assert await old_reader.readexactly(4) == b"pong"
            async with connect(proxy.address) as (reader, writer):
                writer.write(b"hello")
                assert await reader.readexactly(5) == b"hello"
        stats = proxy.statistics()
        assert (stats.connections, stats.bytes_to_upstream, stats.bytes_to_client) == (3, 15, 15)


async def test_trickle_limits_the_rate_to_the_client() -> None:
    async with Upstream(source(10_000)) as up, FaultProxy(up.address) as proxy:
        proxy.set_mode(Trickle(20_000))
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with connect(proxy.address) as (reader, _):
            assert await read_all(reader) == (pattern(10_000), None)
        # Pieces of 2000 bytes 0.1 s apart: the fifth leaves no earlier than 0.4 s in.
        assert loop.time() - started >= 0.39


async def test_unreachable_upstream_closes_the_client() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    async with FaultProxy(f"127.0.0.1:{port}") as proxy:
        async with connect(proxy.address) as (reader, _):
            assert await read_all(reader) == (b"", None)
        assert proxy.statistics().connections == 1


async def test_aclose_closes_everything_and_leaves_no_tasks() -> None:
    async with Upstream(echo) as echo_up, Upstream(source(1_000_000)) as source_up:
        before = asyncio.all_tasks()
        black = FaultProxy(echo_up.address)
        slow = FaultProxy(source_up.address)
        await black.start()
        await slow.start()
        black.set_mode(BlackHole())
        slow.set_mode(Trickle(10_000))
        async with connect(black.address) as (b_reader, _):
            async with connect(slow.address) as (s_reader, _):
                assert len(await s_reader.read(CHUNK)) > 0  # trickling: the proxy is sleeping
                assert len(asyncio.all_tasks() - before) > 0
                await asyncio.gather(black.aclose(), slow.aclose())
                await black.aclose()  # idempotent
                assert await b_reader.read(CHUNK) == b""  # closed by the proxy
                got, error = await read_all(s_reader)
                assert error is None and len(got) < 1_000_000
        left = asyncio.all_tasks() - before - echo_up.tasks - source_up.tasks
        assert left == set()
        assert black.statistics().active == slow.statistics().active == 0

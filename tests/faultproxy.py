"""An asyncio TCP proxy that injects network faults, for fault-injection tests.

    async with FaultProxy("127.0.0.1:50051") as proxy:   # listens on 127.0.0.1:<ephemeral>
        connect clients to proxy.address ...
        proxy.set_mode(ResetAfter(200_000, repeat=True))

Modes (``set_mode`` applies to new and existing connections from then on, chunk by chunk):

* ``Pass()``: forward both ways.
* ``ResetAfter(nbytes, repeat)``: once ``nbytes`` have been forwarded upstream->client on a
  connection (the chunk that crosses the mark is cut at it, so exactly ``nbytes``), reset it:
  SO_LINGER 0 and close on the client-side socket (the client sees ECONNRESET; asyncio's
  ``StreamReader.read`` raises ``ConnectionResetError``) and close the upstream side.
  ``repeat=True``: every connection, existing ones included (one already past ``nbytes`` is
  reset by ``set_mode`` at once). ``repeat=False``: only the next connection accepted; the
  mode then reverts to ``Pass()``. A byte counts as forwarded once it is in the kernel; an RST
  discards whatever the kernel had not delivered yet (nothing, on loopback, for a peer that
  keeps reading).
* ``BlackHole()``: connections stay open (new ones are accepted too) and whatever arrives from
  either side is read and dropped.
* ``Trickle(bytes_per_second)``: upstream->client at most at that rate, in pieces of at most a
  tenth of a second's worth; client->upstream unthrottled.

All tasks belong to the proxy; ``aclose()`` cancels and awaits them and closes every socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass

__all__ = [
    "BlackHole",
    "FaultProxy",
    "Mode",
    "Pass",
    "ResetAfter",
    "Statistics",
    "Trickle",
]

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Pass:
    pass


@dataclass(frozen=True)
class ResetAfter:
    nbytes: int
    repeat: bool = True


@dataclass(frozen=True)
class BlackHole:
    pass


@dataclass(frozen=True)
class Trickle:
    bytes_per_second: int

    def __post_init__(self) -> None:
        if self.bytes_per_second <= 0:
            raise ValueError("bytes_per_second must be positive")


Mode = Pass | ResetAfter | BlackHole | Trickle


@dataclass(frozen=True)
class Statistics:
    connections: int  # accepted from clients
    resets: int  # connections reset by ResetAfter
    bytes_to_upstream: int  # client->upstream, forwarded (not counting dropped bytes)
    bytes_to_client: int  # upstream->client, forwarded
    active: int  # connections open now


def _close_quietly(writer: asyncio.StreamWriter | None, *, abort: bool = False) -> None:
    if writer is None:
        return
    if abort:
        writer.transport.abort()
    else:
        writer.close()


async def _wait_closed(writer: asyncio.StreamWriter | None) -> None:
    if writer is not None:
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.client_reader = reader
        self.client_writer = writer
        self.upstream_reader: asyncio.StreamReader | None = None
        self.upstream_writer: asyncio.StreamWriter | None = None
        self.to_client = 0  # bytes forwarded upstream->client on this connection
        self.one_shot: int | None = None  # ResetAfter(repeat=False) claimed by this connection
        self.was_reset = False
        self.task: asyncio.Task[None] | None = None

    def abort(self) -> None:
        _close_quietly(self.client_writer, abort=True)
        _close_quietly(self.upstream_writer, abort=True)

    async def wait_closed(self) -> None:
        await _wait_closed(self.client_writer)
        await _wait_closed(self.upstream_writer)


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        host, sep, port = upstream.rpartition(":")
        if not sep or not host:
            raise ValueError(f"upstream must be host:port, got {upstream!r}")
        self._upstream = (host.strip("[]"), int(port))
        self._mode: Mode = Pass()
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._closing = False
        self._closed = asyncio.Event()
        self._conns: set[_Conn] = set()
        self._connections = 0
        self._resets = 0
        self._to_upstream = 0
        self._to_client = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None or self._closing:
            raise RuntimeError("FaultProxy already started or closed")
        self._server = await asyncio.start_server(self._on_client, "127.0.0.1", 0, limit=CHUNK)
        self._port = self._server.sockets[0].getsockname()[1]

    async def aclose(self) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        try:
            if self._server is not None:
                self._server.close()  # stop accepting
            tasks = [c.task for c in self._conns if c.task is not None]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for conn in list(self._conns):  # none should be left; be thorough anyway
                conn.abort()
                await conn.wait_closed()
            self._conns.clear()
            if self._server is not None:
                # Since Python 3.12.1 this waits for the server's connections to close,
                # so only after they are.
                await self._server.wait_closed()
        finally:
            self._closed.set()

    async def __aenter__(self) -> FaultProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- public state ----------------------------------------------------------------------

    @property
    def address(self) -> str:
        if self._port is None:
            raise RuntimeError("FaultProxy not started")
        return f"127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("FaultProxy not started")
        return self._port

    @property
    def mode(self) -> Mode:
        return self._mode

    def set_mode(self, mode: Mode) -> None:
        if not isinstance(mode, Pass | ResetAfter | BlackHole | Trickle):
            raise TypeError(f"not a mode: {mode!r}")
        self._mode = mode
        for conn in list(self._conns):
            conn.one_shot = None  # a new mode replaces a claimed one-shot reset
            if (
                isinstance(mode, ResetAfter)
                and mode.repeat
                and conn.upstream_writer is not None
                and conn.to_client >= mode.nbytes
            ):
                self._reset(conn)

    def statistics(self) -> Statistics:
        return Statistics(
            connections=self._connections,
            resets=self._resets,
            bytes_to_upstream=self._to_upstream,
            bytes_to_client=self._to_client,
            active=len(self._conns),
        )

    # -- connections -----------------------------------------------------------------------

    def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, not a coroutine: asyncio would otherwise own the handler task.
        if self._closing:
            writer.transport.abort()
            return
        self._connections += 1
        writer.transport.set_write_buffer_limits(high=0)  # drain() = handed to the kernel
        conn = _Conn(reader, writer)
        mode = self._mode
        if isinstance(mode, ResetAfter) and not mode.repeat:
            conn.one_shot = mode.nbytes
            self._mode = Pass()
        self._conns.add(conn)
        conn.task = asyncio.get_running_loop().create_task(self._run(conn))

    async def _run(self, conn: _Conn) -> None:
        try:
            await self._relay(conn)
        finally:
            conn.abort()  # a no-op for sockets already closed
            await conn.wait_closed()
            self._conns.discard(conn)

    async def _relay(self, conn: _Conn) -> None:
        try:
            reader, writer = await asyncio.open_connection(*self._upstream, limit=CHUNK)
        except OSError:
            conn.client_writer.close()
            await _wait_closed(conn.client_writer)
            return
        writer.transport.set_write_buffer_limits(high=0)
        conn.upstream_reader, conn.upstream_writer = reader, writer
        loop = asyncio.get_running_loop()
        pumps = [
            loop.create_task(self._pump_to_upstream(conn)),
            loop.create_task(self._pump_to_client(conn)),
        ]
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
        # One side closed (or the connection was reset): close the other, flushing what is left.
        conn.client_writer.close()
        writer.close()
        await conn.wait_closed()

    def _limit(self, conn: _Conn) -> int | None:
        mode = self._mode
        if isinstance(mode, ResetAfter) and mode.repeat:
            return mode.nbytes
        return conn.one_shot

    def _reset(self, conn: _Conn) -> None:
        if conn.was_reset:
            return
        conn.was_reset = True
        self._resets += 1
        sock = conn.client_writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.abort()  # the client side closes with an RST; upstream is closed as usual

    async def _pump_to_upstream(self, conn: _Conn) -> None:
        reader, writer = conn.client_reader, conn.upstream_writer
        assert writer is not None
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(CHUNK):
                if isinstance(self._mode, BlackHole):
                    continue
                writer.write(data)
                await writer.drain()
                self._to_upstream += len(data)

    async def _pump_to_client(self, conn: _Conn) -> None:
        reader, writer = conn.upstream_reader, conn.client_writer
        assert reader is not None
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                limit = self._limit(conn)
                if conn.was_reset or (limit is not None and conn.to_client >= limit):
                    self._reset(conn)
                    return
                data = await reader.read(CHUNK)
                if not data:
                    return
                while data:
                    mode = self._mode
                    if isinstance(mode, BlackHole):
                        break  # dropped
                    piece = data
                    if isinstance(mode, Trickle):
                        piece = piece[: max(1, mode.bytes_per_second // 10)]
                    limit = self._limit(conn)
                    if limit is not None:
                        piece = piece[: max(0, limit - conn.to_client)]
                        if not piece:
                            break  # the reset happens at the top of the loop
                    writer.write(piece)
                    await writer.drain()
                    conn.to_client += len(piece)
                    self._to_client += len(piece)
                    data = data[len(piece) :]
                    if isinstance(mode, Trickle):
                        await asyncio.sleep(len(piece) / mode.bytes_per_second)

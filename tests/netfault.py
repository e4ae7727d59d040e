"""A TCP proxy that injects network faults between a client and a worker (asyncio).

    async with FaultProxy("127.0.0.1:50051") as proxy:     # listens on 127.0.0.1:<free>
        proxy.mode = ResetAfter(200_000)                   # RST each connection after 200 kB
        ...connect clients to proxy.address...

Modes apply to data flowing from the worker to the client, per connection:
`Pass`, `ResetAfter(n, repeat)`, `BlackHole` (data swallowed, connection kept
open), `Trickle(bytes_per_second)`. Every task belongs to the proxy and is
cancelled by `aclose()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Pass:
    pass


@dataclass(frozen=True)
class ResetAfter:
    nbytes: int  # worker->client bytes forwarded on a connection before it is reset
    repeat: bool = True  # every connection, or only the next one


@dataclass(frozen=True)
class BlackHole:
    pass


@dataclass(frozen=True)
class Trickle:
    bytes_per_second: int


Mode = Pass | ResetAfter | BlackHole | Trickle


class FaultProxy:
    def __init__(self, upstream: str) -> None:
        host, _, port = upstream.rpartition(":")
        self._upstream = (host, int(port))
        self.mode: Mode = Pass()
        self.resets = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        assert self._server is not None
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in list(self._writers):
            w.close()
            with contextlib.suppress(OSError, ConnectionError):
                await w.wait_closed()
        self._writers.clear()

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(c_writer)
        try:
            u_reader, u_writer = await asyncio.open_connection(*self._upstream)
        except OSError:
            c_writer.close()
            return
        self._writers.add(u_writer)
        mode = self.mode
        if isinstance(mode, ResetAfter) and not mode.repeat:
            self.mode = Pass()  # only this connection
        self._spawn(self._pump(c_reader, u_writer, None))
        self._spawn(self._pump(u_reader, c_writer, mode, client=c_writer, upstream=u_writer))

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        mode: Mode | None,
        *,
        client: asyncio.StreamWriter | None = None,
        upstream: asyncio.StreamWriter | None = None,
    ) -> None:
        sent = 0
        try:
            while data := await reader.read(65536):
                current = (
                    self.mode if mode is not None and not isinstance(mode, ResetAfter) else mode
                )
                if isinstance(current, BlackHole):
                    continue  # swallowed; the connection stays open
                if isinstance(current, ResetAfter) and sent + len(data) >= current.nbytes:
                    writer.write(data[: max(0, current.nbytes - sent)])
                    await writer.drain()
                    self._reset(client, upstream)
                    return
                if isinstance(current, Trickle):
                    for i in range(0, len(data), max(1, current.bytes_per_second // 10)):
                        part = data[i : i + max(1, current.bytes_per_second // 10)]
                        writer.write(part)
                        await writer.drain()
                        await asyncio.sleep(len(part) / current.bytes_per_second)
                else:
                    writer.write(data)
                    await writer.drain()
                sent += len(data)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def _reset(
        self, client: asyncio.StreamWriter | None, upstream: asyncio.StreamWriter | None
    ) -> None:
        self.resets += 1
        for w in (client, upstream):
            if w is None:
                continue
            sock = w.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            w.transport.abort()

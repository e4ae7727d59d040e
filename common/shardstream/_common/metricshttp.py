"""A small, bounded HTTP server for Prometheus scrapes: `GET /metrics`, nothing else.

    server = MetricsServer(render, host="127.0.0.1", port=0)  # render() -> (body, type)
    port = server.start()  # OSError if it cannot listen there
    ...
    server.close()

`prometheus_client.start_http_server` runs a thread per connection and never times
one out, so connections that send nothing pile up threads and open files without
bound. Here one thread serves every connection (non-blocking sockets, `selectors`):

- at most `max_connections` at once; a connection over it takes the place of the
  oldest one that has not sent a whole request yet (the newcomer is closed instead
  if every one is being answered), so idle connections never lock a scraper out;
- each connection has `timeout` seconds in all, from accept to its last byte sent,
  then it is closed whatever it is doing (no slow sender or reader keeps it);
- a request is at most `MAX_REQUEST_BYTES` of request line and headers; one request
  per connection (HTTP/1.0 style, `Connection: close`);
- `GET /metrics` (any query string) gets `render()`'s body; any other path 404,
  any other method 405. `render()` runs on the serving thread, one scrape at a time.

It listens on the first address `host` resolves to (an IPv6 address may come in
brackets, "[::1]", as in a URL): "localhost" is 127.0.0.1 or ::1, not both; `address`
says which.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from shardstream._common.hosts import bare_host

__all__ = ["MAX_REQUEST_BYTES", "MetricsServer"]

log = logging.getLogger("shardstream.metrics")

MAX_REQUEST_BYTES = 8192  # request line and headers; a larger request gets 431
DEFAULT_MAX_CONNECTIONS = 32  # connections at once (each an open file, no thread)
DEFAULT_TIMEOUT = 5.0  # seconds a connection may take from accept to its last byte


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    deadline: float
    request: bytearray = field(default_factory=bytearray)
    reply: memoryview | None = None  # being sent; None: still reading the request


class MetricsServer:
    """Serves `render()` at GET /metrics on one daemon thread (see the module doc)."""

    def __init__(
        self,
        render: Callable[[], tuple[bytes, str]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be positive, got {max_connections}")
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout}")
        self._render = render
        # "[::1]" (as a URL or a gRPC address writes it) is the address ::1.
        self._host, self._port = bare_host(host), port
        self._max = max_connections
        self._timeout = timeout
        self._conns: dict[socket.socket, _Conn] = {}
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.port = 0
        self.address = ""  # the address listened on, once started (e.g. "127.0.0.1", "::1")

    def start(self) -> int:
        """Listen and serve; returns the port (the one picked when `port` was 0). OSError
        (`socket.gaierror` for a host that does not resolve) if it cannot listen there."""
        listener = None
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                self._host or None, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            listener = socket.socket(family, kind, proto)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(64)
            listener.setblocking(False)
        except BaseException:
            if listener is not None:
                listener.close()
            self._closed = True
            self._release()
            raise
        self._listener = listener
        name = listener.getsockname()
        self.address, self.port = str(name[0]), int(name[1])
        self._selector.register(listener, selectors.EVENT_READ)
        self._wake_r.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._thread = threading.Thread(target=self._serve, name="shardstream-metrics", daemon=True)
        self._thread.start()
        return self.port

    def connections(self) -> int:
        """Connections open now."""
        return len(self._conns)

    def close(self) -> None:
        """Stop serving and close every connection (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None:  # never started
            self._release()
            return
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")
        self._thread.join(10)

    def _release(self) -> None:
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the serving thread ----------------------------------------------------------

    def _serve(self) -> None:
        try:
            while not self._closed:
                now = time.monotonic()
                for conn in [c for c in self._conns.values() if c.deadline <= now]:
                    self._drop(conn)
                wait = min((c.deadline for c in self._conns.values()), default=now + 60) - now
                for key, events in self._selector.select(max(0.0, wait)):
                    sock = cast(socket.socket, key.fileobj)
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_r:
                        with contextlib.suppress(OSError):
                            self._wake_r.recv(64)
                    elif (client := self._conns.get(sock)) is not None:
                        self._step(client, events)
        except Exception:  # a bug: say so, and stop serving rather than spin
            log.exception("the metrics server failed; metrics are no longer served")
        finally:
            for conn in list(self._conns.values()):
                self._drop(conn)
            listener, self._listener = self._listener, None
            if listener is not None:
                listener.close()
            self._release()

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):  # a bounded batch: deadlines are looked at between batches
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of file descriptors, say: try again later
                log.warning("metrics server: cannot accept a connection: %s", exc)
                return
            if len(self._conns) >= self._max:
                idle = [c for c in self._conns.values() if c.reply is None]
                if not idle:
                    sock.close()
                    continue
                self._drop(min(idle, key=lambda c: c.deadline))  # the oldest still idle
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self._timeout)
            self._conns[sock] = conn
            self._selector.register(sock, selectors.EVENT_READ)

    def _step(self, conn: _Conn, events: int) -> None:
        try:
            if conn.reply is None and events & selectors.EVENT_READ:
                self._read(conn)
            elif conn.reply is not None and events & selectors.EVENT_WRITE:
                self._write(conn)
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(conn)

    def _read(self, conn: _Conn) -> None:
        data = conn.sock.recv(4096)
        if not data:
            self._drop(conn)
            return
        conn.request += data
        end = conn.request.find(b"\r\n\r\n")
        if end < 0:
            end = conn.request.find(b"\n\n")
        if end < 0:
            if len(conn.request) > MAX_REQUEST_BYTES:
                self._reply(conn, 431, b"request header fields too large\n")
            return
        line = bytes(conn.request.split(b"\n", 1)[0]).strip()
        self._answer(conn, line)

    def _answer(self, conn: _Conn, line: bytes) -> None:
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._reply(conn, 400, b"bad request\n")
        elif parts[0] != b"GET":
            self._reply(conn, 405, b"only GET /metrics\n", extra=b"Allow: GET\r\n")
        elif parts[1].split(b"?", 1)[0] != b"/metrics":
            self._reply(conn, 404, b"not found: only /metrics\n")
        else:
            try:
                body, kind = self._render()
            except Exception:
                log.exception("rendering the metrics failed")
                self._reply(conn, 500, b"rendering the metrics failed\n")
                return
            self._reply(conn, 200, body, kind=kind)

    def _reply(
        self,
        conn: _Conn,
        status: int,
        body: bytes,
        *,
        kind: str = "text/plain; charset=utf-8",
        extra: bytes = b"",
    ) -> None:
        reason = _REASONS.get(status, b"")
        head = (
            b"HTTP/1.0 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n%s\r\n" % (status, reason, kind.encode(), len(body), extra)
        )
        conn.reply = memoryview(head + body)
        conn.request = bytearray()
        self._selector.modify(conn.sock, selectors.EVENT_WRITE)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        assert conn.reply is not None
        sent = conn.sock.send(conn.reply)
        conn.reply = conn.reply[sent:]
        if not conn.reply:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            self._drop(conn)

    def _drop(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()


_REASONS = {
    200: b"OK",
    400: b"Bad Request",
    404: b"Not Found",
    405: b"Method Not Allowed",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}

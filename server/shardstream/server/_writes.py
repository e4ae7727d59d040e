"""Noticing a stalled write, and handing freed heap back when idle.

`StallWatch` watches a stream's writes: one that waits longer than the stall
timeout (the client reads nothing: its HTTP/2 window stays full) is reported while
it still waits, and the servicer ends the stream. `TrimWhenIdle` hands freed heap back to the kernel
(glibc's `malloc_trim`) a moment after the last stream is gone, or after streams
stalled, so an idle worker returns near its baseline memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from shardstream._common.loops import TIMER_SLACK
from shardstream._common.malloc import trim_heap


class StallWatch:
    """Notices a stream's write that waits longer than `timeout` seconds: `on_stall()`
    is called once, while the write still waits, and `stalled()` is true from then on.

    One timer per stream, armed by the first write and moved on only when it fires
    (once per `timeout` at most), not one per message: a write costs two clock reads.
    A write that failed means the client left: it raises CancelledError (gRPC already
    ends such a call without a status, and logs nothing)."""

    def __init__(self, timeout: float, on_stall: Callable[[], None]) -> None:
        self._timeout = timeout
        self._on_stall = on_stall
        self._loop = asyncio.get_running_loop()
        self._since: float | None = None  # when the write now waiting began
        self._timer: asyncio.TimerHandle | None = None
        self._stalled = False

    def stalled(self) -> bool:
        """Whether a write waited past the timeout (`on_stall` was called)."""
        return self._stalled

    async def write(self, op: Awaitable[None]) -> None:
        """Await `op`, a write of the stream (its headers, a message)."""
        self._since = self._loop.time()
        if self._timer is None and not self._stalled:
            self._timer = self._loop.call_at(self._since + self._timeout, self._check)
        try:
            await op
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise asyncio.CancelledError(f"the write failed: {exc}") from exc
        finally:
            self._since = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        self._timer = None
        since = self._since
        if since is None or self._stalled:  # nothing waits: the next write arms the timer
            return
        due = since + self._timeout
        if self._loop.time() + TIMER_SLACK < due:  # a later write: watch it until its due
            self._timer = self._loop.call_at(due, self._check)
            return
        self._stalled = True
        self._on_stall()


class TrimWhenIdle:
    """Hand freed heap back `delay` seconds after the last stream is gone, or after
    streams stalled (their decoded chunks are freed, their clients may linger)."""

    def __init__(self, delay: float, busy: Callable[[], bool]) -> None:
        self._delay = delay
        self._busy = busy  # whether streams run (or stalled ones linger)
        self._streams = 0  # streams since the last trim
        self._for_stall = False
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def stream_started(self) -> None:
        self._streams += 1

    def update(self, *, stalled: bool = False) -> None:
        """After a stream ended or stalled: schedule a trim if it is due."""
        self._for_stall |= stalled
        if self._closed or not self._streams or (self._busy() and not self._for_stall):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self._delay, self._run)

    def _run(self) -> None:
        self._timer = None
        if self._closed or (self._busy() and not self._for_stall):
            return
        self._streams = 0
        self._for_stall = False
        trim_heap()

    def close(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

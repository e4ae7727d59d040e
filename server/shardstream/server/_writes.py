"""Writing a stream within a stall timeout, and handing freed heap back when idle.

`send_within` writes a stream's messages, each within the stall timeout: a client
that reads nothing for that long (its HTTP/2 window stays full) gets its stream
ended by the servicer. `TrimWhenIdle` hands freed heap back to the kernel
(glibc's `malloc_trim`) a moment after the last stream is gone, or after streams
stalled, so an idle worker returns near its baseline memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Callable

import grpc

from shardstream._common.loops import wait_done
from shardstream._common.malloc import trim_heap


async def send_within(
    context: grpc.aio.ServicerContext, messages: AsyncGenerator[bytes, None], timeout: float
) -> asyncio.Task[None] | None:
    """Write the headers, then `messages`, each within `timeout` seconds. Returns None
    once all are written, or the write still waiting on a client that reads nothing;
    `messages` is closed either way (which frees its slot and decoded chunks)."""
    write: asyncio.Task[None] | None = None
    try:
        async with contextlib.aclosing(messages):
            # Headers first and alone, so that a status after a stall carries none.
            write = asyncio.ensure_future(context.send_initial_metadata(()))
            if not await completes(write, timeout):
                return write
            async for message in messages:
                write = asyncio.ensure_future(context.write(message))
                if not await completes(write, timeout):
                    return write
            return None
    except BaseException:
        if write is not None:
            write.cancel()
        raise


async def completes(write: asyncio.Task[None], seconds: float | None) -> bool:
    """Wait up to `seconds` for `write`; False if it is still waiting (HTTP/2 flow control:
    the client reads nothing). A write that failed means the client left: the call is
    cancelled (gRPC already ends it without a status, and logs nothing)."""
    if not await wait_done(write, seconds):
        return False
    if write.cancelled():
        raise asyncio.CancelledError
    if write.exception() is not None:
        raise asyncio.CancelledError(f"the write failed: {write.exception()}")
    return True


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

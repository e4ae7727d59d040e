"""Event loops: uvloop where it is installed (a dependency on POSIX), asyncio otherwise;
`wait_done`, the lean wait for one future (per batch, per chunk read in a thread); and
`TIMER_SLACK`, for timers that judge how long something has waited."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Timers may fire up to the clock's resolution early: a timer that judges how long
# something has waited counts that much more.
TIMER_SLACK = 1e-3


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """The function that makes this process's event loops."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on POSIX
        return asyncio.new_event_loop
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A new event loop (uvloop when installed), not set as the current one."""
    return loop_factory()()


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `main()` to completion on a fresh loop (uvloop when installed)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main())


async def wait_done(future: asyncio.Future[Any], timeout: float | None = None) -> bool:
    """Wait until `future` is done, for at most `timeout` seconds (None: no limit);
    whether it is. Never cancels `future`: cancelling the waiter leaves it running.

    What `asyncio.wait({future}, timeout=...)` does for one future, at a fraction of
    its cost (no set, no task wrapping, one waiter and one timer): the loader's pipeline
    runs it once per batch, the worker once per chunk read in an I/O thread."""
    if future.done():
        return True
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    timer = None if timeout is None else loop.call_later(max(0.0, timeout), wake)
    try:
        await waiter
    finally:
        if timer is not None:
            timer.cancel()
        future.remove_done_callback(wake)
    return future.done()

"""`TaskScope`: a TaskGroup owned by an object with a start / `aclose()` lifecycle.

    async with TaskScope("pool") as scope:      # or: await scope.__aenter__() ... aclose()
        scope.spawn(watch(conn))
        ...
    # every task spawned is finished here; the first task error is raised

`asyncio.TaskGroup` must be entered and left in one task, around one block of
code. A Loader or a worker pool lives longer than any one call of its owner
(a `SyncLoader` starts it from one call and closes it from another), so the
group runs in a task of its own, from `__aenter__` to `aclose()`. Nothing is
left loose: every background task belongs to the group; a task that fails
with an exception cancels the others, and `aclose()` (and `check()` in the
meantime) raise that exception in the owner. `CancelledError` is never
swallowed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

T = TypeVar("T")


class TaskScope:
    """A long-lived TaskGroup: `spawn()` tasks into it; `aclose()` cancels and awaits them."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._group: asyncio.TaskGroup | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()
        self._children: set[asyncio.Task[Any]] = set()
        self._error: BaseException | None = None
        self._state = "new"

    async def __aenter__(self) -> TaskScope:
        if self._state != "new":
            raise RuntimeError(f"TaskScope {self._name!r} can be entered once; it is {self._state}")
        self._state = "open"
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._runner = asyncio.get_running_loop().create_task(
            self._run(started), name=f"shardstream {self._name}"
        )
        await started
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(self, started: asyncio.Future[None]) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                started.set_result(None)
                await self._closing.wait()
                for task in list(self._children):
                    task.cancel()
        except BaseExceptionGroup as errors:
            if self._error is None:
                self._error = first_error(errors)
        finally:
            self._group = None
            if not started.done():
                started.set_result(None)

    def spawn(self, coro: Coroutine[Any, Any, T], *, name: str | None = None) -> asyncio.Task[T]:
        """Run `coro` in the scope; it is cancelled by `aclose()` if still running."""
        group = self._group
        if group is None or self._closing.is_set() or self._error is not None:
            coro.close()
            self.check()
            raise RuntimeError(f"TaskScope {self._name!r} is {self._state}: it takes no tasks")
        task = group.create_task(coro, name=name)
        self._children.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._children.discard(task)
        if self._error is None and not task.cancelled() and task.exception() is not None:
            self._error = task.exception()  # seen by check() at once

    def check(self) -> None:
        """Raise the error of a task that failed, if one did."""
        if self._error is not None:
            raise self._error

    async def aclose(self) -> None:
        """Cancel every task still running, wait for all of them, raise the first error
        one of them ended with (idempotent; the error is raised once)."""
        if self._state == "closed":
            return
        self._state = "closed"
        self._closing.set()
        runner, self._runner = self._runner, None
        if runner is not None:
            # Shielded: the owner being cancelled while closing must not leave tasks behind.
            await asyncio.shield(runner)
        error, self._error = self._error, None
        if error is not None:
            raise error


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception of a group that is not a cancellation (or the group)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return first_error(exc)
        if not isinstance(exc, asyncio.CancelledError):
            return exc
    return group

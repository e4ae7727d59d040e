"""TaskScope: background tasks owned by an object with a start / aclose() lifecycle."""

from __future__ import annotations

import asyncio
from dataclasses import fields
from typing import get_type_hints

import pytest

from shardstream.client._options import LoaderConfig, LoaderOptions
from shardstream.client._tasks import TaskScope


async def test_aclose_cancels_and_awaits_every_task() -> None:
    before = asyncio.all_tasks()
    scope = TaskScope("test")
    await scope.__aenter__()
    started = asyncio.Event()
    cancelled: list[bool] = []

    async def forever() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    scope.spawn(forever())
    await started.wait()
    await scope.aclose()
    assert cancelled == [True]
    assert asyncio.all_tasks() - before == {asyncio.current_task()} - before
    await scope.aclose()  # idempotent


async def test_a_task_error_cancels_the_others_and_reaches_the_owner() -> None:
    scope = TaskScope("test")
    await scope.__aenter__()
    other_cancelled = asyncio.Event()

    async def sibling() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            other_cancelled.set()

    async def broken() -> None:
        raise KeyError("a bug")

    scope.spawn(sibling())
    scope.spawn(broken())
    await other_cancelled.wait()
    with pytest.raises(KeyError, match="a bug"):
        scope.check()
    with pytest.raises(KeyError, match="a bug"):  # no new tasks in a failed scope
        scope.spawn(sibling())
    with pytest.raises(KeyError, match="a bug"):
        await scope.aclose()


async def test_closed_scope_takes_no_tasks_and_enters_once() -> None:
    async with TaskScope("test") as scope:
        pass

    async def nothing() -> None:
        return None

    coro = nothing()
    with pytest.raises(RuntimeError, match="is closed"):
        scope.spawn(coro)
    with pytest.raises(RuntimeError, match="entered once"):
        await scope.__aenter__()


def test_loader_options_match_loader_config() -> None:
    """`Loader(**options)` is typed by LoaderOptions: the same names as LoaderConfig."""
    assert set(get_type_hints(LoaderOptions)) == {f.name for f in fields(LoaderConfig)}
    assert LoaderOptions.__required_keys__ == {"dataset", "batch_size"}

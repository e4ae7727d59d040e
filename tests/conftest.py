"""Shared fixtures: generated datasets, in-process workers, worker processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.server import DatasetSpec, Worker, WorkerConfig, make_dataset
from shardstream.server._process import WorkerProcess

RECORDS = 2_000
SHARDS = 8
SHAPE = (4, 4, 3)


@pytest.fixture(scope="session", autouse=True)
def dev_shm_as_found() -> Iterator[None]:
    """The suite leaves /dev/shm as it found it: whatever a test kills, no segment or
    semaphore stays behind. An entry some live process holds (mapped or open) belongs
    to that process, maybe a program outside the suite, so only entries nobody holds
    count; the wait gives resource trackers time to unlink what they tracked."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield
        return
    before = set(os.listdir(shm))
    yield
    deadline = time.monotonic() + 10
    while (left := set(os.listdir(shm)) - before - _dev_shm_held()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"the test suite left these in /dev/shm: {sorted(left)}"


def _dev_shm_held() -> set[str]:
    """Names in /dev/shm that some live process has mapped or open."""
    held: set[str] = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if " /dev/shm/" in line:
                    held.add(line.split(" /dev/shm/", 1)[1].removesuffix(" (deleted)"))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/dev/shm/"):
                        held.add(target.removeprefix("/dev/shm/"))
    return held


@pytest.fixture(scope="session")
def npz_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("npz")
    make_dataset(root, shards=SHARDS, records=RECORDS, shape=SHAPE, format="npz")
    return root


@pytest.fixture(scope="session")
def csv_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("csv")
    make_dataset(root, shards=5, records=1_003, shape=(2, 3), format="csv")
    return root


def worker_config(
    root: Path, datasets: Sequence[str] = ("train=*.npz",), **kw: object
) -> WorkerConfig:
    options: dict[str, object] = {"processes": 0, "port": 0, "chunk_bytes": 16 * 1024}
    options.update(kw)
    return WorkerConfig(
        data_root=root,
        datasets=tuple(DatasetSpec.parse(d) for d in datasets),
        **options,  # type: ignore[arg-type]
    )


@contextlib.asynccontextmanager
async def running_workers(
    root: Path, n: int, datasets: Sequence[str] = ("train=*.npz",), **kw: object
) -> AsyncIterator[list[Worker]]:
    """`n` in-process workers on the test's own event loop, on ephemeral ports."""
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(Worker(worker_config(root, datasets, **kw)))
            for _ in range(n)
        ]
        yield workers


@contextlib.contextmanager
def worker_processes(root: Path, n: int, *extra: str) -> Iterator[list[WorkerProcess]]:
    """`n` real `shardstream worker` processes (killed on exit)."""
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(
                WorkerProcess.start(
                    [
                        "--data-root",
                        str(root),
                        "--dataset",
                        "train=*.npz",
                        "--processes",
                        "0",
                        "--chunk-bytes",
                        "16384",
                        *extra,
                    ]
                )
            )
            for _ in range(n)
        ]
        yield procs


async def collect_epoch(loader: Loader, epoch: int) -> list[dict[str, np.ndarray]]:
    return [batch async for batch in loader.epoch(epoch)]


def ids_of(batches: Sequence[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([b["id"] for b in batches]) if batches else np.array([], np.int64)


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)


def ipv6_loopback() -> bool:
    """Whether this host has the IPv6 loopback address."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True

"""What users do around the async API that it must survive: a wait for a batch cancelled
by a timeout, a loader used from another event loop or a forked child, a loader dropped
without `aclose()`, a closed SyncLoader opened again, and worker names that resolve to
nothing yet. Each of these lost a batch, hung, leaked or misled before."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader, SyncLoader
from shardstream.client import _pool as pool_module
from shardstream.client.errors import ConfigError, WorkersUnavailableError

from conftest import RECORDS, until, worker_processes

OPTS: dict[str, Any] = {"dataset": "train", "batch_size": 8, "seed": 3, "shuffle": True}
WAIT = 60  # seconds: a bound that only a hang reaches, never a pacing


@pytest.fixture(scope="module")
def address(npz_root: Path) -> Iterator[str]:
    with worker_processes(npz_root, 1) as workers:
        yield workers[0].address


def _tasks() -> set[asyncio.Task[Any]]:
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_wait_for_a_batch_cancelled_by_a_timeout_loses_nothing(address: str) -> None:
    """`asyncio.wait_for(it.__anext__(), t)`, retried on TimeoutError: a timeout that
    fired as the batch arrived dropped it (about 1 epoch in 10 lost its first batch, and
    a later state was off by one)."""
    async with Loader(address, **OPTS) as loader:
        reference = [b["id"] async for b in loader.epoch(0)]
        latencies = []
        for _ in range(9):
            it = loader.epoch(0)
            t0 = time.perf_counter()
            await it.__anext__()
            latencies.append(time.perf_counter() - t0)
            await it.aclose()
        median = sorted(latencies)[4]
        rng = random.Random(1)
        timeouts = 0
        for _ in range(150):  # the first batch, with timeouts around its latency
            it = loader.epoch(0)
            while True:
                try:
                    first = await asyncio.wait_for(it.__anext__(), rng.uniform(0, 2 * median))
                    break
                except TimeoutError:
                    timeouts += 1
            assert first["id"].tolist() == reference[0].tolist()
            await it.aclose()
        assert timeouts > 0  # the race was run
        for _ in range(3):  # whole epochs, every batch behind short timeouts
            it, got = loader.epoch(0), []
            while True:
                try:
                    got.append(await asyncio.wait_for(it.__anext__(), rng.uniform(0, median)))
                except TimeoutError:
                    continue
                except StopAsyncIteration:
                    break
            assert np.array_equal(np.concatenate([b["id"] for b in got]), np.concatenate(reference))
            assert it.counters.batches == len(reference)


async def test_a_loader_used_on_another_event_loop_says_so_at_once(address: str) -> None:
    """Iterating from another loop hung with no batch (then closing it printed batches in
    a raw asyncio error); now the first call says where the loader belongs."""
    home = asyncio.new_event_loop()
    thread = threading.Thread(target=home.run_forever, daemon=True)
    thread.start()
    try:
        loader = Loader(address, **OPTS)
        asyncio.run_coroutine_threadsafe(loader.start(), home).result(WAIT)
        with pytest.raises(RuntimeError, match="started on another event loop"):
            loader.epoch(0)  # called on this loop
        it = asyncio.run_coroutine_threadsafe(_epoch_of(loader), home).result(WAIT)
        with pytest.raises(RuntimeError, match="started on another event loop"):
            await asyncio.wait_for(it.__anext__(), WAIT)
        first = asyncio.run_coroutine_threadsafe(it.__anext__(), home).result(WAIT)
        assert len(first["id"]) == OPTS["batch_size"]  # on its own loop it works
        asyncio.run_coroutine_threadsafe(loader.aclose(), home).result(WAIT)
    finally:
        home.call_soon_threadsafe(home.stop)
        thread.join(WAIT)
        home.close()


async def _epoch_of(loader: Loader) -> Any:
    return loader.epoch(0)


FORK_CHILD = textwrap.dedent(
    """
    import asyncio, os, sys
    from shardstream.client import Loader

    async def main(address, mode):
        async with Loader(address, dataset="train", batch_size=8) as loader:
            it = loader.epoch(0)
            await it.__anext__()
            pid = os.fork()
            if pid == 0:
                try:
                    if mode == "new-loop":
                        async def more():
                            return await it.__anext__()
                        loop = asyncio.new_event_loop()
                        loop.run_until_complete(more())
                    else:
                        loader.epoch(1)
                    print("child: no error", flush=True)
                except RuntimeError as exc:
                    print("child:", exc, flush=True)
                os._exit(0)
            os.waitpid(pid, 0)
            n = 1 + sum([1 async for _ in it])
            print("parent:", n, flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


@pytest.mark.parametrize("mode", ["new-loop", "same-loop"])
def test_a_forked_child_using_its_parents_loader_gets_the_fork_error(
    address: str, mode: str
) -> None:
    """A child forked from a process with an open Loader hung (iterating on a new loop)
    or got "no running event loop"; the README promises an error naming the fork."""
    done = subprocess.run(
        [sys.executable, "-c", FORK_CHILD, address, mode],
        capture_output=True,
        text=True,
        timeout=WAIT,
    )
    assert done.returncode == 0, done.stderr
    assert "a forked child" in done.stdout, done.stdout + done.stderr
    assert f"parent: {-(-RECORDS // 8)}" in done.stdout  # the parent's epoch goes on


async def test_a_loader_dropped_without_aclose_closes_its_reads_and_connections(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An open Loader that became garbage mid-epoch left ~3 tasks and ~4 file descriptors
    per loader for as long as the loop ran, and "Task was destroyed" at its end."""
    tasks, fds = _tasks(), _fds()
    with caplog.at_level(logging.WARNING, logger="shardstream.client"):
        for _ in range(3):
            loader = Loader(address, **OPTS)
            await loader.start()
            it = loader.epoch(0)
            await it.__anext__()
            del it, loader
            gc.collect()
    await until(lambda: _tasks() <= tasks, WAIT, "the dropped loaders' tasks end")
    gc.collect()
    await until(lambda: _fds() <= fds + 1, WAIT, "their sockets close")
    dropped = [r for r in caplog.records if "garbage-collected while open" in r.getMessage()]
    assert len(dropped) == 3


async def test_an_epoch_whose_loader_was_dropped_says_why(address: str) -> None:
    """An iterator held after its loader became garbage: its next batch says what
    happened, rather than wait on reads that were cancelled."""
    loader = Loader(address, **OPTS)
    await loader.start()
    it = loader.epoch(0)
    await it.__anext__()
    del loader
    gc.collect()
    with pytest.raises(RuntimeError, match="garbage-collected"):
        async with asyncio.timeout(WAIT):
            async for _ in it:
                pass


def test_a_closed_syncloader_says_it_cannot_be_opened_again(address: str) -> None:
    loader = SyncLoader(address, **OPTS)
    with loader:
        assert len(next(iter(loader.epoch(0)))["id"]) == OPTS["batch_size"]
    with pytest.raises(RuntimeError, match="create a new SyncLoader"):
        next(iter(loader.epoch(1)))
    with pytest.raises(RuntimeError, match="create a new SyncLoader"):
        loader.open()


async def test_a_name_with_no_address_yet_is_resolved_again_until_it_has_one(
    address: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A Kubernetes headless service before its first pod is ready has no address
    (NXDOMAIN): a trainer started then failed at once, where a worker refusing
    connections gets `describe_timeout`. (DNS is the one part stood in for here.)"""
    calls = 0
    real = pool_module.resolve_all

    async def not_yet(targets: Any) -> tuple[list[str], dict[str, str]]:
        nonlocal calls
        calls += 1
        if calls <= 3:
            return [], {t: "cannot resolve: [Errno -2] Name or service not known" for t in targets}
        return await real([address])

    monkeypatch.setattr(pool_module, "resolve_all", not_yet)
    with caplog.at_level(logging.WARNING, logger="shardstream.client"):
        async with Loader("dns:///worker.example:50051", **OPTS, backoff_base=0.01) as loader:
            assert sum([len(b["id"]) async for b in loader.epoch(0)]) == RECORDS
    assert calls >= 4
    assert sum("resolves yet" in r.getMessage() for r in caplog.records) == 1


async def test_a_name_that_never_resolves_fails_after_the_describe_timeout() -> None:
    t0 = time.monotonic()
    with pytest.raises(WorkersUnavailableError, match=r"resolved within 0\.5s"):
        async with Loader("dns:///nothing.invalid:50051", **OPTS, describe_timeout=0.5):
            pass
    assert time.monotonic() - t0 >= 0.5


async def test_a_malformed_worker_name_is_a_config_error_at_once() -> None:
    with pytest.raises(ConfigError, match="must end in :PORT"):
        async with Loader("dns:///worker", **OPTS):
            pass


async def test_workers_whose_address_is_gone_from_the_name_are_let_go(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pods replaced under a headless service get new addresses: each address ever seen
    kept its connections, health watch and statistics for the loader's life (3 tasks and
    a metrics series more per address)."""
    from shardstream.client import _resolve

    passes = 0
    host, port = address.rsplit(":", 1)

    async def churn(targets: Any) -> tuple[list[str], dict[str, str]]:
        nonlocal passes
        passes += 1  # the worker, and a replica that exists for one pass only
        return [address, f"127.0.0.{2 + passes % 250}:{port}"], {}

    monkeypatch.setattr(_resolve, "resolve_all", churn)
    async with Loader(f"dns:///{host}:{port}", **OPTS, resolve_interval=0.01) as loader:
        tasks = len(_tasks())
        await until(lambda: passes >= 40, WAIT, "40 resolutions")
        assert len(loader.statistics().reads_in_flight) <= 1 + pool_module.RETIRE_AFTER + 1
        assert len(_tasks()) <= tasks + 4 * (pool_module.RETIRE_AFTER + 1)  # not 3 x 40
        assert sum([len(b["id"]) async for b in loader.epoch(0)]) == RECORDS


async def test_a_worker_let_go_while_it_is_described_gets_no_read(
    address: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read chose a worker that joined and was being described when two resolutions
    without its address let it go: the read got its released connection (no stub)."""
    options = Loader(address, **OPTS).config.pool_options()
    async with pool_module.WorkerPool([address], options) as pool:
        (real,) = pool.conns
        real.assigned = 1  # the next read tries the new worker first
        asked, answer = asyncio.Event(), asyncio.Event()

        async def described_late(conn: Any, desc: Any, how: Any) -> None:
            asked.set()
            await answer.wait()
            conn.verified = True

        monkeypatch.setattr(pool_module, "verify", described_late)
        joined = pool._add("127.0.0.1:9")  # never asked: its description is stood in for
        joined.serving = True
        loop = asyncio.get_running_loop()
        lease = asyncio.ensure_future(pool._acquire(loop.time() + WAIT, {}, None))
        await asyncio.wait_for(asked.wait(), WAIT)
        for _ in range(pool_module.RETIRE_AFTER):
            pool._resolved([address], True)
        answer.set()
        conn = await asyncio.wait_for(lease, WAIT)
        conn.outstanding -= 1
        assert joined not in pool.conns
        assert conn is real


def test_a_torch_iterable_opens_again_after_its_workers_were_not_up(npz_root: Path) -> None:
    """A first use before the workers are up fails; the next use, once they are, works
    (it said to "create a new SyncLoader", which a torch user never made)."""
    import socket

    from shardstream.client.torch import ShardstreamIterable
    from shardstream.server._process import WorkerProcess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = ShardstreamIterable(f"127.0.0.1:{port}", **OPTS, describe_timeout=0.2)
    try:
        with pytest.raises(WorkersUnavailableError):
            len(data)
        args = ["--data-root", str(npz_root), "--dataset", "train=*.npz", "--processes", "0"]
        with WorkerProcess.start([*args, "--port", str(port)]):
            assert len(data) == RECORDS // OPTS["batch_size"]
    finally:
        data.close()


async def test_workers_are_asked_for_the_whole_describe_timeout() -> None:
    """A worker refusing connections was given up once the next backoff would pass the
    deadline (26 s of the default 30), while the error said "within 30.0s"."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # a port nothing listens on: connections are refused
        port = s.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(WorkersUnavailableError, match=r"within 1\.5s"):
            async with Loader(f"127.0.0.1:{port}", **OPTS, describe_timeout=1.5):
                pass
    assert time.monotonic() - t0 >= 1.5


def test_a_sync_loader_that_failed_to_open_answers_state_dict_plainly() -> None:
    """A SyncLoader whose open() failed (or was interrupted: Ctrl-C while the workers are
    slow) still answers `state_dict()` with the state it was given, for the checkpoint
    handler that saves it; without one, the error says to create a new loader. Was:
    "the loader is not started; use `async with Loader(...)`", the async API's advice."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    given = {"epoch": 3, "batches": 7, "note": "the state the job was restarted with"}
    opts = {"dataset": "train", "batch_size": 4, "describe_timeout": 0.3}
    with_state = SyncLoader([address], state=given, **opts)
    with pytest.raises(WorkersUnavailableError):
        with_state.open()
    assert with_state.state_dict() == given
    without = SyncLoader([address], **opts)
    with pytest.raises(WorkersUnavailableError):
        without.open()
    with pytest.raises(RuntimeError, match=r"closed before it had started.*create a new one"):
        without.state_dict()

"""Exactly once through real faults: worker processes killed, frozen, drained, restarted.

Workers are real `shardstream worker` processes decoding with a slow npz decoder
(a few ms per chunk), so that reads are in flight when a fault strikes. Each
fault fires from the consuming loop of rank 0 at the first batch after which
the target worker has reads running for that rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardstream.client import Loader
from shardstream.server import make_dataset
from shardstream.server._process import WorkerProcess, WorkerStartError

TESTS = Path(__file__).parent
RECORDS = 12_000
WORLD = 4
OPTIONS = {
    "batch_size": 50,
    "seed": 11,
    "shuffle": True,
    "read_bytes": 64 * 1024,
    "chunk_bytes": 16 * 1024,
    "max_inflight_reads": 6,
    "reads_ahead": 8,
    "prefetch_batches": 2,
    "idle_timeout": 2.0,
    "keepalive_seconds": 1.0,
    "backoff_base": 0.05,
    "backoff_cap": 0.5,
    "retry_deadline": 60.0,
}
Fault = Callable[[Loader], Awaitable[bool]]  # returns True once it has fired


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("faults")
    make_dataset(root, shards=12, records=RECORDS, shape=(16, 16, 3))
    return root


def start_worker(root: Path, *extra: str) -> WorkerProcess:
    return WorkerProcess.start(
        ["--data-root", str(root), "--dataset", "train=*.npz:slownpz", "--decoder",
         "pid_decoder:SlowNpz", "--processes", "0", "--chunk-bytes", "16384", *extra],
        env={"PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))},
    )  # fmt: skip


@contextlib.contextmanager
def fleet(root: Path, n: int, *extra: str) -> Iterator[list[WorkerProcess]]:
    workers: list[WorkerProcess] = []
    try:
        for _ in range(n):
            workers.append(start_worker(root, *extra))
        yield workers
    finally:
        for w in workers:
            w.signal(signal.SIGCONT)
            w.close()


async def run_epochs(
    addresses: list[str], epochs: list[int], fault: Fault | None = None, **overrides: object
) -> tuple[dict[tuple[int, int], np.ndarray], list[Loader]]:
    """{(rank, epoch): ids in delivery order} for WORLD concurrent ranks."""
    out: dict[tuple[int, int], np.ndarray] = {}
    loaders = [
        Loader(addresses, dataset="train", rank=r, world_size=WORLD, **{**OPTIONS, **overrides})
        for r in range(WORLD)
    ]
    fired = False

    async def rank(loader: Loader) -> None:
        nonlocal fired
        for e in epochs:
            ids = []
            async for batch in loader.epoch(e):
                ids.append(batch["id"])
                if fault is not None and loader.config.rank == 0 and not fired:
                    fired = await fault(loader)
            out[(loader.config.rank, e)] = np.concatenate(ids)

    try:
        for loader in loaders:
            await loader.start()
        async with asyncio.TaskGroup() as tg:
            for loader in loaders:
                tg.create_task(rank(loader))
    finally:
        for loader in loaders:
            await loader.aclose()
    assert fault is None or fired, "the fault never fired: no read was in flight"
    return out, loaders


def assert_exactly_once(out: dict[tuple[int, int], np.ndarray], epoch: int) -> None:
    ids = np.concatenate([out[(r, epoch)] for r in range(WORLD)])
    assert len(ids) == RECORDS
    assert np.array_equal(np.sort(ids), np.arange(RECORDS))
    assert len({len(out[(r, epoch)]) for r in range(WORLD)}) == 1


def when_busy(target: WorkerProcess | Any, action: Callable[[], Awaitable[None]]) -> Fault:
    async def fault(loader: Loader) -> bool:
        if loader.statistics().reads_in_flight.get(target.address, 0) == 0:
            return False
        await action()
        return True

    return fault


async def test_kill_9_one_of_three_workers(root: Path) -> None:
    with fleet(root, 3) as workers:
        addresses = [w.address for w in workers]
        reference, _ = await run_epochs(addresses, [0])
        victim = workers[1]

        async def kill() -> None:
            victim.signal(signal.SIGKILL)

        out, loaders = await run_epochs(addresses, [0], when_busy(victim, kill))
    assert_exactly_once(out, 0)
    for r in range(WORLD):
        assert np.array_equal(out[(r, 0)], reference[(r, 0)])  # order as if nothing happened
    # The kill hit the fleet: a read was resumed elsewhere, or (on a loaded machine the
    # stream in flight can have been received whole just before the kill) the loader saw
    # the worker gone and gave it no more reads.
    (conn,) = [c for c in loaders[0]._pool.conns if c.address == victim.address]  # type: ignore[union-attr]
    resumed = loaders[0].statistics().resumes_by_worker.get(victim.address, 0)
    assert resumed >= 1 or (not conn.serving and conn.last_error), (resumed, conn)


async def test_kill_all_workers_and_restart_them_on_the_same_ports(root: Path) -> None:
    with fleet(root, 3) as workers:
        addresses = [w.address for w in workers]

        async def kill_all_and_restart() -> None:
            ports = [w.port for w in workers]
            for w in workers:
                w.signal(signal.SIGKILL)
            for w in workers:
                w.close()

            def restart() -> list[WorkerProcess]:
                return [start_worker(root, "--port", str(p)) for p in ports]

            workers[:] = await asyncio.to_thread(restart)

        out, loaders = await run_epochs(
            addresses, [0, 1], when_busy(workers[0], kill_all_and_restart)
        )
        assert [w.address for w in workers] == addresses
    assert_exactly_once(out, 0)
    assert_exactly_once(out, 1)
    assert loaders[0].statistics().resumes >= 1


async def test_sigstop_worker_is_routed_around_and_sigcont_duplicates_nothing(root: Path) -> None:
    with fleet(root, 3) as workers:
        addresses = [w.address for w in workers]
        victim = workers[2]
        stopped_at: list[float] = []

        async def freeze() -> None:
            victim.signal(signal.SIGSTOP)
            stopped_at.append(time.monotonic())

        out, loaders = await run_epochs(addresses, [0], when_busy(victim, freeze))
        detected = time.monotonic() - stopped_at[0]
        victim.signal(signal.SIGCONT)
        # After SIGCONT the worker's late data must not show up anywhere: run again.
        again, _ = await run_epochs(addresses, [0, 1])
    assert_exactly_once(out, 0)
    assert_exactly_once(again, 0)
    assert_exactly_once(again, 1)
    for r in range(WORLD):
        assert np.array_equal(out[(r, 0)], again[(r, 0)])
    stats = loaders[0].statistics()
    assert stats.resumes_by_worker.get(victim.address, 0) >= 1
    print(f"\nSIGSTOP: epoch finished {detected:.2f}s after the freeze "
          f"(idle_timeout {OPTIONS['idle_timeout']}s)")  # fmt: skip


async def test_sigterm_drain_mid_epoch(root: Path) -> None:
    """SIGTERM mid-epoch: the worker says NOT_SERVING, its running streams end at a record
    boundary and are resumed elsewhere (exactly once), and it exits 0 once they are over.
    The grace is far longer than the test may take, so the exit shows the drain ended
    with its streams, not with the grace (test_second_sigterm_exits_at_once shows that
    NOT_SERVING comes while a drain is still held open)."""
    grace = 600
    with fleet(root, 3, "--grace", str(grace)) as workers:
        addresses = [w.address for w in workers]
        victim = workers[0]
        async with grpc.aio.insecure_channel(victim.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

            async def drain() -> None:
                victim.signal(signal.SIGTERM)
                reply = await asyncio.wait_for(watch.read(), 60)  # only bounds a hang
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

            # Long reads (~30 chunks each), so a read in flight is mid-stream at SIGTERM.
            out, loaders = await run_epochs(
                addresses, [0], when_busy(victim, drain), read_bytes=512 * 1024
            )
            watch.cancel()
        code = await asyncio.to_thread(victim.proc.wait, 60)  # a tenth of the grace
    assert code == 0
    log = list(victim.log)
    assert not any("grace" in line and "over" in line for line in log), log[-5:]
    assert_exactly_once(out, 0)
    cut = sum(ld.statistics().resumes_by_worker.get(victim.address, 0) for ld in loaders)
    ended = sum("draining: ending a stream" in line for line in log)
    print(f"\ndrain: {ended} streams ended early, {cut} resumed")
    assert ended >= 1 and cut >= ended


async def test_many_clients_against_a_small_stream_cap(root: Path) -> None:
    with fleet(root, 1, "--max-streams", "2") as workers:
        out, loaders = await run_epochs([workers[0].address], [0], max_inflight_reads=4)
    assert_exactly_once(out, 0)
    assert any(ld.statistics().resumes > 0 for ld in loaders)  # RESOURCE_EXHAUSTED, retried


def rss_and_fds(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS"))
    return rss_kb * 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def test_breaking_out_of_epochs_releases_worker_resources(root: Path) -> None:
    with fleet(root, 1) as (worker,):
        async with Loader([worker.address], dataset="train", **OPTIONS) as loader:

            async def cycles(n: int) -> None:
                for i in range(n):
                    async for _ in loader.epoch(i % 5):
                        break

            await cycles(20)  # warm up: connections, caches, allocator
            before = rss_and_fds(worker.pid)
            await cycles(200)
            ids = np.concatenate([b["id"] async for b in loader.epoch(3)])
            after = rss_and_fds(worker.pid)
    growth = (after[0] - before[0]) / 2**20
    print(f"\n200 early breaks: worker RSS {before[0] / 2**20:.1f} -> {after[0] / 2**20:.1f} MiB "
          f"({growth:+.1f}), open fds {before[1]} -> {after[1]}")  # fmt: skip
    assert np.array_equal(np.sort(ids), np.arange(RECORDS))  # world size 1: everything
    assert after[1] <= before[1] + 4
    assert growth < 32


async def test_all_workers_gone_for_good_is_a_clear_error(root: Path) -> None:
    from shardstream.client.errors import WorkersUnavailableError

    with fleet(root, 2) as workers:
        addresses = [w.address for w in workers]

        async def kill_all() -> None:
            for w in workers:
                w.signal(signal.SIGKILL)

        with pytest.raises(ExceptionGroup) as info:  # one error per rank
            await run_epochs(addresses, [0], when_busy(workers[0], kill_all), retry_deadline=3.0)
    errors = info.value.exceptions
    assert errors  # the first ranks to fail; the task group cancels the others
    for error in errors:
        assert isinstance(error, WorkersUnavailableError)
        assert set(error.attempts) == set(addresses)
        assert all(addr in str(error) for addr in addresses)
    print(f"\n{errors[0]}")


async def test_second_sigterm_exits_at_once(tmp_path: Path) -> None:
    """A second SIGTERM during a drain exits at once. The drain is held open by a stream
    whose client reads nothing, so the worker is certainly still draining at the second
    SIGTERM, and the NOT_SERVING that comes before it comes while the drain waits."""
    from shardstream.client._wire import WorkerStub, encode_read

    make_dataset(tmp_path, shards=1, records=400, shape=(256, 256))  # 64 KiB records
    # A receive window of 1 KiB (fixed: no BDP probing): the worker's first 64 KiB
    # message can never be sent, so a stream that runs is blocked in its first write and
    # never reaches the record boundary where a drain would end it.
    tiny = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    read = encode_read(dataset="train", shard="shard-00000.npz", start=0, count=400, seed=0,
                       fingerprint="", max_chunk_records=0)  # fmt: skip
    hold = ("--grace", "600", "--stream-stall-timeout", "600")  # neither ends the drain here
    with fleet(tmp_path, 1, *hold, "--max-streams", "1") as (worker,):
        async with (
            grpc.aio.insecure_channel(worker.address) as channel,
            grpc.aio.insecure_channel(worker.address, options=tiny) as stalled_channel,
        ):
            # Two such streams, one slot: once one is refused as RESOURCE_EXHAUSTED, the
            # other runs (and is blocked). A condition, where waiting would be a guess.
            calls = [WorkerStub(stalled_channel).read(read) for _ in range(2)]
            codes = [asyncio.ensure_future(call.code()) for call in calls]
            done, _ = await asyncio.wait(codes, timeout=60, return_when=asyncio.FIRST_COMPLETED)
            assert [c.result() for c in done] == [grpc.StatusCode.RESOURCE_EXHAUSTED], done
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            worker.signal(signal.SIGTERM)
            reply = await asyncio.wait_for(watch.read(), 60)  # only bounds a hang
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert worker.proc.poll() is None  # the blocked stream holds the drain open
            worker.signal(signal.SIGTERM)  # the drain is under way: this one exits at once
            code = await asyncio.to_thread(worker.proc.wait, 60)  # a tenth of the grace
            for call in calls:
                call.cancel()
            await asyncio.gather(*codes, return_exceptions=True)
            watch.cancel()
    assert code == 128 + signal.SIGTERM
    assert any("second SIGTERM: exiting now" in line for line in worker.log)


async def test_network_faults_through_a_proxy(root: Path) -> None:
    """Resets after N bytes (repeatedly), a black hole, a slow trickle: exactly once."""
    from faultproxy import BlackHole, FaultProxy, Pass, ResetAfter, Trickle

    with fleet(root, 2) as workers:
        async with FaultProxy(workers[0].address) as proxy:
            addresses = [proxy.address, workers[1].address]
            # The chunks' bytes must cross the proxy: no same-host lane beside it.
            socket_only = {"same_host_lane": False, "network_lane": False}
            expected, _ = await run_epochs(addresses, [0], **socket_only)
            for mode in (ResetAfter(150_000, repeat=True), BlackHole(), Trickle(200_000)):
                proxy.set_mode(Pass())

                async def inject(mode: object = mode) -> None:
                    proxy.set_mode(mode)  # type: ignore[arg-type]

                resets_before = proxy.statistics().resets
                fault = when_busy(_Addr(proxy.address), inject)
                out, loaders = await run_epochs(
                    addresses, [0], fault, idle_timeout=1.5, **socket_only
                )
                assert_exactly_once(out, 0)
                for r in range(WORLD):
                    assert np.array_equal(out[(r, 0)], expected[(r, 0)]), type(mode).__name__
                if isinstance(mode, ResetAfter):
                    assert proxy.statistics().resets > resets_before + 1  # again and again
                    assert sum(ld.statistics().resumes for ld in loaders) >= 2
                if isinstance(mode, BlackHole):
                    resumed = sum(
                        ld.statistics().resumes_by_worker.get(proxy.address, 0) for ld in loaders
                    )
                    assert resumed >= 1  # a silent stream was given up and resumed elsewhere


class _Addr:
    """`when_busy` needs only an address."""

    def __init__(self, address: str) -> None:
        self.address = address


async def test_a_stalled_input_is_reported_while_waiting(root: Path) -> None:
    import logging

    warned = asyncio.Event()
    messages: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "data input is slow" in record.getMessage():
                messages.append(record.getMessage())
                warned.set()

    handler = Catch()
    logging.getLogger("shardstream.client").addHandler(handler)
    try:
        with fleet(root, 1) as (worker,):
            async with Loader([worker.address], dataset="train", batch_size=50, prefetch_batches=1,
                              reads_ahead=1, max_inflight_reads=1, read_bytes=50 * 768,
                              lag_warning_seconds=0.2, idle_timeout=60) as loader:  # fmt: skip
                epoch = loader.epoch(0)
                ids = [(await anext(epoch))["id"]]
                worker.signal(signal.SIGSTOP)  # nothing more can arrive
                # A loaded machine may have warned during the first batch already: only
                # warnings from here on count. Batches received before the freeze are
                # taken; the first wait that finds none must be reported.
                messages.clear()
                warned.clear()
                while True:
                    waiting = asyncio.ensure_future(anext(epoch))
                    warning = asyncio.ensure_future(warned.wait())
                    await asyncio.wait({waiting, warning}, return_when=asyncio.FIRST_COMPLETED)
                    warning.cancel()
                    await asyncio.gather(warning, return_exceptions=True)
                    if warned.is_set():
                        break
                    ids.append(waiting.result()["id"])
                before = len(ids)
                worker.signal(signal.SIGCONT)
                ids.append((await waiting)["id"])
                ids += [b["id"] async for b in epoch]
    finally:
        logging.getLogger("shardstream.client").removeHandler(handler)
    assert np.array_equal(np.sort(np.concatenate(ids)), np.arange(RECORDS))
    assert messages[0].startswith(
        f"data input is slow: no batch for 0.2 s (epoch 0, after batch {before} of"
    )
    assert f"reads running {{'{worker.address}': 1}}" in messages[0]


async def test_keepalive_pings_are_accepted_by_the_worker(root: Path) -> None:
    """Client pings every second, idle and busy: the worker must not answer with a
    too_many_pings GOAWAY (which would cut the health watch and every stream)."""
    with fleet(root, 1) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=500,
                          keepalive_seconds=1.0) as loader:  # fmt: skip
            await asyncio.sleep(3.5)  # idle, with pings: the condition under test is time
            n = len([b async for b in loader.epoch(0)])
            await asyncio.sleep(3.5)
            conn = loader._pool.conns[0]  # type: ignore[union-attr]
            stats = loader.statistics()
    assert n == RECORDS // 500
    assert stats.resumes == 0
    assert conn.last_error == "" and conn.serving  # the health watch was never cut
    assert not any("too_many_pings" in line or "GOAWAY" in line for line in worker.log)


def test_a_worker_that_cannot_start_is_reported_with_its_log_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    # The error used to leave the worker's stdout and stderr pipes open (a ResourceWarning
    # at the next collection, which failed a whole test run at its end).
    argv = ["--data-root", str(tmp_path)]  # and no --dataset
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(WorkerStartError, match=r"exit code [1-9]\d*\); its log:\n.*dataset"):
            WorkerProcess.start(argv, timeout=60)
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []

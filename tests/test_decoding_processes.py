"""Decoding processes and their shared memory, through real kills.

Workers are real `shardstream worker` processes (or, where noted, in-process
workers with real decoding processes); faults are real signals. A decoding
process killed as the OOM killer would (SIGKILL) must cost its reads a resume,
never the worker; whatever is killed, nothing may stay behind: no segment in
`/dev/shm`, no decoding process without its server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shardstream.client import Loader
from shardstream.server import make_dataset
from shardstream.server._pool import DecodingPool
from shardstream.server._process import WorkerProcess

from conftest import running_workers

TESTS = Path(__file__).parent
RECORDS = 6_000
OPTIONS = {
    "batch_size": 50,
    "seed": 5,
    "shuffle": True,
    "read_bytes": 64 * 1024,
    "chunk_bytes": 16 * 1024,
    "max_inflight_reads": 6,
    "reads_ahead": 8,
    "idle_timeout": 5.0,
    "backoff_base": 0.05,
    "backoff_cap": 0.5,
    "retry_deadline": 20.0,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards whose members are deflated: every chunk is decoded in a decoding process
    (stored members would be read directly by the server process: `_direct`)."""
    root = tmp_path_factory.mktemp("decoding")
    for path in make_dataset(root, shards=6, records=RECORDS, shape=(16, 16, 3)):
        with np.load(path) as npz:
            arrays = dict(npz)
        np.savez_compressed(path, **arrays)
    return root


# -- processes, from /proc ------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The child processes of `pid` (of all its threads)."""
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                found += map(int, Path(f"/proc/{pid}/task/{task}/children").read_text().split())
    return found


def decoding_processes(pid: int) -> list[int]:
    """The decoding processes of worker `pid` (spawned children; not its resource tracker)."""
    return [c for c in children(pid) if b"spawn_main" in _cmdline(c)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def alive(pid: int) -> bool:
    """Running (a zombie is dead: only its exit status waits to be collected)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def shm_held(pids: Sequence[int]) -> set[Path]:
    """The files in /dev/shm these processes have mapped or open."""
    found: set[Path] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if " /dev/shm/" in line:
                    found.add(Path(line[line.index("/dev/shm/") :].removesuffix(" (deleted)")))
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if target.startswith("/dev/shm/"):
                        found.add(Path(target.removesuffix(" (deleted)")))
    return found


def outliving(pids: Sequence[int], seconds: float) -> list[int]:
    """Those of `pids` still alive after up to `seconds`, which are then killed (they
    would hold the worker's log pipes open)."""
    deadline = time.monotonic() + seconds
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling a condition: processes end asynchronously
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return left


def wait_removed(files: set[Path], seconds: float) -> set[Path]:
    """Those of `files` still there after up to `seconds`."""
    deadline = time.monotonic() + seconds
    while (left := {f for f in files if f.exists()}) and time.monotonic() < deadline:
        time.sleep(0.05)  # a resource tracker unlinks what it tracked asynchronously
    return left


def worker_args(root: Path, *extra: str) -> list[str]:
    return ["--data-root", str(root), "--dataset", "train=*.npz:slownpz", "--decoder",
            "pid_decoder:SlowNpz", "--processes", "2", "--chunk-bytes", "16384", *extra,
            "--port", "0"]  # fmt: skip


def popen_worker(
    args: Sequence[str], *, prefix: Sequence[str] = (), new_session: bool = False
) -> WorkerProcess:
    """A worker process, not yet waited for (under `prefix`, in its own session)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS),
           os.environ.get("PYTHONPATH")]))}  # fmt: skip
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-m", "shardstream.server", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=new_session,
    )
    return WorkerProcess(proc, args)


@contextlib.contextmanager
def worker(args: Sequence[str], **kw: object) -> Iterator[WorkerProcess]:
    with popen_worker(args, **kw) as w:  # type: ignore[arg-type]
        w.wait_serving(60)
        yield w


async def read_epoch(loader: Loader, epoch: int) -> np.ndarray:
    return np.concatenate([b["id"] async for b in loader.epoch(epoch)])


def assert_exactly_once(ids: np.ndarray, total: int = RECORDS) -> None:
    assert len(ids) == total
    assert np.array_equal(np.sort(ids), np.arange(total))


# -- a decoding process dies ---------------------------------------------------------------


async def test_a_decoding_process_killed_mid_stream_is_replaced_and_its_read_resumed(
    root: Path,
) -> None:
    """SIGKILL of a decoding process while it decodes: the read it served fails as
    UNAVAILABLE and is resumed, the epoch is exactly once and in the same order, the
    process is replaced and the worker serves the next epochs."""
    with worker(worker_args(root)) as w:
        first = decoding_processes(w.pid)
        assert len(first) == 2, first
        async with Loader([w.address], dataset="train", **OPTIONS) as loader:  # type: ignore[arg-type]
            reference = await read_epoch(loader, 0)
            killed: list[int] = []
            ids = []
            async for batch in loader.epoch(0):
                ids.append(batch["id"])
                # Kill at a batch after which reads are in flight; again (once the last
                # death is logged) if the kill found the process between two chunks.
                if (
                    len(ids) % 10 == 5
                    and len(killed) < 4
                    and _logged(w, killed)
                    and not _killed_busy(w, killed)
                    and loader.statistics().reads_in_flight.get(w.address, 0)
                ):
                    victim = decoding_processes(w.pid)[0]
                    os.kill(victim, signal.SIGKILL)
                    killed.append(victim)
            during = np.concatenate(ids)
            await _replaced(w, killed)
            later = [await read_epoch(loader, e) for e in (1, 2)]
            stats = loader.statistics()
        now = decoding_processes(w.pid)
        log = list(w.log)
    assert killed and _killed_busy(w, killed), f"no kill found a process decoding: {log[-5:]}"
    assert_exactly_once(during)
    assert np.array_equal(during, reference)  # order as if nothing happened
    for ids_ in later:
        assert_exactly_once(ids_)
    assert stats.resumes >= 1  # the read of the killed process's chunk, resumed
    assert len(now) == 2 and not set(now) & set(killed), (first, killed, now)
    assert all(not alive(p) for p in killed)
    assert not any("BrokenProcessPool" in line and "Traceback" in line for line in log)
    print(f"\nkilled {len(killed)} decoding process(es); {stats.resumes} read(s) resumed; "
          f"{[line.split(': ', 1)[-1] for line in log if 'replaced by' in line]}")  # fmt: skip


def _killed_busy(w: WorkerProcess, killed: list[int]) -> bool:
    return any(f"decoding process {p} died (" in line for line in w.log for p in killed)


def _logged(w: WorkerProcess, killed: list[int]) -> bool:
    lines = list(w.log)
    return all(any(f"decoding process {p} died" in line for line in lines) for p in killed)


async def _replaced(w: WorkerProcess, killed: list[int], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not _logged(w, killed):
        assert time.monotonic() < deadline, f"decoding processes {killed} were not replaced"
        await asyncio.sleep(0.02)  # polling the worker's log


async def test_a_worker_whose_decoding_processes_cannot_be_replaced_stops(
    npz_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If a dead decoding process cannot be replaced, the worker says NOT_SERVING and
    stops, and `wait_closed` raises (the CLI exits non-zero, to be restarted)."""
    async with running_workers(npz_root, 1, processes=1, direct_reads=False) as (w,):
        pool = w._executor
        assert isinstance(pool, DecodingPool)

        def cannot(*_: object) -> int:
            raise OSError("no more processes (test)")

        monkeypatch.setattr(DecodingPool, "_spawn", cannot)
        async with grpc.aio.insecure_channel(w.address) as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            (victim,) = pool.pids()
            os.kill(victim, signal.SIGKILL)
            async with Loader([w.address], dataset="train", batch_size=100,
                              retry_deadline=2.0) as loader:  # fmt: skip
                with pytest.raises(Exception, match=r"cannot be replaced|no worker could serve"):
                    await read_epoch(loader, 0)
            reply = await asyncio.wait_for(watch.read(), 10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            watch.cancel()
        with pytest.raises(OSError, match="decoding processes died and cannot be replaced"):
            await asyncio.wait_for(w.wait_closed(), 30)
        assert not alive(victim)


# -- nothing left behind ------------------------------------------------------------------


@pytest.mark.parametrize("kill", ["sigkill-server", "sigkill-group", "sigterm"])
async def test_a_worker_killed_mid_stream_leaves_no_shared_memory_and_no_processes(
    root: Path, kill: str
) -> None:
    """The chunk buffers are anonymous memory, not files in /dev/shm: nothing is left
    there when the worker is SIGKILLed alone, or with every process of its group (its
    resource tracker too, as a container or cgroup kill does), or drains; and its
    decoding processes end with it. (Only what this worker held is looked at: other
    programs may use /dev/shm meanwhile; the suite's fixture checks it as a whole.)"""
    with worker(worker_args(root), new_session=True) as w:
        async with Loader([w.address], dataset="train", **OPTIONS) as loader:  # type: ignore[arg-type]
            epoch = loader.epoch(0)
            for _ in range(20):
                await anext(epoch)  # mid-stream: reads in flight, chunk buffers in use
            procs = children(w.pid)
            decoders = decoding_processes(w.pid)
            held = shm_held([w.pid, *procs])
            if kill == "sigkill-server":
                w.signal(signal.SIGKILL)
            elif kill == "sigkill-group":
                os.killpg(w.pid, signal.SIGKILL)
            else:
                w.signal(signal.SIGTERM)
            code = await asyncio.to_thread(w.proc.wait, 30)
            await epoch.aclose()
        left_processes = await asyncio.to_thread(outliving, procs, 10.0)
        left_shm = await asyncio.to_thread(wait_removed, held, 10.0)
        log = "\n".join(w.log)
    assert len(decoders) == 2
    assert not left_shm, f"left in /dev/shm: {sorted(map(str, left_shm))}"
    assert not held, f"the worker holds files in /dev/shm: {sorted(map(str, held))}"
    assert not left_processes, f"still running after the worker died: {left_processes}"
    if kill == "sigterm":
        assert code == 0
        assert "Traceback" not in log and "KeyError" not in log and "leaked" not in log, log
    else:
        assert code == -signal.SIGKILL


def test_decoding_processes_die_with_a_server_killed_while_they_start(root: Path) -> None:
    """A server SIGKILLed while its decoding processes are still starting (before they
    could ask to die with it) leaves none of them running."""
    with popen_worker(worker_args(root)) as w:
        deadline = time.monotonic() + 60
        while not (started := decoding_processes(w.pid)):
            assert time.monotonic() < deadline and w.proc.poll() is None, list(w.log)
            time.sleep(0.002)  # polling for the first spawned child, to kill at once
        w.signal(signal.SIGKILL)
        w.proc.wait(10)
        left = outliving(started, 10.0)
    assert not left, f"decoding processes {left} outlived their server"


# -- a small /dev/shm ---------------------------------------------------------------------


def _small_dev_shm(megabytes: int) -> list[str] | None:
    """A command prefix running a process with its own /dev/shm of that size, or None
    where mount namespaces are not available (not root, no unshare)."""
    unshare = shutil.which("unshare")
    if unshare is None or os.geteuid() != 0:
        return None
    prefix = [unshare, "--mount", "--propagation", "private", "sh", "-c",
              f'mount -t tmpfs -o size={megabytes}m tmpfs /dev/shm && exec "$0" "$@"']  # fmt: skip
    probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
    return prefix if probe.returncode == 0 else None


async def test_a_worker_serves_where_dev_shm_is_smaller_than_its_buffers(
    tmp_path: Path,
) -> None:
    """Docker gives a container 64 MiB of /dev/shm; the chunk buffers of `--processes 8`
    are 18 x 8 MiB. Here: 6 buffers of 4 MiB, filled to 2 MiB each, and an 8 MiB
    /dev/shm. Buffers in /dev/shm overcommit it and reads fail (EFAULT, "Bad address");
    anonymous memory does not depend on it."""
    prefix = _small_dev_shm(8)
    if prefix is None:
        pytest.skip("needs root and unshare to give a worker a small /dev/shm")
    make_dataset(tmp_path, shards=4, records=1_000, shape=(64, 64, 6))  # 24 KiB records
    args = ["--data-root", str(tmp_path), "--dataset", "train=*.npz", "--processes", "2",
            "--max-message-bytes", str(4 << 20), "--chunk-bytes", str(2 << 20), "--port", "0"]  # fmt: skip
    with worker(args, prefix=prefix) as w:
        async with Loader([w.address], dataset="train", batch_size=200, read_bytes=6 << 20,
                          chunk_bytes=2 << 20, retry_deadline=20) as loader:  # fmt: skip
            ids = [await read_epoch(loader, e) for e in (0, 1)]
            stats = loader.statistics()
        log = list(w.log)
    for epoch in ids:
        assert_exactly_once(epoch, 1_000)
    errors = [line for line in log if "Bad address" in line or "ERROR" in line]
    assert not errors, errors[:5]
    assert stats.resumes == 0


PARENT = """
import sys, time
from shardstream.server._process import WorkerProcess
worker = WorkerProcess.start(["--data-root", sys.argv[1], "--dataset", "train=*.npz",
                              "--processes", "1"])
print(worker.pid, flush=True)
time.sleep(600)  # until killed
"""


async def test_a_local_worker_does_not_outlive_the_program_that_started_it(root: Path) -> None:
    """A worker started with `WorkerProcess` (the demo, a local fleet) drains and exits,
    with its decoding processes, when the program that started it is SIGKILLed."""
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT, str(root), stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        pid = int(await parent.stdout.readline())
        decoding = decoding_processes(pid)
        assert alive(pid) and len(decoding) == 1
        parent.kill()
        await parent.wait()
        deadline = time.monotonic() + 60  # only bounds a hang
        while alive(pid) or any(alive(c) for c in decoding):
            assert time.monotonic() < deadline, "the worker outlived the program that started it"
            await asyncio.sleep(0.05)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()

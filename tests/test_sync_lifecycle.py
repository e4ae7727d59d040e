"""The synchronous wrappers through a process's whole life: epochs left suspended and
finalized on any thread (the loader's own included), state asked for while an epoch
starts, interpreter exit with loaders and epochs still open, fork, pickling, and torch's
DataLoader worker processes. Each of these used to hang, deadlock, crash or answer
wrong; here each ends promptly, clearly, and with the right position."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader, SyncLoader

from conftest import RECORDS, worker_processes

OPTS: dict[str, Any] = {"dataset": "train", "batch_size": 16, "rank": 0, "world_size": 1}
BATCHES = -(-RECORDS // 16)
WAIT = 60  # seconds: a bound that only a hang reaches, never a pacing


@pytest.fixture(scope="module")
def address(npz_root: Path) -> Iterator[str]:
    with worker_processes(npz_root, 1) as workers:
        yield workers[0].address


def test_an_epoch_finalized_on_the_loaders_own_thread_does_not_deadlock(address: str) -> None:
    """A suspended epoch that becomes garbage is finalized by whichever thread drops it:
    when that is the loader's event-loop thread (a garbage collection there), its stop
    must not wait for that same thread. (In a process of its own: a deadlocked loader
    could not even be closed.)"""
    r = _run_script(
        address,
        f"""
        import asyncio, sys
        import numpy as np
        from shardstream.client import SyncLoader
        with SyncLoader(sys.argv[1], dataset="train", batch_size=16) as loader:
            held = [loader.epoch(0)]
            next(held[0])

            async def drop():  # the generator's `finally` runs here, on the loop
                held.clear()

            asyncio.run_coroutine_threadsafe(drop(), loader._loop).result({WAIT})
            # The loop still answers: a whole epoch afterwards, exactly once.
            ids = np.concatenate([b["id"] for b in loader.epoch(1)])
            assert sorted(ids.tolist()) == list(range({RECORDS})), "not exactly once"
        print("done", flush=True)
        """,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "done"


def _run_script(address: str, body: str) -> subprocess.CompletedProcess[str]:
    """Run `body` in a new interpreter (and session: a hang, and whatever it forked, is
    killed whole)."""
    args = [sys.executable, "-c", textwrap.dedent(body), address]
    with subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            out, err = proc.communicate(timeout=WAIT + 30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


@pytest.mark.parametrize("closed", [False, True])
def test_exit_with_a_suspended_epoch_in_a_global(address: str, closed: bool) -> None:
    """A script that leaves its loop early and ends, its epoch generator (and, unclosed,
    its loader) still referenced from module globals: the process exits at once and
    cleanly, not hanging on a loop thread that exit has stopped."""
    r = _run_script(
        address,
        f"""
        import sys
        from shardstream.client import SyncLoader
        loader = SyncLoader(sys.argv[1], dataset="train", batch_size=16)
        loader.open()
        epoch = loader.epoch(0)
        for step, batch in enumerate(epoch):
            if step == 3:
                break
        if {closed}:
            loader.close()
        print("done", flush=True)
        """,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "done"
    assert "Task was destroyed" not in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


class _Interleaved(SyncLoader):
    """A SyncLoader whose epoch start returns into an interruption: `state_dict` is asked
    for (as another thread may ask it) or a Ctrl-C arrives, at the moment the loader has
    switched to the new epoch but the caller has not yet heard of it."""

    def __init__(self, address: str, **options: Any) -> None:
        super().__init__(address, **options)
        self.then = ""  # what happens after the next epoch's start
        self.seen: dict[str, Any] | None = None

    def _call(self, coro: Any) -> Any:
        starting = getattr(coro, "__qualname__", "").endswith("epoch.<locals>.start")
        result = super()._call(coro)
        if starting and self.then == "state":
            self.seen = self.state_dict()
        elif starting and self.then == "interrupt":
            self.then = ""
            raise KeyboardInterrupt
        return result


@pytest.mark.parametrize("then", ["state", "interrupt"])
def test_state_while_an_epoch_starts(address: str, then: str) -> None:
    """The position `state_dict` reports and the loader's current epoch change together:
    asked between the two, or after a Ctrl-C that arrived as the next epoch started, it
    is the new epoch's start (nothing of it received), never an error, and restoring it
    yields that whole epoch exactly once."""
    with _Interleaved(address, **OPTS) as loader:
        for step, _ in enumerate(loader.epoch(0)):
            if step == 2:
                break
        loader.then = then
        if then == "state":
            batches = list(loader.epoch(1))
            assert loader.seen is not None
            state = loader.seen
            assert len(batches) == BATCHES
        else:
            with pytest.raises(KeyboardInterrupt):
                loader.epoch(1).__next__()
            state = loader.state_dict()
    with SyncLoader(address, **OPTS) as again:
        again.load_state_dict(state)
        assert again.start_epoch == 1
        ids = np.concatenate([b["id"] for b in again.epoch(1)])
    assert sorted(ids.tolist()) == list(range(RECORDS))


def test_state_from_another_thread_while_epochs_start_back_to_back(address: str) -> None:
    """An asynchronous checkpointer asks for `state_dict` on its own thread while the
    training thread runs epochs back to back. It used to get, about once in 50 epoch
    starts with threads switching often, "state_at() of an epoch that is no longer the
    loader's current": the epoch changed on the loader's thread between the position's
    check and its use. Every state is an answer now, and they never go backwards."""
    errors: list[str] = []
    states: list[tuple[int, int]] = []
    done = threading.Event()
    switch = sys.getswitchinterval()
    with SyncLoader(address, **{**OPTS, "batch_size": 500}) as loader:

        def checkpointer() -> None:
            while not done.is_set():
                try:
                    state = loader.state_dict()
                except Exception as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                else:
                    states.append((state["epoch"], state["batches"]))

        thread = threading.Thread(target=checkpointer)
        sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can
        thread.start()
        try:
            for epoch in range(200):
                assert sum(len(b["id"]) for b in loader.epoch(epoch)) == RECORDS
        finally:
            done.set()
            thread.join()
            sys.setswitchinterval(switch)
    assert errors == []
    assert states == sorted(states)
    assert states[-1] == (200, 0)


def test_a_forked_child_is_refused_clearly_and_the_parent_goes_on(address: str) -> None:
    """A process forked while a SyncLoader is open gets a copy whose thread and
    connections stay in the parent, and grpc.aio does not work in it at all: using the
    copy (a new epoch, or the epoch suspended at the fork) or opening another loader is
    a clear RuntimeError at once that says to spawn (it used to wait forever, or the
    child crashed in grpc's fork handlers), closing it is a no-op, and the parent is
    unaffected. (In a process of its own, as a training
    script is: this one may hold other libraries' threads.)"""
    r = _run_script(
        address,
        f"""
        import os, select, signal, sys
        import numpy as np
        from shardstream.client import SyncLoader

        def child(loader, epoch):
            attempts = (
                lambda: next(loader.epoch(1)),  # a new epoch of the parent's loader
                lambda: next(epoch),  # the parent's epoch, suspended at the fork
                lambda: SyncLoader(sys.argv[1], dataset="train", batch_size=16).open(),
            )
            code = 0
            for attempt in attempts:
                try:
                    attempt()
                    code = code or 1
                except RuntimeError as exc:
                    if "forked child" not in str(exc) or "spawn" not in str(exc):
                        code = code or 2
                except BaseException:
                    code = code or 3
            try:
                loader.close()
            except BaseException:
                code = code or 4
            return code

        codes = []
        with SyncLoader(sys.argv[1], dataset="train", batch_size=16) as loader:
            epoch = loader.epoch(0)
            got = [next(epoch)["id"]]
            for _ in range(6):  # it used to crash about one fork in six
                pid = os.fork()
                if pid == 0:
                    os._exit(child(loader, epoch))
                fd = os.pidfd_open(pid)
                if not select.select([fd], [], [], {WAIT})[0]:
                    os.kill(pid, signal.SIGKILL)
                os.close(fd)
                codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
                got.append(next(epoch)["id"])
            got += [b["id"] for b in epoch]
        ids = sorted(np.concatenate(got).tolist())
        print("children:", codes, "exactly once:", ids == list(range({RECORDS})), flush=True)
        """,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "children: [0, 0, 0, 0, 0, 0] exactly once: True", r.stderr[-3000:]


def test_loaders_refuse_pickling_clearly(address: str) -> None:
    for loader in (SyncLoader(address, **OPTS), Loader(address, **OPTS)):
        with pytest.raises(TypeError, match=r"cannot be pickled.*open one there"):
            pickle.dumps(loader)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_a_pickled_iterable_goes_on_from_the_position(address: str) -> None:
    """ShardstreamIterable crosses to spawned processes (`ddp_spawn`, spawn-started
    DataLoader-free workers) as its addresses, options and position: the copy yields
    exactly the batches the original had not."""
    from shardstream.client.torch import ShardstreamIterable

    data = ShardstreamIterable(address, **OPTS)
    try:
        head = []
        for step, batch in enumerate(data):
            head.append(batch["id"].numpy())
            if step == 4:
                break
        copy = pickle.loads(pickle.dumps(data))
    finally:
        data.close()
    try:
        assert copy.epoch == 0
        tail = [batch["id"].numpy() for batch in copy]
    finally:
        copy.close()
    ids = np.concatenate(head + tail)
    assert sorted(ids.tolist()) == list(range(RECORDS))
    fresh = pickle.loads(pickle.dumps(ShardstreamIterable(address, **OPTS)))
    try:
        assert len(fresh) == BATCHES
    finally:
        fresh.close()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_dataloader_worker_processes_are_refused(address: str) -> None:
    """Any DataLoader worker process, one included, would iterate a copy whose epoch
    and position the trainer never sees (forked with the loader open, it used to hang):
    a clear error in the trainer's process instead, and the trainer's own copy is
    untouched. (In a process of its own: DataLoader workers are forked.)"""
    r = _run_script(
        address,
        f"""
        import sys
        import numpy as np
        from torch.utils.data import DataLoader
        from shardstream.client.torch import ShardstreamIterable

        data = ShardstreamIterable(sys.argv[1], dataset="train", batch_size=16)
        try:
            assert len(data) == {BATCHES}  # opened, as Lightning's len() opens it
            loader = DataLoader(data, batch_size=None, num_workers=1, timeout={WAIT})
            try:
                next(iter(loader))
                print("not refused")
            except RuntimeError as exc:
                print("refused:", "num_workers=0" in str(exc), flush=True)
            del loader
            ids = np.concatenate([b["id"].numpy() for b in data])
            print("exactly once:", sorted(ids.tolist()) == list(range({RECORDS})))
        finally:
            data.close()
        """,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[:2] == ["refused: True", "exactly once: True"], r.stderr[-3000:]


@pytest.mark.parametrize("closed", [False, True])
def test_grpc_channels_are_gone_before_the_interpreter_tears_down(
    address: str, closed: bool
) -> None:
    """grpc stops its process-wide poller thread when the last channel goes; left to the
    interpreter's teardown, that thread wakes when it can no longer run, and a job that
    did everything right can abort at exit ("terminate called without an active
    exception"). A loader still referenced at exit, closed or not, has let go of its
    channels by the time the last exit handler runs."""
    r = _run_script(
        address,
        f"""
        import atexit, gc, sys

        def channels_left():  # registered first: runs after shardstream's own handler
            from grpc._cython import cygrpc
            n = sum(isinstance(o, cygrpc.AioChannel) for o in gc.get_objects())
            print("channels at teardown:", n, flush=True)

        atexit.register(channels_left)
        from shardstream.client import SyncLoader
        loader = SyncLoader(sys.argv[1], dataset="train", batch_size=16)
        loader.open()
        print("records:", sum(len(b["id"]) for b in loader.epoch(0)), flush=True)
        if {closed}:
            loader.close()
        """,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split("\n")[:2] == [f"records: {RECORDS}", "channels at teardown: 0"]


@pytest.mark.parametrize("api", ["Loader", "SyncLoader", "torch"])
def test_a_checkpoint_right_after_load_state_dict_is_the_loaded_position(
    address: str, api: str
) -> None:
    """state_dict() after load_state_dict() used to answer the epoch run before the load
    (a checkpoint taken then resumed a whole other epoch); an epoch still being iterated
    when a state is loaded ends, as when the next epoch starts."""
    opts = {**OPTS, "shuffle": True, "seed": 3}
    with SyncLoader(address, **opts) as ref:
        whole = [b["id"].tolist() for b in ref.epoch(0)]
        it = ref.epoch(0)
        for _ in range(5):
            next(it)
        saved = ref.state_dict()
    rest = sorted(i for b in whole[5:] for i in b)

    if api == "Loader":

        async def run() -> dict[str, Any]:
            async with Loader(address, **opts) as loader:
                async for _ in loader.epoch(0):
                    pass
                loader.load_state_dict(saved)
                return loader.state_dict()

        state = asyncio.run(run())
    elif api == "SyncLoader":
        with SyncLoader(address, **opts) as sync:
            running = sync.epoch(1)
            next(running)
            sync.load_state_dict(saved)
            state = sync.state_dict()
            with pytest.raises(RuntimeError, match="superseded by load_state_dict"):
                next(running)
    else:
        torch_mod = pytest.importorskip("shardstream.client.torch")
        data = torch_mod.ShardstreamIterable(address, **opts)
        try:
            for _ in data:
                pass
            data.load_state_dict(saved)
            state = data.state_dict()
        finally:
            data.close()
    with SyncLoader(address, **opts) as again:
        again.load_state_dict(state)
        got = sorted(i for b in again.epoch(again.start_epoch) for i in b["id"].tolist())
    assert (state["epoch"], got) == (0, rest)


@pytest.mark.parametrize("api", ["SyncLoader", "torch"])
def test_a_loader_dropped_without_close_lets_go_of_its_thread(address: str, api: str) -> None:
    """A loader that becomes garbage while open (a notebook cell run again, a helper
    that forgot close()): its loop closes it and ends its thread. Before, each left two
    threads and its loader's tasks behind ("Task was destroyed but it is pending!"), and
    then still the thread of its loop's executor (the lane is set up there)."""
    r = _run_script(
        address,
        f"""
        import gc, sys, threading, time
        from shardstream.client import SyncLoader
        before = {{t.ident for t in threading.enumerate()}}
        for _ in range(3):
            if {api == "torch"}:
                from shardstream.client.torch import ShardstreamIterable
                data = ShardstreamIterable(sys.argv[1], dataset="train", batch_size=16)
                it = iter(data)
            else:
                data = SyncLoader(sys.argv[1], dataset="train", batch_size=16)
                data.open()
                it = data.epoch(0)
            next(it)
            next(it)
            del it, data
            gc.collect()
        deadline = time.monotonic() + {WAIT}
        def loops():  # grpc's one poller thread (of the process) aside
            return [t.name for t in threading.enumerate()
                    if t.ident not in before and "_poll_wrapper" not in t.name]
        while loops() and time.monotonic() < deadline:
            time.sleep(0.05)
        print("left:", loops(), flush=True)
        """,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "left: []", r.stdout + r.stderr[-3000:]
    assert "Task was destroyed" not in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]


def test_grpc_poller_noise_about_a_closed_loader_is_dropped(
    address: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Loaders opened and closed one after another (a second `fit`, a notebook): grpc's
    one poller of the process handed a closed loader's last completions to its closed
    loop, and the next loader's loop printed "Exception in callback
    PollerCompletionQueue._handle_events ... RuntimeError: Event loop is closed" (2 in
    18 cycles here) though nothing failed. Those are dropped; other errors are not."""
    from shardstream.client._sync import _quiet_grpc_poller

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(60):
            with SyncLoader(address, dataset="train", batch_size=16) as loader:
                assert sum(len(b["id"]) for b in loader.epoch(0)) == RECORDS
    noise = [r for r in caplog.records if "_handle_events" in r.getMessage()]
    assert noise == [], noise[0].getMessage()
    loop = asyncio.new_event_loop()
    try:
        seen: list[dict[str, Any]] = []
        loop.default_exception_handler = seen.append  # type: ignore[method-assign]
        message = (
            "Exception in callback functools.partial(<bound method "
            "PollerCompletionQueue._handle_events of ...>)"
        )
        for exc in (RuntimeError("Event loop is closed"), BlockingIOError(11, "again")):
            _quiet_grpc_poller(loop, {"message": message, "exception": exc})
        other = {"message": message, "exception": RuntimeError("something else")}
        _quiet_grpc_poller(loop, other)
        _quiet_grpc_poller(loop, {"message": "Exception in callback f()", "exception": OSError()})
    finally:
        loop.close()
    assert len(seen) == 2 and seen[0] is other

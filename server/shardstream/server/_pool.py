"""Decoding processes that outlive any one of them.

    pool = DecodingPool(4, initializer=process_init, initargs=(os.getpid(), handle))
    pids = pool.start()                          # spawned and initialized, or OSError
    result = await loop.run_in_executor(pool, fn, *args)
    pool.shutdown()

An `Executor` over `processes` spawn-started processes. Each has a runner
thread in the server: it takes the next job from the queue, sends it down the
process's pipe and waits for the answer (while idle, it checks every second
that the process lives). A process that dies (the OOM killer's SIGKILL, a crash
in a native decoder) fails only the job it was running, with
`BrokenProcessPool`, once it is reaped; its runner then starts a new one before
it takes another job, and the other processes run on. If a new process cannot
be started, the pool has failed: `on_failure` is called (once), queued and
later jobs fail with `BrokenProcessPool`.

Why not `concurrent.futures.ProcessPoolExecutor`: one dead process breaks it
for good (every later job fails), it then joins the others after a SIGTERM that
decoding processes ignore (they leave signals to the server), and its queues
are named semaphores in `/dev/shm`, left there when the server and its
resource tracker are killed together (a container or cgroup kill).

Processes are spawned, never forked (gRPC may be running), each from its own
runner thread, which lives until shutdown: `PR_SET_PDEATHSIG` (see
`_decoding.process_init`) fires when the thread that started a process ends.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Callable
from concurrent.futures import Executor, Future
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from multiprocessing.reduction import ForkingPickler
from typing import Any, ParamSpec, TypeVar

log = logging.getLogger("shardstream.worker")

__all__ = ["DecodingPool"]

_P = ParamSpec("_P")
_T = TypeVar("_T")
_Job = tuple["Future[Any]", Callable[..., Any], tuple[Any, ...], dict[str, Any]]

WATCH_SECONDS = 1.0  # how often an idle runner checks that its process lives
REAP_SECONDS = 10.0  # a SIGKILLed process not gone by then cannot be reaped (the pool fails)


class _RemoteTraceback(Exception):
    """The traceback of an exception raised in a decoding process (as its cause)."""

    def __str__(self) -> str:
        return str(self.args[0])


class _Runner:
    """One decoding process and the thread that feeds it."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.proc: BaseProcess | None = None
        self.conn: Connection | None = None
        self.started: Future[int] = Future()
        self.thread: threading.Thread | None = None
        self.busy_since: float | None = None  # when its running job started (monotonic)
        self.busy_seconds = 0.0  # spent on jobs that have ended


class DecodingPool(Executor):
    """`processes` decoding processes, each replaced when it dies."""

    def __init__(
        self,
        processes: int,
        *,
        initializer: Callable[..., object],
        initargs: tuple[Any, ...] = (),
        on_failure: Callable[[BaseException], object] | None = None,
        start_timeout: float = 120.0,  # spawning imports numpy & co. in every process
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self._context = multiprocessing.get_context("spawn")
        self._initializer = initializer
        self._initargs = initargs
        self._on_failure = on_failure
        self._start_timeout = start_timeout
        self._runners = [_Runner(i) for i in range(processes)]
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()  # submit vs shutdown and failure
        self._spawn_lock = threading.Lock()  # starting and reaping children, one at a time
        self._state = "new"
        self._failure: BaseException | None = None
        self._busy_lock = threading.Lock()  # a runner's busy time vs `busy_seconds`
        self.replaced = 0  # processes that died and were replaced

    def start(self) -> list[int]:
        """Spawn every process and wait until each is initialized; their pids."""
        if self._state != "new":
            raise RuntimeError(f"the decoding pool cannot start: it is {self._state}")
        self._state = "running"
        _live.add(self)
        for r in self._runners:
            r.thread = threading.Thread(
                target=self._run, args=(r,), name=f"shardstream-decoding-{r.number}", daemon=True
            )
            r.thread.start()
        try:
            return [r.started.result(self._start_timeout) for r in self._runners]
        except BaseException as exc:
            self.shutdown(wait=True, cancel_futures=True)
            if isinstance(exc, TimeoutError):
                raise OSError(
                    f"decoding processes did not start within {self._start_timeout:.0f}s"
                ) from None
            raise

    def pids(self) -> list[int]:
        return [r.proc.pid for r in self._runners if r.proc is not None and r.proc.pid]

    @property
    def processes(self) -> int:
        return len(self._runners)

    def busy_seconds(self) -> float:
        """Seconds the processes have spent on jobs, all added (running jobs so far
        included): its rate over `processes` is how busy they are (`_metrics`)."""
        now = time.monotonic()
        with self._busy_lock:
            return sum(
                r.busy_seconds + (now - r.busy_since if r.busy_since is not None else 0.0)
                for r in self._runners
            )

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        with self._lock:
            if self._state != "running":
                raise RuntimeError(f"cannot submit to a decoding pool that is {self._state}")
            if self._failure is not None:
                raise BrokenProcessPool(f"decoding processes cannot be replaced: {self._failure}")
            future: Future[_T] = Future()
            self._jobs.put((future, fn, args, kwargs))
            return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._state == "running":
                if cancel_futures:
                    self._drain_queue(None)
                for _ in self._runners:
                    self._jobs.put(None)
            self._state = "closed"
        if wait:
            for r in self._runners:
                if r.thread is not None and r.thread is not threading.current_thread():
                    r.thread.join()
        _live.discard(self)

    def _drain_queue(self, error: BaseException | None) -> None:
        """Cancel the queued jobs, or fail them with `error`."""
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if item is None:
                self._jobs.put(None)  # a runner's stop: keep it, after the rest
                return
            future = item[0]
            if error is None:
                future.cancel()
            elif future.set_running_or_notify_cancel():
                future.set_exception(error)

    def _fail(self, exc: BaseException) -> None:
        """A process cannot be replaced: no more jobs; tell `on_failure` (once)."""
        with self._lock:
            if self._failure is not None:
                return
            self._failure = exc
            self._drain_queue(BrokenProcessPool(f"decoding processes cannot be replaced: {exc}"))
        log.error("decoding processes cannot be replaced: %s", exc)
        if self._on_failure is not None:
            try:
                self._on_failure(exc)
            except Exception:  # e.g. its event loop is closed: nothing left to tell
                log.exception("decoding pool: on_failure failed")

    # -- the runner threads --------------------------------------------------------------

    def _run(self, r: _Runner) -> None:
        try:
            r.started.set_result(self._spawn(r))
        except BaseException as exc:
            r.started.set_exception(exc)
        while True:
            try:
                item = self._jobs.get(timeout=WATCH_SECONDS)
            except queue.Empty:
                self._watch(r)
                continue
            if item is None:
                break
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            started = time.monotonic()
            with self._busy_lock:
                r.busy_since = started
            try:
                self._run_job(r, future, fn, args, kwargs)
            except BaseException as exc:  # a bug here must not end the thread (nor its process)
                log.exception("decoding pool: unexpected error")
                if not future.done():
                    future.set_exception(exc)
            finally:
                with self._busy_lock:
                    r.busy_seconds += time.monotonic() - started
                    r.busy_since = None
        self._stop(r)

    def _watch(self, r: _Runner) -> None:
        """Between jobs: replace r's process if it died (its pipe is readable: EOF)."""
        try:
            if r.conn is not None and r.conn.poll() and self._state == "running":
                self._replace(r, "while idle")
        except BaseException:
            log.exception("decoding pool: unexpected error")

    def _run_job(
        self, r: _Runner, future: Future[Any], fn: Callable[..., Any], args: Any, kwargs: Any
    ) -> None:
        if self._failure is not None:
            future.set_exception(BrokenProcessPool(f"decoding processes failed: {self._failure}"))
            return
        try:
            data = ForkingPickler.dumps((fn, args, kwargs))
        except Exception as exc:  # arguments that do not pickle: the caller's error
            future.set_exception(exc)
            return
        sent = False
        for _ in range(2):  # a process found dead before the job reached it is replaced
            if (r.conn is None or r.conn.poll()) and not self._replace(r, "while idle"):
                break  # (poll: readable while idle is EOF)
            assert r.conn is not None
            try:
                r.conn.send_bytes(data)
            except OSError:  # it died after the check
                continue
            sent = True
            break
        if not sent or r.conn is None:
            future.set_exception(BrokenProcessPool("a decoding process died and was not replaced"))
            return
        try:
            reply = r.conn.recv_bytes()
        except (EOFError, OSError):
            pid = r.proc.pid if r.proc is not None else None
            how = self._reap(r)  # dead and reaped before anyone reuses what it was writing
            name = getattr(fn, "__name__", "a job")
            future.set_exception(BrokenProcessPool(f"decoding process {pid} died ({how})"))
            self._replace(r, f"({how}) while running {name}", died=pid)
            return
        try:
            ok, value, remote = pickle.loads(reply)
        except Exception as exc:
            future.set_exception(RuntimeError(f"a decoding process's answer did not load: {exc}"))
            return
        if ok:
            future.set_result(value)
        else:
            if remote and value.__cause__ is None:
                value.__cause__ = _RemoteTraceback(remote)
            future.set_exception(value)

    def _spawn(self, r: _Runner) -> int:
        """Start r's process (from r's thread) and wait until it is initialized."""
        parent, child = self._context.Pipe(duplex=True)
        proc = self._context.Process(
            target=_serve,
            args=(child, self._initializer, self._initargs),
            name=f"shardstream-decoding-{r.number}",
        )
        with self._spawn_lock:
            proc.start()
        child.close()  # else its end stays open here, and its death would show no EOF
        r.proc, r.conn = proc, parent
        try:
            if not parent.poll(self._start_timeout):
                raise OSError(f"not initialized within {self._start_timeout:.0f}s")
            pid: int = parent.recv()
        except (EOFError, OSError) as exc:
            how = self._reap(r)
            raise OSError(f"a decoding process did not start ({how}): {exc}") from None
        return pid

    def _replace(self, r: _Runner, why: str, *, died: int | None = None) -> bool:
        """Reap r's process if it is not yet (`died`: the pid of one already reaped), and
        start another; False if the pool failed."""
        if r.proc is not None:
            died = r.proc.pid
            why = f"{why} ({self._reap(r)})"
        if self._failure is not None or self._state != "running":
            return False
        try:
            pid = self._spawn(r)
        except BaseException as exc:
            self._fail(exc)
            return False
        self.replaced += 1
        log.warning("decoding process %s died %s; replaced by %d", died, why, pid)
        return True

    def _reap(self, r: _Runner) -> str:
        """Kill r's process (if it lives) and wait for it: how it ended."""
        proc, conn = r.proc, r.conn
        r.proc = r.conn = None
        if conn is not None:
            conn.close()
        if proc is None:
            return "never started"
        with self._spawn_lock:
            proc.kill()
            if not connection.wait([proc.sentinel], REAP_SECONDS):
                exc = OSError(
                    f"decoding process {proc.pid} did not die {REAP_SECONDS:.0f}s after SIGKILL"
                )
                self._fail(exc)
                return str(exc)
            proc.join()
        return _exit_text(proc.exitcode)

    def _stop(self, r: _Runner) -> None:
        """Shutdown: the process ends when its pipe closes; killed if it does not."""
        proc, conn = r.proc, r.conn
        r.proc = r.conn = None
        if conn is not None:
            conn.close()
        if proc is not None:
            proc.join(REAP_SECONDS)
            if proc.exitcode is None:
                proc.kill()
                proc.join(REAP_SECONDS)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        name = signal.Signals(-code).name
        return f"killed by {name}" + (": out of memory?" if -code == signal.SIGKILL else "")
    return f"exit status {code}"


def _serve(conn: Connection, initializer: Callable[..., object], initargs: tuple[Any, ...]) -> None:
    """A decoding process: initialize, say so (the pid), then run jobs until EOF."""
    initializer(*initargs)
    conn.send(os.getpid())
    while True:
        try:
            data = conn.recv_bytes()
        except EOFError:
            return
        reply: bytes | memoryview
        try:
            fn, args, kwargs = pickle.loads(data)
            reply = ForkingPickler.dumps((True, fn(*args, **kwargs), ""))
        except Exception as exc:
            reply = _error_reply(exc)
        conn.send_bytes(reply)


def _error_reply(exc: Exception) -> bytes | memoryview:
    """An error as the server can load it (else as a RuntimeError saying what it was)."""
    remote = traceback.format_exc()
    try:
        reply = ForkingPickler.dumps((False, exc, remote))
        pickle.loads(reply)
        return reply
    except Exception:
        error = RuntimeError(f"{type(exc).__name__}: {exc}")
        return ForkingPickler.dumps((False, error, remote))


_live: weakref.WeakSet[DecodingPool] = weakref.WeakSet()


@atexit.register
def _kill_at_exit() -> None:
    """An interpreter exiting without a shutdown: kill the processes, or
    multiprocessing's own exit hook would wait for them forever."""
    for pool in list(_live):
        pool.shutdown(wait=False, cancel_futures=True)  # no process is replaced any more
        for r in pool._runners:
            proc = r.proc  # read once: a runner's thread may set it to None meanwhile
            if proc is not None and proc.exitcode is None:
                with contextlib.suppress(OSError, ValueError):  # that thread reaped it
                    proc.kill()

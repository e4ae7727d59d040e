"""Worker processes started locally: for the demo, tests and a local fleet.

    with WorkerProcess.start(["--data-root", d, "--dataset", "train=*.npz"]) as w:
        w.address        # "127.0.0.1:PORT", known once the worker is SERVING

The worker prints one line to stdout once it is SERVING ("serving HOST:PORT");
its log (stderr) is drained by a thread into a bounded tail, which errors
quote when the worker fails to start.
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from types import TracebackType

_SERVING = re.compile(r"^serving (\S+):(\d+)$")
# A worker prints what it listens on; a wildcard is reached through the loopback address.
_WILDCARDS = {"0.0.0.0": "127.0.0.1", "[::]": "[::1]"}


class WorkerStartError(RuntimeError):
    """A worker process exited or timed out before serving."""


class WorkerProcess:
    """A `shardstream worker` child process (port 0 unless given)."""

    def __init__(self, proc: subprocess.Popen[str], args: Sequence[str]) -> None:
        self.proc = proc
        self.args = list(args)
        self.address = ""
        self.log: collections.deque[str] = collections.deque(maxlen=200)
        self._serving = threading.Event()
        self._readers = [
            threading.Thread(target=self._drain_log, name="worker-log", daemon=True),
            threading.Thread(target=self._watch_stdout, name="worker-stdout", daemon=True),
        ]
        for t in self._readers:
            t.start()

    @classmethod
    def start(
        cls,
        args: Sequence[str],
        *,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        """Start a worker with these CLI arguments and wait until it is SERVING."""
        argv = list(args)
        if "--port" not in argv and "SHARDSTREAM_PORT" not in (env or {}):
            argv += ["--port", "0"]
        if "--exit-with-parent" not in argv:  # never outlives this process, even SIGKILLed
            argv += ["--exit-with-parent", str(os.getpid())]
        proc = subprocess.Popen(
            [sys.executable, "-m", "shardstream.server", *argv],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        worker = cls(proc, argv)
        worker.wait_serving(timeout)
        return worker

    def _drain_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line.rstrip("\n"))

    def _watch_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            match = _SERVING.match(line.strip())
            if match and not self._serving.is_set():
                host, port = match.groups()
                self.address = f"{_WILDCARDS.get(host, host)}:{port}"
                self._serving.set()
        self._serving.set()  # exited: wake any waiter

    def wait_serving(self, timeout: float) -> None:
        if not self._serving.wait(timeout) or not self.address:
            code = self.proc.poll()  # None: it was still starting
            if code is None and self._serving.is_set():  # its stdout closed: it is exiting
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = self.proc.wait(5)
            self.close()  # and its pipes: nothing of it outlives the error
            tail = "\n  ".join(list(self.log)[-15:])
            raise WorkerStartError(
                f"worker {' '.join(self.args)} did not start serving within {timeout}s "
                f"(exit code {code}); its log:\n  {tail}"
            )

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (drain) and wait; SIGKILL if it does not exit in time."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        for t in self._readers:
            t.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

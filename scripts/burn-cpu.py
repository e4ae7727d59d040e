#!/usr/bin/env python3
"""Keep every CPU core busy until killed, to run tests on a loaded machine: one
busy-loop process per core (or --processes N), at the default priority.

    .venv/bin/python scripts/burn-cpu.py &
    .venv/bin/pytest tests/test_fleet.py -q -p no:randomly
    kill %1                          # SIGTERM or SIGINT: the busy loops stop with it

The busy loops also stop when this process dies any other way (each checks that its
parent is still there) and after --seconds, if given, so none can be left behind.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
from types import FrameType


def burn(parent: int, until: float) -> None:
    """Spin until the parent is gone or `until` (monotonic) has passed."""
    for signum in (signal.SIGTERM, signal.SIGINT):  # end at once, as a plain process would
        signal.signal(signum, signal.SIG_DFL)
    spins = 0
    while True:
        spins += 1
        if spins % 1_000_000 == 0 and (os.getppid() != parent or time.monotonic() > until):
            return


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="busy-loop processes (default: the number of cores)")  # fmt: skip
    parser.add_argument("--seconds", type=float, default=float("inf"),
                        help="stop after this long (default: when killed)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.processes < 1:
        parser.error(f"--processes must be at least 1, got {args.processes}")
    if not args.seconds > 0:
        parser.error(f"--seconds must be positive, got {args.seconds}")

    def stop(signum: int, _: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    until = time.monotonic() + min(args.seconds, 1e9)
    ctx = multiprocessing.get_context("fork")  # the children keep this command line
    procs = [
        ctx.Process(target=burn, args=(os.getpid(), until), name=f"burn-cpu-{i}", daemon=True)
        for i in range(args.processes)
    ]
    try:
        for p in procs:
            p.start()
        print(f"burn-cpu: {len(procs)} busy loops, pids {[p.pid for p in procs]}; "
              f"pid {os.getpid()} stops them on SIGTERM or SIGINT", file=sys.stderr)  # fmt: skip
        for p in procs:
            p.join()
    finally:
        for p in procs:
            if p.pid is not None and p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join()
    return 0


if __name__ == "__main__":
    sys.exit(main())

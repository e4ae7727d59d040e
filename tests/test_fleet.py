"""The fleet docker/compose.yaml describes, run locally: the same worker command, the
same environment (read from the compose file and the Dockerfile), the same dataset
command; then a rolling restart of every worker during an epoch, exactly once."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

from shardstream.client import Loader
from shardstream.server._process import WorkerProcess

DOCKER = Path(__file__).parent.parent / "docker"


def compose_worker_env(data_root: Path) -> dict[str, str]:
    """The worker environment: the Dockerfile's ENV defaults, then compose's environment."""
    env = dict(re.findall(r"(SHARDSTREAM_[A-Z_]+)=(\S+)", (DOCKER / "Dockerfile").read_text()))
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    env.update({k: str(v) for k, v in compose["services"]["worker"]["environment"].items()})
    env["SHARDSTREAM_DATA_ROOT"] = str(data_root)  # the volume's mount point, here
    env["SHARDSTREAM_HOST"] = "127.0.0.1"  # loopback only in tests
    env["SHARDSTREAM_PORT"] = "0"
    if "SHARDSTREAM_METRICS_PORT" in env:  # a port per container there, one host here
        env["SHARDSTREAM_METRICS_PORT"] = "0"
    return env


def make_compose_dataset(root: Path) -> int:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    command = compose["services"]["dataset"]["command"][0]
    args = re.search(r"shardstream make-dataset /data (.*?);", command)
    assert args, command
    r = subprocess.run(
        [sys.executable, "-m", "shardstream.cli", "make-dataset", str(root),
         *args.group(1).split()],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return int(re.search(r"--records (\d+)", command).group(1))  # type: ignore[union-attr]


async def test_rolling_restart_of_the_compose_fleet_is_exactly_once(tmp_path: Path) -> None:
    records = make_compose_dataset(tmp_path)
    env = compose_worker_env(tmp_path)
    replicas = yaml.safe_load((DOCKER / "compose.yaml").read_text())["services"]["worker"]
    n = replicas["deploy"]["replicas"]
    assert env["SHARDSTREAM_DATASETS"] == "train=*.npz" and n == 3

    def start(port: int = 0) -> WorkerProcess:
        return WorkerProcess.start([], env={**env, "SHARDSTREAM_PORT": str(port)})

    workers = [start() for _ in range(n)]
    # The restarts are tied to the ranks' progress, not to the clock: worker i is sent
    # SIGTERM once both ranks have taken the batch at gate i (and wait there for it), and
    # the ranks stop at a last gate until every new worker serves. So each drain strikes
    # mid-run with reads in flight, and the ranks end on the restarted fleet, however
    # slowly a loaded machine starts processes.
    gates = [asyncio.Barrier(3) for _ in range(n)]  # both ranks and the restarter meet
    signalled = [asyncio.Event() for _ in range(n)]  # worker i was sent SIGTERM
    restarted = asyncio.Event()  # every worker restarted and serving
    codes: list[int] = []
    at_signal: list[tuple[int, ...]] = []  # batches each rank had taken at each SIGTERM
    taken = [0, 0]
    totals = [0, 0]
    try:
        addresses = [w.address for w in workers]

        async def rolling_restart() -> None:
            for i in range(n):
                await gates[i].wait()
                old = workers[i]
                old.signal(signal.SIGTERM)
                at_signal.append(tuple(taken))
                signalled[i].set()
                codes.append(await asyncio.to_thread(old.proc.wait, 60))
                old.close()
                workers[i] = await asyncio.to_thread(start, old.port)
            restarted.set()

        seen: dict[int, list[np.ndarray]] = {0: [], 1: []}

        async def rank(r: int) -> None:
            async with Loader(addresses, dataset="train", batch_size=256, rank=r, world_size=2,
                              seed=5, shuffle=True, backoff_base=0.05) as loader:  # fmt: skip
                totals[r] = total = 2 * loader.batches_per_epoch()
                # Gates spread over both epochs; the last one a few batches before the end.
                at = {total * (i + 1) // (n + 2): i for i in range(n + 1)}
                for epoch in range(2):
                    async for batch in loader.epoch(epoch):
                        seen[epoch].append(batch["id"])
                        taken[r] += 1
                        if (i := at.get(taken[r])) is not None and i < n:
                            await gates[i].wait()
                            await signalled[i].wait()
                        elif i == n:
                            await restarted.wait()
                        await asyncio.sleep(0.04)  # the training step this batch feeds

        async with asyncio.TaskGroup() as tg:  # a failure cancels the others' waits
            for task in (rank(0), rank(1), rolling_restart()):
                tg.create_task(task)
    finally:
        for w in workers:
            w.close()
    assert codes == [0] * n  # every drain exited cleanly
    # Every SIGTERM struck mid-run: both ranks had batches behind them and ahead of them.
    assert len(at_signal) == n and all(0 < t < totals[0] for ts in at_signal for t in ts)
    assert totals[0] == totals[1] and taken == totals
    for epoch in range(2):
        ids = np.concatenate(seen[epoch])
        assert len(ids) == records and np.array_equal(np.sort(ids), np.arange(records))

"""The fleet docker/compose.yaml describes, run locally: the same worker command, the
same environment (read from the compose file and the Dockerfile), the same dataset
command; then a rolling restart of every worker during an epoch, exactly once."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
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
    restarts: list[tuple[float, int]] = []
    try:
        addresses = [w.address for w in workers]

        async def rolling_restart() -> None:
            for i in range(n):
                old = workers[i]
                old.signal(signal.SIGTERM)
                code = await asyncio.to_thread(old.proc.wait, 30)
                old.close()
                workers[i] = await asyncio.to_thread(start, old.port)
                restarts.append((time.monotonic(), code))

        seen: dict[int, list[np.ndarray]] = {0: [], 1: []}

        async def rank(r: int) -> None:
            async with Loader(addresses, dataset="train", batch_size=256, rank=r, world_size=2,
                              seed=5, shuffle=True, backoff_base=0.05) as loader:  # fmt: skip
                for epoch in range(2):
                    async for batch in loader.epoch(epoch):
                        seen[epoch].append(batch["id"])
                        await asyncio.sleep(0.04)  # the training step this batch feeds

        finished: list[float] = []

        async def both_ranks() -> None:
            await asyncio.gather(rank(0), rank(1))
            finished.append(time.monotonic())

        await asyncio.gather(both_ranks(), rolling_restart())
    finally:
        for w in workers:
            w.close()
    assert [code for _, code in restarts] == [0] * n  # every drain exited cleanly
    assert restarts[-1][0] < finished[0]  # every worker restarted while the ranks consumed
    for epoch in range(2):
        ids = np.concatenate(seen[epoch])
        assert len(ids) == records and np.array_equal(np.sort(ids), np.arange(records))

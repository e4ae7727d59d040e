"""The fleet docker/compose.yaml describes, run locally: the same worker command, the
same environment (read from the compose file and the Dockerfile), the same dataset
command; then a rolling restart of every worker during an epoch, exactly once. And the
TLS override of docker/README.md: its health check against a worker it configures."""

from __future__ import annotations

import asyncio
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from test_docker_static import compose_tls_override, image_env, image_health_check

from shardstream.client import Loader
from shardstream.server import make_dataset
from shardstream.server._process import WorkerProcess

from tls_certs import make_certs

DOCKER = Path(__file__).parent.parent / "docker"


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = importlib.import_module("yaml").safe_load(
        (DOCKER / "compose.yaml").read_text()
    )
    return doc


def compose_worker_env(data_root: Path, cache_dir: Path) -> dict[str, str]:
    """The worker environment: the Dockerfile's ENV, then compose's environment; the
    volumes' mount points (data, digest cache) are directories of this host here."""
    env = {k: v for k, v in image_env().items() if k.startswith("SHARDSTREAM_")}
    env.update({k: str(v) for k, v in _compose()["services"]["worker"]["environment"].items()})
    env["SHARDSTREAM_DATA_ROOT"] = str(data_root)
    assert env["SHARDSTREAM_CACHE_DIR"] != "off"
    env["SHARDSTREAM_CACHE_DIR"] = str(cache_dir)
    env["SHARDSTREAM_HOST"] = "127.0.0.1"  # loopback only in tests
    env["SHARDSTREAM_PORT"] = "0"
    if "SHARDSTREAM_METRICS_PORT" in env:  # a port per container there, one host here
        env["SHARDSTREAM_METRICS_PORT"] = "0"
    return env


def make_compose_dataset(root: Path) -> int:
    compose = _compose()
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
    records = make_compose_dataset(tmp_path / "data")
    env = compose_worker_env(tmp_path / "data", tmp_path / "cache")
    n = _compose()["services"]["worker"]["deploy"]["replicas"]
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


def _health_check(shell_command: str, port: int) -> subprocess.CompletedProcess[str]:
    """A container health check, as Docker runs it: `/bin/sh -c`, with the container's
    SHARDSTREAM_PORT and `shardstream` on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "SHARDSTREAM_PORT": str(port)}
    return subprocess.run(
        ["/bin/sh", "-c", shell_command], env=env, capture_output=True, text=True, timeout=30
    )


async def test_the_readme_tls_override_health_check_passes_against_its_worker(
    tmp_path: Path,
) -> None:
    """docker/README.md's compose TLS override, on the compose worker: its health check
    finds the worker SERVING over mTLS; the image's plaintext check, and the override's
    without the probe's client certificate, report it unhealthy."""
    override = compose_tls_override()["services"]["worker"]
    [mount] = override["volumes"]
    target, tls = mount["target"], tmp_path / "tls"  # the bind mount: target -> tls/
    kind, test = override["healthcheck"]["test"]
    assert kind == "CMD-SHELL"
    test = test.replace("$$", "$")  # compose's escape; the container's shell expands
    flags = dict(re.findall(r"(--tls-[a-z-]+) (\S+)", test))

    def here(path: str) -> Path:
        local = tls / Path(path).relative_to(target)
        local.parent.mkdir(parents=True, exist_ok=True)
        return local

    certs = make_certs(tmp_path / "made", server_names=(flags["--tls-server-name"],))
    server_cert, server_key = certs.server_cert, certs.server_key
    env = override["environment"]
    for name, made in (
        ("SHARDSTREAM_TLS_CERT", server_cert),
        ("SHARDSTREAM_TLS_KEY", server_key),
        ("SHARDSTREAM_TLS_CLIENT_CA", certs.ca_cert),
    ):
        shutil.copy(made, here(env[name]))
    shutil.copy(certs.ca_cert, here(flags["--tls-ca"]))
    shutil.copy(certs.client_cert, here(flags["--tls-cert"]))
    shutil.copy(certs.client_key, here(flags["--tls-key"]))

    make_dataset(tmp_path / "data", shards=2, records=100, shape=(4, 4, 3))
    worker_env = compose_worker_env(tmp_path / "data", tmp_path / "cache")
    worker_env.update({k: str(here(v)) for k, v in env.items()})
    worker_env["SHARDSTREAM_PROCESSES"] = "0"  # decoding in threads: only health matters
    with await asyncio.to_thread(WorkerProcess.start, [], env=worker_env) as worker:
        probe = test.replace(target, str(tls))
        passed = await asyncio.to_thread(_health_check, probe, worker.port)
        assert passed.returncode == 0 and "SERVING" in passed.stdout, passed

        shell, flag, plain = image_health_check()
        assert (shell, flag) == ("/bin/sh", "-c")
        failed = await asyncio.to_thread(_health_check, plain, worker.port)
        assert failed.returncode == 1 and "UNAVAILABLE" in failed.stderr, failed  # handshake

        client = f"--tls-cert {flags['--tls-cert']} --tls-key {flags['--tls-key']}"
        without = probe.replace(client.replace(target, str(tls)), "")
        assert without != probe, "the probe's client certificate flags, together"
        failed = await asyncio.to_thread(_health_check, without, worker.port)
        assert failed.returncode == 1 and "UNAVAILABLE" in failed.stderr, failed

        # The override's ranks: docker/train.py with their environment reads the epochs
        # over mTLS.
        ranks = compose_tls_override()["services"]
        assert ranks["trainer-0"] == ranks["trainer-1"], "the same TLS for both ranks"
        [rank_mount] = ranks["trainer-0"]["volumes"]
        assert rank_mount["target"] == target
        rank_env = {k: str(here(v)) if v.startswith(target) else v
                    for k, v in ranks["trainer-0"]["environment"].items()}  # fmt: skip
        shutil.copy(certs.client_cert, rank_env["SHARDSTREAM_TLS_CLIENT_CERT"])
        shutil.copy(certs.client_key, rank_env["SHARDSTREAM_TLS_CLIENT_KEY"])
        trained = await asyncio.to_thread(_train, worker.address, rank_env)
        assert trained.returncode == 0, trained.stderr
        assert trained.stdout.count("2 batches, 100 records") == 2, trained.stdout


def _train(address: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """docker/train.py as a compose rank runs it (2 epochs of batches of 64; one rank)."""
    run_env = {**os.environ, **env, "SHARDSTREAM_WORKERS": address, "BATCH_SIZE": "64"}
    return subprocess.run(
        [sys.executable, str(DOCKER / "train.py")],
        env=run_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip

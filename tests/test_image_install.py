"""The worker image's install, without Docker: docker/install-worker.sh, run the way
docker/Dockerfile runs it (wheels of this checkout with the image's extras, then only
those wheels, no index) into a fresh virtualenv; that virtualenv's `shardstream-worker`
then serves what the image promises: --metrics-port, WebDataset tar and Parquet shards,
an fsspec (file://) data root; and, started with the image's environment and a home it
cannot write to (the image's user has none), keeps its digest cache where the image
says and reuses it. pip reaches the package index here (and keeps its cache: the image
sets PIP_NO_CACHE_DIR=1, this test does not)."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from test_docker_static import image_env

from shardstream.client import Loader
from shardstream.server import make_dataset
from shardstream.server._process import WorkerProcess

from conftest import collect_epoch, ids_of

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "docker" / "install-worker.sh"
SIZE = 16  # wds images, decoded at this size
RECORDS = 60

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(cmd: list[str], env: dict[str, str], timeout: float = 600) -> str:
    result = subprocess.run(
        cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{' '.join(cmd)}:\n{result.stdout[-4000:]}{result.stderr}"
    return result.stdout


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh virtualenv that install-worker.sh filled as the image's two stages do,
    shared by this module's tests (removed afterwards: with the wheels, about half a
    gigabyte)."""
    tmp_path = tmp_path_factory.mktemp("image")
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    _run([sys.executable, "-m", "venv", str(venv)], _env(venv))
    _run(["sh", str(SCRIPT), "wheels", str(ROOT), str(tmp_path / "wheels")], _env(venv))
    installed = _run(["sh", str(SCRIPT), "install", str(tmp_path / "wheels")], _env(venv))
    assert "shardstream worker installed" in installed, installed
    # The venv runs its own installed copy, not this checkout.
    where = _run([python, "-c", "import shardstream.server as s; print(s.__file__)"], _env(venv))
    assert where.startswith(str(venv)), where
    yield venv
    for built in (venv, tmp_path / "wheels"):
        shutil.rmtree(built)


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "PYTHON": str(venv / "bin" / "python"), "SHARDSTREAM_WDS_SIZE": str(SIZE)}


def _start_worker(venv: Path, args: list[str], env: dict[str, str] | None = None) -> WorkerProcess:
    """The venv's `shardstream-worker` (the image's ENTRYPOINT), once it is SERVING."""
    proc = subprocess.Popen(
        [str(venv / "bin" / "shardstream-worker"), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(venv) if env is None else env,
    )
    worker = WorkerProcess(proc, args)
    try:
        worker.wait_serving(120)
    except BaseException:
        worker.close()
        raise
    return worker


async def test_the_image_install_serves_every_promised_feature(
    image_venv: Path, tmp_path: Path
) -> None:
    venv = image_venv
    data = tmp_path / "data"
    make_dataset(data, shards=3, records=RECORDS, shape=(SIZE, SIZE, 3), format="wds")
    make_dataset(data, shards=2, records=RECORDS, shape=(SIZE, SIZE, 3), format="parquet")
    args = ["--data-root", f"file://{data}", "--dataset", "wds=*.tar",
            "--dataset", "pq=*.parquet", "--processes", "1", "--metrics-port", "0",
            "--host", "127.0.0.1", "--port", "0"]  # fmt: skip
    with await asyncio.to_thread(_start_worker, venv, args) as worker:
        # The image's HEALTHCHECK command, from the venv.
        health = [str(venv / "bin" / "shardstream"), "health", worker.address, "--timeout", "5"]
        assert "SERVING" in await asyncio.to_thread(_run, health, _env(venv))

        deadline = time.monotonic() + 30
        while not (found := [m for line in list(worker.log) for m in _metrics_port(line)]):
            assert time.monotonic() < deadline, "no metrics line in the log:\n" + "\n".join(
                worker.log
            )
            await asyncio.sleep(0.05)
        metrics_port = found[0]

        for dataset in ("wds", "pq"):
            async with Loader([worker.address], dataset=dataset, batch_size=8) as loader:
                batches = await collect_epoch(loader, 0)
            assert np.array_equal(np.sort(ids_of(batches)), np.arange(RECORDS)), dataset
            first = batches[0]
            assert first["image"].shape == (8, SIZE, SIZE, 3) and first["image"].dtype == np.uint8
            assert np.array_equal(first["label"], first["id"] % 10), dataset

        text = await asyncio.to_thread(_scrape, metrics_port)
        for dataset in ("wds", "pq"):
            sent = rf'^shardstream_records_sent_total{{dataset="{dataset}"}} (\S+)$'
            assert [float(v) for v in re.findall(sent, text, re.M)] == [RECORDS], text
        assert re.search(r"^shardstream_decoding_processes 1\.0$", text, re.M), text
        assert re.search(r"^shardstream_decoding_utilization [0-9.e-]+$", text, re.M), text


def _metrics_port(line: str) -> list[int]:
    match = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", line)
    return [int(match.group(1))] if match else []


def _indexed(log: list[str]) -> str:
    """The worker's "dataset ...: indexed N/N shards, K digests from the cache" line,
    and any digest cache warning before it."""
    lines = [line for line in log if "indexed" in line or "digest cache" in line]
    assert lines, "\n".join(log)
    return "\n".join(lines)


async def test_the_image_worker_reuses_its_digest_cache(image_venv: Path, tmp_path: Path) -> None:
    """Started as the image starts it (its ENV, a home that cannot be written: the
    image's user has /nonexistent), the worker keeps its digests in SHARDSTREAM_CACHE_DIR
    and a second start reads no shard; without that variable it has nowhere to keep them."""
    shards = 4
    data = tmp_path / "data"
    make_dataset(data, shards=shards, records=RECORDS, shape=(SIZE, SIZE, 3))
    image = image_env()
    assert image["SHARDSTREAM_CACHE_DIR"] not in ("", "off")
    cache = tmp_path / "cache"  # the image's directory (or the volume mounted there)
    cache.mkdir()
    blocked = tmp_path / "a-file"  # a home below a file: not writable, not even by root
    blocked.write_text("")
    env = {
        "PATH": f"{image_venv / 'bin'}{os.pathsep}/usr/bin:/bin",
        "HOME": str(blocked / "home"),
        **image,
        "SHARDSTREAM_CACHE_DIR": str(cache),
        "SHARDSTREAM_DATA_ROOT": str(data),
        "SHARDSTREAM_DATASETS": "train=*.npz",
        "SHARDSTREAM_HOST": "127.0.0.1",  # loopback only in tests
        "SHARDSTREAM_PORT": "0",
    }

    def run(env: dict[str, str]) -> str:
        worker = _start_worker(image_venv, [], env)
        try:
            assert worker.terminate(30) == 0  # a drain, as `docker restart` asks
        finally:
            worker.close()
        return _indexed(list(worker.log))

    first = await asyncio.to_thread(run, env)
    assert f"indexed {shards}/{shards} shards, 0 digests from the cache" in first, first
    assert "cannot be used" not in first, first
    assert (cache / "digests.sqlite3").is_file()
    second = await asyncio.to_thread(run, env)
    assert f"indexed {shards}/{shards} shards, {shards} digests from the cache" in second, second

    # The same start without the image's SHARDSTREAM_CACHE_DIR: the home is all it has.
    del env["SHARDSTREAM_CACHE_DIR"]
    homeless = await asyncio.to_thread(run, env)
    assert "digest cache" in homeless and "cannot be used" in homeless, homeless
    assert "0 digests from the cache" in homeless, homeless

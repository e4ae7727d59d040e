"""Datasets with transforms stay servable: a slow chain over small records still sends
chunks well within a client's `idle_timeout`, and a record the chain fails on at the
start of the first shard does not keep the worker (and every dataset on it) from
starting."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.client.errors import DataLossError
from shardstream.server._process import WorkerProcess

T = "shardstream.server.transforms"
SLOW_RECORDS = 5000
SLOW_TRANSFORM = """\
import time


def work(record, rng, ms=1.0):
    until = time.perf_counter() + ms / 1000
    while time.perf_counter() < until:
        pass
    return record
"""


async def read_ids(address: str, dataset: str, **options: object) -> np.ndarray:
    async with Loader([address], dataset=dataset, batch_size=64, **options) as loader:  # type: ignore[arg-type]
        ids = [batch["id"] async for batch in loader.epoch(0)]
    return np.sort(np.concatenate(ids)) if ids else np.array([], np.int64)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("processes", ["1", "0"])
async def test_a_slow_transform_over_small_records_delivers_the_epoch(
    tmp_path: Path, processes: str
) -> None:
    """1 ms a record over 5000 records of 40 bytes: chunks sized by bytes alone (4 MiB)
    held all 5000, 5 s of work, longer than the client's idle_timeout (3 s here, 30 s by
    default): every read was given up and resumed before its first chunk, and nothing was
    ever delivered. Chunks of datasets with transforms are now also sized by the time a
    record took through them at start-up."""
    data, mods = tmp_path / "data", tmp_path / "mods"
    data.mkdir()
    mods.mkdir()
    n = SLOW_RECORDS
    np.savez(data / "shard-00000.npz", id=np.arange(n), x=np.zeros((n, 8), np.float32))
    (mods / "slowtx.py").write_text(SLOW_TRANSFORM)
    config = tmp_path / "slow.toml"
    config.write_text(
        f'data_root = "{data}"\n[datasets.t]\nshards = "*.npz"\n'
        'transforms = [{fn = "slowtx:work", ms = 1.0}]\n'
    )
    argv = ["--config", str(config), "--cache-dir", "off", "--processes", processes]
    with WorkerProcess.start(argv, env={"PYTHONPATH": str(mods)}) as worker:
        # default chunk_bytes and the rest; a short idle_timeout, and a retry_deadline that
        # makes a worker that never sends a chunk fail quickly
        ids = await read_ids(worker.address, "t", idle_timeout=3.0, retry_deadline=12.0)
    np.testing.assert_array_equal(ids, np.arange(n))


def jpeg() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(out, "JPEG")
    return out.getvalue()


def write_shards(root: Path, bad: set[tuple[int, int]], shards: int = 2, records: int = 10) -> None:
    good = jpeg()
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(records):
                image = b"\xff\xd8 not a jpeg" if (s, i) in bad else good
                for ext, body in (
                    ("jpg", image),
                    ("cls", b"1"),
                    ("id", str(s * records + i).encode()),
                ):
                    info = tarfile.TarInfo(f"{s}{i:05d}.{ext}")
                    info.size = len(body)
                    tar.addfile(info, io.BytesIO(body))


def write_config(root: Path, declared: bool = True) -> Path:
    schema = (
        "[datasets.aug.schema]\n"
        'image = {dtype = "uint8", shape = [16, 16, 3]}\n'
        'label = {dtype = "int64"}\n'
        'id = {dtype = "int64"}\n'
        if declared
        else ""
    )
    config = root / "bad0.toml"
    config.write_text(
        f'data_root = "{root / "data"}"\n'
        '[datasets.plain]\nshards = "*.tar"\nformat = "wds"\n'
        '[datasets.aug]\nshards = "*.tar"\nformat = "wds"\n'
        f'transforms = [{{fn = "{T}:decode_image"}}, {{fn = "{T}:center_crop", size = 16}}]\n'
        + schema
    )
    return config


@pytest.mark.timeout(90)
@pytest.mark.parametrize("declared", [True, False])
async def test_a_bad_record_0_is_data_loss_not_a_worker_that_will_not_start(
    tmp_path: Path, declared: bool
) -> None:
    """Record 0 of the first shard is not a JPEG. The transforms' output schema was found
    on that record only, so the worker refused to start, with every dataset on it (one
    without transforms too). It is now found on the next record that decodes; the bad one
    is that record's DataLossError at read time, which on_error="skip" skips."""
    (tmp_path / "data").mkdir()
    write_shards(tmp_path / "data", bad={(0, 0)})
    config = write_config(tmp_path, declared)
    argv = ["--config", str(config), "--cache-dir", "off", "--processes", "1"]
    with WorkerProcess.start(argv) as worker:
        for dataset in ("plain", "aug"):
            ids = await read_ids(worker.address, dataset, on_error="skip", retry_deadline=20.0)
            np.testing.assert_array_equal(ids, np.arange(1, 20))
            with pytest.raises(DataLossError):
                await read_ids(worker.address, dataset, retry_deadline=20.0)


@pytest.mark.timeout(90)
def test_transforms_failing_on_every_record_tried_are_one_error_naming_them(
    tmp_path: Path,
) -> None:
    """Where no record tried decodes (the first 8 of the first shard, record 0 of the
    next shards), start-up still fails, saying what it tried."""
    (tmp_path / "data").mkdir()
    write_shards(tmp_path / "data", bad={(s, i) for s in range(2) for i in range(10)})
    config = write_config(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "shardstream.server", "--config", str(config), "--port", "0",
         "--cache-dir", "off", "--processes", "0"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert done.returncode != 0
    said = [line for line in done.stderr.splitlines() if "every record tried" in line]
    assert said, done.stderr[-2000:]
    assert "records 0-7 of shard 'shard-00000.tar'" in said[0]
    assert "record 0 of the next 1 shard(s)" in said[0]
    # each reason once, with the first record it came from (at most 3, then a count)
    assert "record 0 of shard 'shard-00000.tar': " in said[0]
    assert said[0].count("of shard 'shard-00000.tar': ") <= 3

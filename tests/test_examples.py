"""The training examples, run as users run them: real collectives over real ranks.

Every step all-reduces gradients, so a rank with fewer batches than the others
would hang the job: finishing at all shows equal steps. The record count and
id sum, all-reduced, show exactly-once delivery."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from shardstream.server import make_dataset

from conftest import worker_processes

EXAMPLES = Path(__file__).parent.parent / "examples"
RECORDS = 1_001  # not divisible by 2 ranks: the remainder policy matters


def json_objects(text: str) -> list[dict[str, Any]]:
    """Every JSON object printed in `text`: ranks of one job share a stdout, so two lines
    can run together when two processes write at once."""
    decoder, found, i = json.JSONDecoder(), [], text.find("{")
    while i >= 0:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict):
            found.append(obj)
        i = text.find("{", end)
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check(lines: list[dict], ranks: int, epochs: int) -> None:
    assert sorted((x["rank"], x["epoch"]) for x in lines) == [
        (r, e) for r in range(ranks) for e in range(epochs)
    ]
    per_rank = RECORDS // ranks  # remainder="drop"
    for e in range(epochs):
        epoch = [x for x in lines if x["epoch"] == e]
        assert len({x["steps"] for x in epoch}) == 1  # equal steps
        assert {x["records"] for x in epoch} == {per_rank * ranks}
        assert epoch[0]["steps"] == -(-per_rank // 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("examples")
    make_dataset(root, shards=6, records=RECORDS, shape=(8, 8, 3))
    return root


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_ddp_example_with_torchrun(data: Path) -> None:
    with worker_processes(data, 2) as workers, tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
             str(EXAMPLES / "train_torch_ddp.py"), "--workers",
             ",".join(w.address for w in workers), "--epochs", "2"],
            capture_output=True, text=True, timeout=300,
            env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": tmp},  # torchrun's files
        )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lines = json_objects(r.stdout)
    check(lines, ranks=2, epochs=2)


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
async def test_to_torch_and_iterable(npz_root: Path) -> None:
    import asyncio

    import numpy as np
    import torch

    from shardstream.client.torch import ShardstreamIterable, to_torch

    from conftest import RECORDS as N

    view = np.frombuffer(b"\x01\x02\x03\x04", dtype=np.uint8)  # read-only, like a message view
    copied = to_torch({"x": view})["x"]
    copied[0] = 9  # a copy: writable
    assert view[0] == 1
    shared = to_torch({"x": view}, writable=False)["x"]
    assert shared.data_ptr() == view.ctypes.data  # zero-copy
    own = np.arange(4)
    assert to_torch({"x": own})["x"].data_ptr() == own.ctypes.data

    with worker_processes(npz_root, 1) as (worker,):

        def run() -> tuple[int, int]:
            data = ShardstreamIterable([worker.address], dataset="train", batch_size=100)
            try:
                data.set_epoch(1)
                loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=0)
                batches = list(loader)
            finally:
                data.close()
            stats = data.statistics()  # its loader's figures, also once closed
            assert (stats.batches, stats.records) == (len(batches), N // 100 * 100)
            return len(batches), int(sum(int(b["id"].sum()) for b in batches))

        n, id_sum = await asyncio.to_thread(run)
    assert n == N // 100 and id_sum == N * (N - 1) // 2


def _cuda() -> bool:
    if importlib.util.find_spec("torch") is None:
        return False
    import torch

    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda(), reason="needs torch with a CUDA device")
async def test_pinned_batches_reach_the_gpu_intact(npz_root: Path) -> None:
    """With `pin_memory=True` every tensor is in page-locked memory, so the copy to the
    GPU can be asynchronous; what arrives on the device equals the batch."""
    import asyncio

    import torch

    from shardstream.client.torch import ShardstreamIterable

    from conftest import RECORDS as N

    with worker_processes(npz_root, 1) as (worker,):

        def run() -> tuple[int, int, bool]:
            data = ShardstreamIterable([worker.address], dataset="train", batch_size=100,
                                       pin_memory=True)  # fmt: skip
            pinned, ids, same = 0, 0, True
            stream = torch.cuda.Stream()
            try:
                for batch in data:
                    pinned += all(t.is_pinned() for t in batch.values())
                    with torch.cuda.stream(stream):
                        on_gpu = {k: t.to("cuda", non_blocking=True) for k, t in batch.items()}
                    stream.synchronize()
                    same &= all(torch.equal(on_gpu[k].cpu(), t) for k, t in batch.items())
                    ids += int(on_gpu["id"].sum().item())
            finally:
                data.close()
            return pinned, ids, same

        pinned, id_sum, same = await asyncio.to_thread(run)
    assert pinned == N // 100 and same and id_sum == N * (N - 1) // 2

"""What the lane tests share: a loader's epoch as a list, byte-identical epochs, the
bytes that came through a loader's lanes."""

from __future__ import annotations

from typing import Any

import numpy as np

from shardstream.client import Loader, SyncLoader

OPTIONS: dict[str, Any] = {"dataset": "train", "batch_size": 64, "read_bytes": 4096}


async def epoch_batches(loader: Loader, epoch: int) -> list[dict[str, np.ndarray]]:
    return [b async for b in loader.epoch(epoch)]


def assert_same(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b) > 1
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            assert x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]), k


def lane_bytes(loader: Loader | SyncLoader) -> int:
    return sum(loader.statistics().lane_bytes_by_worker.values())


def killable_client(options: str = "") -> str:
    """A loader's script (argv[1]: the worker) that reads one batch through its lane,
    prints "reading", then takes a batch per line of stdin: held mid-epoch until killed.
    `options`: more SyncLoader keyword arguments, e.g. "same_host_lane=False"."""
    return f"""
import sys
from shardstream.client import SyncLoader
with SyncLoader([sys.argv[1]], dataset="train", batch_size=8, read_bytes=4096, {options}) as loader:
    it = loader.epoch(0)
    next(it)
    assert sum(loader.statistics().lane_bytes_by_worker.values()) > 0
    print("reading", flush=True)
    for _ in it:
        sys.stdin.readline()  # one batch per line: held mid-epoch until killed
"""

"""What the JAX and Horovod example tests share: the dataset, the example's options,
its per-step traces, and what a plain SyncLoader gives each rank with those options."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from shardstream.client import SyncLoader
from shardstream.server import make_dataset
from shardstream.server._process import WorkerProcess

from conftest import worker_processes

RECORDS = 1_001  # not divisible by 2 ranks: one record is left out per epoch
BATCH = 32
EPOCHS = 2
STEPS = -(-(RECORDS // 2) // BATCH)  # 16, the last batch 20 records
# The examples' own options, which the reference loader below must share.
PLAN = {"batch_size": BATCH, "seed": 1, "shuffle": True}

Trace = list[tuple[int, int, list[int]]]  # (epoch, step, ids) per step


@contextlib.contextmanager
def example_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    """Two worker processes over the examples' dataset (for a module-scoped fixture)."""
    root = tmp_path_factory.mktemp("example-data")
    make_dataset(root, shards=6, records=RECORDS, shape=(8, 8, 3))
    with worker_processes(root, 2) as procs:
        yield procs


def read_trace(folder: Path, rank: int) -> Trace:
    lines = (folder / f"rank-{rank:05d}.jsonl").read_text().splitlines()
    return [(s["epoch"], s["step"], s["ids"]) for s in map(json.loads, lines)]


def reference(workers: list[WorkerProcess], rank: int) -> Trace:
    """What one rank gets from a plain SyncLoader with the example's options."""
    out = []
    with SyncLoader([w.address for w in workers], dataset="train", rank=rank, world_size=2,
                    **PLAN) as loader:  # fmt: skip
        for epoch in range(EPOCHS):
            for step, batch in enumerate(loader.epoch(epoch), 1):
                out.append((epoch, step, batch["id"].tolist()))
    return out

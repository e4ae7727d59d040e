"""Record-level shuffle (`shuffle_reads`), audited: an epoch of 2 ranks over 2 real worker
processes, one killed with SIGKILL mid-epoch, delivers every record exactly once by the
delivery ledger (`shardstream audit`), and the ledger says what the batches held; the
same epoch through `SyncLoader` and the torch wrapper gives byte-identical batches."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader, SyncLoader
from shardstream.client._ledger import audit

from conftest import RECORDS, SHARDS, worker_processes

EPOCH = 1
WORLD = 2
OPTS: dict[str, Any] = {
    "dataset": "train", "batch_size": 32, "seed": 11, "shuffle": True, "shuffle_reads": 4,
    "read_bytes": 1024, "chunk_bytes": 512, "reads_ahead": 8, "max_inflight_reads": 4,
    "backoff_base": 0.05, "idle_timeout": 7.0, "retry_deadline": 30.0,
}  # fmt: skip
Batches = list[dict[str, np.ndarray]]


def assert_identical(a: Batches, b: Batches) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        assert sorted(x) == sorted(y), i
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, (i, k)
            assert x[k].tobytes() == y[k].tobytes(), (i, k)


def ledger_ids(ledger: Path, rank: int) -> list[list[int]]:
    """The record ids (global: shard by shard) each batch held, by rank `rank`'s ledger."""
    path = ledger / f"epoch-{EPOCH:05d}" / f"seg0-w{WORLD}-r{rank:05d}.jsonl"
    header, *lines = (json.loads(t) for t in path.read_text().splitlines())
    base = np.cumsum([0, *header["shard_records"]]).tolist()
    batches = [line for line in lines if line["kind"] == "batch"]
    assert [b["index"] for b in batches] == list(range(len(batches)))
    return [
        [base[s] + x for s, start, n in b["ranges"] for x in range(start, start + n)]
        for b in batches
    ]


def audited(ledger: Path) -> int:
    """The resumes of the ledger's one epoch, which must hold every record exactly once."""
    (epoch,) = list(audit(ledger))
    assert epoch.epoch == EPOCH
    assert epoch.ok, (epoch.missing[:5], epoch.duplicated[:5])
    assert epoch.expected == epoch.received == RECORDS
    return epoch.resumes


async def test_an_epoch_through_a_kill_9_is_exactly_once_and_the_same_in_every_wrapper(
    npz_root: Path, tmp_path: Path
) -> None:
    torch = pytest.importorskip("torch")
    from shardstream.cli import main as cli
    from shardstream.client.torch import ShardstreamIterable

    ledger = tmp_path / "ledger"
    got: dict[int, Batches] = {}
    with worker_processes(npz_root, 2) as workers:
        addresses = [w.address for w in workers]
        victim = workers[1]
        killed = False

        async def rank(r: int) -> None:
            nonlocal killed
            batches: Batches = []
            async with Loader(addresses, rank=r, world_size=WORLD, ledger_dir=str(ledger),
                              **OPTS) as loader:  # fmt: skip
                plan = loader.plan(EPOCH)  # record-level: groups of 4 reads of 16 records
                assert plan.read_records == 16 and all(len(w.reads) <= 4 for w in plan.windows)
                async for batch in loader.epoch(EPOCH):
                    batches.append(batch)
                    if not killed and loader.statistics().reads_in_flight.get(victim.address):
                        victim.signal(signal.SIGKILL)
                        killed = True
            got[r] = batches

        await asyncio.gather(*(rank(r) for r in range(WORLD)))
        assert killed, "no read was in flight on the victim"
        assert victim.proc.wait(10) == -signal.SIGKILL
        live = [w.address for w in workers if w is not victim]

        def sync_epoch(r: int) -> Batches:
            with SyncLoader(live, rank=r, world_size=WORLD, ledger_dir=str(tmp_path / "sync"),
                            **OPTS) as sync:  # fmt: skip
                return list(sync.epoch(EPOCH))

        def torch_epoch(r: int) -> Batches:
            data = ShardstreamIterable(live, rank=r, world_size=WORLD,
                                       ledger_dir=str(tmp_path / "torch"), **OPTS)  # fmt: skip
            try:
                data.set_epoch(EPOCH)
                loader = torch.utils.data.DataLoader(data, batch_size=None, num_workers=0)
                return [{k: t.numpy() for k, t in b.items()} for b in loader]
            finally:
                data.close()

        through_sync = [await asyncio.to_thread(sync_epoch, r) for r in range(WORLD)]
        through_torch = [await asyncio.to_thread(torch_epoch, r) for r in range(WORLD)]

    # Every record exactly once, by the ledger; the CLI agrees.
    assert audited(ledger) >= 1  # the kill cut at least one read, resumed elsewhere
    assert cli(["audit", str(ledger)]) == 0
    assert any('"kind":"resume"' in p.read_text() for p in ledger.rglob("*.jsonl"))
    # The ledger holds what the batches held, batch by batch (not only what was planned).
    for r in range(WORLD):
        assert ledger_ids(ledger, r) == [b["id"].tolist() for b in got[r]]
    ids = np.concatenate([b["id"] for r in range(WORLD) for b in got[r]])
    assert sorted(ids.tolist()) == list(range(RECORDS))
    # Record-level: neighbours in a batch seldom come from one shard.
    shard = np.concatenate([b["id"] for b in got[0]]) // (RECORDS // SHARDS)
    assert np.mean(shard[1:] == shard[:-1]) < 0.5
    # SyncLoader and the torch wrapper, over the surviving worker: the same bytes.
    for r in range(WORLD):
        assert_identical(through_sync[r], got[r])
        assert_identical(through_torch[r], got[r])
    assert audited(tmp_path / "sync") == 0 and audited(tmp_path / "torch") == 0

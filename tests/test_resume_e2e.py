"""Resume with real processes and workers: a rank killed with SIGKILL and restarted from
its last saved state; elastic world-size changes; refused states."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.client.errors import ConfigError, StateMismatchError

from conftest import RECORDS, collect_epoch, ids_of, running_workers, worker_processes

CONSUMER = Path(__file__).parent / "rank_consumer.py"


def consume(addresses: str, *args: str, kill_after: int | None = None) -> list[dict]:
    """Run a rank process; with `kill_after`, SIGKILL it once that many lines arrived."""
    proc = subprocess.Popen(
        [sys.executable, str(CONSUMER), addresses, *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    lines: list[dict] = []
    try:
        assert proc.stdout is not None
        for text in proc.stdout:
            lines.append(json.loads(text))
            if kill_after is not None and len(lines) == kill_after:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    if kill_after is None:
        assert proc.returncode == 0
    return lines


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_rank_killed_and_restarted_from_its_state_continues_exactly(
    npz_root: Path, tmp_path: Path, seed: int
) -> None:
    with worker_processes(npz_root, 2) as workers:
        addresses = ",".join(w.address for w in workers)
        args = ["--rank", "1", "--world", "2", "--epochs", "2", "--seed", str(seed)]
        reference = consume(addresses, *args)
        k = random.Random(seed).randrange(1, len(reference) - 1)
        first = consume(addresses, *args, kill_after=k)
        state_file = tmp_path / "state.json"
        state_file.write_text(json.dumps(first[-1]["state"]))
        rest = consume(addresses, *args, "--state", str(state_file))
    got = [(line["epoch"], line["ids"]) for line in first + rest]
    assert got == [(line["epoch"], line["ids"]) for line in reference]
    assert len(reference) == 2 * -(-(RECORDS // 2) // 16)


@pytest.mark.parametrize(("old", "new"), [(4, 3), (2, 4)])
async def test_elastic_resume_re_splits_the_rest_exactly_once(
    npz_root: Path, old: int, new: int
) -> None:
    opts = {"dataset": "train", "batch_size": 20, "seed": 4, "shuffle": True, "shuffle_window": 50}
    async with running_workers(npz_root, 2) as workers:
        addresses = [w.address for w in workers]
        seen: list[np.ndarray] = []
        states = []
        k = 7
        for r in range(old):
            async with Loader(addresses, rank=r, world_size=old, **opts) as loader:
                epoch = loader.epoch(0)
                for _ in range(k):
                    seen.append((await anext(epoch))["id"])
                states.append(loader.state_dict())
                await epoch.aclose()
        assert all(s["batches"] == k and s["epoch"] == 0 for s in states)
        steps = set()
        next_epoch = []
        for r in range(new):
            async with Loader(addresses, rank=r, world_size=new, state=states[0], **opts) as loader:
                assert loader.start_epoch == 0
                rest = await collect_epoch(loader, 0)
                steps.add(len(rest))
                seen += [b["id"] for b in rest]
                next_epoch.append(ids_of(await collect_epoch(loader, 1)))
    ids = np.concatenate(seen)
    per_rank = RECORDS // old * old  # the original epoch's records (drop remainder)
    assert len(ids) == per_rank and len(np.unique(ids)) == per_rank
    assert len(steps) == 1  # equal steps on the new ranks
    later = np.concatenate(next_epoch)  # the next epoch uses the new world size normally
    assert len(later) == RECORDS // new * new and len(np.unique(later)) == len(later)


async def test_mismatched_state_is_refused_naming_the_difference(npz_root: Path) -> None:
    async with running_workers(npz_root, 1) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=8, seed=1) as loader:
            epoch = loader.epoch(0)
            await anext(epoch)
            state = loader.state_dict()
            await epoch.aclose()
        json.dumps(state)  # JSON-serialisable
        with pytest.raises(StateMismatchError, match=r"seed 1 vs 2; batch_size 8 vs 16"):
            async with Loader(
                [worker.address], dataset="train", batch_size=16, seed=2, state=state
            ):
                pass
        doctored = {**state, "fingerprint": "0" * 24}
        with pytest.raises(
            StateMismatchError, match=r"fingerprint .* \(shards or counts changed\)"
        ):
            async with Loader(
                [worker.address], dataset="train", batch_size=8, seed=1, state=doctored
            ):
                pass
        async with Loader(
            [worker.address], dataset="train", batch_size=8, seed=1, state=doctored,
            override_state_checks=True,
        ) as loader:  # fmt: skip
            rest = await collect_epoch(loader, 0)
        assert len(rest) == RECORDS // 8 - 1
        with pytest.raises(StateMismatchError, match="not a shardstream loader state"):
            async with Loader([worker.address], dataset="train", batch_size=8, state={"x": 1}):
                pass


@pytest.mark.parametrize("via", ["Loader", "SyncLoader"])
async def test_a_drop_last_elastic_resume_keeps_one_batch_shape_and_audits_clean(
    npz_root: Path, tmp_path: Path, via: str
) -> None:
    """drop_last=True promises one batch shape (what a jit-compiled step or a sharded
    global array needs). Was: after a resume with another world size, the last batch was
    partial, and of another size on each rank ([11, 11, 10] here), though the epoch
    never had a partial batch. Now every rank gets whole batches; the records past them
    are left out as drop_last leaves out a partial batch, and the ledger's audit knows."""
    from shardstream.cli import main as cli
    from shardstream.client import SyncLoader

    ledger = tmp_path / "ledger"
    opts = {"dataset": "train", "batch_size": 32, "seed": 2, "shuffle": True,
            "drop_last": True, "ledger_dir": str(ledger)}  # fmt: skip
    k = 5
    async with running_workers(npz_root, 2) as workers:
        addresses = [w.address for w in workers]
        seen: list[np.ndarray] = []
        states = []
        for r in range(2):
            async with Loader(addresses, rank=r, world_size=2, **opts) as loader:
                epoch = loader.epoch(0)
                seen += [(await anext(epoch))["id"] for _ in range(k)]
                states.append(loader.state_dict())
                await epoch.aclose()

        def sync_rank(r: int) -> list[np.ndarray]:
            with SyncLoader(addresses, rank=r, world_size=3, state=states[0], **opts) as sync:
                return [b["id"] for b in sync.epoch(0)]

        sizes = []
        for r in range(3):
            if via == "SyncLoader":
                rest = await asyncio.to_thread(sync_rank, r)
            else:
                async with Loader(addresses, rank=r, world_size=3, state=states[0], **opts) as lo:
                    rest = [b["id"] for b in await collect_epoch(lo, 0)]
            sizes.append([len(ids) for ids in rest])
            seen += rest
    assert sizes == [[32] * 17] * 3, sizes  # whole batches, equal steps
    ids = np.concatenate(seen)
    assert len(np.unique(ids)) == len(ids) == 2 * k * 32 + 3 * 17 * 32
    assert 2 * (RECORDS // 2 // 32 * 32) - len(ids) == 32  # what the resumed split leaves out
    assert await asyncio.to_thread(cli, ["audit", str(ledger)]) == 0


async def test_ledger_audit_passes_through_a_worker_kill_and_flags_a_doctored_ledger(
    tmp_path: Path,
) -> None:
    import asyncio

    from shardstream.cli import main as cli
    from shardstream.server import make_dataset

    ledger = tmp_path / "ledger"
    make_dataset(tmp_path / "data", shards=6, records=3000, shape=(8, 8, 3))
    with worker_processes(tmp_path / "data", 3) as workers:
        addresses = [w.address for w in workers]
        opts = {"dataset": "train", "batch_size": 25, "seed": 3, "shuffle": True,
                "shuffle_window": 64, "read_bytes": 8192, "chunk_bytes": 2048,
                "ledger_dir": str(ledger), "backoff_base": 0.05, "idle_timeout": 7.0}  # fmt: skip
        killed = False

        async def rank(r: int) -> None:
            nonlocal killed
            async with Loader(addresses, rank=r, world_size=3, **opts) as loader:
                for epoch in range(2):
                    async for _ in loader.epoch(epoch):
                        inflight = loader.statistics().reads_in_flight.get(addresses[1], 0)
                        if r == 0 and epoch == 0 and not killed and inflight:
                            workers[1].signal(signal.SIGKILL)
                            killed = True

        await asyncio.gather(*(rank(r) for r in range(3)))
    assert killed
    assert cli(["audit", str(ledger)]) == 0
    files = sorted((ledger / "epoch-00000").glob("*.jsonl"))
    assert len(files) == 3
    assert any('"kind":"resume"' in f.read_text() for f in files)
    # Doctor rank 2's ledger: its first batch delivered again as its last.
    lines = files[2].read_text().splitlines()
    first_batch = next(json.loads(t) for t in lines if '"kind":"batch"' in t)
    files[2].write_text("\n".join([*lines, json.dumps(first_batch)]) + "\n")
    from shardstream.client._ledger import audit

    (epoch0, epoch1) = list(audit(ledger))
    assert epoch1.ok and not epoch0.ok and not epoch0.missing
    duplicated = {(sid, x) for sid, a, n, _ in epoch0.duplicated for x in range(a, a + n)}
    doctored = {
        (f"shard-{s:05d}.npz", x) for s, a, n in first_batch["ranges"] for x in range(a, a + n)
    }
    assert duplicated == doctored and all(times == 2 for *_, times in epoch0.duplicated)  # fmt: skip
    assert cli(["audit", str(ledger)]) == 1


def test_ledger_of_a_killed_and_resumed_rank_audits_clean(npz_root: Path, tmp_path: Path) -> None:
    from shardstream.client._ledger import audit

    ledger = tmp_path / "ledger"
    with worker_processes(npz_root, 1) as (worker,):
        args = ["--world", "1", "--epochs", "1", "--ledger", str(ledger)]
        first = consume(worker.address, *args, kill_after=30)
        state_file = tmp_path / "state.json"
        state_file.write_text(json.dumps(first[-1]["state"]))
        consume(worker.address, *args, "--state", str(state_file))
    (epoch0,) = list(audit(ledger))
    assert sorted(p.name for p in (ledger / "epoch-00000").iterdir()) == [
        "seg0-w1-r00000.jsonl",
        "seg1-w1-r00000.jsonl",
    ]
    assert epoch0.ok and epoch0.received == epoch0.expected == RECORDS


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("epoch", float("inf")),  # was a bare OverflowError
        ("batches", 2.9),  # were taken as 2, 3, 3, 1 and 3 batches or ranks
        ("epoch", "3"),
        ("epoch", b"3"),
        ("batches", True),
        ("world_size", 3.7),
        ("epoch", 2**64),  # was accepted, then an untyped ValueError at the first read
        ("history", [[1.5, 2.5]]),
        ("version", True),
    ],
)
def test_a_state_of_the_wrong_types_is_refused_not_coerced(key: str, value: object) -> None:
    from shardstream.client._state import LoaderState

    state = LoaderState(
        dataset="train", fingerprint="f" * 24, epoch=1, batches=2, world_size=1, rank=0,
        history=(), options={"seed": 3},
    ).to_dict()  # fmt: skip
    LoaderState.from_dict(json.loads(json.dumps(state)))  # the real thing passes
    with pytest.raises(StateMismatchError, match=r"not a shardstream loader state|not supported"):
        LoaderState.from_dict({**state, key: value})


def test_options_of_another_type_are_a_difference() -> None:
    from shardstream.client._state import LoaderState

    state = LoaderState(
        dataset="train", fingerprint="f" * 24, epoch=1, batches=2, world_size=1, rank=0,
        history=(), options={"seed": 3.0, "shuffle": 1},
    )  # fmt: skip
    diffs = state.check(dataset="train", fingerprint="f" * 24, options={"seed": 3, "shuffle": True})
    assert "seed 3.0 vs 3" in "; ".join(diffs) and "shuffle 1 vs True" in "; ".join(diffs)


async def test_an_epoch_past_the_wire_is_a_config_error(npz_root: Path) -> None:
    async with running_workers(npz_root, 1) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=8) as loader:
            with pytest.raises(ConfigError, match=r"epoch must be an int in \[0, 2\*\*63 - 1\]"):
                loader.epoch(2**64)


@pytest.mark.parametrize("api", ["SyncLoader", "torch"])
def test_a_ledger_holds_what_the_training_loop_got_not_what_was_fetched_ahead(
    npz_root: Path, tmp_path: Path, api: str
) -> None:
    """A SyncLoader's pump takes batches ahead of the training loop: the ledger wrote
    them as they were taken, so an epoch stopped (or killed) after K batches audited as
    having delivered K + the hand-off's batches, and an unfinished epoch could pass."""
    from shardstream.client import SyncLoader
    from shardstream.client._ledger import audit
    from shardstream.client.torch import ShardstreamIterable

    ledger, taken = tmp_path / "ledger", 7
    options = {"dataset": "train", "batch_size": 16, "ledger_dir": str(ledger)}
    with worker_processes(npz_root, 1) as (worker,):
        if api == "SyncLoader":
            with SyncLoader(worker.address, **options) as loader:
                got = [b for _, b in zip(range(taken), loader.epoch(0), strict=False)]
        else:
            data = ShardstreamIterable(worker.address, **options)
            try:
                got = [b for _, b in zip(range(taken), data, strict=False)]
            finally:
                data.close()
    (epoch0,) = list(audit(ledger))
    assert epoch0.received == sum(len(b["id"]) for b in got) == taken * 16
    lines = (ledger / "epoch-00000" / "seg0-w1-r00000.jsonl").read_text().splitlines()
    assert sum('"kind":"batch"' in line for line in lines) == taken

"""Training loops as frameworks run them: torchdata's StatefulDataLoader, Lightning
(DDP, 2 CPU processes), Accelerate (torchrun, 2 processes). Each checks the data itself:
every record exactly once per epoch across ranks, equal steps, a new order per epoch, and
a mid-epoch resume that yields exactly the rest."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from shardstream.server import make_dataset

from conftest import worker_processes
from test_examples import free_port, json_objects

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="torch is not installed"
)
EXAMPLES = Path(__file__).parents[1] / "examples"
RECORDS = 1200
OPTS: dict[str, Any] = {"dataset": "train", "batch_size": 32, "seed": 1, "shuffle": True}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _needs(module: str) -> Any:
    return pytest.mark.skipif(
        importlib.util.find_spec(module) is None,
        reason=f"{module} is not installed (pip install 'shardstream[lightning,accelerate]')",
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("frameworks")
    make_dataset(root, shards=6, records=RECORDS, shape=(8, 8, 3))
    return root


@_needs("torchdata")
@pytest.mark.filterwarnings("ignore:'set_vital' is deprecated")
def test_stateful_dataloader_resumes_exactly_and_epochs_advance(
    data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    from shardstream.client.torch import ShardstreamIterable

    with worker_processes(data, 1) as (worker,):
        first = ShardstreamIterable([worker.address], **OPTS)
        loader = StatefulDataLoader(first, batch_size=None)
        assert len(loader) == len(first) == -(-RECORDS // 32)  # known totals for progress bars
        batches = iter(loader)
        head = [next(batches)["id"].tolist() for _ in range(11)]
        state = loader.state_dict()
        first.close()
        assert first.state_dict()["batches"] == 11  # still answers once closed

        second = ShardstreamIterable([worker.address], **OPTS)
        resumed = StatefulDataLoader(second, batch_size=None)
        with caplog.at_level(logging.WARNING):
            resumed.load_state_dict(state)
            rest = [b["id"].tolist() for b in resumed]
        assert not [r for r in caplog.records if "fast-forward" in r.getMessage()]
        epoch0 = [i for b in head + rest for i in b]
        assert sorted(epoch0) == list(range(RECORDS))
        assert len(head) + len(rest) == len(second)
        epoch1 = [i for b in resumed for i in b["id"].tolist()]  # nobody called set_epoch
        second.close()
    assert sorted(epoch1) == list(range(RECORDS)) and epoch1 != epoch0


def test_plain_loop_gets_a_new_order_each_epoch_without_set_epoch(data: Path) -> None:
    import torch

    from shardstream.client.torch import ShardstreamIterable

    with worker_processes(data, 1) as (worker,):
        source = ShardstreamIterable([worker.address], **OPTS)
        loader = torch.utils.data.DataLoader(source, batch_size=None)
        if importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            assert tqdm(loader, disable=True).total == -(-RECORDS // 32)  # progress totals
        try:
            epochs = [[int(i) for b in loader for i in b["id"]] for _ in range(3)]
            source.set_epoch(1)  # set_epoch still wins
            again = [int(i) for b in loader for i in b["id"]]
        finally:
            source.close()
    assert all(sorted(e) == list(range(RECORDS)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3
    assert again == epochs[1]


def _rank_logs(folder: Path) -> dict[int, list[dict[str, Any]]]:
    return {
        int(p.stem.split("-")[1]): [json.loads(x) for x in p.read_text().splitlines()]
        for p in folder.glob("rank-*.jsonl")
    }


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


@_needs("lightning")
@_needs("torchdata")
@pytest.mark.timeout(600)  # three 2-process runs, ~35 s here: the default 120 s is too near
def test_lightning_ddp_exactly_once_new_order_and_mid_epoch_resume(
    data: Path, tmp_path: Path
) -> None:
    script = [sys.executable, str(EXAMPLES / "train_lightning.py"), "--devices", "2"]
    full, crashed, resumed = tmp_path / "full", tmp_path / "crashed", tmp_path / "resumed"
    for d in (full, crashed, resumed):
        d.mkdir()
    ckpt = tmp_path / "mid.ckpt"
    with worker_processes(data, 2) as workers:
        addresses = ",".join(w.address for w in workers)
        _run([*script, "--workers", addresses, "--epochs", "2", "--record", str(full)])
        _run([*script, "--workers", addresses, "--epochs", "2", "--record", str(crashed),
              "--crash-after-steps", "7", "--save", str(ckpt)])  # fmt: skip
        _run([*script, "--workers", addresses, "--epochs", "2", "--record", str(resumed),
              "--resume", str(ckpt)])  # fmt: skip
    logs = _rank_logs(full)
    assert sorted(logs) == [0, 1]
    orders = {}
    for epoch in (0, 1):
        steps = {r: [x for x in lines if x["epoch"] == epoch] for r, lines in logs.items()}
        assert len({len(s) for s in steps.values()}) == 1  # equal steps
        ids = [i for s in steps.values() for x in s for i in x["ids"]]
        assert sorted(ids) == list(range(RECORDS))  # exactly once across the ranks
        orders[epoch] = [x["ids"] for x in steps[0]]
    assert orders[0] != orders[1]  # Lightning never calls set_epoch: the data moved on
    # Crash after step 7, resume from that checkpoint: the same epochs, exactly.
    before, after = _rank_logs(crashed), _rank_logs(resumed)
    for rank in (0, 1):
        assert len(before[rank]) == 7
        joined = before[rank] + after[rank]
        for epoch in (0, 1):
            got = [x["ids"] for x in joined if x["epoch"] == epoch]
            want = [x["ids"] for x in logs[rank] if x["epoch"] == epoch]
            assert got == want, (rank, epoch)


@_needs("lightning")
@pytest.mark.timeout(300)
def test_lightning_ddp_with_the_iterable_made_before_torch_distributed_starts(
    data: Path, tmp_path: Path
) -> None:
    """The iterable made at the script's top level, before torch.distributed starts (in
    rank 1's process Lightning sets WORLD_SIZE and LOCAL_RANK, not RANK). Was: both
    processes took "rank 0 of 1" when it was made and read every record: each record
    twice per epoch, silently. The rank is now discovered when the loader opens."""
    script = Path(__file__).parent / "lightning_toplevel.py"
    with worker_processes(data, 2) as workers:
        _run([sys.executable, str(script), ",".join(w.address for w in workers), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["loader"] for r in ranks] == [[0, 2], [1, 2]]
    assert len(ranks[0]["ids"]) == len(ranks[1]["ids"])
    assert sorted(ranks[0]["ids"] + ranks[1]["ids"]) == list(range(RECORDS))


@_needs("accelerate")
@pytest.mark.timeout(600)  # two 2-process launches, ~25 s here: the default 120 s is too near
def test_accelerate_two_processes_exactly_once(data: Path) -> None:
    def launch(*extra: str) -> subprocess.CompletedProcess[str]:
        with tempfile.TemporaryDirectory() as tmp:  # torchrun's own files (torchelastic_*)
            return subprocess.run(
                [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                 str(EXAMPLES / "train_accelerate.py"), "--workers", addresses, *extra],
                capture_output=True, text=True, timeout=300, env={**ENV, "TMPDIR": tmp},
            )  # fmt: skip

    with worker_processes(data, 2) as workers:
        addresses = ",".join(w.address for w in workers)
        r = launch("--epochs", "2")
        wrong = launch("--epochs", "1", "--wrong-way")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lines = [x for x in json_objects(r.stdout) if "epoch" in x]
    assert len(lines) == 4
    for epoch in (0, 1):
        per_rank = [x for x in lines if x["epoch"] == epoch]
        assert {x["rank"] for x in per_rank} == {0, 1}
        assert {x["steps"] for x in per_rank} == {-(-RECORDS // 2 // 32)}  # equal steps
        assert {x["records"] for x in per_rank} == {RECORDS}
        assert {x["id_sum"] for x in per_rank} == {RECORDS * (RECORDS - 1) // 2}
    firsts = Counter((x["rank"], x["first"]) for x in lines)
    assert len(firsts) == 4  # each rank starts each epoch elsewhere: a new order
    assert wrong.returncode != 0
    assert "is being re-sharded by DataLoaderDispatcher" in wrong.stderr


@_needs("lightning")
@pytest.mark.filterwarnings(
    "ignore::UserWarning", "ignore::DeprecationWarning", "ignore::FutureWarning"
)
@pytest.mark.timeout(300)
def test_lightning_epochs_follow_the_trainer_and_resume_from_any_checkpoint(
    data: Path, tmp_path: Path
) -> None:
    """In one process, the usual flows. (1) A crash in epoch 2, resumed from the
    `save_last` checkpoint of epoch 1's end: epochs 2 and 3 are an uninterrupted run's.
    Was: the new DataModule started the data at epoch 0, so epochs 2 and 3 got the batches
    of epochs 0 and 1 again. (2) `limit_train_batches`: each epoch starts that epoch's
    order. Was: the same 5 batches every epoch (160 of 1200 records ever seen)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from shardstream.client import SyncLoader
    from shardstream.client.lightning import ShardstreamDataModule

    seen: list[tuple[int, list[int]]] = []
    crash: list[tuple[int, int] | None] = [None]

    class Model(L.LightningModule):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(8 * 8 * 3, 10)

        def training_step(self, batch: dict[str, Any], index: int) -> Any:
            if (self.current_epoch, index) == crash[0]:
                raise RuntimeError("crash")
            seen.append((self.current_epoch, batch["id"].tolist()))
            x = batch["image"].reshape(len(batch["image"]), -1).float()
            return torch.nn.functional.cross_entropy(self.layer(x), batch["label"] % 10)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.01)

    kw: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "logger": False,
                          "enable_progress_bar": False, "enable_model_summary": False}  # fmt: skip

    def epochs(run: list[tuple[int, list[int]]], e: int) -> list[list[int]]:
        return [ids for epoch, ids in run if epoch == e]

    with worker_processes(data, 1) as (worker,):
        with SyncLoader([worker.address], **OPTS) as loader:
            straight = [[b["id"].tolist() for b in loader.epoch(e)] for e in range(4)]
        crash[0] = (2, 5)
        first = ShardstreamDataModule([worker.address], **OPTS)
        with pytest.raises(RuntimeError, match="crash"):
            L.Trainer(max_epochs=4, callbacks=[ModelCheckpoint(dirpath=tmp_path, save_last=True)],
                      **kw).fit(Model(), datamodule=first)  # fmt: skip
        first.teardown("fit")  # Lightning does not, after an exception
        crash[0] = None
        assert epochs(seen, 1) == straight[1] and epochs(seen, 2) == straight[2][:5]
        seen.clear()
        again = ShardstreamDataModule([worker.address], **OPTS)
        L.Trainer(max_epochs=4, enable_checkpointing=False, **kw).fit(
            Model(), datamodule=again, ckpt_path=tmp_path / "last.ckpt"
        )
        assert sorted({e for e, _ in seen}) == [2, 3]
        assert epochs(seen, 2) == straight[2] and epochs(seen, 3) == straight[3]
        seen.clear()
        L.Trainer(max_epochs=3, limit_train_batches=5, enable_checkpointing=False, **kw).fit(
            Model(), datamodule=ShardstreamDataModule([worker.address], **OPTS)
        )
    for e in range(3):
        assert epochs(seen, e) == straight[e][:5], e

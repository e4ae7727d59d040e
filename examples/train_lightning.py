"""Train a tiny model with PyTorch Lightning (DDP on CPU), data from shardstream.

    shardstream make-dataset /tmp/data --shards 8 --records 4000 --shape 8,8,3
    shardstream worker --data-root /tmp/data --dataset train='*.npz' --port 50051 &
    python examples/train_lightning.py --workers 127.0.0.1:50051 --devices 2 --epochs 2

Each rank appends one JSON line per step to `--record DIR/rank-R.jsonl` (epoch, step,
ids), which the tests use to check exactly-once delivery, equal steps and a new order
per epoch. `--crash-after-steps N --save CKPT` saves a checkpoint after step N, as
`ModelCheckpoint(every_n_train_steps=N)` would, and stops there as if the job died;
`--resume CKPT` continues from it: the rest of that epoch, exactly.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from shardstream.client.lightning import ShardstreamDataModule


class CrashAfter(L.Callback):  # type: ignore[misc]
    """Save a checkpoint after step `steps`, then end the run as a crash would."""

    def __init__(self, steps: int, path: Path) -> None:
        self.steps = steps
        self.path = path

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.steps:
            trainer.save_checkpoint(self.path)
            raise SystemExit(0)  # every rank: as if the job had been killed here


class TinyModel(L.LightningModule):  # type: ignore[misc]
    def __init__(self, features: int, record: Path | None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(features, 10)
        self.record = record
        if record is not None:
            record.mkdir(parents=True, exist_ok=True)  # every rank: whichever comes first

    def training_step(self, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
        x = batch["image"].reshape(len(batch["image"]), -1).float() / 255.0
        loss = torch.nn.functional.cross_entropy(self.layer(x), batch["label"] % 10)
        if self.record is not None:
            line = {"epoch": self.current_epoch, "step": index, "ids": batch["id"].tolist()}
            path = self.record / f"rank-{self.global_rank}.jsonl"
            with path.open("a") as f:
                f.write(json.dumps(line) + "\n")
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default=os.environ.get("SHARDSTREAM_WORKERS", ""))
    parser.add_argument("--dataset", default="train")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--features", type=int, default=8 * 8 * 3)
    parser.add_argument("--record", type=Path, default=None, help="folder for per-rank logs")
    parser.add_argument("--crash-after-steps", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None, help="checkpoint of --crash-after-steps")
    parser.add_argument("--resume", type=Path, default=None, help="checkpoint to resume from")
    args = parser.parse_args()
    if not args.workers:
        parser.error("--workers (or SHARDSTREAM_WORKERS) is required")

    torch.manual_seed(0)
    data = ShardstreamDataModule(
        args.workers, dataset=args.dataset, batch_size=args.batch_size, seed=1, shuffle=True
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs,
        callbacks=[CrashAfter(args.crash_after_steps, args.save)] if args.save else [],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        num_sanity_val_steps=0,
    )
    model = TinyModel(args.features, args.record)
    trainer.fit(model, datamodule=data, ckpt_path=args.resume)


if __name__ == "__main__":
    main()

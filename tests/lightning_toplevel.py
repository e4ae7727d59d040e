"""A Lightning DDP script as torch users write it: the ShardstreamIterable is made at the
script's top level, before Lightning starts torch.distributed, and Lightning's launcher
re-runs the script for rank 1 with WORLD_SIZE and LOCAL_RANK set but not RANK.

    python tests/lightning_toplevel.py ADDRESSES OUT_DIR

Each rank writes OUT_DIR/rank-R.json: the loader's rank and world size, and the ids it
trained on."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from shardstream.client.torch import ShardstreamIterable

warnings.filterwarnings("ignore")
logging.getLogger("lightning").setLevel(logging.ERROR)
ADDRESSES, OUT = sys.argv[1], Path(sys.argv[2])
data = ShardstreamIterable(ADDRESSES, dataset="train", batch_size=32, seed=1, shuffle=True)


class Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(192, 10)
        self.ids: list[int] = []

    def training_step(self, batch: dict[str, Any], index: int) -> torch.Tensor:
        self.ids += batch["id"].tolist()
        x = batch["image"].reshape(len(batch["image"]), -1).float()
        return torch.nn.functional.cross_entropy(self.layer(x), batch["label"] % 10)

    def on_train_epoch_end(self) -> None:
        config = data._loader.config
        (OUT / f"rank-{self.global_rank}.json").write_text(
            json.dumps({"loader": [config.rank, config.world_size], "ids": self.ids})
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


if __name__ == "__main__":
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Model(), train_dataloaders=torch.utils.data.DataLoader(data, batch_size=None))
    data.close()

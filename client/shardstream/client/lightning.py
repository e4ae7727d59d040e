"""PyTorch Lightning glue: a DataModule whose training data comes from shardstream.

    dm = ShardstreamDataModule(["w1:50051", "w2:50051"], dataset="train", batch_size=64,
                               shuffle=True, seed=7)
    trainer = lightning.Trainer(strategy="ddp", max_epochs=3)
    trainer.fit(model, datamodule=dm)                   # ckpt_path=... resumes mid-epoch

What it keeps that a plain IterableDataset loses under Lightning:

- **Rank.** The loader is built in `train_dataloader()`, after Lightning set up
  torch.distributed, so each process reads its own part (no sampler is added:
  shardstream already splits the data by rank).
- **A new order every epoch.** Lightning never calls `set_epoch` on an
  IterableDataset; each epoch's iteration delivers the epoch Lightning is in
  (`trainer.current_epoch`), also where an epoch stops early (`limit_train_batches`).
- **Equal steps.** Every rank gets the same number of batches (`len()`), so DDP's
  collectives never wait for a rank that ran out.
- **Resume.** The DataModule's own state (in every checkpoint) is the loader's
  position, restored before the first batch, so a checkpoint taken anywhere (an
  epoch's end, `max_steps`, `trainer.save_checkpoint`) resumes with exactly the
  batches that come next. The dataloader is torchdata's `StatefulDataLoader`,
  which Lightning also saves and restores mid-epoch; without torchdata (`pip
  install shardstream[lightning]` brings it) a plain DataLoader is used, and
  Lightning warns.

Needs `lightning` (or `pytorch_lightning`) and torch.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from shardstream.client.torch import ShardstreamIterable

try:
    from lightning.pytorch import LightningDataModule
except ImportError:  # the older package name
    from pytorch_lightning import LightningDataModule

__all__ = ["ShardstreamDataModule"]


class ShardstreamDataModule(LightningDataModule):  # type: ignore[misc]
    """Training batches from shardstream workers; takes `Loader`'s arguments (plus
    `writable`/`pin_memory` of `ShardstreamIterable`). Rank and world size come from
    Lightning's torch.distributed unless given."""

    def __init__(self, addresses: Sequence[str] | str, **options: Any) -> None:
        super().__init__()
        self._addresses = addresses
        self._options = options
        self._data: ShardstreamIterable | None = None
        self._loader: Any = None
        self._restored: dict[str, Any] | None = None  # a checkpoint's position, not yet used

    @property
    def data(self) -> ShardstreamIterable:
        """The data source (made on first use, after Lightning set up the processes)."""
        if self._data is None:
            data = ShardstreamIterable(self._addresses, **self._options)
            try:
                if self._restored is not None:
                    data.load_state_dict(self._restored)
            except BaseException:
                data.close()
                raise
            self._restored = None
            self._data = data
        return self._data

    def state_dict(self) -> dict[str, Any]:
        """The loader's position, saved in every checkpoint Lightning takes."""
        if self._data is not None:
            return {"position": self._data.state_dict()}
        return {} if self._restored is None else {"position": dict(self._restored)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A checkpoint's position: the next batches are the ones that came next."""
        position = state_dict.get("position")
        if position is None:
            return
        if self._data is not None:
            self._data.load_state_dict(position)
        else:
            self._restored = dict(position)

    def _epoch(self) -> int:
        trainer = self.trainer
        return self.data.epoch if trainer is None else int(trainer.current_epoch)

    def train_dataloader(self) -> Any:
        self.data.follow_epochs(self._epoch)
        if self._loader is None:  # one loader for the whole fit: one set of connections
            try:
                from torchdata.stateful_dataloader import StatefulDataLoader
            except ImportError:
                warnings.warn(
                    "torchdata is not installed: checkpoints taken mid-epoch cannot resume "
                    "exactly (pip install 'shardstream[lightning]')",
                    stacklevel=2,
                )
                self._loader = torch.utils.data.DataLoader(self.data, batch_size=None)
            else:
                self._loader = StatefulDataLoader(self.data, batch_size=None)
        return self._loader

    def teardown(self, stage: str) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
            self._loader = None

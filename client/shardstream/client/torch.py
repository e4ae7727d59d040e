"""PyTorch glue: batches as tensors, and a data source for code that expects one.

    from shardstream.client.torch import ShardstreamIterable, to_torch

    tensors = to_torch(batch)                    # dict[str, torch.Tensor], no copy if possible
    data = ShardstreamIterable(addresses, dataset="train", batch_size=64, shuffle=True)
    for epoch in range(3):
        data.set_epoch(epoch)
        for batch in torch.utils.data.DataLoader(data, batch_size=None, num_workers=0):
            ...

Needs torch (`pip install shardstream[torch]`). Arrays that are views of a
received message are read-only: `to_torch` copies those (once) unless
`writable=False`, which shares their memory and must then never be written
in place. Writable arrays are always shared (`torch.from_numpy`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shardstream.client._sync import SyncLoader

__all__ = ["ShardstreamIterable", "to_torch"]


def to_torch(
    batch: Mapping[str, np.ndarray[Any, Any]], *, writable: bool = True, pin_memory: bool = False
) -> dict[str, torch.Tensor]:
    """Tensors over a batch's arrays. `pin_memory` pins them for fast, asynchronous
    copies to a GPU (ignored, with no copy, when CUDA is not available)."""
    out = {}
    for name, array in batch.items():
        if not array.flags.writeable:
            if writable:
                array = array.copy()
            else:
                with warnings.catch_warnings():  # shared on purpose; documented above
                    warnings.filterwarnings(
                        "ignore", message="The given NumPy array is not writable"
                    )
                    out[name] = _pin(torch.from_numpy(array), pin_memory)
                continue
        out[name] = _pin(torch.from_numpy(array), pin_memory)
    return out


def _pin(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    return tensor.pin_memory() if pin and torch.cuda.is_available() else tensor


class ShardstreamIterable(IterableDataset[dict[str, torch.Tensor]]):  # type: ignore[misc]
    """One rank's batches as a torch data source (already batched: use
    `DataLoader(..., batch_size=None, num_workers=0)`; shardstream does the prefetching).
    Takes the `Loader` arguments, plus `writable` and `pin_memory` for `to_torch`."""

    def __init__(
        self,
        addresses: Sequence[str] | str,
        *,
        writable: bool = True,
        pin_memory: bool = False,
        **options: Any,
    ) -> None:
        self._loader = SyncLoader(addresses, **options)  # options are checked here
        self._writable = writable
        self._pin = pin_memory
        self._open = False
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration delivers."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError(
                "ShardstreamIterable must be read with DataLoader(num_workers=0): every "
                "DataLoader worker would deliver the whole rank's data again"
            )
        self._ensure_open()
        for batch in self._loader.epoch(self.epoch):
            yield to_torch(batch, writable=self._writable, pin_memory=self._pin)

    def _ensure_open(self) -> None:
        if not self._open:
            self._loader.open()
            self._open = True

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches this iterable has yielded (see
        `Loader.state_dict`); connects to the workers if not yet connected."""
        self._ensure_open()
        return self._loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], *, override: bool = False) -> None:
        """Continue from a saved position: the next iteration yields the rest of the
        state's epoch (`self.epoch` is set to it)."""
        self._ensure_open()
        self._loader.load_state_dict(state, override=override)
        self.epoch = self._loader.start_epoch

    def close(self) -> None:
        if self._open:
            self._loader.close()
            self._open = False

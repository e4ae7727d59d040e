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

import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from types import FrameType
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from shardstream.client._options import LoaderStatistics
from shardstream.client._sync import SyncLoader

__all__ = ["ShardstreamIterable", "to_torch"]


def to_torch(
    batch: Mapping[str, Any], *, writable: bool = True, pin_memory: bool = False
) -> dict[str, Any]:
    """Tensors over a batch's arrays. `pin_memory` pins them for fast, asynchronous
    copies to a GPU (ignored, with no copy, when CUDA is not available). Lists (string
    and bytes fields with `ragged="pad"`) pass through as they are."""
    out: dict[str, Any] = {}
    for name, array in batch.items():
        if not isinstance(array, np.ndarray):
            out[name] = array
            continue
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


# Wrappers that split an IterableDataset's output between processes: applied to data
# shardstream already split by rank, they would drop or duplicate records.
_RESHARDERS = ("IterableDatasetShard", "DataLoaderDispatcher")


def _refuse_resharding(frame: FrameType | None) -> None:
    """Raise if a framework re-shards this rank's data (Accelerate's `prepare()` of a
    DataLoader over a ShardstreamIterable does, in more than one process)."""
    for _ in range(40):
        if frame is None:
            return
        qualname = frame.f_code.co_qualname
        if any(name in qualname for name in _RESHARDERS):
            raise RuntimeError(
                f"a ShardstreamIterable is being re-sharded by {qualname} (Accelerate's "
                "prepare() of a DataLoader over it): shardstream already gives each rank its "
                "own part. Pass the ShardstreamIterable itself to accelerator.prepare() (it is "
                "returned as it is), or iterate it directly, and move batches to the device "
                "with .to(accelerator.device)"
            )
        frame = frame.f_back


def _pin(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    return tensor.pin_memory() if pin and torch.cuda.is_available() else tensor


class ShardstreamIterable(IterableDataset[dict[str, torch.Tensor]]):  # type: ignore[misc]
    """One rank's batches as a torch data source (already batched: use
    `DataLoader(..., batch_size=None, num_workers=0)`, or torchdata's
    `StatefulDataLoader` the same way; shardstream does the prefetching).
    Takes the `Loader` arguments, plus `writable` and `pin_memory` for `to_torch`.

    Epochs: each iteration delivers `self.epoch`; an iteration that reaches the epoch's
    end moves `self.epoch` on by one, so frameworks that never call `set_epoch`
    (Lightning, Accelerate, a plain `for epoch in ...: for batch in loader`) still get a
    new order every epoch. `set_epoch(e)` always wins. `len()` is this rank's batches per
    epoch (the same on every rank). `state_dict()` is the position after the batches
    yielded so far; `load_state_dict()` makes the next iteration yield exactly the rest.
    """

    def __init__(
        self,
        addresses: Sequence[str] | str,
        *,
        writable: bool = True,
        pin_memory: bool = False,
        **options: Any,
    ) -> None:
        self._addresses = addresses
        self._options = options
        self._loader = SyncLoader(addresses, **options)  # options are checked here
        self._closed_state: dict[str, Any] | None = None  # the position when last closed
        self._writable = writable
        self._pin = pin_memory
        self._open = False
        self.epoch = 0
        self._epoch_source: Callable[[], int] | None = None

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration delivers."""
        self.epoch = epoch

    def follow_epochs(self, source: Callable[[], int] | None) -> None:
        """Each iteration delivers the epoch `source()` says when it starts (a trainer's
        epoch counter: Lightning's `trainer.current_epoch`), however much of the last one
        was taken; None: the iterable's own count (`epoch`, `set_epoch`)."""
        self._epoch_source = source

    def __len__(self) -> int:
        self._ensure_open()
        return self._loader.batches_per_epoch()

    def statistics(self) -> LoaderStatistics:
        """The figures of its loader (`Loader.statistics`); after `close()`, of the last
        one it opened (iterating again opens another, which counts from zero)."""
        return self._loader.statistics()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if get_worker_info() is not None:
            raise RuntimeError(
                "ShardstreamIterable must be read with DataLoader(num_workers=0): in a "
                "DataLoader worker process it would be a copy whose epoch and position the "
                "trainer never sees (and more workers would each deliver the rank's data "
                "again); shardstream prefetches on its own"
            )
        _refuse_resharding(sys._getframe(1))
        self._ensure_open()
        if self._epoch_source is not None:
            self.epoch = int(self._epoch_source())
        epoch = self.epoch
        last = self._loader.plan(epoch).batches - 1  # of the rest, after a restored state
        if last < 0 and self.epoch == epoch:
            self.epoch = epoch + 1
        for i, batch in enumerate(self._loader.epoch(epoch)):
            # Frameworks that know len() stop asking after the last batch: move on as it
            # is handed over, unless someone chose another epoch meanwhile.
            if i == last and self.epoch == epoch:
                self.epoch = epoch + 1
            yield to_torch(batch, writable=self._writable, pin_memory=self._pin)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled (spawned processes, `ddp_spawn`): the addresses, options and the
        position; the copy connects on first use and goes on from there."""
        state = self.state_dict() if self._open else self._closed_state
        return {
            "addresses": self._addresses,
            "options": self._options,
            "writable": self._writable,
            "pin_memory": self._pin,
            "epoch": self.epoch,
            "position": None if state is None else dict(state),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._addresses = state["addresses"]
        self._options = state["options"]
        self._writable = state["writable"]
        self._pin = state["pin_memory"]
        self.epoch = state["epoch"]
        self._epoch_source = None  # a trainer's counter stays with the trainer
        self._closed_state = state["position"]
        self._loader = SyncLoader(self._addresses, **self._options)
        self._open = False

    def _ensure_open(self) -> None:
        if self._open:
            return
        if self._closed_state is not None or self._loader.closed:
            # used again after close() (go on from there), or after a failed open (the
            # workers were not up yet: try again)
            self._loader = SyncLoader(self._addresses, **self._options)
        try:
            self._loader.open()
            if self._closed_state is not None:
                self._loader.load_state_dict(self._closed_state)
        except BaseException:  # a refused position, Ctrl-C: keep it for the next try
            self._loader.close()
            raise
        self._open = True

    def state_dict(self) -> dict[str, Any]:
        """The position after the batches this iterable has yielded (see
        `Loader.state_dict`); connects to the workers if not yet connected (after
        `close()`: the position then)."""
        if not self._open and self._closed_state is not None:
            return dict(self._closed_state)
        self._ensure_open()
        return self._loader.state_dict()

    def load_state_dict(self, state: Mapping[str, Any], *, override: bool = False) -> None:
        """Continue from a saved position: the next iteration yields the rest of the
        state's epoch (`self.epoch` is set to it)."""
        self._ensure_open()
        self._loader.load_state_dict(state, override=override)
        self.epoch = self._loader.start_epoch

    def close(self) -> None:
        """Close the connections (idempotent); the position is kept: `state_dict()` still
        answers, and iterating again reconnects and goes on from there."""
        if self._open:
            try:
                self._closed_state = self._loader.state_dict()
            finally:
                self._loader.close()
                self._open = False

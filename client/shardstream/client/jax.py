"""JAX glue: batches as `jax.Array`s, on one device or as one global array across processes.

    from shardstream.client.jax import to_jax

    arrays = to_jax(batch)                      # dict[str, jax.Array] on the default device
    arrays = to_jax(batch, sharding=sharding)   # with jax.distributed: global arrays whose
                                                # first dimension spans every process's batch

Needs jax (`pip install shardstream[jax]`). How it differs from `jax.device_put(batch)`:

- Not in placing: arrays go to JAX as they are, read-only message views included (no copy
  on the host first; `to_torch` has to copy those unless told not to). The transfer
  is the one copy, except on CPU when an array happens to be 64-byte aligned, where
  XLA shares its memory (then it must not be written; message views never are).
- 64-bit integers are checked. Unless `jax_enable_x64` is on, JAX turns int64 /
  uint64 into 32 bits silently, wrapping values that do not fit (a record id of 2**32
  becomes 0); `to_jax` raises `OverflowError` naming the field instead.
- `sharding=`: each process's batch becomes its part of one global array
  (`jax.make_array_from_process_local_data`), the usual input of a `jit`-compiled,
  data-parallel step. Every rank has the same number of batches and, batch by batch,
  the same batch size, which this needs: no rank waits in a collective for another.
  (Not with `on_error="skip"`: a batch missing a skipped record is shorter on that
  rank only; pad it. The last batch of an epoch, if partial, has another shape on
  every rank, so `jit` compiles once more; `drop_last=True` keeps one shape.)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["to_jax"]

_NARROW = {np.dtype(np.int64): np.dtype(np.int32), np.dtype(np.uint64): np.dtype(np.uint32)}


def to_jax(
    batch: Mapping[str, Any],
    *,
    sharding: jax.sharding.Sharding | None = None,
    device: jax.Device | None = None,
) -> dict[str, Any]:
    """The batch's arrays as `jax.Array`s: on `device` (default: JAX's default device),
    or, with `sharding`, as this process's part of global arrays laid out by it. Lists
    (string and bytes fields with `ragged="pad"`) pass through as they are."""
    if sharding is not None and device is not None:
        raise ValueError("give `sharding` or `device`, not both")
    x64 = bool(jax.config.read("jax_enable_x64"))
    out: dict[str, Any] = {}
    for name, array in batch.items():
        if not isinstance(array, np.ndarray):
            out[name] = array
            continue
        if not x64 and array.dtype in _NARROW:
            _check_fits(name, array, _NARROW[array.dtype])
        if sharding is not None:
            out[name] = jax.make_array_from_process_local_data(sharding, array)
        else:
            out[name] = jax.device_put(array, device)
    return out


def _check_fits(name: str, array: np.ndarray[Any, Any], narrow: np.dtype[Any]) -> None:
    if array.size == 0:
        return
    info = np.iinfo(narrow)
    low, high = array.min(), array.max()
    if low < info.min or high > info.max:
        raise OverflowError(
            f"field {name!r} holds {array.dtype} values in [{low}, {high}], which JAX would "
            f"silently wrap to {narrow}: enable 64-bit types "
            "(jax.config.update('jax_enable_x64', True)) or leave the field out"
        )

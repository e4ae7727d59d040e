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
- 64-bit values are checked. Unless `jax_enable_x64` is on, JAX turns int64 /
  uint64 into 32 bits silently, wrapping values that do not fit (a record id of 2**32
  becomes 0), and float64 into float32, where finite values past float32's range
  become infinite; `to_jax` raises `OverflowError` naming the field instead. (float32
  keeps about 7 significant digits: 1.7e9 + 0.123 arrives as 1.7e9.)
- `sharding=`: each process's batch becomes its part of one global array
  (`jax.make_array_from_process_local_data`), the usual input of a `jit`-compiled,
  data-parallel step. Every rank has the same number of batches and, batch by batch,
  the same batch size, which this needs: no rank waits in a collective for another.
  (Not with `on_error="skip"`: a batch missing a skipped record is shorter on that
  rank only; pad it. The last batch of an epoch, if partial, has another shape on
  every rank, so `jit` compiles once more; `drop_last=True` keeps one shape.)
  Ragged fields (a `NAME_lengths` or `NAME_offsets` beside `NAME`) are padded to each
  process's own longest record, or flat with each process's own total: their shapes
  are compared across the processes first (one small all-gather per batch), and a
  difference is a `ValueError` naming the field, not a global array of another shape
  in each process. Give the loader `pad_to=` for one shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["to_jax"]

_NARROW = {
    np.dtype(np.int64): np.dtype(np.int32),
    np.dtype(np.uint64): np.dtype(np.uint32),
    np.dtype(np.float64): np.dtype(np.float32),
}


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
    if sharding is not None and jax.process_count() > 1 and _has_ragged(batch):
        _check_same_shapes(batch)
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


def _has_ragged(batch: Mapping[str, Any]) -> bool:
    return any(
        name.removesuffix(suffix) in batch
        for name in batch
        for suffix in ("_lengths", "_offsets")
        if name.endswith(suffix)
    )


def _check_same_shapes(batch: Mapping[str, Any]) -> None:
    """Raise unless every process's arrays have the same shapes (a collective: every
    process calls it for the same batch, and every process raises alike)."""
    from jax.experimental import multihost_utils

    names = [name for name, array in batch.items() if isinstance(array, np.ndarray)]
    mine = [batch[name].shape for name in names]
    flat = np.asarray([d for shape in mine for d in (len(shape), *shape)], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(flat))
    if (everyone == flat).all():
        return
    here = jax.process_index()
    for p, row in enumerate(everyone.tolist()):
        at = 0
        for name, shape in zip(names, mine, strict=True):
            theirs = tuple(row[at + 1 : at + 1 + row[at]])
            at += 1 + row[at]
            if theirs != shape:
                raise ValueError(
                    f"field {name!r} has shape {shape} in this process ({here}) and {theirs} "
                    f"in process {p}: a global array needs the same shape in every process. "
                    "Ragged fields are padded to each batch's longest record: give the "
                    "loader pad_to= (with ragged='pad') for one shape"
                )


def _check_fits(name: str, array: np.ndarray[Any, Any], narrow: np.dtype[Any]) -> None:
    if array.size == 0:
        return
    if narrow.kind == "f":
        top = float(np.finfo(narrow).max)
        magnitude = np.abs(array)
        high = float(np.max(magnitude, where=np.isfinite(magnitude), initial=0.0))
        if high > top:
            raise OverflowError(
                f"field {name!r} holds {array.dtype} values up to {high:g} in magnitude, "
                f"which JAX would silently make infinite in {narrow} (finite up to {top:g}): "
                "enable 64-bit types (jax.config.update('jax_enable_x64', True)) or "
                "scale the field"
            )
        return
    info = np.iinfo(narrow)
    low, high = array.min(), array.max()
    if low < info.min or high > info.max:
        raise OverflowError(
            f"field {name!r} holds {array.dtype} values in [{low}, {high}], which JAX would "
            f"silently wrap to {narrow}: enable 64-bit types "
            "(jax.config.update('jax_enable_x64', True)) or leave the field out"
        )

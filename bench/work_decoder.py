"""The benchmark's per-record CPU cost, applied identically by every system.

`apply_work(image, n)` runs, for every record separately, `n` rounds of
`x = sqrt(x * 1.0001 + 1.0)` on a float32 copy of the record and stores the
result back (cast to the image's dtype). shardstream workers apply it in their
decoding processes through the plug-in decoder `WorkNpz`:

    shardstream worker --decoder bench.work_decoder:WorkNpz \
        --dataset 'bench=*.npz:worknpz' ...      # with SHARDSTREAM_BENCH_WORK=N

The baselines call `apply_work` on the same records.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shardstream.server._npz import NpzDecoder
from shardstream.v1.codec import FieldSpec

WORK_ENV = "SHARDSTREAM_BENCH_WORK"


def work_from_env() -> int:
    return int(os.environ.get(WORK_ENV, "0") or 0)


def work_one(record: np.ndarray[Any, Any], n: int) -> np.ndarray[Any, Any]:
    """n rounds of the transform on a float32 copy of one record, cast back."""
    x = record.astype(np.float32)  # always a copy
    for _ in range(n):
        np.multiply(x, np.float32(1.0001), out=x)
        np.add(x, np.float32(1.0), out=x)
        np.sqrt(x, out=x)
    return x.astype(record.dtype, copy=False)


def apply_work(image: np.ndarray[Any, Any], n: int) -> np.ndarray[Any, Any]:
    """The transform on every record (first dimension) of `image`; a new array if n > 0."""
    if n <= 0:
        return image
    out = np.empty_like(image)
    for i in range(len(image)):
        out[i] = work_one(image[i], n)
    return out


class WorkNpz(NpzDecoder):
    """npz shards plus `SHARDSTREAM_BENCH_WORK` rounds of work on the `image` field."""

    name = "worknpz"
    suffixes = ()

    def __init__(self) -> None:
        super().__init__()
        self.work = work_from_env()

    def read_into(
        self,
        path: Path,
        start: int,
        count: int,
        out: Mapping[str, np.ndarray[Any, Any]],
        schema: tuple[FieldSpec, ...],
    ) -> None:
        """Records straight from the file into the message, then the work in place."""
        self.read_stored_into(path, start, count, out)
        if self.work > 0 and "image" in out:
            out["image"][...] = apply_work(out["image"], self.work)

    def byte_ranges(
        self, path: Path, start: int, count: int
    ) -> Mapping[str, tuple[int, int]] | None:
        """Without work the records are the file's bytes: the worker reads them directly."""
        return self.stored_ranges(path, start, count) if self.work <= 0 else None

    def read(self, path: Path, start: int, count: int) -> Mapping[str, np.ndarray[Any, Any]]:
        arrays = dict(super().read(path, start, count))
        if self.work > 0 and "image" in arrays:
            arrays["image"] = apply_work(arrays["image"], self.work)
        return arrays

"""A test format: each `.pid` file holds a record count; records carry the
decoding process's pid, to show which processes decode."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shardstream.server import Decoder, ShardMeta, register_decoder
from shardstream.server._npz import NpzDecoder
from shardstream.v1.codec import FieldSpec


@register_decoder
class PidDecoder(Decoder):
    name = "pid"
    suffixes = (".pid",)

    def index(self, path: Path) -> ShardMeta:
        schema = (
            FieldSpec(name="id", dtype="int64", shape=()),
            FieldSpec(name="pid", dtype="int64", shape=()),
        )
        return ShardMeta(records=int(path.read_text()), schema=schema)

    def read(self, path: Path, start: int, count: int) -> Mapping[str, np.ndarray[Any, Any]]:
        base = int(path.name.split(".")[0]) * 1000
        # Some CPU work, so that several chunks are in flight at once.
        x = np.ones(20_000)
        for _ in range(50):
            x = np.sqrt(x + 1.0)
        return {
            "id": np.arange(base + start, base + start + count, dtype=np.int64),
            "pid": np.full(count, os.getpid(), dtype=np.int64),
        }


class SlowNpz(NpzDecoder):
    """npz that takes a few milliseconds per read, so streams are in flight when a
    test injects a fault. Not registered here: workers load it with --decoder."""

    name = "slownpz"
    suffixes = ()

    def read(self, path: Path, start: int, count: int) -> Mapping[str, np.ndarray[Any, Any]]:
        time.sleep(0.004)  # simulated decode cost
        return super().read(path, start, count)

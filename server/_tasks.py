"""Work done in decoding processes (or threads): decode, check, serialize.

Module-level functions only, so a spawn-started process pool can run them.
Decoders are named by an importable "module:Class" reference, so a format
registered in the parent also works in spawned processes. Each process keeps
one instance per decoder (decoders cache per-shard state such as open files).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shardstream.server._decoders import DecodeError, Decoder, load_decoder
from shardstream.server._wire import encode_chunk
from shardstream.v1.codec import FieldSpec

_decoders: dict[str, Decoder] = {}


def process_init() -> None:
    """Decoding processes leave signals to the server process, which drains them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def process_ready() -> int:
    """Run once per pool process at start-up, so processes exist before serving."""
    return os.getpid()


def decoder(ref: str) -> Decoder:
    """This process's instance of a decoder."""
    found = _decoders.get(ref)
    if found is None:
        found = _decoders[ref] = load_decoder(ref)
    return found


class ShardChanged(Exception):
    """The shard file is not the one that was indexed (size or mtime differ)."""


def read_chunk(
    ref: str,
    path: Path,
    stamp: tuple[int, int],
    start: int,
    count: int,
    schema: tuple[FieldSpec, ...],
) -> bytes:
    """Decode records [start, start + count) of a shard into a serialized chunk."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ShardChanged(f"the shard cannot be opened any more: {exc.strerror}") from None
    if (st.st_size, st.st_mtime_ns) != stamp:
        raise ShardChanged(
            f"the shard changed since it was indexed (size {stamp[0]} -> {st.st_size} bytes); "
            "restart the worker to index it again"
        )
    arrays = decoder(ref).read(path, start, count)
    check_arrays(arrays, schema, start, count)
    return encode_chunk(start, arrays)


def check_arrays(
    arrays: Mapping[str, np.ndarray[Any, Any]],
    schema: tuple[FieldSpec, ...],
    start: int,
    count: int,
) -> None:
    """Refuse decoded arrays that do not match the dataset's schema."""
    names = [f.name for f in schema]
    if sorted(arrays) != sorted(names):
        raise DecodeError(
            f"decoded fields {sorted(arrays)} differ from the schema's {sorted(names)}",
            record=start,
        )
    for spec in schema:
        a = arrays[spec.name]
        if not isinstance(a, np.ndarray):
            raise DecodeError(
                f"field {spec.name!r}: decoder returned {type(a).__name__}", record=start
            )
        if a.dtype.name != spec.dtype:
            raise DecodeError(
                f"field {spec.name!r}: dtype {a.dtype.name}, schema says {spec.dtype}", record=start
            )
        if a.shape != (count, *spec.shape):
            bad = start + min(len(a), count) if a.ndim and len(a) != count else start
            raise DecodeError(
                f"field {spec.name!r}: shape {a.shape}, expected {(count, *spec.shape)}",
                record=bad,
            )

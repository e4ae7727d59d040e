"""Chunks of datasets with ragged fields, sized from their actual bytes.

A ragged record (token ids, strings, encoded images passed through) has no
fixed size, so such a read cannot be cut into chunks by `record_bytes` before
it is decoded. A decoding job decodes a range of records (sized from the
shard's average bytes per record), measures each record on the wire, and cuts
the range into chunks of about `chunk_bytes`, none over a message: a single
record that does not fit a message is a `DecodeError` naming it (DATA_LOSS
for the client). Runs in decoding processes, like `_decoding`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shardstream.server._decoding import decode_checked
from shardstream.server._files import ShardPath, Stamp
from shardstream.server._pipelines import Pipeline
from shardstream.server._wire import encode_chunk
from shardstream.server.errors import DecodeError
from shardstream.v1.codec import LENGTH_BYTES, FieldSpec, chunk_overhead
from shardstream.v1.ragged import Ragged

__all__ = ["read_ragged_chunks", "record_sizes", "sample_bytes", "split_sizes"]


def read_ragged_chunks(
    ref: str,
    path: ShardPath,
    stamp: Stamp,
    start: int,
    count: int,
    schema: tuple[FieldSpec, ...],
    shard_id: str,
    chunk_bytes: int,
    max_message_bytes: int,
    pipeline: Pipeline | None = None,
) -> list[tuple[int, bytes, int]]:
    """Records [start, start + count) as serialized chunks: (records, message, bytes of
    the records' data and lengths) each."""
    arrays = decode_checked(ref, path, stamp, start, count, schema, shard_id, pipeline)
    room = max_message_bytes - chunk_overhead(schema, len(shard_id.encode()))
    sizes = record_sizes(arrays, schema, count)
    out = []
    for a, b in split_sizes(sizes, min(chunk_bytes, room), room, start, max_message_bytes):
        part = {k: v[a:b] for k, v in arrays.items()}
        message = encode_chunk(start + a, part, shard_id, schema)
        out.append((b - a, message, int(sizes[a:b].sum())))
    return out


def sample_bytes(
    ref: str,
    path: ShardPath,
    stamp: Stamp,
    count: int,
    schema: tuple[FieldSpec, ...],
    shard_id: str,
    pipeline: Pipeline | None = None,
) -> tuple[int, int]:
    """(bytes, records) of records [0, count) of a shard in chunks (data and lengths): a
    sample that sizes a dataset's reads (`DatasetInfo.record_bytes`). Where the range
    does not decode, its records one by one, leaving out those that do not."""
    try:
        arrays = decode_checked(ref, path, stamp, 0, count, schema, shard_id, pipeline)
        return int(record_sizes(arrays, schema, count).sum()), count
    except DecodeError:
        pass
    total = records = 0
    for i in range(count):
        try:
            arrays = decode_checked(ref, path, stamp, i, 1, schema, shard_id, pipeline)
        except DecodeError:
            continue
        total += int(record_sizes(arrays, schema, 1).sum())
        records += 1
    return total, records


def record_sizes(
    arrays: Mapping[str, Any], schema: tuple[FieldSpec, ...], count: int
) -> np.ndarray[Any, np.dtype[np.int64]]:
    """Bytes each record takes in a chunk (data and lengths; headers not counted)."""
    sizes = np.full(count, sum(f.record_bytes for f in schema if not f.ragged), np.int64)
    for spec in schema:
        column = arrays[spec.name]
        if isinstance(column, Ragged):
            sizes += column.lengths * spec.item_bytes + LENGTH_BYTES
    return sizes


def split_sizes(
    sizes: np.ndarray[Any, np.dtype[np.int64]], target: int, room: int, start: int, limit: int
) -> list[tuple[int, int]]:
    """Consecutive [a, b) ranges of records of about `target` bytes each (at least one
    record), none over `room`; a record over `room` is a DecodeError naming it."""
    over = np.flatnonzero(sizes > room)
    if over.size:
        i = int(over[0])
        raise DecodeError(
            f"record {start + i} takes {int(sizes[i])} bytes, more than a message may carry "
            f"({limit} bytes with a chunk's headers): raise the workers' --max-message-bytes "
            "and the loader's max_message_bytes, or split the record",
            record=start + i,
        )
    cum = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=cum[1:])
    cuts = []
    pos = 0
    while pos < len(sizes):
        end = int(np.searchsorted(cum, cum[pos] + target, side="right")) - 1
        end = max(pos + 1, min(end, len(sizes)))
        cuts.append((pos, end))
        pos = end
    return cuts

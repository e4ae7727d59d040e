"""Work done in decoding processes (or threads): decode, check, serialize.

Module-level functions only, so a spawn-started process pool can run them.
Decoders are named by an importable "module:Class" reference, so a format
registered in the parent also works in spawned processes. Each process keeps
one instance per decoder (decoders cache per-shard state such as open files).
A dataset with transforms passes its `Pipeline`: the decoder's records then go
through the chain (`_pipelines`) and `schema` is the chain's output schema.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from shardstream._common.malloc import tune_malloc
from shardstream.server._decoders import DecodeError, Decoder, check_arrays, load_decoder
from shardstream.server._files import GONE, ShardPath, Stamp, describe_change, pinned, shard_stat
from shardstream.server._pipelines import Pipeline, run_pipeline
from shardstream.server._shm import BlockHandle, attach, slot
from shardstream.server._wire import encode_chunk, layout_chunk_into
from shardstream.server.errors import ShardChanged
from shardstream.v1.codec import FieldSpec

_decoders: dict[str, Decoder] = {}


def process_init(server: int, block: BlockHandle | None = None) -> None:
    """Set up a decoding process (`_pool.DecodingPool` runs it first).

    Decoding processes leave signals to the server process, which drains them, and
    die with it (`server`, its pid): a server killed with SIGKILL must not leave them
    behind. `block` is the server's shared memory for chunks (`_shm`), if any."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    tune_malloc()
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    # The server died before prctl took effect (also while this process was starting:
    # `server` is the pid it was spawned by, not whoever is the parent now).
    if os.getppid() != server:
        os._exit(1)
    threading.Thread(target=_exit_with_parent, args=(server,), daemon=True).start()
    if block is not None:
        attach(block)


def _exit_with_parent(parent: int) -> None:
    """Fallback where PR_SET_PDEATHSIG is missing: poll for re-parenting."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def decoder(ref: str) -> Decoder:
    """This process's instance of a decoder."""
    found = _decoders.get(ref)
    if found is None:
        found = _decoders[ref] = load_decoder(ref)
    return found


@contextlib.contextmanager
def decoder_errors(ref: str, path: ShardPath) -> Iterator[None]:
    """A decoder's unforeseen exception on these records (a RecursionError of a parser,
    a UnicodeError, a bug meeting odd data), as the DecodeError it is: the same read
    fails the same way on every worker, so it is DATA_LOSS naming the shard and records,
    not an UNKNOWN status that clients retry until their deadline. OSError and
    MemoryError stay as they are: another worker, or a later try, may not meet them."""
    try:
        yield
    except (DecodeError, ShardChanged, OSError, MemoryError):
        raise
    except Exception as exc:
        raise DecodeError(
            f"{path}: decoder {ref} raised {type(exc).__name__}: {str(exc)[:500]}"
        ) from None


def read_chunk(
    ref: str,
    path: ShardPath,
    stamp: Stamp,
    start: int,
    count: int,
    schema: tuple[FieldSpec, ...],
    shard_id: str = "",
    pipeline: Pipeline | None = None,
) -> bytes:
    """Decode records [start, start + count) of a shard into a serialized chunk."""
    arrays = decode_checked(ref, path, stamp, start, count, schema, shard_id, pipeline)
    return encode_chunk(start, arrays, shard_id)


def read_chunk_into(
    index: int,
    ref: str,
    path: ShardPath,
    stamp: Stamp,
    start: int,
    count: int,
    schema: tuple[FieldSpec, ...],
    shard_id: str = "",
    pipeline: Pipeline | None = None,
) -> int:
    """`read_chunk`, serialized into slot `index` of the shared memory (`_shm`); its size.

    The headers are written first and the decoder fills the tensors' room in place
    (`Decoder.read_into`): npz ranges go from the file straight into the buffer."""
    check_unchanged(path, stamp)
    size, views = layout_chunk_into(slot(index), start, count, schema, shard_id)
    try:
        if pipeline is None:
            with decoder_errors(ref, path), pinned(path, stamp):
                decoder(ref).read_into(path, start, count, views, schema)
        else:  # the chain writes each record's fields straight into the message
            raw = decode_checked(ref, path, stamp, start, count, pipeline.input_schema)
            run_pipeline(pipeline, raw, schema, start, count, shard_id, out=views)
    finally:
        views.clear()  # no array keeps the shared buffer exported
    return size


def decode_checked(
    ref: str,
    path: ShardPath,
    stamp: Stamp,
    start: int,
    count: int,
    schema: tuple[FieldSpec, ...],
    shard_id: str = "",
    pipeline: Pipeline | None = None,
) -> Mapping[str, Any]:
    """Records [start, start + count) of an unchanged shard, checked against the schema
    (through the pipeline, if any: its output is checked record by record)."""
    check_unchanged(path, stamp)
    with decoder_errors(ref, path), pinned(path, stamp):  # every open must find this file
        arrays = decoder(ref).read(path, start, count)
    if pipeline is None:
        check_arrays(arrays, schema, start, count)
        return arrays
    check_arrays(arrays, pipeline.input_schema, start, count)
    return run_pipeline(pipeline, arrays, schema, start, count, shard_id)


def check_unchanged(path: ShardPath, stamp: Stamp) -> None:
    """Refuse a shard that is not the one indexed (size, mtime or checksum differ). The
    read that follows pins the shard to `stamp` (`_files.pinned`): a file swapped in after
    this check is refused when it is opened."""
    try:
        now = shard_stat(path)
    except GONE as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        raise ShardChanged(f"the shard cannot be opened any more: {why}") from None
    if now != stamp:
        raise ShardChanged(describe_change(stamp, now))

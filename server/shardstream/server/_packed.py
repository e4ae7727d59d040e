"""Sequence packing: the documents of a flat token file in fixed rows (format `tokens-packed`).

The same files and `_tokens.json` as the `tokens` format (`_tokens`); the options
file must declare `eos_id` (`stride` is not used here).

Documents: a file's tokens split after every `eos_id`. A document is a run of
tokens ending with `eos_id` (included), and the tokens after the last `eos_id`, if
any, form a last document. They are numbered from 0 in file order within the shard.

Rows: the file cut into consecutive pieces of W = seq_len + 1 tokens, row r holding
tokens [r * W, (r + 1) * W). Documents are thus packed greedily in file order; one
that does not fit the rest of a row continues at the start of the next. The last
row is filled up with `eos_id` as padding. A shard of N tokens has ceil(N / W) rows
and every token of every document is in exactly one of them: nothing is dropped.
The rows are a pure function of the file, `seq_len` and `eos_id`, so every worker
(and every resumed read) computes the same ones.

Fields: `tokens` (the file's dtype, shape (W,)) and `doc_ids` (int32, shape (W,)):
the document of each token, -1 for padding. Document ids rather than positions
that restart at each document, because ids give everything a trainer needs: the
attention mask is `doc_ids[:, :, None] == doc_ids[:, None, :]` (and causal), the
boundaries for variable-length attention kernels are where the id changes, targets
that cross a document boundary are `doc_ids[:, 1:] != doc_ids[:, :-1]`, and
positions follow from them (count from where a row's id changes). Positions could
not tell that a row continues the document the previous row ended in, nor which
document a token came from.

Indexing scans the file once, in blocks of at most 8 MiB (less with a smaller
`SHARDSTREAM_READ_BUDGET_BYTES`), counting the documents begun before each row (8
bytes kept per row); a read of rows then numbers their tokens with one cumulative
sum from the first row's count. Token ids are checked against `vocab_size` as in
`tokens`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from shardstream.server._decoders import DecodeError, ShardMeta, register_decoder
from shardstream.server._files import ShardCache, ShardPath
from shardstream.server._limits import READ_BUDGET_ENV, read_budget
from shardstream.server._tokens import (
    TokenDecoder,
    TokenFile,
    TokenReader,
    check_range,
    check_vocab,
    expect,
    sidecar_stamp,
)
from shardstream.v1.codec import FieldSpec

__all__ = ["PackedTokensDecoder", "row_count"]

_SCAN_BYTES = 8 << 20  # most bytes of tokens held at once while indexing
_MAX_DOCS = 2**31 - 1  # doc_ids are int32
_MAX_INDEXED = 64  # shards whose document counts an instance keeps


def row_count(tokens: int, width: int) -> int:
    """Rows of `width` tokens that hold `tokens` tokens, the last one padded."""
    return -(-tokens // width)


def _eos(tf: TokenFile, path: ShardPath) -> int:
    eos = tf.options.eos_id
    if eos is None:
        raise DecodeError(
            f"{path}: format tokens-packed needs `eos_id` (the token that ends each "
            f"document) in {tf.sidecar}"
        )
    return eos


def _scan(path: ShardPath, tf: TokenFile, most: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """before[r]: the `eos_id` tokens in rows [0, r), for r in [0, rows]; reads rows
    `most` bytes at a time (at least one row)."""
    width, eos = tf.options.width, _eos(tf, path)
    if width * tf.dtype.itemsize > read_budget():  # before any row is allocated
        raise DecodeError(
            f"{path}: rows of {width} tokens take {width * tf.dtype.itemsize} bytes each, more "
            f"than {READ_BUDGET_ENV} ({read_budget()}) lets one read hold; give a smaller "
            f"seq_len in {tf.sidecar}"
        )
    rows = row_count(tf.tokens, width)
    before = np.zeros(rows + 1, np.int64)
    step = max(1, most // (width * tf.dtype.itemsize))
    block = np.empty(min(rows, step) * width, tf.dtype)
    last = eos
    with TokenReader(path, tf) as reader:
        for row in range(0, rows, step):
            n = min(step * width, tf.tokens - row * width)
            part = block[:n]
            if not reader.tokens_into(row * width, part):
                raise reader.truncated(row, lambda held: held // width)
            hits = part == eos
            full = n // width
            counts = np.count_nonzero(hits[: full * width].reshape(full, width), axis=1)
            before[row + 1 : row + 1 + full] = counts
            if n % width:
                before[row + 1 + full] = np.count_nonzero(hits[full * width :])
            last = int(part[-1])
    np.cumsum(before, out=before)
    docs = int(before[-1]) + (last != eos)
    if docs > _MAX_DOCS:
        raise DecodeError(
            f"{path} holds {docs} documents, more than int32 doc_ids can number ({_MAX_DOCS}); "
            "split it into smaller shards"
        )
    return before


@register_decoder
class PackedTokensDecoder(TokenDecoder):
    """Documents of flat token files packed into rows (see the module docstring)."""

    name = "tokens-packed"

    def __init__(self) -> None:
        super().__init__()
        most = min(_SCAN_BYTES, read_budget())
        self._before: ShardCache[np.ndarray[Any, np.dtype[np.int64]]] = ShardCache(
            lambda path: _scan(path, self.token_file(path), most), _MAX_INDEXED, stamp=sidecar_stamp
        )

    def index(self, path: ShardPath) -> ShardMeta:
        tf = self.token_file(path)
        _eos(tf, path)
        self._before.get(path)  # scanned once here: this process's reads start warm
        width = tf.options.width
        return ShardMeta(
            records=row_count(tf.tokens, width),
            schema=(
                FieldSpec(name="tokens", dtype=tf.dtype.name, shape=(width,)),
                FieldSpec(name="doc_ids", dtype="int32", shape=(width,)),
            ),
            params=tf.options.text(self.name),
        )

    def read(self, path: ShardPath, start: int, count: int) -> dict[str, np.ndarray[Any, Any]]:
        tf = self.token_file(path)
        shape = (max(count, 0), tf.options.width)
        out = {"tokens": np.empty(shape, tf.dtype), "doc_ids": np.empty(shape, np.int32)}
        self._rows(path, tf, start, count, out)
        return out

    def read_into(
        self,
        path: ShardPath,
        start: int,
        count: int,
        out: Mapping[str, np.ndarray[Any, Any]],
        schema: tuple[FieldSpec, ...],
    ) -> None:
        """Straight from the file into `out` (a subclass that changes `read` keeps it)."""
        if type(self).read is not PackedTokensDecoder.read:
            super().read_into(path, start, count, out, schema)
            return
        tf = self.token_file(path)
        expect(out, tf, count)
        self._rows(path, tf, start, count, out)

    def _rows(
        self,
        path: ShardPath,
        tf: TokenFile,
        start: int,
        count: int,
        out: Mapping[str, np.ndarray[Any, Any]],
    ) -> None:
        width, eos = tf.options.width, _eos(tf, path)
        before = self._before.get(path)
        check_range(path, start, count, len(before) - 1)
        tokens, ids = out["tokens"], out["doc_ids"]
        t = tokens if tokens.flags.c_contiguous else np.empty(tokens.shape, tokens.dtype)
        d = ids if ids.flags.c_contiguous else np.empty(ids.shape, np.int32)
        flat, doc = t.reshape(-1), d.reshape(-1)
        n = max(0, min(count * width, tf.tokens - start * width))  # the rest is padding
        with TokenReader(path, tf) as reader:
            if not reader.tokens_into(start * width, flat[:n]):
                raise reader.truncated(start, lambda held: held // width)
        flat[n:] = eos
        check_vocab(tf, path, t, start)
        hits = flat[:n] == eos
        np.cumsum(hits, dtype=np.int32, out=doc[:n])  # eos tokens up to and including each
        doc[:n] -= hits  # ...before each: the document it belongs to
        doc[:n] += np.int32(before[start])
        doc[n:] = -1
        if t is not tokens:
            tokens[...] = t
        if d is not ids:
            ids[...] = d

"""Token streams for language-model pretraining: flat files of token ids, cut into windows.

A shard is one flat file of token ids: raw little-endian `uint16` or `uint32`
(the nanoGPT `.bin` layout; any file name but `*.npy`), or a 1-D `.npy` array of
either dtype (its dtype from the header). `_tokens.json` beside the shards says
what the files hold and how to cut them::

    {"dtype": "uint16", "seq_len": 2048, "stride": 2048, "vocab_size": 50257, "eos_id": 50256}

    dtype       "uint16" or "uint32"; required for raw files, checked against .npy headers
    seq_len     required: a record holds seq_len + 1 tokens (input and shifted target)
    stride      tokens from one window's start to the next (default seq_len: windows
                overlap by exactly the one target token); `tokens` only
    vocab_size  optional: a token id >= vocab_size is a DecodeError naming shard and record
    eos_id      the token that ends a document; required by `tokens-packed` (`_packed`)

Format `tokens` (this module): record w is the window of tokens
[w * stride, w * stride + seq_len + 1); the last incomplete window is dropped, so a
shard of N tokens has (N - seq_len - 1) // stride + 1 records (none if N <= seq_len).
Field `tokens`, the file's dtype, shape (seq_len + 1,).

Reads are positioned reads (`os.preadv`; seek and readinto for fsspec files) of
only the bytes the records cover. A stride of seq_len + 1 reads straight into the
message being built; overlapping windows (the default stride) read their span once,
into a buffer the size of the read's records at most, and are copied from it into
the message (0.34 CPU s/GB against 0.50 for one read per window into place, which
needs a buffer descriptor per window); windows with gaps between them are read one
by one. The records' token ids are checked against `vocab_size` in one pass.

Indexing reads only a .npy header: a raw file whose size is not a whole number of
tokens, a truncated or padded .npy, a missing or malformed `_tokens.json` are
refused at start-up naming the shard. Changing `_tokens.json` needs a worker
restart, as changing the shards does: the catalog's fingerprints cover the shards'
bytes and counts, not the sidecar.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import IO, Any, cast

import numpy as np
from numpy.lib import format as npformat
from numpy.lib.stride_tricks import as_strided

from shardstream.server._decoders import DecodeError, Decoder, ShardMeta, register_decoder
from shardstream.server._files import (
    ShardCache,
    ShardPath,
    Stamp,
    check_opened,
    local_file,
    open_shard,
    shard_stat,
    sibling,
    stat_stamp,
)
from shardstream.server.errors import ShardChanged
from shardstream.v1.codec import FieldSpec

__all__ = [
    "SIDECAR",
    "TOKEN_DTYPES",
    "TokenFile",
    "TokenOptions",
    "TokenReader",
    "TokensDecoder",
    "sidecar_stamp",
    "window_count",
]

SIDECAR = "_tokens.json"
TOKEN_DTYPES = ("uint16", "uint32")
_KEYS = ("dtype", "seq_len", "stride", "vocab_size", "eos_id")
_EXAMPLE = '{"dtype": "uint16", "seq_len": 2048, "vocab_size": 50257}'
_MAX_INDEXED = 256  # shards whose layout an instance keeps
_IOV_MAX = 1024  # buffers one preadv takes (Linux's IOV_MAX)

Run = tuple[int, list[memoryview]]  # a file offset and buffers filled from it, in file order


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenOptions:
    """What `_tokens.json` declares (see the module docstring)."""

    dtype: str | None  # None: from the .npy header (raw files need it)
    seq_len: int
    stride: int
    vocab_size: int | None
    eos_id: int | None

    @property
    def width(self) -> int:
        """Tokens of one record: seq_len inputs plus the last target."""
        return self.seq_len + 1

    def text(self, fmt: str) -> str:
        """The options as canonical text: part of each shard's fingerprint (`ShardMeta.
        params`), so shards read with other options are other data."""
        return json.dumps({"format": fmt, **dataclasses.asdict(self)}, sort_keys=True)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenFile:
    """Where a shard's tokens lie, and how to cut them."""

    stamp: tuple[Stamp, Stamp | None]  # of the shard and of its sidecar
    options: TokenOptions
    sidecar: ShardPath
    dtype: np.dtype[Any]  # little-endian uint16 or uint32
    data: int  # file offset of token 0 (after a .npy header)
    tokens: int


def window_count(tokens: int, width: int, stride: int) -> int:
    """Whole windows of `width` tokens, `stride` apart, in `tokens` tokens."""
    return 0 if tokens < width else (tokens - width) // stride + 1


def sidecar_stamp(path: ShardPath) -> tuple[Stamp, Stamp | None]:
    stamp = shard_stat(path)
    try:
        return (stamp, shard_stat(sibling(path, SIDECAR)))
    except FileNotFoundError:
        return (stamp, None)


def _option(doc: dict[str, Any], key: str, file: ShardPath, low: int) -> int | None:
    value = doc.get(key)
    if value is None:
        return None
    if type(value) is not int or value < low:
        raise DecodeError(f"{file}: `{key}` must be an integer >= {low}, got {value!r}")
    return value


def load_options(path: ShardPath) -> TokenOptions:
    """The options in the `_tokens.json` beside a shard; DecodeError if missing or bad."""
    file = sibling(path, SIDECAR)
    try:
        with open_shard(file) as f:
            doc = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise DecodeError(
            f"{path}: token shards need a {SIDECAR} beside them declaring at least `seq_len` "
            f"(and `dtype` for raw files), like {_EXAMPLE}"
        ) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DecodeError(f"{file} is not valid JSON ({e}); expected e.g. {_EXAMPLE}") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"{file} must hold a JSON object, like {_EXAMPLE}")
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise DecodeError(f"{file}: unknown key(s) {unknown}; the keys are {list(_KEYS)}")
    dtype = doc.get("dtype")
    if dtype is not None and dtype not in TOKEN_DTYPES:
        raise DecodeError(f"{file}: `dtype` must be one of {list(TOKEN_DTYPES)}, got {dtype!r}")
    seq_len = _option(doc, "seq_len", file, 1)
    if seq_len is None:
        raise DecodeError(f"{file} must declare `seq_len` (tokens per record, minus one)")
    vocab, eos = _option(doc, "vocab_size", file, 1), _option(doc, "eos_id", file, 0)
    if vocab is not None and eos is not None and eos >= vocab:
        raise DecodeError(f"{file}: `eos_id` {eos} must be below `vocab_size` {vocab}")
    stride = _option(doc, "stride", file, 1)
    return TokenOptions(
        dtype=dtype, seq_len=seq_len, stride=stride or seq_len, vocab_size=vocab, eos_id=eos
    )


def _raw_layout(
    path: ShardPath, size: int, options: TokenOptions
) -> tuple[np.dtype[Any], int, int]:
    """(dtype, data offset, tokens) of a raw token file of `size` bytes."""
    if options.dtype is None:
        raise DecodeError(f"{path}: raw token files need `dtype` (uint16 or uint32) in {SIDECAR}")
    dtype = np.dtype(options.dtype).newbyteorder("<")
    if size % dtype.itemsize:
        raise DecodeError(
            f"{path} has {size} bytes, not a whole number of {dtype.name} tokens "
            f"({dtype.itemsize} bytes each): it is truncated, or its tokens are not "
            f"{dtype.name} as {SIDECAR} declares"
        )
    return dtype, 0, size // dtype.itemsize


def _npy_layout(
    path: ShardPath, size: int, options: TokenOptions
) -> tuple[np.dtype[Any], int, int]:
    """(dtype, data offset, tokens) of a 1-D .npy file of `size` bytes, its header checked
    against the file."""
    with open_shard(path) as f:
        try:
            version = npformat.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = npformat.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = npformat.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version[0]}.{version[1]} (use 1.0 or 2.0)")
        except (ValueError, EOFError) as e:
            raise DecodeError(f"{path} is not a readable .npy file: {e}") from None
        data = f.tell()
    if len(shape) != 1:
        raise DecodeError(
            f"{path}: a token .npy must be 1-D, got shape {shape}; store arr.reshape(-1)"
        )
    if dtype.name not in TOKEN_DTYPES or dtype != dtype.newbyteorder("<"):
        raise DecodeError(
            f"{path} holds {dtype.str} values; token .npy files hold little-endian uint16 or "
            "uint32 (arr.astype('<u2') or '<u4')"
        )
    if options.dtype is not None and options.dtype != dtype.name:
        raise DecodeError(
            f"{path} holds {dtype.name} tokens, but {SIDECAR} declares {options.dtype}"
        )
    tokens, held = int(shape[0]), size - data
    if held != tokens * dtype.itemsize:
        what = "is truncated:" if held < tokens * dtype.itemsize else "has bytes beyond its data:"
        raise DecodeError(
            f"{path} {what} its header declares {tokens} tokens ({tokens * dtype.itemsize} "
            f"bytes), the file holds {held} bytes of data; rewrite it"
        )
    return dtype, data, tokens


def token_file(path: ShardPath) -> TokenFile:
    """Read a shard's layout: its sidecar, a .npy header, its size (checked)."""
    stamp = sidecar_stamp(path)
    name = str(path).rsplit("/", 1)[-1]
    if name == SIDECAR:
        raise DecodeError(
            f"{path} is the options file itself: the dataset's glob matches it; "
            "match only the token files (e.g. NAME=*.bin:tokens)"
        )
    options = load_options(path)
    size = stamp[0][0]
    if name.endswith(".npy"):
        dtype, data, tokens = _npy_layout(path, size, options)
    else:
        dtype, data, tokens = _raw_layout(path, size, options)
    eos = options.eos_id
    if eos is not None and eos > np.iinfo(dtype).max:
        raise DecodeError(f"{path}: `eos_id` {eos} does not fit its {dtype.name} tokens")
    sidecar = sibling(path, SIDECAR)
    return TokenFile(
        stamp=stamp, options=options, sidecar=sidecar, dtype=dtype, data=data, tokens=tokens
    )


class TokenReader:
    """Positioned reads of one shard's tokens into caller-owned arrays (one per read)."""

    def __init__(self, path: ShardPath, tf: TokenFile) -> None:
        self.path, self.tf = path, tf
        local = local_file(path)
        self.local = local is not None
        # Local files unbuffered: every read is a positioned system call.
        self.file: IO[bytes] = (
            open(local, "rb", buffering=0) if local is not None else open_shard(path)  # noqa: SIM115
        )
        if local is not None:
            opened = stat_stamp(os.fstat(self.file.fileno()))
            try:
                check_opened(path, opened)  # the file a read is pinned to, if it is
            except ShardChanged:
                self.file.close()
                raise
            if opened != tf.stamp[0]:
                self.file.close()
                raise ShardChanged("the shard changed while it was being read; restart the worker")

    def __enter__(self) -> TokenReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.close()

    def size(self) -> int:
        return os.fstat(self.file.fileno()).st_size if self.local else shard_stat(self.path)[0]

    def tokens_into(self, first: int, out: np.ndarray[Any, Any]) -> bool:
        """Tokens [first, first + out.size) into `out`; False if the file ends first."""
        if out.size == 0:
            return True
        if not out.flags.c_contiguous:
            flat = np.empty(out.shape, out.dtype)
            done = self.tokens_into(first, flat)
            out[...] = flat
            return done
        raw = out.reshape(-1).view(np.uint8).data
        return self.runs([(self.offset(first), [raw])])

    def windows_into(self, first: int, stride: int, out: np.ndarray[Any, Any]) -> bool:
        """Windows of out.shape[1] tokens, `stride` apart from token `first`, into `out`
        (count, width); False if the file ends first. Only the windows' bytes are read."""
        count, width = out.shape
        if count <= 1 or stride == width:  # one range of the file
            return self.tokens_into(first, out)
        item = out.dtype.itemsize
        if stride < width:  # overlapping windows: their span (less than `out`), then a copy
            span = np.empty((count - 1) * stride + width, out.dtype)
            if not self.tokens_into(first, span):
                return False
            out[...] = as_strided(span, (count, width), (stride * item, item), writeable=False)
            return True
        # Gaps between the windows: one read each.
        rows = out if out.flags.c_contiguous else np.empty(out.shape, out.dtype)
        raw, row = rows.reshape(-1).view(np.uint8).data, width * item
        runs = [
            (self.offset(first + i * stride), [raw[i * row : (i + 1) * row]]) for i in range(count)
        ]
        if not self.runs(runs):
            return False
        if rows is not out:
            out[...] = rows
        return True

    def offset(self, token: int) -> int:
        return self.tf.data + token * self.tf.dtype.itemsize

    def runs(self, runs: Iterable[Run]) -> bool:
        """Fill each run's buffers from consecutive bytes at its offset; False at EOF."""
        for offset, buffers in runs:
            for i in range(0, len(buffers), _IOV_MAX):
                group = buffers[i : i + _IOV_MAX]
                if not self._group(offset, group):
                    return False
                offset += sum(b.nbytes for b in group)
        return True

    def _group(self, offset: int, group: list[memoryview]) -> bool:
        fd = self.file.fileno() if self.local else -1
        if self.local:
            done = os.preadv(fd, group, offset)
        else:
            done = 0
            self.file.seek(offset)
        pos, skip = offset + done, done
        for buffer in group:  # what a short preadv left (rare), or all of an fsspec read
            if skip >= buffer.nbytes:
                skip -= buffer.nbytes
                continue
            view, skip = buffer[skip:], 0
            while view.nbytes:
                n = os.preadv(fd, [view], pos) if self.local else self._readinto(view)
                if not n:
                    return False
                view, pos = view[n:], pos + n
        return True

    def _readinto(self, view: memoryview) -> int:
        n: int | None = cast(Any, self.file).readinto(view)  # an fsspec file
        return n or 0

    def truncated(self, start: int, complete: Callable[[int], int]) -> DecodeError:
        """The error for a file that ended early; `complete(tokens)` is the number of
        records that many tokens complete."""
        size = self.size()
        held = max(0, (size - self.tf.data) // self.tf.dtype.itemsize)
        record = max(start, complete(held))
        return DecodeError(
            f"{self.path} is truncated: it holds {held} tokens ({size} bytes) now, so record "
            f"{record} is cut; did the shard change since it was indexed?",
            record=record,
        )


def check_range(path: ShardPath, start: int, count: int, records: int) -> None:
    if start < 0 or count < 0:
        raise ValueError(f"`start` and `count` must be non-negative, got {start} and {count}")
    if start + count > records:
        raise DecodeError(
            f"{path} has {records} records, cannot read [{start}, {start + count}); did the "
            f"shard or its {SIDECAR} change since it was indexed?",
            record=max(start, records),
        )


def check_vocab(tf: TokenFile, path: ShardPath, tokens: np.ndarray[Any, Any], start: int) -> None:
    """A token id >= the declared vocab_size is a DecodeError naming the record."""
    vocab = tf.options.vocab_size
    if vocab is None or tokens.size == 0 or vocab > int(np.iinfo(tf.dtype).max):
        return
    if int(tokens.max()) < vocab:
        return
    bad = tokens >= vocab
    row = int(np.argmax(bad.any(axis=1)))
    col = int(np.argmax(bad[row]))
    raise DecodeError(
        f"{path}: record {start + row}: token id {int(tokens[row, col])} at position {col} is "
        f"not below vocab_size {vocab} declared in {tf.sidecar}; the file holds other tokens "
        "than declared, or vocab_size is wrong",
        record=start + row,
    )


def expect(out: Mapping[str, np.ndarray[Any, Any]], tf: TokenFile, count: int) -> None:
    """Refuse arrays shaped for other options: `_tokens.json` changed since indexing."""
    tokens = out["tokens"]
    if tokens.shape != (count, tf.options.width) or tokens.dtype != tf.dtype:
        raise ShardChanged(
            f"{tf.sidecar} changed since the shard was indexed (records of {tokens.shape[1:]} "
            f"{tokens.dtype.name} expected, it now says {(tf.options.width,)} {tf.dtype.name}); "
            "restart the worker"
        )


class TokenDecoder(Decoder):
    """Base of the token formats: the per-shard layout cache."""

    def __init__(self) -> None:
        self._files: ShardCache[TokenFile] = ShardCache(
            token_file, _MAX_INDEXED, stamp=sidecar_stamp
        )

    def token_file(self, path: ShardPath) -> TokenFile:
        return self._files.get(path)


@register_decoder
class TokensDecoder(TokenDecoder):
    """Fixed windows of seq_len + 1 tokens from flat token files (see the module docstring)."""

    name = "tokens"

    def index(self, path: ShardPath) -> ShardMeta:
        tf = self.token_file(path)
        o = tf.options
        return ShardMeta(
            records=window_count(tf.tokens, o.width, o.stride),
            schema=(FieldSpec(name="tokens", dtype=tf.dtype.name, shape=(o.width,)),),
            params=o.text(self.name),
        )

    def read(self, path: ShardPath, start: int, count: int) -> dict[str, np.ndarray[Any, Any]]:
        tf = self.token_file(path)
        out = {"tokens": np.empty((max(count, 0), tf.options.width), tf.dtype)}
        self._windows(path, tf, start, count, out)
        return out

    def read_into(
        self,
        path: ShardPath,
        start: int,
        count: int,
        out: Mapping[str, np.ndarray[Any, Any]],
        schema: tuple[FieldSpec, ...],
    ) -> None:
        """Straight from the file into `out`. A subclass that changes `read` (e.g. adds a
        transform) keeps its own semantics: it is always used then."""
        if type(self).read is not TokensDecoder.read:
            super().read_into(path, start, count, out, schema)
            return
        tf = self.token_file(path)
        expect(out, tf, count)
        self._windows(path, tf, start, count, out)

    def _windows(
        self,
        path: ShardPath,
        tf: TokenFile,
        start: int,
        count: int,
        out: Mapping[str, np.ndarray[Any, Any]],
    ) -> None:
        o = tf.options
        check_range(path, start, count, window_count(tf.tokens, o.width, o.stride))
        tokens = out["tokens"]
        with TokenReader(path, tf) as reader:
            if not reader.windows_into(start * o.stride, o.stride, tokens):
                raise reader.truncated(start, lambda held: window_count(held, o.width, o.stride))
        check_vocab(tf, path, tokens, start)

"""Token streams (`tokens`) and sequence packing (`tokens-packed`): flat token files,
windows and packed rows, through real workers and loaders."""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.client.errors import DataLossError
from shardstream.server import DatasetSpec
from shardstream.server._catalog import CatalogError
from shardstream.server._decoders import DecodeError, decoder_class, decoder_ref
from shardstream.server._packed import PackedTokensDecoder
from shardstream.server._synth import make_token_files
from shardstream.server._tokens import (
    SIDECAR,
    TokenReader,
    TokensDecoder,
    sidecar_stamp,
    window_count,
)
from shardstream.server.errors import ShardChanged

from conftest import collect_epoch, running_workers

SEQ = 31  # records of 32 tokens
EOS = 0


def file_tokens(path: Path) -> np.ndarray[Any, Any]:
    if path.suffix == ".npy":
        return np.load(path)
    dtype = json.loads((path.parent / SIDECAR).read_text())["dtype"]
    return np.fromfile(path, dtype=np.dtype(dtype).newbyteorder("<"))


def windows_of(path: Path, seq_len: int = SEQ, stride: int = SEQ) -> list[bytes]:
    t = file_tokens(path)
    n = window_count(len(t), seq_len + 1, stride)
    return [t[w * stride : w * stride + seq_len + 1].tobytes() for w in range(n)]


def packed_rows(path: Path, seq_len: int = SEQ) -> tuple[np.ndarray[Any, Any], ...]:
    """The rows and doc ids the packing rule defines, computed here from the file."""
    t = file_tokens(path)
    width = seq_len + 1
    rows = -(-len(t) // width)
    tokens = np.full(rows * width, EOS, t.dtype)
    tokens[: len(t)] = t
    ids = np.full(rows * width, -1, np.int32)
    ids[: len(t)] = np.concatenate([[0], np.cumsum(t == EOS)[:-1]])
    return tokens.reshape(rows, width), ids.reshape(rows, width)


def rows_of(batches: list[dict[str, np.ndarray[Any, Any]]], field: str = "tokens") -> list[bytes]:
    return [row.tobytes() for b in batches for row in b[field]]


# --- configuration -----------------------------------------------------------------------


def test_formats_are_named_on_the_dataset_flag() -> None:
    spec = DatasetSpec.parse("lm=train/*.bin:tokens")
    assert (spec.pattern, spec.format) == ("train/*.bin", "tokens")
    assert DatasetSpec.parse("docs=*.npy:tokens-packed").format == "tokens-packed"
    assert decoder_class("tokens") is TokensDecoder
    assert decoder_class("tokens-packed") is PackedTokensDecoder
    assert decoder_ref("tokens") == "shardstream.server._tokens:TokensDecoder"


@pytest.mark.parametrize(
    ("sidecar", "error"),
    [
        (None, "need a _tokens.json beside them"),
        ("{", "is not valid JSON"),
        ({"dtype": "uint16"}, "must declare `seq_len`"),
        ({"seq_len": 8}, "raw token files need `dtype`"),
        ({"dtype": "int64", "seq_len": 8}, "`dtype` must be one of"),
        ({"dtype": "uint16", "seq_len": 0}, "`seq_len` must be an integer >= 1, got 0"),
        ({"dtype": "uint16", "seq_len": True}, "`seq_len` must be an integer >= 1, got True"),
        ({"dtype": "uint16", "seq_len": 8, "strde": 8}, r"unknown key\(s\) \['strde'\]"),
        ({"dtype": "uint16", "seq_len": 8, "vocab_size": 9, "eos_id": 9}, "below `vocab_size`"),
        ({"dtype": "uint16", "seq_len": 8, "eos_id": 70000}, "does not fit its uint16"),
    ],
)
def test_bad_options_are_refused_naming_the_file(
    tmp_path: Path, sidecar: object, error: str
) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(bytes(64))
    if sidecar is not None:
        text = sidecar if isinstance(sidecar, str) else json.dumps(sidecar)
        (tmp_path / SIDECAR).write_text(text)
    with pytest.raises(DecodeError, match=error):
        TokensDecoder().index(path)


@pytest.mark.parametrize("seq_len", [2**25, 2**33, 2**62, 2**64])
def test_packed_rows_over_the_read_budget_are_refused_before_any_is_allocated(
    tmp_path: Path, seq_len: int
) -> None:
    """Before: seq_len 2**33 reserved 16 GiB while indexing; 2**62 and 2**64 ended in
    numpy's "array is too big" or "Maximum allowed dimension exceeded", naming no shard."""
    path = tmp_path / "a.bin"
    path.write_bytes(bytes(64))
    (tmp_path / SIDECAR).write_text(
        json.dumps({"dtype": "uint16", "seq_len": seq_len, "eos_id": 0})
    )
    with pytest.raises(DecodeError, match=r"a\.bin: rows of \d+ tokens take \d+ bytes each, "
                       r"more than SHARDSTREAM_READ_BUDGET_BYTES"):  # fmt: skip
        PackedTokensDecoder().index(path)


def test_npy_headers_are_checked(tmp_path: Path) -> None:
    (tmp_path / SIDECAR).write_text(json.dumps({"seq_len": 4}))
    decoder = TokensDecoder()
    np.save(tmp_path / "ok.npy", np.arange(20, dtype="<u4"))
    meta = decoder.index(tmp_path / "ok.npy")
    assert meta.records == 4 and str(meta.schema[0]) == "tokens:uint32[5]"
    for name, array, error in [
        ("2d.npy", np.zeros((2, 5), "<u2"), r"must be 1-D, got shape \(2, 5\)"),
        ("big.npy", np.zeros(5, ">u2"), "holds >u2 values"),
        ("i64.npy", np.zeros(5, np.int64), "holds <i8 values"),
    ]:
        np.save(tmp_path / name, array)
        with pytest.raises(DecodeError, match=error):
            decoder.index(tmp_path / name)
    cut = tmp_path / "cut.npy"
    cut.write_bytes((tmp_path / "ok.npy").read_bytes()[:-6])
    with pytest.raises(DecodeError, match=r"cut.npy is truncated: its header declares 20 tokens"):
        decoder.index(cut)
    (tmp_path / SIDECAR).write_text(json.dumps({"seq_len": 4, "dtype": "uint16"}))
    with pytest.raises(
        DecodeError, match=r"holds uint32 tokens, but _tokens\.json declares uint16"
    ):
        decoder.index(tmp_path / "ok.npy")


# --- windows -----------------------------------------------------------------------------


@pytest.mark.parametrize("stride", [SEQ, SEQ + 1, 2 * SEQ + 5, 20, SEQ // 2, 3, 1])
def test_windows_equal_the_file_slices_and_read_only_their_bytes(
    tmp_path: Path, stride: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    (path,) = make_token_files(tmp_path, shards=1, tokens=3_001, seq_len=SEQ, vocab_size=1000)
    options = json.loads((tmp_path / SIDECAR).read_text())
    (tmp_path / SIDECAR).write_text(json.dumps({**options, "stride": stride}))
    want = windows_of(path, stride=stride)
    decoder = TokensDecoder()
    meta = decoder.index(path)
    assert meta.records == len(want) == (3_001 - SEQ - 1) // stride + 1
    read: list[tuple[int, int]] = []
    real = os.preadv

    def spy(fd: int, buffers: list[memoryview], offset: int) -> int:
        read.append((offset, sum(b.nbytes for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", spy)
    n = meta.records
    for start, count in [(0, n), (3, 5), (n - 1, 1), (n - 7, 7), (4, 0)]:
        read.clear()
        got = decoder.read(path, start, count)["tokens"]
        assert got.dtype == np.dtype("<u2") and got.shape == (count, SEQ + 1)
        assert [row.tobytes() for row in got] == want[start : start + count]
        out = np.empty_like(got)
        decoder.read_into(path, start, count, {"tokens": out}, meta.schema)
        assert np.array_equal(out, got)
        covered = {
            t for w in range(start, start + count) for t in range(w * stride, w * stride + 32)
        }
        read_tokens = [t for offset, size in read for t in range(offset // 2, (offset + size) // 2)]
        assert set(read_tokens) == covered  # every byte needed, nothing else...
        assert len(read_tokens) == 2 * len(covered)  # ...each once (read and read_into)


@pytest.mark.parametrize("suffix", [".bin", ".npy"])
async def test_a_whole_epoch_through_a_worker_gives_every_window_once(
    tmp_path: Path, suffix: str
) -> None:
    dtype = "uint16" if suffix == ".bin" else "uint32"
    paths = make_token_files(
        tmp_path, shards=3, tokens=9_000, seq_len=SEQ, dtype=dtype, suffix=suffix, seed=4
    )
    make_token_files(
        tmp_path / "tiny", shards=1, tokens=SEQ, seq_len=SEQ, dtype=dtype, suffix=suffix
    )
    tiny = tmp_path / f"tokens-00003{suffix}"  # too short for a window: a shard of none
    os.replace(tmp_path / "tiny" / f"tokens-00000{suffix}", tiny)
    want = Counter(w for p in paths for w in windows_of(p))
    assert not windows_of(tiny) and len(want) == sum(len(windows_of(p)) for p in paths)
    dataset = f"lm=*{suffix}:tokens"
    async with running_workers(tmp_path, 2, datasets=(dataset,), processes=1) as workers:
        addresses = [w.address for w in workers]
        async with Loader(addresses, dataset="lm", batch_size=8, shuffle=True, seed=5) as loader:
            batches = await collect_epoch(loader, 0)
    assert all(b["tokens"].dtype == np.dtype(dtype) for b in batches)
    assert Counter(rows_of(batches)) == want


async def test_two_ranks_split_the_windows_exactly_once(tmp_path: Path) -> None:
    paths = make_token_files(tmp_path, shards=4, tokens=8_003, seq_len=SEQ, seed=1)
    want = Counter(w for p in paths for w in windows_of(p))
    got: Counter[bytes] = Counter()
    async with running_workers(tmp_path, 2, datasets=("lm=*.bin:tokens",)) as workers:
        counts = []
        for rank in (0, 1):
            async with Loader(
                [w.address for w in workers], dataset="lm", batch_size=5, shuffle=True,
                shuffle_window=16, seed=9, rank=rank, world_size=2,
            ) as loader:  # fmt: skip
                batches = await collect_epoch(loader, 3)
            counts.append(len(batches))
            got.update(rows_of(batches))
    total = sum(want.values())
    assert counts[0] == counts[1]  # equal steps
    assert max(got.values()) == 1 and not got - want  # nothing twice, nothing made up
    assert sum(got.values()) == total - total % 2  # the documented `drop` remainder only


async def test_token_beyond_the_vocabulary_is_data_loss_naming_shard_and_record(
    tmp_path: Path,
) -> None:
    paths = make_token_files(tmp_path, shards=2, tokens=4_000, seq_len=SEQ, vocab_size=1000)
    bad = paths[1]
    t = file_tokens(bad)
    t[10 * SEQ + 5] = 1000  # in window 10 only
    bad.write_bytes(t.tobytes())
    async with running_workers(tmp_path, 1, datasets=("lm=*.bin:tokens",)) as (worker,):
        async with Loader([worker.address], dataset="lm", batch_size=4) as loader:
            with pytest.raises(DataLossError) as info:
                await collect_epoch(loader, 0)
    assert (info.value.shard, info.value.record) == ("tokens-00001.bin", 10)
    assert "token id 1000 at position 5 is not below vocab_size 1000" in str(info.value)


async def test_a_truncated_bin_is_refused_at_start_up(tmp_path: Path) -> None:
    paths = make_token_files(tmp_path, shards=2, tokens=1_000, seq_len=SEQ)
    with paths[1].open("ab") as f:
        f.write(b"\x07")  # half a uint16 token
    with pytest.raises(CatalogError, match=r"tokens-00001.bin has 1001 bytes, not a whole number"):
        async with running_workers(tmp_path, 1, datasets=("lm=*.bin:tokens",)):
            pass


async def test_a_glob_that_matches_the_options_file_is_refused(tmp_path: Path) -> None:
    make_token_files(tmp_path, shards=1, tokens=1_000, seq_len=SEQ)
    with pytest.raises(CatalogError, match="is the options file itself"):
        async with running_workers(tmp_path, 1, datasets=("lm=*:tokens",)):
            pass


def test_a_file_cut_after_indexing_is_changed_or_names_the_cut_record(tmp_path: Path) -> None:
    (path,) = make_token_files(tmp_path, shards=1, tokens=1_000, seq_len=SEQ)
    decoder = TokensDecoder()
    decoder.index(path)
    tf = decoder.token_file(path)
    (tmp_path / "copy").write_bytes(path.read_bytes()[: 2 * 500])
    os.replace(tmp_path / "copy", path)
    with pytest.raises(ShardChanged, match="changed while it was being read"):
        TokenReader(path, tf)
    stale = dataclasses.replace(tf, stamp=sidecar_stamp(path))  # the old layout, the cut file
    with TokenReader(path, stale) as reader:
        out = np.empty((10, SEQ + 1), np.uint16)
        assert not reader.windows_into(14 * SEQ, SEQ, out)
        error = reader.truncated(14, lambda held: window_count(held, SEQ + 1, SEQ))
    assert error.record == 16 and "holds 500 tokens (1000 bytes) now, so record 16 is cut" in str(
        error
    )


def test_url_shards_are_read_through_fsspec(tmp_path: Path) -> None:
    fsspec = pytest.importorskip("fsspec", reason="URL data roots need fsspec")
    (path,) = make_token_files(tmp_path, shards=1, tokens=2_000, seq_len=SEQ)
    fs = fsspec.filesystem("memory")
    fs.pipe("/shardstream-tokens/a.bin", path.read_bytes())
    fs.pipe(f"/shardstream-tokens/{SIDECAR}", (tmp_path / SIDECAR).read_bytes())
    try:
        url = "memory:///shardstream-tokens/a.bin"
        decoder = TokensDecoder()
        assert decoder.index(url).records == len(windows_of(path))
        got = decoder.read(url, 7, 9)["tokens"]
        assert [row.tobytes() for row in got] == windows_of(path)[7:16]
    finally:
        fs.rm("/shardstream-tokens", recursive=True)


# --- packing -----------------------------------------------------------------------------


@pytest.fixture
def docs(tmp_path: Path) -> Iterator[list[Path]]:
    yield make_token_files(
        tmp_path, shards=2, tokens=6_400, seq_len=SEQ, vocab_size=500, eos_id=EOS,
        mean_doc_tokens=23, seed=2,
    )  # fmt: skip


def test_packed_rows_follow_the_rule(docs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from shardstream.server import _packed

    monkeypatch.setattr(_packed, "_SCAN_BYTES", 7 * 64)  # index in many blocks
    path = docs[0]
    (path.parent / "odd.bin").write_bytes(path.read_bytes()[:-14])  # a padded last row
    for p in (path, path.parent / "odd.bin"):
        tokens, ids = packed_rows(p)
        decoder = PackedTokensDecoder()
        meta = decoder.index(p)
        assert meta.records == len(tokens) == -(-len(file_tokens(p)) // (SEQ + 1))
        assert [str(f) for f in meta.schema] == ["tokens:uint16[32]", "doc_ids:int32[32]"]
        for start, count in [(0, meta.records), (5, 9), (meta.records - 1, 1), (3, 0)]:
            got = decoder.read(p, start, count)
            assert np.array_equal(got["tokens"], tokens[start : start + count])
            assert np.array_equal(got["doc_ids"], ids[start : start + count])
            out = {k: np.empty_like(v) for k, v in got.items()}
            decoder.read_into(p, start, count, out, meta.schema)
            assert all(np.array_equal(out[k], got[k]) for k in got)
    assert (ids[-1] == -1).sum() == 7 and (tokens[-1][ids[-1] == -1] == EOS).all()


async def test_packed_documents_arrive_exactly_once_across_two_ranks(docs: list[Path]) -> None:
    root = docs[0].parent
    expected = [packed_rows(p) for p in docs]
    assert sum(len(t) for t, _ in expected) % 2 == 0  # no `drop` remainder
    ranks = []
    async with running_workers(root, 2, datasets=("docs=*.bin:tokens-packed",)) as workers:
        for rank in (0, 1):
            async with Loader(
                [w.address for w in workers], dataset="docs", batch_size=6, rank=rank,
                world_size=2,
            ) as loader:  # fmt: skip
                ranks.append(await collect_epoch(loader, 0))
    # Unshuffled, rank 0 holds the first half of the shards' rows and rank 1 the rest:
    # put together, each shard's rows must give back its file, every document once.
    tokens = np.concatenate([b["tokens"] for batches in ranks for b in batches])
    ids = np.concatenate([b["doc_ids"] for batches in ranks for b in batches])
    assert ids.dtype == np.int32 and tokens.dtype == np.uint16
    at = 0
    for path, (want_tokens, want_ids) in zip(docs, expected, strict=True):
        rows = slice(at, at + len(want_tokens))
        at += len(want_tokens)
        flat, doc = tokens[rows].reshape(-1), ids[rows].reshape(-1)
        assert np.array_equal(flat, want_tokens.reshape(-1))
        assert np.array_equal(doc, want_ids.reshape(-1))
        real = doc >= 0
        assert np.array_equal(flat[real], file_tokens(path))  # every token once, in order
        assert (np.diff(doc[real]) >= 0).all() and doc[real][0] == 0  # documents from 0
        ends = np.flatnonzero(np.diff(doc[real]))  # a new document starts after an EOS...
        assert (flat[real][ends] == EOS).all()
        n_docs = int(doc.max()) + 1
        assert n_docs == (file_tokens(path) == EOS).sum() + (file_tokens(path)[-1] != EOS)
        lengths = np.bincount(doc[real])  # ...and every document is whole: all its tokens
        starts = np.concatenate([[0], np.flatnonzero(file_tokens(path) == EOS) + 1])[:n_docs]
        assert np.array_equal(np.cumsum(lengths)[:-1], starts[1:])
    assert at == len(tokens)


async def test_packed_needs_an_eos_id(tmp_path: Path) -> None:
    make_token_files(tmp_path, shards=1, tokens=500, seq_len=SEQ)
    with pytest.raises(CatalogError, match="tokens-packed needs `eos_id`"):
        async with running_workers(tmp_path, 1, datasets=("docs=*.bin:tokens-packed",)):
            pass


@pytest.mark.parametrize("fmt", ["tokens-packed", "tokens"])
async def test_other_token_options_are_other_data(tmp_path: Path, fmt: str) -> None:
    """Byte-identical token files read with another `_tokens.json` are other records:
    their fingerprints differ, so a fleet mixing the two refuses to start, and a manifest
    of one refuses the other. Was: one fingerprint for both, and an epoch took half its
    rows from each (another eos_id; for `tokens`, which ignores eos_id, the options'
    text differs all the same: another stride can keep the counts)."""
    from shardstream.client.errors import DatasetMismatchError

    change = {"eos_id": 7}
    roots = [tmp_path / "a", tmp_path / "b"]
    for root in roots:
        make_token_files(root, shards=2, tokens=4_000, seq_len=8, vocab_size=1000, eos_id=999)
        doc = json.loads((root / "_tokens.json").read_text())
        (root / "_tokens.json").write_text(json.dumps({**doc, "stride": 8}))
    doc = json.loads((roots[1] / "_tokens.json").read_text())
    (roots[1] / "_tokens.json").write_text(json.dumps({**doc, **change}))
    assert [p.read_bytes() for p in sorted(roots[0].glob("*.bin"))] == [
        p.read_bytes() for p in sorted(roots[1].glob("*.bin"))
    ]
    datasets = (f"t=*.bin:{fmt}",)
    async with (
        running_workers(roots[0], 1, datasets=datasets) as (a,),
        running_workers(roots[1], 1, datasets=datasets) as (b,),
    ):
        ds_a, ds_b = (w._servicer.catalog.datasets["t"] for w in (a, b))  # type: ignore[union-attr]
        assert [s.records for s in ds_a.shards] == [s.records for s in ds_b.shards]
        assert ds_a.fingerprint != ds_b.fingerprint
        with pytest.raises(DatasetMismatchError):
            async with Loader([a.address, b.address], dataset="t", batch_size=4):
                pass

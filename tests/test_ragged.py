"""Ragged fields, strings and bytes: parquet, wds extra members and jsonl, end to end."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader, SyncLoader
from shardstream.client._chunkparse import parse_chunk
from shardstream.client._ragged import format_batch
from shardstream.client._wire import Piece, check_piece, decode_response
from shardstream.client.errors import DataLossError, ProtocolError, StateMismatchError
from shardstream.server import _decoding
from shardstream.server._catalog import CatalogError
from shardstream.server._ragged import split_sizes
from shardstream.server._wire import encode_chunk
from shardstream.server.errors import DecodeError
from shardstream.v1 import shardstream_pb2 as pb
from shardstream.v1.codec import FieldSpec
from shardstream.v1.ragged import Ragged, concat

from conftest import running_workers
from liar import RAGGED_LIES, lying_worker

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

SHARDS, PER_SHARD = 3, 70
N = SHARDS * PER_SHARD


def source(i: int) -> dict[str, Any]:
    """Record i of the test datasets (the same in every format)."""
    rng = np.random.default_rng(i)
    n = int(rng.integers(0, 9))  # some records are empty
    return {
        "id": i,
        "tokens": rng.integers(-1000, 1000, n).astype(np.int32),
        "boxes": rng.random((int(rng.integers(0, 4)), 4)).astype(np.float32),
        "caption": f"record {i} é" + "x" * (i % 5),
        "blob": bytes(rng.integers(0, 256, i % 7, dtype=np.uint8)),
    }


def write_parquet(root: Path, *, extra_timestamp: bool = True) -> Path:
    for s in range(SHARDS):
        rows = [source(s * PER_SHARD + j) for j in range(PER_SHARD)]
        columns: dict[str, Any] = {
            "id": pa.array([r["id"] for r in rows], pa.int64()),
            "tokens": pa.array([r["tokens"].tolist() for r in rows], pa.list_(pa.int32())),
            "boxes": pa.array(
                [r["boxes"].tolist() for r in rows], pa.list_(pa.list_(pa.float32(), 4))
            ),
            "caption": pa.array([r["caption"] for r in rows], pa.string()),
            "blob": pa.array([r["blob"] for r in rows], pa.binary()),
        }
        if extra_timestamp:
            columns["when"] = pa.array(list(range(PER_SHARD)), pa.timestamp("ms"))
        pq.write_table(pa.table(columns), root / f"part-{s}.parquet", row_group_size=25)
    return root


def by_id(batches: Sequence[dict[str, Any]], mode: str) -> dict[int, dict[str, Any]]:
    """Each delivered record's values, by id (refusing a duplicate)."""
    out: dict[int, dict[str, Any]] = {}
    for batch in batches:
        for row, i in enumerate(batch["id"].tolist()):
            assert i not in out, f"record {i} delivered twice"
            rec: dict[str, Any] = {}
            for name in ("tokens", "boxes", "caption", "blob"):
                if name not in batch:
                    continue
                if mode == "flat":
                    o = batch[f"{name}_offsets"]
                    value = batch[name][o[row] : o[row + 1]]
                    if name == "caption":
                        value = value.tobytes().decode()
                    elif name == "blob":
                        value = value.tobytes()
                    rec[name] = value
                elif name in ("caption", "blob"):
                    rec[name] = batch[name][row]
                else:
                    rec[name] = batch[name][row][: batch[f"{name}_lengths"][row]]
            out[i] = rec
    return out


def assert_matches(got: dict[int, dict[str, Any]], ids: Sequence[int]) -> None:
    assert sorted(got) == sorted(ids)
    for i in ids:
        want = source(i)
        for name, value in got[i].items():
            if isinstance(value, np.ndarray):
                assert np.array_equal(value, want[name]), (i, name)
                assert value.dtype == want[name].dtype
            else:
                assert value == want[name], (i, name)


def check_pad_shapes(batch: dict[str, Any]) -> None:
    b = len(batch["id"])
    assert batch["tokens"].shape == (b, int(batch["tokens_lengths"].max(initial=0)))
    assert batch["boxes"].shape[::2] == (b, 4)
    assert isinstance(batch["caption"], list) and isinstance(batch["caption"][0], str)
    assert isinstance(batch["blob"], list) and all(isinstance(x, bytes) for x in batch["blob"])


# -- the wire ---------------------------------------------------------------------------

SCHEMA = (
    FieldSpec("id", "int64", ()),
    FieldSpec("tokens", "int32", (-1,)),
    FieldSpec("boxes", "float32", (-1, 4)),
    FieldSpec("caption", "string", ()),
    FieldSpec("blob", "bytes", ()),
)


def arrays_of(ids: Sequence[int]) -> dict[str, Any]:
    rows = [source(i) for i in ids]
    return {
        "id": np.array(ids, np.int64),
        "tokens": Ragged.from_items([r["tokens"] for r in rows], "int32"),
        "boxes": Ragged.from_items([r["boxes"] for r in rows], "float32", (4,)),
        "caption": Ragged.from_bytes([r["caption"].encode() for r in rows]),
        "blob": Ragged.from_bytes([r["blob"] for r in rows]),
    }


def test_ragged_chunk_round_trip() -> None:
    ids = list(range(5, 17))
    data = encode_chunk(5, arrays_of(ids), "s.parquet", SCHEMA)
    piece = decode_response(data)
    assert isinstance(piece, Piece) and (piece.start, piece.count) == (5, 12)
    check_piece(piece, SCHEMA, "s.parquet")
    assert isinstance(piece.arrays["tokens"], Ragged)
    # the values and the lengths are views of the message: no copy
    assert piece.arrays["tokens"].values.base is not None
    msg = pb.ReadResponse.FromString(data)  # ordinary protobuf for any other language
    tensor = {t.name: t for t in msg.chunk.tensors}
    assert tensor["caption"].dtype == pb.DTYPE_STRING and len(tensor["caption"].lengths) == 12
    assert list(tensor["tokens"].lengths) == [len(source(i)["tokens"]) for i in ids]
    assert list(tensor["boxes"].shape)[1:] == [4]
    for mode in ("pad", "flat"):
        batch = format_batch(dict(piece.arrays), SCHEMA, mode, None)  # type: ignore[arg-type]
        assert_matches(by_id([batch], mode), ids)
    padded = format_batch(dict(piece.arrays), SCHEMA, "pad", 3)
    assert padded["tokens"].shape == (12, 3)
    for row, i in enumerate(ids):
        want = source(i)["tokens"][:3]
        assert padded["tokens_lengths"][row] == len(want)
        assert np.array_equal(padded["tokens"][row][: len(want)], want)
        assert not padded["tokens"][row][len(want) :].any()


def test_ragged_values_cut_shuffle_and_join() -> None:
    r = Ragged.from_items([[1, 2], [], [3], [4, 5, 6]], "int64")
    assert r[1:3].lengths.tolist() == [0, 1] and r[1:3].values.tolist() == [3]
    taken = r[np.array([3, 0, 1])]
    assert taken.lengths.tolist() == [3, 2, 0] and taken.values.tolist() == [4, 5, 6, 1, 2]
    joined = concat([r[:2], r[2:]])
    assert joined.offsets.tolist() == r.offsets.tolist()


def _chunk(tensors: list[pb.Tensor], count: int = 2) -> bytes:
    chunk = pb.Chunk(start=0, count=count, tensors=tensors, shard="s")
    return pb.ReadResponse(chunk=chunk).SerializeToString()


@pytest.mark.parametrize(
    ("lengths", "shape", "why"),
    [
        ([2, -1], [1], "negative length"),
        ([1, 1], [3], "add up to 2"),
        ([1, 1, 1], [3], "lengths for 3 records"),
        # lengths whose int64 sum wraps around to the values' count
        ([1 << 62] * 4, [0], "more than the 0 values"),
        ([5, (1 << 63) - 1, (1 << 63) - 1, 2], [5], "more than the 5 values"),
    ],
)
def test_client_refuses_inconsistent_lengths(
    lengths: list[int], shape: list[int], why: str
) -> None:
    data = np.arange(shape[0], dtype="<i4").tobytes()
    tensor = pb.Tensor(name="tokens", dtype=pb.DTYPE_INT32, shape=shape, data=data, lengths=lengths)
    with pytest.raises(ProtocolError, match=why):
        decode_response(_chunk([tensor]))


def test_client_refuses_ragged_where_fixed_and_bad_text() -> None:
    fixed = (FieldSpec("tokens", "int32", (2,)),)
    ragged = (FieldSpec("tokens", "int32", (-1,)),)
    as_ragged = pb.Tensor(
        name="tokens", dtype=pb.DTYPE_INT32, shape=[4], data=bytes(16), lengths=[2, 2]
    )
    piece = decode_response(_chunk([as_ragged]))
    assert isinstance(piece, Piece)
    with pytest.raises(ProtocolError, match="ragged"):
        check_piece(piece, fixed, "s")
    as_fixed = pb.Tensor(name="tokens", dtype=pb.DTYPE_INT32, shape=[2, 2], data=bytes(16))
    piece = decode_response(_chunk([as_fixed]))
    assert isinstance(piece, Piece)
    with pytest.raises(ProtocolError, match="no lengths"):
        check_piece(piece, ragged, "s")
    text = (FieldSpec("caption", "string", ()),)
    bad = pb.Tensor(
        name="caption", dtype=pb.DTYPE_STRING, shape=[2], data=b"\xff\xfe", lengths=[1, 1]
    )
    piece = decode_response(_chunk([bad]))
    assert isinstance(piece, Piece)
    with pytest.raises(ProtocolError, match="UTF-8"):
        check_piece(piece, text, "s")
    # valid UTF-8 as a whole, but record 1 starts inside record 0's "é"
    split = pb.Tensor(
        name="caption", dtype=pb.DTYPE_STRING, shape=[3], data="aé".encode(), lengths=[2, 1]
    )
    piece = decode_response(_chunk([split]))
    assert isinstance(piece, Piece)
    with pytest.raises(ProtocolError, match="record 1 of the chunk starts inside a UTF-8"):
        check_piece(piece, text, "s")
    whole = pb.Tensor(
        name="caption", dtype=pb.DTYPE_STRING, shape=[3], data="aé".encode(), lengths=[1, 2]
    )
    piece = decode_response(_chunk([whole]))
    assert isinstance(piece, Piece)
    check_piece(piece, text, "s")
    no_lengths = pb.Tensor(name="caption", dtype=pb.DTYPE_STRING, shape=[2], data=b"ab")
    with pytest.raises(ProtocolError, match="no lengths"):
        decode_response(_chunk([no_lengths]))
    # unpacked lengths (another encoder's choice) parse the same
    _, _, _, arrays = parse_chunk(_chunk([as_ragged]))
    assert arrays["tokens"].lengths.tolist() == [2, 2]


def test_chunks_are_sized_from_actual_bytes() -> None:
    sizes = np.array([10, 10, 50, 10, 10, 10], np.int64)
    assert split_sizes(sizes, 25, 60, 0, 100) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    with pytest.raises(DecodeError, match="record 102 takes 70 bytes") as info:
        split_sizes(np.array([1, 1, 70]), 25, 60, 100, 100)
    assert info.value.record == 102


# -- parquet, end to end ----------------------------------------------------------------


@pytest.fixture
def parquet_root(tmp_path: Path) -> Path:
    return write_parquet(tmp_path)


async def epoch_batches(addresses: list[str], epoch: int = 0, **opts: Any) -> list[dict[str, Any]]:
    async with Loader(addresses, dataset="train", **opts) as loader:
        return [b async for b in loader.epoch(epoch)]


@pytest.mark.parametrize("mode", ["pad", "flat"])
async def test_parquet_ragged_strings_bytes_two_ranks(
    parquet_root: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_workers(parquet_root, 2, datasets=("train=*.parquet",)) as workers:
        addresses = [w.address for w in workers]
        assert "column 'when'" in caplog.text  # the timestamp column is left out, logged
        async with Loader(addresses, dataset="train", batch_size=8) as loader:
            schema = {f.name: str(f) for f in loader.schema}
        assert schema == {
            "id": "id:int64[scalar]",
            "tokens": "tokens:int32[*]",
            "boxes": "boxes:float32[*x4]",
            "caption": "caption:string",
            "blob": "blob:bytes",
        }
        got: dict[int, dict[str, Any]] = {}
        for rank in (0, 1):
            batches = await epoch_batches(
                addresses, batch_size=8, rank=rank, world_size=2, ragged=mode, seed=3,
                shuffle=True, remainder="pad", chunk_bytes=2048,
            )  # fmt: skip
            if mode == "pad":
                for b in batches:
                    check_pad_shapes(b)
            rank_got = by_id(batches, mode)
            assert not rank_got.keys() & got.keys()
            got.update(rank_got)
    assert_matches(got, range(N))


async def test_parquet_resume_window_shuffle_and_sync(parquet_root: Path) -> None:
    opts: dict[str, Any] = {
        "dataset": "train", "batch_size": 7, "seed": 5, "shuffle": True,
        "shuffle_window": 40, "read_bytes": 4096, "chunk_bytes": 1024,
    }  # fmt: skip
    async with running_workers(parquet_root, 2, datasets=("train=*.parquet",)) as workers:
        addresses = [w.address for w in workers]
        async with Loader(addresses, **opts) as loader:
            whole = [b async for b in loader.epoch(0)]
        assert_matches(by_id(whole, "pad"), range(N))
        async with Loader(addresses, **opts) as loader:
            first = []
            async for b in loader.epoch(0):
                first.append(b)
                if len(first) == 9:
                    break
            state = loader.state_dict()
        async with Loader(addresses, state=state, **opts) as loader:
            rest = [b async for b in loader.epoch(loader.start_epoch)]
        resumed = first + rest
        assert len(resumed) == len(whole)
        for a, b in zip(whole, resumed, strict=True):  # deterministic: the same batches
            assert np.array_equal(a["id"], b["id"])
            assert np.array_equal(a["tokens"], b["tokens"])
            assert a["caption"] == b["caption"]

        def sync_epoch() -> list[dict[str, Any]]:
            with SyncLoader(addresses, **opts) as sync:
                return list(sync.epoch(0))

        import asyncio

        synced = await asyncio.to_thread(sync_epoch)
    assert len(synced) == len(whole)
    for a, b in zip(whole, synced, strict=True):
        assert np.array_equal(a["id"], b["id"])
        assert np.array_equal(a["boxes"], b["boxes"])
        assert a["blob"] == b["blob"]


async def test_ragged_chunks_from_decoding_processes(parquet_root: Path) -> None:
    async with running_workers(parquet_root, 1, datasets=("train=*.parquet",), processes=1) as (
        worker,
    ):
        batches = await epoch_batches([worker.address], batch_size=16, ragged="flat")
    assert_matches(by_id(batches, "flat"), range(N))


async def test_parquet_column_selection(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_parquet(tmp_path)
    (tmp_path / "_schema.json").write_text(json.dumps({"columns": ["caption", "id"]}))
    async with running_workers(tmp_path, 1, datasets=("train=*.parquet",)) as (worker,):
        batches = await epoch_batches([worker.address], batch_size=50, ragged="flat")
    assert list(batches[0]) == ["caption", "caption_offsets", "id"]
    assert_matches(by_id(batches, "flat"), range(N))
    assert "column 'when'" not in caplog.text
    (tmp_path / "_schema.json").write_text(json.dumps({"columns": ["id", "when"]}))
    with pytest.raises(CatalogError, match="'when'"):
        async with running_workers(tmp_path, 1, datasets=("train=*.parquet",)):
            pass


async def test_ragged_in_one_shard_fixed_in_another_is_refused(tmp_path: Path) -> None:
    ragged = pa.table({"x": pa.array([[1, 2], [3, 4]], pa.list_(pa.int32()))})
    fixed = pa.table({"x": pa.array([[1, 2], [3, 4]], pa.list_(pa.int32(), 2))})
    pq.write_table(ragged, tmp_path / "a.parquet")
    pq.write_table(fixed, tmp_path / "b.parquet")
    with pytest.raises(CatalogError, match=r"'b.parquet'.*field 'x'.*ragged in the first"):
        async with running_workers(tmp_path, 1, datasets=("train=*.parquet",)):
            pass


async def test_a_record_larger_than_a_message_is_data_loss(tmp_path: Path) -> None:
    big = [[1] * 10, [2] * 40_000, [3]]  # record 1: 160 kB, over a 64 KiB message
    pq.write_table(pa.table({"t": pa.array(big, pa.list_(pa.int32()))}), tmp_path / "a.parquet")
    cfg = {"max_message_bytes": 64 * 1024, "chunk_bytes": 16 * 1024}
    async with running_workers(tmp_path, 1, datasets=("train=*.parquet",), **cfg) as (worker,):
        with pytest.raises(DataLossError, match="record 1 takes 160008 bytes") as info:
            await epoch_batches([worker.address], batch_size=2, max_message_bytes=64 * 1024)
    assert (info.value.shard, info.value.record) == ("a.parquet", 1)


# -- jsonl ------------------------------------------------------------------------------


def write_jsonl(root: Path, bad: dict[int, bytes] | None = None) -> None:
    bad = bad or {}
    for s in range(SHARDS):
        lines = []
        for j in range(PER_SHARD):
            i = s * PER_SHARD + j
            r = source(i)
            doc = {
                "id": i,
                "caption": r["caption"],
                "tokens": r["tokens"].tolist(),
                "meta": {"nested": True},  # left out when inferring
            }
            lines.append(bad.get(i, json.dumps(doc).encode()))
            if j % 13 == 0:
                lines.append(b"   ")  # blank lines are not records
        (root / f"part-{s}.jsonl").write_bytes(b"\n".join(lines) + b"\n")


@pytest.mark.parametrize("mode", ["pad", "flat"])
async def test_jsonl_inferred_fields(tmp_path: Path, mode: str) -> None:
    write_jsonl(tmp_path)
    async with running_workers(tmp_path, 2, datasets=("train=*.jsonl",)) as workers:
        addresses = [w.address for w in workers]
        async with Loader(addresses, dataset="train", batch_size=8) as loader:
            assert [str(f) for f in loader.schema] == [
                "id:int64[scalar]", "caption:string", "tokens:int64[*]",
            ]  # fmt: skip
        got: dict[int, dict[str, Any]] = {}
        for rank in (0, 1):
            batches = await epoch_batches(
                addresses, batch_size=16, rank=rank, world_size=2, ragged=mode
            )
            got.update(by_id(batches, mode))
    assert sorted(got) == list(range(N))
    for i, rec in got.items():
        assert rec["caption"] == source(i)["caption"]
        assert rec["tokens"].tolist() == source(i)["tokens"].tolist()


async def test_jsonl_declared_schema_and_bad_records(tmp_path: Path) -> None:
    broken = {
        5: b'{"id": 5, "caption": "x", "tokens": 7}',  # a number where the schema says ragged
        80: b'{"id": 80, "caption": "\xff\xfe", "tokens": []}',  # invalid UTF-8
        150: b"{not json",
    }
    write_jsonl(tmp_path, broken)
    fields = [
        {"name": "id", "dtype": "int64", "shape": []},
        {"name": "tokens", "dtype": "int32", "shape": [-1]},
        {"name": "caption", "dtype": "string", "shape": []},
    ]
    (tmp_path / "_schema.json").write_text(json.dumps({"fields": fields}))
    async with running_workers(tmp_path, 1, datasets=("train=*.jsonl",)) as (worker,):
        with pytest.raises(DataLossError, match="ragged") as info:
            await epoch_batches([worker.address], batch_size=10)
        assert (info.value.shard, info.value.record) == ("part-0.jsonl", 5)
        opts: dict[str, Any] = {"batch_size": 10, "on_error": "skip", "shuffle": True}
        batches = await epoch_batches([worker.address], shuffle_window=30, **opts)
    got = by_id(batches, "pad")
    assert sorted(got) == [i for i in range(N) if i not in broken]
    for i, rec in got.items():
        assert rec["tokens"].dtype == np.int32
        assert rec["tokens"].tolist() == source(i)["tokens"].tolist()
    assert len(batches) == -(-N // 10)  # holes keep the number of batches


# -- wds extra members ------------------------------------------------------------------


@pytest.fixture
def wds_size(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    pytest.importorskip("PIL", reason="the wds format needs Pillow (shardstream[wds])")
    monkeypatch.setenv("SHARDSTREAM_WDS_SIZE", "8")
    monkeypatch.setattr(_decoding, "_decoders", {})
    yield 8


def _png() -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(out, format="PNG")
    return out.getvalue()


def write_wds(root: Path, bad_text: int | None = None) -> None:
    png = _png()
    for s in range(2):
        with tarfile.open(root / f"shard-{s}.tar", "w") as tar:
            for j in range(20):
                i = s * 20 + j
                r = source(i)
                text = b"\xc3" if i == bad_text else r["caption"].encode()
                members = [
                    ("bin", r["blob"]), ("cls", str(i % 3).encode()), ("id", str(i).encode()),
                    ("json", json.dumps({"i": i}).encode()), ("png", png), ("txt", text),
                ]  # fmt: skip
                for ext, data in members:
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("mode", ["pad", "flat"])
async def test_wds_text_and_bytes_members(tmp_path: Path, wds_size: int, mode: str) -> None:
    write_wds(tmp_path)
    async with running_workers(tmp_path, 1, datasets=("train=*.tar",)) as (worker,):
        batches = await epoch_batches([worker.address], batch_size=6, ragged=mode)
    ids = np.concatenate([b["id"] for b in batches]).tolist()
    assert sorted(ids) == list(range(40))
    for b in batches:
        assert b["image"].shape[1:] == (8, 8, 3)
        rows = range(len(b["id"]))
        if mode == "pad":
            texts, blobs, docs = b["txt"], b["bin"], b["json"]
        else:

            def cut(name: str, bs: dict[str, Any] = b, n: int = len(b["id"])) -> list[bytes]:
                o = bs[f"{name}_offsets"]
                return [bs[name][o[r] : o[r + 1]].tobytes() for r in range(n)]

            texts = [t.decode() for t in cut("txt")]
            blobs = cut("bin")
            docs = [d.decode() for d in cut("json")]
        for r, i in zip(rows, b["id"].tolist(), strict=True):
            assert texts[r] == source(i)["caption"]
            assert blobs[r] == source(i)["blob"]
            assert json.loads(docs[r]) == {"i": i}


async def test_wds_invalid_utf8_text_is_data_loss(tmp_path: Path, wds_size: int) -> None:
    write_wds(tmp_path, bad_text=27)
    async with running_workers(tmp_path, 1, datasets=("train=*.tar",)) as (worker,):
        with pytest.raises(DataLossError, match="invalid UTF-8") as info:
            await epoch_batches([worker.address], batch_size=6)
        assert (info.value.shard, info.value.record) == ("shard-1.tar", 7)
        batches = await epoch_batches([worker.address], batch_size=6, on_error="skip")
    ids = np.concatenate([b["id"] for b in batches]).tolist()
    assert sorted(ids) == [i for i in range(40) if i != 27]


def test_description_of_a_ragged_field_is_checked() -> None:
    from shardstream.client._wire import _dataset_desc

    def info(*fields: pb.FieldSpec) -> pb.DatasetInfo:
        shard = pb.ShardInfo(id="a", records=1, fingerprint="f")
        return pb.DatasetInfo(name="d", shards=[shard], schema=list(fields))

    ok = _dataset_desc(
        info(
            pb.FieldSpec(name="t", dtype=pb.DTYPE_INT32, shape=[-1, 2], ragged=True),
            pb.FieldSpec(name="c", dtype=pb.DTYPE_STRING, ragged=True),
        )
    )
    assert [str(f) for f in ok.schema] == ["t:int32[*x2]", "c:string"]
    for bad in (
        pb.FieldSpec(name="t", dtype=pb.DTYPE_INT32, shape=[-1]),  # -1 without the flag
        pb.FieldSpec(name="t", dtype=pb.DTYPE_INT32, shape=[3], ragged=True),
        pb.FieldSpec(name="c", dtype=pb.DTYPE_STRING),  # text is always ragged
        pb.FieldSpec(name="c", dtype=pb.DTYPE_BYTES, shape=[2], ragged=True),
    ):
        with pytest.raises(ProtocolError, match="field"):
            _dataset_desc(info(bad))


@pytest.mark.parametrize("lie", RAGGED_LIES)
@pytest.mark.parametrize("api", ["Loader", "SyncLoader", "torch"])
async def test_lying_ragged_lengths_and_strings_are_refused_on_every_path(
    parquet_root: Path, lie: str, api: str
) -> None:
    """Lengths that add up only modulo 2**64 (which would give offsets into other
    records' values) and a string record boundary inside a character (each part invalid
    UTF-8, the whole valid) are ProtocolErrors naming the worker, through the async
    loader, the sync wrapper and the torch wrapper alike; with an honest worker beside
    the liar, its reads go on there and every record arrives once, unchanged."""
    import asyncio

    opts: dict[str, Any] = {"dataset": "train", "batch_size": 8, "ragged": "pad",  # chunks
                            "read_bytes": 16384, "chunk_bytes": 8192,  # of many records
                            "retry_deadline": 20.0}  # fmt: skip

    def sync_epoch(addresses: list[str]) -> list[dict[str, Any]]:
        if api == "torch":
            pytest.importorskip("torch")
            from shardstream.client.torch import ShardstreamIterable

            it = ShardstreamIterable(addresses, **opts)
            try:
                return list(it)
            finally:
                it.close()
        with SyncLoader(addresses, **opts) as sync:
            return list(sync.epoch(0))

    async def epoch(addresses: list[str]) -> list[dict[str, Any]]:
        if api == "Loader":
            return await epoch_batches(
                addresses, **{k: v for k, v in opts.items() if k != "dataset"}
            )
        return await asyncio.to_thread(sync_epoch, addresses)

    async with (
        running_workers(parquet_root, 1, datasets=("train=*.parquet",)) as (worker,),
        lying_worker(worker.address, lie) as liar,
    ):
        with pytest.raises(ProtocolError) as caught:
            await epoch([liar])
        assert caught.value.worker == liar and caught.value.shard.endswith(".parquet")
        assert ("more than the" if lie == "wrapping-lengths" else "UTF-8") in str(caught.value)
        batches = await epoch([liar, worker.address])
    if api == "torch":  # tensors: back to numpy for the comparison
        batches = [{k: v.numpy() if hasattr(v, "numpy") else v for k, v in b.items()}
                   for b in batches]  # fmt: skip
    assert_matches(by_id(batches, "pad"), range(N))


def write_tokens(path: Path, sizes: Sequence[int], first_id: int = 0) -> None:
    """A jsonl shard: record i holds `sizes[i]` int64 tokens (8 bytes each)."""
    lines = [json.dumps({"id": first_id + i, "tokens": [i] * n}) for i, n in enumerate(sizes)]
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("api", ["Loader", "SyncLoader"])
async def test_reads_of_ragged_records_are_sized_by_the_measured_mean(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, api: str
) -> None:
    """Reads of ragged records are sized in bytes: the worker measures a record's mean
    size on a sample as it indexes, and the description carries it. Was: every ragged
    value counted as 1 KiB, so records of 80 KB made each read, and the loader's memory
    bound, 78 times what read_bytes says (and a read of 128 KiB records 126 times)."""
    for k in range(3):
        write_tokens(tmp_path / f"{k}.jsonl", [10_000] * 64, first_id=64 * k)
    per_record = 10_000 * 8 + 8 + 8  # tokens, their length, the id
    opts: dict[str, Any] = {"dataset": "t", "batch_size": 4, "read_bytes": 1 << 20,
                            "shuffle": True, "shuffle_reads": 2, "seed": 5}  # fmt: skip
    async with running_workers(tmp_path, 1, datasets=("t=*.jsonl",)) as (worker,):
        with caplog.at_level("WARNING", logger="shardstream.client"):
            if api == "Loader":
                async with Loader([worker.address], **opts) as loader:
                    assert loader.dataset.record_bytes == per_record
                    read_records = loader.plan(0).read_records
                    ids = [i for b in [b async for b in loader.epoch(0)] for i in b["id"]]
                    state = loader.state_dict()
            else:

                def run() -> tuple[int, list[int], dict[str, Any]]:
                    with SyncLoader([worker.address], **opts) as sync:
                        got = [int(i) for b in sync.epoch(0) for i in b["id"]]
                        return sync.plan(0).read_records, got, sync.state_dict()

                read_records, ids, state = await asyncio.to_thread(run)
    # 13 records of 80 KB make a read of 1 MiB, 12 aligned to batches (the guess: 1,016)
    assert (1 << 20) // per_record == 13 and read_records == 12
    assert sorted(ids) == list(range(192))
    assert state["options"]["record_bytes"] == per_record  # a state pins the blocks' size
    assert not [r for r in caplog.records if "reads were sized for" in r.getMessage()]


async def test_records_far_larger_than_the_sample_are_named_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The sample is the first records of some shards: where the rest are far larger,
    reads hold that much more than read_bytes. One warning names it and the read_bytes
    that keeps reads near the bound."""
    write_tokens(tmp_path / "a.jsonl", [10] * 32 + [10_000] * 96)
    write_tokens(tmp_path / "b.jsonl", [10] * 128, first_id=128)
    async with (
        running_workers(tmp_path, 1, datasets=("t=*.jsonl",)) as (worker,),
        Loader([worker.address], dataset="t", batch_size=4, read_bytes=16384) as loader,
    ):
        assert loader.dataset.record_bytes == 10 * 8 + 16
        with caplog.at_level("WARNING", logger="shardstream.client"):
            for epoch in (0, 1):
                assert sum([len(b["id"]) async for b in loader.epoch(epoch)]) == 256
    said = [r.getMessage() for r in caplog.records if "reads were sized for" in r.getMessage()]
    assert len(said) == 1, said
    assert "measured on a sample" in said[0] and "where read_bytes is 16 KiB" in said[0]


async def test_a_record_level_shuffle_state_pins_the_measured_record_size(
    tmp_path: Path,
) -> None:
    """With shuffle_reads, the size reads are cut by decides the blocks that are shuffled:
    a state saved when reads were sized otherwise (a worker that did not measure, before
    this version) would resume other blocks, so it is refused, naming the size; without
    shuffle_reads the size decides nothing a state holds."""
    for k in range(2):
        write_tokens(tmp_path / f"{k}.jsonl", [500] * 64, first_id=64 * k)
    opts: dict[str, Any] = {"dataset": "t", "batch_size": 4, "read_bytes": 1 << 16,
                            "shuffle": True, "seed": 5}  # fmt: skip
    async with running_workers(tmp_path, 1, datasets=("t=*.jsonl",)) as (worker,):
        async with Loader([worker.address], shuffle_reads=2, **opts) as loader:
            it = loader.epoch(0)
            head = [await anext(it) for _ in range(5)]
            state = loader.state_dict()
            await it.aclose()
        assert state["options"]["record_bytes"] == 500 * 8 + 16
        for older in ({**state["options"], "record_bytes": 0},
                      {k: v for k, v in state["options"].items() if k != "record_bytes"}):  # fmt: skip
            async with Loader([worker.address], shuffle_reads=2, **opts) as loader:
                with pytest.raises(StateMismatchError, match="record_bytes 0 vs 4016"):
                    loader.load_state_dict({**state, "options": older})
        async with Loader([worker.address], shuffle_reads=2, **opts) as loader:
            loader.load_state_dict(state)
            rest = [b async for b in loader.epoch(0)]
        ids = [int(i) for b in head + rest for i in b["id"]]
        assert sorted(ids) == list(range(128))
        async with Loader([worker.address], **opts) as loader:
            assert loader.state_dict()["options"]["record_bytes"] == 0


@pytest.mark.parametrize("field", ["text", "tokens", "pixels"])
@pytest.mark.parametrize("holes", [False, True])
def test_a_record_level_shuffle_window_is_held_at_most_twice(field: str, holes: bool) -> None:
    """A group of reads (`shuffle_reads`) is put in its order with one copy, and the reads
    it was received in are let go first. Was: a window of strings took 33 times its size
    (8-byte indexes for every byte gathered) and the received reads stayed held while the
    window was delivered: client RSS 678 MiB where reads of 128 KiB strings, 2 a group,
    give 263 MiB now."""
    import tracemalloc

    from shardstream.client._fetch import Hole
    from shardstream.client._pipeline import _shuffled
    from shardstream.client._rebatch import Rebatcher

    rng = np.random.default_rng(1)
    lengths = {"text": 4096, "tokens": 3, "pixels": 1}[field]
    per_read = 1 << 20
    pieces: list[Any] = []
    for k in range(4):
        if holes and k == 2:
            pieces.append(Hole(0, 256))
            continue
        if field == "pixels":  # fixed records of 4 KiB
            arrays: dict[str, Any] = {"x": rng.integers(0, 255, (256, 4096), dtype=np.uint8)}
        else:
            n = per_read // (lengths * 4 if field == "tokens" else lengths)
            size = 256 if field == "text" else n
            items = [b"y" * lengths] * size if field == "text" else [[7] * lengths] * size
            arrays = {"x": Ragged.from_bytes(items) if field == "text"
                      else Ragged.from_items(items, "int32")}  # fmt: skip
        pieces.append(Piece(0, len(arrays["x"]), arrays))

    def nbytes(x: Any) -> int:
        return int(x.values.nbytes + x.offsets.nbytes) if isinstance(x, Ragged) else int(x.nbytes)

    window = sum(nbytes(p.arrays["x"]) for p in pieces if isinstance(p, Piece))
    take = rng.permutation(sum(p.count for p in pieces))
    del arrays
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        rebatcher = Rebatcher(64)
        batches = list(_shuffled(rebatcher, pieces, take))
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert pieces == []  # the received reads are let go
    last = rebatcher.flush()
    got = sum(len(b["x"]) for b in [*batches, *([last] if last else [])])
    assert got == len(take) - 256 * holes
    # twice the window, and a few int64 per record (offsets, the order, what they index)
    assert peak < 2.3 * window + 64 * len(take), (peak / window, window)


async def test_reads_of_ragged_records_start_while_their_bytes_fit(tmp_path: Path) -> None:
    """Where the records are larger than the reads were sized for (the sample saw only
    small ones), a read starts only while the bytes held and in flight fit in
    reads_ahead x read_bytes (one at a time where one read is larger): the memory bound
    holds in reads of bytes, not only in reads. A consumer that lets the loader run as
    far ahead as it may, after each batch: 4 reads of 2.6 MB each were held before."""
    for k in range(4):
        write_tokens(tmp_path / f"{k}.jsonl", [2] * 32 + [8192] * 40, first_id=72 * k)
    read = 32 * (2 * 8 + 16) + 40 * (8192 * 8 + 16)  # a read is a shard: 2.6 MB
    async with (
        running_workers(tmp_path, 1, datasets=("t=*.jsonl",)) as (worker,),
        Loader(
            [worker.address],
            dataset="t",
            batch_size=8,
            read_bytes=1 << 18,
            reads_ahead=4,
            max_inflight_reads=4,
            same_host_lane=False,
            network_lane=False,
        ) as loader,  # fmt: skip
    ):
        assert loader.dataset.record_bytes == 2 * 8 + 16  # the sample: small records
        it = loader.epoch(0)
        ids: list[int] = []
        async for batch in it:
            ids.extend(int(i) for i in batch["id"])
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 30  # bounds a hang only
            while it._in_flight:  # let it read ahead as far as it may
                assert loop.time() < deadline
                await asyncio.sleep(0.005)
    assert sorted(ids) == list(range(288))
    budget = 4 * (1 << 18)
    # the first reads start before any large record is seen: two of them at most after
    assert it.max_held_bytes <= budget + 2 * read, (it.max_held_bytes, read)


async def test_a_bad_record_in_the_sample_leaves_out_that_record_only(tmp_path: Path) -> None:
    """A record among a shard's first 32 that does not decode: the rest of the sample is
    measured one by one. Was: the whole shard was left out of the sample, and where
    every sampled shard had one, reads fell back to the 1 KiB guess."""
    fields = [{"name": "id", "dtype": "int64", "shape": []},
              {"name": "tokens", "dtype": "int64", "shape": [-1]}]  # fmt: skip
    (tmp_path / "_schema.json").write_text(json.dumps({"fields": fields}))
    for k in range(2):
        write_tokens(tmp_path / f"{k}.jsonl", [100] * 40, first_id=40 * k)
        lines = (tmp_path / f"{k}.jsonl").read_text().splitlines()
        lines[5] = "{not json"
        (tmp_path / f"{k}.jsonl").write_text("\n".join(lines) + "\n")
    async with (
        running_workers(tmp_path, 1, datasets=("t=*.jsonl",)) as (worker,),
        Loader([worker.address], dataset="t", batch_size=4, on_error="skip") as loader,
    ):
        assert loader.dataset.record_bytes == 100 * 8 + 16
        assert sum([len(b["id"]) async for b in loader.epoch(0)]) == 78

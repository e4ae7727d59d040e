"""Shard decoders (npz, csv), the decoder registry and the synthetic dataset writer."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.lib import format as npformat

from shardstream.server import _decoders
from shardstream.server._csv import CsvDecoder
from shardstream.server._decoders import (
    DecodeError,
    Decoder,
    ShardMeta,
    decoder_class,
    format_for_path,
    register_decoder,
)
from shardstream.server._npz import NpzDecoder
from shardstream.server._synth import make_dataset
from shardstream.v1.codec import FieldSpec

Arrays = Mapping[str, np.ndarray[Any, Any]]
SHAPE = (4, 3)
SCHEMA = (
    FieldSpec(name="id", dtype="int64", shape=()),
    FieldSpec(name="label", dtype="int64", shape=()),
    FieldSpec(name="image", dtype="uint8", shape=SHAPE),
)


@pytest.fixture
def npz() -> Iterator[NpzDecoder]:
    decoder = NpzDecoder()
    yield decoder
    decoder.close()


def _load(path: Path) -> dict[str, np.ndarray[Any, Any]]:
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def _assert_rows(got: Arrays, want: Arrays, start: int, count: int) -> None:
    assert list(got) == list(want)
    for name, array in got.items():
        assert array.shape == (count, *want[name].shape[1:]), name
        assert array.dtype == want[name].dtype.newbyteorder("<"), name
        assert array.dtype.byteorder in "=|<", name
        assert array.flags.c_contiguous and array.flags.writeable, name
        np.testing.assert_array_equal(array, want[name][start : start + count], err_msg=name)


# --- npz ---------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path: Path, npz: NpzDecoder) -> None:
    paths = make_dataset(tmp_path, shards=3, records=10, shape=SHAPE)
    assert [p.name for p in paths] == ["shard-00000.npz", "shard-00001.npz", "shard-00002.npz"]
    metas = [npz.index(p) for p in paths]
    assert [m.records for m in metas] == [4, 3, 3]
    assert all(m.schema == SCHEMA for m in metas)
    ids = np.concatenate(
        [npz.read(p, 0, m.records)["id"] for p, m in zip(paths, metas, strict=True)]
    )
    assert ids.tolist() == list(range(10))
    want = _load(paths[0])
    assert want["label"].tolist() == [0, 1, 2, 3]
    for start, count in [(0, 1), (1, 2), (3, 1), (0, 4), (2, 0), (4, 0)]:
        got = npz.read(paths[0], start, count)
        _assert_rows(got, want, start, count)
        assert all(a.flags.owndata for a in got.values())


def test_npz_read_in_another_instance_reads_only_the_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (path,) = make_dataset(tmp_path, shards=1, records=50, shape=(8,))
    want = _load(path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a stored member was loaded whole")

    monkeypatch.setattr(npformat, "read_array", refuse)
    monkeypatch.setattr(np, "load", refuse)
    decoder = NpzDecoder()  # never indexed this path
    _assert_rows(decoder.read(path, 17, 5), want, 17, 5)
    decoder.close()


def test_npz_rereads_a_changed_file(tmp_path: Path, npz: NpzDecoder) -> None:
    (path,) = make_dataset(tmp_path, shards=1, records=5, shape=(2,))
    assert npz.read(path, 4, 1)["id"].tolist() == [4]
    make_dataset(tmp_path, shards=1, records=9, shape=(3,), seed=1, overwrite=True)
    assert npz.index(path).records == 9
    _assert_rows(npz.read(path, 6, 3), _load(path), 6, 3)


def test_npz_compressed_members_are_inflated_as_streams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, npz: NpzDecoder
) -> None:
    """Deflated members are never loaded whole: a read inflates up to its rows, and the
    next read of the stream continues where the last one stopped."""
    import zlib

    paths = []
    for i in range(3):
        path = tmp_path / f"c{i}.npz"
        np.savez_compressed(path, x=np.arange(10) + 100 * i, y=np.arange(20.0).reshape(10, 2))
        paths.append(path)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a compressed member was loaded whole")

    starts: list[int] = []  # one per inflating from a member's first byte
    decompressobj = zlib.decompressobj

    def counting(*args: Any) -> Any:
        starts.append(1)
        return decompressobj(*args)

    monkeypatch.setattr(npformat, "read_array", refuse)
    monkeypatch.setattr(zlib, "decompressobj", counting)
    assert npz.index(paths[0]).records == 10  # headers, then a CRC check of each member
    starts.clear()
    got = npz.read(paths[0], 3, 4)
    assert got["x"].tolist() == [3, 4, 5, 6]
    assert got["y"].tolist() == [[6.0, 7.0], [8.0, 9.0], [10.0, 11.0], [12.0, 13.0]]
    assert len(starts) == 2  # x and y, from their first bytes
    assert npz.read(paths[0], 7, 2)["x"].tolist() == [7, 8]
    assert len(starts) == 2  # continued where the last read stopped
    got["x"][:] = -1  # the caller owns its arrays
    assert npz.read(paths[0], 3, 1)["x"].tolist() == [3]  # before the kept positions
    assert len(starts) == 4
    assert npz.read(paths[1], 0, 1)["x"].tolist() == [100]
    assert npz.read(paths[2], 9, 1)["x"].tolist() == [209]  # the end: CRC checked


def test_npz_big_endian_and_fortran(tmp_path: Path, npz: NpzDecoder) -> None:
    big = (np.arange(6) * 1000).astype(">i4")
    fortran = np.asfortranarray(np.arange(6 * 3 * 2, dtype=">f8").reshape(6, 3, 2))
    path = tmp_path / "mixed.npz"
    np.savez(path, big=big, fortran=fortran)
    stored = _load(path)
    assert (stored["big"].dtype.str, stored["fortran"].dtype.str) == (">i4", ">f8")
    assert stored["fortran"].flags.f_contiguous and not stored["fortran"].flags.c_contiguous
    meta = npz.index(path)
    assert meta == ShardMeta(
        records=6,
        schema=(
            FieldSpec(name="big", dtype="int32", shape=()),
            FieldSpec(name="fortran", dtype="float64", shape=(3, 2)),
        ),
    )
    got = npz.read(path, 2, 3)
    assert got["big"].dtype == np.dtype("<i4")
    assert got["big"].tolist() == [2000, 3000, 4000]
    assert got["fortran"].dtype == np.dtype("<f8")
    assert got["fortran"].flags.c_contiguous
    np.testing.assert_array_equal(got["fortran"], fortran[2:5])


def test_npz_pickled_object_array_is_refused(tmp_path: Path, npz: NpzDecoder) -> None:
    path = tmp_path / "obj.npz"
    np.savez(path, id=np.arange(2), obj=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DecodeError, match=r"'obj' holds Python objects .*pickle"):
        npz.index(path)
    with pytest.raises(DecodeError, match="pickle"):
        NpzDecoder().read(path, 0, 1)


def test_npz_unequal_first_dimensions(tmp_path: Path, npz: NpzDecoder) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, a=np.arange(5), b=np.zeros((4, 2)))
    with pytest.raises(DecodeError, match=r"different first dimensions \('a': 5, 'b': 4\)"):
        npz.index(path)


def test_npz_not_a_zip(tmp_path: Path, npz: NpzDecoder) -> None:
    path = tmp_path / "junk.npz"
    path.write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(DecodeError, match="not a readable npz") as info:
        npz.index(path)
    assert info.value.record is None


def test_npz_truncated_in_the_data(tmp_path: Path, npz: NpzDecoder) -> None:
    (path,) = make_dataset(tmp_path, shards=1, records=100, shape=(8,))
    assert npz.read(path, 0, 2)["id"].tolist() == [0, 1]
    data = path.read_bytes()
    image_at = data.find(_load(path)["image"].tobytes())
    assert image_at > 0
    path.write_bytes(data[: image_at + 37 * 8 + 3])  # cut inside record 37 of `image`
    for decoder in (npz, NpzDecoder()):  # a stale cache and a fresh instance
        with pytest.raises(DecodeError, match=r"truncated.*'image' at record 37") as info:
            decoder.read(path, 0, 10)
        assert info.value.record == 37


def test_npz_member_shorter_than_its_header(tmp_path: Path, npz: NpzDecoder) -> None:
    buf = io.BytesIO()
    npformat.write_array(buf, np.arange(10, dtype=np.int64))
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("x.npy", buf.getvalue()[: -4 * 8 - 5])  # 5.x of 10 records present
    with pytest.raises(DecodeError, match="declares 10 records but its data ends at record 5") as e:
        npz.index(path)
    assert e.value.record == 5


def test_npz_read_range_errors(tmp_path: Path, npz: NpzDecoder) -> None:
    (path,) = make_dataset(tmp_path, shards=1, records=5, shape=(1,))
    with pytest.raises(ValueError, match="must be non-negative, got -1 and 2"):
        npz.read(path, -1, 2)
    with pytest.raises(DecodeError, match=r"has 5 records, cannot read \[3, 7\)") as info:
        npz.read(path, 3, 4)
    assert info.value.record == 5


# --- csv ---------------------------------------------------------------------------------


@pytest.fixture
def csv_shard(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray[Any, Any]]]:
    """A 3000-record csv shard and the same records as written to npz."""
    (path,) = make_dataset(tmp_path / "csv", shards=1, records=3000, shape=(2, 3), format="csv")
    (twin,) = make_dataset(tmp_path / "npz", shards=1, records=3000, shape=(2, 3))
    return path, _load(twin)


def test_csv_round_trip(csv_shard: tuple[Path, dict[str, np.ndarray[Any, Any]]]) -> None:
    path, want = csv_shard
    assert path.name == "part-000"
    assert (path.parent / "_schema.json").is_file()
    first = path.read_text().splitlines()[1]
    assert first == "1,1," + ",".join(str(v) for v in want["image"][1].ravel())
    indexer = CsvDecoder()
    meta = indexer.index(path)
    assert meta.records == 3000
    assert meta.schema == (*SCHEMA[:2], FieldSpec(name="image", dtype="uint8", shape=(2, 3)))
    ranges = [(0, 5), (1020, 10), (1023, 1), (1024, 1), (2047, 3), (2995, 5), (7, 0), (0, 3000)]
    for decoder in (indexer, CsvDecoder()):  # the second never indexed: rebuilds lazily
        for start, count in ranges:
            _assert_rows(decoder.read(path, start, count), want, start, count)


def test_csv_parts_of_a_multi_shard_dataset(tmp_path: Path) -> None:
    paths = make_dataset(tmp_path, shards=3, records=8, shape=(), format="csv")
    assert [p.name for p in paths] == ["part-000", "part-001", "part-002"]
    decoder = CsvDecoder()
    assert [decoder.index(p).records for p in paths] == [3, 3, 2]
    assert decoder.read(paths[2], 0, 2)["id"].tolist() == [6, 7]
    assert decoder.read(paths[2], 0, 2)["image"].shape == (2,)


def test_csv_without_schema(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("7,1.5,-2\n8,2.5,3e2\n")
    decoder = CsvDecoder()
    assert decoder.index(path) == ShardMeta(
        records=2,
        schema=(
            FieldSpec(name="id", dtype="int64", shape=()),
            FieldSpec(name="features", dtype="float64", shape=(2,)),
        ),
    )
    got = decoder.read(path, 0, 2)
    assert got["id"].tolist() == [7, 8]
    assert got["features"].tolist() == [[1.5, -2.0], [2.5, 300.0]]
    ids_only = tmp_path / "ids.csv"
    ids_only.write_text("3\n4")  # no final newline
    assert decoder.index(ids_only).schema == (FieldSpec(name="id", dtype="int64", shape=()),)
    assert decoder.read(ids_only, 1, 1)["id"].tolist() == [4]


def _replace_line(path: Path, k: int, line: str) -> None:
    lines = path.read_text().splitlines()
    lines[k] = line
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    ("value", "why"),
    [("x", "could not convert string 'x'"), ("1.5", "'1.5' to int64"), ("300", "out of range")],
)
def test_csv_bad_value(
    csv_shard: tuple[Path, dict[str, np.ndarray[Any, Any]]], value: str, why: str
) -> None:
    path, want = csv_shard
    decoder = CsvDecoder()
    decoder.index(path)
    row = [str(v) for v in (1500, 0, *want["image"][1500].ravel())]
    row[1 if value == "1.5" else 4] = value
    _replace_line(path, 1500, ",".join(row))
    with pytest.raises(DecodeError, match=f"record 1500 \\(line 1501\\).*{why}") as info:
        decoder.read(path, 1400, 200)
    assert info.value.record == 1500
    _assert_rows(decoder.read(path, 1490, 10), want, 1490, 10)


def test_csv_wrong_column_count(csv_shard: tuple[Path, dict[str, np.ndarray[Any, Any]]]) -> None:
    path, _ = csv_shard
    _replace_line(path, 2100, "2100,0,1,2,3,4,5,6,7")
    with pytest.raises(DecodeError, match=r"record 2100 \(line 2101\) has 9 columns, expected 8"):
        CsvDecoder().read(path, 2048, 100)
    _replace_line(path, 0, "0,0,1")
    with pytest.raises(DecodeError, match=r"has 3 columns but the fields .* take 8") as info:
        CsvDecoder().index(path)
    assert info.value.record == 0


def test_csv_header_line_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "part-000"
    path.write_text("id,value\n1,2\n")
    with pytest.raises(DecodeError, match=r"record 0 .*could not convert string 'id'") as info:
        CsvDecoder().index(path)
    assert info.value.record == 0


def test_csv_shrunk_file(csv_shard: tuple[Path, dict[str, np.ndarray[Any, Any]]]) -> None:
    path, _ = csv_shard
    decoder = CsvDecoder()
    assert decoder.index(path).records == 3000
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2500]))
    with pytest.raises(DecodeError, match="has 2500 records") as info:
        decoder.read(path, 2400, 200)
    assert info.value.record == 2500


@pytest.mark.parametrize(
    ("schema", "why"),
    [
        ("{", "not valid JSON"),
        ('{"fields": []}', "non-empty list `fields`"),
        ('{"fields": [{"name": "id", "dtype": "int64"}]}', r"fields\[0\] must be an object"),
        ('{"fields": [{"name": "id", "dtype": "complex64", "shape": []}]}', "cannot travel"),
    ],
)
def test_csv_bad_schema_file(tmp_path: Path, schema: str, why: str) -> None:
    (tmp_path / "_schema.json").write_text(schema)
    (tmp_path / "part-000").write_text("1\n")
    with pytest.raises(DecodeError, match=why):
        CsvDecoder().index(tmp_path / "part-000")


# --- registry ----------------------------------------------------------------------------


def test_format_for_path_and_decoder_class() -> None:
    assert format_for_path("data/shard-00001.npz") == "npz"
    assert format_for_path("data/train.csv") == "csv"
    with pytest.raises(ValueError, match=r"'data/part-000'.*NAME=GLOB:FORMAT.*csv \(\.csv\)"):
        format_for_path("data/part-000")
    assert decoder_class("npz") is NpzDecoder
    assert decoder_class("csv") is CsvDecoder
    with pytest.raises(
        ValueError, match="unknown shard format 'tfrecord'; known formats: csv, jsonl, npz"
    ):
        decoder_class("tfrecord")


def test_user_defined_decoder_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_decoders, "_REGISTRY", dict(_decoders._REGISTRY))

    @register_decoder
    class Ones(Decoder):
        name = "ones"
        suffixes = (".ones",)

        def index(self, path: Path) -> ShardMeta:
            return ShardMeta(records=3, schema=(FieldSpec(name="x", dtype="int8", shape=()),))

        def read(self, path: Path, start: int, count: int) -> Arrays:
            return {"x": np.ones(count, np.int8)}

    assert decoder_class("ones") is Ones
    assert format_for_path("a/b.ones") == "ones"
    assert decoder_class("ones")().read(Path("a/b.ones"), 0, 2)["x"].tolist() == [1, 1]

    class Nameless(Ones):
        name = ""

    with pytest.raises(ValueError, match="Nameless must set a non-empty `name`"):
        register_decoder(Nameless)


# --- synthetic datasets ------------------------------------------------------------------


def test_make_dataset_is_deterministic(tmp_path: Path) -> None:
    a = _load(make_dataset(tmp_path / "a", shards=2, records=5, shape=(3,), seed=4)[1])
    b = _load(make_dataset(tmp_path / "b", shards=2, records=5, shape=(3,), seed=4)[1])
    c = _load(make_dataset(tmp_path / "c", shards=2, records=5, shape=(3,), seed=5)[1])
    assert a["id"].tolist() == [3, 4]
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"shards": 0, "records": 5}, "`shards` must be at least 1, got 0"),
        ({"shards": 3, "records": 2}, r"`records` must be at least `shards` \(3\).*got 2"),
        ({"shards": 1, "records": 2, "shape": (2, 0)}, r"positive ints .*got \(2, 0\)"),
        ({"shards": 1, "records": 2, "format": "tfrecord"}, "one of npz, csv, got 'tfrecord'"),
        ({"shards": 1, "records": 2, "seed": -1}, "`seed` must be non-negative, got -1"),
    ],
)
def test_make_dataset_validates(tmp_path: Path, kwargs: dict[str, Any], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        make_dataset(tmp_path, **{"shape": (2,), **kwargs})
    assert list(tmp_path.iterdir()) == []


def test_make_dataset_refuses_existing_shards(tmp_path: Path) -> None:
    make_dataset(tmp_path, shards=3, records=3, shape=(1,), format="csv")
    with pytest.raises(ValueError, match=r"already holds 3 csv shard file\(s\) \(part-000"):
        make_dataset(tmp_path, shards=2, records=2, shape=(1,), format="csv")
    make_dataset(tmp_path, shards=2, records=4, shape=(1,), format="npz")  # other format: fine
    paths = make_dataset(tmp_path, shards=2, records=2, shape=(1,), format="csv", overwrite=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["_schema.json", "part-000", "part-001", "shard-00000.npz", "shard-00001.npz"]
    decoder = CsvDecoder()
    assert [decoder.read(p, 0, 1)["id"].tolist() for p in paths] == [[0], [1]]

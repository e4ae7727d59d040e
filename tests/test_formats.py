"""WebDataset tar and Parquet shards, fsspec data roots, plug-in decoders from entry points."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.cli import main as shardstream_main
from shardstream.client import Loader
from shardstream.client.errors import DataLossError, ShardChangedError
from shardstream.server import DatasetSpec, WorkerConfig, _decoders, _decoding, make_dataset
from shardstream.server._catalog import CatalogError
from shardstream.server._decoders import DecodeError, decoder_class, format_for_path
from shardstream.server._files import glob_url, info_stamp

from conftest import collect_epoch, ids_of, running_workers

SIZE = 16


@pytest.fixture
def wds_size(monkeypatch: pytest.MonkeyPatch) -> int:
    """Workers decode wds images to SIZE x SIZE (fresh decoder instances read the variable)."""
    pytest.importorskip("PIL", reason="the wds format needs Pillow (shardstream[wds])")
    monkeypatch.setenv("SHARDSTREAM_WDS_SIZE", str(SIZE))
    monkeypatch.setattr(_decoding, "_decoders", {})
    return SIZE


def jpeg(image: np.ndarray, fmt: str = "JPEG") -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format=fmt)
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def sample(key: str, label: int = 1, image: bytes | None = None) -> list[tuple[str, bytes]]:
    pixels = np.full((SIZE, SIZE, 3), 128, np.uint8)
    return [(f"{key}.jpg", image or jpeg(pixels)), (f"{key}.cls", str(label).encode())]


def corrupt_member(path: Path, name: str) -> None:
    """Overwrite a member's data in place with zeros (the tar stays well-formed)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(name)
    with path.open("r+b") as f:
        f.seek(info.offset_data)
        f.write(bytes(info.size))


# --- wds ---------------------------------------------------------------------------------


async def test_wds_round_trip_through_a_worker(tmp_path: Path, wds_size: int) -> None:
    make_dataset(tmp_path, shards=3, records=50, shape=(SIZE, SIZE, 3), format="wds", seed=3)
    async with running_workers(tmp_path, 2, datasets=("train=*.tar",)) as workers:
        async with Loader([w.address for w in workers], dataset="train", batch_size=8) as loader:
            batches = await collect_epoch(loader, 0)
    ids = ids_of(batches)
    assert sorted(ids.tolist()) == list(range(50))  # exactly once
    for batch in batches:
        assert batch["image"].shape == (len(batch["id"]), SIZE, SIZE, 3)
        assert batch["image"].dtype == np.uint8
        assert np.array_equal(batch["label"], batch["id"] % 10)


def test_wds_decoder_reads_members_by_offset_only(
    tmp_path: Path, wds_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardstream.server import _wds

    (path,) = make_dataset(tmp_path, shards=1, records=40, shape=(SIZE, SIZE, 3), format="wds")
    (twin,) = make_dataset(tmp_path / "npz", shards=1, records=40, shape=(SIZE, SIZE, 3))
    decoder = _wds.WdsDecoder()
    opened: list[int] = []

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("indexing decoded an image")

    import PIL.Image

    with monkeypatch.context() as m:
        m.setattr(PIL.Image, "open", no_decoding)
        meta = decoder.index(path)
    assert meta.records == 40
    image = f"image:uint8[{SIZE}x{SIZE}x3]"
    assert [str(f) for f in meta.schema] == ["id:int64[scalar]", image, "label:int64[scalar]"]

    class Counting(io.BufferedReader):
        def read(self, n: int | None = -1) -> bytes:
            data = super().read(n)
            opened.append(len(data))
            return data

    monkeypatch.setattr(_wds, "open_shard", lambda p: Counting(io.FileIO(p)))
    got = decoder.read(path, 17, 2)
    assert got["id"].tolist() == [17, 18] and got["label"].tolist() == [7, 8]
    with tarfile.open(path) as tar:
        wanted = [
            m.size for m in tar.getmembers() if m.name.startswith(("0000000017", "0000000018"))
        ]
    assert len(wanted) == 6 and sorted(opened) == sorted(wanted)  # those members, nothing else
    from PIL import Image

    with tarfile.open(path) as tar:
        stored = tar.extractfile("0000000018.jpg").read()  # type: ignore[union-attr]
    assert np.array_equal(got["image"][1], np.asarray(Image.open(io.BytesIO(stored))))
    want = np.load(twin)["image"][17:19].astype(np.int16)
    assert np.abs(got["image"].astype(np.int16) - want).mean() < 8  # JPEG: close, not equal


def test_wds_resizes_the_shorter_side_and_crops_the_center(tmp_path: Path, wds_size: int) -> None:
    from shardstream.server._wds import WdsDecoder

    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20, 0] = wide[:, 20:40, 1] = wide[:, 40:, 2] = 255  # red | green | blue
    tall = np.zeros((64, 32, 3), np.uint8)
    tall[16:48, :, :] = 200  # a band in the middle
    path = write_tar(tmp_path / "a.tar", [
        ("k0.png", jpeg(wide, "PNG")), ("k0.cls", b"3"), ("k0.txt", b"wide"),
        ("k1.jpeg", jpeg(tall)), ("k1.cls", b" 4\n"), ("k1.txt", b"tall"),
    ])  # fmt: skip
    decoder = WdsDecoder()
    # no .id: no field; other members are fields named by their extension (.txt: text)
    assert [str(f) for f in decoder.index(path).schema] == [
        f"image:uint8[{SIZE}x{SIZE}x3]", "label:int64[scalar]", "txt:string",
    ]  # fmt: skip
    got = decoder.read(path, 0, 2)
    assert got["label"].tolist() == [3, 4]
    assert got["txt"].values.tobytes() == b"widetall" and got["txt"].lengths.tolist() == [4, 4]
    center = got["image"][0].astype(int)
    assert center.shape == (SIZE, SIZE, 3)
    assert center[..., 1].mean() > 200 and center[..., 0].mean() < 60 and center[..., 2].mean() < 60
    assert got["image"][1].mean() > 150  # the crop keeps the middle band


@pytest.mark.parametrize(
    ("members", "why"),
    [
        ([*sample("a"), ("b.cls", b"1")], r"sample 'b' \(record 1\) has no image"),
        ([("a.jpg", b"x"), *sample("b")], r"sample 'a' \(record 0\) has no label"),
        ([*sample("b"), *sample("a")], "sample 'a' comes after 'b'.*zero-pad"),
        ([*sample("a"), *sample("b"), ("a.id", b"1")], "sample 'a' comes after 'b'"),
        ([*sample("a"), ("a.png", b"x")], "sample 'a' has two images"),
        ([*sample("a"), ("README", b"x")], "member 'README' is not named KEY.EXTENSION"),
        ([*sample("a"), *sample("b"), ("b.id", b"1")], "sample 'b' has an .id member, unlike"),
    ],
)
def test_wds_bad_layout_is_refused_at_index(
    tmp_path: Path, wds_size: int, members: list[tuple[str, bytes]], why: str
) -> None:
    from shardstream.server._wds import WdsDecoder

    with pytest.raises(DecodeError, match=why):
        WdsDecoder().index(write_tar(tmp_path / "bad.tar", members))


def test_wds_truncated_tar_and_per_record_errors(
    tmp_path: Path, wds_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from shardstream.server._wds import WdsDecoder

    (path,) = make_dataset(tmp_path, shards=1, records=6, shape=(SIZE, SIZE, 3), format="wds")
    data = path.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError, match="truncated"):
        WdsDecoder().index(cut)
    corrupt_member(path, "0000000004.cls")  # zeros: not an integer
    with pytest.raises(DecodeError, match=r"'0000000004' \(record 4\): its .cls member holds") as e:
        WdsDecoder().read(path, 2, 4)
    assert e.value.record == 4
    monkeypatch.setenv("SHARDSTREAM_WDS_MAX_IMAGE_BYTES", "100")
    with pytest.raises(DecodeError, match="more than the limit of 100") as e:
        WdsDecoder().read(path, 1, 2)
    assert e.value.record == 1
    monkeypatch.setenv("SHARDSTREAM_WDS_MAX_IMAGE_BYTES", "1000000")
    import PIL.Image

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 50)  # 16 x 16 > 2 x 50: a "bomb"
    with pytest.raises(DecodeError, match=r"record 0\): cannot decode .*DecompressionBombError"):
        WdsDecoder().read(path, 0, 1)
    monkeypatch.setenv("SHARDSTREAM_WDS_SIZE", "0")
    with pytest.raises(ValueError, match=r"SHARDSTREAM_WDS_SIZE must be an integer in \[1, 8192\]"):
        WdsDecoder()


@pytest.mark.parametrize("on_error", ["raise", "skip"])
async def test_wds_corrupt_jpeg_is_data_loss_or_skipped(
    tmp_path: Path, wds_size: int, on_error: str
) -> None:
    make_dataset(tmp_path, shards=2, records=20, shape=(SIZE, SIZE, 3), format="wds")
    corrupt_member(tmp_path / "shard-00001.tar", "0000000013.jpg")  # record 3 of shard 1
    async with running_workers(tmp_path, 1, datasets=("train=*.tar",)) as (worker,):
        opts: dict[str, Any] = {"dataset": "train", "batch_size": 4, "on_error": on_error}
        async with Loader([worker.address], **opts) as loader:
            if on_error == "raise":
                with pytest.raises(DataLossError) as info:
                    await collect_epoch(loader, 0)
                assert (info.value.shard, info.value.record) == ("shard-00001.tar", 3)
                assert "cannot decode its image" in str(info.value)
                return
            ids = ids_of(await collect_epoch(loader, 0))
            assert loader.statistics().records_skipped == 1
    assert sorted(ids.tolist()) == [i for i in range(20) if i != 13]


def test_make_dataset_wds_from_the_command_line(tmp_path: Path, wds_size: int) -> None:
    args = ["make-dataset", str(tmp_path), "--format", "wds", "--shards", "2", "--records", "5"]
    assert shardstream_main([*args, "--shape", f"{SIZE},{SIZE},3"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.tar", "shard-00001.tar"]
    with tarfile.open(tmp_path / "shard-00001.tar") as tar:
        assert tar.getnames() == [f"000000000{i}.{e}" for i in (3, 4) for e in ("jpg", "cls", "id")]
    with pytest.raises(ValueError, match=r"wds images need a shape \(H, W, 3\), got \(4, 3\)"):
        make_dataset(tmp_path / "x", shards=1, records=1, shape=(4, 3), format="wds")


# --- parquet -----------------------------------------------------------------------------


@pytest.fixture
def pa() -> Any:
    return pytest.importorskip("pyarrow", reason="the parquet format needs pyarrow")


def write_parquet(pa: Any, path: Path, columns: dict[str, Any], row_group_size: int) -> Path:
    import pyarrow.parquet as pq

    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return path


def test_parquet_round_trip_reads_only_the_row_groups_needed(
    tmp_path: Path, pa: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pyarrow.parquet as pq

    from shardstream.server._parquet import ParquetDecoder

    n = 1000
    rng = np.random.default_rng(0)
    want = {
        "id": np.arange(n, dtype=np.int64),
        "x": rng.random(n, dtype=np.float32),
        "flag": np.arange(n) % 3 == 0,
        "half": np.arange(n, dtype=np.float16),
        "vec": rng.integers(-100, 100, size=(n, 3), dtype=np.int16),
        "seq": rng.random((n, 2)),
        "img": rng.integers(0, 256, size=(n, 2, 2, 3), dtype=np.uint8),
    }
    types = {"id": pa.int64(), "x": pa.float32(), "flag": pa.bool_(), "half": pa.float16()}
    schema = pa.schema(
        [
            *(pa.field(k, t) for k, t in types.items()),
            pa.field("vec", pa.list_(pa.int16(), 3)),
            pa.field("seq", pa.list_(pa.float64())),
            pa.field("img", pa.list_(pa.uint8(), 12), metadata={"shardstream.shape": "[2, 2, 3]"}),
        ]
    )
    table = pa.Table.from_arrays(
        [
            *(pa.array(want[k]) for k in types),
            pa.FixedSizeListArray.from_arrays(pa.array(want["vec"].ravel()), 3),
            pa.array(list(want["seq"]), pa.list_(pa.float64())),
            pa.FixedSizeListArray.from_arrays(pa.array(want["img"].ravel()), 12),
        ],
        schema=schema,
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=128)
    decoder = ParquetDecoder()
    meta = decoder.index(path)
    assert meta.records == n
    assert [str(f) for f in meta.schema] == [
        "id:int64[scalar]", "x:float32[scalar]", "flag:bool[scalar]", "half:float16[scalar]",
        "vec:int16[3]", "seq:float64[*]", "img:uint8[2x2x3]",
    ]  # fmt: skip
    groups: list[list[int]] = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        groups.append(list(kwargs["row_groups"]))
        return iter_batches(self, *args, **kwargs)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the whole file was read")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", refuse)
    monkeypatch.setattr(pq.ParquetFile, "read", refuse)
    monkeypatch.setattr(pq, "read_table", refuse)
    for start, count in [(0, 1), (120, 20), (250, 300), (999, 1), (0, n), (5, 0)]:
        fresh = start == 120  # a decoder that never indexed the shard
        got = (ParquetDecoder() if fresh else decoder).read(path, start, count)
        for name, array in want.items():
            value = got[name]
            if name == "seq":  # a list column is ragged: values + offsets
                assert value.lengths.tolist() == [2] * count
                value = value.values.reshape(count, 2)
            np.testing.assert_array_equal(value, array[start : start + count], err_msg=name)
            assert value.dtype == array.dtype and value.flags.c_contiguous
    assert groups[:3] == [[0], [0, 1], [1, 2, 3, 4]]


async def test_parquet_through_a_worker_matches_npz(tmp_path: Path, pa: Any) -> None:
    make_dataset(tmp_path / "pq", shards=3, records=700, shape=(2, 3), format="parquet")
    async with running_workers(tmp_path / "pq", 1, datasets=("train=*.parquet",)) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=64) as loader:
            batches = await collect_epoch(loader, 0)
    ids = ids_of(batches)
    assert sorted(ids.tolist()) == list(range(700))
    by_id = dict(zip(ids.tolist(), np.concatenate([b["image"] for b in batches]), strict=True))
    twins = make_dataset(tmp_path / "npz", shards=3, records=700, shape=(2, 3))
    images = np.concatenate([np.load(p)["image"] for p in twins])
    assert all(np.array_equal(by_id[i], images[i]) for i in range(700))


def test_parquet_nulls_ragged_lists_and_unsupported_types(tmp_path: Path, pa: Any) -> None:
    import pyarrow.parquet as pq

    from shardstream.server._parquet import ParquetDecoder

    x: list[float | None] = [float(i) for i in range(300)]
    x[137] = None
    path = write_parquet(pa, tmp_path / "nulls.parquet", {"x": x}, 100)
    decoder = ParquetDecoder()
    assert decoder.read(path, 0, 100)["x"].tolist() == x[:100]
    with pytest.raises(DecodeError, match="column 'x' holds a null at record 137") as e:
        decoder.read(path, 120, 50)
    assert e.value.record == 137
    inner = pa.array([[1, 2], [3, None], [5, 6]], pa.list_(pa.int32(), 2))
    path = write_parquet(pa, tmp_path / "inner.parquet", {"v": inner}, 2)
    with pytest.raises(DecodeError, match="column 'v' holds a null at record 1"):
        decoder.read(path, 0, 3)
    ragged = pa.array([[1, 2], [3, 4], [5]], pa.list_(pa.int64()))
    path = write_parquet(pa, tmp_path / "ragged.parquet", {"r": ragged}, 2)
    assert decoder.index(path).schema[0].shape == (-1,)  # a list column is ragged
    got = decoder.read(path, 1, 2)["r"]
    assert got.lengths.tolist() == [2, 1] and got.values.tolist() == [3, 4, 5]
    nulls = pa.array([[1], [2, None], [3]], pa.list_(pa.int64()))
    path = write_parquet(pa, tmp_path / "ragged-null.parquet", {"r": nulls}, 3)
    with pytest.raises(DecodeError, match="column 'r' holds a null at record 1"):
        decoder.read(path, 0, 3)
    # with a fixed shape in its metadata, every row must have it
    fixed = pa.schema([pa.field("r", pa.list_(pa.int64()), metadata={"shardstream.shape": "[2]"})])
    table = pa.Table.from_arrays([ragged], schema=fixed)
    pq.write_table(table, tmp_path / "fixed.parquet", row_group_size=2)
    assert decoder.index(tmp_path / "fixed.parquet").schema[0].shape == (2,)
    with pytest.raises(DecodeError, match="column 'r' has 1 values at record 2") as e:
        decoder.read(tmp_path / "fixed.parquet", 1, 2)
    assert e.value.record == 2
    path = write_parquet(pa, tmp_path / "s.parquet", {"id": [1, 2], "s": pa.array(["a", "b"])}, 1)
    assert str(ParquetDecoder().index(path).schema[1]) == "s:string"
    for name, column in [
        ("st", pa.array([{"a": 1}, {"a": 2}])),
        ("ts", pa.array([1, 2], pa.timestamp("s"))),
        ("nested", pa.array([[[1]], [[2]]], pa.list_(pa.list_(pa.int8())))),
    ]:  # left out, named, unless selected (tests/test_ragged.py)
        path = write_parquet(pa, tmp_path / f"{name}.parquet", {"id": [1, 2], name: column}, 1)
        meta = ParquetDecoder().index(path)
        assert [f.name for f in meta.schema] == ["id"]
        assert f"column '{name}' has type" in meta.skipped[0]
        path = write_parquet(pa, tmp_path / f"only-{name}.parquet", {name: column}, 1)
        with pytest.raises(DecodeError, match=f"column '{name}' has type"):
            ParquetDecoder().index(path)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(DecodeError, match="not a readable parquet file"):
        ParquetDecoder().index(junk)


async def test_parquet_null_through_a_worker_is_data_loss(tmp_path: Path, pa: Any) -> None:
    ids = list(range(50))
    label: list[int | None] = [i % 10 for i in ids]
    label[42] = None
    write_parquet(pa, tmp_path / "a.parquet", {"id": ids, "label": label}, 16)
    async with running_workers(tmp_path, 1, datasets=("train=*.parquet",)) as (worker,):
        async with Loader([worker.address], dataset="train", batch_size=10) as loader:
            with pytest.raises(DataLossError) as info:
                await collect_epoch(loader, 0)
    assert (info.value.shard, info.value.record) == ("a.parquet", 42)
    assert "column 'label' holds a null" in str(info.value)


def test_formats_without_their_optional_library(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"PAR1")
    code = textwrap.dedent(f"""
        import sys
        sys.modules["pyarrow"] = sys.modules["PIL"] = None  # as if not installed
        from pathlib import Path
        import shardstream.server
        from shardstream.server._decoders import DecodeError, decoder_class, format_for_path
        assert format_for_path("a.parquet") == "parquet" and format_for_path("a.tar") == "wds"
        for fmt in ("parquet", "wds"):
            try:
                decoder_class(fmt)().index(Path({str(tmp_path / "x")!r}))
            except DecodeError as e:
                print(e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'shardstream[parquet]'" in out.stdout
    assert "pip install 'shardstream[wds]'" in out.stdout


# --- fsspec data roots -------------------------------------------------------------------


@pytest.fixture
def memfs() -> Iterator[Any]:
    fsspec = pytest.importorskip("fsspec", reason="URL data roots need fsspec")
    fs = fsspec.filesystem("memory")
    yield fs
    if fs.exists("/shardstream-test"):
        fs.rm("/shardstream-test", recursive=True)


def test_worker_config_keeps_urls_and_makes_other_roots_paths() -> None:
    ds = (DatasetSpec.parse("t=*.npz"),)
    assert WorkerConfig(data_root="memory://d", datasets=ds).data_root == "memory://d"
    assert WorkerConfig(data_root="/srv/data", datasets=ds).data_root == Path("/srv/data")


async def test_file_url_root_end_to_end_with_processes(tmp_path: Path) -> None:
    pytest.importorskip("fsspec", reason="URL data roots need fsspec")
    make_dataset(tmp_path / "npz", shards=3, records=90, shape=(2,))
    make_dataset(tmp_path / "csv", shards=2, records=30, shape=(2,), format="csv")
    root = f"file://{tmp_path}"
    datasets = ("train=npz/*.npz", "text=csv/part-*:csv")
    async with running_workers(root, 1, datasets=datasets, processes=1) as (worker,):
        assert sorted(worker._servicer.catalog.datasets["train"].by_id) == [  # type: ignore[union-attr]
            "npz/shard-00000.npz", "npz/shard-00001.npz", "npz/shard-00002.npz"]  # fmt: skip
        for name, total in (("train", 90), ("text", 30)):
            async with Loader([worker.address], dataset=name, batch_size=7) as loader:
                ids = ids_of(await collect_epoch(loader, 0))
            assert sorted(ids.tolist()) == list(range(total))


async def test_memory_url_root_serves_every_format(
    tmp_path: Path, memfs: Any, wds_size: int
) -> None:
    pytest.importorskip("pyarrow", reason="the parquet format needs pyarrow")
    shapes = {"npz": (2, 3), "csv": (2,), "wds": (SIZE, SIZE, 3), "parquet": (3,)}
    for fmt, shape in shapes.items():
        for p in make_dataset(tmp_path / fmt, shards=2, records=12, shape=shape, format=fmt):
            memfs.pipe(f"/shardstream-test/{fmt}/{p.name}", p.read_bytes())
    memfs.pipe("/shardstream-test/csv/_schema.json", (tmp_path / "csv/_schema.json").read_bytes())
    datasets = ("n=npz/*.npz", "c=csv/part-*:csv", "w=wds/*.tar", "p=parquet/*.parquet")
    async with running_workers("memory://shardstream-test", 1, datasets=datasets) as (worker,):
        for name in ("n", "c", "w", "p"):
            async with Loader([worker.address], dataset=name, batch_size=5) as loader:
                batches = await collect_epoch(loader, 0)
            assert sorted(ids_of(batches).tolist()) == list(range(12)), name
            assert all(np.array_equal(b["label"], b["id"] % 10) for b in batches)
        shard = "/shardstream-test/npz/shard-00001.npz"
        memfs.pipe(shard, memfs.cat(shard))  # the same bytes, but a new file
        async with Loader([worker.address], dataset="n", batch_size=5) as loader:
            with pytest.raises(ShardChangedError, match="changed since it was indexed"):
                await collect_epoch(loader, 0)


async def test_url_roots_refuse_escapes(
    tmp_path: Path, memfs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_dataset(tmp_path / "root", shards=1, records=2, shape=(1,))
    make_dataset(tmp_path / "outside", shards=1, records=2, shape=(1,))
    (tmp_path / "root" / "link.npz").symlink_to(tmp_path / "outside" / "shard-00000.npz")
    with pytest.raises(CatalogError, match=r"resolves to .*outside the data root"):
        async with running_workers(f"file://{tmp_path}/root", 1, datasets=("t=*.npz",)):
            pass
    memfs.pipe("/shardstream-test/data/a.npz", b"x")
    memfs.pipe("/shardstream-test/data2/b.npz", b"x")
    assert glob_url("memory://shardstream-test/data", "*") == [
        ("a.npz", "memory:///shardstream-test/data/a.npz")]  # fmt: skip
    for pattern in ("../data2/*", "/shardstream-test/data2/*", "x/../../data2/b.npz"):
        with pytest.raises(ValueError, match="must stay inside the data root"):
            glob_url("memory://shardstream-test/data", pattern)
    outside = {"/shardstream-test/data2/b.npz": {"type": "file"}}
    monkeypatch.setattr(type(memfs), "glob", lambda self, pattern, detail: outside)
    with pytest.raises(ValueError, match=r"data2/b\.npz is outside the data root"):
        glob_url("memory://shardstream-test/data", "*")
    monkeypatch.undo()
    with pytest.raises(CatalogError, match="is not a directory"):
        async with running_workers("memory://shardstream-test/nope", 1, datasets=("t=*.npz",)):
            pass
    with pytest.raises(CatalogError, match="no file under memory:///shardstream-test/data "):
        async with running_workers("memory://shardstream-test/data", 1, datasets=("t=*.x",)):
            pass


async def test_url_root_without_fsspec_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "fsspec.core", None)
    with pytest.raises(CatalogError, match=r"need fsspec: pip install 'shardstream\[fsspec\]'"):
        async with running_workers("s3://bucket/data", 1, datasets=("t=*.npz",)):
            pass


def test_url_stamps_hold_every_time_and_checksum() -> None:
    import datetime

    when = datetime.datetime(2024, 1, 2, tzinfo=datetime.UTC)
    assert info_stamp({"size": 5, "mtime": 1.5, "ETag": '"x"'}) == (5, 'mtime=1500000000 ETag="x"')
    assert info_stamp({"size": 5, "LastModified": when}) == (
        5,
        f"LastModified={int(when.timestamp()) * 10**9}",
    )
    assert info_stamp({"size": 5, "ETag": '"abc"'}) == (5, 'ETag="abc"')
    assert info_stamp({"size": 5}) == (5, "")


# --- plug-in decoders from entry points --------------------------------------------------


def test_installed_distribution_entry_point_registers_a_decoder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "ss_fake_plugin.py").write_text(
        textwrap.dedent("""
        import numpy as np
        from shardstream.server import Decoder, ShardMeta
        from shardstream.v1.codec import FieldSpec

        class Sevens(Decoder):
            name = "sevens"
            suffixes = (".sevens",)

            def index(self, path):
                return ShardMeta(records=4, schema=(FieldSpec(name="x", dtype="int8", shape=()),))

            def read(self, path, start, count):
                return {"x": np.full(count, 7, np.int8)}
    """)
    )
    info = tmp_path / "ss_fake_plugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ss-fake-plugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[shardstream.decoders]\nsevens = ss_fake_plugin:Sevens\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(_decoders, "_REGISTRY", dict(_decoders._REGISTRY))
    monkeypatch.delitem(sys.modules, "ss_fake_plugin", raising=False)
    assert "sevens" in _decoders.register_plugins()
    cls = decoder_class("sevens")
    assert cls.__module__ == "ss_fake_plugin"
    assert format_for_path("data/a.sevens") == "sevens"
    assert _decoders.decoder_ref("sevens") == "ss_fake_plugin:Sevens"
    assert cls().read(Path("a.sevens"), 0, 2)["x"].tolist() == [7, 7]
    sys.modules.pop("ss_fake_plugin", None)

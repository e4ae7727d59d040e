"""Decoders bound what a read decodes before they allocate it: a small shard whose
records would decode to gigabytes (many large tar members in one sample, a parquet row
group of 10^7 zeros, a JSON line of small numbers, a csv line that is one long hole) is
refused naming shard and record, or read a bounded piece at a time, never decoded whole.

Memory bounds are read from real worker processes (`--processes 0`): their peak
resident set (`VmHWM` in /proc/PID/status). Large files are sparse (holes cost no disk)
or compress to a few MB.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_hostile_shards import fresh_decoders, peak_rss  # noqa: F401  (an autouse fixture)

from shardstream.client import Loader
from shardstream.client.errors import DataLossError
from shardstream.server._decoders import DecodeError
from shardstream.server._process import WorkerProcess

MiB = 1 << 20
PEAK_BOUND = 250 * MiB  # a worker's peak RSS (now 75-150 MiB; before: 0.4-1.2 GB)
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads peak RSS from /proc/PID/status"
)


async def refused(
    root: Path,
    dataset: str,
    batch_size: int,
    at: tuple[str, int],
    env: dict[str, str] | None = None,
) -> str:
    """The DataLossError an epoch ends with, which must name shard and record `at`, from
    a worker process serving `dataset` of `root` within `PEAK_BOUND` of memory."""
    err, peak = await first_error(root, dataset, batch_size, env)
    assert peak < PEAK_BOUND, f"worker peak RSS {peak / MiB:.0f} MiB"
    assert (err.shard, err.record) == at
    return str(err)


async def first_error(
    root: Path, dataset: str, batch_size: int, env: dict[str, str] | None = None
) -> tuple[DataLossError, int]:
    """(the DataLossError an epoch ends with, the worker's peak RSS) from a worker
    process serving `dataset` of `root`."""
    args = ["--data-root", str(root), "--dataset", dataset, "--processes", "0"]
    with WorkerProcess.start(args, env=env) as worker:
        name = dataset.split("=", 1)[0]
        async with Loader(
            [worker.address], dataset=name, batch_size=batch_size, retry_deadline=5
        ) as loader:
            with pytest.raises(DataLossError) as info:
                async for _ in loader.epoch(0):
                    pass
        peak = peak_rss(worker.pid)
    return info.value, peak


# -- wds: a sample's members together ------------------------------------------------------


def png(side: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 77, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def sparse_tar(path: Path, image: bytes, big: int) -> None:
    """Samples 0..7, each an image, a label and 24 other members of 8 bytes, but those
    of sample 5: holes of `big` bytes each."""
    with open(path, "wb") as f:

        def member(name: str, data: bytes = b"", hole: int = 0) -> None:
            info = tarfile.TarInfo(name)
            info.size = hole or len(data)
            f.write(info.tobuf(format=tarfile.USTAR_FORMAT))
            if hole:
                f.seek(hole + -hole % tarfile.BLOCKSIZE, 1)
            else:
                f.write(data + bytes(-len(data) % tarfile.BLOCKSIZE))

        for i in range(8):
            member(f"{i:06d}.png", image)
            member(f"{i:06d}.cls", b"1")
            for j in range(24):
                name = f"{i:06d}.x{j:02d}"
                member(name, hole=big) if i == 5 else member(name, b"12345678")
        f.seek(2 * tarfile.BLOCKSIZE, 1)
        f.truncate()


@linux_only
async def test_wds_sample_of_many_large_members_is_refused_before_it_is_read(
    tmp_path: Path,
) -> None:
    """Each member under SHARDSTREAM_WDS_MAX_IMAGE_BYTES (16 MiB here), 24 of them in one
    sample: 360 MiB (sparse). Before: read whole (peak 0.8 GB), then refused as larger
    than a message. Now: refused from the tar headers, naming shard and record."""
    pytest.importorskip("PIL", reason="the wds format needs Pillow (shardstream[wds])")
    image, big = png(8), 15 * MiB
    sparse_tar(tmp_path / "a.tar", image, big)
    assert (tmp_path / "a.tar").stat().st_blocks * 512 < 2 * MiB
    env = {
        "SHARDSTREAM_WDS_SIZE": "8",
        "SHARDSTREAM_WDS_MAX_IMAGE_BYTES": str(16 * MiB),
        "SHARDSTREAM_READ_BUDGET_BYTES": str(16 * MiB),
    }
    err = await refused(tmp_path, "img=*.tar", 1, ("a.tar", 5), env)
    assert f"take {24 * big + len(image)} bytes together" in err
    assert "SHARDSTREAM_WDS_MAX_IMAGE_BYTES" in str(err)


# -- parquet: row groups decoded in batches -------------------------------------------------


@linux_only
async def test_parquet_row_group_of_zeros_is_served_in_bounded_memory(tmp_path: Path) -> None:
    """One row group of 2 x 30M zero int64s: ~1 MB of parquet, 480 MB decoded. Before: a
    read of the first records decoded the whole row group (peak 0.7 GB). Now: rows are
    decoded in batches within the read budget, only as far as the read goes."""
    pa = pytest.importorskip("pyarrow", reason="the parquet format needs pyarrow")
    import pyarrow.parquet as pq

    zeros = pa.array(np.zeros(30_000_000, np.int64))
    table = pa.table({"x": zeros, "y": zeros})
    pq.write_table(table, tmp_path / "z.parquet", row_group_size=len(zeros), compression="zstd")
    del table, zeros
    assert (tmp_path / "z.parquet").stat().st_size < 4 * MiB
    args = ["--data-root", str(tmp_path), "--dataset", "z=*.parquet", "--processes", "0"]
    with WorkerProcess.start(args) as worker:
        async with Loader([worker.address], dataset="z", batch_size=4) as loader:
            async for batch in loader.epoch(0):
                assert batch["x"].shape == (4,) and not batch["x"].any() and not batch["y"].any()
                break
        peak = peak_rss(worker.pid)
    assert peak < PEAK_BOUND, f"worker peak RSS {peak / MiB:.0f} MiB"


def test_parquet_reads_decode_batches_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads across row groups, from any row, in batches of at most budget / row bytes
    rows: the same records as pyarrow reads whole."""
    pa = pytest.importorskip("pyarrow", reason="the parquet format needs pyarrow")
    import pyarrow.parquet as pq

    from shardstream.server._parquet import ParquetDecoder

    n = 1000
    rng = np.random.default_rng(0)
    x, v = rng.random(n), rng.integers(0, 9, (n, 3)).astype(np.int32)
    lists = [list(range(i % 5)) for i in range(n)]
    table = pa.table(
        {
            "x": x,
            "v": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 3),
            "seq": pa.array(lists, pa.list_(pa.int64())),
        }
    )
    path = tmp_path / "t.parquet"
    pq.write_table(table, path, row_group_size=300)
    monkeypatch.setenv("SHARDSTREAM_READ_BUDGET_BYTES", "4096")
    sizes: list[int] = []
    iter_batches = pq.ParquetFile.iter_batches

    def spy(self: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(kwargs["batch_size"])
        return iter_batches(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    decoder = ParquetDecoder()
    assert decoder.index(path).records == n
    row = 8 + 12 + 8  # x, v, and a ragged field's length
    for start, count in [(0, 1), (0, 300), (250, 400), (299, 2), (650, 350), (999, 1), (0, n)]:
        got = decoder.read(path, start, count)
        np.testing.assert_array_equal(got["x"], x[start : start + count])
        np.testing.assert_array_equal(got["v"], v[start : start + count])
        want = lists[start : start + count]
        assert got["seq"].lengths.tolist() == [len(s) for s in want]
        assert got["seq"].values.tolist() == [i for s in want for i in s]
    assert sizes and all(0 < s <= 4096 // row for s in sizes), sizes


# -- jsonl: values counted before a line is parsed -----------------------------------------


@linux_only
async def test_jsonl_line_of_small_numbers_is_refused_before_it_is_parsed(
    tmp_path: Path,
) -> None:
    """A 19 MiB line of 10M zeros (within the 64 MiB line budget): before, parsed into
    a list of 10M ints and arrays (peak 0.4 GB), then refused as larger than a message.
    Now: its values are counted first and it is refused naming shard and record."""
    (tmp_path / "_schema.json").write_text(
        json.dumps({"fields": [{"name": "tokens", "dtype": "int64", "shape": [-1]}]})
    )
    lines = [json.dumps({"tokens": [i, 2, 3]}) for i in range(12)]
    zeros = '{"tokens": [' + ",".join(["0"] * 10_000_000) + "]}"
    (tmp_path / "a.jsonl").write_text("\n".join([*lines, zeros]) + "\n")
    del zeros
    err = await refused(tmp_path, "t=*.jsonl", 4, ("a.jsonl", 12))
    assert "holds up to 10000000 values" in err and "SHARDSTREAM_READ_BUDGET" in err


def test_jsonl_values_are_bounded_by_the_read_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a 64 KiB budget, a line of 1000 numbers decodes, one of 2000 (10 KB of text,
    well within the line budget) is refused, also while inferring the fields."""
    from shardstream.server._jsonl import JsonlDecoder

    monkeypatch.setenv("SHARDSTREAM_READ_BUDGET_BYTES", str(64 * 1024))
    lines = [{"id": i, "tokens": [12345] * 1000} for i in range(3)]
    lines[1]["tokens"] = [1] * 2000
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(d) + "\n" for d in lines[::2]))
    decoder = JsonlDecoder()
    assert decoder.read(tmp_path / "b.jsonl", 0, 2)["tokens"].lengths.tolist() == [1000] * 2
    with pytest.raises(DecodeError, match=r"a\.jsonl: record 1 holds up to 2001 values") as e:
        decoder.index(tmp_path / "a.jsonl")  # fields inferred from the first lines
    assert e.value.record == 1
    fields = [{"name": "id", "dtype": "int64", "shape": []}]
    (tmp_path / "_schema.json").write_text(json.dumps({"fields": fields}))
    decoder = JsonlDecoder()
    assert decoder.index(tmp_path / "a.jsonl").records == 3
    assert decoder.read(tmp_path / "a.jsonl", 2, 1)["id"].tolist() == [2]
    with pytest.raises(DecodeError, match=r"record 1 holds up to 2001 values") as e:
        decoder.read(tmp_path / "a.jsonl", 0, 3)  # keys no field names are parsed too
    assert e.value.record == 1


# -- csv: lines read within the budget -----------------------------------------------------


@linux_only
async def test_csv_line_that_is_a_long_hole_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """A part file whose line 31 is 96 MiB of NUL bytes (a hole: nothing on disk).
    Before: indexing held the line, a read parsed it (peak 1.2 GB). Now: indexing reads
    in blocks, and a read refuses the line unread, naming shard and record."""
    lines = b"".join(b"%d,1.5\n" % i for i in range(30)) + b"30,1.5"
    (tmp_path / "part-000").write_bytes(lines)
    with (tmp_path / "part-000").open("r+b") as f:
        f.seek(len(lines) + 96 * MiB)
        f.write(b"\n31,2.5\n")
    assert (tmp_path / "part-000").stat().st_blocks * 512 < MiB
    err = await refused(tmp_path, "t=part-*:csv", 10, ("part-000", 30))
    assert "is longer than" in err and "SHARDSTREAM_READ_BUDGET_BYTES" in err


def test_csv_reads_parse_lines_in_parts_within_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a 4 KiB budget a line may take 512 bytes and a read parses its lines 2 KiB at
    a time: the same records as one parse; a longer line is refused, naming its record."""
    from shardstream.server import _csv

    monkeypatch.setenv("SHARDSTREAM_READ_BUDGET_BYTES", "4096")
    monkeypatch.setattr(_csv, "_STRIDE", 16)
    rng = np.random.default_rng(0)
    x = rng.random((3000, 3)).round(6)
    lines = [f"{i}," + ",".join(map(str, row)) for i, row in enumerate(x)]
    lines[2500] = f"2500,{x[2500, 0]}{' ' * 600},{x[2500, 1]},{x[2500, 2]}"  # 640 bytes
    (tmp_path / "part-000").write_text("\n".join(lines) + "\n")
    calls: list[int] = []
    parse = _csv._parse

    def spy(path: Any, texts: list[str], start: int, schema: Any) -> Any:
        calls.append(sum(len(t) for t in texts))
        return parse(path, texts, start, schema)

    monkeypatch.setattr(_csv, "_parse", spy)
    decoder = _csv.CsvDecoder()
    assert decoder.index(tmp_path / "part-000").records == 3000
    for start, count in [(0, 1), (5, 700), (1000, 1500)]:
        calls.clear()
        got = decoder.read(tmp_path / "part-000", start, count)
        np.testing.assert_array_equal(got["id"], np.arange(start, start + count))
        np.testing.assert_array_equal(got["features"], x[start : start + count])
        assert max(calls) <= 2048
    with pytest.raises(DecodeError, match=r"record 2500 \(line 2501\) is longer than 512 bytes"):
        decoder.read(tmp_path / "part-000", 2400, 200)


def indexed(path: Path) -> tuple[Any, int]:
    """A jsonl shard's index and the peak of Python's allocations while building it."""
    import tracemalloc

    from shardstream.server._jsonl import _build_index

    tracemalloc.start()
    try:
        return _build_index(path), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_indexing_a_jsonl_shard_of_short_lines_takes_16_bytes_a_line(tmp_path: Path) -> None:
    """The index keeps each line's byte range in an array. Was: a list of tuples, ~120
    bytes a line: a 100 MB shard of `{"a":1}` lines took ~1.5 GB to index."""
    fields = [{"name": "a", "dtype": "int64", "shape": []}]
    (tmp_path / "_schema.json").write_text(json.dumps({"fields": fields}))
    lines = 200_000
    (tmp_path / "s.jsonl").write_bytes(b'{"a":1}\n' * lines)
    index, peak = indexed(tmp_path / "s.jsonl")
    assert index.spans.shape == (lines, 2) and index.spans[1].tolist() == [8, 15]
    assert peak < 24 * lines + 4 * MiB, peak  # before: ~35 MB here


def test_inferring_jsonl_fields_keeps_lines_within_the_read_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a _schema.json the fields are inferred from the first lines, kept whole:
    now at most about the read budget of them. Was: 64 lines of up to the budget each
    (4 GiB at the default)."""
    monkeypatch.setenv("SHARDSTREAM_READ_BUDGET_BYTES", str(MiB))
    line = json.dumps({"a": 1, "text": "x" * (900 * 1024)}).encode() + b"\n"
    (tmp_path / "s.jsonl").write_bytes(line * 40)
    index, peak = indexed(tmp_path / "s.jsonl")
    assert [f.name for f in index.schema] == ["a", "text"] and len(index.spans) == 40
    assert peak < 8 * MiB, peak  # before: 36 MiB (40 lines of 0.9 MiB)

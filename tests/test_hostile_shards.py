"""Hostile shards: decompression bombs, sizes that lie and values that do not fit end
as precise refusals or bounded work, never as a worker's memory blown up, an UNKNOWN
error, or a quietly wrong tensor.

The bombs are small files built directly (repeated deflate blocks of zeros), so each
test writes at most a few hundred KiB and runs in seconds. Memory bounds are read from
real worker processes: their peak resident set (`VmHWM` in /proc/PID/status).
"""

from __future__ import annotations

import io
import json
import struct
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.lib import format as npformat

from shardstream.client import Loader
from shardstream.client.errors import DataLossError
from shardstream.server import Decoder, ShardMeta, _decoders, _decoding
from shardstream.server._catalog import CatalogError
from shardstream.server._decoders import DecodeError
from shardstream.server._npz import NpzDecoder
from shardstream.server._process import WorkerProcess
from shardstream.v1.codec import FieldSpec

from conftest import running_workers

MiB = 1 << 20
PEAK_BOUND = 500 * MiB  # a worker's peak RSS after meeting a bomb (today: ~1.2 GB and ~0.9 GB)
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads peak RSS from /proc/PID/status"
)


class Hog(Decoder):
    """A plug-in format whose read of records 40..49 of shard b.hog fails a real
    allocation (1 PiB). Each file holds its record count."""

    name = "hog"

    def index(self, path: Any) -> ShardMeta:
        schema = (FieldSpec(name="id", dtype="int64", shape=()),)
        return ShardMeta(records=int(Path(path).read_text()), schema=schema)

    def read(self, path: Any, start: int, count: int) -> dict[str, np.ndarray[Any, Any]]:
        if Path(path).name == "b.hog" and start <= 45 < start + count:
            np.empty(1 << 50, np.uint8)
        return {"id": np.arange(start, start + count, dtype=np.int64)}


@pytest.fixture(autouse=True)
def fresh_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process workers share this process's decoder instances: start from new ones, so
    that each test's environment (limits) applies."""
    monkeypatch.setattr(_decoding, "_decoders", {})


def peak_rss(pid: int) -> int:
    """The peak resident set size of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM in /proc/{pid}/status")


def deflated_zeros(head: bytes, zeros: int, *, wbits: int = -15) -> bytes:
    """A deflate stream of `head` then `zeros` zero bytes, built from one compressed
    MiB of zeros repeated (each block ends with a full flush, so blocks are alike)."""
    c = zlib.compressobj(9, zlib.DEFLATED, wbits)
    out = [c.compress(head) + c.flush(zlib.Z_FULL_FLUSH)]
    block = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(bytes(MiB)) + c.flush(zlib.Z_FULL_FLUSH)
    assert block == again
    whole, rest = divmod(zeros, MiB)
    if whole:
        out.append(block * whole)
    out.append(c.compress(bytes(rest)) + c.flush())
    return b"".join(out)


def crc_of_zeros(head: bytes, zeros: int) -> int:
    crc = zlib.crc32(head)
    block = bytes(MiB)
    whole, rest = divmod(zeros, MiB)
    for _ in range(whole):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(bytes(rest), crc)


def write_zip(path: Path, members: list[tuple[str, bytes, int, int, int]]) -> Path:
    """A zip of (name, data as stored, method, declared size, CRC-32) members, with
    whatever sizes they declare (under 4 GiB: no zip64)."""
    local, central = io.BytesIO(), io.BytesIO()
    for name, data, method, size, crc in members:
        raw = name.encode()
        common = (method, 0, 0x21, crc, len(data), size, len(raw), 0)  # time, date, sizes
        central_extra = (0, 0, 0, 0, local.tell())  # comment, disk, attributes, offset
        local.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, *common) + raw + data)
        entry = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, *common, *central_extra)
        central.write(entry + raw)
    cd, n = central.getvalue(), len(members)
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n, n, len(cd), local.tell(), 0)
    path.write_bytes(local.getvalue() + cd + end)
    return path


def npy_header(shape: tuple[int, ...], dtype: str, *, fortran: bool = False) -> bytes:
    buf = io.BytesIO()
    header = {"descr": np.dtype(dtype).str, "fortran_order": fortran, "shape": shape}
    npformat.write_array_header_1_0(buf, header)
    return buf.getvalue()


def npz_bomb(path: Path, shape: tuple[int, ...], dtype: str = "float32") -> Path:
    """A valid npz of one deflated array of zeros, `x`: ~1/1000 of its size on disk."""
    head = npy_header(shape, dtype)
    zeros = int(np.prod(shape)) * np.dtype(dtype).itemsize
    data = deflated_zeros(head, zeros)
    return write_zip(path, [("x.npy", data, 8, len(head) + zeros, crc_of_zeros(head, zeros))])


def png_bomb(side: int) -> bytes:
    """A valid PNG of side x side black 8-bit grey pixels (~1/1000 of their size)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    raw = side * (side + 1)  # each row: filter byte 0, then the pixels
    idat = b"\x78\x01" + deflated_zeros(b"", raw) + struct.pack(">I", (raw % 65521) << 16 | 1)
    ihdr = struct.pack(">2I5B", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def png(side: int) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 77, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# -- decompression bombs: bounded memory ------------------------------------------------


@linux_only
async def test_npz_bomb_is_served_in_bounded_memory(tmp_path: Path) -> None:
    """1 MiB of npz holding 1 GiB of deflated zeros: a worker serves its first batches
    holding only what it sends (before: each member inflated whole and cached)."""
    bomb = npz_bomb(tmp_path / "bomb.npz", (256 * 1024, 1024))  # 1 GiB of float32
    assert bomb.stat().st_size < 2 * MiB
    args = ["--data-root", str(tmp_path), "--dataset", "train=*.npz", "--processes", "0"]
    with WorkerProcess.start([*args, "--chunk-bytes", "65536"]) as worker:
        async with Loader([worker.address], dataset="train", batch_size=10) as loader:
            async for batch in loader.epoch(0):
                assert batch["x"].shape == (10, 1024) and not batch["x"].any()
                break
        peak = peak_rss(worker.pid)
    assert peak < PEAK_BOUND, f"worker peak RSS {peak / MiB:.0f} MiB"


@linux_only
async def test_png_bomb_is_data_loss_naming_shard_and_record_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """A 164 KB PNG of 13000 x 13000 pixels is refused from its header, naming shard and
    record (before: decoded, ~0.9 GB for one record)."""
    pytest.importorskip("PIL", reason="the wds format needs Pillow (shardstream[wds])")
    members: list[tuple[str, bytes]] = []
    for i in range(4):
        image = png_bomb(13_000) if i == 2 else png(16)
        members += [(f"{i:06d}.png", image), (f"{i:06d}.cls", b"1")]
    write_tar(tmp_path / "bomb.tar", members)
    with WorkerProcess.start(
        ["--data-root", str(tmp_path), "--dataset", "img=*.tar", "--processes", "0"],
        env={"SHARDSTREAM_WDS_SIZE": "16"},
    ) as worker:
        async with Loader([worker.address], dataset="img", batch_size=4) as loader:
            with pytest.raises(DataLossError) as info:
                async for _ in loader.epoch(0):
                    pass
        peak = peak_rss(worker.pid)
    err = info.value
    assert (err.shard, err.record) == ("bomb.tar", 2)
    assert "13000 x 13000" in str(err) and "SHARDSTREAM_MAX_IMAGE_PIXELS" in str(err)
    assert peak < PEAK_BOUND, f"worker peak RSS {peak / MiB:.0f} MiB"


def test_image_pixel_limit_is_an_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("PIL", reason="the wds format needs Pillow (shardstream[wds])")
    from shardstream.server._wds import WdsDecoder

    path = write_tar(tmp_path / "a.tar", [("0.png", png(16)), ("0.cls", b"3")])
    monkeypatch.setenv("SHARDSTREAM_WDS_SIZE", "8")
    assert WdsDecoder().read(path, 0, 1)["label"].tolist() == [3]
    monkeypatch.setenv("SHARDSTREAM_MAX_IMAGE_PIXELS", "255")  # 16 x 16 = 256
    with pytest.raises(DecodeError, match=r"record 0\).*16 x 16 .*limit of 255") as info:
        WdsDecoder().read(path, 0, 1)
    assert info.value.record == 0
    monkeypatch.setenv("SHARDSTREAM_MAX_IMAGE_PIXELS", "0")
    with pytest.raises(ValueError, match="SHARDSTREAM_MAX_IMAGE_PIXELS must be an integer"):
        WdsDecoder()


# -- sizes that lie: refused at start-up, naming shard and member -------------------------


async def test_npz_header_claiming_1e12_rows_refuses_start(tmp_path: Path) -> None:
    """Before: indexed, then every read a MemoryError reaching the client as UNKNOWN."""
    head = npy_header((10**12,), "float64")
    with zipfile.ZipFile(tmp_path / "huge.npz", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", head + bytes(800))
    with pytest.raises(CatalogError, match=r"huge\.npz: array 'x' declares 10{12} records"):
        async with running_workers(tmp_path, 1):
            pass


async def test_npz_size_beyond_the_compression_ratio_refuses_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The zip and the header agree on 3.2 GB, from 4 KB: no deflate stream inflates that
    much (at most ~1032:1); a lower SHARDSTREAM_MAX_COMPRESSION_RATIO refuses honest bombs."""
    shape = (400_000_000,)
    head = npy_header(shape, "int64")
    data = zlib.compress(head + bytes(4 * MiB), 9)[2:-4]  # raw deflate, ~4 KB
    size = len(head) + 8 * shape[0]
    write_zip(tmp_path / "liar.npz", [("x.npy", data, 8, size, 0)])
    with pytest.raises(CatalogError, match=r"liar\.npz: array 'x' .*compression ratio"):
        async with running_workers(tmp_path, 1):
            pass
    (tmp_path / "liar.npz").unlink()
    npz_bomb(tmp_path / "bomb.npz", (1024, 1024), "uint8")  # 1 MiB from ~1 KB: honest
    async with running_workers(tmp_path, 1):
        pass
    monkeypatch.setenv("SHARDSTREAM_MAX_COMPRESSION_RATIO", "100")
    monkeypatch.setattr(_decoding, "_decoders", {})  # new decoders read it
    with pytest.raises(CatalogError, match=r"bomb\.npz: array 'x' .*more than 100"):
        async with running_workers(tmp_path, 1):
            pass


def test_npz_stored_member_must_hold_exactly_what_its_header_declares(tmp_path: Path) -> None:
    head = npy_header((10,), "int64")
    data = head + bytes(8 * 10 + 5)  # 5 bytes more than 10 records
    path = write_zip(tmp_path / "long.npz", [("x.npy", data, 0, len(data), zlib.crc32(data))])
    with pytest.raises(DecodeError, match=r"long\.npz: array 'x' declares 10 records .* holds"):
        NpzDecoder().index(path)


def test_npz_unsupported_compression_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bz.npz"
    buf = io.BytesIO()
    npformat.write_array(buf, np.arange(10))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_BZIP2) as zf:
        zf.writestr("x.npy", buf.getvalue())
    with pytest.raises(DecodeError, match=r"bz\.npz: array 'x' is compressed with method 12"):
        NpzDecoder().index(path)


def test_npz_fortran_member_over_the_budget_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "f.npz"
    fortran = np.asfortranarray(np.arange(1000 * 8, dtype=np.float64).reshape(1000, 8))
    np.savez_compressed(path, x=fortran)
    got = NpzDecoder().read(path, 10, 5)["x"]
    np.testing.assert_array_equal(got, fortran[10:15])
    monkeypatch.setenv("SHARDSTREAM_READ_BUDGET_BYTES", "60000")  # the array takes 64000
    with pytest.raises(DecodeError, match=r"'x' is in Fortran order .*64000 bytes.*60000"):
        NpzDecoder().index(path)


# -- deflated members read as streams: the right rows; corruption refused ---------------


def test_npz_deflated_reads_equal_np_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDSTREAM_READ_BUDGET_BYTES", "4096")  # inflate in 4 KiB steps
    rng = np.random.default_rng(0)
    arrays: dict[str, np.ndarray[Any, Any]] = {
        "id": np.arange(3000, dtype=np.int64),
        "x": rng.integers(0, 5, size=(3000, 7), dtype=np.uint8),
        "big": rng.standard_normal((3000, 3)).astype(">f4"),
    }
    path = tmp_path / "c.npz"
    np.savez_compressed(path, **arrays)
    decoder = NpzDecoder()
    assert decoder.index(path).records == 3000
    for start, count in [(0, 10), (10, 500), (2990, 10), (5, 1), (0, 3000), (1500, 0)]:
        got = decoder.read(path, start, count)
        for name, want in arrays.items():
            np.testing.assert_array_equal(got[name], want[start : start + count])
            assert got[name].dtype == want.dtype.newbyteorder("<")
    out = {
        name: np.empty((40, *a.shape[1:]), a.dtype.newbyteorder("<")) for name, a in arrays.items()
    }
    schema = decoder.index(path).schema
    decoder.read_into(path, 2000, 40, out, schema)
    for name, want in arrays.items():
        np.testing.assert_array_equal(out[name], want[2000:2040])


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        (b"\xff" * 64, " at record 3983: its compressed data ends after"),
        (bytes(64), ": its CRC-32"),
    ],
    ids=["cut-short", "crc"],
)
async def test_npz_corrupt_deflated_member_refuses_start(
    tmp_path: Path, pattern: bytes, why: str
) -> None:
    """Indexing inflates each deflated member once (a step at a time) to check it: corrupt
    compressed data is refused at start-up, not served as quietly wrong rows."""
    path = tmp_path / "c.npz"
    x = np.random.default_rng(0).integers(0, 5, size=(4000, 4), dtype=np.int64)
    np.savez_compressed(path, x=x)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("x.npy")
    middle = info.header_offset + 30 + len("x.npy") + info.compress_size // 2
    raw[middle : middle + 64] = pattern
    path.write_bytes(bytes(raw))
    with pytest.raises(CatalogError, match=rf"c\.npz: array 'x' is corrupt{why}"):
        async with running_workers(tmp_path, 1):
            pass


def test_npz_crc_is_checked_when_a_read_reaches_the_end(tmp_path: Path) -> None:
    n = 100_000
    head = npy_header((n,), "uint8")
    data = deflated_zeros(head, n)
    path = write_zip(tmp_path / "crc.npz", [("x.npy", data, 8, len(head) + n, 12345)])
    decoder = NpzDecoder()
    assert not decoder.read(path, 0, n - 10)["x"].any()
    with pytest.raises(DecodeError, match=r"crc\.npz: array 'x', record 99990: its CRC-32") as e:
        decoder.read(path, n - 10, 10)  # reads check what they reach, without indexing
    assert e.value.record == n - 10
    with pytest.raises(DecodeError, match=r"crc\.npz: array 'x' is corrupt: its CRC-32"):
        NpzDecoder().index(path)


# -- MemoryError: DATA_LOSS naming the record, never UNKNOWN ----------------------------


async def test_memory_error_in_a_decoder_is_data_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decoder that runs out of memory (a real failed allocation) gives the client a
    DataLossError naming shard and record (before: UNKNOWN, retried on every worker,
    ending in WorkersUnavailableError)."""
    _decoders._load_builtin()  # registered in the registry kept, not only in its copy
    monkeypatch.setattr(_decoders, "_REGISTRY", dict(_decoders._REGISTRY))  # "hog" stays here
    (tmp_path / "a.hog").write_text("100")
    (tmp_path / "b.hog").write_text("100")
    hog = {"datasets": ("hog=*.hog:hog",), "decoders": (f"{__name__}:Hog",), "chunk_bytes": 80}
    async with (
        running_workers(tmp_path, 1, **hog) as (worker,),  # chunks of 10 records
        Loader([worker.address], dataset="hog", batch_size=10, retry_deadline=3.0) as loader,
    ):
        with pytest.raises(DataLossError) as info:
            async for _ in loader.epoch(0):
                pass
    err = info.value
    assert err.shard == "b.hog" and err.record == 40
    assert "b.hog" in str(err) and "record 40" in str(err) and "MemoryError" in str(err)


class Brittle(Hog):
    """A plug-in format whose read of records 40..49 of shard b.hog meets an exception
    no decoder foresees (a parser's RecursionError)."""

    name = "brittle"

    def read(self, path: Any, start: int, count: int) -> dict[str, np.ndarray[Any, Any]]:
        if Path(path).name == "b.hog" and start <= 45 < start + count:
            raise RecursionError("maximum recursion depth exceeded while decoding a JSON array")
        return super().read(path, start, count)


async def test_an_unforeseen_exception_in_a_decoder_is_data_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: UNKNOWN, which clients retry on every worker until their deadline."""
    _decoders._load_builtin()  # registered in the registry kept, not only in its copy
    monkeypatch.setattr(_decoders, "_REGISTRY", dict(_decoders._REGISTRY))
    (tmp_path / "a.hog").write_text("100")
    (tmp_path / "b.hog").write_text("100")
    brittle = {
        "datasets": ("b=*.hog:brittle",),
        "decoders": (f"{__name__}:Brittle",),
        "chunk_bytes": 80,
    }
    async with (
        running_workers(tmp_path, 1, **brittle) as (worker,),
        Loader([worker.address], dataset="b", batch_size=10, retry_deadline=3.0) as loader,
    ):
        with pytest.raises(DataLossError) as info:
            async for _ in loader.epoch(0):
                pass
    err = info.value
    assert (err.shard, err.record) == ("b.hog", 40)
    assert "raised RecursionError: maximum recursion depth" in str(err)


JSONL_FIELDS = [
    {"name": "id", "dtype": "int64", "shape": []},
    {"name": "score", "dtype": "float32", "shape": []},
    {"name": "tokens", "dtype": "int32", "shape": [-1]},
]


@linux_only
@pytest.mark.parametrize(
    ("line", "says"),
    [
        ('{"id": 7, "score": 1e39, "tokens": [1]}', "out of the float32 range"),
        ('{"id": 7, "score": -1e39, "tokens": [1]}', "out of the float32 range"),
        ("[" * 100_000 + "]" * 100_000, "nests lists or objects deeper than the JSON parser"),
        ('{"id": 7, "score": 1, "tokens": [' + "1, " * 3_000_000 + "1]}", "more than "
         "SHARDSTREAM_READ_BUDGET_BYTES (1048576) lets one record take"),
    ],
    ids=["1e39", "-1e39", "nested", "9MB-line"],
)  # fmt: skip
async def test_jsonl_records_that_cannot_be_served_are_data_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, line: str, says: str
) -> None:
    """Before: 1e39 was served as inf; deep nesting was a RecursionError (UNKNOWN, retried
    to the deadline; at start-up, a traceback); a line of any length was read and parsed
    whole (a 400 MB line took the worker to 1.45 GB before it was refused)."""
    (tmp_path / "_schema.json").write_text(json.dumps({"fields": JSONL_FIELDS}))
    lines = [json.dumps({"id": i, "score": i / 2, "tokens": [i] * (i % 3)}) for i in range(20)]
    lines[7] = line
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--data-root", str(tmp_path), "--dataset", "t=*.jsonl", "--processes", "0"]
    env = {"SHARDSTREAM_READ_BUDGET_BYTES": str(MiB)}
    with WorkerProcess.start([*args, "--chunk-bytes", "4096"], env=env) as worker:
        async with Loader([worker.address], dataset="t", batch_size=4, retry_deadline=3) as loader:
            with pytest.raises(DataLossError) as info:
                async for batch in loader.epoch(0):
                    assert np.isfinite(batch["score"]).all()
        peak = peak_rss(worker.pid)
    assert (info.value.shard, info.value.record) == ("a.jsonl", 7)
    assert says in str(info.value)
    assert peak < 200 * MiB, f"worker peak RSS {peak / MiB:.0f} MiB"


async def test_jsonl_fields_are_not_inferred_from_a_line_over_the_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHARDSTREAM_READ_BUDGET_BYTES", "4096")
    lines = [json.dumps({"id": i}) for i in range(10)]
    lines[3] = json.dumps({"id": 3, "pad": "x" * 5000})
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(CatalogError, match=r"a\.jsonl: record 3 is longer than SHARDSTREAM_READ"):
        async with running_workers(tmp_path, 1, datasets=("t=*.jsonl",)):
            pass


async def test_jsonl_fields_nested_too_deep_to_infer_refuse_start_in_one_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.jsonl").write_text('{"id": 1}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(CatalogError, match=r"a\.jsonl: record 1 nests lists or objects deeper"):
        async with running_workers(tmp_path, 1, datasets=("t=*.jsonl",)):
            pass


# -- values that do not fit their field ---------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "value"),
    [("float32", "1e39"), ("float32", "-1e39"), ("float16", "70000"), ("float64", "1e400")],
)
async def test_csv_float_out_of_range_is_data_loss(tmp_path: Path, dtype: str, value: str) -> None:
    fields = [
        {"name": "id", "dtype": "int64", "shape": []},
        {"name": "x", "dtype": dtype, "shape": [2]},
    ]
    (tmp_path / "_schema.json").write_text(json.dumps({"fields": fields}))
    for shard in range(2):
        lines = [f"{shard * 30 + i},1.5,inf" for i in range(30)]
        if shard == 1:
            lines[17] = f"47,{value},2"
        (tmp_path / f"part-{shard:03d}").write_text("\n".join(lines) + "\n")
    async with (
        running_workers(tmp_path, 1, datasets=("train=part-*:csv",)) as (worker,),
        Loader([worker.address], dataset="train", batch_size=10) as loader,
    ):
        with pytest.raises(DataLossError) as info:
            async for batch in loader.epoch(0):
                assert np.isfinite(batch["x"][:, 0]).all()
    err = info.value
    assert (err.shard, err.record) == ("part-001", 17)
    assert f"value {value} in column 2 is out of range for field 'x' ({dtype}" in str(err)


@pytest.mark.parametrize(
    ("array", "what"),
    [
        (np.array(["a", "bb"]), "strings"),
        (np.array([b"a", b"bb"]), "bytes"),
        (np.zeros(2, dtype=[("a", "<i4"), ("b", "<f4")]), "structured records"),
    ],
)
async def test_npz_non_numeric_array_refuses_start_naming_shard_and_field(
    tmp_path: Path, array: np.ndarray[Any, Any], what: str
) -> None:
    np.savez(tmp_path / "s.npz", id=np.arange(2), name=array)
    with pytest.raises(CatalogError, match=rf"s\.npz: array 'name' holds {what} \(dtype"):
        async with running_workers(tmp_path, 1):
            pass

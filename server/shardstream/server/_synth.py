"""Synthetic datasets for tests and benchmarks.

Every record has `id` (int64, its global index in shard-name order), `label`
(int64, id % 10) and `image` (uint8, the given per-record shape, pseudo-random
from a generator seeded with (seed, shard index)). The content depends only on
(seed, shards, records, shape), not on the format, so the same arguments give
the same records as npz, csv and parquet; wds stores the images as JPEG (quality
95, no chroma subsampling: close to, not equal to, the others' pixels).

`make_token_files` writes flat token files for the `tokens` and `tokens-packed`
formats instead (`_tokens`, `_packed`).
"""

from __future__ import annotations

import functools
import io
import json
import math
import os
import re
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from shardstream.server._csv import SCHEMA_FILE
from shardstream.server._tokens import SIDECAR, TOKEN_DTYPES

__all__ = ["FORMATS", "make_dataset", "make_token_files"]

FORMATS: tuple[str, ...] = ("npz", "csv", "wds", "parquet")
_CORE = ("npz", "csv")  # the formats that need no optional library
_SUFFIXES = {"npz": ".npz", "wds": ".tar", "parquet": ".parquet"}
_PATTERNS = {
    "npz": re.compile(r"shard-\d+\.npz"),
    "csv": re.compile(r"part-\d+"),
    "wds": re.compile(r"shard-\d+\.tar"),
    "parquet": re.compile(r"shard-\d+\.parquet"),
}
_WRITE_ROW_GROUP = 256  # rows per parquet row group, so that reads span row groups


MAX_SHARD_BYTES = 4 << 30  # image bytes of one generated shard (made in memory)
MAX_SHARDS = 100_000


def make_dataset(
    directory: Path,
    *,
    shards: int,
    records: int,
    shape: tuple[int, ...],
    format: str = "npz",
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Write `records` synthetic records spread over `shards` shard files; their paths.

    npz shards are `shard-00000.npz`, ... (written with `np.savez`, arrays id,
    label, image); csv shards are OneFlow-style `part-000`, ... with the
    columns id, label and the image flattened in C order, plus `_schema.json`;
    wds shards are `shard-00000.tar`, ... with KEY.jpg (shape (H, W, 3), JPEG),
    KEY.cls and KEY.id per record (needs Pillow); parquet shards are
    `shard-00000.parquet`, ... with columns id, label and image (a fixed-size
    list with `shardstream.shape` metadata; needs pyarrow).
    Shards get records // shards records each, the first records % shards one
    more. A directory that already holds shards of the format is refused
    unless `overwrite` is true, which also removes shards beyond the new count.
    """
    _validate(shards=shards, records=records, shape=shape, format=format, seed=seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    existing = sorted(p for p in directory.iterdir() if _PATTERNS[format].fullmatch(p.name))
    if existing and not overwrite:
        raise ValueError(
            f"{directory} already holds {len(existing)} {format} shard file(s) "
            f"({existing[0].name}, ...); use an empty directory or pass overwrite=True"
        )
    width = max(3 if format == "csv" else 5, len(str(shards - 1)))
    base, extra = divmod(records, shards)
    paths: list[Path] = []
    first_id = 0
    for index in range(shards):
        count = base + (1 if index < extra else 0)
        ids = np.arange(first_id, first_id + count, dtype=np.int64)
        first_id += count
        rng = np.random.default_rng([seed, index])
        image = rng.integers(0, 256, size=(count, *shape), dtype=np.uint8)
        arrays: dict[str, np.ndarray[Any, Any]] = {"id": ids, "label": ids % 10, "image": image}
        if format == "csv":
            path = directory / f"part-{index:0{width}d}"
        else:
            path = directory / f"shard-{index:0{width}d}{_SUFFIXES[format]}"
        _write_atomic(path, functools.partial(_WRITERS[format], arrays=arrays))
        paths.append(path)
    if format == "csv":
        fields = [
            {"name": "id", "dtype": "int64", "shape": []},
            {"name": "label", "dtype": "int64", "shape": []},
            {"name": "image", "dtype": "uint8", "shape": list(shape)},
        ]
        text = '{"fields": [\n' + ",\n".join(f"  {json.dumps(f)}" for f in fields) + "\n]}\n"
        _write_atomic(directory / SCHEMA_FILE, lambda f: f.write(text.encode()))
    for stale in set(existing) - set(paths):
        stale.unlink(missing_ok=True)
    return paths


def _validate(*, shards: int, records: int, shape: tuple[int, ...], format: str, seed: int) -> None:
    for name, value in (("shards", shards), ("records", records), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"`{name}` must be an int, got {value!r}")
    if shards < 1:
        raise ValueError(f"`shards` must be at least 1, got {shards}")
    if records < shards:
        raise ValueError(
            f"`records` must be at least `shards` ({shards}) so that no shard is empty, "
            f"got {records}"
        )
    if seed < 0:
        raise ValueError(f"`seed` must be non-negative, got {seed}")
    if not isinstance(shape, tuple) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ValueError(
            f"`shape` must be a tuple of positive ints (() for a scalar), got {shape!r}"
        )
    if format not in FORMATS:
        raise ValueError(
            f"`format` must be one of {', '.join(_CORE)}, got {format!r} (or, with the "
            "optional libraries installed, wds (Pillow) or parquet (pyarrow))"
        )
    if format == "wds" and (len(shape) != 3 or shape[2] != 3):
        raise ValueError(f"wds images need a shape (H, W, 3), got {shape!r}")
    per_record = math.prod(shape)
    if -(-records // shards) * per_record > MAX_SHARD_BYTES:  # one shard is made in memory
        raise ValueError(
            f"a shard of {-(-records // shards)} records of shape {shape} would take "
            f"{-(-records // shards) * per_record} bytes, more than {MAX_SHARD_BYTES}: "
            "give more shards, fewer records or a smaller shape"
        )
    if shards > MAX_SHARDS:
        raise ValueError(f"`shards` must be at most {MAX_SHARDS}, got {shards}")


def _write_npz(f: IO[bytes], arrays: dict[str, np.ndarray[Any, Any]]) -> None:
    np.savez(f, id=arrays["id"], label=arrays["label"], image=arrays["image"])


def _write_csv(f: IO[bytes], arrays: dict[str, np.ndarray[Any, Any]]) -> None:
    count = len(arrays["id"])
    table = np.concatenate(
        [arrays["id"][:, None], arrays["label"][:, None], arrays["image"].reshape(count, -1)],
        axis=1,
        dtype=np.int64,
    )
    np.savetxt(f, table, fmt="%d", delimiter=",")


def _write_wds(f: IO[bytes], arrays: dict[str, np.ndarray[Any, Any]]) -> None:
    try:
        from PIL import Image
    except ImportError:
        raise ValueError("wds shards need Pillow: pip install shardstream[wds]") from None
    with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for id_, label, image in zip(arrays["id"], arrays["label"], arrays["image"], strict=True):
            jpeg = io.BytesIO()
            Image.fromarray(image).save(jpeg, format="JPEG", quality=95, subsampling=0)
            key = f"{int(id_):010d}"  # zero-padded: keys increase in tar order
            files = (("jpg", jpeg.getvalue()), ("cls", b"%d" % label), ("id", b"%d" % id_))
            for ext, data in files:
                info = tarfile.TarInfo(f"{key}.{ext}")  # mtime 0, uid 0: reproducible bytes
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _write_parquet(f: IO[bytes], arrays: dict[str, np.ndarray[Any, Any]]) -> None:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ValueError("parquet shards need pyarrow: pip install shardstream[parquet]") from None
    image = arrays["image"]
    flat = pa.array(image.reshape(-1), type=pa.uint8())
    width = int(np.prod(image.shape[1:], dtype=np.int64))
    shape = json.dumps(list(image.shape[1:])).encode()
    schema = pa.schema(
        [
            pa.field("id", pa.int64()),
            pa.field("label", pa.int64()),
            pa.field("image", pa.list_(pa.uint8(), width), metadata={"shardstream.shape": shape}),
        ]
    )
    columns = [arrays["id"], arrays["label"], pa.FixedSizeListArray.from_arrays(flat, width)]
    table = pa.Table.from_arrays(columns, schema=schema)
    pq.write_table(table, f, row_group_size=_WRITE_ROW_GROUP)


_WRITERS: dict[str, Callable[..., None]] = {
    "npz": _write_npz,
    "csv": _write_csv,
    "wds": _write_wds,
    "parquet": _write_parquet,
}


def make_token_files(
    directory: Path,
    *,
    shards: int,
    tokens: int,
    seq_len: int,
    dtype: str = "uint16",
    vocab_size: int = 50257,
    eos_id: int | None = None,
    mean_doc_tokens: int = 0,
    suffix: str = ".bin",
    seed: int = 0,
) -> list[Path]:
    """Write `tokens` pseudo-random token ids in [0, vocab_size) over `shards` files
    `tokens-00000.bin` (raw little-endian) or `.npy` (`suffix`), plus `_tokens.json`
    (dtype, seq_len, vocab_size, eos_id when given); their paths. With `eos_id` and
    `mean_doc_tokens`, documents of geometric lengths (that mean) end with `eos_id`,
    which appears nowhere else. Shard k depends only on (seed, k, its size)."""
    if dtype not in TOKEN_DTYPES or suffix not in (".bin", ".npy") or not 0 < shards <= tokens:
        raise ValueError(
            f"need dtype in {TOKEN_DTYPES}, suffix .bin or .npy and 0 < shards <= tokens, got "
            f"{dtype!r}, {suffix!r}, {shards} shards of {tokens} tokens"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    base, extra = divmod(tokens, shards)
    paths = []
    for index in range(shards):
        rng = np.random.default_rng([seed, index])
        n = base + (1 if index < extra else 0)
        ids = rng.integers(0, vocab_size - (eos_id is not None), size=n, dtype=np.uint32)
        if eos_id is not None:
            ids += ids >= eos_id  # every id but eos_id
            if mean_doc_tokens > 0:
                ids[rng.random(n) < 1 / mean_doc_tokens] = eos_id
        array = ids.astype(np.dtype(dtype).newbyteorder("<"))
        path = directory / f"tokens-{index:05d}{suffix}"
        _write_atomic(path, functools.partial(_write_tokens, array=array, npy=suffix == ".npy"))
        paths.append(path)
    options: dict[str, Any] = {"dtype": dtype, "seq_len": seq_len, "vocab_size": vocab_size}
    if eos_id is not None:
        options["eos_id"] = eos_id
    _write_atomic(directory / SIDECAR, lambda f: f.write(json.dumps(options).encode()))
    return paths


def _write_tokens(f: IO[bytes], array: np.ndarray[Any, Any], npy: bool) -> None:
    if npy:
        np.save(f, array)
    else:
        f.write(array.tobytes())


def _write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write a file under a temporary name in its directory, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp creates it private
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise

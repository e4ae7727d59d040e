"""Shard integrity: a read serves the file that was indexed or refuses it.

A shard replaced (renamed over, or swapped for a symlink to a file outside the data
root) between a read's stamp check and the decoder's open is refused, in every
format, under local and `file://` roots; a `file://` root checks its shards as a
local root does (inode and ctime); URL stamps compare every identity fsspec reports;
credentials in a data root's URL reach no log line and no client; `http://` roots
work; a shard name that is not UTF-8 is a start-up error naming the file.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import logging
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.client.errors import DataLossError, ShardChangedError
from shardstream.server import _decoding, make_dataset
from shardstream.server._decoders import decoder_ref
from shardstream.server._files import ShardPath, info_stamp, shard_stat
from shardstream.server._process import WorkerProcess, WorkerStartError
from shardstream.server.errors import CatalogError, ShardChanged

from conftest import collect_epoch, ids_of, running_workers

pytest.importorskip("fsspec", reason="URL data roots need fsspec")

SECRET = "S3CRETpw"


# --- a shard swapped between the read's check and the decoder's open ----------------------


def _synth(fmt: str) -> Callable[[Path], tuple[Path, Path]]:
    """Shards of `fmt` by `make_dataset`: (the shard read, its replacement elsewhere),
    which holds other records (ids 20.. instead of 10..)."""
    shape = (4, 4, 3) if fmt == "wds" else (3,)

    def build(tmp: Path) -> tuple[Path, Path]:
        old = make_dataset(tmp / "root", shards=2, records=20, shape=shape, format=fmt)
        new = make_dataset(tmp / "new", shards=2, records=40, shape=shape, format=fmt)
        return old[1], new[1]

    return build


def _jsonl(tmp: Path) -> tuple[Path, Path]:
    for name, first in (("root", 100), ("new", 900)):
        (tmp / name).mkdir()
        lines = "".join(json.dumps({"id": i, "x": [i, i]}) + "\n" for i in range(first, first + 9))
        (tmp / name / "a.jsonl").write_text(lines)
    return tmp / "root" / "a.jsonl", tmp / "new" / "a.jsonl"


def _tokens(tmp: Path) -> tuple[Path, Path]:
    for name, first in (("root", 100), ("new", 900)):
        (tmp / name).mkdir()
        (tmp / name / "a.bin").write_bytes(np.arange(first, first + 64, dtype="<u2").tobytes())
        (tmp / name / "_tokens.json").write_text(json.dumps({"dtype": "uint16", "seq_len": 7}))
    return tmp / "root" / "a.bin", tmp / "new" / "a.bin"


SHARDS = {
    "npz": _synth("npz"),
    "csv": _synth("csv"),
    "wds": _synth("wds"),
    "parquet": _synth("parquet"),
    "jsonl": _jsonl,
    "tokens": _tokens,
}


def _swap(shard: Path, replacement: Path, how: str) -> None:
    """Replace `shard` atomically, as `mv` does: by a copy of `replacement`, or by a
    symlink to it (a file outside the data root)."""
    tmp = shard.with_name(shard.name + ".tmp")
    if how == "rename":
        shutil.copyfile(replacement, tmp)
    else:
        tmp.symlink_to(replacement)
    os.replace(tmp, shard)


@pytest.mark.parametrize("root", ["local", "file-url"])
@pytest.mark.parametrize("how", ["rename", "symlink"])
@pytest.mark.parametrize("fmt", sorted(SHARDS))
def test_a_shard_replaced_after_the_check_is_refused_not_decoded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, how: str, root: str
) -> None:
    """The replacement lands right after `check_unchanged` stat'ed the indexed file and
    before the decoder opens it: the window a concurrent `mv new shard` hits. Before,
    jsonl, csv, parquet, wds, tokens and npz decoded the new file (their per-shard
    caches even rebuilt the index from it) and served it under the indexed stamp."""
    if fmt == "parquet":
        pytest.importorskip("pyarrow", reason="the parquet format needs pyarrow")
    shard, replacement = SHARDS[fmt](tmp_path)
    shard = shard.resolve()
    path: ShardPath = shard if root == "local" else f"file://{shard}"
    ref = decoder_ref(fmt)
    stamp = shard_stat(path)
    schema = _decoding.decoder(ref).index(path).schema
    before = _decoding.decode_checked(ref, path, stamp, 0, 2, schema, shard.name)  # caches warm
    real_stat = _decoding.shard_stat

    def checked_then_replaced(p: ShardPath) -> Any:
        now = real_stat(p)
        if p == path and not shard.with_name(shard.name + ".done").exists():
            _swap(shard, replacement, how)
            shard.with_name(shard.name + ".done").touch()
        return now

    monkeypatch.setattr(_decoding, "shard_stat", checked_then_replaced)
    with pytest.raises(ShardChanged, match="changed since it was indexed"):
        served = _decoding.decode_checked(ref, path, stamp, 0, 2, schema, shard.name)
        raise AssertionError(f"served {served} for the indexed {before}")


# --- file:// roots are checked as local roots are -----------------------------------------


async def test_file_url_root_refuses_a_symlink_to_an_outside_file_of_the_same_size_and_mtime(
    tmp_path: Path,
) -> None:
    """Before, a `file://` stamp was (size, mtime): a shard swapped for a symlink to a
    file outside the root with the same size and mtime was served, bytes and all."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    secret = outside / "secret.bin"
    secret.write_bytes(b"TOP-SECRET password=hunter2 " * 4)
    shard = root / "a.bin"
    shard.write_bytes(bytes(secret.stat().st_size))
    st = secret.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    (root / "_tokens.json").write_text(json.dumps({"dtype": "uint16", "seq_len": 7}))
    async with running_workers(
        f"file://{root}",  # type: ignore[arg-type]
        1,
        datasets=("train=*.bin:tokens",),
        processes=1,
    ) as (worker,):
        shard.unlink()
        shard.symlink_to(secret)
        async with Loader([worker.address], dataset="train", batch_size=4) as loader:
            with pytest.raises(ShardChangedError, match="changed since it was indexed"):
                await collect_epoch(loader, 0)


async def test_file_url_root_refuses_a_shard_rewritten_in_place_with_its_mtime_put_back(
    tmp_path: Path,
) -> None:
    make_dataset(tmp_path, shards=2, records=40, shape=(8,), format="npz")
    async with running_workers(
        f"file://{tmp_path}",  # type: ignore[arg-type]
        1,
        processes=1,
    ) as (worker,):
        f = tmp_path / "shard-00000.npz"
        st = f.stat()
        arrays = dict(np.load(f))
        arrays["id"] = arrays["id"] + 1000
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        assert len(buf.getvalue()) == st.st_size
        with open(f, "r+b") as out:  # noqa: ASYNC230 (a test's small write)
            out.write(buf.getvalue())
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        async with Loader([worker.address], dataset="train", batch_size=10) as loader:
            with pytest.raises(ShardChangedError, match="changed since it was indexed"):
                await collect_epoch(loader, 0)


def test_url_stamps_compare_every_identity_the_filesystem_reports() -> None:
    """Before, a URL stamp kept the size and the first time found: a file with the same
    size and mtime but another inode, ctime, ETag or link target had the same stamp."""
    base = {"size": 5, "mtime": 1.5, "created": 2.5, "ino": 7, "islink": False, "ETag": '"a"'}
    changes: list[dict[str, Any]] = [
        {"ino": 8},
        {"created": 3.5},
        {"ETag": '"b"'},
        {"islink": True, "destination": "/elsewhere/f"},
        {"generation": "2"},
    ]
    for change in changes:
        assert info_stamp({**base, **change}) != info_stamp(base), change
    assert info_stamp(dict(base)) == info_stamp(base)
    assert info_stamp({"size": 5}) == (5, "")


# --- credentials in a data root's URL -----------------------------------------------------


def test_redact_hides_secrets_not_azure_containers() -> None:
    from shardstream.server._files import redact

    assert redact("root s3://KEY:SECRET@bucket/x failed") == "root s3://KEY:***@bucket/x failed"
    assert redact("https://TOKEN@host/data") == "https://***@host/data"
    # `container@account` is no secret: the container stays named in messages
    assert redact("abfs://train@acct.dfs.core.windows.net/x") == (
        "abfs://train@acct.dfs.core.windows.net/x"
    )
    assert redact("az://c:key@acct/x") == "az://c:***@acct/x"
    assert redact("mail me at a@b.c") == "mail me at a@b.c"


def test_a_data_root_password_is_never_logged() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = f"http://alice:{SECRET}@127.0.0.1:{port}/data/"
    with pytest.raises(WorkerStartError) as caught:
        WorkerProcess.start(["--data-root", root, "--dataset", "t=*.npz", "--processes", "0"])
    log = str(caught.value).split("its log:", 1)[1]  # not the arguments it was given
    assert "cannot serve" in log and "alice:***@127.0.0.1" in log
    assert SECRET not in log


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """A static file server that answers Range requests, as real ones do."""

    def send_head(self) -> Any:
        path = self.translate_path(self.path)
        wanted = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if wanted is None or not os.path.isfile(path):
            return super().send_head()
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            first = int(wanted[1])
            last = min(int(wanted[2]) if wanted[2] else size - 1, size - 1)
            f.seek(first)
            body = f.read(max(0, last - first + 1))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {first}-{first + len(body) - 1}/{size}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return io.BytesIO(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _http_server(directory: Path) -> Iterator[int]:
    handler = lambda *a, **kw: _RangeHandler(*a, directory=str(directory), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _jsonl_shards(directory: Path, records: int) -> None:
    directory.mkdir(parents=True)
    (directory / "_schema.json").write_text(
        json.dumps({"fields": [{"name": "id", "dtype": "int64", "shape": []},
                               {"name": "tokens", "dtype": "int32", "shape": [-1]}]})
    )  # fmt: skip
    for s in range(3):
        ids = range(s * records // 3, (s + 1) * records // 3)
        lines = [json.dumps({"id": i, "tokens": list(range(i % 5))}) for i in ids]
        (directory / f"shard-{s}.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("fmt", ["npz", "csv", "jsonl", "parquet"])
async def test_http_root_serves_an_epoch(tmp_path: Path, fmt: str) -> None:
    """Before, the root's URL was normalised as a path: http://h/x became http:/h/x. And
    the line formats (csv, jsonl) read lines by `readline(size)`, which fsspec's files
    lack: every read of them failed with a TypeError on any URL root without a cache."""
    pytest.importorskip("aiohttp", reason="fsspec's http filesystem needs aiohttp")
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    if fmt == "jsonl":
        _jsonl_shards(tmp_path / "train", 30)
    else:
        make_dataset(tmp_path / "train", shards=3, records=30, shape=(4,), format=fmt)
    pattern = {"npz": "shard-*.npz", "csv": "part-*:csv", "jsonl": "shard-*.jsonl",
               "parquet": "shard-*.parquet"}[fmt]  # fmt: skip
    with _http_server(tmp_path) as port:
        async with running_workers(
            f"http://127.0.0.1:{port}/",  # type: ignore[arg-type]
            1,
            datasets=(f"train=train/{pattern}",),
        ) as (worker,):
            async with Loader([worker.address], dataset="train", batch_size=7) as loader:
                ids = ids_of(await collect_epoch(loader, 0))
    assert sorted(ids.tolist()) == list(range(30))


async def test_a_shard_url_password_reaches_no_client_and_no_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record that fails to decode names its shard, by URL, in the DATA_LOSS status and
    the worker's log: the password of the root's URL is hidden in both."""
    pytest.importorskip("aiohttp", reason="fsspec's http filesystem needs aiohttp")
    tokens = np.arange(64, dtype="<u2")
    tokens[30] = 5000  # in record 4 (tokens 28..35); indexing reads no token
    (tmp_path / "a.bin").write_bytes(tokens.tobytes())
    sidecar = {"dtype": "uint16", "seq_len": 7, "vocab_size": 1000}
    (tmp_path / "_tokens.json").write_text(json.dumps(sidecar))
    with _http_server(tmp_path) as port:
        async with running_workers(
            f"http://alice:{SECRET}@127.0.0.1:{port}/",  # type: ignore[arg-type]
            1,
            datasets=("t=*.bin:tokens",),
        ) as (worker,):
            async with Loader([worker.address], dataset="t", batch_size=2) as loader:
                with caplog.at_level(logging.WARNING), pytest.raises(DataLossError) as caught:
                    await collect_epoch(loader, 0)
    assert "a.bin: record 4: token id 5000" in str(caught.value)
    assert "alice:***@127.0.0.1" in str(caught.value)
    assert SECRET not in str(caught.value)
    assert "record 4: token id 5000" in caplog.text
    assert SECRET not in caplog.text


# --- names that are not UTF-8 -------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["", "file://"])
async def test_a_shard_name_that_is_not_utf8_is_a_start_up_error_naming_it(
    tmp_path: Path, scheme: str
) -> None:
    """Before, the worker stopped with "'utf-8' codec can't encode characters ...",
    naming neither the dataset nor the file. A file the glob leaves out does not matter."""
    make_dataset(tmp_path, shards=2, records=10, shape=(2,), format="npz")
    odd = os.fsencode(tmp_path) + b"/shard-\xff\xfe.npz"
    shutil.copyfile(tmp_path / "shard-00000.npz", os.fsdecode(odd))
    root = f"{scheme}{tmp_path}"
    with pytest.raises(CatalogError, match=r"dataset 'train': the file b'shard-\\xff\\xfe\.npz'"):
        async with running_workers(root, 1):  # type: ignore[arg-type]
            pass
    async with running_workers(root, 1, datasets=("train=shard-0*.npz",)) as (worker,):  # type: ignore[arg-type]
        async with Loader([worker.address], dataset="train", batch_size=5) as loader:
            assert sorted(ids_of(await collect_epoch(loader, 0)).tolist()) == list(range(10))

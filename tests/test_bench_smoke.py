"""Smoke test of the benchmark suite (bench/): a run of a few seconds on a tiny dataset.

shardstream, the plain loop, the wire ceilings and the bare client of the worker's
reads (`ss_raw`) always run; torch (num_workers=0) and the ZeroMQ prefetcher run when
their packages are importable; otherwise the benchmark skips them with a printed note,
which the test accepts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_SYSTEMS = {"shardstream", "plain", "torch", "zmq"}
KEYS = {
    "config", "system", "family", "round", "records", "bytes", "wall_s", "records_per_s",
    "mb_per_s", "client_cpu_s_per_gb", "total_cpu_s_per_gb", "client_rss_mb",
    "worker_rss_mb", "ttfb_s", "wait_fraction", "exactly_once", "error",
}  # fmt: skip


def test_bench_smoke_run(tmp_path: Path) -> None:
    systems = [
        "shardstream", "plain", "grpc_wire", "grpc_file", "grpc_reads", "ss_raw", "tcp_wire",
        "torch", "zmq",
    ]  # fmt: skip
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "bench.run", "--shape", "8,8,3", "--dtype", "uint8",
        "--shards", "3", "--records-per-shard", "101", "--batch-size", "16",
        "--repeats", "1", "--workers", "1", "--ranks", "1,2", "--torch-workers", "0",
        "--zmq-procs", "1", "--step-ms", "1", "--seconds", "30", "--no-plot",
        "--systems", ",".join(systems), "--out", str(out), "--data", str(tmp_path / "data"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    lines = (out / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    stdout_rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert rows == stdout_rows
    expected = {"plain", "grpc_wire", "grpc_file", "grpc_reads", "ss_raw w1", "tcp_wire"} | {
        f"shardstream {lane} w1 r{ranks}" for lane in ("local", "net", "tcp") for ranks in (1, 2)
    }
    for system, row in (("torch", "torch nw0"), ("zmq", "zmq p1")):  # optional packages
        if f"note: {system}: skipped" not in proc.stderr:
            expected.add(row)
    assert {r["system"] for r in rows} == expected
    for r in rows:
        assert set(r) >= KEYS, KEYS - set(r)
        assert r["error"] is None
        assert r["records_per_s"] > 0 and r["mb_per_s"] > 0
        assert r["client_rss_mb"] > 0 and r["ttfb_s"] > 0
        if r["family"] in DATA_SYSTEMS:
            assert r["exactly_once"] is True, r
            world = r["ranks"]
            assert r["records"] == 303 - 303 % world
            assert 0 <= r["wait_fraction"] <= 1
        else:
            assert r["exactly_once"] is None
            assert r["bytes"] == 303 * (16 + 8 * 8 * 3)
    shardstream = [r for r in rows if r["family"] == "shardstream"]
    assert all(r["worker_rss_mb"] > 0 and r["worker_processes"] >= 2 for r in shardstream)
    for r in rows:  # the CPU split: client, serving processes, decoding processes
        assert r["server_cpu_s_per_gb"] >= 0 and r["decoding_cpu_s_per_gb"] >= 0
    table = (out / "results.md").read_text()
    assert "| shardstream local w1 r2 | yes 1/1 |" in table
    assert "| shardstream tcp w1 r2 | yes 1/1 |" in table
    assert "| shardstream net w1 r2 | yes 1/1 |" in table
    assert "server CPU s/GB" in table
    assert "MB/s ÷ raw TCP" in table
    assert "client CPU ÷ bare client of the reads" in table  # the loader against ss_raw
    assert "MB/s ÷ gRPC of the files in reads" in table  # against grpc_reads


def test_exactly_once_check_reports_duplicates_and_gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    from bench.common import check_exactly_once

    assert check_exactly_once(np.arange(10), 10, 1)["exactly_once"]
    assert check_exactly_once(np.arange(9), 10, 3)["exactly_once"]  # drop: 10 % 3 = 1
    dup = check_exactly_once(np.array([0, 1, 1, 3]), 4, 1)
    assert not dup["exactly_once"]
    assert (dup["ids_duplicated"], dup["ids_missing"]) == (1, 1)
    assert not check_exactly_once(np.arange(10), 10, 3)["exactly_once"]  # one too many


def test_work_decoder_matches_the_baselines_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.setenv("SHARDSTREAM_BENCH_WORK", "3")
    from bench.common import DataSpec, make_shards
    from bench.work_decoder import WorkNpz, apply_work

    (path,) = make_shards(tmp_path, DataSpec((4, 5), "float32", 1, 10))
    with np.load(path) as z:
        image = z["image"]
    decoder = WorkNpz()
    decoder.index(path)
    got = decoder.read(path, 2, 5)
    np.testing.assert_array_equal(got["image"], apply_work(image[2:7], 3))
    assert not np.array_equal(got["image"], image[2:7])
    np.testing.assert_array_equal(got["id"], np.arange(2, 7))
    decoder.close()


def test_grpcfile_producer_serves_ranges_of_the_files(tmp_path: Path) -> None:
    """`grpc_reads`' server: a range request gets exactly the bytes at that offset of the
    files taken one after the other (again from the first past the last), in messages of
    the size asked for."""
    import grpc

    from bench.producers import GRPC_METHOD, GRPC_OPTIONS, RANGE_REQUEST, REQUEST

    parts = [bytes(range(256)) * 3, b"x" * 1000, bytes(range(7, 200))]
    for i, part in enumerate(parts):
        (tmp_path / f"s{i}.npz").write_bytes(part)
    whole = b"".join(parts) * 2  # 1961 bytes, then again
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.producers", "grpcfile", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving "), line
        with grpc.insecure_channel(line.split()[1], options=GRPC_OPTIONS) as ch:
            stream = ch.unary_stream(GRPC_METHOD)
            for total, size, at in ((500, 128, 0), (900, 100, 700), (300, 64, 1700), (10, 4, 0)):
                messages = list(stream(RANGE_REQUEST.pack(total, size, at), timeout=30))
                assert b"".join(messages) == whole[at : at + total], (total, size, at)
                assert all(0 < len(m) <= size for m in messages)
            assert b"".join(stream(REQUEST.pack(600, 256), timeout=30)) == whole[:600]
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()

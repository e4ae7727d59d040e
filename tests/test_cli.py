"""The command line, as users run it: real processes, real ports, real exit codes."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import RECORDS, SHARDS, worker_processes


def shardstream(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shardstream.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_make_dataset_writes_npz_and_csv(tmp_path: Path) -> None:
    r = shardstream(
        "make-dataset", str(tmp_path / "a"), "--shards", "3", "--records", "30", "--shape", "2,2"
    )
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "shard-00000.npz",
        "shard-00001.npz",
        "shard-00002.npz",
    ]
    r = shardstream(
        "make-dataset", str(tmp_path / "b"), "--shards", "2", "--records", "10", "--format", "csv"
    )
    assert r.returncode == 0, r.stderr
    assert {"part-000", "part-001", "_schema.json"} <= {p.name for p in (tmp_path / "b").iterdir()}
    r = shardstream("make-dataset", str(tmp_path / "c"), "--shards", "5", "--records", "2")
    assert r.returncode == 2 and "records" in r.stderr


def test_worker_logs_address_and_datasets_and_answers_health(npz_root: Path) -> None:
    with worker_processes(npz_root, 1) as (worker,):
        assert worker.port > 0
        r = shardstream("health", worker.address)
        assert r.returncode == 0, r.stderr
        assert "SERVING" in r.stdout
        r = shardstream("health", worker.address, "--service", "shardstream.v1.Worker")
        assert r.returncode == 0, r.stderr
        r = shardstream("health", worker.address, "--service", "no.such.Service")
        assert r.returncode == 1
        assert "NOT_FOUND" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        r = shardstream("inspect", worker.address)
        assert r.returncode == 0, r.stderr
        assert f"dataset train: format npz, {SHARDS} shards, {RECORDS} records" in r.stdout
        assert "image:uint8[4x4x3]" in r.stdout
        assert worker.terminate() == 0
    log = "\n".join(worker.log)
    assert f"listening on {worker.address}" in log
    assert f"dataset 'train': {SHARDS} shards, {RECORDS} records, format npz" in log


def test_health_of_nothing_listening_fails_with_one_line() -> None:
    r = shardstream("health", f"127.0.0.1:{free_port()}", "--timeout", "2")
    assert r.returncode == 1
    assert "UNAVAILABLE" in r.stderr or "DEADLINE_EXCEEDED" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_worker_refuses_bad_configuration(tmp_path: Path) -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardstream.server",
            "--data-root",
            str(tmp_path),
            "--dataset",
            "train=*.npz",
            "--port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 1
    assert "cannot serve: dataset 'train': no file under" in r.stderr and "'*.npz'" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "shardstream.server",
            "--data-root",
            str(tmp_path),
            "--dataset",
            "train",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "NAME=GLOB" in r.stderr


@pytest.mark.slow
def test_demo_runs_end_to_end() -> None:
    r = shardstream("demo", "--records", "3000", "--epochs", "2", timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("exactly once: yes") == 2
    assert "records/s" in r.stdout and "MB/s" in r.stdout
    assert "demo OK" in r.stdout


def test_consume_reports_throughput_and_duplicates(npz_root: Path) -> None:
    with worker_processes(npz_root, 2) as workers:
        r = shardstream("consume", ",".join(w.address for w in workers), "--epochs", "2",
                        "--batch-size", "100", "--shuffle")  # fmt: skip
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"epoch 0: {RECORDS // 100} batches, {RECORDS} records in ")
    assert "records/s" in lines[0] and "MB/s" in lines[0] and lines[0].endswith("duplicate ids: 0")
    assert lines[1].startswith("epoch 1:")
    assert "reads by worker" in lines[2]


def test_consume_names_unreachable_workers() -> None:
    a, b = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    r = shardstream("consume", f"{a},{b}", "--timeout", "20")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert [line.split(": UNAVAILABLE: ")[0] for line in lines] == [
        f"shardstream consume: {a}",
        f"shardstream consume: {b}",
    ]
    assert all("Connection refused" in line for line in lines), lines


@pytest.mark.parametrize("command", ["inspect", "health"])
def test_a_reader_that_leaves_early_ends_the_output_quietly(npz_root: Path, command: str) -> None:
    """`shardstream inspect ... | head` printed a BrokenPipeError traceback."""
    with worker_processes(npz_root, 1) as (worker,):
        proc = subprocess.Popen(
            [sys.executable, "-m", "shardstream.cli", command, worker.address],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        proc.stdout.close()  # the reader is gone before the first line
        _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert proc.returncode == 1

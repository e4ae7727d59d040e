"""Configuration errors from the environment and flags: one line, exit status 2.

Run through the installed console scripts (`shardstream`, `shardstream-worker`),
as a container would run them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MODULES = {"shardstream": "shardstream.cli", "shardstream-worker": "shardstream.server"}


def run(
    script: str, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """A console script (`python -m` where it is not installed next to this Python),
    without SHARDSTREAM_* variables from the calling shell."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHARDSTREAM_")}
    path = BIN / script
    command = [str(path)] if path.exists() else [sys.executable, "-m", MODULES[script]]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
        cwd=cwd,
        stdin=subprocess.DEVNULL,
    )


def assert_usage_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no traceback, no usage block
    assert r.stdout == ""
    for word in words:
        assert word in lines[0], lines[0]


BAD = [
    ("PORT", "abc", "SHARDSTREAM_PORT='abc': expected an integer in [0, 65535]"),
    ("PORT", "", "SHARDSTREAM_PORT is set but empty: expected an integer in [0, 65535]"),
    ("PORT", "70000", "SHARDSTREAM_PORT='70000': expected an integer in [0, 65535]"),
    ("PROCESSES", "two", "SHARDSTREAM_PROCESSES='two': expected an integer >= 0"),
    ("PROCESSES", "-1", "SHARDSTREAM_PROCESSES='-1': expected an integer >= 0"),
    ("MAX_MESSAGE_BYTES", "8Q", "SHARDSTREAM_MAX_MESSAGE_BYTES='8Q': expected a size >= 64KiB"),
    ("MAX_MESSAGE_BYTES", "1KiB", "SHARDSTREAM_MAX_MESSAGE_BYTES='1KiB': expected a size >= 64KiB"),
    ("CHUNK_BYTES", "", "SHARDSTREAM_CHUNK_BYTES is set but empty: expected a size >= 1"),
    ("GRACE", "soon", "SHARDSTREAM_GRACE='soon': expected a number of seconds >= 0"),
    ("GRACE", "nan", "SHARDSTREAM_GRACE='nan': expected a number of seconds >= 0"),
    ("LOG_LEVEL", "verbose", "SHARDSTREAM_LOG_LEVEL='verbose': expected one of DEBUG, INFO"),
    ("METRICS_PORT", "", "SHARDSTREAM_METRICS_PORT is set but empty"),
    ("HOST", "", "SHARDSTREAM_HOST is set but empty"),
]


@pytest.mark.parametrize(("name", "value", "message"), BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_a_malformed_variable_is_a_one_line_usage_error(
    tmp_path: Path, name: str, value: str, message: str
) -> None:
    env = {
        "SHARDSTREAM_DATA_ROOT": str(tmp_path),
        "SHARDSTREAM_DATASETS": "train=*.npz",
        f"SHARDSTREAM_{name}": value,
    }
    flag = "--" + name.lower().replace("_", "-")
    assert_usage_error(run("shardstream", "worker", env=env), "shardstream worker: error:", flag,
                       message)  # fmt: skip
    assert_usage_error(run("shardstream-worker", env=env), "shardstream-worker: error:", message)


def test_bad_variables_do_not_break_help_or_other_commands(tmp_path: Path) -> None:
    env = {f"SHARDSTREAM_{n}": "abc" for n in ("PORT", "PROCESSES", "GRACE", "LOG_LEVEL",
                                                "MAX_MESSAGE_BYTES", "METRICS_PORT")}  # fmt: skip
    for args in (["--help"], ["worker", "--help"], ["index", "--help"], ["inspect", "--help"]):
        r = run("shardstream", *args, env=env)
        assert r.returncode == 0 and r.stderr == "" and "usage:" in r.stdout, (args, r.stderr)
    r = run("shardstream-worker", "--help", env=env)
    assert r.returncode == 0 and "SHARDSTREAM_PORT" in r.stdout, r.stderr
    r = run("shardstream", "make-dataset", str(tmp_path / "d"), "--shards", "1", "--records",
            "4", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr


def test_a_flag_wins_over_a_malformed_variable(tmp_path: Path) -> None:
    env = {"SHARDSTREAM_PORT": "abc", "SHARDSTREAM_LOG_LEVEL": "loud"}
    r = run("shardstream", "worker", "--port", "0", "--log-level", "info", "--data-root",
            str(tmp_path), "--dataset", "train=*.npz", env=env)  # fmt: skip
    assert r.returncode == 1, r.stderr  # it got as far as indexing: nothing to serve
    assert "cannot serve: dataset 'train': no file under" in r.stderr


def test_bad_flags_are_one_line_usage_errors(tmp_path: Path) -> None:
    root = ["--data-root", str(tmp_path), "--dataset", "train=*.npz"]
    assert_usage_error(
        run("shardstream", "worker", *root, "--log-level", "verbose"),
        "argument --log-level: 'verbose': expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL",
    )
    assert_usage_error(
        run("shardstream-worker", *root, "--log-level", "verbose"), "shardstream-worker: error:"
    )
    assert_usage_error(
        run("shardstream", "worker", *root, "--port", "x"),
        "argument --port: 'x': expected an integer in [0, 65535]",
    )
    assert_usage_error(run("shardstream", "worker", *root, "--grace", "-1"), "--grace", ">= 0")
    assert_usage_error(run("shardstream", "index", *root, "--log-level", "loud"), "--log-level")
    assert_usage_error(run("shardstream", "wrker"), "invalid choice: 'wrker'")
    assert_usage_error(
        run("shardstream", "worker", "--data-root", str(tmp_path), "--dataset", "train"),
        "NAME=GLOB",
    )
    assert_usage_error(
        run("shardstream", "worker", env={"SHARDSTREAM_DATA_ROOT": str(tmp_path),
                                          "SHARDSTREAM_DATASETS": "train"}),
        "SHARDSTREAM_DATASETS", "NAME=GLOB",
    )  # fmt: skip

"""A command line that explains itself: --version, defaults and help on every flag, sizes
with units, no abbreviated flags, addresses with their port, unreachable workers named
at once, consume's ledger and record-level shuffle."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardstream.cli import build_health_parser
from shardstream.cli import build_parser as build_shardstream_parser
from shardstream.server._config import MiB
from shardstream.server.cli import build_parser as build_worker_parser
from shardstream.server.cli import config_from_args

from conftest import RECORDS, worker_processes

BIN = Path(sys.executable).parent
MODULES = {
    "shardstream": "shardstream.cli",
    "shardstream-worker": "shardstream.server",
    "shardstream-health": None,
}


def run(
    script: str, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """A console script (`python -m` where it is not installed next to this Python),
    without SHARDSTREAM_* variables from the calling shell."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHARDSTREAM_")}
    path = BIN / script
    if path.exists():
        command = [str(path)]
    elif (module := MODULES[script]) is not None:
        command = [sys.executable, "-m", module]
    else:
        command = [sys.executable, "-c", "import sys; from shardstream.cli import health_main; "
                   "sys.exit(health_main())"]  # fmt: skip
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**clean, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def assert_usage_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr  # no traceback, no usage block
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parsers() -> Iterator[argparse.ArgumentParser]:
    """Every parser of the three commands, subcommands' included."""
    todo: list[argparse.ArgumentParser] = [
        build_shardstream_parser(),
        build_worker_parser(),
        build_health_parser(),
    ]
    while todo:
        parser = todo.pop()
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                todo.extend(action.choices.values())


# -- --version, help and defaults ---------------------------------------------------------------


def test_version_of_every_command() -> None:
    version = importlib.metadata.version("shardstream")
    for script in ("shardstream", "shardstream-worker", "shardstream-health"):
        r = run(script, "--version")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{script} {version}"


def test_every_flag_and_command_has_help_and_no_abbreviations() -> None:
    seen = 0
    for parser in parsers():
        assert parser.allow_abbrev is False, parser.prog
        for action in parser._actions:
            seen += 1
            assert action.help and action.help.strip(), (parser.prog, action.dest)
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:  # the commands' one-line help
                    assert choice.help and choice.help.strip(), (parser.prog, choice.dest)
    assert seen > 100  # the walk reached the subcommands


def test_the_readme_names_every_flag_of_every_command() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    flags = {
        (parser.prog, option)
        for parser in parsers()
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option not in ("--help", "--version")
    }
    assert len(flags) > 60
    missing = sorted(f for f in flags if f"`{f[1]}" not in readme)
    assert missing == [], "flags the README does not document"


def test_help_shows_every_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SHARDSTREAM_"):
            monkeypatch.delenv(name)
    shown = 0
    for parser in parsers():
        formatter = parser._get_formatter()
        for action in parser._actions:
            default = action.default
            if default in (None, False, "", argparse.SUPPRESS) or action.nargs == 0:
                continue  # nothing worth showing (a flag without a value is off by default)
            if not action.option_strings and action.nargs != "?":
                continue
            text = formatter._get_help_string(action) or ""
            assert "(default: %(default)s)" in text, (parser.prog, action.dest, text)
            shown += 1
    assert shown > 40
    text = " ".join(build_worker_parser().format_help().split())
    assert "(default: 50051) [SHARDSTREAM_PORT]" in text
    assert "(default: 8MiB) [SHARDSTREAM_MAX_MESSAGE_BYTES]" in text
    assert "when not given, 4MiB or that half if less [SHARDSTREAM_CHUNK_BYTES]" in text
    monkeypatch.setenv("SHARDSTREAM_PORT", "8080")
    text = " ".join(build_worker_parser().format_help().split())
    assert "(default: 8080, from SHARDSTREAM_PORT) [SHARDSTREAM_PORT]" in text
    r = run("shardstream", "consume", "--help")
    assert r.returncode == 0 and "(default: 64)" in r.stdout and "--ledger-dir" in r.stdout


# -- flags and their values ---------------------------------------------------------------------


def test_abbreviated_flags_are_errors(tmp_path: Path) -> None:
    root = ["--data-root", str(tmp_path), "--dataset", "train=*.npz"]
    assert_usage_error(run("shardstream", "worker", *root, "--max-mess", "5"), "--max-mess")
    assert_usage_error(run("shardstream-worker", *root, "--max-mess", "5"), "--max-mess")
    assert_usage_error(run("shardstream", "consume", "127.0.0.1:1", "--batch", "5"), "--batch")
    assert_usage_error(run("shardstream-health", "127.0.0.1:1", "--serv", "x"), "--serv")


def test_sizes_take_units_from_flags_and_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("SHARDSTREAM_"):
            monkeypatch.delenv(name)
    root = ["--data-root", str(tmp_path), "--dataset", "train=*.npz"]
    config = config_from_args(build_worker_parser().parse_args(root))
    assert (config.max_message_bytes, config.chunk_bytes) == (8 * MiB, 4 * MiB)
    args = [*root, "--max-message-bytes", "16MiB", "--chunk-bytes", "64KiB"]
    config = config_from_args(build_worker_parser().parse_args(args))
    assert (config.max_message_bytes, config.chunk_bytes) == (16 * MiB, 64 * 1024)
    monkeypatch.setenv("SHARDSTREAM_MAX_MESSAGE_BYTES", "32MiB")
    monkeypatch.setenv("SHARDSTREAM_CHUNK_BYTES", "1000000")
    config = config_from_args(build_worker_parser().parse_args(root))
    assert (config.max_message_bytes, config.chunk_bytes) == (32 * MiB, 1_000_000)

    line = assert_usage_error(
        run("shardstream", "worker", *root, "--chunk-bytes", "4QiB"), "argument --chunk-bytes"
    )
    assert "'4QiB': expected a size >= 1 (bytes, or with a unit: 4096, 64KiB, 16MiB)" in line
    assert_usage_error(
        run("shardstream-worker", *root, "--max-message-bytes", "1KiB"),
        "argument --max-message-bytes: '1KiB': expected a size >= 64KiB",
    )
    assert_usage_error(
        run("shardstream", "worker", *root, env={"SHARDSTREAM_CHUNK_BYTES": "1.5"}),
        "SHARDSTREAM_CHUNK_BYTES='1.5': expected a size >= 1",
    )


@pytest.mark.parametrize("command", ["health", "inspect", "consume"])
def test_an_address_needs_its_port(command: str) -> None:
    line = assert_usage_error(run("shardstream", command, "localhost"), "'localhost'", "HOST:PORT")
    assert "port is needed" in line and f"shardstream {command}: error:" in line
    if command == "consume":
        assert_usage_error(run("shardstream", command, "127.0.0.1:1,worker"), "HOST:PORT")
        assert_usage_error(run("shardstream", command, "dns:///worker"), "HOST:PORT")
    assert_usage_error(run("shardstream-health", "localhost"), "'localhost'", "HOST:PORT")


def test_make_dataset_names_the_overwrite_flag(tmp_path: Path) -> None:
    args = ("make-dataset", str(tmp_path), "--shards", "1", "--records", "4")
    assert run("shardstream", *args).returncode == 0
    line = assert_usage_error(run("shardstream", *args), "already holds", "--overwrite")
    assert "overwrite=True" not in line
    r = run("shardstream", *args, "--overwrite")
    assert r.returncode == 0, r.stderr


# -- reaching workers -------------------------------------------------------------------------


def test_unreachable_workers_fail_at_once_with_healths_message() -> None:
    """Before: inspect waited its 10 s timeout for DEADLINE_EXCEEDED, consume its 30 s."""
    address = f"127.0.0.1:{free_port()}"
    health = run("shardstream", "health", address)
    assert health.returncode == 1
    reason = health.stderr.strip()
    assert reason.startswith(f"{address}: UNAVAILABLE: ") and "\n" not in reason
    for command, expected in (
        ("inspect", reason),
        ("consume", f"shardstream consume: {reason}"),
    ):
        t0 = time.monotonic()
        r = run("shardstream", command, address)
        elapsed = time.monotonic() - t0
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip() == expected
        assert elapsed < 8, f"{command} took {elapsed:.1f}s to report an unreachable worker"


def test_consume_writes_a_ledger_that_audit_accepts(npz_root: Path, tmp_path: Path) -> None:
    with worker_processes(npz_root, 1) as (worker,):
        port = worker.port
        for command in ("health", "inspect"):  # a dns:/// name works where HOST:PORT does
            r = run("shardstream", command, f"dns:///localhost:{port}")
            assert r.returncode == 0, r.stderr
        plain = run("shardstream", "consume", worker.address, "--batch-size", "100",
                    "--ledger-dir", str(tmp_path / "plain"))  # fmt: skip
        shuffled = run("shardstream", "consume", f"dns:///localhost:{port}", "--epochs", "2",
                       "--batch-size", "100", "--shuffle-reads", "2",
                       "--ledger-dir", str(tmp_path / "shuffled"))  # fmt: skip
    for r in (plain, shuffled):
        assert r.returncode == 0, r.stderr
        assert f"{RECORDS // 100} batches, {RECORDS} records" in r.stdout
        assert "duplicate ids: 0" in r.stdout
    audit = run("shardstream", "audit", str(tmp_path / "plain"))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert audit.stdout.strip() == (
        f"epoch 0: {RECORDS} records received of {RECORDS} planned, 0 resumed reads: exactly once"
    )
    audit = run("shardstream", "audit", str(tmp_path / "shuffled"))
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert audit.stdout.count("exactly once") == 2 and "NOT" not in audit.stdout
    (ledger,) = (tmp_path / "shuffled" / "epoch-00001").glob("*.jsonl")
    header = json.loads(ledger.read_text().splitlines()[0])
    assert header["options"]["shuffle"] is True and header["options"]["shuffle_reads"] == 2


def test_audit_refuses_ledgers_it_cannot_vouch_for(npz_root: Path, tmp_path: Path) -> None:
    """A red-team pass got "exactly once" (exit 0) from ranks of two different datasets, a
    negative range and a header of world size 0; tracebacks from junk lines; and a ledger
    file linked to /dev/zero took the audit to 24 GB. Each is now one line, exit 1."""
    with worker_processes(npz_root, 1) as (worker,):
        for rank in (0, 1):
            r = run("shardstream", "consume", worker.address, "--batch-size", "100",
                    "--rank", str(rank), "--world-size", "2",
                    "--ledger-dir", str(tmp_path / "good"))  # fmt: skip
            assert r.returncode == 0, r.stderr
    assert run("shardstream", "audit", str(tmp_path / "good")).returncode == 0

    def doctored(name: str, edit: Any) -> subprocess.CompletedProcess[str]:
        shutil.copytree(tmp_path / "good", tmp_path / name)
        files = sorted((tmp_path / name / "epoch-00000").glob("*.jsonl"))
        edit(files[-1])
        return run("shardstream", "audit", str(tmp_path / name))

    def header(change: dict[str, Any]) -> Any:
        def edit(path: Path) -> None:
            lines = path.read_text().splitlines()
            lines[0] = json.dumps({**json.loads(lines[0]), **change})
            path.write_text("\n".join(lines) + "\n")

        return edit

    def line(text: str) -> Any:
        def edit(path: Path) -> None:
            lines = path.read_text().splitlines()
            lines.insert(1, text)
            path.write_text("\n".join(lines) + "\n")

        return edit

    def zero(path: Path) -> None:
        path.unlink()
        path.symlink_to("/dev/zero")

    cases = {
        "fingerprint": (header({"fingerprint": "0" * 24}), "disagree on fingerprint"),
        "world": (header({"world_size": 0}), "not a ledger header"),
        "huge": (header({"shard_records": [10**15] * 8}), "more than an audit holds"),
        "negative": (line('{"kind":"batch","index":0,"ranges":[[1,-64,64]]}'), "line 2: an int"),
        "outside": (line('{"kind":"batch","index":0,"ranges":[[1,0,10000]]}'), "outside"),
        "strings": (line('{"kind":"batch","index":0,"ranges":[["a","b","c"]]}'), "line 2"),
        "list": (line("[1, 2]"), "line 2: not a JSON object"),
        "kind": (line('{"kind":"nonsense"}'), "line 2: a line of kind 'nonsense'"),
        "zero": (zero, "not a regular file"),
    }
    for name, (edit, says) in cases.items():
        r = doctored(name, edit)
        assert (r.returncode, r.stdout) == (1, ""), (name, r.stdout, r.stderr)
        assert r.stderr.startswith("shardstream audit: ") and says in r.stderr, (name, r.stderr)
        assert r.stderr.count("\n") == 1, (name, r.stderr)


def test_make_dataset_and_index_refuse_bad_input_in_one_line(tmp_path: Path) -> None:
    """Before: tracebacks for a path that is a file or cannot be made, numpy's
    _ArrayMemoryError for sizes no machine holds, 'invalid literal for int()' naming no
    flag, no bound on the shard count; index kept the last of two datasets of one name."""
    (tmp_path / "a-file").write_text("")
    out = str(tmp_path / "out")
    cases = [
        ((str(tmp_path / "a-file"),), 1, "cannot write to"),
        (("/proc/shardstream-x",), 1, "cannot write to"),
        ((out, "--shape", "100000,100000,1000"), 2, "give more shards"),
        ((out, "--records", str(10**16)), 2, "give more shards"),
        ((out, "--shape", "abc"), 2, "--shape must be comma-separated sizes"),
        ((out, "--shards", "100000000", "--records", "100000000"), 2, "at most 100000"),
    ]
    for argv, code, says in cases:
        r = run("shardstream", "make-dataset", *argv)
        assert (r.returncode, r.stdout) == (code, ""), (argv, r.stderr)
        assert says in r.stderr and r.stderr.count("\n") == 1, (argv, r.stderr)
    r = run("shardstream", "make-dataset", out, "--records", "40", "--format", "csv")
    assert r.returncode == 0, r.stderr
    r = run("shardstream", "index", "--data-root", out, "--dataset", "t=part-*:csv",
            "--dataset", "t=part-00*:csv", "--cache-dir", "off")  # fmt: skip
    assert r.returncode == 2 and "dataset names must be unique" in r.stderr, r.stderr

"""What a red-team found in the command line and the configuration: where the data root
comes from (flag > file > variable), parameters checked before a random draw, bounds on
sizes and timeouts, config-file errors at start-up naming the file and the key, and the
exits of `shardstream demo`, `health` and `index`: one line, exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_cli_env import BIN, run

from shardstream.server import DatasetSpec, WorkerConfig, _pool, make_dataset
from shardstream.server.cli import build_parser as build_worker_parser
from shardstream.server.cli import config_from_args
from shardstream.server.transforms import horizontal_flip, resize


def usage_error(r: subprocess.CompletedProcess[str], *words: str) -> str:
    """The one line of a usage error (exit status 2), holding every word."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    (line,) = r.stderr.strip().splitlines()  # no traceback, no log lines
    assert all(w in line for w in words), line
    return line


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in list(os.environ):
        if name.startswith("SHARDSTREAM_"):
            monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two data roots: the first with 4 shards, the second with 2."""
    a, b = tmp_path_factory.mktemp("root_a"), tmp_path_factory.mktemp("root_b")
    make_dataset(a, shards=4, records=40, shape=(8, 8, 3))
    make_dataset(b, shards=2, records=20, shape=(8, 8, 3))
    return a, b


def parse(*argv: str) -> WorkerConfig:
    return config_from_args(build_worker_parser().parse_args(list(argv)))


# -- 1. flag > file > variable ----------------------------------------------------------------


def test_the_files_data_root_wins_over_the_variable_and_the_flag_over_both(
    tmp_path: Path, roots: tuple[Path, Path], clean_env: pytest.MonkeyPatch
) -> None:
    a, b = roots
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'data_root = "{b}"\n[datasets.train]\nshards = "*.npz"\n')
    clean_env.setenv("SHARDSTREAM_DATA_ROOT", str(a))  # as the docker image sets /data
    assert parse("--config", str(cfg)).data_root == b
    assert parse("--config", str(cfg), "--data-root", str(a)).data_root == a
    clean_env.delenv("SHARDSTREAM_DATA_ROOT")
    cfg.write_text('[datasets.train]\nshards = "*.npz"\n')
    clean_env.setenv("SHARDSTREAM_DATA_ROOT", str(a))
    assert parse("--config", str(cfg)).data_root == a  # the file names none: the variable


def test_the_files_datasets_and_decoders_win_over_the_variables(
    tmp_path: Path, roots: tuple[Path, Path], clean_env: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(
        f'data_root = "{roots[0]}"\ndecoders = ["pid_decoder:PidDecoder"]\n'
        '[datasets.train]\nshards = "*.npz"\n'
    )
    clean_env.setenv("SHARDSTREAM_DATASETS", "train=*.npz other=*.npz")
    clean_env.setenv("SHARDSTREAM_DECODERS", "nosuch_module:Nothing")
    config = parse("--config", str(cfg))
    assert [d.name for d in config.datasets] == ["train"]
    assert config.decoders == ("pid_decoder:PidDecoder",)
    config = parse("--config", str(cfg), "--dataset", "extra=*.npz")  # a flag adds
    assert [d.name for d in config.datasets] == ["train", "extra"]


def test_the_data_root_in_use_is_logged_with_where_it_came_from(
    tmp_path: Path, roots: tuple[Path, Path]
) -> None:
    a, b = roots
    cfg = tmp_path / "w.toml"
    cfg.write_text(f'data_root = "{b}"\n[datasets.train]\nshards = "*.npz"\n')
    out = tmp_path / "m.json"
    r = run("shardstream", "index", "--config", str(cfg), "--cache-dir", "off", "-o", str(out),
            env={"SHARDSTREAM_DATA_ROOT": str(a)})  # fmt: skip
    assert r.returncode == 0, r.stderr
    (line,) = [x for x in r.stderr.splitlines() if "data root" in x]
    assert "INFO" in line and f"data root {b} (from data_root in {cfg}" in line
    assert f"SHARDSTREAM_DATA_ROOT={a} is not used" in line
    (dataset,) = json.loads(out.read_text())["datasets"].values()
    assert len(dataset["shards"]) == 2  # root b's


# -- 2. transform parameters checked before the draw ------------------------------------------


def test_transform_parameters_are_checked_whatever_the_draw() -> None:
    record: dict[str, Any] = {"image": np.zeros((4, 6, 3), np.uint8)}
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no field 'nosuch'"):
        horizontal_flip(dict(record), rng, p=0.0, field="nosuch")  # never flips
    with pytest.raises(ValueError, match="interpolation must be one of"):
        resize(dict(record), rng, size=4, interpolation="bilinar")  # already that size


@pytest.mark.parametrize(
    ("step", "words"),
    [
        # p = 0: no record is flipped, so only a check before the draw sees the field
        ('fn = "shardstream.server.transforms:horizontal_flip", p = 0.0, field = "nosuch"',
         "'nosuch'"),
        ('fn = "shardstream.server.transforms:resize", size = 8, interpolation = "bilinar"',
         "'bilinar'"),
    ],
)  # fmt: skip
def test_a_wrong_transform_parameter_fails_the_start_up_probe(
    tmp_path: Path, roots: tuple[Path, Path], step: str, words: str
) -> None:
    cfg = tmp_path / "w.toml"
    cfg.write_text(
        f'data_root = "{roots[0]}"\n[datasets.train]\nshards = "*.npz"\ntransforms = [{{{step}}}]\n'
    )
    r = run("shardstream", "index", "--config", str(cfg), "--cache-dir", "off")
    assert r.returncode == 1, r.stderr
    assert "transforms fail on every record tried" in r.stderr and words in r.stderr
    assert r.stderr.count(words) == 1  # one reason, said once


# -- 3. and 8. bounds on sizes and timeouts ---------------------------------------------------


def test_max_message_bytes_over_2gib_is_a_usage_error(tmp_path: Path) -> None:
    root = ["--port", "0", "--processes", "0", "--data-root", str(tmp_path), "--dataset", "t=*.npz"]
    usage_error(run("shardstream", "worker", *root, "--max-message-bytes", "4GiB"),
                "argument --max-message-bytes: '4GiB'", "at most 2147483647")  # fmt: skip
    with pytest.raises(ValueError, match="max_message_bytes must be in"):
        WorkerConfig(data_root=tmp_path, datasets=(DatasetSpec.parse("t=*.npz"),),
                     max_message_bytes=2**31)  # fmt: skip


def test_timeouts_under_a_millisecond_are_usage_errors(tmp_path: Path) -> None:
    root = ["--port", "0", "--processes", "0", "--data-root", str(tmp_path), "--dataset", "t=*.npz"]
    usage_error(run("shardstream", "worker", *root, "--stream-stall-timeout", "0.0001"),
                "argument --stream-stall-timeout: '0.0001'", "at least 0.001")  # fmt: skip
    usage_error(run("shardstream-worker", *root,
                    env={"SHARDSTREAM_IDLE_CONNECTION_TIMEOUT": "0.0005"}),
                "SHARDSTREAM_IDLE_CONNECTION_TIMEOUT='0.0005'", "at least 0.001")  # fmt: skip
    usage_error(run("shardstream", "health", "127.0.0.1:1", "--timeout", "0.0001"), "--timeout")
    with pytest.raises(ValueError, match=r"max_connection_age must be .* at least 0\.001"):
        WorkerConfig(data_root=tmp_path, datasets=(DatasetSpec.parse("t=*.npz"),),
                     max_connection_age=0.0002)  # fmt: skip


# -- 4. the exit hook and a process reaped meanwhile ------------------------------------------


class _Process:
    exitcode = None

    def __init__(self) -> None:
        self.killed = False

    def kill(self) -> None:
        self.killed = True


class _RacingRunner:
    """A runner whose thread reaps its process right after the exit hook first looks."""

    def __init__(self) -> None:
        self.process = _Process()
        self.reads = 0

    @property
    def proc(self) -> _Process | None:
        self.reads += 1
        return self.process if self.reads == 1 else None


def test_the_exit_hook_survives_a_process_reaped_meanwhile() -> None:
    pool = _pool.DecodingPool(1, initializer=print)
    runner = _RacingRunner()
    pool._runners = [runner]  # type: ignore[list-item]
    _pool._live.add(pool)
    try:
        _pool._kill_at_exit()  # an AttributeError on None before
    finally:
        _pool._live.discard(pool)
    assert runner.process.killed


# -- 5. gRPC's settings before grpc loads -----------------------------------------------------


def test_the_shardstream_command_applies_grpc_settings_before_grpc_loads() -> None:
    probe = (
        "import os, sys\n"
        "class Finder:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'grpc':\n"
        "            print('GRPC_VERBOSITY', os.environ.get('GRPC_VERBOSITY'))\n"
        "        return None\n"
        "sys.meta_path.insert(0, Finder())\n"
        "import shardstream.cli\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GRPC_")}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       timeout=60, env=env, stdin=subprocess.DEVNULL)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["GRPC_VERBOSITY", "ERROR"]


# -- 6. --exit-with-parent ---------------------------------------------------------------------


def test_exit_with_parent_refuses_a_pid_that_is_not_the_parent(tmp_path: Path) -> None:
    root = ["--port", "0", "--processes", "0", "--data-root", str(tmp_path), "--dataset", "t=*.npz"]
    path = BIN / "shardstream"
    assert path.exists(), "needs the installed console script (a direct child)"
    line = usage_error(run("shardstream", "worker", *root, "--exit-with-parent", "999999"),
                       "--exit-with-parent 999999 is not this worker's parent")  # fmt: skip
    assert f"pid {os.getpid()}" in line  # names the real parent: this process


# -- 7. demo -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--records", "10", "--shards", "20"], "--records (10) must be at least --shards (20)"),
        (["--records", "10", "--shards", "2", "--workers", "1", "--ranks", "20"],
         "--records (10) must be at least --ranks (20)"),
    ],
)  # fmt: skip
def test_demo_refuses_impossible_combinations_in_one_line(args: list[str], words: str) -> None:
    usage_error(run("shardstream", "demo", *args), "shardstream demo: error:", words)


# -- 9. config-file errors are config errors ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[datasets.train]\nshards = "*.npz"\nformat = "nosuch"\n',
         ["datasets.train.format", "unknown shard format 'nosuch'"]),
        ('decoders = ["nosuch_pkg.formats:MyFormat"]\n[datasets.train]\nshards = "*.npz"\n',
         ["decoders[0]", "cannot load decoder 'nosuch_pkg.formats:MyFormat'"]),
        ('[datasets.train]\nshards = "*.npz"\n'.encode("utf-16"), ["not UTF-8"]),
    ],
    ids=["format", "decoder", "utf-16"],
)  # fmt: skip
def test_config_file_errors_name_the_file_and_exit_2(
    tmp_path: Path, roots: tuple[Path, Path], text: str | bytes, words: list[str]
) -> None:
    cfg = tmp_path / "w.toml"
    if isinstance(text, bytes):
        cfg.write_bytes(text)
    else:
        cfg.write_text(text)
    r = run("shardstream", "worker", "--port", "0", "--processes", "0", "--config", str(cfg),
            "--data-root", str(roots[0]), "--cache-dir", "off")  # fmt: skip
    usage_error(r, f"shardstream worker: {cfg}", *words)


def test_a_dataset_flags_unknown_format_is_a_usage_error(roots: tuple[Path, Path]) -> None:
    r = run("shardstream", "worker", "--port", "0", "--processes", "0", "--data-root",
            str(roots[0]), "--dataset", "train=*.npz:nosuch", "--cache-dir", "off")  # fmt: skip
    usage_error(r, "--dataset train: unknown shard format 'nosuch'")


# -- 10. the rest ------------------------------------------------------------------------------


def test_index_to_a_directory_is_refused_and_leaves_nothing(
    tmp_path: Path, roots: tuple[Path, Path]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    r = run("shardstream", "index", "--data-root", str(roots[0]), "--dataset", "t=*.npz",
            "--cache-dir", "off", "-o", str(out))  # fmt: skip
    usage_error(r, "-o/--output names a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cache_dir_off_in_any_case(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    root = ["--data-root", str(tmp_path), "--dataset", "t=*.npz"]
    assert parse(*root, "--cache-dir", "OFF").cache_dir is None
    clean_env.setenv("SHARDSTREAM_CACHE_DIR", "Off")
    assert parse(*root).cache_dir is None


def test_an_ipv6_address_without_brackets_is_a_usage_error() -> None:
    usage_error(run("shardstream", "health", "::1:50051"), "[::1]:50051")


def test_max_message_bytes_alone_lowers_the_default_chunk(
    tmp_path: Path, clean_env: pytest.MonkeyPatch
) -> None:
    root = ["--data-root", str(tmp_path), "--dataset", "t=*.npz"]
    config = parse(*root, "--max-message-bytes", "8MB")
    assert (config.max_message_bytes, config.chunk_bytes) == (8_000_000, 4_000_000)
    line = usage_error(
        run("shardstream", "worker", *root, "--max-message-bytes", "8MB", "--chunk-bytes", "4MiB"),
        "--chunk-bytes [SHARDSTREAM_CHUNK_BYTES]",
        "--max-message-bytes [SHARDSTREAM_MAX_",
    )
    assert "chunk_bytes" not in line and "max_message_bytes" not in line

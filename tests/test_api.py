"""The public surface: small, sorted, importable; the generated code is current."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["shardstream.client", "shardstream.server"])
def test_all_is_sorted_and_importable(package: str) -> None:
    module = importlib.import_module(package)
    names = module.__all__
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    for name in names:
        assert getattr(module, name) is not None, name


def test_public_names() -> None:
    import shardstream.client as client
    import shardstream.server as server

    assert {"Loader", "SyncLoader", "LoaderConfig", "LoaderStatistics", "ClientSecurity",
            "check_health", "plan_epoch"} <= set(client.__all__)  # fmt: skip
    assert {"Worker", "WorkerConfig", "DatasetSpec", "Decoder", "register_decoder",
            "make_dataset"} <= set(server.__all__)  # fmt: skip


def test_errors_tree() -> None:
    from shardstream.client import errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.ShardstreamError)
    assert issubclass(errors.DataLossError, errors.WorkerError)
    assert issubclass(errors.ConfigError, ValueError)


def test_tune_malloc_respects_the_environment() -> None:
    import os
    import subprocess
    import sys

    code = "from shardstream.client import tune_malloc; print(tune_malloc())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout.strip()  # fmt: skip
    assert out == "True"  # glibc here
    env["MALLOC_MMAP_THRESHOLD_"] = "1048576"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60, check=True).stdout.strip()  # fmt: skip
    assert out == "False"  # the environment's choice wins

"""Rank discovery: explicit arguments, Horovod, torch.distributed, launcher environments."""

from __future__ import annotations

import sys
import types

import pytest

from shardstream.client import Loader
from shardstream.client._ranks import discover
from shardstream.client.errors import ConfigError


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HOROVOD_RANK": "3", "HOROVOD_SIZE": "8", "RANK": "0", "WORLD_SIZE": "2"}, (3, 8)),
        ({"RANK": "1", "WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "5"}, (1, 2)),
        ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6"}, (5, 6)),
        ({"PMI_RANK": "2", "PMI_SIZE": "4"}, (2, 4)),
        ({"SLURM_PROCID": "7", "SLURM_NTASKS": "16"}, (7, 16)),
        ({"RANK": "1"}, (0, 1)),  # half a pair is no launcher
        ({}, (0, 1)),
    ],
)
def test_environment_order(env: dict[str, str], expected: tuple[int, int]) -> None:
    assert discover(env)[:2] == expected


def test_bad_environment_values_are_named() -> None:
    with pytest.raises(ValueError, match="RANK='x'"):
        discover({"RANK": "x", "WORLD_SIZE": "2"})


def test_initialised_horovod_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # Horovod itself is optional; an initialised horovod.torch module is what counts.
    fake = types.ModuleType("horovod.torch")
    fake.is_initialized = lambda: True  # type: ignore[attr-defined]
    fake.rank = lambda: 2  # type: ignore[attr-defined]
    fake.size = lambda: 3  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "horovod.torch", fake)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert discover() == (2, 3, "horovod")
    fake.is_initialized = lambda: False  # type: ignore[attr-defined]
    assert discover()[:2] == (0, 2)


def test_explicit_arguments_win_and_fill_in(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    loader = Loader(["127.0.0.1:1"], dataset="train", batch_size=4)
    assert (loader.config.rank, loader.config.world_size) == (1, 2)
    loader = Loader(["127.0.0.1:1"], dataset="train", batch_size=4, rank=3, world_size=4)
    assert (loader.config.rank, loader.config.world_size) == (3, 4)
    loader = Loader(["127.0.0.1:1"], dataset="train", batch_size=4, rank=0)
    assert (loader.config.rank, loader.config.world_size) == (0, 2)
    monkeypatch.setenv("RANK", "5")
    with pytest.raises(ConfigError, match=r"rank must be in \[0, world_size=2\), got 5"):
        Loader(["127.0.0.1:1"], dataset="train", batch_size=4)

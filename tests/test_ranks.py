"""Rank discovery: explicit arguments, Horovod, torch.distributed, launcher environments."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from shardstream.client import Loader
from shardstream.client._ranks import discover
from shardstream.client.errors import ConfigError
from shardstream.server import Worker, make_dataset

from conftest import ids_of, worker_config


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
    with pytest.raises(ConfigError, match=r"RANK='5' / WORLD_SIZE='2' \(torchrun\)"):
        Loader(["127.0.0.1:1"], dataset="train", batch_size=4)


@pytest.mark.parametrize("value", ["1_0", "\u0661", "+1", "1.0", "-1"])
def test_launcher_values_are_plain_decimal_integers(value: str) -> None:
    """Was: `int()`'s grammar, so RANK="1_0" was rank 10 and Arabic-Indic digits passed."""
    with pytest.raises(ValueError, match="RANK="):
        discover({"RANK": value, "WORLD_SIZE": "20"})


@pytest.mark.parametrize(
    "env",
    [
        {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "NODE_RANK": "0"},  # Lightning's rank 1
        {"RANK": "1"},
        {"HOROVOD_SIZE": "4"},
    ],
)
def test_half_a_launcher_pair_is_an_error_when_the_loader_opens(env: dict[str, str]) -> None:
    """Half a pair may be a launcher that sets the rest later (Lightning sets RANK when
    it starts torch.distributed): tolerated when a loader is made, an error when it
    opens. Was: rank 0 of 1, so the process read every record."""
    assert discover(env)[:2] == (0, 1)
    with pytest.raises(ValueError, match="cannot tell its rank"):
        discover(env, strict=True)
    assert discover({"WORLD_SIZE": "1"}, strict=True)[:2] == (0, 1)
    # SLURM_NTASKS is the allocation's: a shell of it running one process is rank 0 of 1.
    assert discover({"SLURM_NTASKS": "4"}, strict=True)[:2] == (0, 1)


async def test_a_loader_whose_discovered_rank_changed_refuses_the_epoch(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Opened before the process group (rank 0 of 1 by default), iterated after it
    started as rank 1 of 2: the epoch is refused, not delivered whole to both ranks."""
    make_dataset(tmp_path, shards=2, records=40, shape=(2,))
    async with Worker(worker_config(tmp_path)) as worker:
        async with Loader([worker.address], dataset="train", batch_size=4) as loader:
            assert (loader.config.rank, loader.config.world_size) == (0, 1)
            monkeypatch.setenv("RANK", "1")
            monkeypatch.setenv("WORLD_SIZE", "2")
            with pytest.raises(ConfigError, match="now says rank 1 of 2"):
                loader.epoch(0)
        monkeypatch.delenv("RANK")  # made with half a pair, opened with the whole one
        loader = Loader([worker.address], dataset="train", batch_size=4)
        assert (loader.config.rank, loader.config.world_size) == (0, 1)
        monkeypatch.setenv("RANK", "1")
        async with loader:
            assert (loader.config.rank, loader.config.world_size) == (1, 2)
            assert len(ids_of([b async for b in loader.epoch(0)])) == 20


def fake_jax(
    monkeypatch: pytest.MonkeyPatch,
    *,
    distributed: tuple[int, int] | None,
    started: bool,
    backend: tuple[int, int] = (0, 1),
) -> None:
    """JAX as `_ranks` sees it: `jax.distributed` initialised with (process id, count) or not,
    backends started or not, and what `jax.process_index()` / `process_count()` answer."""

    def ask(value: int) -> object:
        def answer() -> int:
            assert started, "asked a JAX whose backends are not started: that would start them"
            return value

        return answer

    jax = types.ModuleType("jax")
    jax.process_index = ask(backend[0])  # type: ignore[attr-defined]
    jax.process_count = ask(backend[1])  # type: ignore[attr-defined]
    dist = types.ModuleType("jax._src.distributed")
    state = types.SimpleNamespace(client=None, process_id=0, num_processes=1)
    if distributed is not None:
        state.client, (state.process_id, state.num_processes) = object(), distributed
    dist.global_state = state  # type: ignore[attr-defined]
    bridge = types.ModuleType("jax._src.xla_bridge")
    bridge.backends_are_initialized = lambda: started  # type: ignore[attr-defined]
    for name, module in (("jax", jax), ("jax._src.distributed", dist),
                         ("jax._src.xla_bridge", bridge)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)


TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2"}


def test_jax_distributed_is_asked_without_starting_a_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Not started: the id and count given to jax.distributed.initialize, read from its state
    # (jax.process_index() would start the backends; the fake fails the test if asked).
    fake_jax(monkeypatch, distributed=(3, 4), started=False)
    assert discover(TORCHRUN) == (3, 4, "jax")
    # Started: JAX's own answer.
    fake_jax(monkeypatch, distributed=(3, 4), started=True, backend=(3, 4))
    assert discover(TORCHRUN) == (3, 4, "jax")


def test_jax_without_distributed_is_asked_only_when_it_spans_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_jax(monkeypatch, distributed=None, started=False)  # imported, nothing more
    assert discover(TORCHRUN)[:2] == (1, 2)
    fake_jax(monkeypatch, distributed=None, started=True, backend=(0, 1))  # one process
    assert discover(TORCHRUN)[:2] == (1, 2)
    assert discover({}) == (0, 1, "default (no launcher found)")
    fake_jax(monkeypatch, distributed=None, started=True, backend=(5, 8))  # multi-host TPU
    assert discover(TORCHRUN) == (5, 8, "jax")


def test_discovery_order_horovod_torch_jax_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_jax(monkeypatch, distributed=(3, 4), started=False)
    torch_dist = types.ModuleType("torch.distributed")
    torch_dist.is_available = lambda: True  # type: ignore[attr-defined]
    torch_dist.is_initialized = lambda: True  # type: ignore[attr-defined]
    torch_dist.get_rank = lambda: 0  # type: ignore[attr-defined]
    torch_dist.get_world_size = lambda: 6  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch.distributed", torch_dist)
    assert discover(TORCHRUN) == (0, 6, "torch.distributed")
    torch_dist.is_initialized = lambda: False  # type: ignore[attr-defined]
    assert discover(TORCHRUN) == (3, 4, "jax")


def test_a_jax_whose_internals_moved_is_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_jax(monkeypatch, distributed=(3, 4), started=False)
    monkeypatch.delitem(sys.modules, "jax._src.distributed")
    monkeypatch.setattr(sys.modules["jax._src.xla_bridge"], "backends_are_initialized", None)
    assert discover(TORCHRUN)[:2] == (1, 2)

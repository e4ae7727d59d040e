"""JAX: `to_jax`, rank discovery from a real `jax.distributed`, and examples/train_jax.py run
as users run it: 2 processes joined by `jax.distributed` on loopback, real worker processes.

What the data shows is checked from the record ids every rank trained on (the example's
`--trace`): every record once per epoch across the ranks, equal steps, a new order each
epoch, and, after an interruption in the middle of an epoch, exactly the rest."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shardstream.client import Loader
from shardstream.server._process import WorkerProcess

from conftest import collect_epoch, running_workers
from example_traces import (
    BATCH,
    EPOCHS,
    RECORDS,
    STEPS,
    example_workers,
    read_trace,
    reference,
)
from test_examples import json_objects

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("jax") is None,
    reason="jax is not installed (pip install -e '.[jax]')",
)

EXAMPLE = Path(__file__).parent.parent / "examples" / "train_jax.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    with example_workers(tmp_path_factory) as procs:
        yield procs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(argv: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        argv, text=True, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def two_processes(code: str) -> list[dict[str, Any]]:
    """Run `code` in two processes joined by jax.distributed (argv: the coordinator's
    address, the process id); the last JSON line each printed."""
    address = f"127.0.0.1:{free_port()}"
    procs = [start([sys.executable, "-c", code, address, str(i)]) for i in range(2)]
    outs = [p.communicate(timeout=90) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


# ---- to_jax ---------------------------------------------------------------------------


def test_to_jax_takes_readonly_views_as_they_are() -> None:
    import jax

    from shardstream.client.jax import to_jax

    values = np.arange(4096, dtype=np.float32).reshape(64, 64)
    view = np.frombuffer(b"\0" * 4 + values.tobytes(), np.float32)[1:].reshape(64, 64)
    assert not view.flags.writeable  # as message views are
    out = to_jax({"x": view})["x"]
    assert isinstance(out, jax.Array) and out.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(out), values)

    # Measured on CPU: XLA shares a host array's memory only at a 64-byte boundary, read-only
    # or not; elsewhere it copies once, into its own buffer. Message views land anywhere.
    if jax.default_backend() == "cpu":
        shared = copied = 0
        for _ in range(8):
            raw = bytes(values.nbytes + 64)
            base = np.frombuffer(raw, np.uint8).ctypes.data
            view = np.frombuffer(raw, np.float32, count=values.size, offset=(-base) % 64)
            out = to_jax({"x": view})["x"]
            shared += out.unsafe_buffer_pointer() == view.ctypes.data
            odd = np.frombuffer(raw, np.float32, count=values.size - 16, offset=(16 - base) % 64)
            if odd.ctypes.data % 64:
                copied += to_jax({"x": odd})["x"].unsafe_buffer_pointer() != odd.ctypes.data
        assert shared == 8 and copied == 8


def test_to_jax_refuses_64_bit_values_jax_would_wrap() -> None:
    import jax

    from shardstream.client.jax import to_jax

    assert not jax.config.read("jax_enable_x64")  # JAX's default
    small = to_jax({"id": np.array([0, 2**31 - 1], np.int64)})["id"]
    assert small.dtype == np.int32 and np.asarray(small).tolist() == [0, 2**31 - 1]
    assert np.asarray(jax.device_put(np.array([2**32], np.int64))).tolist() == [0]  # JAX alone
    with pytest.raises(OverflowError, match=r"field 'id' holds int64 values in \[0, 4294967296\]"):
        to_jax({"image": np.zeros(3, np.uint8), "id": np.array([0, 2**32], np.int64)})
    with pytest.raises(OverflowError, match="'n' holds uint64"):
        to_jax({"n": np.array([2**32], np.uint64)})
    assert to_jax({"id": np.zeros(0, np.int64)})["id"].shape == (0,)
    # float64 -> float32: past float32's range JAX alone makes values infinite.
    with np.errstate(over="ignore"):  # numpy's warning is all JAX alone gives
        assert np.isinf(np.asarray(jax.device_put(np.array([1e39])))).all()
    with pytest.raises(OverflowError, match=r"'loss' holds float64 values up to 1e\+39"):
        to_jax({"loss": np.array([1.0, -1e39, np.nan], np.float64)})
    kept = to_jax({"x": np.array([1.5, -np.inf, np.nan, 3e38], np.float64)})["x"]
    assert kept.dtype == np.float32 and np.asarray(kept)[0] == 1.5  # inf and nan stay so


RAGGED_SHARDING = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    from shardstream.client.jax import to_jax
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    me = jax.process_index()
    def batch(width):  # ragged="pad": padded to this process's longest record
        return {"id": np.arange(4) + 4 * me, "tokens": np.ones((4, width), np.int32),
                "tokens_lengths": np.full(4, width, np.int64)}
    same = to_jax(batch(8), sharding=sharding)  # pad_to=8 everywhere: one global shape
    out = {"same": list(same["tokens"].shape)}
    try:
        to_jax(batch(10 + 6 * me), sharding=sharding)
    except ValueError as exc:
        out["error"] = str(exc)
    print(json.dumps(out))
    jax.distributed.shutdown()
    """
)


def test_to_jax_refuses_ragged_fields_of_other_shapes_in_other_processes() -> None:
    """Two jax.distributed processes whose ragged batches are padded to their own
    longest record. Was: each made a global array of another shape ((8, 10) and
    (8, 16)), and a replicated jit result differed between them, silently."""
    for i, got in enumerate(two_processes(RAGGED_SHARDING)):
        assert got["same"] == [8, 8]
        other = (4, 16) if i == 0 else (4, 10)
        assert f"field 'tokens' has shape ({4}, {10 + 6 * i}) in this process ({i})" in got.get(
            "error", ""
        ), got
        assert f"{other} in process {1 - i}" in got["error"] and "pad_to=" in got["error"]


def test_to_jax_places_on_a_device_or_a_sharding() -> None:
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from shardstream.client.jax import to_jax

    batch = {"x": np.arange(12, dtype=np.float32).reshape(4, 3), "y": np.arange(4)}
    device = jax.devices()[0]
    placed = to_jax(batch, device=device)
    assert all(a.devices() == {device} for a in placed.values())
    sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
    global_ = to_jax(batch, sharding=sharding)
    assert global_["x"].sharding == sharding
    assert global_["x"].shape == (4 * jax.process_count(), 3)
    np.testing.assert_array_equal(np.asarray(global_["y"]), batch["y"])
    with pytest.raises(ValueError, match="not both"):
        to_jax(batch, sharding=sharding, device=device)


async def test_to_jax_on_received_batches(npz_root: Path) -> None:
    """Batches straight from a worker (views of messages and gathered copies alike) arrive in
    JAX equal, with their dtypes (int64 ids narrowed, checked)."""
    from shardstream.client.jax import to_jax

    async with running_workers(npz_root, 1) as workers:
        async with Loader([w.address for w in workers], dataset="train", batch_size=96) as loader:
            batches = await collect_epoch(loader, 0)
    readonly = 0
    for batch in batches:
        readonly += not batch["image"].flags.writeable
        out = to_jax(batch)
        for name, array in batch.items():
            np.testing.assert_array_equal(np.asarray(out[name]), array)
        assert out["image"].dtype == np.uint8 and out["id"].dtype == np.int32
    assert readonly > 0  # some were message views


# ---- rank discovery from a real jax.distributed -------------------------------------------

PROBE = textwrap.dedent(
    """
    import json, sys
    import jax
    from jax._src import xla_bridge
    from shardstream.client._ranks import discover

    before = discover({"RANK": "7", "WORLD_SIZE": "9"})  # jax imported, not distributed
    jax.distributed.initialize(coordinator_address=sys.argv[1], num_processes=2,
                               process_id=int(sys.argv[2]))
    found = discover({"RANK": "7", "WORLD_SIZE": "9"})
    started = xla_bridge.backends_are_initialized()  # asking must not start a backend
    jax.devices()
    after = discover({})
    print(json.dumps({"before": before, "found": found, "started": started, "after": after,
                      "jax": [jax.process_index(), jax.process_count()]}))
    jax.distributed.shutdown()
    """
)


def test_rank_from_jax_distributed_without_starting_a_backend() -> None:
    for i, got in enumerate(two_processes(PROBE)):
        assert got["before"] == [7, 9, "torchrun (RANK/WORLD_SIZE)"]
        assert got["found"] == [i, 2, "jax"]
        assert got["started"] is False
        assert got["after"] == [i, 2, "jax"] and got["jax"] == [i, 2]


# ---- the example ----------------------------------------------------------------------------


def run_example(workers: list[WorkerProcess], *args: str | Path) -> list[dict[str, Any]]:
    """Both processes of one run of the example; their JSON lines."""
    addresses = ",".join(w.address for w in workers)
    coordinator = f"127.0.0.1:{free_port()}"
    argv = [sys.executable, str(EXAMPLE), "--workers", addresses, "--epochs", str(EPOCHS),
            "--batch-size", str(BATCH), "--coordinator", coordinator,
            "--num-processes", "2", *map(str, args)]  # fmt: skip
    procs = [start([*argv, "--process-id", str(i)]) for i in range(2)]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-2000:] + err[-4000:]
    return [x for out, _ in outs for x in json_objects(out)]


@pytest.fixture(scope="module")
def full_run(
    workers: list[WorkerProcess], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[dict[str, Any]], Path]:
    trace = tmp_path_factory.mktemp("trace-full")
    return run_example(workers, "--trace", trace), trace


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_jax_example_two_processes_exactly_once(
    workers: list[WorkerProcess], full_run: tuple[list[dict[str, Any]], Path]
) -> None:
    lines, trace = full_run
    epochs = [x for x in lines if "epoch" in x]
    assert sorted((x["rank"], x["epoch"]) for x in epochs) == [
        (r, e) for r in range(2) for e in range(EPOCHS)
    ]
    for x in epochs:  # gathered over both processes by a JAX collective
        assert x["steps"] == STEPS and x["steps_all"] == [STEPS, STEPS]
        assert x["records"] == RECORDS - 1
    done = [x for x in lines if x.get("done")]
    assert len(done) == 2 and done[0]["params_sha256"] == done[1]["params_sha256"]

    traces = [read_trace(trace, r) for r in range(2)]
    orders = []
    for epoch in range(EPOCHS):
        per_rank = [[i for e, _, ids in t if e == epoch for i in ids] for t in traces]
        steps = [[s for e, s, _ in t if e == epoch] for t in traces]
        assert steps == [list(range(1, STEPS + 1))] * 2  # equal steps
        every = per_rank[0] + per_rank[1]
        assert len(every) == len(set(every)) == RECORDS - 1  # each once, one left out
        assert set(every) <= set(range(RECORDS))
        orders.append(every)
    assert orders[0] != orders[1]  # shuffled: a new order each epoch
    # The same batches as a plain loader with these options: rank and world size came
    # from jax.distributed.
    assert traces == [reference(workers, r) for r in range(2)]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_jax_example_resumes_mid_epoch_exactly(
    workers: list[WorkerProcess], full_run: tuple[list[dict[str, Any]], Path], tmp_path: Path
) -> None:
    """Interrupted at step 7 of epoch 0 (checkpoints at 5 and 7), then started again: each
    rank trains on exactly the rest, and the model ends bit for bit as without the stop."""
    full_lines, full_trace = full_run
    ckpt, trace = tmp_path / "ckpt", tmp_path / "trace"
    common = ("--checkpoint", ckpt, "--checkpoint-every", "5", "--trace", trace)
    first = run_example(workers, *common, "--stop-after", "7")
    assert sorted((x["rank"], x["stopped"], x["step"]) for x in first) == [(0, 0, 7), (1, 0, 7)]
    for r in range(2):
        saved = json.loads((ckpt / f"rank-{r:05d}.json").read_text())
        assert saved["progress"]["steps"] == 7 and saved["loader"]["rank"] == r
    assert [len(read_trace(trace, r)) for r in range(2)] == [7, 7]

    second = run_example(workers, *common)
    for r in range(2):
        rest = read_trace(trace, r)[7:]
        assert rest[0][:2] == (0, 8)  # continues at step 8 of epoch 0
        assert read_trace(trace, r) == read_trace(full_trace, r)  # exactly the rest
    # The resumed epoch's line covers the whole epoch (its counters were saved too).
    assert [x for x in second if "epoch" in x] == [x for x in full_lines if "epoch" in x]
    sha = {x["params_sha256"] for x in second + full_lines if x.get("done")}
    assert len(sha) == 1

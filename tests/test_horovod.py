"""examples/train_torch_horovod.py run as users run it: `horovodrun -np 2 --gloo`, real
worker processes, gradients all-reduced every step.

What the data shows is checked from the record ids every rank trained on (the example's
`--trace`): every record once per epoch across the ranks, equal steps (also all-gathered
by Horovod), a new order each epoch, and after an interruption in the middle of an epoch,
exactly the rest. Horovod is built from source: `bash scripts/install-horovod.sh`."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardstream.server._process import WorkerProcess

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


@pytest.fixture(scope="module")
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    with example_workers(tmp_path_factory) as procs:
        yield procs


def horovodrun() -> str | None:
    """`horovodrun` beside this interpreter (a virtual env that is not activated), or on PATH."""
    beside = Path(sys.executable).parent / "horovodrun"
    return str(beside) if beside.exists() else shutil.which("horovodrun")


pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None
        or importlib.util.find_spec("horovod") is None
        or horovodrun() is None,
        reason="Horovod is not installed (bash scripts/install-horovod.sh builds it, ~10 min)",
    ),
    pytest.mark.slow,
]

EXAMPLE = Path(__file__).parent.parent / "examples" / "train_torch_horovod.py"


def launch(workers: list[WorkerProcess], *args: str | Path, ranks: int = 2) -> Any:
    run = horovodrun()
    assert run is not None
    return subprocess.run(
        [run, "-np", str(ranks), "--gloo", "-H", f"localhost:{ranks}", sys.executable,
         str(EXAMPLE), "--workers", ",".join(w.address for w in workers), "--epochs",
         str(EPOCHS), "--batch-size", str(BATCH), *map(str, args)],
        capture_output=True, text=True, timeout=150,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip


def run_example(
    workers: list[WorkerProcess], *args: str | Path, ranks: int = 2
) -> list[dict[str, Any]]:
    r = launch(workers, *args, ranks=ranks)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    # horovodrun prefixes each line with "[rank]<stdout>:"
    return [x for x in json_objects(r.stdout) if "rank" in x]


@pytest.fixture(scope="module")
def full_run(
    workers: list[WorkerProcess], tmp_path_factory: pytest.TempPathFactory
) -> tuple[list[dict[str, Any]], Path]:
    trace = tmp_path_factory.mktemp("horovod-trace")
    return run_example(workers, "--trace", trace), trace


@pytest.mark.timeout(240)
def test_horovod_example_with_horovodrun(
    workers: list[WorkerProcess], full_run: tuple[list[dict[str, Any]], Path]
) -> None:
    lines, trace = full_run
    epochs = [x for x in lines if "epoch" in x]
    assert sorted((x["rank"], x["epoch"]) for x in epochs) == [
        (r, e) for r in range(2) for e in range(EPOCHS)
    ]
    for x in epochs:  # all-gathered and all-reduced by Horovod
        assert x["steps"] == STEPS and x["steps_all"] == [STEPS, STEPS]
        assert x["records"] == RECORDS - 1
    done = [x for x in lines if x.get("done")]
    assert len(done) == 2 and done[0]["params_sha256"] == done[1]["params_sha256"]

    traces = [read_trace(trace, r) for r in range(2)]
    orders = []
    for epoch in range(EPOCHS):
        steps = [[s for e, s, _ in t if e == epoch] for t in traces]
        assert steps == [list(range(1, STEPS + 1))] * 2  # equal steps
        every = [i for t in traces for e, _, ids in t if e == epoch for i in ids]
        assert len(every) == len(set(every)) == RECORDS - 1  # each once, one left out
        assert set(every) <= set(range(RECORDS))
        orders.append(every)
    assert orders[0] != orders[1]  # shuffled: a new order each epoch
    # The same batches as a plain loader: rank and world size came from Horovod.
    assert traces == [reference(workers, r) for r in range(2)]


@pytest.mark.timeout(240)
def test_horovod_example_resumes_mid_epoch_exactly(
    workers: list[WorkerProcess], full_run: tuple[list[dict[str, Any]], Path], tmp_path: Path
) -> None:
    full_lines, full_trace = full_run
    ckpt, trace = tmp_path / "ckpt", tmp_path / "trace"
    common = ("--checkpoint", ckpt, "--checkpoint-every", "5", "--trace", trace)
    first = run_example(workers, *common, "--stop-after", "7")
    assert sorted((x["rank"], x["stopped"], x["step"]) for x in first) == [(0, 0, 7), (1, 0, 7)]
    assert [len(read_trace(trace, r)) for r in range(2)] == [7, 7]
    second = run_example(workers, *common)
    for r in range(2):
        assert read_trace(trace, r)[7][:2] == (0, 8)  # continues at step 8 of epoch 0
        assert read_trace(trace, r) == read_trace(full_trace, r)  # exactly the rest
    by_rank = sorted((x for x in second if "epoch" in x), key=lambda x: (x["rank"], x["epoch"]))
    assert by_rank == sorted(
        (x for x in full_lines if "epoch" in x), key=lambda x: (x["rank"], x["epoch"])
    )
    sha = {x["params_sha256"] for x in second + full_lines if x.get("done")}
    assert len(sha) == 1  # the model ends bit for bit as without the interruption


def _epoch_lines(lines: list[dict[str, Any]]) -> dict[int, set[tuple[int, int]]]:
    out: dict[int, set[tuple[int, int]]] = {}
    for x in lines:
        if "epoch" in x:
            out.setdefault(x["epoch"], set()).add((x["records"], x["id_sum"]))
    return out


@pytest.mark.timeout(300)
def test_horovod_example_grows_from_rank_0s_state_exactly_once(
    workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """Stopped at step 7 with 2 ranks, started again with 3: the new rank starts from
    rank 0's state, the rest of the epoch is split over 3, every record once. Was: rank
    2 started epoch 0 from scratch (428 records twice, 406 never, then a hang); and the
    epoch lines summed counters saved at the old size (records 4640 of 4000)."""
    ckpt, trace = tmp_path / "ckpt", tmp_path / "trace"
    common = ("--checkpoint", ckpt, "--checkpoint-every", "5", "--trace", trace)
    run_example(workers, *common, "--stop-after", "7")
    grown = run_example(workers, *common, ranks=3)
    traces = [read_trace(trace, r) for r in range(3)]
    for epoch, expected in ((0, RECORDS - 1), (1, RECORDS // 3 * 3)):
        ids = [i for t in traces for e, _, batch in t if e == epoch for i in batch]
        assert len(ids) == len(set(ids)) == expected, epoch  # exactly once
        assert _epoch_lines(grown)[epoch] == {(expected, sum(ids))}  # every rank's line
    steps = {len([s for e, s, _ in t if e == 1]) for t in traces}
    assert len(steps) == 1  # equal steps at the new size


@pytest.mark.timeout(300)
def test_horovod_example_refuses_ranks_checkpointed_at_other_steps(
    workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """A kill between two ranks' saves leaves their checkpoints a few steps apart. Was:
    each resumed from its own (one trained steps 6-10 again on the same records), then
    the job hung in a collective. Now it ends at once, naming the steps."""
    ckpt = tmp_path / "ckpt"
    common = ("--checkpoint", ckpt, "--checkpoint-every", "5", "--stop-after", "5")
    run_example(workers, *common)
    older = (ckpt / "rank-00001.pt").read_bytes()
    run_example(workers, *common)
    (ckpt / "rank-00001.pt").write_bytes(older)  # rank 1's save of step 10 never happened
    r = launch(workers, "--checkpoint", ckpt)
    assert r.returncode != 0
    assert "different (epoch, step): [[0, 10], [0, 5]]" in r.stdout + r.stderr


@pytest.mark.timeout(300)
def test_horovod_example_stopped_at_an_epochs_last_step_reports_both_epochs(
    workers: list[WorkerProcess], full_run: tuple[list[dict[str, Any]], Path], tmp_path: Path
) -> None:
    """Stopped exactly after the epoch's last step. Was: that epoch's line never came and
    the next epoch's counted both (steps 32, records 2000)."""
    full_lines, full_trace = full_run
    ckpt, trace = tmp_path / "ckpt", tmp_path / "trace"
    common = ("--checkpoint", ckpt, "--trace", trace)
    first = run_example(workers, *common, "--stop-after", str(STEPS))
    second = run_example(workers, *common)
    assert _epoch_lines(first) == {0: _epoch_lines(full_lines)[0]}
    assert _epoch_lines(second) == {1: _epoch_lines(full_lines)[1]}
    assert {x["steps"] for x in first + second if "epoch" in x} == {STEPS}
    for r in range(2):
        assert read_trace(trace, r) == read_trace(full_trace, r)

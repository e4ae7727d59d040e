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


def run_example(workers: list[WorkerProcess], *args: str | Path) -> list[dict[str, Any]]:
    run = horovodrun()
    assert run is not None
    r = subprocess.run(
        [run, "-np", "2", "--gloo", "-H", "localhost:2", sys.executable, str(EXAMPLE),
         "--workers", ",".join(w.address for w in workers), "--epochs", str(EPOCHS),
         "--batch-size", str(BATCH), *map(str, args)],
        capture_output=True, text=True, timeout=150,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
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

"""`shardstream demo`: the whole system on one machine, no external services.

Generates a dataset in a temporary directory, starts local worker processes,
streams epochs to several ranks at once, prints throughput per epoch, checks
that every record arrived exactly once across ranks, and stops everything.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shardstream.client._consume import progress
from shardstream.client._loader import Loader


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    records: int = 20_000  # in all shards together
    shards: int = 8
    shape: tuple[int, ...] = (32, 32, 3)
    workers: int = 2
    ranks: int = 2
    epochs: int = 2
    batch_size: int = 64
    processes: int = 1  # decoding processes per worker
    seed: int = 7

    def __post_init__(self) -> None:
        # What cannot run, said in the command's flags before anything is started.
        if self.records < self.shards:
            raise ValueError(
                f"--records ({self.records}) must be at least --shards ({self.shards}), so "
                "that no shard is empty"
            )
        if self.records < self.ranks:
            raise ValueError(
                f"--records ({self.records}) must be at least --ranks ({self.ranks}), so "
                "that every rank gets records"
            )


async def _rank(loader: Loader, epoch: int) -> tuple[np.ndarray, int, int]:
    ids: list[np.ndarray] = []
    nbytes = batches = 0
    label = f"epoch {epoch} rank {loader.config.rank}"
    with progress(loader.plan(epoch).batches, label) as bar:
        async for batch in loader.epoch(epoch):
            ids.append(batch["id"])
            nbytes += sum(getattr(a, "nbytes", 0) for a in batch.values())
            batches += 1
            if bar is not None:
                bar.update(1)
    return np.concatenate(ids), nbytes, batches


async def _stream(addresses: list[str], opts: DemoOptions, out: list[str]) -> int:
    """1 when every epoch was exactly once, else 0."""
    ok = True
    loaders = [
        Loader(addresses, dataset="demo", batch_size=opts.batch_size, rank=r,
               world_size=opts.ranks, seed=opts.seed, shuffle=True)
        for r in range(opts.ranks)
    ]  # fmt: skip
    for loader in loaders:
        await loader.start()
    try:
        for epoch in range(opts.epochs):
            t0 = time.perf_counter()
            results = await asyncio.gather(*(_rank(ld, epoch) for ld in loaders))
            dt = time.perf_counter() - t0
            ids = np.concatenate([r[0] for r in results])
            nbytes = sum(r[1] for r in results)
            steps = {r[2] for r in results}
            part = opts.records // opts.ranks
            expected = part * opts.ranks
            unique = len(np.unique(ids))
            exact = len(ids) == expected and unique == expected and len(steps) == 1
            ok &= exact
            out.append(
                f"epoch {epoch}: {len(ids)} records to {opts.ranks} ranks in {dt:.2f}s: "
                f"{len(ids) / dt:,.0f} records/s, {nbytes / dt / 1e6:,.1f} MB/s; "
                f"batches per rank {sorted(steps)}; exactly once: "
                f"{'yes' if exact else f'NO ({unique} unique of {len(ids)}, {expected} expected)'}"
            )
            print(out[-1], flush=True)
    finally:
        for loader in loaders:
            await loader.aclose()
    return int(ok)


def run_demo(opts: DemoOptions) -> int:
    from shardstream._common import run_async
    from shardstream.server import make_dataset
    from shardstream.server._process import WorkerProcess

    with tempfile.TemporaryDirectory(prefix="shardstream-demo-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        try:
            make_dataset(root, shards=opts.shards, records=opts.records, shape=opts.shape)
        except ValueError as exc:  # e.g. a shard too large to make
            print(f"shardstream demo: error: {exc}", file=sys.stderr)
            return 2
        print(
            f"dataset: {opts.records} records of {'x'.join(map(str, opts.shape))} uint8 in "
            f"{opts.shards} npz shards under {root}"
        )
        workers = []
        for _ in range(opts.workers):
            w = WorkerProcess.start(
                ["--data-root", str(root), "--dataset", "demo=*.npz",
                 "--processes", str(opts.processes), "--log-level", "WARNING"]
            )  # fmt: skip
            stack.enter_context(w)
            workers.append(w)
        addresses = [w.address for w in workers]
        print(f"workers: {', '.join(addresses)} (pids {', '.join(str(w.pid) for w in workers)})")
        out: list[str] = []
        ok = bool(run_async(lambda: _stream(addresses, opts, out)))
        codes = [w.terminate() for w in workers]
        print(f"workers stopped (exit codes {codes})")
    print("demo OK" if ok and not any(codes) else "demo FAILED")
    return 0 if ok and not any(codes) else 1

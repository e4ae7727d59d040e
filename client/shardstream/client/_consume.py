"""`shardstream consume`: stream epochs from workers and report, as a rank would.

For checking a fleet from a shell: throughput per epoch, the time to the first
batch, resumes, and exactly-once when the dataset has an `id` field. A
progress bar (tqdm) is shown when stderr is a terminal and tqdm is installed.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from shardstream.client._loader import Loader
from shardstream.client._ragged import batch_nbytes, batch_records


@contextmanager
def progress(total: int, label: str) -> Iterator[Any]:
    """A tqdm bar on a terminal; a no-op elsewhere (CI, pipes, no tqdm)."""
    bar: Any = None
    if sys.stderr.isatty():
        try:
            from tqdm import tqdm

            bar = tqdm(total=total, desc=label, unit="batch", leave=False)
        except ImportError:
            bar = None
    try:
        yield bar
    finally:
        if bar is not None:
            bar.close()


async def consume(addresses: list[str], epochs: int, options: dict[str, Any]) -> int:
    async with Loader(addresses, **options) as loader:
        for epoch in range(loader.start_epoch, epochs):
            t0 = time.perf_counter()
            first = None
            nbytes = records = batches = 0
            ids: list[np.ndarray[Any, Any]] = []
            with progress(loader.plan(epoch).batches, f"epoch {epoch}") as bar:
                async for batch in loader.epoch(epoch):
                    if first is None:
                        first = time.perf_counter() - t0
                    batches += 1
                    records += batch_records(batch)
                    nbytes += batch_nbytes(batch)
                    if "id" in batch:
                        ids.append(batch["id"])
                    if bar is not None:
                        bar.update(1)
            dt = time.perf_counter() - t0
            line = (
                f"epoch {epoch}: {batches} batches, {records} records in {dt:.2f}s: "
                f"{records / dt:,.0f} records/s, {nbytes / dt / 1e6:,.1f} MB/s, "
                f"first batch after {1000 * (first or 0):.0f} ms"
            )
            if ids:
                all_ids = np.concatenate(ids)
                dup = len(all_ids) - len(np.unique(all_ids))
                line += f", duplicate ids: {dup}"
            print(line, flush=True)
        stats = loader.statistics()
        print(
            f"resumed reads: {stats.resumes} {stats.resumes_by_worker or ''}; "
            f"reads by worker: {stats.reads_by_worker}; skipped records: {stats.records_skipped}"
        )
    return 0

"""How well each kind of shuffle mixes records, and what it costs in latency.

    python -m bench.shuffle_quality            # 200k records in 16 npz shards, 2 ranks' worth

For one epoch of a synthetic dataset (ids = file order: shard by shard), rows:

- `uniform`: torch's RandomSampler, a uniform permutation of all records (numpy; no torch);
- `shards`: `shuffle=True`, shard order only;
- `window W`: `shuffle=True, shuffle_window=W` (records shuffled inside windows of W);
- `reads K`: `shuffle=True, shuffle_reads=K` (blocks of one read permuted over all shards,
  records shuffled in groups of K reads), at the given `read_bytes`.

Columns: how often neighbours in a batch come from the same shard (uniform: 1 / shards),
the Spearman rank correlation between delivery position and file order (uniform: ~0), the
mean number of shards in a batch; and, measured through a real worker process and a
`SyncLoader` whose loop sleeps `--step-ms` a batch (a training step), the first batch's
latency, the longest wait for a later batch (a stall) and the loop's total wait. The ids
come from the delivered batches.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from shardstream.client import SyncLoader
from shardstream.server import make_dataset
from shardstream.server._process import WorkerProcess


def quality(ids: np.ndarray, shard_of: np.ndarray, batch_size: int) -> dict[str, float]:
    """Mixing figures of one epoch's delivery order `ids` (global ids in file order)."""
    shard = shard_of[ids]
    n = len(ids) - len(ids) % batch_size
    same = shard[:n].reshape(-1, batch_size)
    rank = np.empty(len(ids))
    rank[np.argsort(ids, kind="stable")] = np.arange(len(ids))  # ids are distinct
    spearman = float(np.corrcoef(rank, np.arange(len(ids)))[0, 1])
    return {
        "same_shard": float(np.mean(same[:, 1:] == same[:, :-1])),
        "spearman": spearman,
        "shards_per_batch": float(np.mean([len(np.unique(b)) for b in same])),
    }


def timed_epoch(
    address: str, options: dict[str, Any], step: float
) -> tuple[np.ndarray, list[float]]:
    """One epoch's ids and how long the training loop waited for each batch, through a
    `SyncLoader` whose loop sleeps `step` seconds a batch (a training step: GIL released)."""
    waits: list[float] = []
    ids: list[np.ndarray] = []
    with SyncLoader([address], dataset="train", **options) as loader:
        batches = iter(loader.epoch(0))
        while True:
            t = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            waits.append(time.perf_counter() - t)
            ids.append(batch["id"])
            time.sleep(step)
    return np.concatenate(ids), waits


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--records", type=int, default=200_000)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--shape", default="4,4,3", help="float32 image per record (default 4,4,3)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--window", type=int, default=50_000, help="shuffle_window of the old mode")
    p.add_argument("--reads", type=int, default=8, help="shuffle_reads of the new mode")
    p.add_argument("--read-kib", default="256,8192", help="read_bytes (KiB) of the new mode")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--step-ms", type=float, default=1.0, help="the training loop's step")
    p.add_argument("--processes", type=int, default=1, help="the worker's decoding processes")
    args = p.parse_args(argv)
    shape = tuple(int(x) for x in args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_dataset(root, shards=args.shards, records=args.records, shape=shape, format="npz")
        sizes = [len(np.load(path)["id"]) for path in sorted(root.glob("*.npz"))]
        shard_of = np.repeat(np.arange(len(sizes)), sizes)
        bs = args.batch_size
        rows: list[tuple[str, dict[str, float]]] = []
        uniform = np.random.default_rng(args.seed).permutation(args.records)
        rows.append(("uniform (torch RandomSampler)", quality(uniform, shard_of, bs)))
        base = {"batch_size": bs, "seed": args.seed, "shuffle": True}
        runs: list[tuple[str, dict[str, Any]]] = [
            ("shards (shuffle=True)", {}),
            (f"window {args.window}", {"shuffle_window": args.window}),
        ]
        for kib in (int(x) for x in args.read_kib.split(",") if x):
            runs.append(
                (f"reads {args.reads}, read_bytes {kib} KiB",
                 {"shuffle_reads": args.reads, "read_bytes": kib << 10,
                  "reads_ahead": max(16, 2 * args.reads)})
            )  # fmt: skip
        with WorkerProcess.start(
            ["--data-root", str(root), "--dataset", "train=*.npz",
             "--processes", str(args.processes)]
        ) as worker:  # fmt: skip
            timed_epoch(worker.address, base, 0.0)  # warm the page cache and the worker
            for label, extra in runs:
                ids, waits = timed_epoch(worker.address, {**base, **extra}, args.step_ms / 1e3)
                assert sorted(ids.tolist()) == list(range(args.records)), label
                figures = quality(ids, shard_of, bs)
                figures.update(first_ms=waits[0] * 1e3, stall_ms=max(waits[1:]) * 1e3,
                               waited_s=sum(waits))  # fmt: skip
                rows.append((label, figures))
    record = "x".join(map(str, shape))
    print(f"{args.records} records ({record} float32 + id) in {args.shards} npz shards, "
          f"batch {bs}, 1 worker (--processes {args.processes})\n")  # fmt: skip
    print("| order | same shard, neighbours | Spearman vs file order | shards / batch "
          "| first batch | longest stall | waited in all |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for label, f in rows:
        timing = (
            f"{f['first_ms']:.0f} ms | {f['stall_ms']:.0f} ms | {f['waited_s']:.2f} s"
            if "first_ms" in f
            else "- | - | -"
        )
        print(f"| {label} | {f['same_shard']:.3f} | {f['spearman']:+.3f} "
              f"| {f['shards_per_batch']:.1f} | {timing} |")  # fmt: skip


if __name__ == "__main__":
    main()

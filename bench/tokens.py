"""Token windows for LM pretraining: shardstream against a local numpy.memmap loader.

    python -m bench.tokens [--mb 300] [--seq-len 2048] [--batch-size 16] [--processes 1,2]

Writes `--mb` MB of uint16 token files (`make_token_files`: `--shards` raw `.bin`
files and `_tokens.json`) in a temporary directory, starts one real `shardstream
worker` process per `--processes` value (dataset `lm=*.bin:tokens`, `--processes N`
decoding processes), and in this one process, the trainer, reads whole epochs of
windows of seq_len + 1 tokens (stride seq_len) in random order, `--repeats` rounds,
the systems interleaved in each round:

- `shardstream pN swW`: a `SyncLoader` (default options) over the worker with N
  decoding processes, `shuffle=True` (shard order) and `shuffle_window=W` (windows
  permuted in the client, W at a time; `--shuffle-windows`), seed = round;
- `memmap`: `np.memmap` of every file, a permutation of all windows (seed = round), each
  batch gathered window by window into a fresh (batch, seq_len + 1) array: what a
  nanoGPT-style `get_batch` does, without the random offsets.

Measured per epoch: tokens/s (windows x seq_len, the input/target pairs, per wall
second from the epoch's start to its last batch; the SyncLoader is connected before),
MB/s of arrays delivered, the trainer's CPU seconds per million tokens
(`getrusage(RUSAGE_SELF)`: every thread of this process, gRPC's and the loader's
included; the workers are other processes) and the worker's (server and decoding
processes, from /proc). Exactly once: the epoch's window count and the sum of the first
and last tokens of its windows must equal the dataset's. Medians of the rounds (min-max).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import cpu_seconds, descendants
from shardstream.client import SyncLoader
from shardstream.server._process import WorkerProcess
from shardstream.server._synth import make_token_files
from shardstream.server._tokens import window_count

VOCAB = 50257


@dataclass(frozen=True)
class Epoch:
    system: str
    windows: int
    checksum: int
    seconds: float
    client_cpu: float
    worker_cpu: float


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker_cpu(worker: WorkerProcess | None) -> float:
    if worker is None:
        return 0.0
    return sum(cpu_seconds(pid) or 0.0 for pid in descendants(worker.pid))


def _consume(batches: Iterator[dict[str, np.ndarray[Any, Any]]]) -> tuple[int, int]:
    windows = checksum = 0
    for batch in batches:
        tokens = batch["tokens"]
        windows += len(tokens)
        # The first and last token of each window: enough to see a window missing or twice,
        # at almost no cost (summing every token would double the memmap loop's CPU time).
        checksum += int(tokens[:, 0].sum(dtype=np.int64)) + int(tokens[:, -1].sum(dtype=np.int64))
    return windows, checksum


def memmap_batches(
    paths: list[Path], seq_len: int, batch_size: int, seed: int
) -> Iterator[dict[str, np.ndarray[Any, Any]]]:
    width = seq_len + 1
    views = []
    for path in paths:
        tokens = np.memmap(path, dtype="<u2", mode="r")
        n = window_count(len(tokens), width, seq_len)
        views.append(np.lib.stride_tricks.as_strided(tokens, (n, width), (seq_len * 2, 2)))
    offsets = np.cumsum([0] + [len(v) for v in views])
    order = np.random.default_rng(seed).permutation(int(offsets[-1]))
    for at in range(0, len(order), batch_size):
        picked = order[at : at + batch_size]
        shards = np.searchsorted(offsets, picked, side="right") - 1
        out = np.empty((len(picked), width), np.uint16)
        for j, (s, g) in enumerate(zip(shards.tolist(), picked.tolist(), strict=True)):
            out[j] = views[s][g - offsets[s]]
        yield {"tokens": out}


def run_memmap(paths: list[Path], args: argparse.Namespace, seed: int) -> Epoch:
    cpu, t0 = _cpu(), time.perf_counter()
    windows, checksum = _consume(memmap_batches(paths, args.seq_len, args.batch_size, seed))
    return Epoch("memmap", windows, checksum, time.perf_counter() - t0, _cpu() - cpu, 0.0)


def run_shardstream(loader: SyncLoader, name: str, worker: WorkerProcess, seed: int) -> Epoch:
    wcpu, cpu, t0 = _worker_cpu(worker), _cpu(), time.perf_counter()
    windows, checksum = _consume(loader.epoch(seed))
    seconds = time.perf_counter() - t0
    return Epoch(name, windows, checksum, seconds, _cpu() - cpu, _worker_cpu(worker) - wcpu)


def expected(paths: list[Path], seq_len: int) -> tuple[int, int]:
    windows = checksum = 0
    for path in paths:
        tokens = np.fromfile(path, dtype="<u2")
        n = window_count(len(tokens), seq_len + 1, seq_len)
        windows += n
        firsts = tokens[: n * seq_len : seq_len].astype(np.int64)  # window w: tokens w * seq_len
        lasts = tokens[seq_len : n * seq_len + 1 : seq_len].astype(
            np.int64
        )  # ...to (w + 1) * seq_len
        checksum += int(firsts.sum()) + int(lasts.sum())
    return windows, checksum


def _median(values: list[float]) -> str:
    mid = statistics.median(values)
    fmt = "{:,.0f}" if mid >= 100 else "{:.4f}" if mid < 0.1 else "{:.2f}"
    if len(values) == 1:
        return fmt.format(mid)
    return f"{fmt.format(mid)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(epochs: list[Epoch], want: tuple[int, int], seq_len: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for system in dict.fromkeys(e.system for e in epochs):
        runs = [e for e in epochs if e.system == system]
        mtok = [e.windows * seq_len / 1e6 for e in runs]
        rows.append({
            "system": system,
            "exactly_once": sum((e.windows, e.checksum) == want for e in runs),
            "rounds": len(runs),
            "tokens_per_s": [m * 1e6 / e.seconds for m, e in zip(mtok, runs, strict=True)],
            "mb_per_s": [e.windows * (seq_len + 1) * 2 / 1e6 / e.seconds for e in runs],
            "client_cpu_s_per_mtok": [e.client_cpu / m for m, e in zip(mtok, runs, strict=True)],
            "worker_cpu_s_per_mtok": [e.worker_cpu / m for m, e in zip(mtok, runs, strict=True)],
        })  # fmt: skip
    base = statistics.median(next(r for r in rows if r["system"] == "memmap")["tokens_per_s"])
    print("| system | exactly once | M tokens/s | MB/s | ÷ memmap | client CPU s / M tokens "
          "| worker CPU s / M tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        rate = statistics.median(r["tokens_per_s"])
        print(
            f"| {r['system']} | {'yes' if r['exactly_once'] == r['rounds'] else '**NO**'} "
            f"{r['exactly_once']}/{r['rounds']} | {_median([t / 1e6 for t in r['tokens_per_s']])} "
            f"| {_median(r['mb_per_s'])} | {rate / base:.2f} "
            f"| {_median(r['client_cpu_s_per_mtok'])} "
            f"| {_median(r['worker_cpu_s_per_mtok']) if r['system'] != 'memmap' else '-'} |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tokens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--mb", type=float, default=300, help="MB of uint16 tokens (300)")
    p.add_argument("--shards", type=int, default=8, help="token files (8)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window, minus one")
    p.add_argument("--batch-size", type=int, default=16, help="windows per batch (16)")
    p.add_argument("--processes", default="1,2", help="decoding processes per worker, one "
                   "worker per value (1,2)")  # fmt: skip
    p.add_argument("--shuffle-windows", default="1024,0", help="client-side shuffle windows, "
                   "in windows, one loader each (1024,0; 0: shard order only)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3, help="rounds (3)")
    p.add_argument("--dir", type=Path, default=None, help="where to write (a temp dir)")
    p.add_argument("--json", type=Path, default=None, help="append the results here")
    args = p.parse_args(argv)
    processes = [int(x) for x in args.processes.split(",") if x]
    windows = [int(x) for x in args.shuffle_windows.split(",") if x]

    base = Path(tempfile.mkdtemp(prefix="shardstream-tokens-", dir=args.dir))
    loaders: list[tuple[str, WorkerProcess, SyncLoader]] = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, base, ignore_errors=True)
        tokens = int(args.mb * 1e6 / 2)
        t0 = time.perf_counter()
        paths = make_token_files(base, shards=args.shards, tokens=tokens, seq_len=args.seq_len,
                                 vocab_size=VOCAB)  # fmt: skip
        want = expected(paths, args.seq_len)
        print(f"{tokens / 1e6:.0f} M uint16 tokens in {len(paths)} files ({args.mb:g} MB), "
              f"{want[0]:,} windows of {args.seq_len + 1}, written in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)  # fmt: skip
        opts: dict[str, Any] = {"dataset": "lm", "batch_size": args.batch_size, "shuffle": True}
        for n in processes:
            worker = stack.enter_context(WorkerProcess.start(
                ["--data-root", str(base), "--dataset", "lm=*.bin:tokens", "--processes", str(n)],
                timeout=300,
            ))  # fmt: skip
            for sw in windows:
                loader = SyncLoader([worker.address], shuffle_window=sw, **opts)
                loaders.append((f"shardstream p{n} sw{sw}", worker, stack.enter_context(loader)))
        epochs: list[Epoch] = []
        for round_no in range(args.repeats):
            epochs.append(run_memmap(paths, args, round_no))
            for name, worker, loader in loaders:
                epochs.append(run_shardstream(loader, name, worker, round_no))
            print(f"round {round_no + 1}: " + ", ".join(
                f"{e.system} {e.windows * args.seq_len / e.seconds / 1e6:.1f} M tok/s"
                for e in epochs[-1 - len(loaders):]), file=sys.stderr)  # fmt: skip
        print(f"\nseq_len {args.seq_len}, batch {args.batch_size}, {want[0]:,} windows "
              f"({want[0] * args.seq_len / 1e6:.0f} M tokens) per epoch, "
              f"{os.cpu_count()} cores, "
              f"{platform.python_version()}; medians of {args.repeats} (min-max)\n")  # fmt: skip
        rows = report(epochs, want, args.seq_len)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

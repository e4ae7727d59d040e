"""What indexing costs: reading every byte for content digests, with and without the cache.

    python -m bench.indexing [--gb 1] [--shards 64] [--many 1000] [--dir DIR] [--drop-caches]

Writes `--gb` GB of npz shards (64x64x3 uint8 images) and indexes them as a worker
does (`index_in_threads`: the decoder's index of every shard plus the xxh3-128
digest of every byte), then `--many` small shards for the per-shard cost of a
restart. Rows:

- `digests only`: `file_digest` of every shard, THREADS at a time (the read and hash);
- `index, no cache`: a start without a digest cache (every byte read);
- `index, cache cold`: the first start with a cache (every byte read, digests stored);
- `index, cache warm`: a restart over unchanged shards (no shard read for a digest);
- `index, page cache dropped`: with `--drop-caches` (root, Linux), the files are
  evicted from the page cache first, so the disk is read;
- for the small shards: a whole index without and with a warm cache (the decoder's
  index of each shard included), and the digests alone found in the warm cache.

The data is in the page cache after it is written (unless dropped): the GB/s are
those of the CPU (read from the page cache, hash), an upper bound for a disk.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from shardstream.server import DatasetSpec, make_dataset
from shardstream.server._catalog import index_in_threads
from shardstream.server._fingerprint import ALGORITHM, THREADS, Digester, Progress, file_digest

SHAPE = (64, 64, 3)  # uint8 images: 12,288 bytes a record


def _index(root: Path, cache: Path | None) -> float:
    spec = DatasetSpec(name="bench", pattern="*.npz", cache_dir=cache)
    t0 = time.perf_counter()
    asyncio.run(index_in_threads(root, (spec,)))
    return time.perf_counter() - t0


def _digests(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(file_digest, paths))
    return time.perf_counter() - t0


def _cached_digests(root: Path, cache: Path) -> float:
    """Seconds to find the digests of every shard under `root` in a warm cache."""
    paths = sorted(root.glob("*.npz"))

    async def run() -> float:
        async with Digester() as digester:
            progress = Progress("bench", len(paths))
            t0 = time.perf_counter()
            found = await asyncio.gather(*(digester.digest(p, progress, cache) for p in paths))
            assert all(d.cached for d in found)
            return time.perf_counter() - t0

    return asyncio.run(run())


def _drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        print(f"cannot drop the page cache ({exc}); row skipped", file=sys.stderr)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.indexing", description=__doc__)
    p.add_argument("--gb", type=float, default=1.0, help="size of the large dataset")
    p.add_argument("--shards", type=int, default=64, help="shards of the large dataset")
    p.add_argument("--many", type=int, default=1000, help="small shards, for a restart's cost")
    p.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp dir)")
    p.add_argument("--drop-caches", action="store_true", help="also index from the disk")
    p.add_argument("--repeats", type=int, default=3, help="runs of each row (the best counts)")
    args = p.parse_args(argv)

    base = Path(tempfile.mkdtemp(prefix="shardstream-indexing-", dir=args.dir))
    try:
        big, many, cache = base / "big", base / "many", base / "cache"
        records = int(args.gb * 1e9 / (SHAPE[0] * SHAPE[1] * SHAPE[2]))
        paths = make_dataset(big, shards=args.shards, records=records, shape=SHAPE)
        size = sum(path.stat().st_size for path in paths)
        make_dataset(many, shards=args.many, records=args.many * 4, shape=(4, 4, 3))
        rows: list[tuple[str, float, float]] = []  # name, seconds, bytes read for digests

        def best(fn: object, *a: object) -> float:
            return min(fn(*a) for _ in range(args.repeats))  # type: ignore[operator]

        rows.append(("digests only", best(_digests, paths), size))
        rows.append(("index, no cache", best(_index, big, None), size))
        shutil.rmtree(cache, ignore_errors=True)
        rows.append(("index, cache cold", _index(big, cache), size))
        rows.append(("index, cache warm", best(_index, big, cache), 0))
        if args.drop_caches and _drop_page_cache():
            rows.append(("index, page cache dropped", _index(big, None), size))
        n = args.many
        many_cold = best(_index, many, None)
        _index(many, cache)
        many_warm = best(_index, many, cache)
        many_lookups = best(_cached_digests, many, cache)

        print(f"{len(paths)} npz shards, {size / 1e9:.2f} GB, {ALGORITHM}, {THREADS} digest "
              f"threads, {os.cpu_count()} cores")  # fmt: skip
        print(f"{'':28} {'seconds':>8} {'GB/s':>6} {'s per GB':>9}")
        for name, seconds, nbytes in rows:
            rate = f"{nbytes / 1e9 / seconds:6.2f}" if nbytes else f"{'-':>6}"
            print(f"{name:28} {seconds:8.3f} {rate} {seconds / (size / 1e9):9.3f}")
        print(f"{n} small shards: index without cache {many_cold * 1e3:.0f} ms, with a warm "
              f"cache {many_warm * 1e3:.0f} ms (decoder index included); their digests from "
              f"the warm cache: {many_lookups * 1e6 / n:.0f} ms per 1000 shards")  # fmt: skip
        print(json.dumps({
            "gb": size / 1e9, "shards": len(paths), "cores": os.cpu_count(), "threads": THREADS,
            **{name: round(seconds, 4) for name, seconds, _ in rows},
            "many": n, "many_no_cache_s": round(many_cold, 4),
            "many_warm_cache_s": round(many_warm, 4),
            "many_digest_lookups_s": round(many_lookups, 4),
        }))  # fmt: skip
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

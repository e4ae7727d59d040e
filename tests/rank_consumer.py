"""A training rank as its own process, for resume tests: prints one JSON line per batch
with the batch's ids and the loader's state after it (what a trainer would checkpoint).

    python rank_consumer.py ADDR[,ADDR] --rank R --world W --epochs 2 [--state FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from shardstream.client import Loader


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("addresses")
    p.add_argument("--rank", type=int, default=0)
    p.add_argument("--world", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--state", default="")
    p.add_argument("--ledger", default=None)
    args = p.parse_args()
    state = json.loads(Path(args.state).read_text()) if args.state else None
    async with Loader(
        args.addresses.split(","), dataset="train", batch_size=16, rank=args.rank,
        world_size=args.world, seed=args.seed, shuffle=True, shuffle_window=40,
        read_bytes=4096, state=state, ledger_dir=args.ledger,
    ) as loader:  # fmt: skip
        for epoch in range(loader.start_epoch, args.epochs):
            async for batch in loader.epoch(epoch):
                line = {"epoch": epoch, "ids": batch["id"].tolist(), "state": loader.state_dict()}
                sys.stdout.write(json.dumps(line) + "\n")
                sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())

"""Train a tiny model with torch.distributed (gloo), data from shardstream.

    shardstream make-dataset /tmp/data --shards 8 --records 4000 --shape 8,8,3
    shardstream worker --data-root /tmp/data --dataset train='*.npz' --port 50051 &
    torchrun --nproc_per_node 2 examples/train_torch_ddp.py --workers 127.0.0.1:50051

Rank and world size come from torchrun (via torch.distributed). After every
epoch each rank prints one JSON line: its steps, and the record count and id
sum all-reduced over the ranks, which show exactly-once delivery.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from shardstream.client import SyncLoader
from shardstream.client.torch import to_torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default=os.environ.get("SHARDSTREAM_WORKERS", ""))
    parser.add_argument("--dataset", default="train")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not args.workers:
        parser.error("--workers (or SHARDSTREAM_WORKERS) is required")

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    with SyncLoader(args.workers, dataset=args.dataset, batch_size=args.batch_size,
                    seed=1, shuffle=True) as loader:  # fmt: skip
        (image,) = [f for f in loader.schema if f.name == "image"]
        features = int(torch.tensor(image.shape).prod())
        model = DistributedDataParallel(torch.nn.Linear(features, 10))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for epoch in range(args.epochs):
            steps, records, id_sum = 0, 0, 0
            for batch in loader.epoch(epoch):
                t = to_torch(batch)
                x = t["image"].reshape(len(t["image"]), -1).float() / 255.0
                loss = torch.nn.functional.cross_entropy(model(x), t["label"] % 10)
                optimizer.zero_grad()
                loss.backward()  # all-reduces gradients: every rank must take this step
                optimizer.step()
                steps += 1
                records += len(t["id"])
                id_sum += int(t["id"].sum())
            totals = torch.tensor([records, id_sum], dtype=torch.int64)
            dist.all_reduce(totals)
            line = {"rank": dist.get_rank(), "epoch": epoch, "steps": steps,
                    "records": int(totals[0]), "id_sum": int(totals[1]),
                    "loss": round(float(loss), 4)}  # fmt: skip
            sys.stdout.write(json.dumps(line) + "\n")  # one write: ranks share stdout
            sys.stdout.flush()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Train a tiny model with Hugging Face Accelerate (2 CPU processes), data from shardstream.

    shardstream make-dataset /tmp/data --shards 8 --records 4000 --shape 8,8,3
    shardstream worker --data-root /tmp/data --dataset train='*.npz' --port 50051 &
    torchrun --nproc_per_node 2 examples/train_accelerate.py --workers 127.0.0.1:50051

(`accelerate launch --cpu --num_processes 2` starts one process on a machine without
GPUs: use torchrun there, as above, or `accelerate launch --multi_gpu` on GPUs.)

shardstream already gives each rank its own part of every epoch, so the data source
goes to `accelerator.prepare()` as it is (it returns it unchanged), not wrapped in a
DataLoader, which Accelerate would re-shard or dispatch from rank 0 (`--wrong-way`
shows the clear error that gives). The rank comes from Accelerate's process group.
After every epoch each rank prints one JSON line: its steps, and the record count
and id sum all-reduced over the ranks.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from accelerate import Accelerator

from shardstream.client.torch import ShardstreamIterable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", default=os.environ.get("SHARDSTREAM_WORKERS", ""))
    parser.add_argument("--dataset", default="train")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--wrong-way", action="store_true", help="prepare(DataLoader(data))")
    args = parser.parse_args()
    if not args.workers:
        parser.error("--workers (or SHARDSTREAM_WORKERS) is required")

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    data = ShardstreamIterable(
        args.workers, dataset=args.dataset, batch_size=args.batch_size, seed=1, shuffle=True
    )
    model = torch.nn.Linear(8 * 8 * 3, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    if args.wrong_way:
        loader = torch.utils.data.DataLoader(data, batch_size=None)
        model, optimizer, batches = accelerator.prepare(model, optimizer, loader)
    else:
        model, optimizer, batches = accelerator.prepare(model, optimizer, data)
    try:
        for epoch in range(args.epochs):  # the data source moves to the next epoch itself
            steps, records, id_sum, first = 0, 0, 0, None
            for batch in batches:
                x = batch["image"].to(accelerator.device)
                x = x.reshape(len(x), -1).float() / 255.0
                loss = torch.nn.functional.cross_entropy(model(x), batch["label"] % 10)
                optimizer.zero_grad()
                accelerator.backward(loss)  # all-reduces gradients: every rank steps
                optimizer.step()
                steps += 1
                records += len(batch["id"])
                id_sum += int(batch["id"].sum())
                first = int(batch["id"][0]) if first is None else first
            totals = accelerator.reduce(torch.tensor([records, id_sum]), reduction="sum")
            line = {"rank": accelerator.process_index, "epoch": epoch, "steps": steps,
                    "records": int(totals[0]), "id_sum": int(totals[1]),
                    "first": first}  # fmt: skip
            print(json.dumps(line), flush=True)
    finally:
        data.close()


if __name__ == "__main__":
    main()

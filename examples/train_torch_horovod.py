"""Train a tiny model with Horovod (horovod.torch), data from shardstream.

    bash scripts/install-horovod.sh      # Horovod 0.28.1 with PyTorch and Gloo, built here
    shardstream make-dataset /tmp/data --shards 8 --records 4000 --shape 8,8,3
    shardstream worker --data-root /tmp/data --dataset train='*.npz' --port 50051 &
    horovodrun -np 2 --gloo python examples/train_torch_horovod.py --workers 127.0.0.1:50051

Rank and world size come from Horovod (`hvd.rank()`, `hvd.size()`), found by the
loader once `hvd.init()` ran. Every step all-reduces the gradients
(`hvd.DistributedOptimizer`): a rank short of a batch would hang the job. After every
epoch each rank prints a JSON line with its steps, every rank's steps (all-gathered)
and the all-reduced record count and id sum.

`--checkpoint DIR` saves, per rank, the model, the optimizer and the loader's state
(`DIR/rank-00000.pt`) every `--checkpoint-every` steps and at the end of each epoch;
started again with the same directory, a run continues exactly where it was saved.
`--stop-after N` ends the run after N steps (saving first), like an interruption.
`--trace DIR` writes the record ids of every step, to check what each rank trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import horovod.torch as hvd
import torch

from shardstream.client import SyncLoader
from shardstream.client.torch import to_torch


def emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")  # one write: ranks share stdout
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default=os.environ.get("SHARDSTREAM_WORKERS", ""))
    parser.add_argument("--dataset", default="train")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--checkpoint", type=Path, help="directory of the checkpoints")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps")
    parser.add_argument("--stop-after", type=int, help="end after this many steps of this run")
    parser.add_argument("--trace", type=Path, help="directory: the record ids of every step")
    args = parser.parse_args()
    if not args.workers:
        parser.error("--workers (or SHARDSTREAM_WORKERS) is required")

    hvd.init()
    torch.manual_seed(0)
    ckpt, saved, trace = None, None, None
    if args.checkpoint:
        args.checkpoint.mkdir(parents=True, exist_ok=True)
        ckpt = args.checkpoint / f"rank-{hvd.rank():05d}.pt"
        if ckpt.exists():
            saved = torch.load(ckpt)
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
        trace = (args.trace / f"rank-{hvd.rank():05d}.jsonl").open("a")

    # No rank= / world_size=: found in Horovod.
    with SyncLoader(args.workers, dataset=args.dataset, batch_size=args.batch_size,
                    seed=1, shuffle=True,
                    state=None if saved is None else saved["loader"]) as loader:  # fmt: skip
        assert (loader.config.rank, loader.config.world_size) == (hvd.rank(), hvd.size())
        (image,) = [f for f in loader.schema if f.name == "image"]
        features = int(torch.tensor(image.shape).prod())
        model = torch.nn.Linear(features, 10)
        optimizer = hvd.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.01), named_parameters=model.named_parameters()
        )
        # The counters of the epoch in progress, saved with it: its line stays whole.
        progress = {"steps": 0, "records": 0, "id_sum": 0}
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            progress = saved["progress"]
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)

        def checkpoint() -> None:
            if ckpt is not None:
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "loader": loader.state_dict(), "progress": progress}, tmp)  # fmt: skip
                os.replace(tmp, ckpt)  # a crash while saving leaves the previous one whole

        run_steps, stopped = 0, False
        for epoch in range(loader.start_epoch, args.epochs):
            for batch in loader.epoch(epoch):
                t = to_torch(batch)
                x = t["image"].reshape(len(t["image"]), -1).float() / 255.0
                loss = torch.nn.functional.cross_entropy(model(x), t["label"] % 10)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()  # all-reduces gradients: every rank must take this step
                progress["steps"] += 1
                progress["records"] += len(t["id"])
                progress["id_sum"] += int(t["id"].sum())
                run_steps += 1
                if trace is not None:
                    step = {"epoch": epoch, "step": progress["steps"], "ids": batch["id"].tolist()}
                    trace.write(json.dumps(step) + "\n")
                    trace.flush()
                if args.checkpoint_every and progress["steps"] % args.checkpoint_every == 0:
                    checkpoint()
                if run_steps == args.stop_after:
                    stopped = True
                    break
            if stopped:  # an interruption, in the middle of an epoch
                checkpoint()
                emit({"rank": hvd.rank(), "stopped": epoch, "step": progress["steps"]})
                break
            # Collectives over every rank: equal steps, and every record exactly once.
            steps_all = hvd.allgather(torch.tensor([progress["steps"]]), name="steps").tolist()
            totals = hvd.allreduce(
                torch.tensor([progress["records"], progress["id_sum"]], dtype=torch.int64),
                op=hvd.Sum,
                name="totals",
            )
            emit({"rank": hvd.rank(), "epoch": epoch, "steps": progress["steps"],
                  "steps_all": steps_all, "records": int(totals[0]),
                  "id_sum": int(totals[1])})  # fmt: skip
            if len(set(steps_all)) != 1:
                raise SystemExit(f"unequal steps in epoch {epoch}: {steps_all}")
            progress = {"steps": 0, "records": 0, "id_sum": 0}
            checkpoint()  # at the end of the epoch: the state says "next epoch, step 0"
        else:
            digest = hashlib.sha256()
            for name, tensor in sorted(model.state_dict().items()):
                digest.update(name.encode() + tensor.numpy().tobytes())
            emit({"rank": hvd.rank(), "done": True, "params_sha256": digest.hexdigest()[:16]})
    hvd.shutdown()


if __name__ == "__main__":
    main()

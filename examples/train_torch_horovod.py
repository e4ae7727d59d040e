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
        # A rank new to the job (the world size grew) starts from rank 0's state: every rank
        # saved at the same step, and the loader splits the rest over the new world size.
        for path in (ckpt, args.checkpoint / "rank-00000.pt"):
            if path.exists():
                saved = torch.load(path)
                break
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
        # `records` and `id_sum` are this rank's since the run started; a checkpoint saves
        # the job's totals (all-reduced), which rank 0 alone takes back, so they stay right
        # when the job comes back with another world size.
        progress = {"steps": 0, "records": 0, "id_sum": 0}
        if saved is not None:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            progress = dict(saved["progress"])
            if hvd.rank() != 0:
                progress.update(records=0, id_sum=0)
        # Every rank must continue from the same step (a kill between two ranks' saves
        # leaves them apart: unequal steps would hang a collective and repeat records).
        where = hvd.allgather(
            torch.tensor([[loader.start_epoch, progress["steps"]]]), name="resume"
        )
        if len(set(map(tuple, where.tolist()))) != 1:
            raise SystemExit(
                f"checkpoints of the ranks are at different (epoch, step): "
                f"{where.tolist()}; restore a set saved at one step"
            )
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)

        def totals() -> tuple[int, int]:
            """The job's records and id sum this epoch (a collective: every rank calls it)."""
            both = hvd.allreduce(
                torch.tensor([progress["records"], progress["id_sum"]], dtype=torch.int64),
                op=hvd.Sum,
                name="totals",
            )
            return int(both[0]), int(both[1])

        def checkpoint() -> None:  # every rank at the same step
            if ckpt is not None:
                records, id_sum = totals()
                job = {**progress, "records": records, "id_sum": id_sum}
                tmp = ckpt.with_suffix(".tmp")
                torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "loader": loader.state_dict(), "progress": job}, tmp)  # fmt: skip
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
            # Stopped after the epoch's last batch, the loader's state already points at the
            # next epoch: finish this one's bookkeeping first, or its line would never come.
            if stopped and loader.state_dict()["epoch"] == epoch:  # in the middle of an epoch
                checkpoint()
                emit({"rank": hvd.rank(), "stopped": epoch, "step": progress["steps"]})
                break
            # Collectives over every rank: equal steps, and every record exactly once.
            steps_all = hvd.allgather(torch.tensor([progress["steps"]]), name="steps").tolist()
            records, id_sum = totals()
            emit({"rank": hvd.rank(), "epoch": epoch, "steps": progress["steps"],
                  "steps_all": steps_all, "records": records, "id_sum": id_sum})  # fmt: skip
            if len(set(steps_all)) != 1:
                raise SystemExit(f"unequal steps in epoch {epoch}: {steps_all}")
            progress = {"steps": 0, "records": 0, "id_sum": 0}
            checkpoint()  # at the end of the epoch: the state says "next epoch, step 0"
            if stopped:
                emit({"rank": hvd.rank(), "stopped": epoch + 1, "step": 0})
                break
        else:
            digest = hashlib.sha256()
            for name, tensor in sorted(model.state_dict().items()):
                digest.update(name.encode() + tensor.numpy().tobytes())
            emit({"rank": hvd.rank(), "done": True, "params_sha256": digest.hexdigest()[:16]})
    hvd.shutdown()


if __name__ == "__main__":
    main()

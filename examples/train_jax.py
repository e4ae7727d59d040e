"""Train a tiny model with JAX, data-parallel over processes, data from shardstream.

    shardstream make-dataset /tmp/data --shards 8 --records 4000 --shape 8,8,3
    shardstream worker --data-root /tmp/data --dataset train='*.npz' --port 50051 &
    for i in 0 1; do
        python examples/train_jax.py --workers 127.0.0.1:50051 --checkpoint /tmp/ckpt \\
            --coordinator 127.0.0.1:12355 --num-processes 2 --process-id $i &
    done; wait

Each process calls `jax.distributed.initialize`; the loader finds its rank and the
world size there (`jax.process_index()`, `jax.process_count()`). Every step builds
global arrays from the processes' batches (`to_jax(batch, sharding=...)`) and runs
one `jit`-compiled step of softmax regression on them, whose gradient XLA all-reduces
across the processes (on CPU over Gloo): a rank short of a batch would hang the job.

`--checkpoint DIR` saves, per rank, the model and the loader's state as plain JSON
(`DIR/rank-00000.json`) every `--checkpoint-every` steps and at the end of each epoch;
started again with the same directory, a run continues exactly where it was saved, in
the middle of an epoch too. `--stop-after N` ends the run after N steps (saving
first), like an interruption. After every epoch each rank prints one JSON line: its
steps and the steps, record count and id sum gathered over the processes.
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

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from shardstream.client import SyncLoader
from shardstream.client.jax import to_jax

LEARNING_RATE = 0.05
CLASSES = 10


def loss_fn(params: dict[str, jax.Array], image: jax.Array, label: jax.Array) -> jax.Array:
    x = image.reshape(image.shape[0], -1).astype(jnp.float32) / 255.0
    logits = x @ params["w"] + params["b"]
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, (label % CLASSES)[:, None], axis=1))


def make_train_step(replicated: NamedSharding) -> Any:
    @jax.jit
    def step(params: dict[str, jax.Array], image: jax.Array, label: jax.Array) -> Any:
        # `image` and `label` are sharded over the processes: the mean in the loss, and so
        # the gradient, covers the global batch, and XLA all-reduces it.
        loss, grads = jax.value_and_grad(loss_fn)(params, image, label)
        new = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
        return jax.lax.with_sharding_constraint((new, loss), replicated)

    return step


def global_params(host: dict[str, np.ndarray], replicated: NamedSharding) -> dict[str, jax.Array]:
    return {
        k: jax.make_array_from_callback(v.shape, replicated, lambda index, v=v: v[index])
        for k, v in host.items()
    }


def host_params(params: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v.addressable_data(0)) for k, v in params.items()}  # replicated


def save(path: Path, checkpoint: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(checkpoint))
    os.replace(tmp, path)  # a crash while saving leaves the previous checkpoint whole


def emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default=os.environ.get("SHARDSTREAM_WORKERS", ""))
    parser.add_argument("--dataset", default="train")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--coordinator", help="HOST:PORT of process 0, for jax.distributed")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    parser.add_argument("--checkpoint", type=Path, help="directory of the JSON checkpoints")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps")
    parser.add_argument("--stop-after", type=int, help="end after this many steps of this run")
    parser.add_argument("--trace", type=Path, help="directory: the record ids of every step")
    args = parser.parse_args()
    if not args.workers:
        parser.error("--workers (or SHARDSTREAM_WORKERS) is required")

    if args.coordinator:
        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    rank = jax.process_index()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    by_batch = NamedSharding(mesh, PartitionSpec("data"))  # first dimension over processes
    replicated = NamedSharding(mesh, PartitionSpec())

    saved: dict[str, Any] | None = None
    ckpt = None
    if args.checkpoint:
        args.checkpoint.mkdir(parents=True, exist_ok=True)
        ckpt = args.checkpoint / f"rank-{rank:05d}.json"
        if ckpt.exists():
            saved = json.loads(ckpt.read_text())
    trace = None
    if args.trace:
        args.trace.mkdir(parents=True, exist_ok=True)
        trace = (args.trace / f"rank-{rank:05d}.jsonl").open("a")

    # No rank= / world_size=: found in jax.distributed.
    with SyncLoader(args.workers, dataset=args.dataset, batch_size=args.batch_size,
                    seed=1, shuffle=True,
                    state=None if saved is None else saved["loader"]) as loader:  # fmt: skip
        assert (loader.config.rank, loader.config.world_size) == (rank, jax.process_count())
        (image,) = [f for f in loader.schema if f.name == "image"]
        features = int(np.prod(image.shape))
        host = {"w": np.zeros((features, CLASSES), np.float32), "b": np.zeros(CLASSES, np.float32)}
        # The counters of the epoch in progress, saved with it: its line stays whole.
        progress = {"steps": 0, "records": 0, "id_sum": 0}
        if saved is not None:
            host = {k: np.asarray(v, np.float32) for k, v in saved["params"].items()}
            progress = saved["progress"]
        params = global_params(host, replicated)
        train_step = make_train_step(replicated)

        def checkpoint() -> None:
            if ckpt is not None:
                save(ckpt, {"params": {k: v.tolist() for k, v in host_params(params).items()},
                            "loader": loader.state_dict(), "progress": progress})  # fmt: skip

        run_steps, stopped = 0, False
        for epoch in range(loader.start_epoch, args.epochs):
            loss = None
            for batch in loader.epoch(epoch):
                arrays = to_jax({k: batch[k] for k in ("image", "label")}, sharding=by_batch)
                params, loss = train_step(params, arrays["image"], arrays["label"])
                progress["steps"] += 1
                progress["records"] += len(batch["id"])
                progress["id_sum"] += int(batch["id"].sum())
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
                emit({"rank": rank, "stopped": epoch, "step": progress["steps"]})
                break
            # Every process's counters, gathered by a collective: equal steps, exactly once.
            mine = np.array([progress["steps"], progress["records"], progress["id_sum"]])
            assert mine.max() < 2**31  # JAX gathers 32-bit integers (no jax_enable_x64)
            every = np.asarray(multihost_utils.process_allgather(mine.astype(np.int32)))
            every = every.reshape(-1, 3)
            emit({"rank": rank, "epoch": epoch, "steps": int(progress["steps"]),
                  "steps_all": every[:, 0].tolist(), "records": int(every[:, 1].sum()),
                  "id_sum": int(every[:, 2].sum()),
                  "loss": None if loss is None else round(float(loss), 4)})  # fmt: skip
            if len(set(every[:, 0].tolist())) != 1:
                raise SystemExit(f"unequal steps in epoch {epoch}: {every[:, 0].tolist()}")
            progress = {"steps": 0, "records": 0, "id_sum": 0}
            checkpoint()  # at the end of the epoch: the state says "next epoch, step 0"
        else:
            digest = hashlib.sha256()
            for k, v in sorted(host_params(params).items()):
                digest.update(k.encode() + v.tobytes())
            emit({"rank": rank, "done": True, "params_sha256": digest.hexdigest()[:16]})
    if args.coordinator:
        jax.distributed.shutdown()


if __name__ == "__main__":
    main()

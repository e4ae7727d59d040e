"""A rank resuming from a saved state in a fresh process, through the synchronous paths:
prints the ids of the rest of the epoch as one JSON list.

    python sync_consumer.py ADDR sync|torch STATE_FILE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OPTIONS: dict[str, Any] = {
    "dataset": "train", "batch_size": 50, "seed": 3, "shuffle": True, "shuffle_window": 64,
    "read_bytes": 4096, "prefetch_batches": 4,
}  # fmt: skip


def main() -> None:
    address, path, state_file = sys.argv[1:4]
    state = json.loads(Path(state_file).read_text())
    ids: list[int] = []
    if path == "sync":
        from shardstream.client import SyncLoader

        with SyncLoader([address], **OPTIONS) as sync:
            sync.load_state_dict(state)
            for batch in sync.epoch(sync.start_epoch):
                ids += batch["id"].tolist()
    else:
        import torch

        from shardstream.client.torch import ShardstreamIterable

        data = ShardstreamIterable([address], **OPTIONS)
        try:
            data.load_state_dict(state)
            for batch in torch.utils.data.DataLoader(data, batch_size=None, num_workers=0):
                ids += batch["id"].tolist()
        finally:
            data.close()
    print(json.dumps(ids))


if __name__ == "__main__":
    main()

"""Example training rank for docker/compose.yaml and docker/k8s/trainer-job.yaml.

Environment:
  SHARDSTREAM_WORKERS  worker targets, comma- or space-separated; `dns:///NAME:PORT`
                       stands for every address behind NAME (all replicas of a compose
                       service, all ready pods of a headless Service): the loader connects
                       to each, spreads reads over them, and re-resolves NAME every 30 s
  RANK, WORLD_SIZE     this rank and the number of ranks (default 0 and 1)
  DATASET, BATCH_SIZE, EPOCHS, SEED   loader options (default train, 256, 2, 0)
  SHARDSTREAM_TLS_CA           TLS: the CA that signed the workers' certificate (the
                               system's roots if unset and another TLS variable is set)
  SHARDSTREAM_TLS_SERVER_NAME  the name the workers' certificate is checked against
  SHARDSTREAM_TLS_CLIENT_CERT, SHARDSTREAM_TLS_CLIENT_KEY
                               mTLS: this rank's certificate and key
  SHARDSTREAM_AUTH_TOKEN_FILE  a file holding the workers' bearer token (reread when it
                               changes)

Prints records and batches per epoch and exits 0.
"""

from __future__ import annotations

import os
import sys
import time

from shardstream.client import ClientSecurity, SyncLoader


def security() -> ClientSecurity | None:
    """TLS and the token from the environment; None (plaintext, no token) if none is set.
    Any TLS variable turns TLS on (ClientSecurity's rule)."""
    env = {
        name: os.environ.get(f"SHARDSTREAM_{name}") or None
        for name in ("TLS_CA", "TLS_SERVER_NAME", "TLS_CLIENT_CERT", "TLS_CLIENT_KEY",
                     "AUTH_TOKEN_FILE")
    }  # fmt: skip
    if not any(env.values()):
        return None
    return ClientSecurity(
        tls_ca=env["TLS_CA"],
        tls_server_name=env["TLS_SERVER_NAME"],
        tls_cert=env["TLS_CLIENT_CERT"],
        tls_key=env["TLS_CLIENT_KEY"],
        auth_token_file=env["AUTH_TOKEN_FILE"],
    )


def main() -> int:
    targets = os.environ.get("SHARDSTREAM_WORKERS", "").replace(",", " ").split()
    if not targets:
        sys.exit("train.py: set SHARDSTREAM_WORKERS (e.g. dns:///worker:50051)")
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    epochs = int(os.environ.get("EPOCHS", "2"))
    print(f"rank {rank}/{world_size}: workers {targets}", flush=True)
    with SyncLoader(
        targets,
        dataset=os.environ.get("DATASET", "train"),
        batch_size=int(os.environ.get("BATCH_SIZE", "256")),
        rank=rank,
        world_size=world_size,
        seed=int(os.environ.get("SEED", "0")),
        shuffle=True,
        security=security(),
    ) as loader:
        for epoch in range(epochs):
            start = time.perf_counter()
            records = batches = 0
            for batch in loader.epoch(epoch):
                records += len(next(iter(batch.values())))
                batches += 1
            seconds = time.perf_counter() - start
            print(
                f"rank {rank} epoch {epoch}: {batches} batches, {records} records, "
                f"{records / seconds:.0f} records/s",
                flush=True,
            )
        print(f"rank {rank}: reads by worker {loader.statistics().reads_by_worker}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

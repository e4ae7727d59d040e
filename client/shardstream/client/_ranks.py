"""Who am I: rank and world size from the job launcher.

Explicit `rank=` / `world_size=` arguments always win. Otherwise, in order:

1. Horovod, when it is imported and initialised: `hvd.rank()`, `hvd.size()`;
2. torch.distributed, when it is imported and initialised;
3. JAX, when it is imported and either `jax.distributed.initialize()` ran or its
   already started backends span several processes (a multi-host TPU slice):
   `jax.process_index()`, `jax.process_count()`;
4. the environment of the launcher:
   `HOROVOD_RANK`/`HOROVOD_SIZE` (horovodrun), `RANK`/`WORLD_SIZE` (torchrun),
   `OMPI_COMM_WORLD_RANK`/`OMPI_COMM_WORLD_SIZE` (Open MPI), `PMI_RANK`/`PMI_SIZE`
   (MPICH, Intel MPI), `SLURM_PROCID`/`SLURM_NTASKS` (SLURM);
5. rank 0 of 1.

Frameworks are never imported here: only ones the program already imported
are asked, and asking has no side effects. In particular JAX's backends are
never started from here (starting one claims the accelerators, e.g. most of a
GPU's memory): while they are not started yet, an initialised `jax.distributed`
is asked for the process id and count it was given, which are what
`jax.process_index()` / `jax.process_count()` report once they are.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

ENV_PAIRS = (
    ("HOROVOD_RANK", "HOROVOD_SIZE", "horovodrun"),
    ("RANK", "WORLD_SIZE", "torchrun"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "Open MPI"),
    ("PMI_RANK", "PMI_SIZE", "MPI (PMI)"),
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM"),
)


def _horovod() -> tuple[int, int] | None:
    for name in ("horovod.torch", "horovod.tensorflow", "horovod.keras", "horovod.mxnet"):
        hvd: Any = sys.modules.get(name)
        if hvd is None:
            continue
        try:
            if hvd.is_initialized():
                return int(hvd.rank()), int(hvd.size())
        except (AttributeError, ValueError, RuntimeError):
            continue
    return None


def _torch_distributed() -> tuple[int, int] | None:
    dist: Any = sys.modules.get("torch.distributed")
    try:
        if dist is not None and dist.is_available() and dist.is_initialized():
            return int(dist.get_rank()), int(dist.get_world_size())
    except (AttributeError, RuntimeError):
        return None
    return None


def _jax() -> tuple[int, int] | None:
    jax: Any = sys.modules.get("jax")
    if jax is None:
        return None
    try:
        distributed: Any = sys.modules.get("jax._src.distributed")
        bridge: Any = sys.modules.get("jax._src.xla_bridge")
        started = bridge is not None and bool(bridge.backends_are_initialized())
        state = None if distributed is None else distributed.global_state
        if state is not None and state.client is not None:  # jax.distributed.is_initialized()
            if started:
                return int(jax.process_index()), int(jax.process_count())
            return int(state.process_id), int(state.num_processes)
        if started and int(jax.process_count()) > 1:  # several processes without it (TPU)
            return int(jax.process_index()), int(jax.process_count())
    except (AttributeError, TypeError, RuntimeError):  # a JAX whose internals moved: not asked
        return None
    return None


def _parse(name: str, value: str) -> int:
    """A launcher's variable as a non-negative decimal integer (not `int()`'s grammar,
    which takes "1_0" for 10 and non-ASCII digits)."""
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"{name}={value!r} is not a non-negative integer")
    return int(text)


def discover(env: Mapping[str, str] | None = None, *, strict: bool = False) -> tuple[int, int, str]:
    """(rank, world_size, where they came from). A launcher's variables must be
    integers with 0 <= rank < world_size. `strict`: a launcher's world size above 1
    without its rank, or a rank without its world size, is an error (a process that
    would otherwise take "rank 0 of 1" and read the whole dataset again: Lightning's
    launcher sets WORLD_SIZE and LOCAL_RANK, and RANK only once it starts
    torch.distributed)."""
    found = _horovod()
    if found:
        return (*found, "horovod")
    found = _torch_distributed()
    if found:
        return (*found, "torch.distributed")
    found = _jax()
    if found:
        return (*found, "jax")
    env = os.environ if env is None else env
    for rank_var, size_var, launcher in ENV_PAIRS:
        if rank_var in env and size_var in env:
            rank, size = _parse(rank_var, env[rank_var]), _parse(size_var, env[size_var])
            if not 0 <= rank < size:
                raise ValueError(
                    f"{rank_var}={env[rank_var]!r} / {size_var}={env[size_var]!r} "
                    f"({launcher}): the rank must be in [0, {size_var})"
                )
            return rank, size, f"{launcher} ({rank_var}/{size_var})"
    # (Not SLURM's: SLURM_NTASKS is the allocation's, also in a shell of it that runs
    # one process, as `salloc -n 4` or a notebook there does.)
    for rank_var, size_var, launcher in ENV_PAIRS if strict else ():
        if launcher == "SLURM":
            continue
        if env.get(size_var, "").strip() not in ("", "0", "1"):
            half = f"{size_var}={env[size_var]!r} is set but {rank_var} is not"
        elif env.get(rank_var, "").strip() not in ("", "0"):
            half = f"{rank_var}={env[rank_var]!r} is set but {size_var} is not"
        else:
            continue
        raise ValueError(
            f"{half} ({launcher}): this process cannot tell its rank. Open the loader "
            "after the job's process group is initialised (torch.distributed, Horovod, "
            "jax.distributed), or pass rank= and world_size="
        )
    return 0, 1, "default (no launcher found)"

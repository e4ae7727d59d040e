"""Shared pieces: the benchmark dataset, npz member offsets, /proc readings, exactly-once."""

from __future__ import annotations

import ctypes
import math
import os
import signal
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npformat

MB = 1e6
GB = 1e9
FIELDS = ("id", "label", "image")


# dataset ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    shape: tuple[int, ...]
    dtype: str
    shards: int
    records_per_shard: int
    seed: int = 0

    @property
    def records(self) -> int:
        return self.shards * self.records_per_shard

    @property
    def record_bytes(self) -> int:
        """Bytes of one record over all fields (id int64, label int64, image)."""
        return 16 + math.prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def key(self) -> str:
        shape = "x".join(map(str, self.shape)) or "scalar"
        return f"{shape}-{self.dtype}-{self.shards}x{self.records_per_shard}-s{self.seed}"


def make_shards(directory: Path, spec: DataSpec) -> list[Path]:
    """npz shards (np.savez, uncompressed) with id (global index), label (id % 10) and
    image (spec.shape, spec.dtype, pseudo-random). Reused when already complete."""
    directory.mkdir(parents=True, exist_ok=True)
    done = directory / ".complete"
    paths = [directory / f"shard-{i:05d}.npz" for i in range(spec.shards)]
    if done.exists():
        return paths
    dt = np.dtype(spec.dtype)
    for index, path in enumerate(paths):
        first = index * spec.records_per_shard
        ids = np.arange(first, first + spec.records_per_shard, dtype=np.int64)
        rng = np.random.default_rng([spec.seed, index])
        size = (spec.records_per_shard, *spec.shape)
        if dt.kind == "f":
            image = rng.random(size, dtype=np.float32).astype(dt, copy=False)
        elif dt.kind == "b":
            image = rng.integers(0, 2, size, dtype=np.uint8).astype(bool)
        else:
            image = rng.integers(0, min(np.iinfo(dt).max, 255) + 1, size, dtype=dt)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, id=ids, label=ids % 10, image=image)
        os.replace(tmp, path)
    done.touch()
    return paths


def npz_members(path: Path) -> dict[str, tuple[int, np.dtype[Any], tuple[int, ...]]]:
    """For each array of an uncompressed npz: (file offset of its data, dtype, shape)."""
    out: dict[str, tuple[int, np.dtype[Any], tuple[int, ...]]] = {}
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: {info.filename} is compressed")
            with zf.open(info) as member:
                version = npformat.read_magic(member)
                if version == (1, 0):
                    shape, fortran, dtype = npformat.read_array_header_1_0(member)
                else:
                    shape, fortran, dtype = npformat.read_array_header_2_0(member)
                header_len = member.tell()
            f.seek(info.header_offset)
            local = f.read(30)
            name_len = int.from_bytes(local[26:28], "little")
            extra_len = int.from_bytes(local[28:30], "little")
            offset = info.header_offset + 30 + name_len + extra_len + header_len
            assert not (fortran and len(shape) > 1)
            out[info.filename.removesuffix(".npy")] = (offset, dtype, shape)
    return out


def memmap_shard(path: Path) -> dict[str, np.memmap[Any, Any]]:
    return {
        name: np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
        for name, (offset, dtype, shape) in npz_members(path).items()
    }


def chunk_records(record_bytes: int, batch_size: int, chunk_bytes: int = 4 << 20) -> int:
    """Records per streamed chunk, computed as shardstream's Loader does (its default
    `chunk_bytes` is 4 MiB)."""
    chunk = max(1, chunk_bytes // max(1, record_bytes))
    if chunk >= batch_size:
        chunk -= chunk % batch_size
    return chunk


# exactly once -----------------------------------------------------------------------


def check_exactly_once(ids: np.ndarray[Any, Any], records: int, world: int) -> dict[str, Any]:
    """The union of all ranks' ids must hold each id of [0, N) once, minus the
    documented `drop` remainder: exactly N - N % world ids (the sequence is in shard
    order, so the dropped ones are the last N % world ids)."""
    expected = records - records % world
    ids = np.asarray(ids, dtype=np.int64)
    uniq, counts = np.unique(ids, return_counts=True)
    duplicates = int((counts > 1).sum())
    out_of_range = int(((uniq < 0) | (uniq >= records)).sum())
    in_expected = int(((uniq >= 0) & (uniq < expected)).sum())
    missing = expected - in_expected
    ok = duplicates == 0 and missing == 0 and len(ids) == expected and out_of_range == 0
    return {
        "exactly_once": bool(ok),
        "ids_received": len(ids),
        "ids_expected": expected,
        "ids_missing": int(missing),
        "ids_duplicated": duplicates,
        "ids_unexpected": int(len(uniq) - in_expected),
    }


# /proc -------------------------------------------------------------------------------

_CLK = os.sysconf("SC_CLK_TCK")


def vm_hwm_bytes(pid: int) -> int | None:
    """Peak resident set size (VmHWM) of a process, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process (not its children), or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / _CLK


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of a process's live threads, summed by thread name (comm)."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _CLK
    return out


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def descendants(pid: int) -> list[int]:
    """pid and all its descendants alive now."""
    seen, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.append(p)
        todo.extend(children(p))
    return seen


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Linux: have the kernel send `sig` to this process when its parent exits."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:  # pragma: no cover - not Linux
        pass

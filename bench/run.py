"""Benchmark: shardstream against a plain loop, torch DataLoader, a ZeroMQ prefetcher
and the floors (bare gRPC stream, gRPC of the files, a bare client of the worker's own
reads, raw TCP), on the same shards.

    python -m bench.run [options]          # from the repository root; see bench/README.md

Every run starts its producer processes (workers, senders) and one fresh consumer
process per rank, times one epoch, checks exactly-once, and stops them all.
Systems are interleaved in rounds; medians (min-max) per system go to a table.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench.common import (
    GB,
    MB,
    DataSpec,
    check_exactly_once,
    chunk_records,
    descendants,
    make_shards,
    thread_cpu,
    vm_hwm_bytes,
)
from shardstream.client import LoaderConfig
from shardstream.client._consume import progress

REPO = Path(__file__).resolve().parent.parent
ALL_SYSTEMS = (
    "shardstream", "plain", "torch", "zmq", "grpc_wire", "grpc_file", "grpc_reads", "ss_raw",
    "tcp_wire",
)  # fmt: skip
DATA_SYSTEMS = ("shardstream", "plain", "torch", "zmq")


def _ints(text: str) -> list[int]:
    return [int(x) for x in str(text).replace(" ", "").split(",") if x != ""]


def _shape(text: str) -> tuple[int, ...]:
    return tuple(_ints(text.replace("x", ",")))


@dataclass(frozen=True)
class Config:
    """One workload and the systems to run on it."""

    name: str = ""
    shape: tuple[int, ...] = (64, 64, 3)
    dtype: str = "float32"
    shards: int = 8
    records_per_shard: int = 512
    mb: float = 0.0  # > 0: choose records_per_shard for about this many MB in all
    batch_size: int = 64
    work: int = 0
    step_ms: float = 0.0
    systems: tuple[str, ...] = ALL_SYSTEMS
    workers: tuple[int, ...] = (1, 2)  # shardstream worker processes
    ranks: tuple[int, ...] = (1, 2)  # shardstream ranks (one client process each)
    processes: int = 1  # decoding processes per shardstream worker
    torch_workers: tuple[int, ...] = (0, 2)
    zmq_procs: tuple[int, ...] = (2,)
    ss_api: str = "sync"  # shardstream client: "sync" (SyncLoader) or "async" (Loader)
    # shardstream: the same-host lane, the network lane (the remote path's default), gRPC bytes
    lanes: tuple[str, ...] = ("local", "net", "tcp")
    loader_opts: tuple[tuple[str, Any], ...] = ()  # `--config "opt.KEY=VALUE"`: Loader options

    def data(self) -> DataSpec:
        per_shard = self.records_per_shard
        spec = DataSpec(self.shape, self.dtype, self.shards, per_shard)
        if self.mb > 0:
            per_shard = max(1, round(self.mb * MB / spec.record_bytes / self.shards))
            if per_shard > self.batch_size:  # whole batches per shard
                per_shard = round(per_shard / self.batch_size) * self.batch_size
        return DataSpec(self.shape, self.dtype, self.shards, per_shard)

    def label(self) -> str:
        if self.name:
            return self.name
        d = self.data()
        shape = "x".join(map(str, self.shape))
        text = f"{shape} {self.dtype}, batch {self.batch_size}, {d.records} records"
        if self.work:
            text += f", work {self.work}"
        if self.step_ms:
            text += f", step {self.step_ms:g} ms"
        if "shardstream" in self.systems and self.processes != 1:
            text += f", {self.processes} decoding processes per worker"
        if self.loader_opts:
            text += ", " + ", ".join(f"{k}={v}" for k, v in self.loader_opts)
        return text


@dataclass(frozen=True)
class Instance:
    """One system with its parameters, e.g. shardstream with 2 workers and 2 ranks."""

    system: str
    workers: int = 0  # shardstream workers / torch num_workers / zmq processes
    ranks: int = 1
    # shardstream: "local" (the same-host lane, where it applies), "net" (the network lane,
    # as to a worker on another host), "tcp" (no lane: every byte on the gRPC stream)
    lane: str = "local"

    def label(self) -> str:
        if self.system == "shardstream":
            return f"shardstream {self.lane} w{self.workers} r{self.ranks}"
        if self.system == "torch":
            return f"torch nw{self.workers}"
        if self.system == "zmq":
            return f"zmq p{self.workers}"
        if self.system == "ss_raw":
            return f"ss_raw w{self.workers}"
        return self.system


def instances(cfg: Config, available: dict[str, str | None]) -> list[Instance]:
    out: list[Instance] = []
    for system in cfg.systems:
        if available.get(system):
            continue
        if system == "shardstream":
            out += [Instance(system, w, r, lane)
                    for lane in cfg.lanes for w in cfg.workers for r in cfg.ranks]  # fmt: skip
        elif system == "torch":
            out += [Instance(system, n) for n in cfg.torch_workers]
        elif system == "zmq":
            out += [Instance(system, n) for n in cfg.zmq_procs]
        elif system == "ss_raw":  # one bare client (rank 0 of 1) of the workers' Read
            out += [Instance(system, w) for w in cfg.workers]
        else:
            out.append(Instance(system))
    return out


def missing_optional() -> dict[str, str | None]:
    """Systems whose optional package is absent, with the note to print."""
    notes: dict[str, str | None] = {}
    for system, module, extra in (("torch", "torch", "torch"), ("zmq", "zmq", "pyzmq")):
        try:
            __import__(module)
        except ImportError:
            notes[system] = f"{system}: skipped ({extra} is not importable; pip install {extra})"
    return notes


# processes -------------------------------------------------------------------------


class Procs:
    """Every process this runner started, so that all are stopped on any exit."""

    def __init__(self) -> None:
        self.popens: list[subprocess.Popen[Any]] = []
        self.workers: list[Any] = []  # shardstream WorkerProcess
        self.known: set[int] = set()  # pids of every descendant seen

    def stop_all(self) -> None:
        for w in self.workers:
            with contextlib.suppress(Exception):
                w.terminate(timeout=15)
            with contextlib.suppress(Exception):
                w.close()
        self.workers.clear()
        for p in self.popens:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    with contextlib.suppress(Exception):
                        stream.close()
        self.popens.clear()
        time.sleep(0.05)
        for pid in list(self.known):  # grandchildren of ours that outlived their parent
            if vm_hwm_bytes(pid) is not None and _is_ours(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.known.clear()


def _is_ours(pid: int) -> bool:
    """A zombie-free check that a pid still runs one of our Python processes."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return sys.executable.encode() in cmdline or b"multiprocessing" in cmdline


class Sampler:
    """Samples peak RSS (VmHWM) of the process trees under some roots every 0.2 s."""

    def __init__(self, roots: list[int], procs: Procs) -> None:
        self.roots = roots
        self.procs = procs
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        for root in self.roots:
            for pid in descendants(root):
                self.procs.known.add(pid)
                hwm = vm_hwm_bytes(pid)
                if hwm is not None:
                    self.peak[pid] = max(self.peak.get(pid, 0), hwm)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def __enter__(self) -> Sampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def tree_cpu(roots: list[int]) -> dict[tuple[int, str], float]:
    """CPU seconds by (pid, role:thread name) over the process trees under `roots`;
    role is `main` for a root, `child` for its descendants (e.g. decoding processes)."""
    out: dict[tuple[int, str], float] = {}
    for root in roots:
        for pid in descendants(root):
            role = "main" if pid == root else "child"
            for name, cpu in thread_cpu(pid).items():
                out[(pid, f"{role}:{name}")] = cpu
    return out


def cpu_delta(
    before: dict[tuple[int, str], float], after: dict[tuple[int, str], float]
) -> tuple[float, dict[str, float]]:
    by_name: dict[str, float] = {}
    for key, cpu in after.items():
        d = cpu - before.get(key, 0.0)
        by_name[key[1]] = by_name.get(key[1], 0.0) + d
    threads = {k: round(v, 3) for k, v in sorted(by_name.items(), key=lambda kv: -kv[1]) if v > 0}
    return sum(by_name.values()), threads


def _read_serving(proc: subprocess.Popen[str], timeout: float) -> str:
    box: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("serving "):
                box.append(line.split()[1])
                return

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(timeout)
    if not box:
        raise RuntimeError(f"producer {proc.args} did not start (exit code {proc.poll()})")
    return box[0]


_PRCTL = ctypes.CDLL(None, use_errno=True).prctl  # looked up before any fork


def _die_with_parent() -> None:
    """In a child before exec: SIGTERM when this runner dies (even by SIGKILL)."""
    _PRCTL(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


# `--malloc all`: every process of every system runs with the thresholds shardstream sets
# for its own processes (server/_malloc.py), so the comparison is like for like.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "134217728"}


def _env(work: int, malloc: str) -> dict[str, str]:
    env = dict(os.environ)
    if malloc == "all":
        env.update(MALLOC_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env["SHARDSTREAM_BENCH_WORK"] = str(work)
    return env


# one run ---------------------------------------------------------------------------


@dataclass
class Context:
    args: argparse.Namespace
    out: Path
    logs: Path  # specs, ids and stderr of the consumers (kept with --keep-logs)
    procs: Procs
    datasets: dict[str, tuple[Path, list[Path]]] = field(default_factory=dict)
    run_index: int = 0


def start_producers(ctx: Context, cfg: Config, inst: Instance, root: Path) -> dict[str, Any]:
    """Producer processes of a run (started by this runner): their addresses and pids."""
    env = _env(cfg.work, ctx.args.malloc)
    if inst.system in ("shardstream", "ss_raw"):
        from shardstream.server._process import WorkerProcess

        argv = [
            "--data-root", str(root), "--dataset", "bench=*.npz:worknpz",
            "--decoder", "bench.work_decoder:WorkNpz", "--processes", str(cfg.processes),
            "--log-level", "WARNING", *ctx.args.worker_arg,
        ]  # fmt: skip
        started = []
        for _ in range(inst.workers):  # all start at once; each is registered before waiting
            proc = subprocess.Popen(
                [sys.executable, "-m", "shardstream.server", *argv, "--port", "0"],
                cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
            worker = WorkerProcess(proc, [*argv, "--port", "0"])
            ctx.procs.workers.append(worker)
            started.append(worker)
        for worker in started:
            worker.wait_serving(120)
        boxes = started
        return {"addresses": [w.address for w in boxes], "pids": [w.pid for w in boxes]}
    if inst.system in ("grpc_wire", "grpc_file", "grpc_reads", "tcp_wire"):
        files = ["grpcfile", str(root)]
        kind = {"grpc_wire": ["grpc"], "grpc_file": files, "grpc_reads": files, "tcp_wire": ["tcp"]}
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.producers", *kind[inst.system]],
            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, preexec_fn=_die_with_parent,
        )  # fmt: skip
        ctx.procs.popens.append(proc)
        return {"address": _read_serving(proc, 60), "pids": [proc.pid]}
    return {"pids": []}


# The Loader's default chunk size: the bare gRPC and TCP baselines send messages of the
# size shardstream's chunks have.
DEFAULT_CHUNK_BYTES = next(f.default for f in fields(LoaderConfig) if f.name == "chunk_bytes")


def run_one(ctx: Context, cfg: Config, inst: Instance, round_no: int) -> dict[str, Any]:
    args = ctx.args
    data = cfg.data()
    root, paths = ctx.datasets[data.key]
    ctx.run_index += 1
    tag = f"run{ctx.run_index:03d}"
    logs = ctx.logs
    loader_opts = {**dict(args.loader_opt), **dict(cfg.loader_opts)}
    if inst.system == "shardstream" and inst.lane != "local":
        loader_opts["same_host_lane"] = False
        loader_opts["network_lane"] = inst.lane == "net"
    chunk_bytes = int(loader_opts.get("chunk_bytes", DEFAULT_CHUNK_BYTES))
    chunk = chunk_records(data.record_bytes, cfg.batch_size, chunk_bytes)
    result: dict[str, Any] = {
        "config": cfg.label(),
        "system": inst.label()
        + (f" p{cfg.processes}" if inst.system == "shardstream" and cfg.processes != 1 else ""),
        "family": inst.system,
        "round": round_no,
        "shape": list(cfg.shape),
        "dtype": cfg.dtype,
        "record_bytes": data.record_bytes,
        "batch_size": cfg.batch_size,
        "shards": data.shards,
        "records_total": data.records,
        "work": cfg.work,
        "step_ms": cfg.step_ms,
        "workers": inst.workers,
        "ranks": inst.ranks,
        "processes_per_worker": cfg.processes if inst.system == "shardstream" else None,
        "ss_api": cfg.ss_api if inst.system == "shardstream" else None,
        "message_bytes": chunk * data.record_bytes,
    }
    consumers: list[tuple[subprocess.Popen[str], Path, Path, IO[str]]] = []
    try:
        prod = start_producers(ctx, cfg, inst, root)
        base = {
            "system": inst.system, "paths": [str(p) for p in paths],
            "records_per_shard": data.records_per_shard, "record_bytes": data.record_bytes,
            "batch_size": cfg.batch_size, "work": cfg.work, "step_ms": cfg.step_ms,
            "seconds": args.seconds, "tmp": str(logs),
            "total_bytes": data.records * data.record_bytes,
            "message_bytes": chunk * data.record_bytes,
        }  # fmt: skip
        for rank in range(inst.ranks):
            spec = dict(base, rank=rank, world=inst.ranks)
            if inst.system in ("shardstream", "ss_raw"):
                spec.update(addresses=prod["addresses"], api=cfg.ss_api,
                            loader_opts=loader_opts)  # fmt: skip
            elif inst.system == "torch":
                spec["num_workers"] = inst.workers
            elif inst.system == "zmq":
                spec.update(procs=inst.workers, hwm=args.zmq_hwm)
            elif "address" in prod:
                spec["address"] = prod["address"]
                if inst.system == "grpc_reads":  # the loader's read size, streams at once
                    spec["loader_opts"] = loader_opts
            spec_path = logs / f"{tag}-r{rank}.json"
            spec.update(ids_out=str(logs / f"{tag}-r{rank}-ids.npy"),
                        result_out=str(logs / f"{tag}-r{rank}-result.json"))  # fmt: skip
            spec_path.write_text(json.dumps(spec))
            err = open(logs / f"{tag}-r{rank}.stderr", "w")  # noqa: SIM115 - closed below
            proc = subprocess.Popen(
                [sys.executable, "-m", "bench.consumer", str(spec_path)],
                cwd=REPO, env=_env(cfg.work, args.malloc), stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
            ctx.procs.popens.append(proc)
            consumers.append((proc, Path(spec["result_out"]), Path(spec["ids_out"]), err))
        for proc, *_ in consumers:  # all imported and set up: start them together
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"consumer exited before starting (exit code {proc.wait()})")
        producer_pids = prod["pids"]
        client_pids = [p.pid for p, *_ in consumers]
        with Sampler(producer_pids + client_pids, ctx.procs) as sampler:
            cpu_before = tree_cpu(producer_pids)
            for proc, *_ in consumers:
                assert proc.stdin is not None
                proc.stdin.write("go\n")
                proc.stdin.flush()
            deadline = time.monotonic() + args.seconds + 120
            for proc, *_ in consumers:
                try:
                    proc.wait(max(1.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError("consumer did not finish in time; killed") from None
            cpu_after = tree_cpu(producer_pids)
        worker_cpu, worker_threads = cpu_delta(cpu_before, cpu_after)
        codes = [p.returncode for p, *_ in consumers]
        if any(codes):
            raise RuntimeError(f"consumer exit codes {codes}")
        parts = [json.loads(r.read_text()) for _, r, _, _ in consumers]
        ids = np.concatenate([np.load(i) for _, _, i, _ in consumers])
        peaks = dict(sampler.peak)
        for part in parts:  # peaks that children reported themselves at exit
            for pid, hwm in part.pop("children_rss", {}).items():
                peaks[int(pid)] = max(peaks.get(int(pid), 0), hwm or 0)
        result.update(aggregate(parts, data, worker_cpu, peaks, set(client_pids)))
        result["worker_threads_cpu_s"] = worker_threads  # producers started by the runner
        result.update(cpu_split(worker_threads, parts, result["bytes"]))
        if inst.system in DATA_SYSTEMS:
            world = inst.ranks
            eo = check_exactly_once(ids, data.records, world)
            if not all(p["complete"] for p in parts):
                eo["exactly_once"] = False
                eo["note"] = f"incomplete: stopped by --seconds {args.seconds}"
            result.update(eo)
        else:
            result["exactly_once"] = None  # no records: a wire ceiling
        result["error"] = None
    except Exception as exc:  # reported as a row, never silently
        tails = []
        for _, _, _, err in consumers:
            err.flush()
            with contextlib.suppress(Exception):
                tails.append(Path(err.name).read_text()[-1500:])
        result.update(error=f"{type(exc).__name__}: {exc}", exactly_once=False,
                      stderr_tail="\n".join(tails))  # fmt: skip
    finally:
        for *_, err in consumers:
            err.close()
        ctx.procs.stop_all()
    return result


def aggregate(
    parts: list[dict[str, Any]],
    data: DataSpec,
    worker_cpu: float,
    peaks: dict[int, int],
    client_pids: set[int],
) -> dict[str, Any]:
    records = sum(p["records"] for p in parts)
    nbytes = sum(p["bytes"] for p in parts)
    wall = max(p["t_end"] for p in parts) - min(p["t_start"] for p in parts)
    client_cpu = sum(p["client_cpu_s"] for p in parts)
    worker_cpu += sum(p["children_cpu_s"] for p in parts)
    gb = nbytes / GB if nbytes else math.nan
    waits = [p["wait_fraction"] for p in parts if p["wait_fraction"] is not None]
    worker_rss = sum(v for pid, v in peaks.items() if pid not in client_pids)
    return {
        "records": records,
        "bytes": nbytes,
        "batches": sum(p["batches"] for p in parts),
        "wall_s": wall,
        "records_per_s": records / wall,
        "mb_per_s": nbytes / wall / MB,
        "client_cpu_s": client_cpu,
        "client_cpu_s_per_gb": client_cpu / gb,
        "worker_cpu_s": worker_cpu,
        "total_cpu_s_per_gb": (client_cpu + worker_cpu) / gb,
        "client_rss_mb": max(p["client_rss_bytes"] or 0 for p in parts) / MB,
        "worker_rss_mb": worker_rss / MB,
        "worker_processes": sum(1 for pid in peaks if pid not in client_pids),
        "ttfb_s": max(p["ttfb_s"] or math.nan for p in parts),
        "wait_fraction": statistics.fmean(waits) if waits else None,
        "complete": all(p["complete"] for p in parts),
        "client_threads_cpu_s": _sum_dicts(p.get("client_threads_cpu_s", {}) for p in parts),
        **({"resumes": sum(p.get("resumes", 0) for p in parts)} if "resumes" in parts[0] else {}),
    }


def cpu_split(
    worker_threads: dict[str, float], parts: list[dict[str, Any]], nbytes: int
) -> dict[str, float]:
    """CPU s/GB of the serving processes themselves (shardstream's worker servers, the bare
    senders) and of the processes that decode for them (shardstream's decoding processes;
    torch's and ZeroMQ's forked workers), beside the client's."""
    gb = nbytes / GB if nbytes else math.nan
    server = sum(v for k, v in worker_threads.items() if k.startswith("main:"))
    decoding = sum(v for k, v in worker_threads.items() if k.startswith("child:"))
    decoding += sum(p["children_cpu_s"] for p in parts)
    return {"server_cpu_s_per_gb": server / gb, "decoding_cpu_s_per_gb": decoding / gb}


def _sum_dicts(dicts: Iterator[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = round(out.get(k, 0.0) + v, 3)
    return out


# the whole benchmark -----------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    w = p.add_argument_group("workload (the base configuration)")
    w.add_argument("--shape", type=_shape, default=(64, 64, 3), help="record shape (64,64,3)")
    w.add_argument("--dtype", default="float32", help="record dtype (float32)")
    w.add_argument("--shards", type=int, default=8)
    w.add_argument("--records-per-shard", type=int, default=512)
    w.add_argument(
        "--mb",
        type=float,
        default=0.0,
        help="instead of --records-per-shard: about this many MB in all",
    )
    w.add_argument("--batch-size", type=int, default=64)
    w.add_argument("--work", type=int, default=0, help="rounds of per-record CPU work")
    w.add_argument("--step-ms", type=float, default=0.0, help="simulated step per batch")
    s = p.add_argument_group("systems")
    s.add_argument(
        "--systems",
        default=",".join(ALL_SYSTEMS),
        help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}",
    )
    s.add_argument("--workers", type=_ints, default=[1, 2], help="shardstream workers (1,2)")
    s.add_argument("--ranks", type=_ints, default=[1, 2], help="shardstream ranks (1,2)")
    s.add_argument("--processes", type=int, default=1, help="decoding processes per worker")
    s.add_argument(
        "--lanes", default="local,net,tcp",
        help="shardstream rows: 'local' (the same-host lane, the default where it applies), "
        "'net' (same_host_lane=False: the network lane, a remote worker's default), 'tcp' "
        "(same_host_lane=False, network_lane=False: every byte on the gRPC stream); "
        "default all three",
    )  # fmt: skip
    s.add_argument("--torch-workers", type=_ints, default=[0, 2], help="num_workers (0,2)")
    s.add_argument("--zmq-procs", type=_ints, default=[2], help="ZeroMQ producers (2)")
    s.add_argument("--zmq-hwm", type=int, default=50, help="ZeroMQ high-water mark (50)")
    s.add_argument(
        "--ss-api",
        choices=("sync", "async"),
        default="sync",
        help="shardstream client: SyncLoader, consumed by the same loop as the "
        "baselines (step = time.sleep), or Loader on asyncio (step = await "
        "asyncio.sleep); default sync",
    )
    s.add_argument(
        "--loader-opt",
        action="append",
        default=[],
        type=_kv,
        help="extra shardstream Loader option KEY=VALUE (repeatable)",
    )
    s.add_argument(
        "--worker-arg",
        action="append",
        default=[],
        help="extra `shardstream worker` argument (repeatable; --worker-arg=--x=1)",
    )
    r = p.add_argument_group("runs")
    r.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="KEY=VALUE ...",
        help="a further configuration: overrides of the base one, e.g. "
        "'shape=224,224,3 dtype=uint8 systems=shardstream,torch workers=2'; "
        "repeatable. Keys: name shape dtype shards records_per_shard mb batch_size work "
        "step_ms systems workers ranks processes torch_workers zmq_procs ss_api, and opt.NAME "
        "for a Loader option (opt.reads_per_worker=8). The base "
        "config itself runs without --config, or with --base or --sweep",
    )
    r.add_argument("--base", action="store_true", help="run the base config also with --config")
    r.add_argument(
        "--sweep",
        action="store_true",
        help="also a small grid around the base config: --sweep-shapes at the base "
        "batch size and --sweep-batches at the base shape, with --sweep-systems "
        "(shardstream: 1 rank); for the plot",
    )
    r.add_argument("--sweep-shapes", default="16,16,3 64,64,3 224,224,3")
    r.add_argument("--sweep-batches", default="16,64,256")
    r.add_argument("--sweep-systems", default="shardstream,plain,torch,grpc_wire,tcp_wire")
    r.add_argument("--repeats", type=int, default=2, help="rounds (2)")
    r.add_argument("--seconds", type=float, default=60.0, help="time limit of one run")
    r.add_argument("--out", type=Path, default=Path("bench/results"))
    r.add_argument(
        "--data",
        type=Path,
        default=None,
        help="where to keep the generated shards (default: a temporary dir)",
    )
    r.add_argument(
        "--malloc",
        choices=("all", "shipped"),
        default="all",
        help="all (default): every process of every system gets glibc malloc thresholds of "
        "32 MiB mmap / 128 MiB trim in its environment; shipped: no environment, so only "
        "shardstream's processes tune themselves (workers always, the Loader by default)",
    )
    r.add_argument("--no-plot", action="store_true")
    r.add_argument(
        "--keep-logs", action="store_true", help="keep consumer specs, ids and stderr in OUT/logs"
    )
    return p.parse_args(argv)


def _kv(text: str) -> tuple[str, Any]:
    key, _, value = text.partition("=")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def configs_from(args: argparse.Namespace) -> list[Config]:
    base = Config(
        shape=tuple(args.shape), dtype=args.dtype, shards=args.shards,
        records_per_shard=args.records_per_shard, mb=args.mb, batch_size=args.batch_size,
        work=args.work, step_ms=args.step_ms,
        systems=tuple(s for s in args.systems.split(",") if s),
        workers=tuple(args.workers), ranks=tuple(args.ranks), processes=args.processes,
        torch_workers=tuple(args.torch_workers), zmq_procs=tuple(args.zmq_procs),
        ss_api=args.ss_api, lanes=tuple(args.lanes.split(",")),
    )  # fmt: skip
    for system in base.systems:
        if system not in ALL_SYSTEMS:
            raise SystemExit(f"unknown system {system!r}; known: {', '.join(ALL_SYSTEMS)}")
    out: list[Config] = []
    if args.base or args.sweep or not args.config:
        out.append(base)
    for text in args.config:
        out.append(override(base, text))
    if args.sweep:  # the base config is the centre point of the grid
        grid = replace(
            base, systems=tuple(s for s in args.sweep_systems.split(",") if s), ranks=(1,)
        )
        for shape in args.sweep_shapes.split():
            if _shape(shape) != base.shape:
                out.append(replace(grid, shape=_shape(shape)))
        for batch in _ints(args.sweep_batches):
            if batch != base.batch_size:
                out.append(replace(grid, batch_size=batch))
    return [c for i, c in enumerate(out) if c not in out[:i]]


def override(base: Config, text: str) -> Config:
    changes: dict[str, Any] = {}
    for item in text.split():
        key, _, value = item.partition("=")
        key = key.replace("-", "_")
        if key in ("shape",):
            changes[key] = _shape(value)
        elif key in ("workers", "ranks", "torch_workers", "zmq_procs"):
            changes[key] = tuple(_ints(value))
        elif key in ("systems", "lanes"):
            changes[key] = tuple(s for s in value.split(",") if s)
        elif key in ("shards", "records_per_shard", "batch_size", "work", "processes"):
            changes[key] = int(value)
        elif key in ("mb", "step_ms"):
            changes[key] = float(value)
        elif key in ("dtype", "name", "ss_api"):
            changes[key] = value
        elif key.startswith("opt."):
            opts = dict(changes.get("loader_opts", base.loader_opts))
            opts[key[4:]] = _kv(f"x={value}")[1]
            changes["loader_opts"] = tuple(sorted(opts.items()))
        else:
            raise SystemExit(f"--config: unknown key {key!r}")
    return replace(base, **changes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configs = configs_from(args)
    notes = missing_optional()
    skipped = sorted({notes[s] for c in configs for s in c.systems if notes.get(s)})
    for note in skipped:
        print(f"note: {note}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.jsonl"
    procs = Procs()
    data_dir = args.data or Path(tempfile.mkdtemp(prefix="shardstream-bench-"))
    logs = args.out / "logs" if args.keep_logs else Path(tempfile.mkdtemp(prefix="ssb-logs-"))
    logs.mkdir(parents=True, exist_ok=True)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    results: list[dict[str, Any]] = []
    started = time.time()
    args.load_before = os.getloadavg()[0]
    try:
        ctx = Context(args=args, out=args.out, logs=logs, procs=procs)
        for cfg in configs:
            data = cfg.data()
            if data.key not in ctx.datasets:
                root = data_dir / data.key
                t = time.perf_counter()
                ctx.datasets[data.key] = (root, make_shards(root, data))
                _log(f"dataset {data.key}: {data.records} records x {data.record_bytes} B = "
                     f"{data.records * data.record_bytes / MB:.0f} MB "
                     f"({time.perf_counter() - t:.1f}s)")  # fmt: skip
        total = args.repeats * sum(len(instances(cfg, notes)) for cfg in configs)
        with results_path.open("w") as sink, progress(total, "bench runs") as bar:
            for round_no in range(1, args.repeats + 1):
                for cfg in configs:
                    for inst in instances(cfg, notes):
                        _log(f"round {round_no}: {cfg.label()}: {inst.label()} ...")
                        res = run_one(ctx, cfg, inst, round_no)
                        if bar is not None:
                            bar.update(1)
                        results.append(res)
                        line = json.dumps(res, default=_json_default)
                        print(line, flush=True)
                        sink.write(line + "\n")
                        sink.flush()
    except KeyboardInterrupt:
        _log("interrupted: stopping every process")
        return 130
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, previous)
        if args.data is None:
            shutil.rmtree(data_dir, ignore_errors=True)
        if not args.keep_logs:
            shutil.rmtree(logs, ignore_errors=True)
        if results:
            from bench.report import write_reports

            write_reports(results, configs, args, skipped, time.time() - started)
    bad = [r for r in results if r.get("error") or r.get("exactly_once") is False]
    for r in bad:
        _log(f"FAILED: {r['config']}: {r['system']} round {r['round']}: "
             f"{r.get('error') or 'not exactly once'}")  # fmt: skip
    return 1 if bad else 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj))


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""ImageNet-like augmentation on the workers vs a torch DataLoader, in one run.

    python -m bench.imagenet --images 400 --processes 2 --epochs 3

Writes real JPEGs (500 x 375, quality 90, smooth random content) into
WebDataset tars, then times the same recipe two ways, at equal decoding cores:

- shardstream: one `shardstream worker --config ... --processes N` (N decoding
  processes) running decode_image -> random_resized_crop(224) -> horizontal_flip
  -> to_float_chw (ImageNet mean/std); the trainer is this process with a
  `SyncLoader` (batches of float32 (B, 3, 224, 224)).
- torch: `torch.utils.data.DataLoader(num_workers=N, persistent_workers=True)`
  over the same tars, each item decoded with Pillow and put through the same
  steps in Pillow + numpy (torchvision's RandomResizedCrop algorithm), collated
  into torch tensors.

After one warm-up epoch, `--epochs` epochs are timed. Reported per system:
images/s, images/s per decoding core, the trainer process's CPU seconds per
image (`getrusage(RUSAGE_SELF)`), and the trainer host's: that process plus the
loader processes it runs on the training machine (torch's DataLoader workers;
shardstream's decoding runs on the worker fleet, so there it is the process alone).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import random
import resource
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
T = "shardstream.server.transforms"


def make_tars(root: Path, images: int, shards: int, seed: int = 0) -> list[Path]:
    """`images` JPEGs of 500 x 375 (quality 90) with smooth, photo-like content."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    paths = []
    per = -(-images // shards)
    for s in range(shards):
        path = root / f"train-{s:04d}.tar"
        with tarfile.open(path, "w") as tar:
            for k in range(s * per, min(images, (s + 1) * per)):
                low = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
                im = Image.fromarray(low).resize((500, 375), Image.Resampling.BICUBIC)
                a = np.asarray(im).astype(np.int16) + rng.integers(-12, 13, (375, 500, 3))
                buf = io.BytesIO()
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(
                    buf, format="JPEG", quality=90
                )
                for name, data in ((f"{k:06d}.jpg", buf.getvalue()),
                                   (f"{k:06d}.cls", str(k % 1000).encode())):  # fmt: skip
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_shardstream(root: Path, processes: int, epochs: int, batch: int) -> dict[str, Any]:
    from shardstream.client import SyncLoader
    from shardstream.server._process import WorkerProcess

    config = root / "workers.toml"
    config.write_text(
        f'data_root = "{root}"\n[datasets.train]\nshards = "*.tar"\nformat = "wds"\n'
        f'transforms = [{{fn = "{T}:decode_image"}}, '
        f'{{fn = "{T}:random_resized_crop", size = 224}}, '
        f'{{fn = "{T}:horizontal_flip", p = 0.5}}, '
        f'{{fn = "{T}:to_float_chw", mean = {MEAN}, std = {STD}}}]\n'
    )
    args = ["--config", str(config), "--processes", str(processes), "--cache-dir", "off"]
    with (
        WorkerProcess.start(args) as worker,
        SyncLoader([worker.address], dataset="train", batch_size=batch, seed=1,
                   shuffle=True, drop_last=False) as loader,
    ):  # fmt: skip
        count = sum(len(b["label"]) for b in loader.epoch(0))  # warm-up
        t0, c0 = time.perf_counter(), cpu_seconds()
        s0, d0 = _cpu_of(worker.pid), children_cpu(worker.pid)
        n = 0
        for e in range(1, epochs + 1):
            for b in loader.epoch(e):
                n += len(b["label"])
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        server, decoding = _cpu_of(worker.pid) - s0, children_cpu(worker.pid) - d0
    assert n == count * epochs
    return {"images": n, "wall": wall, "trainer_cpu": cpu, "server_cpu": server,
            "decoding_cpu": decoding}  # fmt: skip


class TarImages:
    """A map-style dataset over the tars: (JPEG bytes, label) by index, then the recipe."""

    def __init__(self, paths: list[Path]) -> None:
        self.items: list[tuple[str, int, int, int]] = []
        for path in paths:
            with tarfile.open(path) as tar:
                members = tar.getmembers()
            jpgs = {m.name[:-4]: m for m in members if m.name.endswith(".jpg")}
            for m in members:
                if m.name.endswith(".cls"):
                    j = jpgs[m.name[:-4]]
                    self.items.append((str(path), j.offset_data, j.size, int(m.name[:-4]) % 1000))
        self.mean = np.asarray(MEAN, np.float32)[:, None, None]
        self.std = np.asarray(STD, np.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        import torch
        from PIL import Image

        path, offset, size, label = self.items[i]
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read(size)
        im = Image.open(io.BytesIO(data)).convert("RGB")
        top, left, h, w = crop_box(im.height, im.width)
        im = im.resize((224, 224), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
        a = np.asarray(im)
        if random.random() < 0.5:
            a = a[:, ::-1]
        x = (a.transpose(2, 0, 1).astype(np.float32) * np.float32(1 / 255) - self.mean) / self.std
        return torch.from_numpy(x), label


def crop_box(height: int, width: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params (scale (0.08, 1), ratio (3/4, 4/3))."""
    area = height * width
    for _ in range(10):
        target = area * random.uniform(0.08, 1.0)
        aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    return 0, 0, height, width


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _cpu_of(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def children_cpu(pid: int | None = None) -> float:
    """CPU seconds used so far by the live child processes of `pid` (this process)."""
    return sum(_cpu_of(c) for c in _children(os.getpid() if pid is None else pid))


def run_torch(paths: list[Path], workers: int, epochs: int, batch: int) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    loader = DataLoader(TarImages(paths), batch_size=batch, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0)  # fmt: skip
    count = sum(len(labels) for _, labels in loader)  # warm-up (starts the workers)
    t0, c0, w0 = time.perf_counter(), cpu_seconds(), children_cpu()
    n = 0
    for _ in range(epochs):
        for _, labels in loader:
            n += len(labels)
    wall, cpu, workers_cpu = time.perf_counter() - t0, cpu_seconds() - c0, children_cpu() - w0
    del loader
    assert n == count * epochs
    return {"images": n, "wall": wall, "trainer_cpu": cpu, "host_cpu": cpu + workers_cpu,
            "decoding_cpu": workers_cpu}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=400)
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--processes", type=int, default=2, help="decoding cores for both systems")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--systems", default="shardstream,torch")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-imagenet-") as tmp:
        root = Path(tmp)
        paths = make_tars(root, args.images, args.shards)
        jpeg = sum(p.stat().st_size for p in paths) / args.images
        print(f"{args.images} JPEGs 500x375 q90 (~{jpeg / 1e3:.0f} kB each, tar included), "
              f"{os.cpu_count()} cores", file=sys.stderr)  # fmt: skip
        for system in args.systems.split(","):
            if system == "shardstream":
                r = run_shardstream(root, args.processes, args.epochs, args.batch_size)
            else:
                r = run_torch(paths, args.processes, args.epochs, args.batch_size)
            per_s = r["images"] / r["wall"]
            row = {
                "system": f"{system} {args.processes} procs",
                "images_per_s": round(per_s, 1),
                "images_per_s_per_core": round(per_s / max(1, args.processes), 1),
                "trainer_cpu_ms_per_image": round(1e3 * r["trainer_cpu"] / r["images"], 3),
                "trainer_host_cpu_ms_per_image": round(
                    1e3 * r.get("host_cpu", r["trainer_cpu"]) / r["images"], 3
                ),
                # Decoding + augmentation CPU per image (the loader's processes): the cost
                # of the recipe itself, whatever shares the cores.
                "decoding_cpu_ms_per_image": round(1e3 * r["decoding_cpu"] / r["images"], 3),
                **{k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()},
            }
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

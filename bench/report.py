"""The Markdown table (medians, min-max), ratios against the baselines, and the plot."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

COLUMNS = (  # key, header, format
    ("records_per_s", "records/s", "{:,.0f}"),
    ("mb_per_s", "MB/s", "{:,.0f}"),
    ("client_cpu_s_per_gb", "client CPU s/GB", "{:.2f}"),
    ("server_cpu_s_per_gb", "server CPU s/GB", "{:.2f}"),
    ("decoding_cpu_s_per_gb", "decoding CPU s/GB", "{:.2f}"),
    ("total_cpu_s_per_gb", "all CPU s/GB", "{:.2f}"),
    ("client_rss_mb", "client RSS MB", "{:.0f}"),
    ("worker_rss_mb", "workers RSS MB", "{:.0f}"),
    ("ttfb_s", "first batch ms", "ms"),
)


def _fmt(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None and v == v]
    if not values:
        return "-"
    if fmt == "ms":
        values = [v * 1000 for v in values]
        fmt = "{:,.0f}"
    if fmt == "%":
        values = [v * 100 for v in values]
        fmt = "{:.1f}%"
    med = fmt.format(statistics.median(values))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None and not r.get("error")]
    return statistics.median(values) if values else None


def group(results: list[dict[str, Any]]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    out: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        out[r["config"]][r["system"]].append(r)
    return out


def table(results: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for config, systems in group(results).items():
        step = any(r.get("step_ms") for rows in systems.values() for r in rows)
        cols = list(COLUMNS) + ([("wait_fraction", "data wait", "%")] if step else [])
        lines.append(f"### {config}\n")
        header = ["system", "exactly once", *(c[1] for c in cols)]
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for system, rows in systems.items():
            ok = [r for r in rows if not r.get("error")]
            eo = [r.get("exactly_once") for r in rows]
            if all(e is None for e in eo) and len(ok) == len(rows):
                once = "n/a"
            elif all(e is True for e in eo):
                once = f"yes {len(rows)}/{len(rows)}"
            else:
                once = f"**NO** {sum(e is True for e in eo)}/{len(rows)}"
            cells = [system, once]
            for key, _, fmt in cols:
                cells.append(_fmt([r.get(key) for r in ok], fmt))
            lines.append("| " + " | ".join(cells) + " |")
            for r in rows:
                if r.get("error"):
                    lines.append(f"\n> {system} round {r['round']} failed: {r['error']}\n")
        lines.append("")
    return "\n".join(lines)


def ratios(results: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for config, systems in group(results).items():
        ss = {k: v for k, v in systems.items() if k.startswith("shardstream")}
        if not ss:
            continue
        torch = sorted((k for k in systems if k.startswith("torch nw")),
                       key=lambda k: int(k.removeprefix("torch nw")))  # fmt: skip
        torch_ref = "torch nw2" if "torch nw2" in systems else (torch[-1] if torch else None)
        refs = [("tcp_wire", "mb_per_s", "MB/s ÷ raw TCP"),
                ("grpc_wire", "mb_per_s", "MB/s ÷ bare gRPC"),
                ("grpc_file", "mb_per_s", "MB/s ÷ gRPC of the files"),
                ("grpc_reads", "mb_per_s", "MB/s ÷ gRPC of the files in reads"),
                ("plain", "records_per_s", "records/s ÷ plain loop")]  # fmt: skip
        if torch_ref:
            refs.append((torch_ref, "records_per_s", f"records/s ÷ {torch_ref}"))
        refs.append(("grpc_wire", "client_cpu_s_per_gb", "client CPU ÷ bare gRPC client"))
        refs.append(("grpc_reads", "server_cpu_s_per_gb", "server CPU ÷ files' server in reads"))
        refs = [r for r in refs if r[0] in systems and _median(systems[r[0]], r[1])]
        if any(k.startswith("ss_raw w") for k in systems):  # one per worker count
            refs.append(("ss_raw", "mb_per_s", "MB/s ÷ bare client of the reads"))
            refs.append(("ss_raw", "client_cpu_s_per_gb", "client CPU ÷ bare client of the reads"))
        if not refs:
            continue
        lines.append(f"**{config}** (ratios of medians)\n")
        lines.append("| system | " + " | ".join(r[2] for r in refs) + " |")
        lines.append("|---|" + "---|" * len(refs))
        for name, rows in ss.items():
            cells = [name]
            for ref, key, _ in refs:
                if ref == "ss_raw":  # the bare client of as many workers
                    ref = f"ss_raw w{rows[0].get('workers')}"
                    if ref not in systems:
                        cells.append("-")
                        continue
                a, b = _median(rows, key), _median(systems[ref], key)
                cells.append(f"{a / b:.2f}" if a and b else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> str | None:
    """MB/s vs record size and vs batch size (over configs that differ only in that), and
    records/s vs loading processes (per config). The path written, a note when matplotlib
    is absent, or None when there is nothing to plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "plot skipped: matplotlib is not importable (pip install -e '.[bench]')"
    ok = [r for r in results if not r.get("error")]

    def varying(key: str) -> list[tuple[str, dict[str, dict[Any, list[float]]]]]:
        """(group, {system: {value of key: [MB/s]}}) for groups of runs equal in all but
        `key`, keeping systems measured at several values of `key`."""
        rest = ("batch_size",) if key == "record_bytes" else ("shape", "dtype")
        groups: dict[tuple[str, ...], dict[str, dict[Any, list[float]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list))
        )
        for r in ok:
            group = tuple(str(r[k]) for k in (*rest, "work", "step_ms"))
            groups[group][r["system"]][r[key]].append(r["mb_per_s"])
        out = []
        for group, systems in groups.items():
            multi = {s: pts for s, pts in systems.items() if len(pts) > 1}
            if multi:
                what = ("batch " + group[0]) if key == "record_bytes" else " ".join(group[:2])
                extra = (f", work {group[-2]}" if group[-2] != "0" else "") + (
                    f", step {group[-1]} ms" if float(group[-1]) else ""
                )
                out.append((what + extra, multi))
        return out

    def by_procs() -> list[tuple[str, dict[str, dict[int, list[float]]]]]:
        names = {"torch": "torch DataLoader", "zmq": "ZeroMQ", "plain": "plain loop"}
        configs: dict[str, dict[str, dict[int, list[float]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list))
        )
        for r in ok:
            fam = r["family"]
            if fam == "shardstream" and r["ranks"] == 1:
                n = r["workers"] * max(1, r["processes_per_worker"] or 1)
                configs[r["config"]]["shardstream (1 rank)"][n].append(r["records_per_s"])
            elif fam in names:
                configs[r["config"]][names[fam]][r["workers"]].append(r["records_per_s"])
        work = {r["config"] for r in ok if r["work"]}
        found = [(c, f) for c, f in configs.items() if any(len(p) > 1 for p in f.values())]
        found.sort(key=lambda cf: cf[0] not in work)  # with --work first, then in run order
        return found[:2]

    panels: list[tuple[str, str, dict[str, dict[Any, list[float]]]]] = []
    for group, systems in varying("record_bytes")[:2]:
        panels.append(("size", group, systems))
    for group, systems in varying("batch_size")[:2]:
        panels.append(("batch", group, systems))
    for config, fams in by_procs():
        panels.append(("procs", config, fams))
    if not panels:
        return None
    cols = 2 if len(panels) == 4 else min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 4.4 * rows), squeeze=False)
    flat = list(axes.flat)
    for ax, (kind, group, systems) in zip(flat, panels, strict=False):
        for system, points in sorted(systems.items()):
            xs = sorted(points)
            ys = [statistics.median(points[x]) for x in xs]
            ax.plot(xs, ys, marker="o", label=system)
        if kind == "size":
            ax.set(xscale="log", yscale="log", xlabel="record bytes", ylabel="MB/s (median)",
                   title=f"throughput vs record size ({group})")  # fmt: skip
        elif kind == "batch":
            ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="MB/s (median)",
                   title=f"throughput vs batch size ({group})")  # fmt: skip
        else:
            ax.set(xlabel="loading processes (0 = in the consumer)", ylabel="records/s (median)",
                   title=f"vs worker processes:\n{group}")  # fmt: skip
            ax.set_ylim(bottom=0)
        ax.title.set_fontsize(9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


def write_reports(
    results: list[dict[str, Any]],
    configs: list[Any],
    args: Any,
    skipped: list[str],
    elapsed: float,
) -> None:
    cmd = "python -m bench.run " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    head = [
        "## shardstream benchmark",
        "",
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: {os.cpu_count()} CPUs, {platform.machine()}, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}",
        f"- command: `{cmd}`",
        f"- {args.repeats} round(s), systems interleaved; {len(results)} runs in "
        f"{elapsed / 60:.1f} min; medians (min-max); MB = 1e6 bytes, GB = 1e9 bytes",
        f"- 1-min load average before / after: {getattr(args, 'load_before', float('nan')):.2f}"
        f" / {os.getloadavg()[0]:.2f} (other processes on the machine are not excluded)",
        "- shardstream: `--processes "
        f"{sorted({c.processes for c in configs})}` decoding processes per worker, client API "
        f"{sorted({c.ss_api for c in configs})}, one client process per rank",
        "- glibc malloc: "
        + (
            "every process of every system with `MALLOC_MMAP_THRESHOLD_=33554432 "
            "MALLOC_TRIM_THRESHOLD_=134217728` (`--malloc all`)"
            if getattr(args, "malloc", "all") == "all"
            else "as shipped: shardstream's processes tune themselves, the others run "
            "glibc's defaults (`--malloc shipped`)"
        ),
    ]
    head += [f"- {s}" for s in skipped]
    body = table(results)
    rat = ratios(results)
    png = None if args.no_plot else plot(results, args.out / "results.png")
    text = "\n".join(head) + "\n\n" + body + "\n" + rat
    if png and png.endswith(".png"):
        text += "\n![throughput](results.png)\n"
    elif png:
        text += f"\n{png}\n"
    (args.out / "results.md").write_text(text)
    print("\n" + text, flush=True)

"""Benchmark: 30,000 clips prepared and trained for one epoch within 2 GB.

Run on demand (about 10 minutes on 2 cores, ~300 MB of temporary disk)::

    python benchmarks/bench_scale.py [--copies 10] [--tmp DIR]

The dataset is FSDD's 3000 real recordings, each hard-linked ``--copies`` times into a
temporary folder layout (``DIR/data/<digit>/<copy>_<name>.wav``). Hard links, not
symlinks: the cache keys a clip by its resolved path, so 10 symlinks to one file would
be one cache entry, whereas 10 hard links are 10 paths and 10 entries (a plain copy is
used where linking fails, e.g. across file systems). Then, each in its own process,
as a user would run them:

1. ``soundsight prepare DATA --layout folder --out CACHE`` (a worker per core);
2. ``soundsight train DATA --layout folder --cache CACHE --stage1-epochs 0
   --stage2-epochs 1 --crop-seconds 0.5 --num-workers 2`` (a grouped 20% hold-out
   validates; the short 0.5 s crop keeps one epoch of 24,000 clips within minutes on
   2 CPU cores; DataLoader workers read the memory-mapped cache, so the run also shows
   that they do not copy it). The command includes its plots (t-SNE of 2000 clips).

Memory is sampled every 0.2 s over each command's process tree: the parent's RSS plus
each child's USS (pages shared with the parent counted once: the goal's figure), and
the plain sum of RSS (shared pages counted in every process) as an upper bound.
Writes ``benchmarks/results/scale.json`` and ``benchmarks/results/scale.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from machine import cpu_model

REPO = Path(__file__).resolve().parents[1]
FSDD = REPO.parent / "shared" / "datasets" / "fsdd" / "recordings"
RESULTS = REPO / "benchmarks" / "results"
#: Goal: peak memory of each command's process tree, shared pages counted once (bytes).
GOAL_BYTES = 2e9


class TreeMemory:
    """Peak memory of a process and its descendants, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.peak_unique = 0  # parent RSS + children's USS
        self.peak_summed = 0  # sum of RSS
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            unique = summed = self.root.memory_info().rss
            children = self.root.children(recursive=True)
        except psutil.Error:
            return
        for child in children:
            try:
                summed += child.memory_info().rss
                unique += child.memory_full_info().uss
            except psutil.Error:
                continue
        self.peak_unique = max(self.peak_unique, unique)
        self.peak_summed = max(self.peak_summed, summed)
        self.peak_processes = max(self.peak_processes, 1 + len(children))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(command: list[str], log: Path) -> dict:
    """Run a command with its output in ``log``; its time and peak memory."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        memory = TreeMemory(process.pid)
        code = process.wait()
        memory.stop()
    seconds = time.perf_counter() - started
    if code != 0:
        sys.exit(f"{' '.join(command)} failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
    return {
        "command": " ".join(command),
        "seconds": round(seconds, 1),
        "peak_bytes": memory.peak_unique,
        "peak_summed_rss_bytes": memory.peak_summed,
        "processes": memory.peak_processes,
        "goal_bytes": GOAL_BYTES,
        "pass": memory.peak_unique <= GOAL_BYTES,
    }


def build(data: Path, copies: int) -> tuple[int, str]:
    """Link every FSDD recording ``copies`` times into a folder layout."""
    sources = sorted(FSDD.glob("*.wav"))
    if not sources:
        sys.exit(f"no FSDD recordings in {FSDD}")
    how = "hard links"
    for copy in range(copies):
        for source in sources:
            target = data / source.name.split("_")[0] / f"{copy}_{source.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError:
                shutil.copy2(source, target)
                how = "copies"
    return copies * len(sources), how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--copies", type=int, default=10, help="links per FSDD file (10)")
    parser.add_argument("--tmp", help="folder for the dataset, cache and run (default: a temp)")
    parser.add_argument("--crop-seconds", default="0.5")
    parser.add_argument("--num-workers", default="2")
    args = parser.parse_args()

    root = Path(args.tmp or tempfile.mkdtemp(prefix="soundsight-scale-"))
    data, cache, out = root / "data", root / "cache", root / "run"
    for folder in (data, cache, out):
        shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    clips, how = build(data, args.copies)
    build_seconds = time.perf_counter() - started
    print(f"{clips} clips ({how}) in {data} ({build_seconds:.1f} s)", flush=True)

    cli = [sys.executable, "-m", "soundsight.cli"]
    load_before = os.getloadavg()[0]
    prepare = run(
        [*cli, "prepare", str(data), "--layout", "folder", "--out", str(cache)],
        root / "prepare.log",
    )
    peak = prepare["peak_bytes"] / 1e6
    print(f"prepare: {prepare['seconds']} s, peak {peak:,.0f} MB", flush=True)
    entries = sum(1 for _ in cache.glob("*/clips/*/*.npy"))
    cache_bytes = sum(p.stat().st_size for p in cache.glob("*/clips/*/*.npy"))
    train = run(
        [
            *cli,
            "train",
            str(data),
            "--layout",
            "folder",
            "--out",
            str(out),
            "--cache",
            str(cache),
            "--stage1-epochs",
            "0",
            "--stage2-epochs",
            "1",
            "--crop-seconds",
            args.crop_seconds,
            "--num-workers",
            args.num_workers,
            "--seed",
            "0",
        ],
        root / "train.log",
    )
    print(f"train: {train['seconds']} s, peak {train['peak_bytes'] / 1e6:,.0f} MB", flush=True)
    metrics = json.loads((out / "metrics.json").read_text())
    history = (out / "history.csv").read_text()

    import torch

    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} x {cpu_model()}",
        "memory_total_bytes": psutil.virtual_memory().total,
        "load_average_at_start": load_before,
        "torch": torch.__version__,
        "clips": clips,
        "dataset": f"FSDD's {clips // args.copies} recordings x {args.copies} {how}",
        "cache_entries": entries,
        "cache_bytes": cache_bytes,
        "build_seconds": round(build_seconds, 1),
        "prepare": prepare,
        "train": train,
        "validation": metrics,
        "history": history,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=2))
    (RESULTS / "scale.md").write_text(markdown(result))
    print(markdown(result))
    if not args.tmp:
        shutil.rmtree(root, ignore_errors=True)


def markdown(r: dict) -> str:
    def row(name: str, m: dict) -> str:
        return (
            f"| `soundsight {name}` | {m['seconds']:,.0f} | {m['peak_bytes'] / 1e6:,.0f} | "
            f"{m['peak_summed_rss_bytes'] / 1e6:,.0f} | {m['processes']} | "
            f"{'PASS' if m['pass'] else 'FAIL'} |"
        )

    v = r["validation"]
    return "\n".join(
        [
            f"Benchmark `python benchmarks/bench_scale.py`, {r['date']}, {r['machine']}, "
            f"load average at start {r['load_average_at_start']:.2f}; torch {r['torch']}.",
            "",
            f"{r['clips']:,} clips ({r['dataset']}), {r['cache_entries']:,} cache entries, "
            f"{r['cache_bytes'] / 1e6:,.0f} MB of cache. Train: one epoch (stage 2 only), "
            "0.5 s crops, 2 DataLoader workers reading the memory-mapped cache, a 20% "
            "hold-out validated; plots included.",
            "",
            "| command | seconds | peak MB (parent RSS + children USS) | peak MB (summed RSS) "
            "| processes | goal <= 2,000 MB |",
            "|---|---:|---:|---:|---:|---|",
            row("prepare", r["prepare"]),
            row("train", r["train"]),
            "",
            f"Validation after the epoch: {v['clips']:,} clips, accuracy {v['accuracy']:.4f} "
            f"(clips are 10 copies of each recording, so the hold-out shares recordings "
            "with training: this checks that training runs, it is no accuracy figure).",
            "",
        ]
    )


if __name__ == "__main__":
    main()

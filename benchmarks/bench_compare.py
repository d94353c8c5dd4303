"""Benchmark: this working tree against an earlier revision, in the same minutes.

Run on demand (about 8 minutes on 2 cores; a quiet machine, nothing else running)::

    python benchmarks/bench_compare.py --base 7e6baee

A machine's speed drifts from hour to hour (the reference training step here has read
200 to 367 ms on one day), so a figure measured today cannot be set beside one from last
week. This script checks out ``--base`` into a temporary folder (``git worktree``) and
measures both code trees in alternating rounds, each in fresh subprocesses with its own
``src`` first on ``PYTHONPATH``:

1. ``prepare`` (Python API, 2 workers, fresh cache) over the 414 ESC fold-2 clips;
2. ``soundsight train`` on FSDD (official split, ``--epochs 3``, cache prepared
   beforehand): wall time and test accuracy;
3. in-process prediction of one 5-s ESC clip (decode + log-mel + network, 1 thread),
   median of 30 after warm-up, with the base revision's FSDD model (newer code reads
   older model files);
4. ``soundsight serve`` with that model: 100 sequential requests (p50) and 200 over 8
   clients (requests/s), with the server's CPU seconds per request.

Each figure is the median over ``--rounds`` rounds (default 2); the spread of the
rounds is printed as the run-to-run noise. Writes ``benchmarks/results/compare.json``
and ``compare.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import psutil
from bench_serve import ESC_AUDIO, Bench, free_port, start_server, wait_ready
from machine import REFERENCE_STEP_MS_THERE, cpu_model, reference_step_ms

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
RESULTS = REPO / "benchmarks" / "results"

PREPARE = """
import glob, sys, tempfile, time
from soundsight.cache import prepare
paths = sorted(glob.glob(sys.argv[1] + "/**/*.flac", recursive=True))
started = time.perf_counter()
prepare(paths, tempfile.mkdtemp(), workers=2, progress=False)
print(time.perf_counter() - started)
"""

PREDICT = """
import statistics, sys, time
import torch
from soundsight.audio import load_clip
from soundsight.prediction import Classifier
torch.set_num_threads(1)
classifier = Classifier.load(sys.argv[1])
wave = load_clip(sys.argv[2], classifier.features.sample_rate)
def once():
    started = time.perf_counter()
    classifier.probabilities([classifier.log_mel(wave)])
    return (time.perf_counter() - started) * 1000
for _ in range(5):
    once()
print(statistics.median(once() for _ in range(30)))
"""


def run_python(tree: Path, code: str, *args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.split()[-1])


def train(tree: Path, work: Path, name: str) -> tuple[float, float]:
    """Wall seconds and test accuracy of a 3-epoch FSDD run."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    cli = [sys.executable, "-m", "soundsight.cli"]
    fsdd, cache, out = DATASETS / "fsdd", work / f"cache-{name}", work / f"run-{name}"
    if not cache.exists():
        subprocess.run(
            [*cli, "prepare", str(fsdd), "--split", "all", "--out", str(cache)],
            env=env,
            check=True,
            capture_output=True,
        )
    started = time.perf_counter()
    done = subprocess.run(
        [*cli, "train", str(fsdd), "--out", str(out), "--cache", str(cache), "--epochs", "3"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    seconds = time.perf_counter() - started
    line = next(x for x in done.stdout.splitlines() if x.startswith("validation:"))
    accuracy = float(line.split("accuracy ")[1].split(",")[0])
    return seconds, accuracy


def serve(tree: Path, model: Path, clip: Path, work: Path) -> dict:
    os.environ["PYTHONPATH"] = str(tree / "src")  # start_server inherits the environment
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(model, port, work / "serve.log", [])
    try:
        wait_ready(base, server, work / "serve.log")
        bench = Bench(base, clip, psutil.Process(server.pid), time.monotonic() + 300)
        bench.sequential(10)
        single = bench.sequential(100)
        concurrent = bench.concurrent(200, 8)
    finally:
        server.terminate()
        server.wait(15)
        os.environ.pop("PYTHONPATH")
    return {
        "p50_ms": single["latency_ms"]["p50"],
        "rps_8": concurrent["throughput_rps"],
        "cpu_s": concurrent["server_cpu_s_per_request"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare against")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_compare_"))
    base_tree = work / "base"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(base_tree), args.base],
        check=True,
        capture_output=True,
    )
    trees = {"base": base_tree, "now": REPO}
    clip = sorted(ESC_AUDIO.glob("*.flac"))[0]
    load_start = os.getloadavg()[0]
    reference = reference_step_ms()
    figures: dict[str, dict[str, list[float]]] = {name: {} for name in trees}

    def add(name: str, figure: str, value: float) -> None:
        figures[name].setdefault(figure, []).append(value)
        print(f"  {name:4s} {figure}: {value:.4g}", flush=True)

    try:
        for round_ in range(args.rounds):
            print(f"round {round_ + 1} of {args.rounds}", flush=True)
            # Alternate which tree goes first, so a drift within a round favours neither.
            order = list(trees) if round_ % 2 == 0 else list(trees)[::-1]
            for name in order:
                add(name, "prepare_s", run_python(trees[name], PREPARE, str(ESC_AUDIO)))
            for name in order:
                seconds, accuracy = train(trees[name], work, name)
                add(name, "train_s", seconds)
                add(name, "train_accuracy", accuracy)
            model = work / "run-base" / "model.safetensors"
            for name in order:
                add(name, "predict_ms", run_python(trees[name], PREDICT, str(model), str(clip)))
            for name in order:
                for figure, value in serve(trees[name], model, clip, work).items():
                    add(name, f"serve_{figure}", value)
    finally:
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(base_tree)],
            check=False,
        )

    results = {
        "base": args.base,
        "head": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "machine": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cpu": cpu_model(),
            "cpus": os.cpu_count(),
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
            "reference_step_ms": round(reference, 1),
        },
        "figures": figures,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "compare.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (args.results / "compare.md").write_text(table)
    print(table)
    return 0


LABELS = {
    "prepare_s": ("prepare 414 ESC clips (s)", False),
    "train_s": ("FSDD train, 3 epochs (s)", False),
    "train_accuracy": ("FSDD test accuracy after 3 epochs", True),
    "predict_ms": ("predict one 5-s clip, 1 thread (ms)", False),
    "serve_p50_ms": ("serve, 1 client p50 (ms)", False),
    "serve_rps_8": ("serve, 8 clients (req/s)", True),
    "serve_cpu_s": ("serve, server CPU per request (s)", False),
}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        textwrap.fill(
            f"Benchmark `python benchmarks/bench_compare.py --base {results['base']}` "
            f"(now: {results['head']} plus the working tree), {m['date']}, {m['cpus']} x "
            f"{m['cpu']}, load average {m['load_start']:.2f} at start and "
            f"{m['load_end']:.2f} at the end, reference step {m['reference_step_ms']} ms "
            f"({REFERENCE_STEP_MS_THERE:g} ms where the goals were set). Medians of the "
            "rounds; the range shows the run-to-run noise.",
            100,
        ),
        "",
        "| figure | base | now | now / base | rounds base | rounds now |",
        "|---|---:|---:|---:|---|---|",
    ]
    figures = results["figures"]
    for key, (label, _higher_is_better) in LABELS.items():
        base, now = figures["base"].get(key), figures["now"].get(key)
        if not base or not now:
            continue
        b, n = statistics.median(base), statistics.median(now)
        lines.append(
            f"| {label} | {b:.4g} | {n:.4g} | {n / b:.2f} | "
            f"{', '.join(f'{v:.4g}' for v in base)} | {', '.join(f'{v:.4g}' for v in now)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Issue-3 figures: FSDD accuracy and training time, ESC-50 CV (default vs seed
recipe), prediction latency and throughput, peak memory while training.

Run on demand: ``python benchmarks/bench_train.py [--skip-fsdd] [--skip-esc]``.
Writes benchmarks/results/train.json and train.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from machine import cpu_model, reference_step_ms

import soundsight as ss
from soundsight.prediction import Classifier
from soundsight.training import TrainConfig, cross_validate, seed_recipe, train

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"


class PeakRSS:
    """Samples this process's RSS (plus children) every 50 ms in a thread."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                rss = me.memory_info().rss + sum(
                    c.memory_info().rss for c in me.children(recursive=True)
                )
            except psutil.Error:
                rss = 0
            self.peak = max(self.peak, rss)
            time.sleep(0.05)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bench_fsdd(work: Path) -> dict:
    train_clips = ss.load_dataset(DATASETS / "fsdd", split="train")
    test_clips = ss.load_dataset(DATASETS / "fsdd", split="test")
    start = time.perf_counter()
    result = train(
        train_clips, work / "fsdd", valid=test_clips, cache=work / "cache", progress=False
    )
    seconds = time.perf_counter() - start
    return {
        "train_clips": len(train_clips),
        "test_clips": result.metrics["clips"],
        "accuracy": result.metrics["accuracy"],
        "errors": int(round(result.metrics["error_rate"] * result.metrics["clips"])),
        "wall_seconds_including_prepare": seconds,
        "epochs": TrainConfig().epochs,
    }


def bench_esc(work: Path) -> dict:
    clips = ss.load_dataset(DATASETS / "esc50-fold2")
    out = {}
    with PeakRSS() as rss:
        start = time.perf_counter()
        default = cross_validate(
            clips, work / "esc_default", 5, cache=work / "cache", progress=False
        )
        out["default_seconds"] = time.perf_counter() - start
    out["peak_rss_bytes_default"] = rss.peak
    model, config = seed_recipe(TrainConfig().epochs)
    with PeakRSS() as rss:
        start = time.perf_counter()
        seed = cross_validate(
            clips,
            work / "esc_seed",
            5,
            model=model,
            config=config,
            cache=work / "cache",
            progress=False,
        )
        out["seed_seconds"] = time.perf_counter() - start
    out["peak_rss_bytes_seed"] = rss.peak
    for name, result in (("default", default), ("seed", seed)):
        out[name] = {
            "folds": [f["accuracy"] for f in result.folds],
            "mean": result.mean["accuracy"],
            "std": result.std["accuracy"],
            "map3": result.mean["map3"],
        }
    out["margin_points"] = 100 * (default.mean["accuracy"] - seed.mean["accuracy"])
    out["model"] = str(work / "esc_default" / "fold0" / "model.safetensors")
    return out


def bench_predict(model_path: Path) -> dict:
    classifier = Classifier.load(model_path)
    clips = sorted((DATASETS / "esc50-fold2" / "audio").glob("*.flac"))
    for clip in clips[:5]:
        classifier.predict(clip)  # warm up
    latencies = []
    for clip in clips[:100]:
        start = time.perf_counter()
        classifier.predict(clip, top_k=3)
        latencies.append(time.perf_counter() - start)
    start = time.perf_counter()
    frame, failures = classifier.predict_files([str(c) for c in clips], progress=False)
    seconds = time.perf_counter() - start
    return {
        "single_clip_median_ms": 1000 * float(np.median(latencies)),
        "single_clip_p90_ms": 1000 * float(np.percentile(latencies, 90)),
        "batch_clips": len(frame),
        "batch_failures": len(failures),
        "batch_clips_per_second": len(frame) / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-fsdd", action="store_true")
    parser.add_argument("--skip-esc", action="store_true")
    parser.add_argument("--work", help="folder for runs and cache (default: a temp folder)")
    parser.add_argument(
        "--model",
        help="model for the prediction figures when --skip-esc "
        "(default: the ESC fold-0 model of this run)",
    )
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="soundsight-bench-"))
    previous = RESULTS / "train.json"
    # Sections not re-run keep their last figures.
    results = json.loads(previous.read_text()) if previous.exists() else {}
    results |= {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{os.cpu_count()} CPU cores, {cpu_model()}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        "load_average_at_start": os.getloadavg(),
        # A plain timm Lite0 training step; 201 ms where the issues' goals were set.
        "reference_step_ms": round(reference_step_ms(), 1),
    }
    if not args.skip_fsdd:
        results["fsdd"] = bench_fsdd(work)
        print(json.dumps(results["fsdd"], indent=2), flush=True)
    if not args.skip_esc:
        results["esc"] = bench_esc(work)
        print(json.dumps(results["esc"], indent=2), flush=True)
    model = args.model or (results["esc"]["model"] if not args.skip_esc else None)
    if model:
        results["predict"] = bench_predict(Path(model))
        print(json.dumps(results["predict"], indent=2), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "train.json").write_text(json.dumps(results, indent=2))
    (RESULTS / "train.md").write_text(markdown(results))
    print(markdown(results))


def markdown(r: dict) -> str:
    rows = ["| figure | goal | measured | |", "|---|---|---|---|"]

    def add(name, goal, value, ok=None):
        verdict = "" if ok is None else "PASS" if ok else "FAIL"
        rows.append(f"| {name} | {goal} | {value} | {verdict} |")

    if "fsdd" in r:
        f = r["fsdd"]
        add(
            "FSDD official split, test accuracy",
            ">= 99.5%",
            f"{100 * f['accuracy']:.2f}% ({f['errors']} errors / {f['test_clips']})",
            f["accuracy"] >= 0.995,
        )
        add(
            "FSDD training wall time (incl. prepare)",
            "<= 600 s",
            f"{f['wall_seconds_including_prepare']:.0f} s",
            f["wall_seconds_including_prepare"] <= 600,
        )
    if "esc" in r:
        e = r["esc"]
        add(
            "ESC fold 2, 5-fold grouped CV, default recipe",
            "",
            f"{100 * e['default']['mean']:.1f}% +- {100 * e['default']['std']:.1f}",
        )
        add(
            "ESC fold 2, 5-fold grouped CV, seed recipe",
            "",
            f"{100 * e['seed']['mean']:.1f}% +- {100 * e['seed']['std']:.1f}",
        )
        add(
            "default minus seed",
            ">= 10 points",
            f"{e['margin_points']:.1f} points",
            e["margin_points"] >= 10,
        )
        peak = max(e["peak_rss_bytes_default"], e["peak_rss_bytes_seed"]) / 2**30
        add("peak RSS during ESC training", "<= 4 GB", f"{peak:.2f} GiB", peak <= 4)
    if "predict" in r:
        p = r["predict"]
        add(
            "predict one 5-s clip, median (warm)",
            "<= 30 ms",
            f"{p['single_clip_median_ms']:.1f} ms",
            p["single_clip_median_ms"] <= 30,
        )
        add(
            "predict 414 ESC clips incl. decoding",
            ">= 50 clips/s",
            f"{p['batch_clips_per_second']:.0f} clips/s",
            p["batch_clips_per_second"] >= 50,
        )
    head = (
        f"Measured {r['date']} on {r['machine']}, load average "
        f"{r['load_average_at_start'][0]:.2f} at start, reference step "
        f"{r.get('reference_step_ms', '?')} ms (201 ms where the goals were set)"
    )
    return head + "\n\n" + "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()

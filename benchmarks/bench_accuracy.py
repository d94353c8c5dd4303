"""Issue-12 figures: accuracy of each backbone x recipe with few clips per class.

ESC-50 fold 2 (414 clips, 50 classes, about 6-7 training clips per class) in 5-fold CV
grouped by ``src_file`` (:func:`soundsight.evaluation.make_folds`, the folds of
``soundsight cv``), and FSDD's official split; per row: accuracy mean +- std over the
folds, the paired difference to today's default (EfficientNet-Lite0, default recipe)
on the same folds, training seconds per fold, the median latency of predicting one 5-s
clip (warm, 1 thread), the model file's size and the peak RSS while training.

Run on demand::

    nice -n 19 python benchmarks/bench_accuracy.py [--quick] [--rows a,b] [--datasets esc,fsdd]

``--quick`` checks the script end to end: one fold, two epochs, ESC only. Results go
to benchmarks/results/accuracy.json and accuracy.md, rewritten after every row, so an
interrupted run keeps what it measured. Timings taken while the machine was loaded
(load average above its cores at the start of the row) are marked so.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from bench_train import PeakRSS
from machine import REFERENCE_STEP_MS_THERE, cpu_model, reference_step_ms

import soundsight as ss
from soundsight.config import ModelConfig, TrainConfig
from soundsight.evaluation import make_folds
from soundsight.files import write_whole
from soundsight.prediction import Classifier
from soundsight.training import lp_ft_recipe, train

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "lite0 default"


@dataclass(frozen=True)
class Row:
    name: str
    backbone: str
    recipe: str  # "default", "lp-ft", "lp-ft-low" or "probe" (frozen body + logistic regression)


ROWS = (
    Row(BASELINE, "tf_efficientnet_lite0", "default"),
    Row("lite0 lp-ft", "tf_efficientnet_lite0", "lp-ft"),
    Row("lite2 lp-ft", "tf_efficientnet_lite2", "lp-ft"),
    Row("aisfx lp-ft", "aisfx", "lp-ft"),
    Row("aisfx lp-ft low", "aisfx", "lp-ft-low"),
    Row("aisfx frozen+logreg", "aisfx", "probe"),
    Row("aisfx default", "aisfx", "default"),
)


def recipe(row: Row, epochs: int | None) -> TrainConfig:
    total = epochs if epochs is not None else TrainConfig().epochs
    if row.recipe == "probe":
        return lp_ft_recipe(0)
    if row.recipe == "lp-ft":
        return lp_ft_recipe(total)
    if row.recipe == "lp-ft-low":
        # The default stage-2 rates (head 2e-3, body 1e-3) undid aisfx's probe in the
        # --quick check (54.2% against the probe's 62.7% on fold 0): a tenth of them.
        return replace(lp_ft_recipe(total), stage2_lr=3e-4, body_lr=1e-4)
    return TrainConfig(stage1_epochs=min(1, total - 1), stage2_epochs=total - min(1, total - 1))


def loaded() -> bool:
    return os.getloadavg()[0] > (os.cpu_count() or 1)


def predict_ms(model: Path, clip: Path, repeats: int = 15) -> float:
    """Median wall time of one warm prediction of ``clip`` (decode included), 1 thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        classifier = Classifier.load(model)
        classifier.predict(clip)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            classifier.predict(clip)
            times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def run_row(row: Row, dataset: str, work: Path, folds: int, epochs: int | None) -> dict:
    """Train ``row`` on each fold (ESC) or on the official split (FSDD)."""
    if dataset == "esc":
        clips = ss.load_dataset(DATASETS / "esc50-fold2")
        splits = [
            (np.setdiff1d(np.arange(len(clips)), valid), valid)
            for valid in make_folds(clips, 5, TrainConfig().seed)[:folds]
        ]
        parts = [(clips.iloc[t], clips.iloc[v]) for t, v in splits]
        probe_clip = Path(clips["path"].iloc[0])
    else:
        train_side = ss.load_dataset(DATASETS / "fsdd", split="train")
        test_side = ss.load_dataset(DATASETS / "fsdd", split="test")
        parts = [(train_side, test_side)]
        probe_clip = DATASETS / "esc50-fold2" / "audio" / "2-104105-A-19.flac"
    accuracies, seconds, peak = [], [], 0
    under_load = loaded()
    model_path = None
    for k, (train_clips, valid_clips) in enumerate(parts):
        under_load |= loaded()
        started = time.perf_counter()
        with PeakRSS() as rss:
            result = train(
                train_clips,
                work / f"{dataset}-{row.name.replace(' ', '_')}-fold{k}",
                valid=valid_clips,
                model=ModelConfig(backbone=row.backbone),
                config=recipe(row, epochs),
                cache=work / "cache",
                progress=False,
            )
        seconds.append(time.perf_counter() - started)
        peak = max(peak, rss.peak)
        accuracies.append(result.metrics["accuracy"])
        model_path = result.model_path
        print(f"{dataset} {row.name} fold {k}: {accuracies[-1]:.4f} in {seconds[-1]:.0f} s")
    assert model_path is not None
    under_load |= loaded()
    return {
        "row": row.name,
        "backbone": row.backbone,
        "recipe": row.recipe,
        "dataset": dataset,
        "fold_accuracy": accuracies,
        "accuracy_mean": float(np.mean(accuracies)),
        "accuracy_std": float(np.std(accuracies)),
        # The first fold's time includes preparing the feature cache for the row's
        # front end when no earlier row did.
        "train_seconds_per_fold": float(np.mean(seconds)),
        "predict_ms_5s_clip": predict_ms(model_path, probe_clip),
        "model_mb": model_path.stat().st_size / 1e6,
        "peak_rss_gib": peak / 2**30,
        "timings_under_load": bool(under_load),
        "measured": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
    }


def paired(results: list[dict]) -> None:
    """Each row's per-fold accuracy minus the baseline's on the same folds."""
    for dataset in {r["dataset"] for r in results}:
        base = next((r for r in results if r["row"] == BASELINE and r["dataset"] == dataset), None)
        for r in results:
            if r["dataset"] != dataset or base is None:
                continue
            n = min(len(base["fold_accuracy"]), len(r["fold_accuracy"]))
            diff = np.subtract(r["fold_accuracy"][:n], base["fold_accuracy"][:n])
            r["vs_default_mean"], r["vs_default_std"] = float(diff.mean()), float(diff.std())


def markdown(meta: dict, results: list[dict]) -> str:
    lines = [
        f"Last run {meta['date']} (each row's own date below) on {meta['cores']} CPU cores, "
        f"{meta['cpu']}, torch "
        f"{meta['torch']}, {meta['mode']}; timings marked * were taken under load "
        "(load average above the cores): accuracy holds, times do not. Reference step "
        f"{meta.get('reference_step_ms', '?')} ms here ({REFERENCE_STEP_MS_THERE} ms where the "
        "issues' times were set).",
        "",
        "| dataset | row | accuracy | vs default (paired) | train s/fold | predict 5-s clip | "
        "model | peak RSS | measured |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        star = "*" if r["timings_under_load"] else ""
        paired_text = (
            f"{100 * r['vs_default_mean']:+.1f} +- {100 * r['vs_default_std']:.1f}"
            if "vs_default_mean" in r and r["row"] != BASELINE
            else ""
        )
        lines.append(
            f"| {r['dataset']} ({len(r['fold_accuracy'])} folds) | {r['row']} | "
            f"{100 * r['accuracy_mean']:.1f}% +- {100 * r['accuracy_std']:.1f} | {paired_text} | "
            f"{r['train_seconds_per_fold']:.0f}{star} | {r['predict_ms_5s_clip']:.1f} ms{star} | "
            f"{r['model_mb']:.1f} MB | {r['peak_rss_gib']:.2f} GiB{star} | {r['measured']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 fold, 2 epochs, ESC only")
    parser.add_argument("--rows", help="comma-separated row names (default: all)")
    parser.add_argument("--datasets", default="esc,fsdd", help="esc, fsdd or both")
    parser.add_argument("--work", help="folder for runs and caches (default: a temp folder)")
    parser.add_argument("--out", default=str(RESULTS / "accuracy"), help="results stem")
    args = parser.parse_args()
    rows = [r for r in ROWS if not args.rows or r.name in args.rows.split(",")]
    datasets = ["esc"] if args.quick else args.datasets.split(",")
    folds, epochs = (1, 2) if args.quick else (5, None)
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "mode": "quick (1 fold, 2 epochs)" if args.quick else "full (5 folds, default epochs)",
        "load_average_at_start": os.getloadavg()[0],
        "reference_step_ms": round(reference_step_ms(), 1),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Rows measured earlier and not rerun now are kept: a table is built up row by row.
    results: list[dict] = []
    if out.with_suffix(".json").exists():
        rerun = {(r.name, d) for r in rows for d in datasets}
        earlier = json.loads(out.with_suffix(".json").read_text())
        for r in earlier["results"]:
            r.setdefault("measured", earlier["meta"]["date"])
        results = [r for r in earlier["results"] if (r["row"], r["dataset"]) not in rerun]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        for dataset in datasets:
            for row in rows:
                results.append(run_row(row, dataset, work, folds, epochs))
                paired(results)
                record = json.dumps({"meta": meta, "results": results}, indent=2)
                write_whole(out.with_suffix(".json"), lambda f, r=record: f.write(r.encode()))
                table = markdown(meta, results)
                write_whole(out.with_suffix(".md"), lambda f, t=table: f.write(t.encode()))
    print(markdown(meta, results))


if __name__ == "__main__":
    main()

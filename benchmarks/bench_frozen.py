"""Issue-19 figures: frozen-embedding models (BirdNET, aisfx, aisfx+BirdNET) on ESC-50.

ESC-50 fold 2 (414 clips, 50 classes) in 5-fold CV grouped by ``src_file``, the folds
of ``soundsight cv`` and ``benchmarks/bench_accuracy.py``
(:func:`soundsight.evaluation.make_folds` with the default seed). Every clip is
embedded once per part into the embedding cache (:mod:`soundsight.frozen`); each row
then fits its head (StandardScaler + LogisticRegression(C=0.5)) on each fold's
training side from the cached vectors. Per row: accuracy mean +- std and per fold,
the paired difference to today's default (fine-tuned Lite0, its folds from
``results/train.json``, same folds), head training seconds per fold with cached
embeddings (reading the cache included), the median latency of predicting one 5-s
clip (warm, decode included, 2 threads), and the model file's size.

Run on demand (BirdNET's licence must be accepted: CC BY-NC-SA 4.0)::

    SOUNDSIGHT_ACCEPT_LICENCE=cc-by-nc-sa-4.0 nice -n 19 python benchmarks/bench_frozen.py

Results go to benchmarks/results/frozen.json and frozen.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from machine import cpu_model

import soundsight as ss
from soundsight.config import TrainConfig
from soundsight.evaluation import make_folds
from soundsight.files import write_whole
from soundsight.frozen import (
    FrozenClassifier,
    clip_vectors,
    fit_head,
    head_probabilities,
    make_parts,
    train_frozen,
)

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
ROWS = ("birdnet", "aisfx", "aisfx+birdnet")
THREADS = 2


def loaded() -> bool:
    return os.getloadavg()[0] > (os.cpu_count() or 1)


def predict_ms(model: Path, clip: Path, repeats: int = 10) -> float:
    """Median wall time of one warm prediction of ``clip`` (decode included)."""
    classifier = FrozenClassifier.load(model, threads=THREADS)
    classifier.predict(clip)  # warm: interpreters and networks built
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        classifier.predict(clip)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def default_folds() -> list[float] | None:
    """Today's default's (fine-tuned Lite0) accuracy per fold on the same folds."""
    path = RESULTS / "train.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["esc"]["default"]["folds"]


def run(cache: Path, work: Path) -> tuple[dict, list[dict]]:
    torch.set_num_threads(THREADS)
    clips = ss.load_dataset(DATASETS / "esc50-fold2")
    paths = list(clips["path"])
    labels = sorted(clips["label"].unique())
    targets = clips["label"].map({label: i for i, label in enumerate(labels)}).to_numpy()
    folds = make_folds(clips, 5, TrainConfig().seed)
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "threads": THREADS,
        "clips": len(clips),
        "load_average_at_start": os.getloadavg()[0],
        "embed_seconds": {},
    }
    under_load = loaded()
    for part in ("birdnet", "aisfx"):  # every clip embedded once, into the cache
        started = time.perf_counter()
        _, kept, failures = clip_vectors(paths, make_parts(part, threads=THREADS), cache)
        assert not failures and len(kept) == len(paths), failures
        meta["embed_seconds"][part] = time.perf_counter() - started
        print(f"{part}: {len(paths)} clips embedded in {meta['embed_seconds'][part]:.0f} s")
    baseline = default_folds()
    results = []
    for row in ROWS:
        under_load |= loaded()
        parts = make_parts(row, threads=THREADS)
        accuracies, seconds = [], []
        for valid in folds:
            train_index = np.setdiff1d(np.arange(len(clips)), valid)
            started = time.perf_counter()
            vectors, _, _ = clip_vectors([paths[i] for i in train_index], parts, cache, False)
            # A rare class may have no training clip in a fold: the head knows the
            # fold's own labels, and that class's validation clips count as errors.
            known, numbers = np.unique(targets[train_index], return_inverse=True)
            head = fit_head(vectors, numbers, len(known))
            seconds.append(time.perf_counter() - started)
            valid_vectors, _, _ = clip_vectors([paths[i] for i in valid], parts, cache, False)
            predicted = known[head_probabilities(head, valid_vectors).argmax(1)]
            accuracies.append(float((predicted == targets[valid]).mean()))
        print(f"{row}: folds {[round(100 * a, 1) for a in accuracies]}")
        fold0 = np.setdiff1d(np.arange(len(clips)), folds[0])
        model = train_frozen(
            clips.iloc[fold0],
            work / row.replace("+", "_"),
            row,
            valid=clips.iloc[folds[0]],
            cache=cache,
            threads=THREADS,
            progress=False,
        ).model_path
        result = {
            "row": row,
            "fold_accuracy": accuracies,
            "accuracy_mean": float(np.mean(accuracies)),
            "accuracy_std": float(np.std(accuracies)),
            "head_seconds_per_fold": float(np.mean(seconds)),
            "predict_ms_5s_clip": predict_ms(model, Path(paths[0])),
            "model_mb": model.stat().st_size / 1e6,
        }
        if baseline is not None:
            diff = np.subtract(accuracies, baseline)
            result["vs_default_mean"], result["vs_default_std"] = diff.mean(), diff.std()
            result["better_than_default_folds"] = int((diff > 0).sum())
        under_load |= loaded()
        result["timings_under_load"] = bool(under_load)
        results.append(result)
    aisfx = next(r for r in results if r["row"] == "aisfx")
    for r in results:
        r["better_than_aisfx_folds"] = int(
            (np.subtract(r["fold_accuracy"], aisfx["fold_accuracy"]) > 0).sum()
        )
    meta["default_folds"] = baseline
    return meta, results


def markdown(meta: dict, results: list[dict]) -> str:
    embed = ", ".join(f"{k} {v:.0f} s" for k, v in meta["embed_seconds"].items())
    lines = [
        f"Measured {meta['date']} on {meta['cores']} CPU cores ({meta['cpu']}), "
        f"{meta['threads']} threads, load average {meta['load_average_at_start']:.1f} at the "
        f"start; ESC-50 fold 2, {meta['clips']} clips, 5-fold CV grouped by src_file. "
        f"Embedding every clip once: {embed} (near 0 when the cache already held them). "
        "Timings marked * were taken under load "
        "(load average above the cores): accuracy holds, times do not. 'vs default': "
        "paired difference to the fine-tuned Lite0 on the same folds (results/train.json).",
        "",
        "| row | accuracy | folds | vs default (paired) | head s/fold (cached) | "
        "predict 5-s clip | model |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        star = "*" if r["timings_under_load"] else ""
        folds = ", ".join(f"{100 * a:.1f}" for a in r["fold_accuracy"])
        paired = (
            f"{100 * r['vs_default_mean']:+.1f} +- {100 * r['vs_default_std']:.1f}"
            if "vs_default_mean" in r
            else ""
        )
        lines.append(
            f"| {r['row']} | {100 * r['accuracy_mean']:.1f}% +- {100 * r['accuracy_std']:.1f} | "
            f"{folds} | {paired} | {r['head_seconds_per_fold']:.1f}{star} | "
            f"{r['predict_ms_5s_clip']:.0f} ms{star} | {r['model_mb']:.2f} MB |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "soundsight-bench-frozen"),
        help="embedding cache (kept between runs: a rerun only fits heads)",
    )
    parser.add_argument("--out", default=str(RESULTS / "frozen"), help="results stem")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        meta, results = run(Path(args.cache), Path(work))
    out = Path(args.out)
    payload = json.dumps({"meta": meta, "results": results}, indent=2, default=float)
    write_whole(out.with_suffix(".json"), lambda f: f.write(payload.encode()))
    write_whole(out.with_suffix(".md"), lambda f: f.write(markdown(meta, results).encode()))
    print(markdown(meta, results))


if __name__ == "__main__":
    main()

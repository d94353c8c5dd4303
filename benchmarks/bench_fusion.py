"""Issue-19 figures: late fusion of fine-tuned and frozen-embedding models on ESC fold 2.

Reads the per-fold validation predictions (``valid_predictions.csv``) that
``bench_accuracy.py --work WORK`` left for its fine-tuned rows, fits the frozen heads
of the same 5 grouped folds (:func:`soundsight.frozen.train_frozen`, from the
embedding cache in ``WORK/cache``), and scores weighted means of the models'
probabilities. The weights are chosen honestly, by nested cross-validation: for the
test fold k, the weight vector (a 0.1 grid on the simplex) that scores best on the
other four folds' out-of-fold predictions (each clip scored by models that never saw
it) is applied to fold k. Each row: mean +- std over the folds, the paired difference
to today's default (Lite0, default recipe), and the weights chosen.

Run on demand, after ``bench_accuracy.py --rows "lite0 default,aisfx lp-ft low"
--datasets esc --work WORK``::

    SOUNDSIGHT_ACCEPT_LICENCE=cc-by-nc-sa-4.0 python benchmarks/bench_fusion.py --work WORK

Without the BirdNET licence accepted, the rows with BirdNET are left out. Results go
to benchmarks/results/fusion.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

import soundsight as ss
from soundsight.birdnet import ACCEPT_ENV, LICENCE_ID
from soundsight.config import TrainConfig
from soundsight.evaluation import make_folds
from soundsight.files import write_whole
from soundsight.frozen import train_frozen

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
FOLDS = 5
BASELINE = "lite0 fine-tuned"
#: Model name -> its fold run folders in WORK (bench_accuracy's naming) or a frozen
#: backbone whose heads this script fits.
FINE_TUNED = {
    "lite0 fine-tuned": "esc-lite0_default-fold{k}",
    "aisfx lp-ft": "esc-aisfx_lp-ft_low-fold{k}",
}
FROZEN = {"aisfx frozen": "aisfx", "aisfx+birdnet frozen": "aisfx+birdnet"}
FUSIONS = (
    ("lite0 fine-tuned", "aisfx lp-ft"),
    ("lite0 fine-tuned", "aisfx frozen"),
    ("lite0 fine-tuned", "aisfx lp-ft", "aisfx frozen"),
    ("lite0 fine-tuned", "aisfx+birdnet frozen"),
    ("aisfx lp-ft", "aisfx+birdnet frozen"),
    ("lite0 fine-tuned", "aisfx lp-ft", "aisfx+birdnet frozen"),
)


def fold_predictions(work: Path, birdnet: bool) -> dict[str, list[pd.DataFrame]]:
    """Each model's validation predictions per fold, rows sorted by path."""
    clips = ss.load_dataset(DATASETS / "esc50-fold2")
    folds = make_folds(clips, FOLDS, TrainConfig().seed)
    runs = {
        name: [work / pattern.format(k=k) for k in range(FOLDS)]
        for name, pattern in FINE_TUNED.items()
    }
    for name, backbone in FROZEN.items():
        if "birdnet" in backbone and not birdnet:
            continue
        runs[name] = []
        for k, valid in enumerate(folds):
            out = work / f"frozen-{backbone}-fold{k}"
            train_index = np.setdiff1d(np.arange(len(clips)), valid)
            train_frozen(
                clips.iloc[train_index], out, backbone, valid=clips.iloc[valid],
                cache=work / "cache", accept_licence=LICENCE_ID if birdnet else None,
                seed=TrainConfig().seed, progress=False,
            )  # fmt: skip
            runs[name].append(out)
    return {
        name: [
            pd.read_csv(run / "valid_predictions.csv").sort_values("path").reset_index(drop=True)
            for run in folders
        ]
        for name, folders in runs.items()
    }


def nested_fusion(
    probabilities: dict[str, list[np.ndarray]], truth: list[np.ndarray], names: tuple[str, ...]
) -> tuple[list[float], list[tuple[float, ...]]]:
    """Per fold: the accuracy of the weighted mean of ``names``' probabilities, with the
    weights that score best on the other folds; and those weights."""
    grid = [
        w for w in itertools.product(np.round(np.arange(0, 1.01, 0.1), 1), repeat=len(names))
        if abs(sum(w) - 1) < 1e-6
    ]  # fmt: skip

    def accuracy(weights: tuple[float, ...], k: int) -> float:
        mixed = sum(w * probabilities[n][k] for w, n in zip(weights, names, strict=True))
        return float((np.asarray(mixed).argmax(1) == truth[k]).mean())

    scores, chosen = [], []
    for k in range(len(truth)):
        others = [j for j in range(len(truth)) if j != k]
        best = max(grid, key=lambda w: np.mean([accuracy(w, j) for j in others]))
        chosen.append(tuple(float(x) for x in best))
        scores.append(accuracy(best, k))
    return scores, chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="bench_accuracy.py's --work folder")
    args = parser.parse_args()
    birdnet = os.environ.get(ACCEPT_ENV) == LICENCE_ID
    frames = fold_predictions(Path(args.work), birdnet)
    # A class missing from a fold's training clips is missing from that model's columns.
    labels = sorted(
        {c for fs in frames.values() for f in fs for c in f.columns} - {"path", "label"}
    )
    base = frames[BASELINE]
    for name, folds in frames.items():
        for k, frame in enumerate(folds):
            if list(frame["path"]) != list(base[k]["path"]):
                raise SystemExit(f"{name}, fold {k}: not the clips of the baseline's fold")
    truth = [np.array([labels.index(label) for label in f["label"]]) for f in base]
    probabilities = {
        n: [f.reindex(columns=labels, fill_value=0.0).to_numpy() for f in fs]
        for n, fs in frames.items()
    }
    rows = []
    for name in frames:
        scores = [
            float((p.argmax(1) == t).mean())
            for p, t in zip(probabilities[name], truth, strict=True)
        ]
        rows.append({"row": name, "fold_accuracy": scores, "weights": None})
    for names in FUSIONS:
        if all(n in frames for n in names):
            scores, weights = nested_fusion(probabilities, truth, names)
            rows.append({"row": " + ".join(names), "fold_accuracy": scores, "weights": weights})
    baseline = rows[0]["fold_accuracy"]
    lines = [
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M}; ESC-50 fold 2, 5 folds grouped by source "
        "file; fusion weights by nested CV (chosen on the other 4 folds).",
        "",
        "| models | accuracy | folds | vs default (paired) | weights per fold |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        a = np.asarray(row["fold_accuracy"])
        d = a - np.asarray(baseline)
        row.update(
            mean=float(a.mean()),
            std=float(a.std()),
            vs_default=float(d.mean()),
            vs_default_std=float(d.std()),
        )
        weights = "; ".join("/".join(f"{x:.1f}" for x in w) for w in row["weights"] or [])
        paired = "" if row["row"] == BASELINE else f"{100 * d.mean():+.1f} +- {100 * d.std():.1f}"
        lines.append(
            f"| {row['row']} | {100 * a.mean():.1f}% +- {100 * a.std():.1f} | "
            f"{', '.join(f'{100 * x:.1f}' for x in a)} | {paired} | {weights} |"
        )
    table = "\n".join(lines) + "\n"
    out = RESULTS / "fusion"
    record = json.dumps({"rows": rows}, indent=2)
    write_whole(out.with_suffix(".json"), lambda f: f.write(record.encode()))
    write_whole(out.with_suffix(".md"), lambda f: f.write(table.encode()))
    print(table)


if __name__ == "__main__":
    main()

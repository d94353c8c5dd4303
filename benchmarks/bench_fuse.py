"""Issue-19 figure: the late-fusion model file (``soundsight fuse``), as a user builds it.

ESC-50 fold 2, the 5 grouped folds of ``soundsight cv``. For each test fold k, on the
other four folds exactly what a user runs: ``train`` (Lite0, the default recipe, its
own grouped 20% held out), ``train --backbone B`` for each frozen backbone B (the same
20% held out: the same seed), ``fuse`` (the weight chosen on that 20%), then every
model scored on fold k, which none of them saw. A class without training clips in a
fold counts its test clips as errors (as ``bench_ensemble.py``). Each row: mean +- std
over the folds and the paired difference to the fine-tuned Lite0 alone (today's
default, trained the same way); the fused rows also give the weights chosen, the
median latency of predicting one 5-s clip (warm, 2 threads) and the file size.

Run on demand (BirdNET rows only with its licence accepted)::

    python benchmarks/bench_fuse.py --work DIR [--frozen aisfx,aisfx+birdnet]

Results go to benchmarks/results/fuse.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from bench_frozen import predict_ms
from machine import measured_line, run_record

import soundsight as ss
from soundsight.birdnet import ACCEPT_ENV, LICENCE_ID
from soundsight.config import TrainConfig
from soundsight.evaluation import make_folds
from soundsight.files import write_whole
from soundsight.frozen import FrozenClassifier, fuse, held_out_side, train_frozen
from soundsight.modelfile import read_any_spec
from soundsight.prediction import evaluate

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
FOLDS = 5
BASELINE = "lite0 fine-tuned"


def accuracy(model: Path, test: pd.DataFrame, cache: Path) -> float:
    """Accuracy on ``test``; clips of a class the model does not know are errors."""
    known = test[test["label"].isin(read_any_spec(model).labels)]
    metrics = evaluate(model, known, cache=cache, progress=False)[0]
    return float(metrics["accuracy"]) * len(known) / len(test)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="folder for the runs and the cache")
    parser.add_argument(
        "--frozen",
        default="aisfx,aisfx+birdnet" if os.environ.get(ACCEPT_ENV) == LICENCE_ID else "aisfx",
        help="comma-separated frozen backbones to fuse with (default: aisfx, and "
        "aisfx+birdnet when BirdNET's licence is accepted in the environment)",
    )
    args = parser.parse_args()
    frozen = args.frozen.split(",")
    meta = {**run_record(), "frozen": frozen}
    work = Path(args.work)
    cache = work / "cache"
    clips = ss.load_dataset(DATASETS / "esc50-fold2")
    folds = make_folds(clips, FOLDS, TrainConfig().seed)
    scores: dict[str, list[float]] = {BASELINE: []}
    weights: dict[str, list[float]] = {}
    extras: dict[str, dict] = {}
    for k, test_index in enumerate(folds):
        mask = np.zeros(len(clips), bool)
        mask[test_index] = True
        train_side, test = clips[~mask], clips[mask]
        run = work / f"fold{k}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            network = ss.train(train_side, run / "network", cache=cache, progress=False)
        scores[BASELINE].append(accuracy(network.model_path, test, cache))
        for backbone in frozen:
            head = train_frozen(
                train_side, run / f"frozen-{backbone}", backbone, cache=cache,
                accept_licence=LICENCE_ID if "birdnet" in backbone else None, progress=False,
            )  # fmt: skip
            valid = held_out_side(train_side, network.model_path, head.model_path)
            fused = fuse(
                network.model_path, head.model_path, run / f"fused-{backbone}",
                valid=valid, cache=cache, progress=False,
            )  # fmt: skip
            name = f"{BASELINE} + {backbone} frozen (fuse)"
            scores.setdefault(f"{backbone} frozen", []).append(
                accuracy(head.model_path, test, cache)
            )
            scores.setdefault(name, []).append(accuracy(fused.model_path, test, cache))
            weights.setdefault(name, []).append(FrozenClassifier.load(fused.model_path).spec.weight)
            if k == 0:
                extras[name] = {
                    "predict_ms": predict_ms(fused.model_path, Path(test["path"].iloc[0])),
                    "file_mb": fused.model_path.stat().st_size / 1e6,
                }
        print(f"fold {k}: " + ", ".join(f"{n} {v[-1]:.3f}" for n, v in scores.items()), flush=True)
    meta["load_average_at_end"] = os.getloadavg()[0]
    base = np.asarray(scores[BASELINE])
    lines = [
        f"{measured_line(meta)} ESC-50 fold 2, 5 folds grouped by source file; every model "
        "trained on the other four folds with `train`'s own grouped 20% held out, the fusion "
        "weight chosen on that 20% by `fuse`, all scored on the test fold.",
        "",
        "| model | accuracy | folds | vs default (paired) | frozen head's weight per fold "
        "| predict 5-s clip, 2 threads | model file |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    for name, values in scores.items():
        a = np.asarray(values)
        d = a - base
        paired = "" if name == BASELINE else f"{100 * d.mean():+.1f} +- {100 * d.std():.1f}"
        extra = extras.get(name, {})
        lines.append(
            f"| {name} | {100 * a.mean():.1f}% +- {100 * a.std():.1f} | "
            f"{', '.join(f'{100 * x:.1f}' for x in a)} | {paired} | "
            f"{', '.join(f'{w:.2f}' for w in weights.get(name, []))} | "
            + (f"{extra['predict_ms']:.0f} ms | {extra['file_mb']:.1f} MB |" if extra else " | |")
        )
        rows.append({"row": name, "fold_accuracy": values, "weights": weights.get(name), **extra})
    table = "\n".join(lines) + "\n"
    out = RESULTS / "fuse"
    record = json.dumps({"meta": meta, "rows": rows}, indent=2)
    write_whole(out.with_suffix(".json"), lambda f: f.write(record.encode()))
    write_whole(out.with_suffix(".md"), lambda f: f.write(table.encode()))
    print(table)


if __name__ == "__main__":
    main()

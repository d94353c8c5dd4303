"""Issue-12 figure: does ``soundsight cv --ensemble`` beat one model, on clips no fold saw?

ESC-50 fold 2 (``--dataset esc``): one fifth of the clips (a fold of
:func:`soundsight.evaluation.make_folds`, grouped by ``src_file``) is held out as the
test side; FSDD (``--dataset fsdd``): its official test side. On the rest, ``cross_validate``
with ``ensemble=True`` trains one model per inner fold and writes the ensemble; a
single model is trained on the same clips by ``train`` (its own grouped 20% for
validation and calibration, as a user's ``soundsight train`` would). All are scored on
the held-out fifth: the ensemble, each fold model, the single model; with the median
latency of predicting one 5-s clip (warm, 1 thread) and the file sizes.

Run on demand::

    python benchmarks/bench_ensemble.py [--dataset esc|fsdd] [--backbone NAME] [--folds 4]

Results go to benchmarks/results/ensemble_<dataset>_<backbone>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_accuracy import predict_ms
from machine import measured_line, run_record

import soundsight as ss
from soundsight.config import ModelConfig, TrainConfig
from soundsight.evaluation import make_folds
from soundsight.files import write_whole
from soundsight.prediction import Classifier, evaluate
from soundsight.training import cross_validate, train

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT = 4  # which of the 5 grouped folds is the test side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("esc", "fsdd"), default="esc")
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--folds", type=int, default=4, help="inner folds (ensemble members)")
    parser.add_argument("--work", help="folder for runs and caches (default: a temp folder)")
    args = parser.parse_args()
    meta = {
        **run_record(),
        "backbone": args.backbone,
        "dataset": args.dataset,
    }
    if args.dataset == "esc":
        clips = ss.load_dataset(DATASETS / "esc50-fold2")
        test_index = make_folds(clips, 5, TrainConfig().seed)[HELD_OUT]
        mask = np.zeros(len(clips), bool)
        mask[test_index] = True
        train_side, test_side = clips[~mask], clips[mask]
        test_name = f"grouped fold {HELD_OUT} of 5"
    else:
        train_side = ss.load_dataset(DATASETS / "fsdd", split="train")
        test_side = ss.load_dataset(DATASETS / "fsdd", split="test")
        test_name = "the official test side"
    model = ModelConfig(backbone=args.backbone)
    probe_clip = Path(test_side["path"].iloc[0])
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        cache = work / "cache"
        started = time.perf_counter()
        cross_validate(
            train_side,
            work / "cv",
            args.folds,
            model=model,
            cache=cache,
            progress=False,
            ensemble=True,
        )
        cv_seconds = time.perf_counter() - started
        started = time.perf_counter()
        single = train(train_side, work / "single", model=model, cache=cache, progress=False)
        single_seconds = time.perf_counter() - started
        members = [work / "cv" / f"fold{k}" / "model.safetensors" for k in range(args.folds)]
        ensemble = work / "cv" / "ensemble.safetensors"

        def accuracy(path: Path) -> float:
            # A fold model whose training clips lacked a class cannot score that class's
            # clips (evaluate refuses unknown labels): they count as its errors.
            labels = set(Classifier.load(path).labels)
            known = test_side[test_side["label"].isin(labels)]
            metrics = evaluate(path, known, cache=cache, progress=False)[0]
            return float(metrics["accuracy"]) * len(known) / len(test_side)

        result = {
            "test_clips": len(test_side),
            "train_clips": len(train_side),
            "ensemble_accuracy": accuracy(ensemble),
            "member_accuracy": [accuracy(m) for m in members],
            "single_accuracy": accuracy(single.model_path),
            "cv_seconds": cv_seconds,
            "single_seconds": single_seconds,
            "ensemble_predict_ms": predict_ms(ensemble, probe_clip),
            "single_predict_ms": predict_ms(single.model_path, probe_clip),
            "ensemble_mb": ensemble.stat().st_size / 1e6,
            "single_mb": single.model_path.stat().st_size / 1e6,
        }
    meta["load_average_at_end"] = os.getloadavg()[0]
    out = RESULTS / f"ensemble_{args.dataset}_{args.backbone}"
    record = json.dumps({"meta": meta, "result": result}, indent=2)
    write_whole(out.with_suffix(".json"), lambda f: f.write(record.encode()))
    r = result
    table = "\n".join(
        [
            f"{measured_line(meta)} "
            f"{args.backbone}, default recipe; {args.dataset}: {r['test_clips']} held-out clips "
            f"({test_name}), trained on the other {r['train_clips']}.",
            "",
            "| model | held-out accuracy | trained in | predict 5-s clip | file |",
            "|---|---|---|---|---|",
            f"| `cv --ensemble` of {args.folds} fold models | "
            f"{100 * r['ensemble_accuracy']:.1f}% | "
            f"{r['cv_seconds']:.0f} s (all folds) | {r['ensemble_predict_ms']:.1f} ms | "
            f"{r['ensemble_mb']:.1f} MB |",
            "| each fold model alone | "
            + ", ".join(f"{100 * a:.1f}" for a in r["member_accuracy"])
            + f" (mean {100 * np.mean(r['member_accuracy']):.1f}%) | | | |",
            f"| one model, `train` on the same clips | {100 * r['single_accuracy']:.1f}% | "
            f"{r['single_seconds']:.0f} s | {r['single_predict_ms']:.1f} ms | "
            f"{r['single_mb']:.1f} MB |",
        ]
    )
    write_whole(out.with_suffix(".md"), lambda f: f.write((table + "\n").encode()))
    print(table)


if __name__ == "__main__":
    main()

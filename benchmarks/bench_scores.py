"""Issue-17 figures: what the scores mean.

- calibration: ECE (15 bins) before and after temperature scaling, on the FSDD official
  test side (temperature fitted on a grouped hold-out of the training side) and on ESC
  fold 2 (5-fold grouped CV; per fold, on its own validation clips and, cross-fitted,
  at the other folds' temperature);
- open set within a domain: ESC fold 2 split by class 40 known / 10 unknown (5 class
  splits); a model trained on known classes; per rejection score, AUROC known-vs-unknown
  and the share of unknown clips accepted at the threshold that keeps 95% of known
  validation clips, against plain (uncalibrated) max-softmax;
- across domains: an FSDD model on the 414 ESC clips, at its stored threshold and at
  the one that keeps 95% of the FSDD test side: the one trained above (on the training
  side less a hold-out), and (phase ``default``) the default model that ``make run``
  trains (``--default-model``);
- beside each ECE, the ECE a perfectly calibrated model would show on the same clips
  (:func:`soundsight.calibration.ece_noise_floor`), and for ESC the ECE pooled over
  every clip of the CV (each scored by the fold model that never saw it);
- wall time of ``soundsight learning-curve`` on ESC fold 2 (with the load average).

Accuracy-type figures do not depend on the machine's load; run them under
``nice -n 19``. ``--quick`` runs every phase on a few clips with one epoch (a check
that the script works, not a measurement).

Usage: ``python benchmarks/bench_scores.py [--quick] [--phases fsdd,default,esc,open,curve]``.
Writes (merges into) benchmarks/results/scores.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_auc_score

import soundsight as ss
from soundsight.calibration import (
    DEFAULT_KEEP,
    class_centroids,
    ece_noise_floor,
    expected_calibration_error,
    rejection_scores,
    threshold_for_keep,
)
from soundsight.evaluation import holdout, make_folds
from soundsight.prediction import Classifier
from soundsight.training import TrainConfig, train

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
#: Scores compared: the two of soundsight.calibration, and plain max-softmax (T = 1).
SCORES = ("max_probability", "centroid_cosine", "max_softmax_uncalibrated")


#: Epochs of the recipe (``--epochs``; default: the default recipe's).
EPOCHS = TrainConfig().epochs


def _config(quick: bool) -> TrainConfig:
    if quick:
        return TrainConfig(stage1_epochs=0, stage2_epochs=1)
    if TrainConfig().epochs == EPOCHS:
        return TrainConfig()
    return TrainConfig(stage1_epochs=1, stage2_epochs=EPOCHS - 1)


def _subset(
    table: pd.DataFrame, quick: bool, per_label: int, labels: int | None = None
) -> pd.DataFrame:
    """``--quick``: ``per_label`` random clips of each of the first ``labels`` labels."""
    if not quick:
        return table
    kept = sorted(table["label"].unique())[:labels]
    table = table[table["label"].isin(kept)].sample(frac=1.0, random_state=0)
    return table.groupby("label").head(per_label).sort_values("path").reset_index(drop=True)


def _outputs(classifier: Classifier, paths, temperature: float | None = None):
    """Probabilities and embeddings of clips (decoded from their files), at the model
    file's temperature or at ``temperature``."""
    stored = classifier.net.temperature
    if temperature is not None:
        classifier.net.temperature = temperature
    try:
        rows = list(classifier.score((classifier.log_mel(p) for p in paths), embed=True))
    finally:
        classifier.net.temperature = stored
    return np.stack([p for p, _ in rows]), np.stack([e for _, e in rows])


def _targets(classifier: Classifier, labels) -> np.ndarray:
    index = {label: i for i, label in enumerate(classifier.labels)}
    return np.array([index[label] for label in labels])


def _all_scores(classifier: Classifier, paths, centroids: np.ndarray) -> dict[str, np.ndarray]:
    probabilities, embeddings = _outputs(classifier, paths)
    plain, _ = _outputs(classifier, paths, temperature=1.0)
    return {
        "max_probability": rejection_scores("max_probability", probabilities),
        "centroid_cosine": rejection_scores(
            "centroid_cosine", probabilities, embeddings, centroids
        ),
        "max_softmax_uncalibrated": rejection_scores("max_probability", plain),
    }


def _centroids(classifier: Classifier, clips: pd.DataFrame) -> np.ndarray:
    _, embeddings = _outputs(classifier, clips["path"])
    return class_centroids(embeddings, _targets(classifier, clips["label"]), len(classifier.labels))


def _ece(classifier: Classifier, clips: pd.DataFrame, temperature: float) -> tuple[float, float]:
    probabilities, targets = _scored(classifier, clips, temperature)
    accuracy = float((probabilities.argmax(1) == targets).mean())
    return expected_calibration_error(probabilities, targets), accuracy


def _scored(
    classifier: Classifier, clips: pd.DataFrame, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities at ``temperature`` and label numbers of the clips whose label the
    model has: a class whose clips all fall on the validation side is not in the model
    (training leaves those clips out, with a warning); they are left out here too."""
    clips = clips[clips["label"].isin(classifier.labels)]
    probabilities, _ = _outputs(classifier, clips["path"], temperature)
    return probabilities, _targets(classifier, clips["label"])


def bench_fsdd(work: Path, quick: bool) -> tuple[dict, Classifier, pd.DataFrame]:
    """Train on the FSDD training side (temperature and threshold fitted on its grouped
    20% hold-out), score the official test side."""
    clips = _subset(ss.load_dataset(DATASETS / "fsdd", "fsdd", "train"), quick, 12)
    test = _subset(ss.load_dataset(DATASETS / "fsdd", "fsdd", "test"), quick, 4)
    fit, valid = holdout(clips)
    result = train(
        fit, work / "fsdd", valid=valid, config=_config(quick), cache=work / "cache", progress=False
    )
    classifier = Classifier.load(result.model_path)
    before, accuracy_before = _ece(classifier, test, 1.0)
    after, accuracy_after = _ece(classifier, test, classifier.spec.temperature)
    return (
        {
            "train_clips": len(fit),
            "validation_clips": len(valid),
            "test_clips": len(test),
            "temperature": classifier.spec.temperature,
            "calibration_on_validation": classifier.spec.calibration,
            "test_ece_before": before,
            "test_ece_after": after,
            "test_ece_floor": ece_noise_floor(
                _scored(classifier, test, classifier.spec.temperature)[0]
            ),
            "test_accuracy_before": accuracy_before,
            "test_accuracy_after": accuracy_after,
            "rejection": {k: v for k, v in classifier.spec.rejection.items() if k != "centroids"},
        },
        classifier,
        fit,
    )


def bench_cross_domain(classifier: Classifier, fit: pd.DataFrame, quick: bool) -> dict:
    """The FSDD model on every ESC clip: how many it accepts as a digit."""
    test = _subset(ss.load_dataset(DATASETS / "fsdd", "fsdd", "test"), quick, 4)
    esc = _subset(ss.load_dataset(DATASETS / "esc50-fold2"), quick, 1)
    centroids = _centroids(classifier, fit)
    known = _all_scores(classifier, test["path"], centroids)
    unknown = _all_scores(classifier, esc["path"], centroids)
    stored = classifier.spec.rejection
    out: dict = {"esc_clips": len(esc), "fsdd_test_clips": len(test), "scores": {}}
    for name in SCORES:
        threshold = threshold_for_keep(known[name], DEFAULT_KEEP)
        out["scores"][name] = {
            "auroc": _auroc(known[name], unknown[name]),
            "accepted_at_95_test_kept": float((unknown[name] >= threshold).mean()),
            "test_kept": float((known[name] >= threshold).mean()),
        }
        if stored and stored["score"] == name:
            out["scores"][name]["stored_threshold"] = {
                "threshold": stored["threshold"],
                "accepted": float((unknown[name] >= stored["threshold"]).mean()),
                "test_kept": float((known[name] >= stored["threshold"]).mean()),
            }
    return out


def _auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    return float(roc_auc_score(truth, np.r_[known, unknown]))


def bench_esc_calibration(work: Path, quick: bool) -> dict:
    """5-fold grouped CV on ESC fold 2: ECE per fold before, after (own temperature)
    and cross-fitted (the geometric mean of the other folds' temperatures)."""
    clips = _subset(ss.load_dataset(DATASETS / "esc50-fold2"), quick, 5, 8)
    folds = make_folds(clips, 5, TrainConfig().seed)
    runs = []
    for k, valid_index in enumerate(folds):
        mask = np.zeros(len(clips), bool)
        mask[valid_index] = True
        model = work / "esc_cv" / f"fold{k}" / "model.safetensors"
        if not model.is_file():  # a rerun with the same --work reuses the fold's model
            model = train(
                clips[~mask],
                model.parent,
                valid=clips[mask],
                config=_config(quick),
                cache=work / "cache",
                progress=False,
            ).model_path
        runs.append((Classifier.load(model), clips[mask]))
    temperatures = [c.spec.temperature for c, _ in runs]
    rows, pooled = [], []
    for k, (classifier, valid) in enumerate(runs):
        others = np.exp(np.mean(np.log(np.delete(temperatures, k))))
        before, accuracy_before = _ece(classifier, valid, 1.0)
        after, accuracy_after = _ece(classifier, valid, temperatures[k])
        crossed, _ = _ece(classifier, valid, float(others))
        probabilities, targets = _scored(classifier, valid, temperatures[k])
        pooled.append((probabilities, classifier.labels, np.asarray(classifier.labels)[targets]))
        rows.append(
            {
                "fold": k,
                "clips": int(valid["label"].isin(classifier.labels).sum()),
                "temperature": temperatures[k],
                "ece_before": before,
                "ece_after": after,
                "ece_cross_fitted": crossed,
                # What a perfectly calibrated model would measure on this fold's clips.
                "ece_floor": ece_noise_floor(probabilities),
                "accuracy_before": accuracy_before,
                "accuracy_after": accuracy_after,
            }
        )
    frame = pd.DataFrame(rows)
    summary = {
        key: {"mean": float(frame[key].mean()), "std": float(frame[key].std(ddof=0))}
        for key in frame.columns
        if key not in ("fold", "clips")
    }
    return {"folds": rows, "summary": summary, "pooled": _pooled_ece(pooled)}


def _pooled_ece(folds: list[tuple[np.ndarray, list[str], np.ndarray]]) -> dict:
    """ECE over every clip of the CV, each scored by the fold model that did not train
    on it (at that model's temperature), and its noise floor: 5 times the clips of one
    fold, so a far smaller floor. Folds whose models lack a label (too few clips of it)
    have fewer columns; columns are aligned on the label names."""
    labels = sorted({label for _, names, _ in folds for label in names})
    rows, truth = [], []
    for probabilities, names, targets in folds:
        aligned = np.zeros((len(probabilities), len(labels)))
        aligned[:, [labels.index(n) for n in names]] = probabilities
        rows.append(aligned)
        truth.append([labels.index(t) for t in targets])
    probabilities, targets = np.concatenate(rows), np.concatenate(truth)
    return {
        "clips": len(targets),
        "ece_after": expected_calibration_error(probabilities, targets),
        "ece_floor": ece_noise_floor(probabilities),
        "accuracy": float((probabilities.argmax(1) == targets).mean()),
    }


def bench_open_set(work: Path, quick: bool, splits: int = 5) -> dict:
    """ESC fold 2 split by class, 40 known / 10 unknown; per split, known clips are cut
    (grouped) into training (3/5), validation (1/5, picks the threshold) and a known
    test side (1/5) that the unknown classes' clips are compared with."""
    clips = _subset(ss.load_dataset(DATASETS / "esc50-fold2"), quick, 10, 10)
    labels = sorted(clips["label"].unique())
    per_split = []
    for split in range(2 if quick else splits):
        rng = np.random.default_rng(split)
        unknown_labels = set(rng.choice(labels, size=len(labels) // 5, replace=False))
        known = clips[~clips["label"].isin(unknown_labels)].reset_index(drop=True)
        unknown = clips[clips["label"].isin(unknown_labels)].reset_index(drop=True)
        folds = make_folds(known.assign(fold=pd.NA), 5, split)
        side = np.full(len(known), "train", object)
        side[folds[0]], side[folds[1]] = "test", "valid"
        result = train(
            known[side == "train"],
            work / "open" / f"split{split}",
            valid=known[side == "valid"],
            config=_config(quick),
            cache=work / "cache",
            progress=False,
        )
        classifier = Classifier.load(result.model_path)
        centroids = _centroids(classifier, known[side == "train"])
        valid = _all_scores(classifier, known.loc[side == "valid", "path"], centroids)
        test = _all_scores(classifier, known.loc[side == "test", "path"], centroids)
        away = _all_scores(classifier, unknown["path"], centroids)
        row = {"split": split, "unknown_labels": sorted(unknown_labels)}
        for name in SCORES:
            threshold = threshold_for_keep(valid[name], DEFAULT_KEEP)
            row[name] = {
                "auroc": _auroc(test[name], away[name]),
                "unknown_accepted": float((away[name] >= threshold).mean()),
                "known_test_kept": float((test[name] >= threshold).mean()),
                # The threshold that keeps exactly 95% of the known test side.
                "unknown_accepted_at_95_test_kept": float(
                    (away[name] >= threshold_for_keep(test[name], DEFAULT_KEEP)).mean()
                ),
            }
        per_split.append(row)
    summary = {
        name: {
            key: {
                "mean": float(np.mean([r[name][key] for r in per_split])),
                "std": float(np.std([r[name][key] for r in per_split])),
            }
            for key in per_split[0][name]
        }
        for name in SCORES
    }
    return {"splits": per_split, "summary": summary}


def bench_curve(work: Path, quick: bool) -> dict:
    """Wall time of the learning curve on ESC fold 2 (features cached beforehand, as
    after ``prepare``), with the load average."""
    from soundsight.cache import prepare
    from soundsight.learning_curve import learning_curve

    clips = _subset(ss.load_dataset(DATASETS / "esc50-fold2"), quick, 4, 5)
    prepare(clips, work / "cache", progress=False)
    load = os.getloadavg()
    start = time.perf_counter()
    curve = learning_curve(clips, work / "curve", cache=work / "cache", progress=False)
    return {
        "clips": len(clips),
        "wall_seconds": time.perf_counter() - start,
        "load_average_at_start": load,
        "accuracy_now": curve.summary["accuracy_now"],
        "accuracy_at_2x": curve.summary["accuracy_at_2x"],
        "gain_most": curve.summary["gain_most"],
    }


def main() -> None:
    global EPOCHS
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few clips, one epoch")
    parser.add_argument("--phases", default="fsdd,default,esc,open,curve")
    parser.add_argument(
        "--default-model",
        default=str(ROOT / "runs" / "fsdd" / "model.safetensors"),
        help="the default FSDD model for phase 'default' (what `make run` trains: the "
        "whole training side, validated on the test side)",
    )
    parser.add_argument("--work", help="folder for runs and cache (default: a temp folder)")
    parser.add_argument("--out", help="results file (default results/scores.json; --quick: work)")
    parser.add_argument(
        "--epochs",
        type=int,
        default=EPOCHS,
        help="a shorter recipe (1 head epoch, the rest unfrozen) where the machine is "
        f"too busy for the default {EPOCHS}",
    )
    args = parser.parse_args()
    EPOCHS = args.epochs
    phases = set(args.phases.split(","))
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_scores_"))
    out_path = Path(args.out or (work / "scores.json" if args.quick else RESULTS / "scores.json"))
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    results.update(
        {
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "quick": args.quick,
            "keep": DEFAULT_KEEP,
            "epochs": 1 if args.quick else EPOCHS,
            "load_average_at_start": os.getloadavg(),
        }
    )

    def save(name: str, value: dict) -> None:
        results[name] = value
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1, default=float))
        print(name, json.dumps(value, default=float)[:2000], flush=True)

    if "fsdd" in phases:
        fsdd, classifier, fit = bench_fsdd(work, args.quick)
        save("fsdd_calibration", fsdd)
        save("cross_domain_fsdd_model_on_esc", bench_cross_domain(classifier, fit, args.quick))
    if "default" in phases:
        model = Path(args.default_model)
        if not model.is_file():
            parser.error(f"--default-model {model} is missing: `make run` writes it")
        fit = ss.load_dataset(DATASETS / "fsdd", "fsdd", "train")
        save(
            "cross_domain_default_model_on_esc",
            {"model": str(model), **bench_cross_domain(Classifier.load(model), fit, args.quick)},
        )
    if "esc" in phases:
        save("esc_cv_calibration", bench_esc_calibration(work, args.quick))
    if "open" in phases:
        save("open_set_esc", bench_open_set(work, args.quick))
    if "curve" in phases:
        save("learning_curve_esc", bench_curve(work, args.quick))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()

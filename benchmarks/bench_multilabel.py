"""Benchmark: several sounds per clip (multi-label training).

1. Writes single clips of 16 classes (20 of each FSDD digit, speaker index 5-49, and six
   ESC-50 event classes of even ``src_file``), each trimmed of silence (librosa) and cut
   to 2 s at 22.05 kHz, as a folder-per-class data set.
2. Trains on them twice with the same recipe: a single-label model (softmax), and a
   multi-label model (``multi_label=True``: sigmoids, binary cross-entropy, two clips
   of a batch summed into one example half of the time, per-class thresholds tuned on
   the validation side).
3. Scores both on 2-event mixtures of held-out clips (FSDD test-side digits, ESC clips
   of odd ``src_file``; two clips of different classes, each at the same peak level,
   summed): lwlrap (FSDKaggle2019's metric) and macro mAP, the single-label model's
   softmax probabilities used as its scores; and macro F1 of the multi-label model at
   its thresholds against the single-label model's top two labels (told that there
   are two).

Nothing is committed as audio: everything is written under ``--work`` (default
/tmp/bench_multilabel). ``--quick`` runs a small version (a few clips per class, one
epoch, 24 mixtures), to check the script; its figures mean nothing.

    nice -n 19 python benchmarks/bench_multilabel.py [--quick]

Writes ``benchmarks/results/multilabel.json`` and ``.md`` (``multilabel_quick.*``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import soundfile as sf
from bench_timelines import EVENTS, digits, esc_side
from machine import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SAMPLE_RATE = 22050
CLIP_SECONDS = 2.0


def clip_wave(path: Path) -> np.ndarray:
    """A clip at :data:`SAMPLE_RATE`, trimmed of silence, at most 2 s, peak 0.5."""
    from soundsight import load_clip
    from soundsight.soundscapes import trimmed

    wave = trimmed(load_clip(path, SAMPLE_RATE))[: int(CLIP_SECONDS * SAMPLE_RATE)]
    return 0.5 * wave / max(float(np.abs(wave).max()), 1e-9)


def write_clips(folder: Path, clips: list[tuple[Path, str]]) -> None:
    """The training clips as ``folder/<label>/<name>.wav``."""
    for path, label in clips:
        target = folder / label / f"{path.stem}.wav"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            sf.write(target, clip_wave(path), SAMPLE_RATE)


def write_mixtures(folder: Path, clips: list[tuple[Path, str]], count: int) -> list[tuple]:
    """``count`` 2-event mixtures of clips of different classes (fixed seed): each
    clip at peak 0.5, the shorter placed at a random offset in the longer; returns
    ``(path, (label, label))`` per mixture."""
    rng = np.random.default_rng(0)
    by_label: dict[str, list[Path]] = {}
    for path, label in clips:
        by_label.setdefault(label, []).append(path)
    pairs = list(itertools.combinations(sorted(by_label), 2))
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for number in range(count):
        first, second = pairs[rng.integers(len(pairs))]
        waves = sorted(
            (clip_wave(by_label[x][rng.integers(len(by_label[x]))]) for x in (first, second)),
            key=len,
        )
        mix = waves[1].copy()
        start = int(rng.integers(len(mix) - len(waves[0]) + 1))
        mix[start : start + len(waves[0])] += waves[0]
        target = folder / f"mix{number:04d}.wav"
        sf.write(target, 0.9 * mix / np.abs(mix).max(), SAMPLE_RATE)
        written.append((target, (first, second)))
    return written


def train_both(work: Path, quick: bool) -> dict[str, Path]:
    from soundsight import load_dataset
    from soundsight.training import TrainConfig, train

    events = esc_side(0, EVENTS)
    if quick:  # three clips of each event class
        events = [c for i, c in enumerate(events) if [x for _, x in events[:i]].count(c[1]) < 3]
    clips = digits(False, 6 if quick else 20) + events
    write_clips(work / "clips", clips)
    table = load_dataset(work / "clips", "folder")
    config = TrainConfig(stage1_epochs=0, stage2_epochs=1) if quick else TrainConfig()
    models = {}
    for name, recipe in (("single", config), ("multi", replace(config, multi_label=True))):
        model = work / name / "model.safetensors"
        if not model.is_file():
            started = time.perf_counter()
            train(table, work / name, config=recipe, cache=work / "cache")
            print(f"{name}-label model trained in {time.perf_counter() - started:.0f} s")
        models[name] = model
    return models


def scores(models: dict[str, Path], mixtures: list[tuple]) -> dict:
    from sklearn.metrics import f1_score

    from soundsight.evaluation import average_precisions, lwlrap
    from soundsight.layouts import multi_hot
    from soundsight.prediction import Classifier

    result = {}
    for name, model in models.items():
        classifier = Classifier.load(model)
        index = {label: i for i, label in enumerate(classifier.labels)}
        truth = multi_hot([labels for _, labels in mixtures], index)
        frame, failures = classifier.predict_files([p for p, _ in mixtures], progress=False)
        assert not failures, failures
        probabilities = frame[classifier.labels].to_numpy()
        if classifier.spec.multi_label:
            thresholds = np.asarray(classifier.spec.thresholds)
            predicted = probabilities >= thresholds
            how = "labels at or above the tuned per-class thresholds"
        else:  # the two most probable labels: the single-label model told there are two
            predicted = np.zeros_like(truth, bool)
            np.put_along_axis(predicted, np.argsort(-probabilities, axis=1)[:, :2], True, axis=1)
            how = "the two most probable labels (told that each mixture has two)"
        ap = average_precisions(truth, probabilities)
        result[name] = {
            "lwlrap": round(lwlrap(truth, probabilities), 4),
            "mean_ap": round(float(np.nanmean(ap)), 4),
            "macro_f1": round(float(f1_score(truth, predicted, average="macro")), 4),
            "f1_decision": how,
            "labels_per_clip": round(float(predicted.sum(1).mean()), 2),
            "validation": classifier.spec.metrics,
        }
        print(name, {k: v for k, v in result[name].items() if k != "validation"}, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small run, to check the script")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_multilabel"))
    args = parser.parse_args()
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    models = train_both(work, args.quick)
    held_out = digits(True, 2 if args.quick else 5) + esc_side(1, EVENTS)
    mixtures = write_mixtures(work / "mixtures", held_out, 24 if args.quick else 400)
    result = {
        "started": started.isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "load_average": os.getloadavg(),
        "quick": args.quick,
        "mixtures": len(mixtures),
        "classes": 10 + len(EVENTS),
        "models": scores(models, mixtures),
    }
    stem = "multilabel_quick" if args.quick else "multilabel"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    models_ = result["models"]
    lines = [
        f"# Several sounds per clip ({result['started']}, {result['cpu']}, load "
        f"{result['load_average'][0]:.2f}{', quick' if args.quick else ''})",
        "",
        f"{result['mixtures']} 2-event mixtures of held-out clips, {result['classes']} classes "
        "(FSDD digits and ESC-50 events).",
        "",
        "| model | lwlrap | mAP | macro F1 | labels per clip | F1 decisions |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, title in (("single", "single-label (softmax as scores)"), ("multi", "multi-label")):
        row = models_[name]
        lines.append(
            f"| {title} | {row['lwlrap']:.3f} | {row['mean_ap']:.3f} | {row['macro_f1']:.3f} "
            f"| {row['labels_per_clip']} | {row['f1_decision']} |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

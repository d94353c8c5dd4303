"""Do I have enough clips? Accuracy against clips per class, and which classes need more.

:func:`learning_curve` holds out a grouped, stratified fifth of the clips
(:func:`soundsight.evaluation.holdout`: clips of one speaker or source recording never
straddle the split), trains on 1, 2, 4, 8... clips of each class of the rest (then on
all of it), scores the held-out side, and repeats with 3 different splits. A power
law ``accuracy = a - b * n**-c`` (scipy's ``curve_fit``) fitted to the mean accuracy
at ``n`` clips per class is extrapolated to twice the clips there are; per class,
the recall reached with all clips against the class's clip count, and the classes
whose recall still rose most from the last halving, are the ones to record more of.

The recipe is chosen to be fast, so that a curve costs seconds, not a training per
point: a *linear probe*. Every clip is embedded once by the ImageNet-pretrained
backbone of the model config (the same log-mels, views and windowed scorer as
training and prediction, :func:`soundsight.prediction.score_log_mels`), and each
point is a scikit-learn logistic regression on those embeddings. Fine-tuning (what
``train`` does) scores higher, but accuracy grows with clips per class in the same
way, and that trend is the question here.

Files written to ``out``::

    learning_curve.png          the two pictures
    learning_curve.csv          split, clips_per_class, clips, accuracy (one row per fit)
    learning_curve_fit.csv      clips_per_class, mean and std accuracy, fitted curve
    learning_curve_classes.csv  label, clips, recall (all clips), recall (half), gain
    learning_curve.json         the fit, the extrapolation, the classes that gain most
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .config import FeatureConfig, ModelConfig
from .layouts import DatasetError

#: Held-out splits (repeats) per curve.
REPEATS = 3
#: Classes named as gaining most from more clips.
GAINERS = 5


def _power_law(n, a, b, c):
    return a - b * np.power(n, -c)


@dataclass
class LearningCurve:
    """What :func:`learning_curve` measured (also written to its ``out`` folder).

    Attributes
    ----------
    fits : DataFrame
        One row per fit: ``split``, ``clips_per_class``, ``clips``, ``accuracy``.
    curve : DataFrame
        Per clips-per-class level: ``mean``, ``std`` accuracy and the ``fitted`` value.
    classes : DataFrame
        Per label: ``clips``, ``recall`` with all training clips, ``recall_half`` with
        half of them, ``gain`` (the difference), sorted by gain.
    summary : dict
        ``fit`` (a, b, c or None), ``clips_per_class_now``, ``accuracy_now``,
        ``accuracy_at_2x``, ``gain_most`` (labels), ``recipe``.
    """

    fits: pd.DataFrame
    curve: pd.DataFrame
    classes: pd.DataFrame
    summary: dict


def check_enough(clips: pd.DataFrame) -> None:
    """:class:`DatasetError` naming every class with fewer than 2 clips (or saying that
    a multi-label table is not for it: accuracy needs one label per clip)."""
    from .layouts import is_multi_label

    if is_multi_label(clips):
        raise DatasetError(
            "the learning curve measures accuracy, one label per clip; these clips have "
            "several labels each (a multi-label layout or --label-separator)"
        )
    counts = clips["label"].astype(str).value_counts()
    few = counts[counts < 2]
    if len(few):
        names = ", ".join(f"{label!r} ({count})" for label, count in few.items())
        raise DatasetError(
            f"a learning curve needs at least 2 clips in every class (one to train on, one "
            f"to test); too few in: {names}"
        )


def _levels(largest: int) -> list[int]:
    """1, 2, 4, ... below ``largest``, then ``largest`` itself."""
    levels = [1]
    while levels[-1] * 2 < largest:
        levels.append(levels[-1] * 2)
    return sorted(set(levels + [largest]))


def embed_clips(
    clips: pd.DataFrame,
    cache: str | os.PathLike | None = None,
    features: FeatureConfig | None = None,
    model: ModelConfig | None = None,
    progress: bool = True,
) -> tuple[pd.DataFrame, np.ndarray]:
    """The clips that decode and their embeddings by the pretrained backbone (each
    clip's evaluation windows averaged), through the cache like training."""
    import torch

    from .cache import DEFAULT_CACHE, prepare
    from .data import ClipView
    from .datamodule import resolve_crop
    from .models import SoundNet
    from .prediction import score_log_mels

    features, model = features or FeatureConfig(), model or ModelConfig()
    feature_cache, _ = prepare(clips, cache or DEFAULT_CACHE, features, progress=progress)
    clips = clips[[p in feature_cache for p in clips["path"]]].reset_index(drop=True)
    check_enough(clips)
    frames = np.array([feature_cache.load(p).shape[1] for p in clips["path"]])
    model = resolve_crop(model, frames * features.hop_length / features.sample_rate)
    net = SoundNet(model, 1, features.floor_db).eval()
    view = ClipView.for_model(model, features)
    log_mels = (
        feature_cache.load(p)
        for p in tqdm(clips["path"], desc="embed", unit="clip", disable=not progress)
    )
    with torch.inference_mode():
        # With embed=True every clip has an embedding (never None).
        rows = [cast(np.ndarray, e) for _, e in score_log_mels(net, view, log_mels, embed=True)]
    return clips, np.stack(rows)


def _probe(embeddings: np.ndarray, labels: np.ndarray):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=500))
    return probe.fit(embeddings, labels)


def learning_curve(
    clips: pd.DataFrame,
    out: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    features: FeatureConfig | None = None,
    model: ModelConfig | None = None,
    repeats: int = REPEATS,
    progress: bool = True,
) -> LearningCurve:
    """Measure accuracy against clips per class and write the pictures and numbers to
    ``out`` (see the module docstring).

    Raises :class:`~soundsight.layouts.DatasetError` naming the classes with fewer than
    2 clips.
    """
    from .evaluation import holdout

    check_enough(clips)
    clips, embeddings = embed_clips(clips, cache, features, model, progress)
    labels = clips["label"].astype(str).to_numpy()
    classes = sorted(set(labels))
    rows, recalls = [], {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(single clip|fewer clips than)")
        splits = [holdout(clips.assign(row=np.arange(len(clips))), 0.2, s) for s in range(repeats)]
    largest = max(int(train["label"].value_counts().max()) for train, _ in splits)
    levels = _levels(largest)
    bar = tqdm(total=repeats * len(levels), desc="fit", unit="fit", disable=not progress)
    for split, (train, test) in enumerate(splits):
        test_rows = test["row"].to_numpy()
        for level in levels:
            picked = (
                train.sample(frac=1.0, random_state=split * 1000 + level)
                .groupby("label")
                .head(level)["row"]
                .to_numpy()
            )
            truth = labels[test_rows]
            if len(set(labels[picked])) < 2:  # one class: every clip is that class
                predicted = np.full(len(truth), labels[picked][0])
            else:
                predicted = _probe(embeddings[picked], labels[picked]).predict(
                    embeddings[test_rows]
                )
            rows.append(
                {
                    "split": split,
                    "clips_per_class": level,
                    "clips": len(picked),
                    "accuracy": float((predicted == truth).mean()),
                }
            )
            recalls[split, level] = {
                c: float((predicted[truth == c] == c).mean()) if (truth == c).any() else np.nan
                for c in classes
            }
            bar.update(1)
    bar.close()
    fits = pd.DataFrame(rows)
    curve = fits.groupby("clips_per_class")["accuracy"].agg(["mean", "std"]).reset_index()
    parameters = _fit(curve["clips_per_class"].to_numpy(), curve["mean"].to_numpy())
    curve["fitted"] = (
        _power_law(curve["clips_per_class"].to_numpy(float), *parameters)
        if parameters is not None
        else np.nan
    )
    counts = pd.Series(labels).value_counts()
    half = levels[-2] if len(levels) > 1 else levels[-1]
    per_class = pd.DataFrame(
        {
            "label": classes,
            "clips": [int(counts[c]) for c in classes],
            "recall": [
                np.nanmean([recalls[s, levels[-1]][c] for s in range(repeats)]) for c in classes
            ],
            "recall_half": [
                np.nanmean([recalls[s, half][c] for s in range(repeats)]) for c in classes
            ],
        }
    )
    per_class["gain"] = per_class["recall"] - per_class["recall_half"]
    per_class = per_class.sort_values(["gain", "recall"], ascending=[False, True])
    gainers = per_class[per_class["gain"] > 0].head(GAINERS)
    now = levels[-1]
    summary = {
        "recipe": "linear probe: logistic regression (C=0.1, standardised) on the "
        "ImageNet-pretrained backbone's clip embeddings",
        "repeats": repeats,
        "levels": levels,
        "fit": None
        if parameters is None
        else dict(zip("abc", map(float, parameters), strict=True)),
        "clips_per_class_now": now,
        "accuracy_now": float(curve["mean"].iloc[-1]),
        "accuracy_at_2x": None
        if parameters is None
        else float(min(1.0, _power_law(2.0 * now, *parameters))),
        "gain_most": gainers["label"].tolist(),
    }
    result = LearningCurve(fits, curve, per_class.reset_index(drop=True), summary)
    write_learning_curve(result, out)
    return result


def _fit(levels: np.ndarray, accuracy: np.ndarray):
    """The power law's (a, b, c), or None with fewer than 3 levels or no fit."""
    from scipy.optimize import curve_fit

    if len(levels) < 3:
        return None
    try:
        parameters, _ = curve_fit(
            _power_law,
            levels.astype(float),
            accuracy,
            p0=(min(1.0, accuracy[-1] + 0.05), 0.5, 0.5),
            bounds=([0.0, 0.0, 0.01], [1.0, 2.0, 3.0]),
            maxfev=10_000,
        )
    except (RuntimeError, ValueError):
        return None
    return parameters


def plot_learning_curve(result: LearningCurve) -> Figure:
    """Accuracy against clips per class (mean +- std over the splits, the fitted power
    law and its extrapolation to twice the clips), and per-class recall against
    per-class clip count, the classes that gain most named."""
    figure = Figure(figsize=(11, 4.4))
    left, right = figure.subplots(1, 2)
    curve, summary = result.curve, result.summary
    left.errorbar(
        curve["clips_per_class"],
        curve["mean"],
        yerr=curve["std"].fillna(0),
        marker="o",
        capsize=3,
        label=f"measured ({summary['repeats']} splits)",
    )
    if summary["fit"] is not None:
        now = summary["clips_per_class_now"]
        n = np.geomspace(1, 2 * now, 100)
        fit = summary["fit"]
        left.plot(n, _power_law(n, fit["a"], fit["b"], fit["c"]), "--", label="power-law fit")
        left.plot([2 * now], [summary["accuracy_at_2x"]], "s", color="C3", label="at 2x the clips")
    left.set(
        xscale="log",
        xlabel="training clips per class",
        ylabel="held-out accuracy",
        ylim=(0, 1),
        title="Accuracy against clips per class",
    )
    left.legend(fontsize=8, loc="lower right")
    left.grid(alpha=0.3)
    classes = result.classes
    right.scatter(classes["clips"], classes["recall"], s=14, alpha=0.7)
    for row in classes[classes["label"].isin(summary["gain_most"])].itertuples():
        right.annotate(str(row.label), (row.clips, row.recall), fontsize=8, color="C3")
    right.set(
        xlabel="clips of the class",
        ylabel="recall with all training clips",
        ylim=(-0.05, 1.05),
        title="Per class (named: still rising most)",
    )
    right.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def write_learning_curve(result: LearningCurve, out: str | os.PathLike) -> Path:
    """Write the curve's PNG, CSVs and JSON into ``out``; returns the PNG's path."""
    from .evaluation import write_json
    from .files import write_whole
    from .tables import write_csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(result.fits, out / "learning_curve.csv")
    write_csv(result.curve, out / "learning_curve_fit.csv")
    write_csv(result.classes, out / "learning_curve_classes.csv")
    write_json(out / "learning_curve.json", json.loads(json.dumps(result.summary)))
    figure = plot_learning_curve(result)
    path = out / "learning_curve.png"
    write_whole(path, lambda file: figure.savefig(file, format="png", dpi=110, facecolor="white"))
    return path

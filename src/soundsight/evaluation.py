"""Scoring predictions, writing the scores, and splitting datasets into honest folds."""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
)
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from .layouts import LABEL_JOIN, DatasetError, clip_labels, is_multi_label
from .tables import write_csv

#: The headline scores kept in metrics.json, model files and CV summaries.
SUMMARY = ("clips", "accuracy", "error_rate", "map3")
#: The same for a multi-label model (:func:`multi_label_score`).
MULTI_LABEL_SUMMARY = ("clips", "background_clips", "lwlrap", "mean_ap", "macro_f1")
#: Threshold of a class the validation side has no clip of (nothing to tune it on).
DEFAULT_THRESHOLD = 0.5


def describe_scores(metrics: dict) -> str:
    """The headline scores in words: accuracy, error rate and MAP@3, or a multi-label
    model's lwlrap, mAP and macro F1."""
    if "lwlrap" in metrics:
        return (
            f"{metrics['clips']} clips ({metrics['background_clips']} without a label), "
            f"lwlrap {metrics['lwlrap']:.4f}, mAP {metrics['mean_ap']:.4f}, "
            f"macro F1 {metrics['macro_f1']:.4f} (at the per-class thresholds)"
        )
    return (
        f"{metrics['clips']} clips, accuracy {metrics['accuracy']:.4f}, "
        f"error rate {metrics['error_rate']:.4f}, MAP@3 {metrics['map3']:.4f}"
    )


def summary(metrics: dict) -> dict:
    """The headline scores of :func:`score`'s result (:data:`SUMMARY`, or
    :data:`MULTI_LABEL_SUMMARY` for a multi-label model's)."""
    keys = MULTI_LABEL_SUMMARY if "lwlrap" in metrics else SUMMARY
    return {k: metrics[k] for k in keys}


def map_at_k(probabilities: np.ndarray, targets: np.ndarray, k: int = 3) -> float:
    """Mean average precision at ``k`` for single-label clips (the FSDKaggle2018
    metric): 1/rank of the true label when it is in the top ``k``, else 0."""
    top = np.argsort(-probabilities, axis=1)[:, :k]
    hits = top == np.asarray(targets)[:, None]
    return float((hits / np.arange(1, k + 1)).sum(axis=1).mean())


def score(
    probabilities: np.ndarray,
    targets: Sequence[int] | np.ndarray,
    labels: Sequence[str],
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> dict:
    """Accuracy, error rate, MAP@3, per-class precision/recall/F1, confusion matrix
    (rows true, columns predicted) and the most-confused pairs; for multi-label
    targets (a 0/1 matrix, clips x labels) :func:`multi_label_score`'s scores at
    ``thresholds``."""
    targets = np.asarray(targets)
    if targets.ndim == 2:
        return multi_label_score(probabilities, targets, labels, thresholds)
    predicted = probabilities.argmax(axis=1)
    classes = np.arange(len(labels))
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, predicted, labels=classes, zero_division=0
    )
    confusion = confusion_matrix(targets, predicted, labels=classes)
    accuracy = float((predicted == targets).mean())
    return {
        "clips": int(len(targets)),
        "accuracy": accuracy,
        "error_rate": 1.0 - accuracy,
        "map3": map_at_k(probabilities, targets, min(3, len(labels))),
        "per_class": pd.DataFrame(
            {
                "label": list(labels),
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "support": support,
            }
        ),
        "confusion": confusion,
        "most_confused": most_confused(confusion, labels),
    }


def lwlrap(truth: np.ndarray, scores: np.ndarray) -> float:
    """Label-weighted label-ranking average precision (FSDKaggle2019's metric).

    For each (clip, true label) pair: the share of true labels among the labels the
    clip scores at least as high as this one (its precision at the label's rank); the
    mean over all pairs, so each class weighs by how many true labels it has. Clips
    without a true label add nothing. Ties count against the label, as
    scikit-learn's ``label_ranking_average_precision_score`` counts them.

    Written in numpy because no well-kept library has it: scikit-learn's
    ``label_ranking_average_precision_score`` is the unweighted LRAP (the mean over
    clips of each clip's mean precision, so a clip with one label weighs as much as
    one with five; the two agree when every clip has exactly one label), and the
    metric's reference is a notebook of the competition (Dan Ellis's Colab).

    Parameters
    ----------
    truth : array ``(clips, labels)``
        1 (or True) where the label is present.
    scores : array ``(clips, labels)``
        Higher: the label more likely.
    """
    truth = np.asarray(truth) > 0
    scores = np.asarray(scores, np.float64)
    if truth.shape != scores.shape or truth.ndim != 2:
        raise ValueError(f"truth {truth.shape} and scores {scores.shape} must be equal 2-D shapes")
    precisions = []
    for clip_truth, clip_scores in zip(truth, scores, strict=True):
        positives = clip_scores[clip_truth]
        if not len(positives):
            continue
        # For each true label: labels scored at least as high (its rank), and true ones.
        at_least = clip_scores[None, :] >= positives[:, None]
        precisions.append(at_least[:, clip_truth].sum(1) / at_least.sum(1))
    return float(np.concatenate(precisions).mean()) if precisions else float("nan")


def average_precisions(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Each label's average precision over the clips (scikit-learn's
    ``average_precision_score``); NaN for a label no clip has (undefined)."""
    truth = np.asarray(truth) > 0
    return np.array(
        [
            average_precision_score(truth[:, c], scores[:, c]) if truth[:, c].any() else np.nan
            for c in range(truth.shape[1])
        ]
    )


def tune_thresholds(truth: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """One threshold per label: where the label's F1 on these clips is highest (over
    scikit-learn's ``precision_recall_curve``; a clip is positive at or above it),
    halfway between the lowest score it calls positive and the next lower score, so
    that scores a hair apart (another runtime, folded batch norms) are called alike.
    A label without a positive clip keeps :data:`DEFAULT_THRESHOLD`."""
    truth = np.asarray(truth) > 0
    chosen = np.full(truth.shape[1], DEFAULT_THRESHOLD)
    for c in range(truth.shape[1]):
        if not truth[:, c].any():
            continue
        precision, recall, cuts = precision_recall_curve(truth[:, c], scores[:, c])
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
        best = int(np.argmax(f1[:-1]))  # the last point has no threshold
        below = cuts[best - 1] if best > 0 else 0.0  # cuts: the distinct scores, rising
        chosen[c] = (cuts[best] + below) / 2
    # A threshold of 0 would call every label present; sigmoid scores are above it.
    return np.clip(chosen, 1e-6, 1.0)


def multi_label_score(
    probabilities: np.ndarray,
    truth: np.ndarray,
    labels: Sequence[str],
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> dict:
    """Scores of a multi-label model: lwlrap (:func:`lwlrap`), macro mean average
    precision over the labels the clips have (:func:`average_precisions`), and each
    label's precision, recall and F1 with a label present at or above its threshold
    (default :data:`DEFAULT_THRESHOLD`), their mean over all labels (``macro_f1``)."""
    truth = np.asarray(truth) > 0
    probabilities = np.asarray(probabilities, np.float64)
    if thresholds is None:
        thresholds = np.full(len(labels), DEFAULT_THRESHOLD)
    thresholds = np.asarray(thresholds, np.float64)
    predicted = probabilities >= thresholds
    precision, recall, f1, support = precision_recall_fscore_support(
        truth, predicted, average=None, zero_division=0
    )
    ap = average_precisions(truth, probabilities)
    return {
        "clips": int(len(truth)),
        "background_clips": int((~truth.any(axis=1)).sum()),
        "lwlrap": lwlrap(truth, probabilities),
        "mean_ap": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
        "macro_f1": float(np.mean(f1)),
        "per_class": pd.DataFrame(
            {
                "label": list(labels),
                "ap": ap,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "threshold": thresholds,
                "support": support,
            }
        ),
    }


def joined_labels(labels: Sequence[str], present: np.ndarray) -> list[str]:
    """Each row of a 0/1 matrix ``present`` (clips x labels) as its labels joined by
    :data:`~soundsight.layouts.LABEL_JOIN` ("dog;rain"; "" for none)."""
    return [LABEL_JOIN.join(labels[int(i)] for i in np.flatnonzero(row)) for row in present]


def most_confused(confusion: np.ndarray, labels: Sequence[str], min_count: int = 1) -> pd.DataFrame:
    """Off-diagonal (true, predicted) pairs by count, largest first."""
    true, pred = np.nonzero(confusion - np.diag(np.diag(confusion)) >= min_count)
    frame = pd.DataFrame(
        {
            "true": [labels[int(i)] for i in true],
            "predicted": [labels[int(j)] for j in pred],
            "count": confusion[true, pred],
        }
    )
    return frame.sort_values(["count", "true"], ascending=[False, True]).reset_index(drop=True)


def write_json(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as indented JSON atomically (a unique temporary name, flushed,
    then renamed: readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(data, file, indent=2)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_metrics(
    out: str | os.PathLike,
    metrics: dict,
    labels: Sequence[str],
    paths: Sequence[str],
    probabilities: np.ndarray,
    targets: Sequence[int] | np.ndarray,
) -> None:
    """Write :func:`score`'s results to the folder ``out``: ``metrics.json``
    (:func:`summary`), ``per_class.csv``, ``confusion.csv`` (true labels in rows),
    ``most_confused.csv`` and the per-clip ``valid_predictions.csv`` (``path``,
    ``label``, one probability column per label). A multi-label model's scores have
    no confusion matrix, and its ``valid_predictions.csv`` has ``labels`` (each
    clip's, joined: "dog;rain") in place of ``label``. CSVs go through
    :func:`soundsight.tables.write_csv`: read them back with
    :func:`soundsight.tables.read_csv` and labels stay the strings they were."""
    out = Path(out)
    labels = list(labels)
    write_json(out / "metrics.json", summary(metrics))
    write_csv(metrics["per_class"], out / "per_class.csv")
    targets = np.asarray(targets)
    frame = pd.DataFrame(probabilities, columns=labels)
    if targets.ndim == 2:
        frame.insert(0, "labels", joined_labels(labels, targets))
    else:
        confusion = pd.DataFrame(metrics["confusion"], index=labels, columns=labels)
        write_csv(confusion, out / "confusion.csv", index=True)
        write_csv(metrics["most_confused"], out / "most_confused.csv")
        frame.insert(0, "label", [labels[t] for t in targets])
    frame.insert(0, "path", list(paths))
    write_csv(frame, out / "valid_predictions.csv")


def strata(table: pd.DataFrame) -> pd.Series:
    """What folds are stratified by: each clip's label; for a multi-label table, each
    clip's first label ("" for a background clip), since nearly every combination of
    labels would be a class of its own."""
    if is_multi_label(table):
        return pd.Series([labels[0] if labels else "" for labels in clip_labels(table)])
    return table["label"].astype(str).reset_index(drop=True)


def _check_splittable(table: pd.DataFrame, n_folds: int, grouped: bool) -> None:
    """A clear error where sklearn's splitters would refuse ``n_folds`` folds."""
    if len(table) < n_folds:
        raise DatasetError(f"{len(table)} clips cannot be split into {n_folds} folds")
    counts = strata(table).value_counts()
    if counts.iloc[0] < n_folds:
        raise DatasetError(
            f"every label has fewer clips than the {n_folds} folds (the largest, "
            f"{counts.index[0]!r}, has {counts.iloc[0]}): use at most {counts.iloc[0]} folds"
        )
    groups = table["group"].nunique()
    if grouped and groups < n_folds:
        raise DatasetError(
            f"the clips come from {groups} groups (speakers or source recordings), too few "
            f"for {n_folds} folds that keep each group on one side: use at most "
            f"{max(groups, 1)} folds, or pass a validation set"
        )


def make_folds(table: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> list[np.ndarray]:
    """Validation row indices of each fold, stratified by label.

    Uses the dataset's own ``fold`` column when it has exactly ``n_folds`` folds, none
    smaller than half the mean (a warning says when they are); otherwise folds grouped
    by ``group`` (clips of one source recording or speaker never straddle a split) when
    groups exist, else plain stratified folds.
    Labels with fewer clips than folds cannot appear in every fold: a warning says
    which, and they land in the training side of the folds that lack them.
    """
    labels = strata(table).to_numpy()
    own = table["fold"]
    if own.notna().all() and own.nunique() == n_folds:
        sizes = own.value_counts().sort_index()
        # A subset of a data set (ESC-50's fold 2 with a few clips of other folds)
        # can carry fold numbers that no longer split it: a fold of 1 clip validates
        # nothing and one of 80% trains on nothing.
        if sizes.min() >= 0.5 * len(table) / n_folds:
            return [np.flatnonzero(own.to_numpy() == f) for f in sizes.index]
        warnings.warn(
            f"the data set's own {n_folds} folds are too unequal to cross-validate with "
            f"(clips per fold: {', '.join(f'{k}: {v}' for k, v in sizes.items())}); drawing "
            f"{n_folds} stratified folds instead",
            stacklevel=2,
        )
    grouped = bool(table["group"].notna().all())
    _check_splittable(table, n_folds, grouped)
    counts = pd.Series(labels).value_counts()
    rare = counts[counts < n_folds]
    if len(rare):
        warnings.warn(
            f"{len(rare)} labels have fewer clips than the {n_folds} folds "
            f"({', '.join(f'{k!r}: {v}' for k, v in rare.head(5).items())}); they are "
            "validated only in the folds that receive them and trained on in the others",
            stacklevel=2,
        )
    index = np.arange(len(table))
    with warnings.catch_warnings():
        # sklearn's own warning about small classes says less than ours above.
        warnings.filterwarnings("ignore", message="The least populated class")
        if grouped:
            splitter = StratifiedGroupKFold(n_folds, shuffle=True, random_state=seed)
            splits = splitter.split(index, labels, table["group"].astype(str).to_numpy())
        else:
            splits = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(index, labels)
        return [valid for _, valid in splits]


def holdout(
    table: pd.DataFrame, fraction: float = 0.2, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split into (train, valid) with about ``fraction`` held out, as one fold of
    :func:`make_folds` (so stratified and grouped the same way). A small dataset is
    cut into fewer parts, as many as its largest label has clips (or as there are
    groups), at least two: without groups, every label with two clips or more keeps one for
    training."""
    n_folds = max(2, round(1 / fraction))
    largest = int(strata(table).value_counts().max()) if len(table) else 0
    n_folds = max(2, min(n_folds, largest))
    if table["group"].notna().all():
        n_folds = max(2, min(n_folds, table["group"].nunique()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fewer clips than the")
        valid = make_folds(table.assign(fold=pd.NA), n_folds, seed)[0]
    rare = strata(table).value_counts()
    singles = list(rare[rare < 2].index)
    if singles:
        warnings.warn(
            f"{len(singles)} labels have a single clip ({', '.join(map(repr, singles[:5]))}); "
            "they are kept for training and cannot be validated",
            stacklevel=2,
        )
        valid = valid[~strata(table).iloc[valid].isin(singles).to_numpy()]
    mask = np.zeros(len(table), bool)
    mask[valid] = True
    return table[~mask].reset_index(drop=True), table[mask].reset_index(drop=True)


# ------------------------------------------------------------------ sound events

#: Columns of an event annotation (DCASE format), as ``evaluate --events`` reads it.
EVENT_ANNOTATION_COLUMNS = ("filename", "onset", "offset", "event_label")
#: DCASE's settings: 1-s segments; event onsets (and offsets, within 20% of the
#: event's length) matched within a 200 ms collar.
SEGMENT_SECONDS = 1.0
EVENT_COLLAR = 0.2
OFFSET_FRACTION = 0.2


def read_event_annotations(
    path: str | os.PathLike, audio_root: str | os.PathLike, labels: Sequence[str]
) -> pd.DataFrame:
    """Read a DCASE event list ``filename,onset,offset,event_label`` (one event per row;
    a file listed with an empty label and no times has no events) and check every row.

    Returns the events with ``path``: the audio file below ``audio_root``.

    Raises
    ------
    DatasetError
        Naming the CSV and each bad row (its line number in the file): a column
        missing, a time that is not a number or negative, an onset after its offset,
        a label the model does not know, an audio file that does not exist.
    """
    from .tables import read_csv

    table = read_csv(path, text=("filename", "event_label"))
    missing = [c for c in EVENT_ANNOTATION_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(
            f"{path}: no column {', '.join(missing)} (need filename,onset,offset,event_label)"
        )
    known, root = set(labels), Path(audio_root)
    problems, found = [], {}
    for number, row in enumerate(table.itertuples(index=False), start=2):  # line 1: header
        where = f"{path}, line {number}"
        name = row.filename if isinstance(row.filename, str) else ""
        if not name:
            problems.append(f"{where}: no filename")
            continue
        if name not in found:
            found[name] = (root / name).is_file()
        if not found[name]:
            problems.append(f"{where}: audio file {root / name} not found")
        label = row.event_label if isinstance(row.event_label, str) else ""
        blank = not label and all(pd.isna(v) or v == "" for v in (row.onset, row.offset))
        if blank:
            continue  # a file without events
        try:
            onset, offset = float(row.onset), float(row.offset)
        except (TypeError, ValueError):
            problems.append(f"{where}: onset {row.onset!r} / offset {row.offset!r} not numbers")
            continue
        if not (np.isfinite(onset) and np.isfinite(offset)) or onset < 0:
            problems.append(f"{where}: times must be finite and >= 0 ({onset}, {offset})")
        elif onset > offset:
            problems.append(f"{where}: onset {onset} is after offset {offset}")
        if label not in known:
            problems.append(f"{where}: label {label!r} unknown to the model")
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DatasetError("bad event annotations:\n  " + "\n  ".join(problems[:20]) + more)
    table["path"] = [str(root / name) for name in table["filename"]]
    return table


def _event_list(events: pd.DataFrame):
    """sed_eval's event list of a table with :data:`EVENT_ANNOTATION_COLUMNS`."""
    with warnings.catch_warnings():
        # dcase_util imports pkg_resources, which warns on every recent setuptools.
        warnings.simplefilter("ignore", UserWarning)
        import dcase_util

    rows = events.dropna(subset=["onset", "offset"])
    rows = rows[rows["event_label"].map(lambda v: isinstance(v, str) and v != "")]
    return dcase_util.containers.MetaDataContainer(
        [
            {
                "filename": r.filename,
                "onset": float(r.onset),
                "offset": float(r.offset),
                "event_label": r.event_label,
            }
            for r in rows.itertuples(index=False)
        ]
    )


def event_scores(
    reference: pd.DataFrame,
    estimated: pd.DataFrame,
    labels: Sequence[str],
    files: Sequence[str],
) -> dict:
    """Segment-based (1-s segments) and event-based (200 ms collar) F1 and error rate
    of estimated events against reference ones, with sed_eval (the DCASE reference
    implementation), file by file.

    Both tables have :data:`EVENT_ANNOTATION_COLUMNS`; ``files`` lists every file
    scored (those with no event in either table count too). Returns the overall
    scores and a per-class table.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import sed_eval

    segment = sed_eval.sound_event.SegmentBasedMetrics(
        event_label_list=list(labels), time_resolution=SEGMENT_SECONDS
    )
    event = sed_eval.sound_event.EventBasedMetrics(
        event_label_list=list(labels),
        t_collar=EVENT_COLLAR,
        percentage_of_length=OFFSET_FRACTION,
    )
    for name in files:
        truth = _event_list(reference[reference["filename"] == name])
        guess = _event_list(estimated[estimated["filename"] == name])
        segment.evaluate(reference_event_list=truth, estimated_event_list=guess)
        event.evaluate(reference_event_list=truth, estimated_event_list=guess)
    overall_segment, overall_event = (
        segment.results_overall_metrics(),
        event.results_overall_metrics(),
    )
    per_segment = segment.results_class_wise_metrics()
    per_event = event.results_class_wise_metrics()
    per_class = pd.DataFrame(
        [
            {
                "label": label,
                "segment_f1": per_segment[label]["f_measure"]["f_measure"],
                "segment_error_rate": per_segment[label]["error_rate"]["error_rate"],
                "event_f1": per_event[label]["f_measure"]["f_measure"],
                "event_error_rate": per_event[label]["error_rate"]["error_rate"],
                "reference_events": int(per_event[label]["count"]["Nref"]),
                "estimated_events": int(per_event[label]["count"]["Nsys"]),
            }
            for label in labels
        ]
    )
    return {
        "files": len(files),
        "segment_f1": float(overall_segment["f_measure"]["f_measure"]),
        "segment_error_rate": float(overall_segment["error_rate"]["error_rate"]),
        "event_f1": float(overall_event["f_measure"]["f_measure"]),
        "event_error_rate": float(overall_event["error_rate"]["error_rate"]),
        "per_class": per_class,
    }

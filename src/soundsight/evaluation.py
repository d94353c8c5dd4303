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
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from .layouts import DatasetError
from .tables import write_csv

#: The headline scores kept in metrics.json, model files and CV summaries.
SUMMARY = ("clips", "accuracy", "error_rate", "map3")


def map_at_k(probabilities: np.ndarray, targets: np.ndarray, k: int = 3) -> float:
    """Mean average precision at ``k`` for single-label clips (the FSDKaggle2018
    metric): 1/rank of the true label when it is in the top ``k``, else 0."""
    top = np.argsort(-probabilities, axis=1)[:, :k]
    hits = top == np.asarray(targets)[:, None]
    return float((hits / np.arange(1, k + 1)).sum(axis=1).mean())


def score(
    probabilities: np.ndarray, targets: Sequence[int] | np.ndarray, labels: Sequence[str]
) -> dict:
    """Accuracy, error rate, MAP@3, per-class precision/recall/F1, confusion matrix
    (rows true, columns predicted) and the most-confused pairs."""
    targets = np.asarray(targets)
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
    """Write :func:`score`'s results to the folder ``out``: ``metrics.json`` (the
    :data:`SUMMARY`), ``per_class.csv``, ``confusion.csv`` (true labels in rows),
    ``most_confused.csv`` and the per-clip ``valid_predictions.csv`` (``path``,
    ``label``, one probability column per label). CSVs go through
    :func:`soundsight.tables.write_csv`: read them back with
    :func:`soundsight.tables.read_csv` and labels stay the strings they were."""
    out = Path(out)
    labels = list(labels)
    write_json(out / "metrics.json", {k: metrics[k] for k in SUMMARY})
    write_csv(metrics["per_class"], out / "per_class.csv")
    confusion = pd.DataFrame(metrics["confusion"], index=labels, columns=labels)
    write_csv(confusion, out / "confusion.csv", index=True)
    write_csv(metrics["most_confused"], out / "most_confused.csv")
    frame = pd.DataFrame(probabilities, columns=labels)
    frame.insert(0, "label", [labels[t] for t in targets])
    frame.insert(0, "path", list(paths))
    write_csv(frame, out / "valid_predictions.csv")


def _check_splittable(table: pd.DataFrame, n_folds: int, grouped: bool) -> None:
    """A clear error where sklearn's splitters would refuse ``n_folds`` folds."""
    if len(table) < n_folds:
        raise DatasetError(f"{len(table)} clips cannot be split into {n_folds} folds")
    counts = table["label"].astype(str).value_counts()
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

    Uses the dataset's own ``fold`` column when it has exactly ``n_folds`` folds;
    otherwise folds grouped by ``group`` (clips of one source recording or speaker
    never straddle a split) when groups exist, else plain stratified folds.
    Labels with fewer clips than folds cannot appear in every fold: a warning says
    which, and they land in the training side of the folds that lack them.
    """
    labels = table["label"].astype(str).to_numpy()
    if table["fold"].notna().all() and table["fold"].nunique() == n_folds:
        return [
            np.flatnonzero(table["fold"].to_numpy() == f) for f in sorted(table["fold"].unique())
        ]
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
    largest = int(table["label"].astype(str).value_counts().max()) if len(table) else 0
    n_folds = max(2, min(n_folds, largest))
    if table["group"].notna().all():
        n_folds = max(2, min(n_folds, table["group"].nunique()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fewer clips than the")
        valid = make_folds(table.assign(fold=pd.NA), n_folds, seed)[0]
    rare = table["label"].astype(str).value_counts()
    singles = list(rare[rare < 2].index)
    if singles:
        warnings.warn(
            f"{len(singles)} labels have a single clip ({', '.join(map(repr, singles[:5]))}); "
            "they are kept for training and cannot be validated",
            stacklevel=2,
        )
        valid = valid[~table["label"].astype(str).iloc[valid].isin(singles).to_numpy()]
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

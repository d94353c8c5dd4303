"""Learning from the labels given in the search page: a linear head per label, and
which windows to label next.

:func:`train_heads` fits one scikit-learn logistic regression per label on the
standardised embeddings of its labelled windows ("is" against "is not", the other
labels' windows, and where those are too few a random sample of the index as
background), reports cross-validated accuracy and average precision, and scores every
window of the index (one product over the memory-mapped vectors, as a search is:
:meth:`~soundsight.search.Index.similarities` with the head's weights), kept in
``INDEX/scores.npz`` until the labels or the index change. Seconds, not minutes: no
network runs, only the head.

:func:`suggest` picks windows not yet seen for a label: ``top`` (the highest scores:
more examples), ``margin`` (the least certain, then spread out: each next pick is the
candidate farthest from those already picked, so ten picks are not ten overlapping
windows of one sound) or ``random``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .files import write_whole
from .search import Index, SearchError, check_label

SCORES = "scores.npz"
STRATEGIES = ("margin", "top", "random")
#: Background windows drawn per positive when a label has too few negatives.
BACKGROUND_PER_POSITIVE = 5
#: Candidates (per pick) the margin strategy spreads its picks over.
MARGIN_POOL = 20


@dataclass
class HeadReport:
    """One label's head: how many windows it learned from and its cross-validated
    scores (``None`` with a ``note`` when there were too few for folds)."""

    label: str
    positives: int
    negatives: int
    background: int
    folds: int
    accuracy: float | None
    average_precision: float | None
    note: str = ""


@dataclass
class Heads:
    """Every label's head and its scores over the index."""

    labels: list[str]
    reports: list[HeadReport]
    #: ``(windows, labels)`` probability that each window is each label.
    scores: np.ndarray = field(repr=False)
    #: The labels' state the heads were fitted on (see :func:`_label_state`).
    state: str = ""


def _label_state(index: Index) -> str:
    """Changes whenever a click, an undo or an added file changes what heads learn."""
    last = index.db.execute("SELECT COALESCE(MAX(id), 0), COUNT(*) FROM label_events").fetchone()
    undone = index.db.execute("SELECT COUNT(*) FROM label_events WHERE undone = 1").fetchone()
    return f"{index.count}:{last[0]}:{last[1]}:{undone[0]}"


def _examples(
    index: Index, label: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, int]:
    """Rows and targets (1: is the label) a head learns from; and how many of the
    negatives are background windows drawn at random."""
    table = index.labels()
    mine = table[table["label"] == label]
    positive = set(mine.loc[mine["verdict"] == 1, "row"])
    negative = set(mine.loc[mine["verdict"] == 0, "row"])
    negative |= set(table.loc[(table["label"] != label) & (table["verdict"] == 1), "row"])
    negative -= positive
    background = 0
    wanted = BACKGROUND_PER_POSITIVE * len(positive)
    if len(negative) < max(2, len(positive)):
        pool = np.flatnonzero(index.live())
        pool = np.setdiff1d(pool, np.fromiter(positive | negative, int))
        drawn = rng.choice(pool, size=min(len(pool), wanted), replace=False)
        background = len(drawn)
        negative |= {int(r) for r in drawn}
    rows = np.array(sorted(positive) + sorted(negative), int)
    targets = np.array([1] * len(positive) + [0] * len(negative), int)
    return rows, targets, background


def train_heads(index: Index, seed: int = 0, save: bool = True) -> Heads:
    """Fit a head per label (see the module docstring) and score the whole index."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, average_precision_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    names = index.label_names()
    if not names:
        raise SearchError(f"{index.folder}: no window is labelled yet")
    rng = np.random.default_rng(seed)
    state = _label_state(index)
    reports, columns = [], []
    vectors = index.vectors()
    for label in names:
        rows, targets, background = _examples(index, label, rng)
        positives, negatives = int(targets.sum()), int((targets == 0).sum())
        report = HeadReport(label, positives, negatives, background, 0, None, None)
        if positives == 0 or negatives == 0:
            report.note = "needs windows that are and windows that are not the label"
            reports.append(report)
            columns.append(np.full(index.count, np.nan, np.float32))
            continue
        features = index.standardised(vectors[rows])
        head = LogisticRegression(C=1.0, max_iter=2000, class_weight="balanced")
        folds = min(5, positives, negatives)
        if folds >= 2:
            # Windows overlap (a hop of half a window): neighbours of one sound can sit
            # on both sides of a fold, so these scores lean optimistic.
            splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # tiny folds: convergence chatter
                predicted = cross_val_predict(
                    head, features, targets, cv=splitter, method="predict_proba"
                )[:, 1]
            report.folds = folds
            report.accuracy = float(accuracy_score(targets, predicted >= 0.5))
            report.average_precision = float(average_precision_score(targets, predicted))
        else:
            report.note = "too few windows for cross-validation (2 of each needed)"
        head.fit(features, targets)
        # The head reads standardised unit vectors: its logit over the whole index is
        # the index's cosine product with the head's weights, plus the intercept.
        logits = index.similarities(head.coef_[0].astype(np.float32)) + float(head.intercept_[0])
        columns.append((1.0 / (1.0 + np.exp(-logits))).astype(np.float32))
        reports.append(report)
    heads = Heads(names, reports, np.stack(columns, axis=1), state)
    if save:
        _save(index, heads)
    return heads


def _save(index: Index, heads: Heads) -> None:
    record = json.dumps(
        {
            "labels": heads.labels,
            "state": heads.state,
            "reports": [r.__dict__ for r in heads.reports],
        }
    )

    def write(file) -> None:
        np.savez(file, scores=heads.scores, record=np.array(record))

    write_whole(Path(index.folder) / SCORES, write, durable=False)  # made again in seconds


def load_heads(index: Index, fit: bool = True) -> Heads | None:
    """The saved heads when they are of the current labels, else (``fit``) new ones."""
    try:
        with np.load(Path(index.folder) / SCORES) as saved:
            record = json.loads(str(saved["record"]))
            if record.get("state") == _label_state(index):
                return Heads(
                    list(record["labels"]),
                    [HeadReport(**r) for r in record["reports"]],
                    saved["scores"],
                    record["state"],
                )
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return train_heads(index) if fit else None


def reports_table(heads: Heads) -> pd.DataFrame:
    return pd.DataFrame([r.__dict__ for r in heads.reports])


def suggest(
    index: Index,
    label: object,
    count: int = 10,
    strategy: str = "margin",
    seed: int = 0,
    heads: Heads | None = None,
) -> pd.DataFrame:
    """``count`` windows to label next for ``label`` (none already clicked for it):
    ``row, file, start, end, score`` (the head's probability; NaN for ``random``
    before any head)."""
    name = check_label(label)
    if strategy not in STRATEGIES:
        raise SearchError(f"strategy must be one of {', '.join(STRATEGIES)}, not {strategy!r}")
    if count < 1:
        raise SearchError(f"count must be at least 1, got {count}")
    alive = index.live()
    alive[np.fromiter(index.seen(name), int)] = False
    candidates = np.flatnonzero(alive)
    rng = np.random.default_rng(seed)
    if strategy == "random":
        picks = rng.choice(candidates, size=min(count, len(candidates)), replace=False)
        scores = np.full(len(picks), np.nan)
        if heads is not None and name in heads.labels:
            scores = heads.scores[picks, heads.labels.index(name)]
    else:
        heads = heads or load_heads(index)
        assert heads is not None
        if name not in heads.labels:
            raise SearchError(f"no window is labelled {name!r} yet: label some first")
        column = heads.scores[:, heads.labels.index(name)]
        if np.isnan(column).all():
            raise SearchError(
                f"{name!r}: {heads.reports[heads.labels.index(name)].note}; label more first"
            )
        own = column[candidates]
        if strategy == "top":
            order = np.argsort(-own, kind="stable")[:count]
            picks = candidates[order]
        else:
            pool = candidates[np.argsort(np.abs(own - 0.5), kind="stable")[: MARGIN_POOL * count]]
            picks = _spread(index, pool, count)
        scores = column[picks]
    table = index.windows(picks)
    table["score"] = np.asarray(scores, np.float64)
    return table


def _spread(index: Index, pool: np.ndarray, count: int) -> np.ndarray:
    """Farthest-point picks from ``pool`` (ordered most uncertain first): start with the
    first, then each time the candidate least similar to every pick so far."""
    if len(pool) <= count:
        return pool
    units = index.standardised(index.vectors()[pool])
    chosen = [0]
    closest = units @ units[0]
    for _ in range(count - 1):
        closest[chosen] = np.inf
        nxt = int(np.argmin(closest))
        chosen.append(nxt)
        closest = np.maximum(closest, units @ units[nxt])
    return pool[chosen]

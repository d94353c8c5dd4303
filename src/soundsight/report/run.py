"""Reading a run folder (``train``, ``evaluate --out``) or a ``cv`` folder into typed data.

Every CSV is read with :func:`soundsight.tables.read_csv`, its label and path columns
as text: the labels ``NA``, ``null``, ``0`` and ``01`` stay the strings they are, so
they never merge into one NaN class. Any file may be missing; what is there is read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import plots
from ..features import FeatureConfig
from ..modelfile import FrozenSpec, ModelSpec, read_any_spec
from ..tables import read_csv

#: The text columns of each CSV of a run folder; the other columns are numbers.
TEXT_COLUMNS = {
    "valid_predictions.csv": ("path", "label", "labels"),
    "confusion.csv": (),  # labels in the index and the header, counts in the cells
    "per_class.csv": ("label",),
    "most_confused.csv": ("true", "predicted"),
    "top_losses.csv": ("path", "label", "predicted"),
    "tsne.csv": ("path", "label"),
    "history.csv": (),
    "lr_find.csv": (),
    "failures.csv": ("path", "reason"),
    "reliability.csv": ("side",),
}
#: The files the plots are made from: a plot is redone when one of them changes.
PLOT_INPUTS = (
    "model.safetensors",
    "valid_predictions.csv",
    "history.csv",
    "lr_find.csv",
    "reliability.csv",
)


def read_run_csv(folder: Path, name: str) -> pd.DataFrame | None:
    """One CSV of a run folder (see :data:`TEXT_COLUMNS`), or None when it is missing
    or empty. ``confusion.csv`` comes back with the true labels as its index."""
    path = folder / name
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        index_col = 0 if name == "confusion.csv" else None
        return read_csv(path, text=TEXT_COLUMNS[name], index_col=index_col)
    except pd.errors.EmptyDataError:
        return None


@dataclass
class RunData:
    """The files of one run folder, read (any of them may be missing).

    Attributes
    ----------
    folder : Path
        The run folder.
    spec : ModelSpec or None
        The model file's validated record (:func:`~soundsight.modelfile.read_any_spec`),
        None without a model file or with a frozen one.
    frozen : FrozenSpec or None
        A frozen-embedding (or late-fusion) model file's record instead: its parts,
        licences and fusion weight (no recipe, temperature or thresholds).
    labels : list of str
        The classes, in the model's order.
    features : FeatureConfig or None
        The log-mel settings the model was trained on (a fused network's; None for a
        frozen head, whose parts each have their own front end).
    history, predictions, per_class, most_confused, top_losses, lr_find, failures
        The run's CSVs as frames (None when absent).
    confusion : ndarray or None
        Confusion counts, rows true and columns predicted (from ``confusion.csv``, else
        from the predictions).
    metrics : dict
        ``metrics.json`` (else the model file's copy).
    reliability : DataFrame or None
        The reliability diagram's bins before and after temperature scaling
        (``reliability.csv``, see :func:`soundsight.calibration.reliability`).
    multi_label : bool
        A multi-label model's run (its predictions have ``labels``, not ``label``):
        no confusion matrix, per-class average precision and precision-recall curves.
    """

    folder: Path
    spec: ModelSpec | None = None
    frozen: FrozenSpec | None = None
    labels: list[str] = field(default_factory=list)
    features: FeatureConfig | None = None
    history: pd.DataFrame | None = None
    predictions: pd.DataFrame | None = None
    confusion: np.ndarray | None = None
    per_class: pd.DataFrame | None = None
    most_confused: pd.DataFrame | None = None
    top_losses: pd.DataFrame | None = None
    lr_find: pd.DataFrame | None = None
    metrics: dict = field(default_factory=dict)
    failures: pd.DataFrame | None = None
    reliability: pd.DataFrame | None = None
    multi_label: bool = False

    @property
    def model_path(self) -> Path:
        """Where the run's model file is (it may not exist)."""
        return self.folder / "model.safetensors"

    @classmethod
    def load(cls, folder: str | os.PathLike) -> RunData:
        """Read the run folder ``folder``; FileNotFoundError when it is not one."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: run folder not found")
        run = cls(folder)
        record = read_any_spec(run.model_path) if run.model_path.is_file() else None
        if isinstance(record, FrozenSpec):  # the header alone: no tensors read
            run.frozen = record
            run.features = record.network.features if record.network else None
        elif record is not None:
            run.spec, run.features = record, record.features
        run.predictions = read_run_csv(folder, "valid_predictions.csv")
        if run.predictions is not None:
            run.labels = list(run.predictions.columns[2:])
        else:
            run.labels = list(record.labels) if record else []
        run.multi_label = (
            record.multi_label
            if record is not None
            else run.predictions is not None and "labels" in run.predictions
        )
        confusion = read_run_csv(folder, "confusion.csv")
        if confusion is not None:
            run.confusion = confusion.to_numpy()
        elif run.predictions is not None and not run.multi_label:
            run.confusion = plots.confusion_from_predictions(run.predictions, run.labels)
        run.history = read_run_csv(folder, "history.csv")
        run.per_class = read_run_csv(folder, "per_class.csv")
        run.most_confused = read_run_csv(folder, "most_confused.csv")
        run.top_losses = read_run_csv(folder, "top_losses.csv")
        run.lr_find = read_run_csv(folder, "lr_find.csv")
        run.failures = read_run_csv(folder, "failures.csv")
        run.reliability = read_run_csv(folder, "reliability.csv")
        if (folder / "metrics.json").is_file():
            run.metrics = json.loads((folder / "metrics.json").read_text())
        else:
            run.metrics = dict(record.metrics) if record else {}
        return run

    def inputs(self) -> dict[str, float]:
        """Modification times of the files the plots are made from."""
        return {
            name: (self.folder / name).stat().st_mtime
            for name in PLOT_INPUTS
            if (self.folder / name).is_file()
        }


def steps_per_epoch_from_checkpoints(folder: Path, train: dict) -> dict[int, int] | None:
    """Optimiser steps per epoch of each stage, from the stages' last checkpoints.

    Parameters
    ----------
    folder : Path
        The run folder (``checkpoints/stage{1,2}/last.ckpt``).
    train : dict
        The model file's training recipe (epochs per stage).

    Returns
    -------
    dict or None
        ``{stage: steps}`` (each checkpoint's OneCycleLR ``total_steps`` over the
        stage's epochs); None when a stage's checkpoint is missing or unreadable.
    """
    steps = {}
    for stage, key in ((1, "stage1_epochs"), (2, "stage2_epochs")):
        epochs = int(train.get(key, 0))
        if epochs <= 0:
            continue
        path = folder / "checkpoints" / f"stage{stage}" / "last.ckpt"
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            total = int(state["lr_schedulers"][0]["total_steps"])
        except Exception:  # noqa: BLE001 - any unreadable checkpoint: fall back
            return None
        steps[stage] = max(1, total // epochs)
    return steps or None


def is_cv_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is a ``cv`` output folder: ``cv.json`` and ``fold*/`` runs."""
    folder = Path(folder)
    return (folder / "cv.json").is_file() and any(folder.glob("fold*/"))


def cv_folds(folder: Path) -> list[Path]:
    """The ``fold<k>/`` run folders of a ``cv`` folder, by fold number."""
    folds = [p for p in folder.glob("fold*") if p.is_dir() and p.name[4:].isdigit()]
    return sorted(folds, key=lambda p: int(p.name[4:]))


@dataclass
class CVData:
    """A ``cv`` folder: its fold runs and ``cv.json``'s scores.

    Attributes
    ----------
    folder : Path
        The ``cv`` folder.
    folds : list of Path
        Its run folders, by fold number.
    scores : DataFrame
        One row of scores per fold (``fold``, ``accuracy``, ``map3``, ...).
    mean, std : dict
        The scores' mean and standard deviation over the folds.
    """

    folder: Path
    folds: list[Path]
    scores: pd.DataFrame
    mean: dict
    std: dict

    @classmethod
    def load(cls, folder: str | os.PathLike) -> CVData:
        """Read the ``cv`` folder ``folder`` (see :func:`is_cv_folder`)."""
        folder = Path(folder)
        summary = json.loads((folder / "cv.json").read_text())
        scores = pd.DataFrame(summary["folds"])
        return cls(folder, cv_folds(folder), scores, summary["mean"], summary["std"])

"""Assembling a run's figures from its data and saving them as PNGs in the run folder.

:func:`run_figures` yields the plots a run folder has the data for; :func:`plot_run`
saves them (and ``top_losses.csv``, ``tsne.csv``, ``plots.json``) for a run or for each
fold of a ``cv`` folder; :func:`batch_figure` and :func:`show_batch` draw a dataset's
clips (``show-batch``). The drawing itself is :mod:`soundsight.plots`'.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .. import plots
from ..errors import ConfigError
from ..features import FeatureConfig
from ..files import write_whole
from ..tables import write_csv
from .inference import LogMels, clip_embeddings, frozen_embeddings
from .run import CVData, RunData, is_cv_folder, steps_per_epoch_from_checkpoints

#: PNGs of a run folder, in report order.
RUN_PLOTS = (
    "history",
    "lr_schedule",
    "lr_find",
    "confusion",
    "per_class",
    "average_precision",
    "pr_curves",
    "reliability",
    "top_losses",
    "tsne",
    "tsne_thumbnails",
)
#: Plots of a multi-label run only, and of a single-label run only.
MULTI_LABEL_PLOTS = {"average_precision", "pr_curves"}
SINGLE_LABEL_PLOTS = {"confusion", "reliability"}
#: The plots drawn from the clips themselves (log-mels, embeddings).
TSNE_PLOTS = {"tsne", "tsne_thumbnails"}
CLIP_PLOTS = {"top_losses"} | TSNE_PLOTS
#: Validation clips shown in the top-losses figure (and playable in the report).
TOP_LOSSES = 12
#: Most clips in the t-SNE plots (a stratified sample beyond), and most thumbnails.
MAX_TSNE_CLIPS = 2000
MAX_THUMBNAILS = 600
#: Thumbnail side in pixels on the t-SNE canvas.
THUMBNAIL = 40
#: Fewest clips worth a t-SNE picture.
MIN_TSNE_CLIPS = 5
#: PNG resolution.
DPI = 110
#: Steps per epoch drawn when the checkpoints that know them are gone.
DEFAULT_STEPS = 100


class _Progress:
    """Prints each step done and the seconds since the start, when asked to."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.started = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            print(f"  {message} ({time.perf_counter() - self.started:.1f} s)", flush=True)


def _sample(frame: pd.DataFrame, limit: int, seed: int = 0) -> pd.DataFrame:
    """At most ``limit`` rows, every label represented in proportion."""
    if len(frame) <= limit:
        return frame
    fraction = limit / len(frame)
    parts = [
        group.sample(max(1, round(len(group) * fraction)), random_state=seed)
        for _, group in frame.groupby("label", sort=True)
    ]
    return pd.concat(parts).sort_index()


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def _lr_schedule_figure(run: RunData, data: dict) -> Figure | None:
    """The one-cycle schedule the run trained with (``data["lr_schedule"]``)."""
    train = run.spec.train if run.spec else {}
    steps = steps_per_epoch_from_checkpoints(run.folder, train)
    if steps is None:
        steps = {1: DEFAULT_STEPS, 2: DEFAULT_STEPS}
        note = f"steps per epoch unknown (no checkpoints): drawn at {DEFAULT_STEPS} per epoch"
    else:
        note = ", ".join(f"stage {s}: {n} steps/epoch" for s, n in steps.items())
    schedule = plots.lr_schedule(train, steps)
    data["lr_schedule"] = schedule
    return plots.plot_lr_schedule(schedule, note) if len(schedule) else None


def _training_figures(
    run: RunData, wanted: set[str], data: dict, say: _Progress
) -> Iterator[tuple[str, Figure]]:
    """History, learning-rate schedule and LR finder plots."""
    if "history" in wanted and run.history is not None and len(run.history):
        yield "history", plots.plot_history(run.history)
        say("history")
    if "lr_schedule" in wanted and run.spec is not None and run.spec.train:
        figure = _lr_schedule_figure(run, data)
        if figure is not None:
            yield "lr_schedule", figure
            say("learning-rate schedule")
    if "lr_find" in wanted and run.lr_find is not None:
        frame = run.lr_find
        suggestion = frame["suggestion"].dropna().iloc[0] if "suggestion" in frame else None
        yield "lr_find", plots.plot_lr_find(frame["lr"], frame["loss"], suggestion)


def _error_figures(run: RunData, wanted: set[str], say: _Progress) -> Iterator[tuple[str, Figure]]:
    """Confusion matrix and per-class scores."""
    if "confusion" in wanted and run.confusion is not None and len(run.labels):
        yield "confusion", plots.plot_confusion(run.confusion, run.labels)
        say("confusion matrix")
    if "per_class" in wanted and run.per_class is not None and len(run.per_class):
        yield "per_class", plots.plot_per_class(run.per_class)
        say("per-class scores")
    if run.multi_label and "average_precision" in wanted and run.per_class is not None:
        yield "average_precision", plots.plot_average_precision(run.per_class)
        say("average precision per class")
    if run.multi_label and "pr_curves" in wanted and run.predictions is not None:
        truth = plots.multi_label_truth(run.predictions, run.labels)
        scores = run.predictions[run.labels].to_numpy(float)
        yield "pr_curves", plots.plot_pr_curves(truth, scores, run.labels, _thresholds(run))
        say("precision-recall curves")
    if "reliability" in wanted and run.reliability is not None and len(run.reliability):
        yield "reliability", plot_reliability(run.reliability, run.spec)
        say("reliability diagram")


def _thresholds(run: RunData) -> tuple[float, ...] | None:
    """A multi-label run's per-class thresholds (from its model file), if known."""
    return run.spec.thresholds if run.spec is not None and run.spec.thresholds else None


def plot_reliability(table: pd.DataFrame, spec=None) -> Figure:
    """The reliability diagram: accuracy against mean top probability per confidence
    bin, before and after temperature scaling (``reliability.csv``), the diagonal
    being perfect calibration; the legend gives each side's ECE."""
    from ..calibration import expected_calibration_error_of_bins

    figure = Figure(figsize=(5.2, 4.6))
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect")
    temperature = spec.temperature if spec is not None else 1.0
    for side, colour in (("before", "#D55E00"), ("after", "#0072B2")):
        bins = table[(table["side"] == side) & (table["clips"] > 0)]
        if not len(bins):
            continue
        ece = expected_calibration_error_of_bins(bins)
        name = "before (T = 1)" if side == "before" else f"after (T = {temperature:.2f})"
        axes.plot(
            bins["confidence"],
            bins["accuracy"],
            marker="o",
            color=colour,
            label=f"{name}: ECE {ece:.3f}",
        )
    axes.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="top probability (mean per bin)",
        ylabel="accuracy in the bin",
        title="Reliability on the validation clips (15 bins)",
    )
    axes.legend(loc="upper left", fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def _embedded_clips(
    run: RunData, log_mels: LogMels, cache: str | os.PathLike | None, say: _Progress
) -> tuple[pd.DataFrame, list[np.ndarray]] | None:
    """The validation clips (a stratified sample) with their t-SNE positions ``x``,
    ``y`` and spectrogram thumbnails; None when too few clips for a picture. A frozen
    model's embeddings are its parts' (``cache``: where they are kept)."""
    from ..prediction import Classifier

    assert run.predictions is not None  # run_figures checked it
    # A multi-label run's clips are coloured by their label list ("dog;rain").
    given = "labels" if run.multi_label else "label"
    clips = _sample(
        run.predictions[["path", given]].rename(columns={given: "label"}), MAX_TSNE_CLIPS
    )
    if len(clips) < MIN_TSNE_CLIPS:
        return None
    thumbnails, kept, dbs = [], [], []
    for i, path in enumerate(clips["path"]):
        db = log_mels(path)
        if db is None:
            continue
        dbs.append(db)
        kept.append(i)
        image = plots.colorize(db, log_mels.features.floor_db, plots.SPECTROGRAM_CMAP)
        thumbnails.append(_resize(image, THUMBNAIL))
    clips = clips.iloc[kept].reset_index(drop=True)
    say(f"{len(clips)} log-mels")
    if run.frozen is not None:
        embeddings, embedded = frozen_embeddings(run.model_path, list(clips["path"]), cache)
        clips = clips.iloc[embedded].reset_index(drop=True)
        thumbnails = [thumbnails[i] for i in embedded]
    else:
        embeddings = clip_embeddings(Classifier.load(run.model_path), dbs)
    del dbs
    say(f"embeddings {embeddings.shape}")
    positions = plots.tsne_positions(embeddings)
    say("t-SNE")
    return clips.assign(x=positions[:, 0], y=positions[:, 1]), thumbnails


def _tsne_figures(
    run: RunData,
    log_mels: LogMels,
    cache: str | os.PathLike | None,
    wanted: set[str],
    data: dict,
    say: _Progress,
) -> Iterator[tuple[str, Figure]]:
    """t-SNE of the clips' embeddings, as points and as thumbnails (``data["tsne"]``)."""
    embedded = _embedded_clips(run, log_mels, cache, say)
    if embedded is None:
        return
    tsne, thumbnails = embedded
    data["tsne"] = tsne
    positions = tsne[["x", "y"]].to_numpy()
    labels = tsne["label"].astype(str).tolist()
    if "tsne" in wanted:
        yield "tsne", plots.plot_tsne(None, labels, positions)
    if "tsne_thumbnails" in wanted:
        shown = _sample(tsne, MAX_THUMBNAILS).index.to_numpy()
        yield (
            "tsne_thumbnails",
            plots.plot_tsne_thumbnails(
                positions[shown], [thumbnails[i] for i in shown], [labels[i] for i in shown]
            ),
        )
    say("t-SNE plots")


def run_figures(
    run_dir: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    top: int = TOP_LOSSES,
    progress: bool = False,
    data: dict | None = None,
) -> Iterator[tuple[str, Figure]]:
    """Yield ``(name, figure)`` for each plot a run folder has the data for.

    Parameters
    ----------
    run_dir : path-like
        A run folder (``train`` or ``evaluate --out``).
    cache : path-like, optional
        The feature cache the clips' log-mels are read from (else decoded).
    names : sequence of str, optional
        Which plots (see :data:`RUN_PLOTS`); all by default.
    top : int
        Clips in the top-losses plot.
    progress : bool
        Print each plot as it is made.
    data : dict, optional
        Receives the data behind the plots (``top_losses`` frame, ``tsne`` frame,
        ``lr_schedule``).

    Embeddings need the model file and the clips.
    """
    run = RunData.load(run_dir)
    wanted = set(names or RUN_PLOTS)
    data = {} if data is None else data
    say = _Progress(progress)
    yield from _training_figures(run, wanted, data, say)
    yield from _error_figures(run, wanted, say)
    if not wanted & CLIP_PLOTS or run.predictions is None or not len(run.predictions):
        return
    features = run.features or FeatureConfig()
    log_mels = LogMels(features, cache)
    if "top_losses" in wanted:
        losses = plots.top_losses(run.predictions, run.labels, top, _thresholds(run))
        data["top_losses"] = losses
        spectrograms = [log_mels(p) for p in losses["path"]]
        yield (
            "top_losses",
            plots.plot_top_losses(losses, spectrograms, features, multi_label=run.multi_label),
        )
        say("top losses")
    if wanted & TSNE_PLOTS and run.model_path.is_file():
        yield from _tsne_figures(run, log_mels, cache, wanted, data, say)


def figures(
    run_dir: str | os.PathLike, cache: str | os.PathLike | None = None, **options
) -> dict[str, Figure]:
    """Every plot of a run folder as matplotlib figures, by name (for notebooks).

    ``options`` are :func:`run_figures`'.
    """
    return dict(run_figures(run_dir, cache, **options))


def _save(figure: Figure, path: Path) -> Path:
    write_whole(path, lambda file: figure.savefig(file, format="png", dpi=DPI, facecolor="white"))
    figure.clear()
    return path


def _plot_one_run(folder: Path, cache, progress: bool) -> list[Path]:
    """Save the plots of one run folder, their data and ``plots.json``."""
    data: dict = {}
    written = []
    for name, figure in run_figures(folder, cache, progress=progress, data=data):
        written.append(_save(figure, folder / f"{name}.png"))
    for name in ("top_losses", "tsne"):
        if name in data:
            write_csv(data[name], folder / f"{name}.csv")
    if (folder / "lr_find.png").is_file() and folder / "lr_find.png" not in written:
        written.append(folder / "lr_find.png")  # training's own
    manifest = {
        "plots": [p.name for p in written],
        "inputs": RunData.load(folder).inputs(),
        "made": datetime.now().isoformat(timespec="seconds"),
    }
    write_whole(
        folder / "plots.json", lambda file: file.write(json.dumps(manifest, indent=2).encode())
    )
    return written


def plots_are_current(folder: str | os.PathLike) -> bool:
    """Whether ``plots.json`` exists, its PNGs too, and no input changed since."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "plots.json").read_text())
    except (OSError, ValueError):
        return False
    if not all((folder / name).is_file() for name in manifest.get("plots", [])):
        return False
    return manifest.get("inputs") == RunData.load(folder).inputs()


def plot_run(
    run_dir: str | os.PathLike, cache: str | os.PathLike | None = None, progress: bool = False
) -> list[Path]:
    """Write the interpretation PNGs of a run folder and return their paths.

    Parameters
    ----------
    run_dir : path-like
        A run folder, or a ``cv`` folder: then each ``fold*/`` run whose plots are
        missing or older than its results is plotted, and ``cv_summary.png`` (scores
        per fold) is written beside ``cv.json``.
    cache : path-like, optional
        The feature cache (default: training's); clips not in it are decoded.
    progress : bool
        Print what is being plotted.

    Safe to call again: files are replaced atomically.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: run folder not found")
    if not is_cv_folder(folder):
        if progress:
            print(f"plotting {folder}", flush=True)
        return _plot_one_run(folder, cache, progress)
    cv = CVData.load(folder)
    written: list[Path] = []
    for fold in cv.folds:
        if plots_are_current(fold):
            manifest = json.loads((fold / "plots.json").read_text())
            written.extend(fold / name for name in manifest["plots"])
        else:
            if progress:
                print(f"plotting {fold}", flush=True)
            written.extend(_plot_one_run(fold, cache, progress))
    written.append(_save(plots.plot_cv_summary(cv.scores), folder / "cv_summary.png"))
    return written


def batch_figure(
    clips: pd.DataFrame,
    features: FeatureConfig | None = None,
    n: int = 16,
    cols: int | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    names: bool = False,
) -> Figure:
    """A grid of ``n`` random clips' log-mels with their labels (``show-batch``).

    Parameters
    ----------
    clips : DataFrame
        A dataset table (:func:`soundsight.load_dataset`); clips that cannot be
        decoded are skipped.
    features : FeatureConfig, optional
        The log-mel settings (default: the defaults).
    n, cols, seed : int
        Clips shown, grid columns, and the seed of the random sample.
    cache : path-like, optional
        Feature cache the log-mels are read from when there (else computed).
    names : bool
        Show each clip's file name under its label.
    """
    features = features or FeatureConfig()
    if not len(clips):
        raise ConfigError("the dataset has no clips")
    sample = clips.sample(min(n, len(clips)), random_state=seed)
    sample = sample.assign(label=sample["label"].astype("string").fillna("(no label)"))
    sample = sample.sort_values(["label", "path"])
    log_mels = LogMels(features, cache)
    shown, labels, files = [], [], []
    for path, label in zip(sample["path"], sample["label"], strict=True):
        db = log_mels(path)
        if db is not None:
            shown.append(db)
            labels.append(str(label))
            files.append(Path(path).name)
    if not shown:
        raise ConfigError("none of the sampled clips could be decoded")
    return plots.plot_batch(
        shown,
        labels,
        features,
        names=files if names else None,
        cols=cols,
        title=f"{len(shown)} random clips of {len(clips)}: log-mel spectrograms with their labels",
    )


def show_batch(
    clips: pd.DataFrame,
    out: str | os.PathLike,
    features: FeatureConfig | None = None,
    **options,
) -> Path:
    """Write :func:`batch_figure` as a PNG at ``out`` and return its path.

    ``options`` are :func:`batch_figure`'s.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(batch_figure(clips, features, **options), out)

"""Interpretation plots: what a run learned, as matplotlib figures.

Two kinds of function live here, kept apart so the data behind every picture can be
tested on its own:

* data helpers (:func:`history_frame`, :func:`lr_schedule`, :func:`confusion_order`,
  :func:`top_losses`, :func:`tsne_positions`, :func:`thumbnail_canvas`, ...) take
  frames and arrays and return frames and arrays;
* ``plot_*`` functions take the same data and return a :class:`matplotlib.figure.Figure`
  (made without pyplot, so nothing global is kept alive and any backend works; a
  notebook displays the returned figure, :meth:`Figure.savefig` writes it).

Colours are chosen for colour-blind readers: spectrograms use ``magma`` and matrices
``cividis`` (perceptually uniform sequential maps), categories use the Okabe-Ito
palette, and where categories outnumber its 8 colours they also differ in marker shape
and are labelled in place. Every plot has a title and labelled, unit-bearing axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import cast

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import patheffects
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from . import schedule
from .errors import ConfigError
from .features import FeatureConfig, colorize

#: Okabe & Ito's palette, distinguishable with the common colour-vision deficiencies.
OKABE_ITO = (
    "#0072B2",  # blue
    "#E69F00",  # orange
    "#009E73",  # bluish green
    "#D55E00",  # vermillion
    "#CC79A7",  # reddish purple
    "#56B4E9",  # sky blue
    "#F0E442",  # yellow
    "#000000",  # black
)
#: Marker shapes that tell apart categories sharing a colour.
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
#: Sequential maps, perceptually uniform and colour-blind safe.
SPECTROGRAM_CMAP = "magma"
MATRIX_CMAP = "cividis"
#: Floor on probabilities before the log, as the training loop's validation loss.
MIN_PROBABILITY = 1e-8


# ----------------------------------------------------------------------------- data


def label_styles(labels: Sequence[str]) -> dict[str, tuple[str, str]]:
    """A distinct (colour, marker) pair per label: Okabe-Ito colours first, then the
    same colours with the next marker shape (80 distinct pairs)."""
    styles = {}
    for i, label in enumerate(labels):
        colour = OKABE_ITO[i % len(OKABE_ITO)]
        marker = MARKERS[(i // len(OKABE_ITO)) % len(MARKERS)]
        styles[label] = (colour, marker)
    return styles


def history_frame(history: pd.DataFrame | Sequence[Mapping]) -> pd.DataFrame:
    """``history.csv`` rows in training order with a running ``position`` (1, 2, ...
    over both stages) and error rate in percent."""
    frame = pd.DataFrame(history).copy()
    for column in ("stage", "epoch"):
        frame[column] = pd.to_numeric(frame[column]).astype(int)
    for column in ("train_loss", "valid_loss", "error_rate", "seconds"):
        if column in frame:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame = frame.sort_values(["stage", "epoch"]).reset_index(drop=True)
    frame["position"] = np.arange(1, len(frame) + 1)
    frame["error_percent"] = 100.0 * frame["error_rate"]
    return frame


def steps_per_epoch(train_clips: int, batch_size: int) -> int:
    """Optimiser steps per epoch of the training loader (it drops the last partial
    batch whenever there is more than one batch)."""
    if train_clips <= batch_size:
        return 1
    return train_clips // batch_size


def lr_schedule(train: Mapping, steps: int | Mapping[int, int]) -> pd.DataFrame:
    """The learning rates a run trained with, step by step.

    Parameters
    ----------
    train : mapping
        The run's ``TrainConfig`` as a dict (the model file's ``train`` entry; after
        ``--lr auto`` it holds the LR finder's rate).
    steps : int or {stage: int}
        Optimiser steps per epoch (the same for both stages, or per stage).

    Returns
    -------
    DataFrame
        ``stage``, ``step`` (within the stage), ``epoch`` (fractional position over
        both stages, 0 at the start of training), ``head_lr`` and ``body_lr`` (NaN in
        stage 1, where the body is frozen).
    """
    frames, offset = [], 0.0
    for stage, epochs in ((1, int(train["stage1_epochs"])), (2, int(train["stage2_epochs"]))):
        if epochs <= 0:
            continue
        per_epoch = max(1, int(steps[stage] if isinstance(steps, Mapping) else steps))
        head = train.get("stage2_lr") if stage == 2 else None  # None: the stage-1 rate
        peaks = [train["lr"] if head is None else head]
        peaks += [train["body_lr"]] if stage == 2 else []
        rates = schedule.one_cycle(peaks, epochs * per_epoch)
        index = np.arange(len(rates))
        frames.append(
            pd.DataFrame(
                {
                    "stage": stage,
                    "step": index + 1,
                    "epoch": offset + index / per_epoch,
                    "head_lr": rates[:, 0],
                    "body_lr": rates[:, 1] if stage == 2 else np.nan,
                }
            )
        )
        offset += epochs
    columns = ["stage", "step", "epoch", "head_lr", "body_lr"]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def normalised_confusion(confusion: np.ndarray) -> np.ndarray:
    """Rows divided by their sums (the fraction of each true class's clips given each
    prediction); rows of classes without clips stay zero."""
    from sklearn.preprocessing import normalize

    # The counts are already tallied (confusion.csv), so scikit-learn's row (L1)
    # normalisation applies, not confusion_matrix(normalize="true"), which tallies.
    return normalize(np.asarray(confusion, dtype=float), norm="l1", axis=1)


def confusion_order(confusion: np.ndarray, order: str = "recall") -> np.ndarray:
    """Class order for display.

    ``"recall"``: best-recognised classes first (diagonal of the normalised matrix
    non-increasing; ties keep label order). ``"cluster"``: hierarchical clustering of
    the symmetrised confusion, so classes mistaken for each other sit side by side and
    show as blocks near the diagonal. ``"label"``: as given.
    """
    n = len(confusion)
    if order == "label" or n < 3:
        return np.arange(n)
    rates = normalised_confusion(confusion)
    if order == "recall":
        return np.argsort(-np.diag(rates), kind="stable")
    if order == "cluster":
        from scipy.cluster.hierarchy import leaves_list, linkage
        from scipy.spatial.distance import squareform

        similarity = (rates + rates.T) / 2
        distance = 1.0 - similarity / max(similarity.max(), 1e-12)
        np.fill_diagonal(distance, 0.0)
        tree = linkage(squareform(distance, checks=False), "average", optimal_ordering=True)
        return leaves_list(tree)
    raise ConfigError(f"unknown order {order!r}; choose recall, cluster or label")


def confusion_from_predictions(predictions: pd.DataFrame, labels: Sequence[str]) -> np.ndarray:
    """Confusion counts (rows true, columns predicted) from ``valid_predictions.csv``."""
    from sklearn.metrics import confusion_matrix

    labels = list(labels)
    if not len(predictions):  # scikit-learn refuses to tally nothing
        return np.zeros((len(labels), len(labels)), dtype=int)
    predicted = np.asarray(labels, dtype=object)[predictions[labels].to_numpy().argmax(axis=1)]
    true = predictions["label"].astype(str).to_numpy(dtype=object)
    return confusion_matrix(true, predicted, labels=labels)


def multi_label_truth(predictions: pd.DataFrame, labels: Sequence[str]) -> np.ndarray:
    """The 0/1 matrix (clips x labels) of a multi-label ``valid_predictions.csv``'s
    ``labels`` column ("dog;rain"; empty: no label)."""
    from .layouts import LABEL_JOIN, multi_hot

    index = {label: i for i, label in enumerate(labels)}
    cells = predictions["labels"].fillna("").astype(str)
    return multi_hot([tuple(filter(None, c.split(LABEL_JOIN))) for c in cells], index)


def top_losses(
    predictions: pd.DataFrame,
    labels: Sequence[str],
    n: int = 12,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> pd.DataFrame:
    """The ``n`` validation clips with the largest loss, largest first.

    ``predictions`` is ``valid_predictions.csv`` (``path``, ``label``, one probability
    column per label). Returns ``path``, ``label``, ``predicted``, ``p_predicted``,
    ``p_true`` and ``loss`` = -ln p(true label) (probabilities floored at 1e-8, as the
    validation loss in training).

    A multi-label model's predictions (``labels`` in place of ``label``): ``label``
    and ``predicted`` are label lists joined by ``;`` (in label order; predicted: at
    or above each label's ``thresholds``, default 0.5), ``p_predicted`` the top
    probability, ``p_true`` the lowest of the true labels' (NaN for a clip without
    labels), and ``loss`` the binary cross-entropy averaged over the labels (as the
    validation loss in training).
    """
    from .evaluation import DEFAULT_THRESHOLD, joined_labels

    labels = list(labels)
    probabilities = predictions[labels].to_numpy(dtype=float)
    rows = np.arange(len(predictions))
    if "labels" in predictions:
        truth = multi_label_truth(predictions, labels) > 0
        cuts = np.asarray(DEFAULT_THRESHOLD if thresholds is None else thresholds, float)
        clipped = np.clip(probabilities, MIN_PROBABILITY, 1 - MIN_PROBABILITY)
        bce = -np.where(truth, np.log(clipped), np.log(1 - clipped)).mean(axis=1)
        frame = pd.DataFrame(
            {
                "path": predictions["path"].to_numpy(),
                "label": joined_labels(labels, truth),
                "predicted": joined_labels(labels, probabilities >= cuts),
                "p_predicted": probabilities.max(axis=1) if len(rows) else [],
                "p_true": np.where(truth, probabilities, np.inf).min(axis=1, initial=np.inf),
                "loss": bce,
            }
        ).replace({"p_true": {np.inf: np.nan}})
        frame = frame.sort_values("loss", ascending=False, kind="stable").head(n)
        return frame.reset_index(drop=True)
    index = {label: i for i, label in enumerate(labels)}
    true = predictions["label"].astype(str).map(index).to_numpy()
    p_true = probabilities[rows, true]
    predicted = probabilities.argmax(axis=1)
    frame = pd.DataFrame(
        {
            "path": predictions["path"].to_numpy(),
            "label": predictions["label"].astype(str).to_numpy(),
            "predicted": [labels[i] for i in predicted],
            "p_predicted": probabilities[rows, predicted],
            "p_true": p_true,
            "loss": -np.log(np.maximum(p_true, MIN_PROBABILITY)),
        }
    )
    frame = frame.sort_values("loss", ascending=False, kind="stable").head(n)
    return frame.reset_index(drop=True)


def tsne_positions(
    embeddings: np.ndarray, seed: int = 0, perplexity: float | None = None
) -> np.ndarray:
    """2-D t-SNE positions ``(clips, 2)`` of embeddings (scikit-learn, Barnes-Hut,
    PCA-initialised; above 50 dimensions, on the first 50 principal components)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    x = np.asarray(embeddings, dtype=np.float32)
    n = len(x)
    if n < 4:
        raise ConfigError(f"t-SNE needs at least 4 clips, got {n}")
    if x.shape[1] > 50 and n > 50:
        x = PCA(50, random_state=seed).fit_transform(x)
    perplexity = perplexity or float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, learning_rate="auto")
    # One thread: scikit-learn's Barnes-Hut t-SNE spins its OpenMP threads, and on a
    # busy 2-core machine that took 35 s for 60 points instead of 0.15 s.
    with threadpool_limits(1):
        return tsne.fit_transform(x).astype(np.float64)


def thumbnail_canvas(
    positions: np.ndarray,
    images: Sequence[np.ndarray],
    size: int = 1600,
    borders: Sequence[str] | None = None,
    border: int = 2,
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Paste RGB thumbnails onto a white ``size`` x ``size`` canvas, each centred at
    its 2-D position (later ones on top).

    Returns the canvas (uint8 RGB) and its extent ``(left, right, bottom, top)`` in
    the positions' units, for ``imshow(canvas, extent=...)``.
    """
    positions = np.asarray(positions, dtype=float)
    canvas = np.full((size, size, 3), 255, np.uint8)
    if not len(positions):
        return canvas, (0.0, 1.0, 0.0, 1.0)
    height, width = images[0].shape[:2]
    lo, hi = positions.min(axis=0), positions.max(axis=0)
    span = np.maximum(hi - lo, 1e-9)
    # Thumbnails must fit: the data range maps to the canvas less half a thumbnail.
    usable = np.array([size - width - 2 * border, size - height - 2 * border], dtype=float)
    scale = usable / span
    for i, (x, y) in enumerate(positions):
        left = int(round((x - lo[0]) * scale[0])) + border
        top = int(round((hi[1] - y) * scale[1])) + border
        image = np.asarray(images[i], np.uint8)[..., :3]
        if borders is not None:
            colour = np.array(matplotlib.colors.to_rgb(borders[i])) * 255
            canvas[top - border : top + height + border, left - border : left + width + border] = (
                colour
            )
        canvas[top : top + height, left : left + width] = image
    # Canvas pixel p (left edge of the first thumbnail's centre) back to data units.
    centre = (np.array([width, height]) / 2 + border) / scale
    per_pixel = 1 / scale
    extent = (
        lo[0] - centre[0],
        lo[0] - centre[0] + size * per_pixel[0],
        hi[1] + centre[1] - size * per_pixel[1],
        hi[1] + centre[1],
    )
    return canvas, extent


def mel_ticks(features: FeatureConfig, n_mels: int | None = None) -> tuple[list[float], list[str]]:
    """Positions (in mel bands, 0 at the bottom) and labels of round frequencies."""
    import librosa

    n_mels = n_mels or features.n_mels
    top = features.fmax or features.sample_rate / 2
    centres = librosa.mel_frequencies(n_mels=n_mels, fmin=features.fmin, fmax=top)
    positions: list[float] = []
    names: list[str] = []
    for hz in (50, 100, 200, 500, 1000, 2000, 4000, 8000, 16000):
        if centres[0] <= hz <= centres[-1]:
            position = float(np.interp(hz, centres, np.arange(n_mels))) + 0.5
            if positions and position - positions[-1] < 0.08 * n_mels:
                continue  # too close to the previous tick to read
            positions.append(position)
            names.append(f"{hz // 1000}k" if hz >= 1000 else str(hz))
    return positions, names


# ---------------------------------------------------------------------------- plots


def _spectrogram(ax, db: np.ndarray, features: FeatureConfig | None, floor_db: float) -> None:
    """Draw a log-mel (dB) with time in seconds and frequency in Hz (mel-spaced)."""
    db = np.asarray(db, np.float32)
    n_mels, frames = db.shape
    if features is not None:
        seconds = features.frames_to_seconds(frames)
        ax.imshow(
            colorize(db, floor_db, SPECTROGRAM_CMAP),
            aspect="auto",
            extent=(0, seconds, 0, n_mels),
            interpolation="nearest",
        )
        ticks, names = mel_ticks(features, n_mels)
        ax.set_yticks(ticks, names)
    else:
        ax.imshow(
            colorize(db, floor_db, SPECTROGRAM_CMAP), aspect="auto", extent=(0, frames, 0, n_mels)
        )
    ax.tick_params(labelsize=7)


def _grid(n: int, cols: int | None, cell: tuple[float, float]) -> tuple[Figure, np.ndarray, int]:
    cols = max(1, min(cols or math.ceil(math.sqrt(n)), n))
    rows = max(1, math.ceil(n / cols))
    figure = Figure(figsize=(cell[0] * cols + 1.2, cell[1] * rows + 1.0), layout="constrained")
    axes = np.atleast_1d(figure.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return figure, axes, cols


def _spectrogram_grid_labels(figure: Figure, axes, features, floor_db: float, time_unit: bool):
    figure.supxlabel("time (s)" if time_unit else "time (frames)")
    figure.supylabel("frequency (Hz, mel scale)" if features is not None else "mel band")
    figure.colorbar(
        ScalarMappable(Normalize(floor_db, 0.0), SPECTROGRAM_CMAP),
        ax=[ax for ax in axes if ax.get_visible()],
        label="level (dB below the clip's loudest bin)",
        shrink=0.6,
        pad=0.01,
    )


def plot_batch(
    spectrograms: Sequence[np.ndarray],
    labels: Sequence[str],
    features: FeatureConfig | None = None,
    names: Sequence[str] | None = None,
    cols: int | None = None,
    title: str | None = None,
) -> Figure:
    """A grid of log-mel spectrograms (dB) with their labels (and file names)."""
    if not len(spectrograms):
        raise ConfigError("no spectrograms to show")
    floor = features.floor_db if features is not None else float(np.min(spectrograms[0]))
    figure, axes, _ = _grid(len(spectrograms), cols, (2.8, 2.2))
    for i, (db, label) in enumerate(zip(spectrograms, labels, strict=True)):
        _spectrogram(axes[i], db, features, floor)
        text = str(label) if names is None else f"{label}\n{names[i]}"
        axes[i].set_title(text, fontsize=8)
    _spectrogram_grid_labels(figure, axes, features, floor, features is not None)
    figure.suptitle(title or f"{len(spectrograms)} clips: log-mel spectrograms with their labels")
    return figure


def plot_history(history: pd.DataFrame | Sequence[Mapping]) -> Figure:
    """Train and validation loss, and validation error rate, per epoch, both stages."""
    frame = history_frame(history)
    figure = Figure(figsize=(11, 4.2), layout="constrained")
    loss_ax, error_ax = figure.subplots(1, 2)
    x = frame["position"]
    loss_ax.plot(x, frame["train_loss"], "o-", color=OKABE_ITO[0], label="train (augmented)")
    loss_ax.plot(x, frame["valid_loss"], "s--", color=OKABE_ITO[1], label="validation")
    loss_ax.set(
        title="Loss per epoch", xlabel="epoch (both stages)", ylabel="cross-entropy loss (nats)"
    )
    error_ax.plot(x, frame["error_percent"], "D-", color=OKABE_ITO[3], label="validation")
    error_ax.set(
        title="Validation error rate per epoch",
        xlabel="epoch (both stages)",
        ylabel="error rate (%)",
    )
    error_ax.set_ylim(
        0, max(5.0, float(np.nanmax(frame["error_percent"].to_numpy(), initial=0)) * 1.08)
    )
    stage1 = frame[frame["stage"] == 1]
    for ax in (loss_ax, error_ax):
        ax.grid(alpha=0.3)
        ax.set_xlim(0.5, len(frame) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if len(stage1) and len(stage1) < len(frame):
            ax.axvspan(
                0.5,
                len(stage1) + 0.5,
                color="0.85",
                alpha=0.6,
                zorder=0,
                label="stage 1 (body frozen)",
            )
        ax.legend(loc="upper right", fontsize=8)
    best = frame["error_percent"].idxmin() if frame["error_percent"].notna().any() else None
    if best is not None:
        error_ax.annotate(
            f"best {frame.loc[best, 'error_percent']:.1f}%",
            (frame.loc[best, "position"], frame.loc[best, "error_percent"]),
            textcoords="offset points",
            xytext=(0, 10),
            ha="center",
            fontsize=8,
        )
    figure.suptitle("Training history (stage 1: body frozen; stage 2: all layers trainable)")
    return figure


def plot_lr_schedule(schedule: pd.DataFrame, note: str | None = None) -> Figure:
    """The one-cycle learning rates per optimiser step (frame of :func:`lr_schedule`)."""
    figure = Figure(figsize=(9, 4), layout="constrained")
    ax = figure.subplots()
    ax.plot(schedule["epoch"], schedule["head_lr"], "-", color=OKABE_ITO[0], label="head")
    if schedule["body_lr"].notna().any():
        ax.plot(
            schedule["epoch"], schedule["body_lr"], "--", color=OKABE_ITO[1], label="body (stage 2)"
        )
    stage2 = schedule[schedule["stage"] == 2]
    if len(stage2) and (schedule["stage"] == 1).any():
        boundary = float(stage2["epoch"].iloc[0])
        ax.axvline(boundary, color="0.4", linestyle=":", linewidth=1)
        ax.text(boundary, 1.0, " stage 2", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    title = "Learning-rate schedule (one cycle per stage, warm-up 25% of its steps)"
    ax.set(
        title=title + (f"\n{note}" if note else ""),
        xlabel="epoch (both stages)",
        ylabel="learning rate (per step)",
    )
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return figure


def plot_lr_find(lrs: Sequence[float], losses: Sequence[float], suggestion: float | None) -> Figure:
    """The LR range test: training loss against learning rate, the suggestion marked."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    ax.plot(lrs, losses, "-", color=OKABE_ITO[0])
    if suggestion is not None:
        at = int(np.argmin(np.abs(np.log(np.asarray(lrs)) - np.log(suggestion))))
        ax.plot(
            [lrs[at]],
            [losses[at]],
            "o",
            markersize=10,
            color=OKABE_ITO[3],
            label=f"suggestion {suggestion:.2e}",
        )
        ax.legend()
    ax.set_xscale("log")
    ax.set(
        title="Learning-rate range test",
        xlabel="learning rate (log scale)",
        ylabel="training loss (nats, smoothed)",
    )
    ax.grid(alpha=0.3, which="both")
    return figure


def plot_fusion(table: pd.DataFrame, chosen: float) -> Figure:
    """Late fusion's choice: validation accuracy and log loss against the frozen
    head's share of the fused probabilities (``table``: ``weight``, ``accuracy``,
    ``log_loss``, and with a noisy copy ``clean_accuracy`` and ``noisy_accuracy``), the
    chosen weight marked."""
    figure = Figure(figsize=(7, 4.5), layout="constrained")
    ax = figure.subplots()
    table = table.sort_values("weight")
    noisy = "noisy_accuracy" in table
    ax.plot(
        table["weight"],
        100 * table["accuracy"],
        "-o",
        color=OKABE_ITO[0],
        markersize=4,
        label="both copies (chosen on)" if noisy else None,
    )
    if noisy:  # chosen on both copies: each drawn thin
        for column, color in (("clean_accuracy", OKABE_ITO[2]), ("noisy_accuracy", OKABE_ITO[4])):
            ax.plot(table["weight"], 100 * table[column], "-", lw=1, color=color, label=column)
    ax.axvline(chosen, color=OKABE_ITO[3], linestyle="--", label=f"chosen {chosen:.2f}")
    ax.set(
        title="Late fusion on the validation clips",
        xlabel="frozen head's weight (0: the network alone, 1: the head alone)",
        ylabel="accuracy (%)",
    )
    loss = ax.twinx()
    loss.plot(table["weight"], table["log_loss"], ":", color=OKABE_ITO[1])
    loss.set_ylabel("log loss (nats, dotted)")
    ax.legend(loc="lower center")
    ax.grid(alpha=0.3)
    return figure


def plot_confusion(
    confusion: np.ndarray, labels: Sequence[str], order: str = "recall", annotate: bool = True
) -> Figure:
    """Row-normalised confusion matrix, classes sorted (:func:`confusion_order`).

    Colour is the fraction of each true class's clips; numbers are clip counts
    (non-zero cells only). Figure and font sizes grow with the number of classes, so
    50 classes stay legible.
    """
    confusion = np.asarray(confusion)
    labels = [str(label) for label in labels]
    n = len(labels)
    index = confusion_order(confusion, order)
    counts = confusion[np.ix_(index, index)]
    rates = normalised_confusion(counts)
    support = counts.sum(axis=1)
    names = [labels[i] for i in index]
    row_names = [f"{name} ({int(k)})" for name, k in zip(names, support, strict=True)]
    cell = float(np.clip(6.0 / max(n, 1), 0.28, 0.8))  # inches per class
    font = float(np.clip(cell * 72 * 0.42, 7, 12))
    side = n * cell
    figure = Figure(figsize=(side + 3.4, side + 2.6), layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(rates, cmap=MATRIX_CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(n), names, rotation=90, fontsize=font)
    ax.set_yticks(range(n), row_names, fontsize=font)
    ax.set_xlabel("predicted class", fontsize=font + 2)
    ax.set_ylabel("true class (its clips)", fontsize=font + 2)
    ax.set_xticks(np.arange(-0.5, n, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, n, 1), minor=True)
    ax.grid(which="minor", color="white", linewidth=0.3, alpha=0.4)
    ax.tick_params(which="minor", length=0)
    if annotate:
        for i, j in zip(*np.nonzero(counts), strict=True):
            ax.text(
                j,
                i,
                str(counts[i, j]),
                ha="center",
                va="center",
                fontsize=font * 0.85,
                color="black" if rates[i, j] > 0.55 else "white",
            )
    sorting = {
        "recall": "sorted by recall",
        "cluster": "clustered",
        "label": "in label order",
    }[order]
    ax.set_title(
        f"Confusion matrix, {int(counts.sum())} validation clips, {n} classes "
        f"({sorting}; numbers: clips)",
        fontsize=font + 3,
    )
    bar = figure.colorbar(image, ax=ax, shrink=0.6, pad=0.01)
    bar.set_label("fraction of the true class's clips (row-normalised)", fontsize=font + 1)
    return figure


def plot_per_class(per_class: pd.DataFrame) -> Figure:
    """Precision, recall and F1 of each class as a dot plot, best F1 on top."""
    frame = per_class.sort_values(["f1", "label"], ascending=[True, False], kind="stable")
    n = len(frame)
    figure = Figure(figsize=(8, 0.24 * n + 1.6), layout="constrained")
    ax = figure.subplots()
    y = np.arange(n)
    names = [
        f"{label} (n={int(s)})" if "support" in frame else str(label)
        for label, s in zip(frame["label"], frame.get("support", [0] * n), strict=True)
    ]
    for i in y:
        ax.axhline(int(i), color="0.9", linewidth=0.8, zorder=0)
    # Precision as a ring around the filled recall square, so equal values show both.
    ax.scatter(
        frame["precision"],
        y,
        marker="o",
        s=70,
        facecolors="none",
        edgecolors=OKABE_ITO[0],
        linewidths=1.6,
        label="precision",
        zorder=3,
    )
    ax.scatter(frame["recall"], y, marker="s", color=OKABE_ITO[1], label="recall", zorder=3)
    ax.scatter(frame["f1"], y, marker="D", color="black", s=18, label="F1", zorder=4)
    font = float(np.clip(260 / max(n, 1), 7, 10))
    ax.set_yticks(y, names, fontsize=font)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlim(-0.03, 1.03)
    ax.set(
        title="Per-class precision, recall and F1 (validation; n = clips of the class)",
        xlabel="score (0 = worst, 1 = perfect)",
        ylabel="class",
    )
    ax.grid(axis="x", alpha=0.3)
    figure.legend(loc="outside lower center", ncol=3, fontsize=9, frameon=False)
    return figure


def plot_top_losses(
    losses: pd.DataFrame,
    spectrograms: Sequence[np.ndarray | None],
    features: FeatureConfig | None = None,
    cols: int = 4,
    multi_label: bool = False,
) -> Figure:
    """The worst validation clips (frame of :func:`top_losses`) with their spectrograms,
    true label, prediction with its probability, and loss (``multi_label``: label
    lists, the lowest true-label probability and the binary cross-entropy)."""
    n = len(losses)
    if n == 0:
        raise ConfigError("no clips to show")
    floor = features.floor_db if features is not None else -80.0
    figure, axes, _ = _grid(n, cols, (3.3, 2.5))
    for i, row in enumerate(losses.itertuples(index=False)):
        ax = axes[i]
        spectrogram = spectrograms[i]
        if spectrogram is not None:
            _spectrogram(ax, spectrogram, features, floor)
        else:
            ax.text(0.5, 0.5, "audio unreadable", ha="center", va="center", transform=ax.transAxes)
        mark = "✓" if row.predicted == row.label else "✗"
        if multi_label:
            text = (
                f"{i + 1}. true: {row.label or '(none)'}\n"
                f"{mark} predicted: {row.predicted or '(none)'} (top p={row.p_predicted:.2f})\n"
                f"lowest p(true)={row.p_true:.3f}, BCE={row.loss:.3f}"
            )
        else:
            text = (
                f"{i + 1}. true: {row.label}\n"
                f"{mark} predicted: {row.predicted} (p={row.p_predicted:.2f})\n"
                f"p(true)={row.p_true:.3f}, loss={row.loss:.2f}"
            )
        ax.set_title(text, fontsize=8, loc="left")
    _spectrogram_grid_labels(figure, axes, features, floor, features is not None)
    wrong = int((losses["predicted"] != losses["label"]).sum())
    loss = "binary cross-entropy over the labels" if multi_label else "-ln p(true label)"
    figure.suptitle(
        f"Top losses: the {n} validation clips with the largest loss ({loss}); "
        f"{wrong} of them {'with wrong labels' if multi_label else 'misclassified'}"
    )
    return figure


def plot_average_precision(per_class: pd.DataFrame) -> Figure:
    """A multi-label model's average precision per class (``per_class.csv``'s ``ap``)
    as horizontal bars, best on top, the macro mean marked."""
    frame = per_class.dropna(subset=["ap"]).sort_values(["ap", "label"], kind="stable")
    n = len(frame)
    figure = Figure(figsize=(8, 0.24 * max(n, 1) + 1.6), layout="constrained")
    ax = figure.subplots()
    y = np.arange(n)
    names = [
        f"{label} (n={int(s)})" for label, s in zip(frame["label"], frame["support"], strict=True)
    ]
    ax.barh(y, frame["ap"], color=OKABE_ITO[4], height=0.7)
    if n:
        mean = float(frame["ap"].mean())
        ax.axvline(mean, color="black", linestyle="--", linewidth=1, label=f"mAP {mean:.3f}")
        ax.legend(loc="lower right", fontsize=9)
    font = float(np.clip(260 / max(n, 1), 7, 10))
    ax.set_yticks(y, names, fontsize=font)
    ax.set_xlim(0, 1.02)
    ax.set(
        title="Average precision per class (validation; n = clips with the label)",
        xlabel="average precision (area under the precision-recall curve)",
        ylabel="class",
    )
    ax.grid(axis="x", alpha=0.3)
    return figure


def plot_pr_curves(
    truth: np.ndarray,
    scores: np.ndarray,
    labels: Sequence[str],
    thresholds: Sequence[float] | np.ndarray | None = None,
    most: int = 12,
) -> Figure:
    """Precision-recall curves of a multi-label model (scikit-learn's
    ``precision_recall_curve``), one per class with clips (the ``most`` most frequent
    at most), each class's tuned threshold marked by a dot, plus the micro-average
    over every (clip, label) pair."""
    from sklearn.metrics import precision_recall_curve

    truth = np.asarray(truth) > 0
    counts = truth.sum(axis=0)
    shown = [int(c) for c in np.argsort(-counts, kind="stable")[:most] if counts[c] > 0]
    figure = Figure(figsize=(7, 5.6), layout="constrained")
    ax = figure.subplots()
    styles = label_styles([labels[c] for c in shown])
    for i, c in enumerate(shown):
        precision, recall, cuts = precision_recall_curve(truth[:, c], scores[:, c])
        colour, marker = styles[labels[c]]
        line = "-" if i < len(OKABE_ITO) else "--"
        ax.plot(recall, precision, color=colour, linestyle=line, linewidth=1.2, label=labels[c])
        if thresholds is not None and len(cuts):
            at = min(int(np.searchsorted(cuts, thresholds[c])), len(cuts) - 1)
            ax.plot(recall[at], precision[at], marker, color=colour, markersize=5)
    if truth.any():
        precision, recall, _ = precision_recall_curve(truth.ravel(), np.asarray(scores).ravel())
        ax.plot(recall, precision, color="black", linewidth=2.2, label="micro-average")
    ax.set(
        xlim=(0, 1.01),
        ylim=(0, 1.03),
        xlabel="recall",
        ylabel="precision",
        title="Precision-recall per class (validation; dots: the tuned thresholds)",
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=7, ncol=2)
    return figure


def plot_tsne(
    embeddings: np.ndarray | None,
    labels: Sequence[str],
    positions: np.ndarray | None = None,
    seed: int = 0,
) -> Figure:
    """t-SNE of penultimate embeddings, one colour and marker per label; above 8
    labels each class is also named at its median position."""
    if positions is None:
        # Callers pass embeddings whenever they pass no positions.
        positions = tsne_positions(cast(np.ndarray, embeddings), seed)
    labels = [str(label) for label in labels]
    classes = sorted(set(labels), key=lambda s: (len(s), s) if s.isdigit() else (0, s))
    styles = label_styles(classes)
    wide = len(classes) > 12
    figure = Figure(figsize=(13 if wide else 9, 9 if wide else 7), layout="constrained")
    ax = figure.subplots()
    array = np.asarray(labels)
    for label in classes:
        points = positions[array == label]
        colour, marker = styles[label]
        ax.scatter(
            points[:, 0],
            points[:, 1],
            s=22,
            c=colour,
            marker=marker,
            label=label,
            edgecolors="0.25",
            linewidths=0.3,
            alpha=0.9,
        )
    if len(classes) > 8:
        for label in classes:
            points = positions[array == label]
            # The medoid: the class's point nearest its median, so the name sits on a
            # real point even when a class is split into several places.
            medoid = points[np.argmin(((points - np.median(points, axis=0)) ** 2).sum(1))]
            ax.annotate(
                label,
                medoid,
                xytext=(0, 5),
                textcoords="offset points",
                fontsize=7,
                ha="center",
                va="bottom",
                path_effects=[patheffects.withStroke(linewidth=2.5, foreground="white")],
            )
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=7 if wide else 9,
        ncol=1 + len(classes) // 26,
        title="label",
        markerscale=1.2,
    )
    ax.set(
        title=f"t-SNE of the model's penultimate embeddings ({len(labels)} validation clips)",
        xlabel="t-SNE dimension 1 (arbitrary units)",
        ylabel="t-SNE dimension 2 (arbitrary units)",
    )
    ax.grid(alpha=0.2)
    return figure


def plot_tsne_thumbnails(
    positions: np.ndarray,
    images: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    size: int = 1600,
) -> Figure:
    """The blog's scatter of spectrogram thumbnails at their t-SNE positions; with
    labels, each thumbnail is framed in its label's colour (as in :func:`plot_tsne`)."""
    borders = None
    if labels is not None:
        styles = label_styles(sorted({str(label) for label in labels}))
        borders = [styles[str(label)][0] for label in labels]
    canvas, extent = thumbnail_canvas(positions, images, size, borders)
    figure = Figure(figsize=(11, 11), layout="constrained")
    ax = figure.subplots()
    ax.imshow(canvas, extent=extent, interpolation="antialiased")
    ax.set(
        title=f"Spectrogram thumbnails at their t-SNE positions ({len(images)} clips; "
        "frame colour = label)",
        xlabel="t-SNE dimension 1 (arbitrary units)",
        ylabel="t-SNE dimension 2 (arbitrary units)",
    )
    return figure


def plot_cv_summary(folds: pd.DataFrame) -> Figure:
    """Per-fold accuracy and MAP@3 (``cv.json`` folds; a multi-label model's lwlrap
    and mAP), their means dashed."""
    figure = Figure(figsize=(8, 4), layout="constrained")
    ax = figure.subplots()
    x = np.arange(len(folds))
    width = 0.38
    scores = (("lwlrap", "lwlrap"), ("mean_ap", "mAP"))
    if "lwlrap" not in folds:
        scores = (("accuracy", "accuracy"), ("map3", "MAP@3"))
    for offset, (column, name), colour in zip(
        (-width / 2, width / 2), scores, OKABE_ITO[:2], strict=True
    ):
        values = 100 * folds[column].to_numpy(float)
        ax.bar(
            x + offset,
            values,
            width,
            color=colour,
            label=name,
            hatch="" if column == scores[0][0] else "//",
            edgecolor="white",
        )
        ax.axhline(values.mean(), color=colour, linestyle="--", linewidth=1)
    ax.set_xticks(x, [f"fold {int(k)}" for k in folds["fold"]])
    ax.set_ylim(0, 105)
    ax.set(
        title="Cross-validation: scores per fold (dashed: mean)", xlabel="fold", ylabel="score (%)"
    )
    ax.legend(loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return figure

"""Sound-event timelines: when does each sound happen in a recording of any length.

A trained model scores overlapping windows slid along the recording at a regular hop
(:class:`DetectConfig.hop_seconds`); each window's probabilities stand for the hop-wide
frame around its centre. The frame-wise probabilities are smoothed by a median filter
along time (scipy), and each label's active frames (probability at or above its
threshold) become events: runs closer than ``merge_gap`` are joined, runs shorter than
``min_duration`` dropped. An event is ``(onset, offset, event_label, probability)``
with the peak smoothed probability, the DCASE format ``evaluate --events`` reads.

Everything goes through the pieces prediction uses: the featuriser's block stream
(:meth:`~soundsight.features.Featuriser.stream`: the file is read in blocks, so memory
does not grow with its length), :meth:`~soundsight.data.ClipView.stream_windows` and
the one windowed scorer (:func:`~soundsight.prediction.score_windows`). What grows with
the length is one row of probabilities per hop (a 3-hour file at 0.25 s and 60 labels:
10 MB) and nothing else; the picture's spectrogram is pooled to a fixed width while the
blocks stream past.

A frozen-embedding model (:mod:`soundsight.frozen`) is slid the same way, once per
part: each part's network scores its own windows (its front end, its window length) at
the same hop and contributes its share of the head's logits; a late-fusion model's
network gives its probabilities too, blended at the model's weight
(:func:`frozen_timeline`).

Which labels are "nothing here": a multi-label model's thresholds say it (no label
above its threshold). A single-label model always names some label, so a label listed
in :attr:`DetectConfig.background` (by default ``background``, where the model has
one) is never an event, and the probability threshold decides the rest.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .audio import AudioError, clip_duration
from .config import BACKGROUND_LABEL, FeatureConfig
from .errors import ConfigError
from .files import write_whole
from .frozen import FrozenClassifier, NetworkPart, head_logits, part_heads
from .prediction import STREAM_SECONDS, Classifier, score_windows
from .runtime import load_classifier
from .tables import write_csv

#: What slides windows along a recording: a fine-tuned model, or a frozen-embedding
#: one (late fusion included) whose parts are networks.
Model = Classifier | FrozenClassifier

#: Columns of an events table, in the DCASE order (plus the peak probability).
EVENT_COLUMNS = ("filename", "onset", "offset", "event_label", "probability")
#: Width (columns) the picture's spectrogram is pooled to, whatever the file's length.
PICTURE_COLUMNS = 2000


@dataclass(frozen=True)
class DetectConfig:
    """How frame-wise probabilities become events.

    Attributes
    ----------
    hop_seconds : float
        Step between consecutive windows: the timeline's resolution.
    smooth_seconds : float
        Length of the median filter along time (rounded to an odd number of hops;
        one hop or less: no smoothing).
    threshold : float or None
        Probability at which a label is active; None takes the model's tuned
        per-class thresholds where it has them, else 0.5.
    label_thresholds : dict of str to float
        Labels whose threshold differs from ``threshold``'s (:func:`tune` chooses
        them on a validation set); every name must be one of the model's labels.
    min_duration : float
        Events shorter than this (seconds) are dropped.
    merge_gap : float
        Events of one label separated by less than this (seconds) are joined.
    background : tuple of str
        Labels that mean "none of the sounds of interest" (never events); names the
        model does not have are ignored.
    """

    hop_seconds: float = 0.25
    smooth_seconds: float = 0.75
    threshold: float | None = None
    label_thresholds: dict[str, float] = field(default_factory=dict)
    min_duration: float = 0.1
    merge_gap: float = 0.3
    background: tuple[str, ...] = (BACKGROUND_LABEL,)

    def __post_init__(self):
        if not (math.isfinite(self.hop_seconds) and 0.01 <= self.hop_seconds <= 10):
            raise ConfigError(f"hop_seconds must be 0.01 to 10, got {self.hop_seconds}")
        for name in ("smooth_seconds", "min_duration", "merge_gap"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise ConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        for label, value in self.label_thresholds.items():
            number = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (isinstance(label, str) and label and number and 0 < value <= 1):
                raise ConfigError(
                    f"label_thresholds: {label!r} must be a label with a threshold in "
                    f"(0, 1], got {value}"
                )
        object.__setattr__(self, "label_thresholds", dict(self.label_thresholds))
        object.__setattr__(self, "background", tuple(self.background))


@dataclass
class Timeline:
    """Frame-wise probabilities of one recording.

    Attributes
    ----------
    labels : list of str
        The model's labels (columns of ``probabilities``).
    centres : np.ndarray
        ``(frames,)`` seconds: the centre of each scored window.
    probabilities : np.ndarray
        ``(frames, labels)`` float32, one row per window (a frozen part's share of its
        head's logits, inside :func:`frozen_timeline`).
    duration : float
        Seconds of audio in the recording.
    window_seconds : float
        Length of each scored window.
    spectrogram : np.ndarray
        The log-mel (dB) pooled along time to at most :data:`PICTURE_COLUMNS` columns
        (each the loudest of the frames it covers), for pictures.
    """

    labels: list[str]
    centres: np.ndarray
    probabilities: np.ndarray
    duration: float
    window_seconds: float
    spectrogram: np.ndarray = field(repr=False)

    @property
    def edges(self) -> np.ndarray:
        """``(frames + 1,)`` seconds: frame ``i`` covers ``edges[i]`` to ``edges[i + 1]``
        (midpoints between window centres; the first from 0, the last to the end)."""
        middles = (self.centres[1:] + self.centres[:-1]) / 2
        return np.concatenate([[0.0], middles, [self.duration]])


class _PooledSpectrogram:
    """The loudest value of each group of ``width`` consecutive frames, collected from
    the blocks as they pass (the picture of an hour without holding the hour)."""

    def __init__(self, frames: int, columns: int = PICTURE_COLUMNS):
        self.width = max(1, -(-frames // columns))
        self.carry: np.ndarray | None = None
        self.pooled: list[np.ndarray] = []

    def tap(self, blocks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        for block in blocks:
            held = block if self.carry is None else np.concatenate([self.carry, block], axis=1)
            whole = held.shape[1] // self.width * self.width
            if whole:
                groups = held[:, :whole].reshape(held.shape[0], -1, self.width)
                self.pooled.append(groups.max(-1))
            self.carry = held[:, whole:]
            yield block

    def result(self) -> np.ndarray:
        parts = list(self.pooled)
        if self.carry is not None and self.carry.shape[1]:
            parts.append(self.carry.max(1, keepdims=True))
        return np.concatenate(parts, axis=1)


def window_starts(frames: int, window: int, hop: int) -> np.ndarray:
    """First frame of each timeline window: every ``hop`` frames, plus one window
    flush with the end, so the whole recording is covered (one window for a recording
    no longer than a window, at 0)."""
    if frames <= window:
        return np.array([0])
    starts = np.arange(0, frames - window + 1, hop)
    if starts[-1] != frames - window:
        starts = np.append(starts, frames - window)
    return starts


def timeline(
    classifier: Classifier,
    frames: int,
    blocks: Iterable[np.ndarray],
    hop_seconds: float = DetectConfig.hop_seconds,
    progress: bool = False,
    name: str = "",
    head: dict[str, np.ndarray] | None = None,
    labels: Sequence[str] | None = None,
) -> Timeline:
    """Frame-wise probabilities of a recording given as its log-mel in column
    ``blocks`` (``frames`` in all, as :meth:`Featuriser.stream` yields them), scored
    window by window by the one windowed scorer.

    With ``head`` (a frozen head's share for this network's embedding,
    :func:`~soundsight.frozen.part_heads`), each window's row is that share of the
    head's logits over ``labels`` instead of the network's probabilities.

    Raises
    ------
    ConfigError
        The model sees whole squashed clips (``--recipe seed``), not windows.
    """
    view, features = classifier.view, classifier.features
    if view.frames is None:
        raise ConfigError(
            "detect needs a model trained on crops; this one squashes whole clips "
            "(--recipe seed) and cannot place sounds in time"
        )
    hop = max(1, round(hop_seconds * features.sample_rate / features.hop_length))
    starts = window_starts(frames, view.frames, hop)
    pooled = _PooledSpectrogram(frames)
    with tqdm(
        total=len(starts), desc=f"detect {name}".strip(), unit="window", disable=not progress
    ) as bar:
        labels = list(classifier.labels if labels is None else labels)
        scored = score_each_window(
            classifier, frames, pooled.tap(blocks), starts, embed=head is not None, bar=bar
        )
        # Filled in place rather than collecting each window's row (a small array
        # backed by its own torch tensor, 14,400 an hour at a 0.25-s hop): holding
        # those made the peak RSS grow with the recording, 1,114 MB at 10 min and
        # 1,134 MB at 40 min of ESC audio (ESC model); filled in place, 1,113 MB at 40.
        probabilities = np.empty((len(starts), len(labels)), np.float32)
        for row, (window, embedding) in enumerate(scored):
            if head is None:
                probabilities[row] = window
            else:  # embed=True: every window has its embedding
                probabilities[row] = head_logits(head, cast(np.ndarray, embedding)[None])[0]
    duration = features.frames_to_seconds(frames)
    if frames <= view.frames:
        centres = np.array([duration / 2])
    else:  # seconds, as FeatureConfig.frames_to_seconds, for every window at once
        centres = (starts + view.frames / 2) * features.hop_length / features.sample_rate
    return Timeline(
        labels=labels,
        centres=np.asarray(centres, np.float64),
        probabilities=probabilities,
        duration=float(duration),
        window_seconds=float(features.frames_to_seconds(view.frames)),
        spectrogram=pooled.result(),
    )


def score_each_window(
    classifier: Classifier,
    frames: int,
    blocks: Iterable[np.ndarray],
    starts: Sequence[int] | np.ndarray,
    embed: bool = False,
    bar: tqdm | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """``(probabilities, embedding or None)`` of each window of a recording given as
    its log-mel in column ``blocks`` (``frames`` in all), one per first frame in
    ``starts`` (:func:`window_starts`), in order, through the one windowed scorer; a
    recording no longer than a window is one window, padded with silence. ``bar``
    counts the windows as they are cut. Timelines (:func:`timeline`) and the search
    index (:mod:`soundsight.search`) both slide windows through here."""
    view = classifier.view
    assert view.frames is not None, "only crop views slide windows"
    if frames <= view.frames:
        batches: Iterable[np.ndarray] = [view.windows(np.concatenate(list(blocks), axis=1))]
    else:
        batches = view.stream_windows(blocks, frames, starts=[int(s) for s in starts])

    def one_window_each() -> Iterator[list[np.ndarray]]:
        for batch in batches:
            if bar is not None:
                bar.update(len(batch))
            yield from ([window[None]] for window in batch)

    # Each window is its own "clip" for the scorer: one row per window, windows still
    # sharing forward passes.
    return score_windows(classifier.net, one_window_each(), embed)


def file_blocks(
    classifier: Classifier, path: str | os.PathLike
) -> tuple[int, Iterator[np.ndarray]]:
    """A file's log-mel as ``(frames, column blocks)``: read in blocks when longer than
    :data:`~soundsight.prediction.STREAM_SECONDS` (memory does not grow with the
    length), else decoded whole.

    Raises
    ------
    AudioError
        The file cannot be read as audio (on the call, or while the blocks stream).
    """
    if clip_duration(path) > STREAM_SECONDS:
        return classifier.featurise.stream(path)
    db = classifier.log_mel(path)
    return db.shape[1], iter([db])


def file_timeline(
    model: Model,
    path: str | os.PathLike,
    hop_seconds: float = DetectConfig.hop_seconds,
    progress: bool = False,
) -> Timeline:
    """:func:`timeline` of an audio file (:func:`file_blocks`); a frozen-embedding
    model's through :func:`frozen_timeline`.

    Raises
    ------
    AudioError
        The file cannot be read as audio.
    ConfigError
        The model cannot place sounds in time (see :func:`timeline`,
        :func:`frozen_timeline`).
    """
    if isinstance(model, FrozenClassifier):
        return frozen_timeline(model, path, hop_seconds, progress)
    frames, blocks = file_blocks(model, path)
    return timeline(model, frames, blocks, hop_seconds, progress, Path(path).name)


def frozen_timeline(
    model: FrozenClassifier,
    source: str | os.PathLike | np.ndarray,
    hop_seconds: float = DetectConfig.hop_seconds,
    progress: bool = False,
) -> Timeline:
    """Frame-wise probabilities of an audio file, or of a mono waveform at
    ``model.features.sample_rate`` (a served upload), under a frozen-embedding model.

    The head is linear in the concatenated part vectors, so each part's network
    slides its own windows along the file (its front end, its window length) at the
    same hop and gives its share of the logits (:func:`~soundsight.frozen.part_heads`);
    the shares are added and softmaxed. A late-fusion model's network is slid too and
    blended at the model's weight. Each stream reads a file in blocks. They are joined at
    the window centres of the fused network (else of the first part), taking each
    other stream's window nearest in time; the timeline's window length is that
    stream's.

    Raises
    ------
    ConfigError
        A part embeds whole clips only (BirdNET), or the fused network squashes
        whole clips (``--recipe seed``).
    AudioError
        The file cannot be read as audio.
    """
    from scipy.special import softmax

    networks = []
    for part in model.parts:
        if not isinstance(part, NetworkPart):  # checked for every part before any work
            raise ConfigError(
                f"detect slides the windows of network parts (aisfx, the EfficientNet-"
                f"Lites); part {part.name!r} of {model.spec.backbone} embeds whole clips"
            )
        networks.append(part.classifier)

    def blocks_of(network: Classifier) -> tuple[int, Iterator[np.ndarray]]:
        if isinstance(source, np.ndarray):
            db = network.log_mel(model.at_rate(source, network.features.sample_rate))
            return db.shape[1], iter([db])
        return file_blocks(network, source)

    name = "" if isinstance(source, np.ndarray) else Path(source).name
    fused = None
    if model.network is not None:
        frames, blocks = blocks_of(model.network)
        fused = timeline(model.network, frames, blocks, hop_seconds, progress, name)
    shares = part_heads(model.head, [part.dim for part in model.parts])
    lines = []
    for network, share in zip(networks, shares, strict=True):
        frames, blocks = blocks_of(network)
        lines.append(
            timeline(network, frames, blocks, hop_seconds, progress, name, share, model.labels)
        )
    base = fused or lines[0]
    logits = np.sum([_nearest_rows(line, base.centres) for line in lines], axis=0)
    probabilities = softmax(logits.astype(np.float64), axis=1)
    if fused is not None:
        probabilities = model.fused_probabilities(probabilities, fused.probabilities)
    return dataclasses.replace(
        base, labels=list(model.labels), probabilities=probabilities.astype(np.float32)
    )


def _nearest_rows(line: Timeline, centres: np.ndarray) -> np.ndarray:
    """``line``'s rows of the windows whose centres are nearest to ``centres``
    (both ascending)."""
    if len(line.centres) == 1:
        return np.repeat(line.probabilities, len(centres), axis=0)
    right = np.searchsorted(line.centres, centres).clip(1, len(line.centres) - 1)
    left_nearer = centres - line.centres[right - 1] <= line.centres[right] - centres
    return line.probabilities[right - left_nearer]


def spectrogram_features(model: Model) -> FeatureConfig:
    """The front end of a timeline's spectrogram: the model's, or the stream
    :func:`frozen_timeline` joins the others at."""
    if not isinstance(model, FrozenClassifier):
        return model.features
    if model.network is not None:
        return model.network.features
    return cast(NetworkPart, model.parts[0]).classifier.features


def thresholds(classifier: Model, settings: DetectConfig) -> np.ndarray:
    """Per-label thresholds: the settings' for a label they name, else the settings'
    one threshold, else the model's tuned ones, else 0.5."""
    unknown = sorted(set(settings.label_thresholds) - set(classifier.labels))
    if unknown:
        raise ConfigError(
            f"label thresholds for {unknown}: the model has no such label "
            f"(its labels: {', '.join(classifier.labels)})"
        )
    tuned = classifier.spec.thresholds
    if settings.threshold is not None or not tuned:
        value = 0.5 if settings.threshold is None else settings.threshold
        limits = np.full(len(classifier.labels), value, np.float32)
    else:
        limits = np.asarray(tuned, np.float32)
    for label, value in settings.label_thresholds.items():
        limits[classifier.labels.index(label)] = value
    return limits


def _contiguous_regions(active: np.ndarray) -> np.ndarray:
    """``(k, 2)`` first and past-last frame of each run of True, with dcase_util's
    decision encoder (the DCASE baselines' own post-processing)."""
    with warnings.catch_warnings():
        # dcase_util imports pkg_resources, which warns on every recent setuptools.
        warnings.simplefilter("ignore", UserWarning)
        from dcase_util.data import DecisionEncoder

    if not active.any():
        return np.zeros((0, 2), int)
    return DecisionEncoder().find_contiguous_regions(active)


def run_bounds(line: Timeline, first: int, past: int) -> tuple[float, float]:
    """Onset and offset (seconds) of a sound that made windows ``first`` to ``past - 1``
    (consecutive) active.

    A run spanning less than one window is a sound shorter than a window: the windows
    that hold all of it start after its onset and end after its offset, so the sound is
    where they all overlap (from the last window's start to the first window's end).
    A longer run is a longer sound, which no window holds whole: it is the frames
    around the centres of its windows. (Measured on digits of about 0.45 s in 1-s
    windows: centres put onsets 0.25-0.35 s early, the overlap within 0.05 s.)
    """
    half = line.window_seconds / 2
    spread = line.centres[past - 1] - line.centres[first]
    if spread < line.window_seconds:
        onset, offset = line.centres[past - 1] - half, line.centres[first] + half
    else:
        onset, offset = line.edges[first], line.edges[past]
    return max(0.0, float(onset)), min(line.duration, float(offset))


def find_events(
    line: Timeline, settings: DetectConfig, label_thresholds: Sequence[float] | np.ndarray
) -> pd.DataFrame:
    """Events ``onset, offset, event_label, probability`` (seconds; the peak smoothed
    probability), sorted by onset, from a timeline's frame-wise probabilities: each
    label's runs of frames at or above its threshold (after the median filter), placed
    by :func:`run_bounds`, joined across gaps shorter than ``merge_gap``, kept from
    ``min_duration`` on."""
    from scipy.ndimage import median_filter

    hops = np.diff(line.centres)
    hop = float(np.median(hops)) if len(hops) else line.duration
    size = max(1, round(settings.smooth_seconds / hop)) | 1  # odd: centred
    smoothed = median_filter(line.probabilities, size=(size, 1), mode="nearest")
    rows: list[tuple[float, float, str, float]] = []
    for column, label in enumerate(line.labels):
        if label in settings.background:
            continue
        merged: list[list[float]] = []  # [onset, offset, peak]
        for first, past in _contiguous_regions(smoothed[:, column] >= label_thresholds[column]):
            onset, offset = run_bounds(line, first, past)
            peak = float(smoothed[first:past, column].max())
            if merged and onset - merged[-1][1] < settings.merge_gap:
                merged[-1][1:] = [max(merged[-1][1], offset), max(merged[-1][2], peak)]
            else:
                merged.append([onset, offset, peak])
        rows.extend(
            (round(onset, 3), round(offset, 3), label, round(peak, 4))
            for onset, offset, peak in merged
            if offset - onset >= settings.min_duration
        )
    events = pd.DataFrame(rows, columns=list(EVENT_COLUMNS[1:]))
    return events.sort_values(["onset", "event_label"], kind="stable").reset_index(drop=True)


@dataclass
class Detection:
    """What :func:`detect` found.

    Attributes
    ----------
    events : pandas.DataFrame
        :data:`EVENT_COLUMNS`, every file's events in the order of the files.
    durations : dict
        Seconds of audio of each file read.
    failures : list of (str, str)
        Files that could not be read, with the reason.
    timelines : dict
        Each file's :class:`Timeline` (only with ``keep_timelines``).
    """

    events: pd.DataFrame
    durations: dict[str, float]
    failures: list[tuple[str, str]]
    timelines: dict[str, Timeline] = field(default_factory=dict)


def detect(
    model: str | os.PathLike | Model,
    paths: Sequence[str | os.PathLike],
    settings: DetectConfig | None = None,
    progress: bool = True,
    keep_timelines: bool = False,
    picture_folder: str | os.PathLike | None = None,
) -> Detection:
    """Sound events in audio files of any length.

    Parameters
    ----------
    model : path, Classifier or FrozenClassifier
        A model file or a loaded model: fine-tuned, or frozen-embedding (late fusion
        included) with network parts (:func:`frozen_timeline`).
    paths : sequence of path-like
        Audio files; one that cannot be read is reported, never stops the rest.
    settings : DetectConfig, optional
        Hop, smoothing, thresholds, minimum duration, gap merging, background labels.
    progress : bool
        Show a progress bar per file (windows scored).
    keep_timelines : bool
        Also return each file's frame-wise probabilities.
    picture_folder : path-like, optional
        Write ``<file stem>.png`` there for each file: the spectrogram with the event
        bands under it (:func:`plot_timeline`).

    Returns
    -------
    Detection
        Events (DCASE columns plus the peak probability), durations, failures.

    Examples
    --------
    >>> found = detect("runs/esc/model.safetensors", ["street.flac"])
    >>> found.events.head(1)
         filename  onset  offset event_label  probability
    0  street.flac   3.25    4.75    car_horn       0.9312
    """
    settings = settings or DetectConfig()
    classifier = _loaded(model)
    limits = thresholds(classifier, settings)
    tables, durations, failures, kept = [], {}, [], {}
    for path in paths:
        try:
            line = file_timeline(classifier, path, settings.hop_seconds, progress)
        except AudioError as err:
            failures.append((str(path), err.reason))
            continue
        events = find_events(line, settings, limits)
        events.insert(0, "filename", str(path))
        tables.append(events)
        durations[str(path)] = line.duration
        if keep_timelines:
            kept[str(path)] = line
        if picture_folder is not None:
            figure = plot_timeline(line, events, spectrogram_features(classifier))
            target = Path(picture_folder) / f"{Path(path).stem}.png"
            write_whole(target, partial(figure.savefig, format="png", dpi=110))
    events = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=EVENT_COLUMNS)
    return Detection(events, durations, failures, kept)


#: The post-processing settings :func:`tune` tries, every combination of them.
TUNING_GRID: dict[str, tuple[float, ...]] = {
    "threshold": (0.3, 0.4, 0.5, 0.6, 0.7),
    "smooth_seconds": (0.25, 0.75, 1.25, 1.75, 2.5),
    "merge_gap": (0.3, 0.6, 1.0, 1.5),
    "min_duration": (0.1, 0.3),
}
#: The thresholds :func:`tune` tries for each label in turn, once the grid is searched.
LABEL_THRESHOLD_GRID: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: The scores :func:`tune` can maximise (:func:`soundsight.evaluation.event_scores`).
TUNING_METRICS = ("segment_f1", "event_f1")


def tune(
    model: str | os.PathLike | Model,
    reference: pd.DataFrame,
    settings: DetectConfig | None = None,
    grid: dict[str, Sequence[float]] | None = None,
    metric: str = "segment_f1",
    progress: bool = True,
    per_label: bool = True,
) -> tuple[DetectConfig, pd.DataFrame]:
    """The post-processing settings (threshold, smoothing, gap merging, minimum
    duration, and each label's threshold) that score best on annotated recordings: a
    validation set, never the recordings the settings will be judged on.

    The windows are scored once (:func:`detect` with ``settings``' hop); each
    combination of ``grid`` only turns the kept timelines into events again and scores
    them with sed_eval (about 0.06 s a setting on ten 1-minute recordings). Then, from
    the best combination, each label in turn takes the threshold of
    :data:`LABEL_THRESHOLD_GRID` that scores best with the others held (one pass of
    coordinate ascent): labels differ in how sure the model is of them, a single
    threshold fits none of them well. A label keeps its threshold unless another
    scores strictly better, so a label the validation set says nothing about is left
    as it was. A file that cannot be read is named in a warning and left out.

    Parameters
    ----------
    model : path or Classifier
    reference : DataFrame
        Annotated events with ``path`` (:func:`soundsight.evaluation.read_event_annotations`);
        every file listed is scored, those with no event too.
    settings : DetectConfig, optional
        The hop and background labels, and the values of fields ``grid`` leaves out.
    grid : dict, optional
        Field name to the values to try (default :data:`TUNING_GRID`). A model with
        tuned per-class thresholds also tries them (``threshold`` None).
    metric : str
        One of :data:`TUNING_METRICS`.
    per_label : bool
        Also tune each label's threshold (``label_thresholds``).

    Returns
    -------
    best, table
        The best settings, and every combination tried with its scores, best first;
        a column ``label_thresholds`` (``label=value`` pairs, empty for the grid's
        rows), the per-label pass's row first where it beats the grid.
    """
    import itertools
    from dataclasses import replace

    from .evaluation import event_scores

    if metric not in TUNING_METRICS:
        raise ConfigError(f"unknown metric {metric!r}; choose from {TUNING_METRICS}")
    settings = settings or DetectConfig()
    classifier = _loaded(model)
    grid_: dict[str, Sequence[Any]] = dict(TUNING_GRID if grid is None else grid)
    unknown = set(grid_) - {"threshold", "smooth_seconds", "merge_gap", "min_duration"}
    if unknown:
        raise ConfigError(f"cannot tune {sorted(unknown)}: only the post-processing fields")
    if "threshold" in grid_ and classifier.spec.thresholds:
        grid_["threshold"] = (None, *grid_["threshold"])
    paths = list(dict.fromkeys(reference["path"]))
    found = detect(classifier, paths, settings, progress=progress, keep_timelines=True)
    if found.failures:
        shown = "; ".join(f"{path}: {reason}" for path, reason in found.failures[:3])
        warnings.warn(f"{len(found.failures)} files left out of tuning ({shown})", stacklevel=2)
    names = dict(zip(reference["path"], reference["filename"], strict=False))
    scored = [names[p] for p in paths if p in found.timelines]
    labels = [label for label in classifier.labels if label not in settings.background]

    def overall(trial: DetectConfig) -> dict[str, float]:
        limits = thresholds(classifier, trial)
        tables = [
            find_events(line, trial, limits).assign(filename=names[path])
            for path, line in found.timelines.items()
        ]
        estimated = pd.concat(tables, ignore_index=True)
        return _overall(event_scores(reference, estimated, labels, scored))

    rows = []
    for values in itertools.product(*grid_.values()):
        chosen = dict(zip(grid_, values, strict=True))
        rows.append({**chosen, "label_thresholds": "", **overall(replace(settings, **chosen))})
    # sed_eval's F1 is NaN where nothing was detected: such settings rank last.
    table = pd.DataFrame(rows).sort_values(
        metric, ascending=False, kind="stable", na_position="last"
    )
    top = table.iloc[0]
    chosen = {k: None if pd.isna(top[k]) else float(top[k]) for k in grid_}
    best: DetectConfig = replace(settings, **chosen)
    if per_label:
        start = -math.inf if pd.isna(top[metric]) else float(top[metric])
        best, row = _tune_label_thresholds(best, labels, overall, metric, start)
        if row is not None:
            table = pd.concat([pd.DataFrame([{**chosen, **row}]), table])
    return best, table.reset_index(drop=True)


def _tune_label_thresholds(
    settings: DetectConfig,
    labels: Sequence[str],
    overall: Callable[[DetectConfig], dict[str, float]],
    metric: str,
    score: float,
) -> tuple[DetectConfig, dict[str, Any] | None]:
    """:func:`tune`'s per-label pass: the settings with each label's threshold
    changed where that scores strictly better, and their table row (None: no change
    helped)."""
    from dataclasses import replace

    best, row = settings, None
    for label in labels:
        for value in LABEL_THRESHOLD_GRID:
            trial = replace(best, label_thresholds={**best.label_thresholds, label: value})
            scores = overall(trial)
            if scores[metric] > score:  # NaN (nothing detected) is never better
                best, score = trial, scores[metric]
                pairs = " ".join(f"{k}={v:g}" for k, v in best.label_thresholds.items())
                row = {"label_thresholds": pairs, **scores}
    return best, row


def _loaded(model: str | os.PathLike | Model) -> Model:
    """A loaded model, or the model file read with the torch runtime (timelines slide
    windows through the torch scorer)."""
    if isinstance(model, Classifier | FrozenClassifier):
        return model
    return load_classifier(model, "torch")


def _overall(scores: dict) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in scores.items() if k not in ("per_class", "files")}


def write_events(found: Detection, out: str | os.PathLike) -> Path:
    """Write the events: ``.json`` (per file: duration, events; plus the failures),
    else CSV (the DCASE columns ``filename,onset,offset,event_label`` plus
    ``probability``); written whole (temporary name, then renamed)."""
    out = Path(out)
    if out.suffix.lower() != ".json":
        return write_csv(found.events, out)
    files = [
        {
            "filename": name,
            "duration_s": round(duration, 3),
            "events": found.events.loc[found.events["filename"] == name, list(EVENT_COLUMNS[1:])]
            .astype(object)
            .to_dict("records"),
        }
        for name, duration in found.durations.items()
    ]
    record = {
        "files": files,
        "failures": [{"filename": p, "reason": r} for p, r in found.failures],
    }
    text = json.dumps(record, indent=1).encode("utf-8")
    return write_whole(out, lambda file: file.write(text))


def plot_timeline(line: Timeline, events: pd.DataFrame, features):
    """A matplotlib Figure: the spectrogram (time in s, mel-spaced Hz) with, under it on
    the same time axis, one row of bands per label that has events (shaded by peak
    probability) over that label's frame-wise probability."""
    from matplotlib.figure import Figure

    from .features import colorize
    from .plots import OKABE_ITO, SPECTROGRAM_CMAP, mel_ticks

    found = list(dict.fromkeys(events["event_label"])) if len(events) else []
    figure = Figure(figsize=(10, 2.6 + 0.35 * max(1, len(found))), layout="constrained")
    top, bottom = figure.subplots(
        2, 1, sharex=True, height_ratios=[2.2, 0.35 * max(1, len(found)) + 0.3]
    )
    n_mels = line.spectrogram.shape[0]
    top.imshow(
        colorize(line.spectrogram, features.floor_db, SPECTROGRAM_CMAP),
        aspect="auto",
        extent=(0, line.duration, 0, n_mels),
        interpolation="nearest",
    )
    ticks, names = mel_ticks(features, n_mels)
    top.set_yticks(ticks, names)
    top.set_ylabel("Hz")
    edges = line.edges
    for row, label in enumerate(found):
        colour = OKABE_ITO[row % len(OKABE_ITO)]
        column = line.labels.index(label)
        # The label's probability as a step curve inside its row, then its events.
        bottom.stairs(
            row + 0.1 + 0.8 * line.probabilities[:, column],
            edges,
            baseline=row + 0.1,
            fill=True,
            color=colour,
            alpha=0.25,
            linewidth=0,
        )
        mine = events[events["event_label"] == label]
        bottom.broken_barh(
            list(zip(mine["onset"], mine["offset"] - mine["onset"], strict=True)),
            (row + 0.1, 0.8),
            facecolors=colour,
            alpha=0.8,
        )
    bottom.set_yticks([r + 0.5 for r in range(len(found))], found)
    bottom.set_ylim(0, max(1, len(found)))
    bottom.set_xlim(0, line.duration)
    bottom.set_xlabel("time (s)")
    if not found:
        bottom.text(0.5, 0.5, "no events", transform=bottom.transAxes, ha="center", va="center")
    for ax in (top, bottom):
        ax.tick_params(labelsize=7)
    return figure

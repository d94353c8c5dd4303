"""What a model's scores mean: temperature scaling, calibration error, and "unknown".

Training fits one temperature ``T`` on the validation side (:func:`fit_temperature`):
every path from logits to probabilities divides the logits by it
(:func:`soundsight.models.tempered_probabilities`, applied by
:func:`soundsight.models.window_scores`), so a clip's top probability is close to how
often such a clip is right (:func:`expected_calibration_error`, :func:`reliability`).
Then a *rejection score* (higher: more like the known classes) and a threshold are
chosen on the same validation clips so that a stated share of known clips is kept
(:class:`Rejection`); a clip scoring below it is answered ``unknown``.

Rejection scores (:data:`REJECTION_SCORES`):

``max_probability``
    the clip's top calibrated probability (Hendrycks & Gimpel's baseline);
``centroid_cosine``
    cosine similarity of the clip's embedding (the pooled features the head reads) to
    the nearest class centroid of the training clips' embeddings.

This module needs no torch at import (model files are read by the torch-free runtime);
:func:`fit_temperature` imports it when called.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pandas as pd

from .errors import ConfigError

#: Fewer validation clips than this fit neither a temperature nor a threshold: one
#: scalar fitted on a dozen clips, or a 5% quantile of them, is noise.
MIN_CALIBRATION_CLIPS = 20
#: Bins of the expected calibration error and the reliability diagram (Guo et al. 2017).
ECE_BINS = 15
#: Share of known validation clips kept by the default threshold.
DEFAULT_KEEP = 0.95
REJECTION_SCORES = ("max_probability", "centroid_cosine")
#: The score a new model file uses: measured best (benchmarks/bench_scores.py).
DEFAULT_REJECTION_SCORE = "centroid_cosine"
#: The answer for a clip below the threshold (``predict --unknown-label`` renames it).
UNKNOWN_LABEL = "unknown"
#: Temperatures outside this range are a broken fit or a hand-edited file.
TEMPERATURE_RANGE = (1e-2, 1e2)


def check_keep(keep: float) -> float:
    """``keep`` if it is a share of known clips in (0, 1], else :class:`ConfigError`."""
    if not isinstance(keep, int | float) or not 0.0 < keep <= 1.0:
        raise ConfigError(f"--keep must be a share of known clips in (0, 1], got {keep!r}")
    return float(keep)


def _bins(probabilities: np.ndarray, targets: np.ndarray, bins: int):
    """Confidence, correctness and bin number per clip (equal-width bins over [0, 1])."""
    probabilities = np.asarray(probabilities, np.float64)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(targets)
    number = np.minimum((confidence * bins).astype(int), bins - 1)
    return confidence, correct, number


def reliability(
    probabilities: np.ndarray, targets: Sequence[int] | np.ndarray, bins: int = ECE_BINS
) -> pd.DataFrame:
    """The reliability diagram's numbers: per equal-width confidence bin, its bounds,
    clip count, mean top probability and accuracy (NaN where the bin is empty)."""
    confidence, correct, number = _bins(probabilities, np.asarray(targets), bins)
    counts = np.bincount(number, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(number, confidence, bins) / counts
        accuracy = np.bincount(number, correct.astype(float), bins) / counts
    edges = np.linspace(0.0, 1.0, bins + 1)
    return pd.DataFrame(
        {
            "low": edges[:-1],
            "high": edges[1:],
            "clips": counts,
            "confidence": mean_confidence,
            "accuracy": accuracy,
        }
    )


def expected_calibration_error(
    probabilities: np.ndarray, targets: Sequence[int] | np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE: the clip-weighted mean gap between accuracy and top probability over
    ``bins`` equal-width confidence bins (Guo et al. 2017); 0 is perfectly calibrated.
    Written here because sklearn has no multi-class ECE."""
    return expected_calibration_error_of_bins(reliability(probabilities, targets, bins))


def expected_calibration_error_of_bins(table: pd.DataFrame) -> float:
    """ECE from :func:`reliability`'s table (the clip-weighted mean of its gaps)."""
    filled = table[table["clips"] > 0]
    gaps = (filled["accuracy"] - filled["confidence"]).abs() * filled["clips"]
    return float(gaps.sum() / max(1, int(table["clips"].sum())))


def ece_noise_floor(
    probabilities: np.ndarray, bins: int = ECE_BINS, draws: int = 1000, seed: int = 0
) -> float:
    """The ECE a perfectly calibrated model would show on these clips: the mean, over
    ``draws`` simulated label sets, of :func:`expected_calibration_error` when each clip
    is right with probability equal to its top probability.

    ECE on few clips is mostly sampling noise: with 83 validation clips at a mean top
    probability of 0.59 (an ESC-50 fold) this is about 0.13, so an ECE near it means
    the model is as calibrated as that many clips can show, and no temperature can
    bring the measured value much below it. Simulated because the bins' counts and
    confidences make the expectation awkward in closed form."""
    confidence = np.asarray(probabilities, np.float64).max(axis=1)
    if len(confidence) == 0:
        return 0.0
    number = np.minimum((confidence * bins).astype(int), bins - 1)
    correct = np.random.default_rng(seed).random((draws, len(confidence))) < confidence
    # Per draw and bin: |sum of (correct - confidence)|, i.e. count x |accuracy - confidence|.
    offsets = (np.arange(draws)[:, None] * bins + number).ravel()
    gaps = np.bincount(offsets, (correct - confidence).ravel(), draws * bins)
    return float(np.abs(gaps.reshape(draws, bins)).sum(axis=1).mean() / len(confidence))


def fit_temperature(window_logits, counts: Sequence[int], targets: Sequence[int]) -> float:
    """The temperature minimising the validation NLL of the clips' probabilities.

    A clip's probabilities are the mean over its windows of the tempered softmax, as
    prediction computes them, so the fit is on exactly what a user will read. Written
    with torch's LBFGS (a few lines): sklearn and netcal fit temperature on one logit
    row per sample, not on a mean over windows. ``log T`` is optimised, so ``T`` stays
    positive; the result is clamped to :data:`TEMPERATURE_RANGE`.

    Parameters
    ----------
    window_logits : Tensor ``(windows, classes)``
        Every window's logits, the windows of clip ``i`` consecutive.
    counts : sequence of int
        Windows per clip.
    targets : sequence of int
        Each clip's true class.
    """
    import torch

    from .models import tempered_probabilities

    logits = torch.as_tensor(window_logits, dtype=torch.float64).detach()
    owners = torch.repeat_interleave(torch.arange(len(counts)), torch.as_tensor(counts))
    sizes = torch.as_tensor(counts, dtype=torch.float64)[:, None]
    truth = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def nll() -> torch.Tensor:
        optimizer.zero_grad()
        windows = tempered_probabilities(logits, log_t.exp())
        clips = torch.zeros(len(counts), logits.shape[1], dtype=torch.float64)
        clips = clips.index_add(0, owners, windows) / sizes
        loss = -clips.gather(1, truth[:, None]).clamp_min(1e-12).log().mean()
        loss.backward()
        return loss

    optimizer.step(nll)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    return min(max(temperature, TEMPERATURE_RANGE[0]), TEMPERATURE_RANGE[1])


def tempered_clip_probabilities(
    window_logits, counts: Sequence[int], temperature: float
) -> np.ndarray:
    """Clip probabilities ``(clips, classes)`` at ``temperature``: the mean over each
    clip's windows of :func:`soundsight.models.tempered_probabilities`."""
    import torch

    from .models import tempered_probabilities

    windows = tempered_probabilities(torch.as_tensor(window_logits).float(), temperature)
    return torch.stack([w.mean(0) for w in windows.split(list(counts))]).numpy()


def class_centroids(embeddings: np.ndarray, targets: np.ndarray, classes: int) -> np.ndarray:
    """Unit-length mean of each class's unit-length embeddings ``(classes, dim)``; a
    class without clips gets a zero row (it is never the nearest)."""
    unit = _unit(np.asarray(embeddings, np.float64))
    centroids = np.zeros((classes, unit.shape[1]))
    np.add.at(centroids, np.asarray(targets), unit)
    return _unit(centroids)


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms > 0, norms, 1.0)


def rejection_scores(
    name: str,
    probabilities: np.ndarray,
    embeddings: np.ndarray | None = None,
    centroids: np.ndarray | None = None,
) -> np.ndarray:
    """One rejection score per clip, higher meaning more like the known classes."""
    if name == "max_probability":
        return np.asarray(probabilities, np.float64).max(axis=1)
    if name == "centroid_cosine":
        if embeddings is None or centroids is None:
            raise ValueError("centroid_cosine needs the clips' embeddings and the centroids")
        return (_unit(np.asarray(embeddings, np.float64)) @ np.asarray(centroids).T).max(axis=1)
    raise ConfigError(f"unknown rejection score {name!r}; choose from {REJECTION_SCORES}")


def threshold_for_keep(scores: np.ndarray, keep: float) -> float:
    """The largest threshold that keeps at least ``keep`` of the clips scoring
    ``scores`` (a clip is kept when its score is at least the threshold)."""
    ordered = np.sort(np.asarray(scores, np.float64))
    dropped = int(math.floor((1.0 - check_keep(keep)) * len(ordered) + 1e-9))
    return float(ordered[min(dropped, len(ordered) - 1)])


@dataclass(frozen=True)
class Rejection:
    """The rule that answers ``unknown``: a score, its threshold, how it was chosen.

    Attributes
    ----------
    score : str
        One of :data:`REJECTION_SCORES`.
    threshold : float
        Clips scoring below it are unknown.
    keep : float
        The share of known validation clips the threshold was chosen to keep.
    clips : int
        Validation clips it was chosen on.
    centroids : tuple of tuple of float
        The class centroids (``centroid_cosine`` only), one row per label.
    """

    score: str
    threshold: float
    keep: float
    clips: int
    centroids: tuple[tuple[float, ...], ...] = ()

    @property
    def needs_embeddings(self) -> bool:
        return self.score == "centroid_cosine"

    def scores(self, probabilities: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Each clip's rejection score (rows of ``probabilities`` and ``embeddings``)."""
        centroids = np.asarray(self.centroids) if self.centroids else None
        return rejection_scores(self.score, probabilities, embeddings, centroids)

    def known(self, probabilities: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Per clip: whether it is kept as one of the known classes."""
        return self.scores(probabilities, embeddings) >= self.threshold

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "score": self.score,
            "threshold": self.threshold,
            "keep": self.keep,
            "clips": self.clips,
        }
        if self.centroids:
            record["centroids"] = [list(row) for row in self.centroids]
        return record

    @classmethod
    def from_dict(cls, record: Any, labels: int | None = None) -> Rejection | None:
        """The rule stored in a model file (``None`` for ``{}``: no rejection); a
        :class:`ValueError` says which part of the record is wrong. With ``labels``,
        the centroids must be one per label."""
        if record == {}:
            return None
        if not isinstance(record, dict) or set(record) - {
            "score",
            "threshold",
            "keep",
            "clips",
            "centroids",
        }:
            raise ValueError("must be {} or an object with score, threshold, keep, clips")
        score, threshold = record.get("score"), record.get("threshold")
        keep, clips = record.get("keep"), record.get("clips")
        if score not in REJECTION_SCORES:
            raise ValueError(f"score must be one of {REJECTION_SCORES}, not {score!r}")
        if not _number(threshold) or not _number(keep) or not 0.0 < cast(float, keep) <= 1.0:
            raise ValueError("threshold must be a finite number and keep in (0, 1]")
        if not isinstance(clips, int) or isinstance(clips, bool) or clips < 0:
            raise ValueError("clips must be a count")
        rows = record.get("centroids", [])
        if (score == "centroid_cosine") != bool(rows):
            raise ValueError("centroids are needed by centroid_cosine, and by it only")
        if rows and (
            not isinstance(rows, list)
            or not all(isinstance(r, list) and len(r) == len(rows[0]) > 0 for r in rows)
            or not all(_number(v) for r in rows for v in r)
        ):
            raise ValueError("centroids must be equal-length lists of numbers")
        if rows and labels is not None and len(rows) != labels:
            raise ValueError(f"{len(rows)} centroids for {labels} labels")
        return cls(
            score,
            float(cast(float, threshold)),
            float(cast(float, keep)),
            clips,
            tuple(tuple(map(float, r)) for r in rows),
        )


def known_clips(
    rejection: Rejection | None, probabilities: np.ndarray, embeddings: np.ndarray | None = None
) -> np.ndarray:
    """Per clip (rows of calibrated ``probabilities`` and, where the rule needs them,
    ``embeddings``): whether it is one of the known classes under ``rejection``;
    ``True`` everywhere without a rule (a model file from before it existed, or trained
    on too few validation clips). What both runtimes answer."""
    probabilities = np.atleast_2d(probabilities)
    if rejection is None:
        return np.ones(len(probabilities), bool)
    return rejection.known(probabilities, None if embeddings is None else np.atleast_2d(embeddings))


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_temperature(value: Any) -> float:
    """A stored temperature, or :class:`ValueError` saying what is wrong with it."""
    low, high = TEMPERATURE_RANGE
    if not _number(value) or not low <= value <= high:
        raise ValueError(f"must be a number from {low:g} to {high:g}, not {value!r}")
    return float(value)


def check_rejection(record: Any) -> dict[str, Any]:
    """A stored rejection rule (see :meth:`Rejection.from_dict`), as a plain dict. The
    centroids' count is checked against the labels once the weights are known to fit
    them (:class:`soundsight.prediction.Classifier`): a head of the wrong size is the
    clearer message."""
    rule = Rejection.from_dict(record)
    return {} if rule is None else rule.to_dict()


def check_calibration(record: Any) -> dict[str, Any]:
    """A stored calibration summary (names to numbers or text)."""
    if not isinstance(record, dict) or not all(
        isinstance(v, str) or _number(v) for v in record.values()
    ):
        raise ValueError("must map names to numbers or text")
    return dict(record)


@dataclass(frozen=True)
class Calibrated:
    """What :func:`calibrate` found on the validation side."""

    temperature: float
    #: ``clips``, ``ece_before``, ``ece_after`` (15 bins), ``ece_floor``
    #: (:func:`ece_noise_floor` at the fitted temperature), ``nll_before``/``after``, or
    #: a ``note`` saying why nothing was fitted.
    summary: dict[str, Any]
    #: The validation clips' probabilities at ``temperature``.
    probabilities: np.ndarray
    rejection: Rejection | None
    #: :func:`reliability` at temperature 1 (``side`` "before") and at the fitted one
    #: ("after"): the reliability diagram's numbers (``reliability.csv``).
    reliability: pd.DataFrame


def calibrate(
    window_logits,
    counts: Sequence[int],
    targets: Sequence[int],
    *,
    keep: float = DEFAULT_KEEP,
    score: str = DEFAULT_REJECTION_SCORE,
    embeddings: np.ndarray | None = None,
    centroids: np.ndarray | None = None,
) -> Calibrated:
    """Fit the temperature and the rejection threshold on validation clips.

    With fewer than :data:`MIN_CALIBRATION_CLIPS` clips nothing is fitted: the
    temperature stays 1, there is no rejection, and ``summary["note"]`` says why.
    ``embeddings`` (of the validation clips) and ``centroids`` (of the training
    clips) are needed by ``centroid_cosine`` only.
    """
    check_keep(keep)
    labels = np.asarray(targets)
    before = tempered_clip_probabilities(window_logits, counts, 1.0)
    if len(labels) < MIN_CALIBRATION_CLIPS:
        note = (
            f"validation side has {len(labels)} clips, fewer than "
            f"{MIN_CALIBRATION_CLIPS}: temperature kept at 1, no 'unknown' threshold"
        )
        table = reliability(before, labels).assign(side="before")
        return Calibrated(1.0, {"clips": len(labels), "note": note}, before, None, table)
    temperature = fit_temperature(window_logits, counts, targets)
    after = tempered_clip_probabilities(window_logits, counts, temperature)
    table = pd.concat(
        [
            reliability(before, labels).assign(side="before"),
            reliability(after, labels).assign(side="after"),
        ],
        ignore_index=True,
    )
    summary = {
        "clips": int(len(labels)),
        "ece_before": expected_calibration_error(before, labels),
        "ece_after": expected_calibration_error(after, labels),
        # What a perfectly calibrated model would measure on these clips: ECE on a
        # small validation side is read against it (see ece_noise_floor).
        "ece_floor": ece_noise_floor(after),
        "nll_before": _nll(before, labels),
        "nll_after": _nll(after, labels),
    }
    scores = rejection_scores(score, after, embeddings, centroids)
    # Six decimals of a unit vector are plenty, and keep the model file's header small.
    rows = (
        tuple(tuple(round(float(v), 6) for v in r) for r in centroids)
        if score == "centroid_cosine" and centroids is not None
        else ()
    )
    rejection = Rejection(score, threshold_for_keep(scores, keep), keep, len(labels), rows)
    return Calibrated(temperature, summary, after, rejection, table)


def _nll(probabilities: np.ndarray, targets: np.ndarray) -> float:
    chosen = probabilities[np.arange(len(targets)), targets]
    return float(-np.log(np.clip(chosen, 1e-12, None)).mean())

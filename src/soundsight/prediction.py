"""Using a trained model: load its file, score clips, evaluate on labelled data.

A model file alone is enough: it carries the labels, the feature parameters and the
input encoding, so :class:`Classifier` rebuilds the exact pipeline that trained it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from typing import cast

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .audio import AudioError, clip_duration
from .cache import DEFAULT_CACHE, prepare
from .calibration import Rejection, known_clips
from .data import ClipView
from .evaluation import joined_labels, score
from .features import Clip, Featuriser, flush_denormals
from .layouts import DatasetError, clip_labels, is_multi_label, multi_hot
from .modelfile import (
    FROZEN_KIND,
    ModelFileError,
    ModelSpec,
    check_fits,
    model_kind,
    read_model_file,
)
from .models import SoundNet, fold_batch_norms, window_scores
from .runtime import answer, top_labels
from .runtime import submission as submission  # with the torch-free runtime: one CSV

#: Window frames (columns) scored per forward pass on a CPU: windows per pass are this
#: over the window's width. Small batches win (activations stay in cache), and what
#: fits is an amount of image, not a number of windows: on ESC-50 (3-s windows of 258
#: frames, 2 windows per clip, 2 cores) 4 windows gave 75 clips/s, 2 gave 61, 8 gave
#: 56; 1-s windows (86 frames) score a 5-s clip's 8 in one pass in 27.8 ms, in two
#: passes of 4 in 31.8 ms (1 thread; the two passes made ``predict`` 14% slower).
FRAMES_PER_BATCH = 4 * 258

#: Windows per forward pass in the server (:meth:`Classifier.analyse`), whatever their
#: width: eight 1-s windows' activations outgrow serve's 16 MB glibc mmap threshold
#: (:mod:`soundsight.serving` sets it to bound memory under load), so every request
#: would map them afresh (4,226 page faults per clip, tests/test_hostile_server.py).
SERVE_WINDOWS_PER_BATCH = 4


#: Recordings longer than this (seconds, from their header) are featurised and scored
#: in blocks (:meth:`Featuriser.stream`), so memory does not grow with their length;
#: shorter ones are decoded whole (one pass, quicker).
STREAM_SECONDS = 120.0


def score_log_mels(
    net: SoundNet,
    view: ClipView,
    log_mels: Iterable[np.ndarray],
    embed: bool = False,
    windows_per_batch: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """The one windowed scorer, on whole log-mels: each becomes its evaluation windows
    (:meth:`ClipView.windows`), then :func:`score_windows`."""
    return score_windows(net, ([view.windows(db)] for db in log_mels), embed, windows_per_batch)


def score_windows(
    net: SoundNet,
    clips: Iterable[Iterable[np.ndarray]],
    embed: bool = False,
    windows_per_batch: int | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Score clips given as their evaluation windows, each clip an iterable of window
    arrays ``(k, n_mels, frames)``: windows of consecutive clips share forward passes
    of about ``windows_per_batch`` (None: as many as :data:`FRAMES_PER_BATCH` holds),
    and each clip gets the mean of its windows' probabilities (and, with ``embed``, of
    their penultimate embeddings).

    Yields ``(probabilities, embedding or None)`` per clip, in order, as soon as the
    clip's last window is scored: memory holds one batch, not the whole input.
    """
    device = next(net.parameters()).device
    pending: list[np.ndarray] = []  # windows waiting for a forward pass
    owners: list[int] = []  # clip number of each pending window
    sums: dict[int, list] = {}  # clip -> [probability sum, embedding sum, windows]
    done = 0  # clips whose every window went into pending

    def flush() -> None:
        windows = torch.from_numpy(np.concatenate(pending))[:, None].to(device)
        probabilities, embeddings = window_scores(net, windows, embed)
        for clip in sorted(set(owners)):
            mine = torch.tensor([o == clip for o in owners], device=device)
            total = sums.setdefault(clip, [0.0, 0.0, 0])
            total[0] = total[0] + probabilities[mine].sum(0)
            if embeddings is not None:
                total[1] = total[1] + embeddings[mine].sum(0)
            total[2] += int(mine.sum())
        pending.clear()
        owners.clear()

    def finished(limit: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        for clip in sorted(c for c in sums if c < limit):
            probability, embedding, count = sums.pop(clip)
            yield (
                (probability / count).float().cpu().numpy(),
                (embedding / count).float().cpu().numpy() if embed else None,
            )

    with torch.inference_mode(), flush_denormals():
        for clip, chunks in enumerate(clips):
            for windows in chunks:
                per_pass = windows_per_batch or max(1, FRAMES_PER_BATCH // windows.shape[-1])
                for start in range(0, len(windows), per_pass):
                    pending.append(windows[start : start + per_pass])
                    owners.extend([clip] * len(pending[-1]))
                    if len(owners) >= per_pass:
                        flush()
            done = clip + 1
            if not pending:
                yield from finished(done)
        if pending:
            flush()
        yield from finished(done)


class Classifier:
    """A trained model ready to label clips.

    Examples
    --------
    >>> clf = Classifier.load("runs/fsdd/model.safetensors")
    >>> clf.predict("7_theo_3.wav", top_k=3)
    [('7', 0.98), ('1', 0.01), ('9', 0.003)]
    """

    def __init__(self, net: SoundNet, spec: ModelSpec):
        self.net = net.eval()
        # The one place a model file's temperature (and its kind: one label per clip,
        # softmax, or several, sigmoids) reaches the network: every score below
        # (predict, evaluate, serve, detect, the report) goes through window_scores.
        self.net.temperature = spec.temperature
        self.net.multi_label = spec.multi_label
        self.spec = spec
        #: When a clip is answered ``unknown`` (None: never; see soundsight.calibration).
        try:
            self.rejection = Rejection.from_dict(spec.rejection, len(spec.labels))
        except ValueError as err:
            raise ModelFileError(f"model file: field 'rejection': {err}") from None
        self.labels = list(spec.labels)
        self.features = spec.features
        self.view = ClipView.for_model(net.config, spec.features)
        self.featurise = Featuriser(spec.features)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Classifier:
        """Read a model file (safetensors + a validated JSON header; no pickled code
        runs); :class:`~soundsight.modelfile.ModelFileError` names the file and the
        problem."""
        tensors, spec = read_model_file(path)
        return cls.from_tensors(tensors, spec, path).to(device)

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], spec: ModelSpec, source: str | os.PathLike
    ) -> Classifier:
        """The classifier of a validated record and its weights (read from ``source``:
        a model file, or the network fused into a frozen one); a tensor that does not
        fit the network is a :class:`~soundsight.modelfile.ModelFileError`."""
        net = SoundNet(
            spec.model,
            len(spec.labels),
            spec.features.floor_db,
            pretrained=False,
            multi_label=spec.multi_label,
        )
        check_fits(source, net.backbone, tensors)
        net.backbone.load_state_dict(tensors)
        return cls(net, spec)._folded()

    @classmethod
    def from_backbone(
        cls,
        name: str = "aisfx",
        crop_seconds: float | None = None,
        device: str | torch.device = "cpu",
    ) -> Classifier:
        """A pretrained backbone with its offline weights and no trained head (one
        zero output, label ``embedding``): what embeds clips for the search index
        (:mod:`soundsight.search`). Its front end and window length are the backbone's
        own (aisfx: 2.32-s blocks), else soundsight's log-mel and ``crop_seconds``
        (default 2 s)."""
        from .config import FeatureConfig, ModelConfig
        from .models import OFFLINE_BACKBONES, backbone_configs

        source = OFFLINE_BACKBONES.get(name)
        crop = crop_seconds or (source.crop_seconds if source else None) or 2.0
        features, model = backbone_configs(
            FeatureConfig(), ModelConfig(backbone=name, crop_seconds=crop)
        )
        net = SoundNet(model, 1, features.floor_db, pretrained=True)
        spec = ModelSpec(("embedding",), features, model, notice=source.notice if source else "")
        return cls(net, spec)._folded().to(device)

    def _folded(self) -> Classifier:
        """Inference only from here on: batch norms fold into the convolutions, checked
        on one random window of the model's input shape."""
        features = self.spec.features
        shape = self.view.windows(np.zeros((features.n_mels, 1), np.float32)).shape[1:]
        window = torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(0))
        fold_batch_norms(self.net, window * features.floor_db)
        return self

    def to(self, device: str | torch.device) -> Classifier:
        self.net.to(device)
        self.featurise.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def windows(self, clip: Clip) -> Iterable[np.ndarray]:
        """A clip's evaluation windows, as :func:`score_windows` takes them: read in
        blocks for a recording longer than :data:`STREAM_SECONDS`, else whole."""
        if isinstance(clip, str | os.PathLike) and clip_duration(clip) > STREAM_SECONDS:
            frames, blocks = self.featurise.stream(clip)
            return self.view.stream_windows(blocks, frames)
        return [self.view.windows(self.log_mel(clip))]

    def log_mel(self, clip: Clip, max_duration: float | None = None) -> np.ndarray:
        """The model's log-mel of a clip: a file path, encoded bytes, or a mono
        waveform already at ``features.sample_rate``."""
        return self.featurise(clip, max_duration)

    def score(
        self,
        log_mels: Iterable[np.ndarray],
        embed: bool = False,
        windows_per_batch: int | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Per clip, in order: probabilities and (with ``embed``) the embedding; see
        :func:`score_log_mels`."""
        return score_log_mels(self.net, self.view, log_mels, embed, windows_per_batch)

    def probabilities(self, log_mels: Iterable[np.ndarray]) -> np.ndarray:
        """Class probabilities ``(clips, labels)`` of log-mels, windows averaged."""
        rows = [p for p, _ in self.score(log_mels)]
        return np.stack(rows) if rows else np.zeros((0, len(self.labels)), np.float32)

    def embeddings(self, log_mels: Iterable[np.ndarray]) -> np.ndarray:
        """Penultimate embeddings ``(clips, dim)``: the mean over each clip's windows."""
        # With embed=True every clip has an embedding (never None).
        rows = cast(list[np.ndarray], [e for _, e in self.score(log_mels, embed=True)])
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    @property
    def needs_embeddings(self) -> bool:
        """Whether the 'unknown' rule reads embeddings (score them alongside)."""
        return self.rejection is not None and self.rejection.needs_embeddings

    def known(self, probabilities: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """Per clip (rows of calibrated ``probabilities`` and, where the rule needs
        them, ``embeddings``): whether it is one of the known classes under the model
        file's rule; ``True`` everywhere when the file has none (trained before it
        existed, or on too few validation clips)."""
        return known_clips(self.rejection, probabilities, embeddings)

    def top(self, probabilities: np.ndarray, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` most probable (label, probability) pairs, best first."""
        return top_labels(self.labels, probabilities, k)

    def analyse(self, clip: Clip) -> tuple[np.ndarray, np.ndarray, bool]:
        """A clip's probabilities, its log-mel and whether it is one of the known
        classes (:class:`~soundsight.runtime.ClipScorer`, what the server asks of either
        runtime)."""
        db = self.log_mel(clip)
        scored = self.score([db], self.needs_embeddings, SERVE_WINDOWS_PER_BATCH)
        probabilities, embedding = next(scored)
        return probabilities, db, bool(self.known(probabilities, embedding)[0])

    def spectrogram_png(self, db: np.ndarray) -> bytes:
        """The page's picture of a log-mel, as PNG bytes."""
        from .images import spectrogram_png

        return spectrogram_png(db, self.features.floor_db)

    def predict(self, clip: Clip, top_k: int = 3) -> list[tuple[str, float]]:
        """The ``top_k`` (label, probability) pairs for one clip (path, bytes or
        waveform); for a multi-label model, every label at or above its threshold
        (:func:`~soundsight.runtime.present_labels`)."""
        return answer(self.spec, self.clip_probabilities(clip), top_k)

    def clip_probabilities(self, clip: Clip) -> np.ndarray:
        """One clip's probabilities (path, bytes or waveform), its windows averaged."""
        probabilities, _ = next(score_windows(self.net, [self.windows(clip)]))
        return probabilities

    def predict_files(
        self,
        paths: Sequence[str | os.PathLike],
        workers: int | None = None,
        progress: bool = True,
    ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
        """Probabilities for many files, decoded in order (in ``workers`` DataLoader
        processes when > 0) and scored by :func:`score_log_mels`.

        Returns a frame (``path`` then one column per label; ``frame.attrs["known"]``
        holds :meth:`known` per row) and the files that could not be read, as
        ``(path, reason)``; one bad file never stops the rest.
        """
        if workers is None:
            # On 2 cores a decoding process only competes with the model's threads
            # (measured: 65 vs 85 clips/s); with more cores it overlaps decoding.
            workers = 0 if (os.cpu_count() or 1) <= 2 else 2
        loader = torch.utils.data.DataLoader(
            _DecodedClips([str(p) for p in paths], self.featurise),
            batch_size=None,
            num_workers=workers,
            multiprocessing_context="fork" if workers else None,
        )
        failures: list[tuple[str, str]] = []
        embed = self.needs_embeddings
        # file number -> (probabilities, embedding or None)
        results: dict[int, tuple[np.ndarray, np.ndarray | None]] = {}
        short: list[int] = []  # file numbers of the clips given to the shared batches

        def windows() -> Iterator[Iterable[np.ndarray]]:
            with tqdm(total=len(paths), desc="predict", unit="clip", disable=not progress) as bar:
                for number, (path, db, reason) in enumerate(loader):
                    bar.update(1)
                    if reason == _LONG:  # scored on its own, in blocks, as it is read
                        try:
                            results[number] = next(
                                score_windows(self.net, [self.windows(path)], embed)
                            )
                        except AudioError as err:
                            failures.append((path, err.reason))
                    elif db is None:
                        failures.append((path, reason))
                    else:
                        short.append(number)
                        yield [self.view.windows(np.asarray(db))]

        for count, scored in enumerate(score_windows(self.net, windows(), embed)):
            results[short[count]] = scored
        order = sorted(results)
        frame = pd.DataFrame([results[n][0] for n in order], columns=self.labels)
        frame.insert(0, "path", [str(paths[n]) for n in order])
        if order:
            embeddings = (
                np.stack([cast(np.ndarray, results[n][1]) for n in order]) if embed else None
            )
            frame.attrs["known"] = self.known(frame[self.labels].to_numpy(), embeddings)
        else:
            frame.attrs["known"] = np.ones(0, bool)
        return frame, failures


class _DecodedClips(torch.utils.data.Dataset):
    """Files featurised on the fly (in DataLoader workers) for prediction."""

    def __init__(self, paths: list[str], featurise: Featuriser):
        self.paths, self.featurise = paths, featurise

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            if clip_duration(path) > STREAM_SECONDS:
                return path, None, _LONG  # read in blocks by the scoring process
            return path, self.featurise(path), None
        except AudioError as err:
            return path, None, err.reason


#: Marks a recording that :meth:`Classifier.windows` reads in blocks.
_LONG = "long recording"


def evaluate(
    model: str | os.PathLike | Classifier,
    clips: pd.DataFrame,
    cache: str | os.PathLike | None = None,
    progress: bool = True,
) -> tuple[dict, pd.DataFrame, list[tuple[str, str]]]:
    """Score a model on labelled clips.

    The clips are featurised into the cache with the model's own feature config (a
    cache made with other parameters is refused, not mixed). Returns the metrics of
    :func:`soundsight.evaluation.score`, per-clip probabilities, and the clips that
    could not be decoded.

    A multi-label model is scored on the clips' label lists (a single-label table: one
    label each) at its tuned thresholds (:func:`soundsight.evaluation.multi_label_score`);
    its frame has ``labels`` ("dog;rain") in place of ``label``. A single-label model
    given a multi-label table is refused. A frozen-embedding model file is scored by
    :func:`soundsight.frozen.evaluate_frozen`.
    """
    if not isinstance(model, Classifier) and model_kind(model) == FROZEN_KIND:
        from .frozen import evaluate_frozen

        return evaluate_frozen(model, clips, cache, progress)
    classifier = model if isinstance(model, Classifier) else Classifier.load(model)
    multi = classifier.spec.multi_label
    if is_multi_label(clips) and not multi:
        raise DatasetError(
            "these clips have several labels each (a multi-label layout or "
            "--label-separator), but the model is single-label: train a multi-label "
            "model on them (soundsight train, which detects the layout), or evaluate "
            "with one label per clip"
        )
    given = clip_labels(clips)
    unknown = sorted({x for labels in given for x in labels} - set(classifier.labels))
    if unknown:
        raise DatasetError(f"labels unknown to the model: {', '.join(map(str, unknown[:5]))}")
    feature_cache, report = prepare(
        clips, cache or DEFAULT_CACHE, classifier.features, progress=progress
    )
    kept = np.array([p in feature_cache for p in clips["path"]], bool)
    clips = clips[kept].reset_index(drop=True)
    index = {label: i for i, label in enumerate(classifier.labels)}
    given = [labels for labels, keep in zip(given, kept, strict=True) if keep]
    targets = multi_hot(given, index) if multi else clips["label"].map(index).to_numpy()
    log_mels = (
        feature_cache.load(path)
        for path in tqdm(clips["path"], desc="evaluate", unit="clip", disable=not progress)
    )
    probabilities = classifier.probabilities(log_mels)
    frame = pd.DataFrame(probabilities, columns=classifier.labels)
    if multi:
        frame.insert(0, "labels", joined_labels(classifier.labels, targets))
    else:
        frame.insert(0, "label", clips["label"].to_numpy())
    frame.insert(0, "path", clips["path"].to_numpy())
    metrics = score(probabilities, targets, classifier.labels, classifier.spec.thresholds or None)
    return metrics, frame, report.failures

"""Using a trained model: load its file, score clips, evaluate on labelled data.

A model file alone is enough: it carries the labels, the feature parameters and the
input encoding, so :class:`Classifier` rebuilds the exact pipeline that trained it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .audio import AUDIO_EXTENSIONS, AudioError, decode_bytes, load_clip
from .cache import DEFAULT_CACHE, prepare
from .config import config_from_dict
from .data import CachedClips, ClipView, collate_windows
from .errors import ConfigError
from .evaluation import score
from .features import FeatureConfig, LogMel, flush_denormals
from .models import (
    ModelConfig,
    SoundNet,
    clip_probabilities,
    fold_batch_norms,
    read_model_file,
)

#: Windows scored per forward pass in batch prediction. On a CPU small batches win
#: (activations stay in cache): on ESC-50 (2 windows per clip, 2 cores) 4 windows gave
#: 75 clips/s, 2 gave 61, 8 gave 56.
WINDOWS_PER_BATCH = 4


class Classifier:
    """A trained model ready to label clips.

    Examples
    --------
    >>> clf = Classifier.load("runs/fsdd/model.safetensors")
    >>> clf.predict("7_theo_3.wav", top_k=3)
    [('7', 0.98), ('1', 0.01), ('9', 0.003)]
    """

    def __init__(
        self, net: SoundNet, labels: Sequence[str], features: FeatureConfig, metadata: dict
    ):
        self.net = net.eval()
        self.labels = list(labels)
        self.features = features
        self.metadata = metadata
        self.view = ClipView.for_model(net.config, features)
        self.logmel = LogMel(features)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> Classifier:
        """Read a model file (safetensors + JSON header; no pickled code is run)."""
        tensors, metadata = read_model_file(path)
        features = config_from_dict(FeatureConfig, metadata["features"])
        model = config_from_dict(ModelConfig, metadata["model"])
        net = SoundNet(model, len(metadata["labels"]), features.floor_db, pretrained=False)
        missing, unexpected = net.backbone.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ConfigError(
                f"{path}: weights do not fit {model.backbone} "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        classifier = cls(net, metadata["labels"], features, metadata)
        # Inference only from here on: batch norms fold into the convolutions, checked
        # on one random window of the model's input shape.
        shape = classifier.view.windows(np.zeros((features.n_mels, 1), np.float32)).shape[1:]
        window = torch.rand((1, 1, *shape), generator=torch.Generator().manual_seed(0))
        fold_batch_norms(net, window * features.floor_db)
        return classifier.to(device)

    def to(self, device: str | torch.device) -> Classifier:
        self.net.to(device)
        self.logmel.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def log_mel(
        self, clip: str | os.PathLike | bytes | np.ndarray, max_duration: float | None = None
    ) -> np.ndarray:
        """The model's log-mel of a clip: a file path, encoded bytes, or a mono
        waveform already at ``features.sample_rate``."""
        if isinstance(clip, bytes):
            wave = decode_bytes(clip, self.features.sample_rate, max_duration=max_duration)
        elif isinstance(clip, np.ndarray):
            wave = np.asarray(clip, np.float32)
        else:
            wave = load_clip(clip, self.features.sample_rate, max_duration)
        with torch.inference_mode(), flush_denormals():
            return self.logmel(torch.from_numpy(wave)[None].to(self.device))[0].cpu().numpy()

    def probabilities(self, log_mels: Sequence[np.ndarray]) -> np.ndarray:
        """Class probabilities ``(clips, labels)`` of log-mels, windows averaged."""
        views = [torch.from_numpy(self.view.windows(db))[:, None] for db in log_mels]
        counts = torch.tensor([len(v) for v in views])
        with torch.inference_mode(), flush_denormals():
            return (
                clip_probabilities(self.net, torch.cat(views).to(self.device), counts).cpu().numpy()
            )

    def top(self, probabilities: np.ndarray, k: int = 3) -> list[tuple[str, float]]:
        order = np.argsort(-probabilities)[:k]
        return [(self.labels[i], float(probabilities[i])) for i in order]

    def predict(self, clip, top_k: int = 3) -> list[tuple[str, float]]:
        """The ``top_k`` (label, probability) pairs for one clip (path, bytes or waveform)."""
        return self.top(self.probabilities([self.log_mel(clip)])[0], top_k)

    def predict_files(
        self,
        paths: Sequence[str | os.PathLike],
        workers: int | None = None,
        progress: bool = True,
    ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
        """Probabilities for many files, decoded in order (in ``workers`` DataLoader
        processes when > 0) and scored :data:`WINDOWS_PER_BATCH` windows at a time.

        Returns a frame (``path`` then one column per label) and the files that could
        not be read, as ``(path, reason)``; one bad file never stops the rest.
        """
        if workers is None:
            # On 2 cores a decoding process only competes with the model's threads
            # (measured: 65 vs 85 clips/s); with more cores it overlaps decoding.
            workers = 0 if (os.cpu_count() or 1) <= 2 else 2
        loader = torch.utils.data.DataLoader(
            _DecodedClips([str(p) for p in paths], self.features, self.view),
            batch_size=None,
            num_workers=workers,
            multiprocessing_context="fork" if workers else None,
        )
        rows, failures, pending = [], [], []

        def score_pending():
            counts = torch.tensor([len(w) for _, w in pending])
            windows = torch.cat([w for _, w in pending]).to(self.device)
            with torch.inference_mode(), flush_denormals():
                probabilities = clip_probabilities(self.net, windows, counts).cpu().numpy()
            rows.extend(zip([p for p, _ in pending], probabilities, strict=True))
            pending.clear()

        with tqdm(total=len(paths), desc="predict", unit="clip", disable=not progress) as bar:
            for path, windows, reason in loader:
                if windows is None:
                    failures.append((path, reason))
                else:
                    pending.append((path, windows))
                    if sum(len(w) for _, w in pending) >= WINDOWS_PER_BATCH:
                        score_pending()
                bar.update(1)
            if pending:
                score_pending()
        frame = pd.DataFrame([p for _, p in rows], columns=self.labels)
        frame.insert(0, "path", [path for path, _ in rows])
        return frame, failures


class _DecodedClips(torch.utils.data.Dataset):
    """Files decoded and featurised on the fly (in DataLoader workers) for prediction."""

    def __init__(self, paths: list[str], features: FeatureConfig, view: ClipView):
        self.paths, self.features, self.view = paths, features, view
        self.logmel = LogMel(features)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            wave = load_clip(path, self.features.sample_rate)
        except AudioError as err:
            return path, None, err.reason
        with torch.inference_mode(), flush_denormals():
            db = self.logmel(torch.from_numpy(wave)[None])[0].numpy()
        return path, torch.from_numpy(self.view.windows(db))[:, None], None


def audio_files(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Expand files and folders (recursively) into audio file paths, in order."""
    paths: list[str] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths.extend(
                str(p)
                for p in sorted(item.rglob("*"))
                if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()
            )
        else:
            paths.append(str(item))
    return paths


def submission(frame: pd.DataFrame, labels: Sequence[str], top_k: int = 3) -> pd.DataFrame:
    """The Kaggle submission format: ``fname`` and the ``top_k`` labels, space-separated."""
    probabilities = frame[list(labels)].to_numpy()
    top = np.argsort(-probabilities, axis=1)[:, :top_k]
    return pd.DataFrame(
        {
            "fname": [Path(p).name for p in frame["path"]],
            "label": [" ".join(labels[i].replace(" ", "_") for i in row) for row in top],
        }
    )


def evaluate(
    model: str | os.PathLike | Classifier,
    clips: pd.DataFrame,
    cache: str | os.PathLike | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[dict, pd.DataFrame, list[tuple[str, str]]]:
    """Score a model on labelled clips.

    The clips are featurised into the cache with the model's own feature config (a
    cache made with other parameters is refused, not mixed). Returns the metrics of
    :func:`soundsight.evaluation.score`, per-clip probabilities, and the clips that
    could not be decoded.
    """
    classifier = model if isinstance(model, Classifier) else Classifier.load(model)
    known = clips["label"].isin(classifier.labels)
    if not known.all():
        missing = sorted(clips.loc[~known, "label"].dropna().unique())
        raise ConfigError(f"labels unknown to the model: {', '.join(map(str, missing[:5]))}")
    feature_cache, report = prepare(
        clips, cache or DEFAULT_CACHE, classifier.features, progress=progress
    )
    clips = clips[[p in feature_cache for p in clips["path"]]].reset_index(drop=True)
    index = {label: i for i, label in enumerate(classifier.labels)}
    targets = clips["label"].map(index).to_numpy()
    dataset = CachedClips(feature_cache, clips["path"], targets, classifier.view, train=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size, collate_fn=collate_windows)
    batches = []
    with torch.inference_mode(), flush_denormals():
        for windows, _, _, counts in tqdm(loader, desc="evaluate", disable=not progress):
            batches.append(
                clip_probabilities(classifier.net, windows.to(classifier.device), counts)
                .cpu()
                .numpy()
            )
    probabilities = np.concatenate(batches)
    frame = pd.DataFrame(probabilities, columns=classifier.labels)
    frame.insert(0, "label", clips["label"].to_numpy())
    frame.insert(0, "path", clips["path"].to_numpy())
    return score(probabilities, targets, classifier.labels), frame, report.failures

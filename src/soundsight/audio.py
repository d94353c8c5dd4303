"""Decoding audio clips into mono float32 waveforms at a fixed sample rate.

Every reader in soundsight goes through :func:`load_clip` (files) or
:func:`decode_bytes` (uploads), so one clip always yields one waveform, and every
failure is an :class:`AudioError` that names the file and the problem.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import SoundsightError

#: File extensions read as audio when scanning folders (soundfile/libsndfile formats).
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")


class AudioError(SoundsightError, ValueError):
    """A clip that cannot be used, with the file it came from and the reason."""

    def __init__(self, source: str | os.PathLike, reason: str):
        self.source = str(source)
        self.reason = reason
        super().__init__(f"{self.source}: {reason}")


def load_clip(
    path: str | os.PathLike, sample_rate: int, max_duration: float | None = None
) -> np.ndarray:
    """Decode an audio file to a mono float32 waveform at ``sample_rate``.

    Parameters
    ----------
    path : str or PathLike
        WAV (8/16/24/32-bit PCM or float), FLAC, OGG/Vorbis, MP3 or AIFF.
    sample_rate : int
        Target rate in Hz; the clip is resampled with soxr (HQ, as librosa's
        default ``soxr_hq``) when its own rate differs.
    max_duration : float, optional
        Read at most this many seconds from the start of the clip.

    Returns
    -------
    np.ndarray
        Shape ``(samples,)``, float32, channels averaged. May be all zeros
        (silence is a valid clip); has at least one sample.

    Raises
    ------
    AudioError
        The file is missing, unreadable, empty, not audio, truncated before its
        first sample, or holds NaN/infinite samples.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise AudioError(path, "file not found") from None
    except OSError as err:
        raise AudioError(path, f"cannot access file ({err.strerror})") from None
    if size == 0:
        raise AudioError(path, "file is empty (0 bytes)")
    try:
        with open(path, "rb") as handle:
            return _decode(handle, path, sample_rate, max_duration)
    except PermissionError:
        raise AudioError(path, "permission denied") from None
    except IsADirectoryError:
        raise AudioError(path, "is a directory, not an audio file") from None


def decode_bytes(
    data: bytes, sample_rate: int, name: str = "<upload>", max_duration: float | None = None
) -> np.ndarray:
    """Decode an in-memory audio file; see :func:`load_clip`. ``name`` labels errors."""
    if not data:
        raise AudioError(name, "file is empty (0 bytes)")
    return _decode(io.BytesIO(data), name, sample_rate, max_duration)


def _decode(handle, name, sample_rate: int, max_duration: float | None) -> np.ndarray:
    try:
        with sf.SoundFile(handle) as clip:
            native_rate = clip.samplerate
            frames = -1 if max_duration is None else int(round(max_duration * native_rate))
            samples = clip.read(frames=frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(name, _reason(err)) from None
    if samples.shape[0] == 0:
        raise AudioError(name, "no audio samples (header only or truncated before the first)")
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(name, "contains NaN or infinite samples")
    if native_rate != sample_rate:
        mono = soxr.resample(mono, native_rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _reason(err: Exception) -> str:
    message = str(err)
    # libsndfile prefixes its message with the (unhelpful) handle repr; keep the cause.
    if ": " in message and message.startswith("Error opening"):
        message = message.split(": ", 1)[1]
    return f"not a readable audio file ({message.strip()})"

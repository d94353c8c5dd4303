"""Decoding audio clips into mono float32 waveforms at a fixed sample rate.

Every reader in soundsight goes through :func:`load_clip` (files), :func:`read_blocks`
(files of any length, in blocks of bounded size) or :func:`decode_bytes` (uploads), so
one clip always yields one waveform, and every failure is an :class:`AudioError` that
names the file and the problem. :func:`read_header` (and :func:`clip_duration`) tell
what a file holds without decoding it, so a caller can refuse a 10-hour clip before
its samples fill the memory.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from .errors import ConfigError, SoundsightError

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
    with _open(path) as clip:
        return _decode(clip, path, sample_rate, max_duration)


@dataclass(frozen=True)
class ClipHeader:
    """What an audio file holds, from its header (nothing decoded)."""

    #: Seconds of audio the file holds (for a truncated file: the part present).
    duration: float
    sample_rate: int
    channels: int
    #: Why the file holds less audio than its header declares, or None.
    truncated: str | None = None


#: libsndfile's log line for a WAV ``data`` / AIFF ``SSND`` chunk longer than the file:
#: ``data : 4768 (should be 2362)`` (declared bytes, bytes present).
_SHORT_CHUNK = re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+) \(should be (\d+)\)", re.MULTILINE)


def read_header(path: str | os.PathLike) -> ClipHeader:
    """Duration, rate, channels and truncation of an audio file, without decoding it.

    Raises
    ------
    AudioError
        As :func:`load_clip`, for a file that cannot be opened as audio.
    """
    with _open(path) as clip:
        return _header(clip)


def read_clip(
    path: str | os.PathLike,
    sample_rate: int,
    max_duration: float | None = None,
    refuse: Callable[[ClipHeader], str | None] | None = None,
) -> tuple[np.ndarray, ClipHeader]:
    """:func:`load_clip` and :func:`read_header` with the file opened once.

    ``refuse(header)``, when given, is asked before anything is decoded: a reason it
    returns is raised as an :class:`AudioError` (say, a recording too long to decode
    whole). Returns the waveform and the header.
    """
    with _open(path) as clip:
        header = _header(clip)
        reason = refuse(header) if refuse is not None else None
        if reason is not None:
            raise AudioError(path, reason)
        return _decode(clip, path, sample_rate, max_duration), header


def _header(clip: sf.SoundFile) -> ClipHeader:
    frames, rate, channels, log = clip.frames, clip.samplerate, clip.channels, clip.extra_info
    duration = frames / rate
    truncated = None
    # libsndfile reads what a truncated WAV/AIFF holds and notes the shortfall only in
    # its log (soundfile's ``extra_info``); it has no other interface for it.
    short = _SHORT_CHUNK.search(log)
    if short and int(short[2]) > 0:
        declared = duration * int(short[1]) / int(short[2])
        truncated = (
            f"truncated: the header declares {declared:.2f} s of audio but the file holds "
            f"{duration:.2f} s; the {duration:.2f} s present were used"
        )
    return ClipHeader(duration, rate, channels, truncated)


def clip_duration(path: str | os.PathLike) -> float:
    """Seconds of audio in the file at ``path``, from its header (nothing decoded).

    Raises
    ------
    AudioError
        As :func:`load_clip`, for a file that cannot be opened as audio.
    """
    return read_header(path).duration


def read_blocks(
    path: str | os.PathLike, sample_rate: int, block_seconds: float = 30.0
) -> Iterator[np.ndarray]:
    """Decode an audio file of any length as consecutive blocks, memory bounded by one.

    Parameters
    ----------
    path : str or PathLike
        As :func:`load_clip`.
    sample_rate : int
        Target rate in Hz; blocks are resampled with soxr's streaming resampler (HQ),
        so their concatenation equals ``load_clip(path, sample_rate)`` to the
        resampler's precision.
    block_seconds : float
        Seconds of the source decoded at a time (a block at ``sample_rate`` may be a
        few samples shorter or longer: the resampler's delay).

    Yields
    ------
    np.ndarray
        Shape ``(samples,)``, float32, mono, non-empty.

    Raises
    ------
    AudioError
        (on iteration) As :func:`load_clip`: the file cannot be read, holds no
        samples, or holds NaN/infinite samples (raised at the block that holds them).
    """
    if not block_seconds > 0:
        raise ConfigError(f"block_seconds must be positive, got {block_seconds}")
    with _open(path) as clip:
        native_rate = clip.samplerate
        stream = (
            None
            if native_rate == sample_rate
            else soxr.ResampleStream(native_rate, sample_rate, 1, dtype="float32", quality="HQ")
        )
        block_frames = max(1, int(round(block_seconds * native_rate)))
        empty = True
        while True:
            samples = _read(clip, path, block_frames)
            last = samples.shape[0] < block_frames
            if samples.shape[0]:
                empty = False
                mono = _mono(samples, path)
                block = mono if stream is None else stream.resample_chunk(mono, last=last)
            elif stream is not None and not empty:
                block = stream.resample_chunk(np.zeros(0, np.float32), last=True)
            else:
                block = np.zeros(0, np.float32)
            if len(block):
                yield np.ascontiguousarray(block, dtype=np.float32)
            if last:
                break
    if empty:
        raise AudioError(path, _NO_SAMPLES)


def read_segment(path: str | os.PathLike, start: float, end: float) -> tuple[np.ndarray, int]:
    """Seconds ``start`` to ``end`` of an audio file, mono float32 at the file's own
    rate (seeking, not decoding what comes before): ``(samples, sample_rate)``. The
    search page plays and exports exactly an indexed window this way.

    Raises
    ------
    AudioError
        As :func:`load_clip`, or when the segment holds no samples.
    """
    with _open(path) as clip:
        rate = clip.samplerate
        first = max(0, int(round(start * rate)))
        count = max(0, min(int(round(end * rate)), clip.frames) - first)
        if count == 0:
            raise AudioError(path, f"no samples between {start:g} s and {end:g} s")
        try:
            clip.seek(first)
        except _DECODER_ERRORS as err:
            raise AudioError(path, _reason(err)) from None
        return np.ascontiguousarray(_mono(_read(clip, path, count), path)), rate


def decode_bytes(
    data: bytes, sample_rate: int, name: str = "<upload>", max_duration: float | None = None
) -> np.ndarray:
    """Decode an in-memory audio file; see :func:`load_clip`. ``name`` labels errors."""
    if not data:
        raise AudioError(name, "file is empty (0 bytes)")
    with _soundfile(io.BytesIO(data), name) as clip:
        return _decode(clip, name, sample_rate, max_duration)


_NO_SAMPLES = "no audio samples (header only or truncated before the first)"


@contextmanager
def _open(path: str | os.PathLike) -> Iterator[sf.SoundFile]:
    """The file at ``path`` open for decoding; every failure to open it an
    :class:`AudioError` naming the file."""
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
        handle = open(path, "rb")  # noqa: SIM115 - closed by the with below
    except PermissionError:
        raise AudioError(path, "permission denied") from None
    except IsADirectoryError:
        raise AudioError(path, "is a directory, not an audio file") from None
    with handle, _soundfile(handle, path) as clip:
        yield clip


@contextmanager
def _soundfile(handle, name) -> Iterator[sf.SoundFile]:
    try:
        clip = sf.SoundFile(handle)
    except _DECODER_ERRORS as err:
        raise AudioError(name, _reason(err)) from None
    with clip:
        yield clip


#: What libsndfile (through soundfile) raises for data it cannot decode.
_DECODER_ERRORS = (sf.LibsndfileError, RuntimeError, TypeError)


def _read(clip: sf.SoundFile, name, frames: int) -> np.ndarray:
    try:
        return clip.read(frames=frames, dtype="float32", always_2d=True)
    except _DECODER_ERRORS as err:
        raise AudioError(name, _reason(err)) from None


def _mono(samples: np.ndarray, name) -> np.ndarray:
    mono = samples.mean(axis=1) if samples.shape[1] > 1 else samples[:, 0]
    if not np.isfinite(mono).all():
        raise AudioError(name, "contains NaN or infinite samples")
    return mono


def _decode(clip: sf.SoundFile, name, sample_rate: int, max_duration: float | None) -> np.ndarray:
    frames = -1 if max_duration is None else int(round(max_duration * clip.samplerate))
    samples = _read(clip, name, frames)
    if samples.shape[0] == 0:
        raise AudioError(name, _NO_SAMPLES)
    mono = _mono(samples, name)
    if clip.samplerate != sample_rate:
        mono = soxr.resample(mono, clip.samplerate, sample_rate, quality="HQ")
    return np.ascontiguousarray(mono, dtype=np.float32)


def _reason(err: Exception) -> str:
    message = str(err)
    # libsndfile prefixes its message with the (unhelpful) handle repr; keep the cause.
    if ": " in message and message.startswith("Error opening"):
        message = message.split(": ", 1)[1]
    return f"not a readable audio file ({message.strip()})"

"""Soundscapes with known events: real event clips placed over real ambience.

For testing and measuring sound-event detection where no annotated recordings are at
hand: ambient clips (rain, wind, crickets...) joined into a bed of the wanted length,
event clips (spoken digits, dog barks...) trimmed of their leading and trailing
silence (librosa) and added at random, non-overlapping onsets at a chosen
signal-to-noise ratio. The annotation is the DCASE table ``filename, onset, offset,
event_label`` that ``soundsight evaluate --events`` reads.

A small generator of our own rather than scaper (the DCASE synthesiser): scaper is not
a dependency, and what is needed here is a few lines of placement and scaling.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf

from .audio import clip_duration, load_clip, read_segment
from .errors import ConfigError
from .files import write_whole
from .tables import write_csv

#: Columns of an annotation (the DCASE event list format).
ANNOTATION_COLUMNS = ("filename", "onset", "offset", "event_label")


def _rms(wave: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) or 1e-12


def trimmed(wave: np.ndarray, top_db: float = 30.0) -> np.ndarray:
    """The clip without its leading and trailing stretches quieter than ``top_db``
    below its loudest frame (so an annotation covers the sound, not padding)."""
    import librosa

    return librosa.effects.trim(wave, top_db=top_db, frame_length=512, hop_length=128)[0]


def ambience(
    paths: Sequence[str | os.PathLike],
    seconds: float,
    sample_rate: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """A bed of ``seconds`` from random ambient clips joined end to end (from a random
    point of the first), each brought to the same loudness (RMS 0.05) so the joins do
    not jump."""
    if not paths:
        raise ConfigError("a soundscape needs at least one ambient clip")
    need = int(round(seconds * sample_rate))
    parts: list[np.ndarray] = []
    start = have = 0
    while have < start + need:
        wave = load_clip(paths[int(rng.integers(len(paths)))], sample_rate)
        if not parts:
            start = int(rng.integers(len(wave)))
        parts.append(wave * (0.05 / _rms(wave)))
        have += len(wave)
    return np.concatenate(parts)[start : start + need].astype(np.float32)


def background_stretch(
    paths: Sequence[str | os.PathLike],
    seconds: float,
    sample_rate: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """``seconds`` of a random recording of ``paths`` from a random point, at
    ``sample_rate`` (repeated when the recording is shorter). Only that stretch is
    read (:func:`~soundsight.audio.read_segment`), so memory does not grow with the
    recording's length."""
    import soxr

    if not paths:
        raise ConfigError("background noise needs at least one recording")
    path = paths[int(rng.integers(len(paths)))]
    start = float(rng.uniform(0.0, max(0.0, clip_duration(path) - seconds)))
    wave, rate = read_segment(path, start, start + seconds)
    if rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ").astype(np.float32)
    return np.resize(wave, int(round(seconds * sample_rate)))


def over_background(
    wave: np.ndarray,
    noise: Sequence[str | os.PathLike],
    sample_rate: int,
    rng: np.random.Generator,
    snr_db: tuple[float, float],
) -> np.ndarray:
    """A clip heard in noise: ``wave`` plus a :func:`background_stretch` of ``noise`` at
    an event-to-background ratio (the clip's RMS over the noise's, in dB) drawn
    uniformly from ``snr_db``. The clip keeps its level, unless the sum would peak above
    0.95: then the sum is scaled down to that (the ratio stays)."""
    bed = background_stretch(noise, len(wave) / sample_rate, sample_rate, rng)
    gain = _rms(wave) / _rms(bed) / 10 ** (rng.uniform(*snr_db) / 20)
    mixed = wave + gain * bed
    peak = float(np.abs(mixed).max())
    return (mixed * (0.95 / peak) if peak > 0.95 else mixed).astype(np.float32)


def make_soundscape(
    ambient: Sequence[str | os.PathLike],
    events: Sequence[tuple[str | os.PathLike, str]],
    seconds: float,
    sample_rate: int,
    rng: np.random.Generator,
    snr_db: tuple[float, float] = (6.0, 15.0),
    min_gap: float = 0.5,
) -> tuple[np.ndarray, pd.DataFrame]:
    """One soundscape: ``events`` (path, label) over ambience, in random order.

    Parameters
    ----------
    ambient : sequence of path-like
        Ambient clips for the bed.
    events : sequence of (path, label)
        Clips to place, each once (trimmed of silence at both ends).
    seconds, sample_rate
        Length and rate of the soundscape.
    rng : numpy.random.Generator
        Onsets, order, SNRs and ambient clips are drawn from it.
    snr_db : (low, high)
        Each event's RMS over the bed's, in dB, drawn uniformly from this range.
    min_gap : float
        Seconds at least between two events (and before the first).

    Returns
    -------
    wave, annotation
        The mono float32 soundscape (peak at most 0.95) and its events
        ``onset, offset, event_label`` (seconds), sorted by onset.
    """
    bed = ambience(ambient, seconds, sample_rate, rng)
    clips = [(trimmed(load_clip(path, sample_rate)), label) for path, label in events]
    order = rng.permutation(len(clips))
    gap = int(round(min_gap * sample_rate))
    free = len(bed) - sum(len(c) for c, _ in clips) - gap * (len(clips) + 1)
    if free < 0:
        raise ConfigError(f"{len(clips)} events with {min_gap} s gaps do not fit in {seconds} s")
    # The spare time split at random among the gaps: onsets random, never overlapping.
    spare = (rng.dirichlet(np.ones(len(clips) + 1)) * free).astype(int)
    rows, at = [], 0
    for slot, index in enumerate(order):
        clip, label = clips[index]
        at += gap + spare[slot]
        gain = 10 ** (rng.uniform(*snr_db) / 20) * _rms(bed[at : at + len(clip)]) / _rms(clip)
        bed[at : at + len(clip)] += gain * clip
        rows.append((at / sample_rate, (at + len(clip)) / sample_rate, label))
        at += len(clip)
    peak = float(np.abs(bed).max())
    if peak > 0.95:
        bed *= 0.95 / peak
    annotation = pd.DataFrame(rows, columns=list(ANNOTATION_COLUMNS[1:])).round(4)
    return bed, annotation


def write_soundscapes(
    folder: str | os.PathLike,
    count: int,
    ambient: Sequence[str | os.PathLike],
    events: Sequence[tuple[str | os.PathLike, str]],
    per_scape: int,
    seconds: float,
    sample_rate: int = 22050,
    seed: int = 0,
    **options,
) -> Path:
    """Write ``count`` soundscapes ``scape_NNN.wav`` (16-bit) and their annotation
    ``events.csv`` (:data:`ANNOTATION_COLUMNS`, file names relative to ``folder``);
    each soundscape takes ``per_scape`` events drawn without replacement from
    ``events`` (again from the start once all were used). ``options`` go to
    :func:`make_soundscape`. Returns the annotation's path."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    pool: list[int] = []
    tables = []
    for number in range(count):
        chosen: list[tuple[str | os.PathLike, str]] = []
        while len(chosen) < per_scape:
            if not pool:
                pool = list(rng.permutation(len(events)))
            chosen.append(events[pool.pop()])
        wave, annotation = make_soundscape(ambient, chosen, seconds, sample_rate, rng, **options)
        name = f"scape_{number:03d}.wav"
        write_whole(
            folder / name,
            partial(sf.write, data=wave, samplerate=sample_rate, subtype="PCM_16", format="WAV"),
        )
        annotation.insert(0, "filename", name)
        tables.append(annotation)
    return write_csv(pd.concat(tables, ignore_index=True), folder / "events.csv")


def _sounding_start(clip: np.ndarray, need: int, rng: np.random.Generator) -> int:
    """The first sample of a random stretch of ``need`` samples of ``clip`` that holds
    some of its sound: a sample is drawn from the clip's non-silent intervals
    (librosa, 30 dB under the loudest frame, as :func:`trimmed`), then a stretch
    around it. A stretch of an event clip drawn anywhere is often a pause (between the
    knocks, the barks, the crows) that the example would still call the event."""
    import librosa

    if len(clip) <= need:
        return int(rng.integers(1))  # the draw seeded sets of short clips always made
    intervals = librosa.effects.split(clip, top_db=30.0, frame_length=512, hop_length=128)
    if not len(intervals):  # no frame stands out: any stretch
        return int(rng.integers(len(clip) - need + 1))
    sample = int(rng.choice(np.concatenate([np.arange(a, b) for a, b in intervals])))
    return int(rng.integers(max(0, sample - need + 1), min(sample, len(clip) - need) + 1))


def write_examples(
    folder: str | os.PathLike,
    events: Sequence[tuple[str | os.PathLike, str]],
    ambient: Sequence[str | os.PathLike],
    backgrounds: int,
    seconds: float = 1.0,
    sample_rate: int = 22050,
    seed: int = 0,
    snr_db: tuple[float, float] = (6.0, 15.0),
    background_label: str = "background",
) -> Path:
    """Training clips for a detector, in the ``folder`` layout (``<label>/<n>.wav``):
    each event clip (trimmed, cut to ``seconds``) at a random offset over a bed of
    ambience of ``seconds``, and ``backgrounds`` beds alone labelled
    ``background_label``. An event clip longer than ``seconds`` gives a random stretch
    of it that holds some of the sound (a clip listed several times gives several
    stretches), at the level it has within the whole sound; one labelled
    ``background_label`` is a negative example (a sound that is none of the events, over
    the bed). Returns ``folder``."""
    rng = np.random.default_rng(seed)
    folder = Path(folder)
    need = int(round(seconds * sample_rate))

    def write(label: str, number: int, wave: np.ndarray) -> None:
        peak = float(np.abs(wave).max())
        wave = wave * (0.95 / peak) if peak > 0.95 else wave
        write_whole(
            folder / label / f"{number:05d}.wav",
            lambda file: sf.write(file, wave, sample_rate, subtype="PCM_16", format="WAV"),
            durable=False,
        )

    for number, (path, label) in enumerate(events):
        bed = ambience(ambient, seconds, sample_rate, rng)
        clip = trimmed(load_clip(path, sample_rate))
        # The whole sound's level sets the gain, as in make_soundscape: a stretch keeps
        # its loudness relative to the rest of the sound, so a pause inside a clip is as
        # quiet over the bed as it is in a recording, never raised to the ratio itself.
        level = _rms(clip)
        begin = _sounding_start(clip, need, rng)
        clip = clip[begin : begin + need]
        at = int(rng.integers(need - len(clip) + 1))
        gain = 10 ** (rng.uniform(*snr_db) / 20) * _rms(bed) / level
        bed[at : at + len(clip)] += gain * clip
        write(label, number, bed)
    for number in range(len(events), len(events) + backgrounds):
        write(background_label, number, ambience(ambient, seconds, sample_rate, rng))
    return folder

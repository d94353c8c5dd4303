"""Decoding: every supported format, channel layouts, resampling, edge-case lengths,
and every kind of broken file raising an AudioError that names the file and problem."""

from __future__ import annotations

import os
import pwd
import tempfile
from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile as sf

from soundsight import AudioError, FeatureConfig, decode_bytes, load_clip, log_mel

SR = 22050


def peak_hz(wave: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.fft.rfftfreq(len(wave), 1 / sr)[np.argmax(spectrum)])


@pytest.mark.parametrize(
    ("subtype", "atol"),
    [
        ("PCM_U8", 1e-2),  # WAV 8-bit is unsigned
        ("PCM_16", 1e-4),
        ("PCM_24", 1e-6),
        ("PCM_32", 1e-7),
        ("FLOAT", 0.0),
        ("DOUBLE", 1e-7),
    ],
)
def test_wav_sample_formats_decode_to_the_same_waveform(write_audio, make_sine, subtype, atol):
    wave = make_sine(440, 0.5, SR)
    path = write_audio(f"clip_{subtype}.wav", wave, SR, subtype=subtype)
    decoded = load_clip(path, SR)
    assert decoded.dtype == np.float32
    assert decoded.shape == wave.shape
    np.testing.assert_allclose(decoded, wave, atol=atol)


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24"])
def test_flac_decodes_losslessly(write_audio, make_sine, subtype):
    wave = make_sine(1000, 0.5, SR)
    path = write_audio(f"clip_{subtype}.flac", wave, SR, subtype=subtype)
    np.testing.assert_allclose(load_clip(path, SR), wave, atol=1e-4)


@pytest.mark.parametrize("fmt", ["OGG", "MP3"])
def test_lossy_formats_decode_length_and_pitch(write_audio, make_sine, fmt):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile ({sf.__libsndfile_version__}) cannot write {fmt}")
    wave = make_sine(1000, 1.0, SR)
    path = write_audio(f"clip.{fmt.lower()}", wave, SR, format=fmt)
    decoded = load_clip(path, SR)
    assert abs(len(decoded) - len(wave)) <= 2048  # codec framing / encoder delay at most
    assert peak_hz(decoded, SR) == pytest.approx(1000, abs=3)
    assert 0.3 < np.abs(decoded).max() < 0.7


# librosa.load imports audioread (its fallback decoder), which imports deprecated modules.
@pytest.mark.filterwarnings("ignore:'(aifc|audioop|sunau)' is deprecated:DeprecationWarning")
def test_real_clips_decode_like_librosa(fsdd_clips, esc_clips):
    for path in [*fsdd_clips[:2], *esc_clips[:2]]:
        ours = load_clip(path, SR)
        theirs, _ = librosa.load(path, sr=SR)  # soxr_hq, mono: the same pipeline
        assert ours.shape == theirs.shape, path
        np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=str(path))


def test_stereo_is_averaged_to_mono(write_audio, make_sine):
    left, right = make_sine(440, 0.5, SR), make_sine(1000, 0.5, SR, amp=0.25)
    path = write_audio("stereo.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    np.testing.assert_allclose(load_clip(path, SR), (left + right) / 2, atol=1e-7)


def test_six_channels_are_averaged_to_mono(write_audio, make_sine):
    channels = np.stack([make_sine(200 * (i + 1), 0.3, SR, amp=0.1 * (i + 1)) for i in range(6)], 1)
    path = write_audio("surround.wav", channels, SR, subtype="FLOAT")
    decoded = load_clip(path, SR)
    assert decoded.ndim == 1
    np.testing.assert_allclose(decoded, channels.mean(axis=1), atol=1e-6)


@pytest.mark.parametrize(("native_rate", "freq"), [(8000, 1000.0), (192000, 5000.0)])
def test_resampling_keeps_duration_and_pitch(write_audio, make_sine, native_rate, freq):
    seconds = 2.0
    path = write_audio(
        f"sine_{native_rate}.wav", make_sine(freq, seconds, native_rate), native_rate
    )
    for target in (SR, 16000):
        decoded = load_clip(path, target)
        assert abs(len(decoded) - seconds * target) <= 1
        assert peak_hz(decoded, target) == pytest.approx(freq, abs=1.0)


def test_max_duration_reads_only_the_start(write_audio, make_sine):
    path = write_audio("long.wav", make_sine(440, 3.0, 8000), 8000)
    assert len(load_clip(path, 8000, max_duration=1.0)) == 8000
    assert len(load_clip(path, 16000, max_duration=0.5)) == 8000


def test_one_sample_clip_decodes_and_gets_padded_features(write_audio):
    path = write_audio("one.wav", np.array([0.5], np.float32), SR, subtype="FLOAT")
    wave = load_clip(path, SR)
    assert wave.shape == (1,)
    config = FeatureConfig()
    features = log_mel(wave, config)
    assert features.shape == (config.n_mels, config.num_frames(1))
    assert np.isfinite(features).all()
    assert features.max() == 0.0 and features.min() >= config.floor_db


def test_silent_clip_is_valid(write_audio):
    path = write_audio("silence.wav", np.zeros(SR, np.float32), SR, subtype="PCM_16")
    wave = load_clip(path, SR)
    assert wave.shape == (SR,) and not wave.any()
    config = FeatureConfig()
    features = log_mel(wave, config)
    assert features.shape == (config.n_mels, config.num_frames(SR))
    assert np.isfinite(features).all()


def test_ten_minute_file_decodes(write_audio):
    rng = np.random.default_rng(0)
    rate, seconds = 8000, 600
    noise = (rng.standard_normal(rate * seconds) * 0.1).astype(np.float32)
    path = write_audio("ten_minutes.wav", noise, rate, subtype="PCM_16")
    assert len(load_clip(path, rate)) == rate * seconds
    resampled = load_clip(path, 16000)
    assert abs(len(resampled) / 16000 - seconds) < 1e-3


def test_decode_bytes_matches_load_clip(fsdd_clips, esc_clips):
    for path in (fsdd_clips[0], esc_clips[0]):
        np.testing.assert_array_equal(decode_bytes(path.read_bytes(), SR), load_clip(path, SR))


def test_decode_bytes_errors_use_the_given_name():
    with pytest.raises(AudioError, match=r"^upload\.wav: file is empty"):
        decode_bytes(b"", SR, name="upload.wav")
    with pytest.raises(AudioError, match=r"^upload\.wav: not a readable audio file"):
        decode_bytes(b"RIFF not really", SR, name="upload.wav")


# ---------------------------------------------------------------- broken input


@pytest.mark.parametrize(
    "name", ["empty.wav", "header_only.wav", "text.wav", "nan.wav", "inf.wav", "truncated.flac"]
)
def test_bad_file_raises_audio_error_naming_file_and_problem(
    tmp_path, make_bad_clips, bad_clip_reasons, name
):
    path = make_bad_clips(tmp_path)[name]
    with pytest.raises(AudioError) as info:
        load_clip(path, SR)
    assert info.value.source == str(path)
    assert str(info.value).startswith(f"{path}: ")
    assert bad_clip_reasons[name] in info.value.reason


def test_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="file not found") as info:
        load_clip(path, SR)
    assert str(path) in str(info.value)


def test_directory_named_like_audio(tmp_path):
    path = tmp_path / "folder.wav"
    path.mkdir()
    with pytest.raises(AudioError, match="is a directory") as info:
        load_clip(path, SR)
    assert str(path) in str(info.value)


def _load_clip_as(uid: int, gid: int, path: Path) -> str:
    """Outcome of ``load_clip(path)`` in a forked child running as ``uid``."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: drop root, try to read, report, exit without cleanup
        try:
            os.close(read_end)
            try:
                os.setgid(gid)
                os.setuid(uid)
            except OSError:
                outcome = "cannot drop privileges"
            else:
                try:
                    load_clip(path, SR)
                    outcome = "decoded"
                except AudioError as err:
                    outcome = f"AudioError|{err}"
                except BaseException as err:  # noqa: BLE001 - reported to the parent
                    outcome = f"{type(err).__name__}|{err}"
            os.write(write_end, outcome.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        outcome = pipe.read().decode()
    os.waitpid(pid, 0)
    return outcome


def test_unreadable_permissions(fsdd_clips):
    with tempfile.TemporaryDirectory() as folder:  # under /tmp: others may enter it
        os.chmod(folder, 0o755)
        path = Path(folder) / "locked.wav"
        path.write_bytes(fsdd_clips[0].read_bytes())
        path.chmod(0)
        if os.geteuid() == 0:
            # root reads anything: check as an ordinary user instead.
            try:
                nobody = pwd.getpwnam("nobody")
            except KeyError:
                pytest.skip("running as root and there is no 'nobody' user to read as")
            outcome = _load_clip_as(nobody.pw_uid, nobody.pw_gid, path)
            if outcome == "cannot drop privileges":
                pytest.skip("running as root without the right to switch user")
        elif os.access(path, os.R_OK):
            pytest.skip("chmod 000 does not stop this user reading the file")
        else:
            try:
                load_clip(path, SR)
                outcome = "decoded"
            except AudioError as err:
                outcome = f"AudioError|{err}"
        assert outcome == f"AudioError|{path}: permission denied"


def test_wav_cut_in_the_middle_decodes_the_available_part(tmp_path, fsdd_clips):
    source = fsdd_clips[0]
    data = source.read_bytes()
    path = tmp_path / "cut.wav"
    path.write_bytes(data[: len(data) // 2])
    full, part = load_clip(source, 8000), load_clip(path, 8000)
    assert 0.45 < len(part) / len(full) < 0.5
    np.testing.assert_array_equal(part, full[: len(part)])


def test_flac_cut_in_the_middle_is_rejected(tmp_path, esc_clips):
    data = esc_clips[0].read_bytes()
    path = tmp_path / "cut.flac"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="not a readable audio file") as info:
        load_clip(path, SR)
    assert info.value.source == str(path)


@pytest.mark.parametrize("fraction", [0.0005, 0.005, 0.02, 0.1, 0.3, 0.7, 0.95])
def test_truncation_anywhere_never_escapes_as_another_error(
    tmp_path, fsdd_clips, esc_clips, fraction
):
    for source in (fsdd_clips[3], esc_clips[1]):
        data = source.read_bytes()
        path = tmp_path / f"cut{source.suffix}"
        path.write_bytes(data[: max(1, int(len(data) * fraction))])
        try:
            wave = load_clip(path, SR)
        except AudioError as err:
            assert err.source == str(path) and err.reason
        else:
            assert len(wave) > 0 and np.isfinite(wave).all()

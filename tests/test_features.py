"""Log-mel features: numerically librosa's on real clips, batch-invariant, and the
frame count and colour mapping that the cache and the images rely on."""

from __future__ import annotations

import dataclasses

import librosa
import matplotlib
import numpy as np
import pytest
import torch

from soundsight import FeatureConfig, LogMel, colorize, load_clip, log_mel

CONFIGS = {
    "default": FeatureConfig(),
    "16k-64mels": FeatureConfig(
        sample_rate=16000, n_fft=512, hop_length=160, n_mels=64, fmax=7000.0
    ),
}


def librosa_log_mel(y: np.ndarray, cfg: FeatureConfig) -> np.ndarray:
    mel = librosa.feature.melspectrogram(
        y=y,
        sr=cfg.sample_rate,
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
        fmin=cfg.fmin,
        fmax=cfg.fmax,
    )
    return librosa.power_to_db(mel, ref=np.max, top_db=cfg.top_db)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_librosa_on_real_clips(name, fsdd_clips, esc_clips):
    cfg = CONFIGS[name]
    for path in [*fsdd_clips[::5], *esc_clips[:3]]:
        y = load_clip(path, cfg.sample_rate)
        expected = librosa_log_mel(y, cfg)
        got = log_mel(y, cfg)
        assert got.dtype == np.float32
        assert got.shape == expected.shape == (cfg.n_mels, cfg.num_frames(len(y))), path
        diff = np.abs(got - expected)
        assert diff.mean() < 0.01, (path, diff.mean())
        assert diff.max() < 0.1, (path, diff.max())


def test_values_span_top_db_below_the_loudest_bin(esc_clips):
    cfg = FeatureConfig()
    db = log_mel(load_clip(esc_clips[0], cfg.sample_rate), cfg)
    assert db.max() == 0.0
    assert db.min() == pytest.approx(-80.0)  # real clips (zero-padded ESC) reach the floor
    loose = log_mel(load_clip(esc_clips[0], cfg.sample_rate), dataclasses.replace(cfg, top_db=40))
    assert loose.min() == pytest.approx(-40.0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batch_with_padding_and_lengths_equals_one_at_a_time(name, fsdd_clips, esc_clips):
    cfg = CONFIGS[name]
    # Very different lengths, including one shorter than a window.
    waves = [load_clip(p, cfg.sample_rate) for p in (fsdd_clips[0], esc_clips[2], fsdd_clips[7])]
    waves.append(waves[0][: cfg.n_fft // 3])
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True)
    with torch.inference_mode():
        out = LogMel(cfg)(batch, lengths).numpy()
    assert out.shape == (len(waves), cfg.n_mels, cfg.num_frames(batch.shape[1]))
    for wave, row in zip(waves, out, strict=True):
        single = log_mel(wave, cfg)
        frames = cfg.num_frames(len(wave))
        assert single.shape[1] == frames
        np.testing.assert_allclose(row[:, :frames], single, atol=2e-3)
        # Frames past the clip's end are silence (the floor), not the next clip's data.
        assert (row[:, frames:] == cfg.floor_db).all()


@pytest.mark.parametrize("num_samples", [1, 100, 255, 256, 1023, 1024, 1025, 22050, 22051])
def test_frame_count_is_num_frames(num_samples):
    cfg = FeatureConfig()
    rng = np.random.default_rng(num_samples)
    y = rng.standard_normal(num_samples).astype(np.float32)
    assert log_mel(y, cfg).shape == (cfg.n_mels, cfg.num_frames(num_samples))


def test_num_frames_and_seconds():
    cfg = FeatureConfig()
    assert cfg.num_frames(22050) == 1 + 22050 // 256
    assert cfg.num_frames(10) == 1 + 1024 // 256  # short clips are padded to one window
    assert cfg.frames_to_seconds(cfg.num_frames(22050 * 5) - 1) == pytest.approx(5.0, abs=0.02)


@pytest.mark.parametrize(
    "bad",
    [
        {"n_fft": 0},
        {"hop_length": -1},
        {"n_mels": 0},
        {"sample_rate": 0},
        {"fmax": 20000.0},  # above Nyquist at 22050 Hz
        {"fmin": 500.0, "fmax": 400.0},
    ],
)
def test_invalid_config_is_rejected(bad):
    with pytest.raises(ValueError):
        FeatureConfig(**bad)


def test_digest_follows_the_values():
    assert FeatureConfig().digest == FeatureConfig().digest
    assert FeatureConfig(n_mels=64).digest != FeatureConfig().digest
    assert FeatureConfig(fmin=0.0).digest != FeatureConfig().digest


def test_colorize_maps_floor_and_peak_and_puts_low_frequencies_at_the_bottom():
    floor = -80.0
    db = np.full((4, 3), floor, np.float32)
    db[0, :] = 0.0  # the lowest mel band is the loudest
    rgb = colorize(db, floor)
    assert rgb.dtype == np.uint8 and rgb.shape == (4, 3, 3)
    cmap = matplotlib.colormaps["magma"]
    loud = np.array(cmap(1.0, bytes=True)[:3])
    quiet = np.array(cmap(0.0, bytes=True)[:3])
    assert (rgb[-1] == loud).all()  # bottom row: band 0
    assert (rgb[:-1] == quiet).all()
    assert (
        colorize(db, floor, cmap="viridis")[-1]
        == matplotlib.colormaps["viridis"](1.0, bytes=True)[:3]
    ).all()


def test_colorize_equals_matplotlibs_colour_map_on_a_real_clip(esc_clips):
    config = FeatureConfig()
    db = log_mel(load_clip(esc_clips[0], config.sample_rate), config)
    expected = matplotlib.colormaps["magma"](1 - db[::-1] / config.floor_db, bytes=True)
    np.testing.assert_array_equal(colorize(db, config.floor_db), expected[..., :3])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(fsdd_clips, esc_clips):
    cfg = FeatureConfig()
    waves = [load_clip(p, cfg.sample_rate) for p in (fsdd_clips[1], esc_clips[0])]
    lengths = torch.tensor([len(w) for w in waves])
    batch = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for w in waves], batch_first=True)
    with torch.inference_mode():
        cpu = LogMel(cfg)(batch, lengths)
        gpu = LogMel(cfg).cuda()(batch.cuda(), lengths.cuda()).cpu()
    diff = (gpu - cpu).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.1


def test_denormal_flushing_is_scoped(fsdd_clips, tmp_path):
    from soundsight import prepare
    from soundsight.features import _flushing_denormals, flush_denormals

    assert not _flushing_denormals()
    with flush_denormals():
        assert _flushing_denormals()
    assert not _flushing_denormals()  # the process's mode is restored...
    prepare([str(fsdd_clips[0])], tmp_path, workers=0, progress=False)
    assert not _flushing_denormals()  # ...also after preparing in this process


@pytest.mark.parametrize(
    "sr, n_fft, n_mels, fmin, fmax",
    [
        (22050, 1024, 128, 20.0, None),
        (8000, 512, 40, 0.0, 4000.0),
        (44100, 2048, 96, 50.0, 16000.0),
    ],
)
def test_mel_filterbank_is_librosas(sr, n_fft, n_mels, fmin, fmax):
    from soundsight.features import mel_filterbank

    ours = mel_filterbank(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    theirs = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
    assert ours.shape == theirs.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-9)


def test_importing_soundsight_loads_neither_librosa_nor_torch():
    import subprocess
    import sys

    heavy = "{'librosa', 'torch', 'lightning', 'timm'}"
    code = f"import sys, soundsight; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

"""Background-noise augmentation: mixing cached log-mels at an event-to-background
ratio, the training views it changes, ``train --noise`` on real clips, and a data set's
own background clips, or its clips' quiet stretches, as the default noise."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
import torch

import soundsight as ss
from soundsight.audio import load_clip
from soundsight.cache import CacheError
from soundsight.cli import _recipe, build_parser
from soundsight.config import TrainConfig
from soundsight.data import BackgroundNoise, ClipView, quiet_frames, quiet_stretch_bank
from soundsight.features import FeatureConfig, LogMel, add_log_mels
from soundsight.layouts import DatasetError
from soundsight.training import _data, train


def _features(wave: np.ndarray, config: FeatureConfig) -> tuple[torch.Tensor, float]:
    """A clip's log-mel (dB, loudest bin 0) and its absolute total mel power."""
    logmel = LogMel(config)
    with torch.inference_mode():
        batch = torch.from_numpy(wave)[None]
        return logmel(batch)[0], float(logmel.mel_power(batch).sum())


@pytest.mark.parametrize("snr_db", [0.0, 12.0])
def test_mixing_log_mels_at_a_ratio_matches_mixing_the_waveforms(fsdd_clips, esc_clips, snr_db):
    config = FeatureConfig(sample_rate=8000, n_mels=64, n_fft=512, hop_length=128)
    digit = load_clip(fsdd_clips[0], 8000)
    noise = load_clip(esc_clips[0], 8000)[: len(digit)]
    db_digit, power_digit = _features(digit, config)
    db_noise, power_noise = _features(noise, config)
    # The waveform gain that puts the noise's mel power snr_db below the digit's.
    gain = np.sqrt(power_digit / power_noise * 10 ** (-snr_db / 10))
    truth, _ = _features((digit + gain * noise).astype(np.float32), config)
    mixed = add_log_mels(db_digit, db_noise, config, snr_db)
    unscaled = add_log_mels(db_digit, db_noise, config)
    audible = truth > -40  # where the mixture is, not the floor's fine grain
    error = (mixed - truth)[audible].abs().mean()
    assert error < 2.0  # dB: the cross terms of the two sounds' phases average out
    assert error < (unscaled - truth)[audible].abs().mean()  # the level matters


@pytest.mark.parametrize("front_end", ["log_mel_db", "aisfx"])
def test_noise_far_below_the_clip_leaves_it_as_it_was(front_end):
    config = FeatureConfig(front_end=front_end, top_db=None if front_end == "aisfx" else 80.0)
    floor = config.floor_db
    rng = np.random.default_rng(0)
    # The clip spans the top third of the range, so noise 60 dB below its total power
    # is far below each of its bins.
    clip = torch.as_tensor(rng.uniform(floor / 3, 0, (1, 16, 20)), dtype=torch.float32)
    clip[..., 0, 0] = 0.0
    noise = torch.as_tensor(rng.uniform(floor, 0, (1, 16, 20)), dtype=torch.float32)
    quiet = add_log_mels(clip, noise, config, 60.0)
    torch.testing.assert_close(quiet, clip, atol=0.01 * abs(floor), rtol=0)
    loud = add_log_mels(clip, noise, config, -20.0)  # now the noise is what is heard
    assert (loud - clip).abs().mean() > 0.05 * abs(floor)


def _cached(paths, tmp_path, config: FeatureConfig):
    cache, report = ss.prepare([str(p) for p in paths], tmp_path / "cache", config, progress=False)
    assert not report.failures
    return cache


def test_background_noise_mixes_the_share_of_views_asked_for(
    fsdd_clips, esc_clips, tmp_path, write_audio
):
    config = FeatureConfig(sample_rate=8000)
    silence = write_audio("silence.wav", np.zeros(3 * 8000, np.float32), 8000)
    cache = _cached([*esc_clips[:2], silence, fsdd_clips[0]], tmp_path, config)
    view = ClipView(config.floor_db, frames=40)
    clip = view.random(np.load(cache.stored_entry(str(fsdd_clips[0]))))

    def mixed_share(paths, probability) -> float:
        noise = BackgroundNoise(cache, paths, view, config, probability, (0.0, 0.0))
        torch.manual_seed(0)
        return np.mean([not np.array_equal(noise(clip), clip) for _ in range(200)])

    assert mixed_share(esc_clips[:2], 0.0) == 0.0
    # These recordings are half digital silence (padded to 5 s): a silent stretch is
    # drawn again, so nearly every view asked for gets noise.
    assert mixed_share(esc_clips[:2], 1.0) > 0.95
    assert 0.15 < mixed_share(esc_clips[:2], 0.3) < 0.45
    assert mixed_share([silence], 1.0) == 0.0  # digital silence adds nothing
    noise = BackgroundNoise(cache, esc_clips[:1], view, config, 1.0, (-6.0, -6.0))
    assert noise(clip).shape == clip.shape and noise(clip).max() == 0.0


@pytest.mark.parametrize("front_end", ["log_mel_db", "aisfx"])
def test_quiet_frames_are_the_background_under_a_clips_loud_part(front_end):
    config = FeatureConfig(front_end=front_end, top_db=None if front_end == "aisfx" else 80.0)
    rng = np.random.default_rng(0)
    bands = 16
    loud = rng.uniform(-10.0, 0.0, (bands, 5))  # dB under the loudest bin
    hum = rng.uniform(-50.0, -40.0, (bands, 4))  # 40 dB and more under the loud frames
    padding = np.full((bands, 3), -80.0)  # flat: where the clip was padded
    db = np.concatenate([hum[:, :2], loud, padding, hum[:, 2:]], axis=1)
    if front_end == "aisfx":  # the same powers on aisfx's scale
        from soundsight.features import AISFX_GAIN, AISFX_RANGE

        db = np.log10(1.0 + AISFX_GAIN * 10.0 ** (db / 10.0)) / AISFX_RANGE - 1.0
    db = db.astype(np.float16)  # as cached
    np.testing.assert_array_equal(
        quiet_frames(db, config), np.concatenate([db[:, :2], db[:, 10:]], 1)
    )
    assert quiet_frames(db, config, below_db=60.0).shape[1] == 0  # nothing that quiet


def test_quiet_stretches_of_real_clips_are_noise_for_training_views(fsdd_clips, tmp_path):
    config = FeatureConfig(sample_rate=8000)
    cache = _cached(fsdd_clips, tmp_path, config)
    # Spoken digits trimmed close: 0-14 quiet frames a clip (58 in these 20).
    view = ClipView(config.floor_db, frames=10)
    paths = [str(p) for p in fsdd_clips]
    bank, frames = quiet_stretch_bank(cache, paths, view, config)
    assert bank is not None and set(frames) < set(paths)  # some clips have none
    assert bank.shape == (config.n_mels, sum(frames.values())) and bank.shape[1] >= 40
    for path, count in frames.items():
        assert count == quiet_frames(np.load(cache.stored_entry(path)), config).shape[1]
    noise = BackgroundNoise(cache, [], view, config, 1.0, (0.0, 0.0), bank)
    clip = view.random(np.load(cache.stored_entry(paths[0])))
    torch.manual_seed(0)
    mixed = noise(clip)
    assert mixed.shape == clip.shape and not np.array_equal(mixed, clip)
    # Capped, and too few frames for one view is no bank at all.
    assert quiet_stretch_bank(cache, paths, view, config, 25)[0].shape[1] == 25
    wide = ClipView(config.floor_db, frames=10_000)
    assert quiet_stretch_bank(cache, paths, wide, config) == (None, {})
    # A clip whose cached features are gone is named, as training names it.
    cache.stored_entry(paths[3]).unlink()
    with pytest.raises(CacheError, match=re.escape(paths[3])):
        quiet_stretch_bank(cache, paths, view, config)


def test_training_with_noise_lists_it_and_refuses_folders_without_audio(
    fsdd_dir, esc_clips, tmp_path, run_cli
):
    clips = ss.load_dataset(fsdd_dir, split="train")
    clips = clips.groupby("label").head(4).reset_index(drop=True)
    valid = ss.load_dataset(fsdd_dir, split="test").groupby("label").head(1)
    noise = tmp_path / "noise"
    noise.mkdir()
    for clip in esc_clips[:3]:
        (noise / clip.name).symlink_to(clip)
    (noise / "notes.txt").write_text("not audio")
    (noise / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    (noise / "gone.flac").symlink_to(tmp_path / "deleted.flac")
    config = TrainConfig(stage1_epochs=0, stage2_epochs=1, noise_probability=1.0)
    with (
        pytest.warns(UserWarning, match=r"1 noise recordings could not be decoded .*broken\.wav"),
        pytest.warns(UserWarning, match=r"1 noise entries could not be listed .*gone\.flac"),
    ):
        result = train(
            clips,
            tmp_path / "run",
            valid,
            config=config,
            cache=tmp_path / "cache",
            progress=False,
            noise=noise,
        )
    listed = pd.read_csv(tmp_path / "run" / "noise.csv")["path"]
    assert sorted(listed) == sorted(str(noise / c.name) for c in esc_clips[:3])
    assert result.model_path.is_file()
    assert ss.read_spec(result.model_path).train["noise_probability"] == 1.0
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match="no audio recordings to use as background noise"):
        train(clips, tmp_path / "run2", valid, config=config, progress=False, noise=empty)
    with pytest.raises(ss.ConfigError, match="noise_snr_min"):
        TrainConfig(noise_snr_min=6.0, noise_snr_max=0.0)
    code, _, err = run_cli(
        "train",
        str(fsdd_dir),
        "--out",
        str(tmp_path / "frozen"),
        "--backbone",
        "aisfx+birdnet",
        "--noise",
        str(noise),
    )
    assert code != 0 and "frozen-embedding backbone" in err


def test_a_data_sets_own_background_clips_are_its_default_noise(fsdd_dir, esc_clips, tmp_path):
    digits = ss.load_dataset(fsdd_dir, split="train").groupby("label").head(3)
    ambience = pd.DataFrame({"path": [str(p) for p in esc_clips[:6]], "label": "background"})
    clips = pd.concat([digits, ambience.iloc[:4]], ignore_index=True)
    valid = pd.concat(
        [ss.load_dataset(fsdd_dir, split="test").groupby("label").head(1), ambience.iloc[4:]],
        ignore_index=True,
    )

    def noise_of(table, valid_table, out, **options) -> list[str] | None:
        config = TrainConfig(stage1_epochs=0, stage2_epochs=1, **options)
        model = ss.ModelConfig()
        options = {"valid": valid_table, "cache": tmp_path / "cache", "progress": False}
        data = _data(table, tmp_path / out, config, FeatureConfig(), model, **options)
        noise = data.train_dataloader().dataset.dataset.noise  # a Subset of CachedClips
        listed = tmp_path / out / "noise.csv"
        assert (noise is None) == (not listed.exists())
        return None if noise is None else sorted(pd.read_csv(listed)["path"])

    # The training side's background clips, never the validation side's.
    assert noise_of(clips, valid, "single") == sorted(ambience["path"][:4])
    assert noise_of(clips, valid, "off", background_noise=False) is None
    # Without background clips: the training clips' quiet stretches (FSDD's digits
    # have a few frames of room tone around each word).
    digits_only = valid[valid["label"] != "background"]
    quiet = noise_of(digits, digits_only, "quiet")
    assert quiet and set(quiet) <= set(digits["path"])
    assert (pd.read_csv(tmp_path / "quiet" / "noise.csv")["quiet_frames"] > 0).all()
    assert noise_of(digits, digits_only, "none", background_noise=False) is None

    # Multi-label: the clips with no label are the background.
    def tagged(table):
        labels = [() if label == "background" else (label,) for label in table["label"]]
        return table.assign(labels=labels, label=[",".join(t) for t in labels])

    multi = noise_of(tagged(clips), tagged(valid), "multi", multi_label=True)
    assert multi == sorted(ambience["path"][:4])
    # On by default; the CLI's --no-background-noise turns it off.
    for flag, expected in (([], True), (["--no-background-noise"], False)):
        args = build_parser().parse_args(["train", str(fsdd_dir), "--out", "x", *flag])
        assert _recipe(args)[1].background_noise is expected

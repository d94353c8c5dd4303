"""Training, model files, prediction, evaluation and cross-validation, end to end on
small real subsets of FSDD and ESC-50."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from soundsight import CacheError, FeatureCache, FeatureConfig, load_dataset, prepare
from soundsight.config import ModelConfig
from soundsight.errors import ConfigError
from soundsight.evaluation import holdout, make_folds, map_at_k, score
from soundsight.modelfile import ModelFileError, read_model_file, save_model_file
from soundsight.models import SoundNet, window_logits
from soundsight.prediction import Classifier, evaluate, submission
from soundsight.training import (
    TrainConfig,
    cross_validate,
    ensemble_model_file,
    seed_recipe,
    train,
)

QUICK = TrainConfig(stage1_epochs=1, stage2_epochs=1, batch_size=16)


def _fsdd(fsdd_dir: Path, split: str, per_digit: int) -> pd.DataFrame:
    table = load_dataset(fsdd_dir, "fsdd", split).sort_values("path")
    return table.groupby("label").head(per_digit).reset_index(drop=True)


# -- model file and prediction ------------------------------------------------------


def test_model_file_alone_rebuilds_features_labels_and_predictions(tiny_model, tmp_path, fsdd_dir):
    moved = tmp_path / "elsewhere" / "digits.safetensors"
    moved.parent.mkdir()
    shutil.copy(tiny_model, moved)
    _, spec = read_model_file(moved)
    assert spec.labels == tuple(str(d) for d in range(10))
    assert spec.features == FeatureConfig()
    assert spec.model.crop_seconds > 0  # resolved from the data at training
    assert set(spec.metrics) >= {"accuracy", "error_rate", "map3"}

    classifier = Classifier.load(moved)
    clip = fsdd_dir / "recordings" / "7_theo_3.wav"
    top = classifier.predict(clip, top_k=3)
    assert len(top) == 3 and {label for label, _ in top} <= set(classifier.labels)
    probabilities = [p for _, p in top]
    assert probabilities == sorted(probabilities, reverse=True)
    # Path, encoded bytes and waveform give the same answer.
    from soundsight import load_clip

    wave = load_clip(clip, classifier.features.sample_rate)
    for other in (classifier.predict(wave, 3), classifier.predict(clip.read_bytes(), 3)):
        assert [label for label, _ in other] == [label for label, _ in top]
        assert [p for _, p in other] == pytest.approx(probabilities)


def test_loaded_model_folds_batch_norms_and_predicts_as_the_trained_network(tiny_model, esc_clips):
    import torch

    from soundsight.models import SoundNet

    classifier = Classifier.load(tiny_model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in classifier.net.modules())
    tensors, spec = read_model_file(tiny_model)
    unfolded = SoundNet(
        spec.model,
        len(classifier.labels),
        classifier.features.floor_db,
        pretrained=False,
    )
    unfolded.backbone.load_state_dict(tensors)
    windows = torch.from_numpy(classifier.view.windows(classifier.log_mel(esc_clips[0])))[:, None]
    with torch.inference_mode():
        expected = unfolded.eval()(windows).softmax(-1)
        actual = classifier.net(windows).softmax(-1)
    np.testing.assert_allclose(actual.numpy(), expected.numpy(), atol=1e-5)


def test_batch_norm_folding_leaves_a_network_it_would_change():
    """A convolution whose output is used besides its batch norm cannot be folded."""
    import torch

    from soundsight.models import fold_batch_norms

    class Shortcut(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
            self.norm = torch.nn.BatchNorm2d(3)
            self.norm.running_mean.fill_(0.5)

        def forward(self, x):
            y = self.conv(x)
            return self.norm(y) + y

    class Net(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, x):
            return self.backbone(x)

    example = torch.rand(1, 3, 8, 8)
    shortcut = Net(Shortcut())
    assert fold_batch_norms(shortcut, example) == 0
    assert isinstance(shortcut.backbone.norm, torch.nn.BatchNorm2d)
    plain = Net(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)))
    plain.backbone[1].running_var.fill_(4.0)
    with torch.inference_mode():
        expected = plain.eval()(example)
    assert fold_batch_norms(plain, example) == 1
    assert isinstance(plain.backbone[1], torch.nn.Identity)
    with torch.inference_mode():
        torch.testing.assert_close(plain(example), expected)


def test_model_file_loading_runs_no_pickle(tiny_model, tmp_path):
    # A .safetensors model: header JSON + raw tensors. A pickle disguised as a model is
    # refused as "not a soundsight model", never unpickled.
    evil = tmp_path / "evil.safetensors"
    import pickle

    evil.write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(ModelFileError, match="evil.safetensors: not a soundsight model"):
        Classifier.load(evil)


@pytest.mark.parametrize("damage", ["truncated", "text", "plain_safetensors", "missing"])
def test_broken_model_files_give_a_clear_error(tiny_model, tmp_path, damage):
    target = tmp_path / "model.safetensors"
    if damage == "truncated":
        target.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    elif damage == "text":
        target.write_text("not a model at all")
    elif damage == "plain_safetensors":
        import torch
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(2)}, target)
    with pytest.raises(ModelFileError, match=str(target.name)):
        Classifier.load(target)


def test_predict_cli_writes_kaggle_format_and_lists_unreadable_files(
    tiny_model, tmp_path, fsdd_clips, run_cli
):
    folder = tmp_path / "clips"
    folder.mkdir()
    for clip in fsdd_clips[:6]:
        (folder / clip.name).symlink_to(clip)
    (folder / "notes.wav").write_text("this is text, not audio")
    out, probs = tmp_path / "preds.csv", tmp_path / "probs.csv"
    code, stdout, stderr = run_cli(
        "predict", tiny_model, folder, "--out", out, "--probabilities", probs, "--workers", "0"
    )
    assert code == 1  # something was unreadable...
    assert "notes.wav" in stderr and "not a readable audio file" in stderr
    frame = pd.read_csv(out, dtype=str)  # ...and the rest was still predicted
    assert list(frame.columns) == ["fname", "label", "path", "best_label", "best_probability"]
    assert sorted(frame["fname"]) == sorted(c.name for c in fsdd_clips[:6])
    # Three labels, or "unknown" for a clip below the model file's threshold.
    assert all(len(labels.split()) == 3 or labels == "unknown" for labels in frame["label"])
    probabilities = pd.read_csv(probs)
    assert np.allclose(probabilities.iloc[:, 1:].sum(axis=1), 1.0, atol=1e-4)


def test_predict_keeps_apart_files_of_one_name_in_two_folders(
    tiny_model, tmp_path, fsdd_clips, run_cli
):
    for folder, clip in (("a", fsdd_clips[0]), ("b", fsdd_clips[1])):
        (tmp_path / "clips" / folder).mkdir(parents=True)
        (tmp_path / "clips" / folder / "same.wav").symlink_to(clip)
    out = tmp_path / "preds.csv"
    code, _, stderr = run_cli("predict", tiny_model, tmp_path / "clips", "--out", out)
    assert code == 0, stderr
    frame = pd.read_csv(out, dtype=str)
    assert frame["fname"].tolist() == ["same.wav", "same.wav"]
    assert frame["path"].tolist() == ["a/same.wav", "b/same.wav"]


@pytest.mark.parametrize("top_k", ["0", "-1"])
def test_predict_refuses_fewer_than_one_label(tiny_model, fsdd_clips, run_cli, top_k):
    code, _, stderr = run_cli("predict", tiny_model, fsdd_clips[0], "--top-k", top_k)
    assert code == 2 and "--top-k: must be at least 1" in stderr


def test_predict_on_empty_folder_is_an_error(tiny_model, tmp_path, run_cli):
    (tmp_path / "empty").mkdir()
    code, _, stderr = run_cli("predict", tiny_model, tmp_path / "empty")
    assert code == 2 and "no audio files" in stderr and "empty" in stderr


def test_sliding_windows_cover_long_clips(tiny_model):
    classifier = Classifier.load(tiny_model)
    frames, n_mels = classifier.view.frames, classifier.features.n_mels
    for length in (frames + 1, 5 * frames // 3, 5 * frames + 3):
        # each cell holds its frame's index, so a window's first cell is its start
        long = np.tile(np.arange(length, dtype=np.float32), (n_mels, 1))
        windows = classifier.view.windows(long)
        assert windows.shape[1:] == (n_mels, frames)
        starts = windows[:, 0, 0].astype(int)
        assert starts[0] == 0 and starts[-1] == length - frames  # the whole clip
        steps = np.diff(starts)
        assert steps.max() <= 2 * frames / 3  # overlapping by a third at least
        assert steps.max() - steps.min() <= 1  # evenly spaced
    short = classifier.view.windows(long[:, :3])
    assert short.shape == (1, n_mels, frames)


def test_submission_format():
    frame = pd.DataFrame({"path": ["/a/x.wav"], "Bass drum": [0.2], "Cello": [0.5], "Oboe": [0.3]})
    result = submission(frame, ["Bass drum", "Cello", "Oboe"], top_k=3)
    assert result.to_dict("records") == [
        {"fname": "x.wav", "label": "Cello Oboe Bass_drum", "path": "/a/x.wav"}
    ]


# -- evaluation ---------------------------------------------------------------------


def test_map_at_3_and_scores():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.3, 0.2], [0.6, 0.3, 0.1]])
    targets = np.array([0, 0, 2, 1])  # ranks 1, 2, 3, 2
    assert map_at_k(probabilities, targets, 3) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 2) / 4)
    metrics = score(probabilities, targets, ["a", "b", "c"])
    assert metrics["accuracy"] == 0.25 and metrics["error_rate"] == 0.75
    assert metrics["confusion"].sum() == 4
    confused = metrics["most_confused"]
    assert confused[["true", "predicted"]].values.tolist() == [["a", "b"], ["b", "a"], ["c", "a"]]


def test_evaluate_on_fsdd_test_side(tiny_model, fsdd_dir, tmp_path, run_cli):
    code, stdout, _ = run_cli(
        "evaluate", tiny_model, fsdd_dir, "--out", tmp_path / "eval", "--cache", tmp_path / "cache"
    )
    assert code == 0
    assert "300 clips" in stdout and "MAP@3" in stdout and "precision" in stdout
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["clips"] == 300 and 0 <= metrics["error_rate"] <= 1
    confusion = pd.read_csv(tmp_path / "eval" / "confusion.csv", index_col=0)
    assert confusion.to_numpy().sum() == 300


def test_model_refuses_a_cache_of_other_features(tiny_model, fsdd_clips, tmp_path, run_cli):
    other = FeatureConfig(n_mels=64)
    cache, _ = prepare(
        [str(p) for p in fsdd_clips[:2]], tmp_path / "cache", other, workers=0, progress=False
    )
    with pytest.raises(CacheError, match="different parameters.*n_mels 64 vs 128"):
        FeatureCache(cache.folder, FeatureConfig())
    table = pd.DataFrame({"path": [str(p) for p in fsdd_clips[:2]], "label": ["0", "0"]})
    with pytest.raises(CacheError, match="refusing to mix"):
        evaluate(
            tiny_model,
            table.assign(fold=pd.NA, group=pd.NA, verified=pd.NA),
            cache.folder,
            progress=False,
        )


# -- splits -------------------------------------------------------------------------


def test_esc_folds_are_stratified_and_grouped_by_source_recording(esc50_dir):
    table = load_dataset(esc50_dir)
    folds = make_folds(table, 5, seed=0)
    assert sorted(np.concatenate(folds)) == list(range(len(table)))  # a partition
    for valid in folds:
        train_groups = set(table["group"].drop(index=valid))
        assert not train_groups & set(table["group"].iloc[valid])
        assert table["label"].iloc[valid].nunique() >= 40  # stratified: most classes each fold


def test_a_data_sets_own_folds_are_used_only_when_they_split_it(esc50_dir):
    table = load_dataset(esc50_dir)  # fold 2 of ESC-50, and a few clips of folds 3-5
    balanced = table.assign(fold=np.arange(len(table)) % 4)
    folds = make_folds(balanced, 4)
    assert [set(v) for v in folds] == [set(np.flatnonzero(balanced["fold"] == f)) for f in range(4)]
    assert table["fold"].nunique() == 4
    with pytest.warns(UserWarning, match="own 4 folds are too unequal"):
        folds = make_folds(table, 4)
    sizes = [len(valid) for valid in folds]
    assert min(sizes) > 0.8 * len(table) / 4  # grouped folds of about equal size
    for valid in folds:
        assert not set(table["group"].iloc[valid]) & set(table["group"].drop(index=valid))


def test_fsdd_folds_grouped_by_speaker(fsdd_dir):
    table = load_dataset(fsdd_dir, "fsdd", "all")
    folds = make_folds(table, 3)
    for valid in folds:
        assert not set(table["group"].iloc[valid]) & set(table["group"].drop(index=valid))


def test_label_seen_once_is_reported_not_fatal():
    table = pd.DataFrame(
        {
            "path": [f"/x/{i}.wav" for i in range(21)],
            "label": ["a"] * 10 + ["b"] * 10 + ["lonely"],
            "fold": pd.NA,
            "group": pd.NA,
            "verified": pd.NA,
        }
    )
    with pytest.warns(UserWarning, match="single clip.*'lonely'.*kept for training"):
        train_part, valid_part = holdout(table, 0.2)
    assert "lonely" in set(train_part["label"]) and "lonely" not in set(valid_part["label"])
    with pytest.warns(UserWarning, match="fewer clips than the 5 folds.*'lonely': 1"):
        make_folds(table, 5)


# -- training -----------------------------------------------------------------------


def test_training_skips_a_corrupt_clip_and_reproduces_with_a_seed(fsdd_dir, tmp_path):
    clips = _fsdd(fsdd_dir, "train", 5)
    broken = tmp_path / "3_broken_7.wav"
    broken.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    clips = pd.concat([clips, clips.iloc[:1].assign(path=str(broken), label="3")])
    valid = _fsdd(fsdd_dir, "test", 2)
    config = TrainConfig(stage1_epochs=0, stage2_epochs=1, batch_size=16)
    with pytest.warns(UserWarning, match="1 clips could not be decoded"):
        first = train(
            clips,
            tmp_path / "a",
            valid=valid,
            config=config,
            cache=tmp_path / "cache",
            progress=False,
        )
    assert first.failures == [(str(broken), first.failures[0][1])]
    failures = pd.read_csv(tmp_path / "a" / "failures.csv")
    assert failures["path"].tolist() == [str(broken)]
    with pytest.warns(UserWarning):
        train(
            clips,
            tmp_path / "b",
            valid=valid,
            config=config,
            cache=tmp_path / "cache",
            progress=False,
        )
    a = pd.read_csv(tmp_path / "a" / "valid_predictions.csv").iloc[:, 2:].to_numpy()
    b = pd.read_csv(tmp_path / "b" / "valid_predictions.csv").iloc[:, 2:].to_numpy()
    assert np.allclose(a, b, atol=1e-5)  # same seed, same data: same model


def test_two_stage_training_history_and_outputs(fsdd_dir, tmp_path, capsys):
    result = train(
        _fsdd(fsdd_dir, "train", 6),
        tmp_path / "run",
        valid=_fsdd(fsdd_dir, "test", 2),
        config=QUICK,
        cache=tmp_path / "cache",
        progress=True,
    )
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(history.columns) == [
        "stage",
        "epoch",
        "train_loss",
        "valid_loss",
        "error_rate",
        "seconds",
    ]
    assert history[["stage", "epoch"]].values.tolist() == [[1, 1], [2, 1]]
    assert history[["train_loss", "valid_loss", "error_rate"]].notna().all().all()
    assert "train_loss" in capsys.readouterr().out  # the per-epoch table is printed
    for name in (
        "model.safetensors",
        "metrics.json",
        "per_class.csv",
        "confusion.csv",
        "most_confused.csv",
        "valid_predictions.csv",
    ):
        assert (tmp_path / "run" / name).is_file(), name
    assert result.metrics["clips"] == 20


def test_seed_recipe_is_the_blogs():
    model, config = seed_recipe(9)
    assert (model.image_size, model.imagenet_normalization, model.encoding) == (224, True, "magma")
    assert (config.mixup, config.freq_masks, config.time_masks) == (0, 0, 0)
    assert (config.lr, config.stage2_lr, config.body_lr) == (3e-3, 1e-4, 1e-5)
    assert config.stage1_epochs + config.stage2_epochs == 9


def test_cross_validation_reports_mean_and_spread(esc50_dir, tmp_path):
    table = load_dataset(esc50_dir)
    table = table[table["label"].isin(sorted(table["label"].unique())[:3])].reset_index(drop=True)
    config = TrainConfig(stage1_epochs=0, stage2_epochs=1, batch_size=8)
    result = cross_validate(
        table,
        tmp_path / "cv",
        3,
        config=config,
        cache=tmp_path / "cache",
        progress=False,
        ensemble=True,
    )
    summary = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    assert summary["mean"]["accuracy"] == pytest.approx(
        np.mean([f["accuracy"] for f in summary["folds"]])
    )
    assert sum(f["clips"] for f in result.folds) == len(table)  # every clip validated once
    assert all((tmp_path / "cv" / f"fold{k}" / "model.safetensors").exists() for k in range(3))

    # --ensemble: one model file whose logits are the mean of the fold models' logits,
    # each divided by its own temperature; loaded and used like any model.
    folds = [tmp_path / "cv" / f"fold{k}" / "model.safetensors" for k in range(3)]
    members = [Classifier.load(path) for path in folds]
    ensemble = Classifier.load(tmp_path / "cv" / "ensemble.safetensors")
    assert ensemble.spec.model.members == 3 and ensemble.rejection is None
    assert ensemble.spec.labels == members[0].spec.labels
    windows = torch.from_numpy(ensemble.view.windows(ensemble.log_mel(table["path"].iloc[0])))
    with torch.inference_mode():
        mean_logits = torch.stack(
            [window_logits(m.net, windows[:, None])[0] / m.spec.temperature for m in members]
        ).mean(0)
        logits, embedding = window_logits(ensemble.net, windows[:, None])
    torch.testing.assert_close(logits, mean_logits, rtol=1e-4, atol=1e-4)
    assert embedding.shape[-1] == 3 * members[0].net.backbone.num_features
    expected = mean_logits.softmax(-1).mean(0).numpy()
    np.testing.assert_allclose(
        ensemble.probabilities([ensemble.log_mel(table["path"].iloc[0])])[0], expected, atol=1e-4
    )
    metrics, _, failures = evaluate(tmp_path / "cv" / "ensemble.safetensors", table, progress=False)
    assert not failures and metrics["clips"] == len(table)
    with pytest.raises(ConfigError, match="not trained"):
        train(table, tmp_path / "no", model=ModelConfig(members=2), progress=False)

    # A fold whose training clips lacked a class: the ensemble's labels are the union,
    # and that class's logit is the mean over the members that know it (here one).
    tensors, spec = read_model_file(folds[1])
    assert list(spec.labels) == sorted(spec.labels)
    narrow = {k: v[:-1] if k.startswith("classifier.") else v for k, v in tensors.items()}
    net = SoundNet(spec.model, len(spec.labels) - 1, spec.features.floor_db, pretrained=False)
    net.backbone.load_state_dict(narrow)
    save_model_file(tmp_path / "narrow.safetensors", net, replace(spec, labels=spec.labels[:-1]))
    mixed = Classifier.load(
        ensemble_model_file([folds[0], tmp_path / "narrow.safetensors"], tmp_path / "mixed.st")
    )
    assert mixed.labels == list(spec.labels)
    with torch.inference_mode():
        full = window_logits(members[0].net, windows[:, None])[0] / members[0].spec.temperature
        part = window_logits(Classifier.load(tmp_path / "narrow.safetensors").net, windows[:, None])
        logits = window_logits(mixed.net, windows[:, None])[0]
    expected = torch.cat([(full[:, :-1] + part[0] / spec.temperature) / 2, full[:, -1:]], 1)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


def test_lr_finder_plot_and_suggestion(fsdd_dir, tmp_path, run_cli):
    code, stdout, _ = run_cli(
        "lr-find",
        fsdd_dir,
        "--out",
        tmp_path / "lr",
        "--cache",
        tmp_path / "cache",
        "--batch-size",
        "16",
    )
    assert code == 0
    suggestion = float(stdout.split("suggested learning rate: ")[1].split(";")[0])
    assert 1e-6 <= suggestion <= 1.0
    assert (tmp_path / "lr" / "lr_find.png").stat().st_size > 10_000


@pytest.mark.skipif(sys.platform != "linux", reason="uses SIGKILL and process groups")
def test_interrupted_training_resumes_from_its_last_checkpoint(fsdd_dir, tmp_path):
    data = tmp_path / "digits"
    for row in _fsdd(fsdd_dir, "all", 12).itertuples():
        (data / row.label).mkdir(parents=True, exist_ok=True)
        (data / row.label / Path(row.path).name).symlink_to(row.path)
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "soundsight.cli",
        "train",
        str(data),
        "--out",
        str(run),
        "--cache",
        str(tmp_path / "cache"),
        "--stage1-epochs",
        "1",
        "--stage2-epochs",
        "3",
        "--crop-seconds",
        "0.5",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    checkpoint = run / "checkpoints" / "stage2" / "last.ckpt"
    deadline = time.time() + 240
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert checkpoint.exists(), "no stage-2 checkpoint before the deadline"
    done_before = pd.read_csv(run / "history.csv")
    assert not (run / "model.safetensors").exists()

    finished = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]
    history = pd.read_csv(run / "history.csv")
    assert history[["stage", "epoch"]].values.tolist() == [[1, 1], [2, 1], [2, 2], [2, 3]]
    # Epochs finished before the kill were not trained again.
    kept = history.merge(done_before, on=["stage", "epoch"], suffixes=("", "_before"))
    assert np.allclose(kept["train_loss"], kept["train_loss_before"])
    assert (run / "model.safetensors").exists()

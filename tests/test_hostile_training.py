"""Training on hostile data sets (issue #11): too small for the schedule or the split,
labels that look like numbers or missing values, clips edited or deleted while a run
trains, and a resumed run whose data set changed. Real FSDD clips throughout, in the
folder-per-class layout a user makes (symlinks, or copies where a test edits them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from soundsight import load_dataset
from soundsight.evaluation import holdout, make_folds
from soundsight.layouts import DatasetError
from soundsight.modelfile import read_spec
from soundsight.schedule import DIV_FACTOR, FINAL_DIV_FACTOR, one_cycle
from soundsight.tables import read_csv
from soundsight.training import ClipClassifier, TrainConfig, train

#: One short stage: each test still runs every step of the machinery it checks.
ONE_EPOCH = TrainConfig(stage1_epochs=0, stage2_epochs=1, batch_size=16)


def _recordings(fsdd_dir: Path, digit: int, count: int) -> list[Path]:
    return sorted((fsdd_dir / "recordings").glob(f"{digit}_*.wav"))[:count]


def _folder(root: Path, classes: dict[str, list[Path]], copy: bool = False) -> Path:
    """``root/<label>/<clip>``: symlinks to real clips, or copies (tests that edit)."""
    for label, clips in classes.items():
        (root / label).mkdir(parents=True, exist_ok=True)
        for clip in clips:
            target = root / label / clip.name
            shutil.copy(clip, target) if copy else target.symlink_to(clip)
    return root


def _digits(fsdd_dir: Path, root: Path, digits: int, per_digit: int, copy: bool = False):
    classes = {str(d): _recordings(fsdd_dir, d, per_digit) for d in range(digits)}
    return load_dataset(_folder(root, classes, copy), "folder")


# -- defect 1: a stage of exactly 4 optimiser steps -----------------------------------


def test_one_cycle_of_four_steps_warms_up_and_anneals():
    # torch's OneCycleLR divides by zero for 4 steps at pct_start 0.25.
    rates = one_cycle([1e-3, 1e-4], 4)
    assert rates.shape == (4, 2) and np.isfinite(rates).all()
    np.testing.assert_allclose(rates[0], [1e-3 / DIV_FACTOR, 1e-4 / DIV_FACTOR])
    np.testing.assert_allclose(rates[1], [1e-3, 1e-4])  # the peak, then down
    assert rates[-1, 0] == pytest.approx(1e-3 / DIV_FACTOR / FINAL_DIV_FACTOR)
    for steps in range(1, 41):  # every stage length the schedule can meet
        assert np.isfinite(one_cycle([2e-3], steps)).all()


def test_small_dataset_with_four_steps_per_epoch_trains(fsdd_dir, tmp_path):
    # The reproduction: 7 digits x 12 clips; 20% held out leaves 67 clips,
    # 4 batches of 16.
    clips = _digits(fsdd_dir, tmp_path / "digits", 7, 12)
    config = TrainConfig(stage1_epochs=1, stage2_epochs=0, batch_size=16)
    result = train(clips, tmp_path / "run", config=config, cache=tmp_path / "cache", progress=False)
    assert (len(clips) - result.metrics["clips"]) // config.batch_size == 4
    assert result.model_path.is_file()
    assert [(row["stage"], row["epoch"]) for row in result.history] == [(1, 1)]


def test_two_clips_per_label_are_enough_to_train(fsdd_dir, tmp_path):
    # Five folds cannot be drawn from labels of two clips; the holdout takes half.
    clips = _digits(fsdd_dir, tmp_path / "digits", 3, 2)
    result = train(
        clips,
        tmp_path / "run",
        config=ONE_EPOCH,
        cache=tmp_path / "cache",
        progress=False,
    )
    assert result.metrics["clips"] == 3  # one clip of each label validated...
    assert read_spec(result.model_path).labels == ("0", "1", "2")  # ...one of each trained on


def test_splits_too_small_for_their_groups_say_why():
    table = pd.DataFrame(
        {
            "path": [f"/x/{i}.wav" for i in range(8)],
            "label": ["a", "b"] * 4,
            "fold": pd.NA,
            "group": ["speaker"] * 8,
            "verified": pd.NA,
        }
    )
    with pytest.raises(DatasetError, match="1 groups.*too few for 2 folds.*validation set"):
        holdout(table)
    with pytest.raises(DatasetError, match="every label has fewer clips than the 5 folds"):
        make_folds(table.assign(group=pd.NA), 5)


# -- defect 4: labels are strings -----------------------------------------------------

#: Folder names pandas would read as NaN or numbers, or a spreadsheet as a formula.
AWKWARD_LABELS = ("NA", "null", "01", "1", "1.0", "=SUM(1)", "'quoted")


def test_labels_that_look_like_numbers_or_missing_values_stay_distinct(fsdd_dir, tmp_path):
    classes = {label: _recordings(fsdd_dir, d, 5) for d, label in enumerate(AWKWARD_LABELS)}
    clips = load_dataset(_folder(tmp_path / "data", classes), "folder")
    run = tmp_path / "run"
    result = train(clips, run, config=ONE_EPOCH, cache=tmp_path / "cache", progress=False)

    labels = sorted(AWKWARD_LABELS)
    assert list(read_spec(result.model_path).labels) == list(labels)
    assert read_csv(run / "per_class.csv", text=("label",))["label"].tolist() == labels
    confusion = read_csv(run / "confusion.csv", index_col=0)
    assert list(confusion.index) == list(confusion.columns) == labels
    predictions = read_csv(run / "valid_predictions.csv", text=("path", "label"))
    assert list(predictions.columns[2:]) == labels
    assert set(predictions["label"]) == set(labels)  # every label validated, none merged
    clips_csv = read_csv(run / "clips.csv", text=("path", "label", "key"))
    assert set(clips_csv["label"]) == set(labels)
    # A spreadsheet opening the scores shows the formula-like label as text.
    assert "\n'=SUM(1)," in (run / "per_class.csv").read_text()
    assert result.history[0]["epoch"] == 1  # history read back as numbers


# -- risk: clips edited or deleted while training -------------------------------------


def test_clips_edited_or_deleted_during_training_are_left_out_and_reported(
    fsdd_dir, tmp_path, monkeypatch
):
    clips = _digits(fsdd_dir, tmp_path / "train", 3, 6, copy=True)
    valid = _digits(fsdd_dir, tmp_path / "valid", 3, 2, copy=True)
    deleted, edited = clips["path"].iloc[0], valid["path"].iloc[0]
    replacement = _recordings(fsdd_dir, 9, 1)[0]

    def change_files(module):
        # In the middle of the run (first epoch): the loaders are already built.
        if module.current_epoch == 0:
            os.remove(deleted)
            shutil.copy(replacement, edited)

    monkeypatch.setattr(ClipClassifier, "on_train_epoch_start", change_files)
    config = TrainConfig(stage1_epochs=0, stage2_epochs=2, batch_size=6)
    with pytest.warns(UserWarning, match="2 clips changed or were deleted during training"):
        result = train(
            clips,
            tmp_path / "run",
            valid=valid,
            config=config,
            cache=tmp_path / "cache",
            progress=False,
        )
    reasons = dict(result.failures)
    assert reasons == {deleted: "deleted during training", edited: reasons[edited]}
    assert reasons[edited].startswith("edited")
    failures = read_csv(tmp_path / "run" / "failures.csv", text=("path", "reason"))
    assert dict(zip(failures["path"], failures["reason"], strict=True)) == reasons
    assert result.metrics["clips"] == len(valid) - 1  # the edited clip is not scored
    predictions = read_csv(tmp_path / "run" / "valid_predictions.csv", text=("path", "label"))
    assert edited not in set(predictions["path"])
    assert len(result.history) == 2  # both epochs trained


# -- risk: resuming on a changed data set ---------------------------------------------


def test_resume_refuses_a_changed_data_set_unless_forced(fsdd_dir, tmp_path):
    clips = _digits(fsdd_dir, tmp_path / "data", 3, 6, copy=True)
    run, cache = tmp_path / "run", tmp_path / "cache"
    train(clips, run, config=ONE_EPOCH, cache=cache, progress=False)
    assert (run / "checkpoints" / "stage2" / "last.ckpt").is_file()

    extra = tmp_path / "data" / "2" / "2_extra.wav"
    shutil.copy(_recordings(fsdd_dir, 2, 7)[-1], extra)
    edited = clips["path"].iloc[1]
    os.utime(edited, ns=(0, 0))
    changed = pd.concat([clips.iloc[1:], clips.iloc[:1].assign(path=str(extra), label="2")])
    removed = clips["path"].iloc[0]
    with pytest.raises(DatasetError) as refused:
        train(changed, run, config=ONE_EPOCH, cache=cache, resume=True, progress=False)
    message = str(refused.value)
    assert "the data set changed since this run started" in message
    assert f"1 clips added ({extra})" in message
    assert f"1 clips removed ({removed})" in message
    assert f"edited or deleted ({edited})" in message
    assert "force=True (--force)" in message

    result = train(
        changed, run, config=ONE_EPOCH, cache=cache, resume=True, force=True, progress=False
    )
    assert result.model_path.is_file()
    # The forced run records the data set it went on with: resuming again is accepted.
    train(changed, run, config=ONE_EPOCH, cache=cache, resume=True, progress=False)

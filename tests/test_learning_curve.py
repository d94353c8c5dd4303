"""`learning-curve`: accuracy against clips per class on real clips, grouped splits,
the classes that need more clips, and a clear error when a class is too small."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from soundsight import load_dataset
from soundsight.learning_curve import learning_curve
from soundsight.tables import read_csv


@pytest.fixture(scope="module")
def digits(fsdd_dir) -> pd.DataFrame:
    """8 real clips of each digit, from all six speakers (the groups)."""
    table = load_dataset(fsdd_dir, "fsdd", "train").sort_values("path")
    table = table.assign(rank=table.groupby(["label", "group"]).cumcount())
    table = table[table["rank"] < 2].groupby("label").head(8)
    return table.drop(columns="rank").reset_index(drop=True)


def test_learning_curve_on_real_digits(digits, tmp_path):
    out = tmp_path / "curve"
    result = learning_curve(digits, out, cache=tmp_path / "cache", progress=False)
    summary = result.summary
    levels = summary["levels"]
    assert levels[:3] == [1, 2, 4] and levels == sorted(levels)
    fits = read_csv(out / "learning_curve.csv")
    assert len(fits) == 3 * len(levels) and set(fits["split"]) == {0, 1, 2}
    assert fits["accuracy"].between(0, 1).all()
    # More clips per class help: the largest level beats one clip per class.
    curve = result.curve.set_index("clips_per_class")["mean"]
    assert curve[levels[-1]] > curve[1]
    assert summary["fit"] is not None and 0 <= summary["accuracy_at_2x"] <= 1
    classes = read_csv(out / "learning_curve_classes.csv", text=("label",))
    assert sorted(classes["label"]) == sorted(digits["label"].unique())
    counts = digits["label"].value_counts().to_dict()
    assert classes.set_index("label")["clips"].to_dict() == counts
    assert set(summary["gain_most"]) <= set(classes["label"])
    assert json.loads((out / "learning_curve.json").read_text())["levels"] == levels
    assert (out / "learning_curve.png").stat().st_size > 10_000


def test_learning_curve_keeps_speakers_on_one_side(digits, tmp_path, monkeypatch):
    from soundsight import learning_curve as module

    seen = []
    original = module._probe

    def probe(embeddings, labels):
        seen.append(len(labels))
        return original(embeddings, labels)

    # The held-out side of each split is a grouped fold: its speakers never train.
    from soundsight.evaluation import holdout

    for seed in range(3):
        train, test = holdout(digits, 0.2, seed)
        assert not set(train["group"]) & set(test["group"])
    monkeypatch.setattr(module, "_probe", probe)
    learning_curve(digits, tmp_path / "curve", cache=tmp_path / "cache", progress=False)
    assert min(seen) == 10  # one clip of each of the 10 digits at the first level


def test_a_class_with_one_clip_is_named(run_cli, fsdd_subset, tmp_path):
    data = tmp_path / "data"
    for folder in sorted(fsdd_subset.iterdir()):
        clips = sorted(folder.iterdir())[: 1 if folder.name in ("3", "7") else None]
        for clip in clips:
            (data / folder.name).mkdir(parents=True, exist_ok=True)
            (data / folder.name / clip.name).symlink_to(clip.resolve())
    code, _, err = run_cli("learning-curve", str(data), "--out", str(tmp_path / "out"))
    assert code == 2
    assert "at least 2 clips in every class" in err and "'3' (1)" in err and "'7' (1)" in err
    assert not (tmp_path / "out").exists()


def test_cli_writes_the_picture_and_numbers(run_cli, fsdd_subset, tmp_path):
    out = tmp_path / "out"
    code, printed, _ = run_cli(
        "learning-curve", str(fsdd_subset), "--out", str(out), "--cache", str(tmp_path / "c")
    )
    assert code == 0 and "accuracy now (1 clips per class)" in printed
    assert {p.name for p in out.iterdir()} >= {
        "learning_curve.png",
        "learning_curve.csv",
        "learning_curve_fit.csv",
        "learning_curve_classes.csv",
    }
    assert np.isfinite(read_csv(out / "learning_curve.csv")["accuracy"]).all()

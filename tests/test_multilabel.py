"""Several labels per clip: multi-label layouts and their bad rows, lwlrap / mAP /
thresholds, and a tiny multi-label model trained on real mixtures (two FSDD digits
summed, written as WAV at test time, plus ESC-50 clips as background without a label)
through predict, evaluate, detect and the report."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

from soundsight import DatasetError, FeatureConfig, detect_layout, load_dataset
from soundsight.evaluation import (
    average_precisions,
    lwlrap,
    multi_label_score,
    tune_thresholds,
)
from soundsight.layouts import clip_labels, is_multi_label
from soundsight.modelfile import ModelFileError, ModelSpec

SAMPLE_RATE = 8000  # FSDD's own rate


# -- metrics ------------------------------------------------------------------------


def test_lwlrap_of_a_hand_computed_example_weighs_labels_not_clips():
    from sklearn.metrics import label_ranking_average_precision_score

    truth = np.array([[1, 0, 1], [0, 1, 0]])
    scores = np.array([[0.9, 0.8, 0.1], [0.2, 0.7, 0.1]])
    # Clip 1: label 0 ranks 1st (precision 1), label 2 ranks 3rd with 2 true labels at
    # or above it (2/3). Clip 2: label 1 ranks 1st (1). Three true labels in all.
    assert lwlrap(truth, scores) == pytest.approx((1 + 2 / 3 + 1) / 3)
    # Unweighted LRAP averages clips instead: ((1 + 2/3) / 2 + 1) / 2.
    lrap = label_ranking_average_precision_score(truth, scores)
    assert lrap == pytest.approx(((1 + 2 / 3) / 2 + 1) / 2)
    assert lwlrap(truth, scores) != pytest.approx(lrap)
    # A clip without labels adds nothing; ties count against the true label.
    assert lwlrap(np.vstack([truth, [0, 0, 0]]), np.vstack([scores, [0.5, 0.4, 0.3]])) == (
        pytest.approx(lwlrap(truth, scores))
    )
    assert lwlrap(np.array([[0, 1]]), np.array([[0.5, 0.5]])) == pytest.approx(0.5)


def test_lwlrap_equals_sklearn_lrap_with_one_label_per_clip():
    from sklearn.metrics import label_ranking_average_precision_score

    rng = np.random.default_rng(0)
    truth = np.eye(7, dtype=int)[rng.integers(0, 7, 200)]
    scores = rng.random((200, 7)).round(1)  # rounding makes ties
    assert lwlrap(truth, scores) == pytest.approx(
        label_ranking_average_precision_score(truth, scores)
    )


def test_mean_ap_per_class_f1_and_tuned_thresholds():
    from sklearn.metrics import average_precision_score, f1_score

    rng = np.random.default_rng(1)
    truth = (rng.random((120, 4)) < 0.3).astype(int)
    truth[:, 3] = 0  # a label no clip has
    scores = np.clip(truth * 0.4 + rng.random((120, 4)) * 0.6, 0, 1)
    ap = average_precisions(truth, scores)
    assert np.isnan(ap[3])
    np.testing.assert_allclose(
        ap[:3], [average_precision_score(truth[:, c], scores[:, c]) for c in range(3)]
    )
    thresholds = tune_thresholds(truth, scores)
    assert thresholds[3] == 0.5
    for c in range(3):  # no other cut gives a higher F1
        best = max(f1_score(truth[:, c], scores[:, c] >= t) for t in np.unique(scores[:, c]))
        assert f1_score(truth[:, c], scores[:, c] >= thresholds[c]) == pytest.approx(best)
    metrics = multi_label_score(scores, truth, list("abcd"), thresholds)
    assert metrics["mean_ap"] == pytest.approx(np.nanmean(ap))
    assert metrics["lwlrap"] == pytest.approx(lwlrap(truth, scores))
    assert metrics["background_clips"] == int((truth.sum(1) == 0).sum())
    f1 = f1_score(truth, scores >= thresholds, average=None, zero_division=0)
    np.testing.assert_allclose(metrics["per_class"]["f1"], f1)
    assert metrics["macro_f1"] == pytest.approx(f1.mean())


def test_adding_log_mels_sums_powers():
    import torch

    from soundsight.features import add_log_mels

    features = FeatureConfig()
    rng = np.random.default_rng(2)
    db = torch.as_tensor(rng.uniform(-50, 0, (2, 1, 16, 20)), dtype=torch.float32)
    db[..., 0, 0] = 0.0  # each clip's loudest bin at 0 dB
    silence = torch.full_like(db, features.floor_db)
    # Silence (80 dB down) added changes a bin 50 dB down by 10 log10(1.01) dB at most;
    # a clip added to itself is 3 dB louder everywhere, which the reference to the
    # loudest bin takes back.
    torch.testing.assert_close(add_log_mels(db, silence, features), db, atol=0.05, rtol=0)
    torch.testing.assert_close(add_log_mels(db, db, features), db, atol=1e-3, rtol=0)
    quiet = db - 20.0
    mixed = add_log_mels(db, quiet.clamp_min(features.floor_db), features)
    expected = 10 * torch.log10(10 ** (db / 10) + 10 ** (quiet / 10))
    expected = (expected - expected.amax(dim=(-2, -1), keepdim=True)).clamp_min(-80)
    torch.testing.assert_close(mixed, expected, atol=1e-2, rtol=0)


def test_mixing_two_clips_of_a_batch_unites_their_labels():
    import torch

    from soundsight.training import mix_clips

    features = FeatureConfig()
    db = torch.full((6, 1, 8, 10), features.floor_db)
    for clip in range(6):
        db[clip, 0, clip] = 0.0  # clip i: band i loud, the rest silent
    targets = torch.eye(6)
    targets[5] = 0  # a background clip
    weights = torch.tensor([1.0, 0.5, 1.0, 1.0, 1.0, 1.0])
    torch.manual_seed(0)
    mixed, united, weighed = mix_clips(db, targets, weights, 1.0, features)
    pairs = 0
    for clip in range(6):
        loud = set(torch.nonzero(mixed[clip, 0, :, 0] > -10).flatten().tolist())
        assert clip in loud and len(loud) <= 2
        (other,) = loud - {clip} or {clip}
        pairs += other != clip
        torch.testing.assert_close(united[clip], torch.maximum(targets[clip], targets[other]))
        assert weighed[clip] == min(weights[clip], weights[other])
        # Two loud bands at the same level: each is 0 dB after the mixture's reference.
        assert mixed[clip, 0, clip, 0] == pytest.approx(0.0, abs=1e-4)
    assert pairs >= 3
    unchanged = mix_clips(db, targets, weights, 0.0, features)
    assert all(a is b for a, b in zip(unchanged, (db, targets, weights), strict=True))


# -- layouts ------------------------------------------------------------------------


def _linked(root: Path, folder: str, clips: list[Path]) -> list[str]:
    (root / folder).mkdir(parents=True, exist_ok=True)
    for clip in clips:
        (root / folder / clip.name).symlink_to(clip)
    return [clip.name for clip in clips]


def test_fsdkaggle2019_layout_reads_label_lists_and_background_clips(tmp_path, fsdd_clips):
    names = _linked(tmp_path, "train_curated", fsdd_clips[:4])
    pd.DataFrame(
        {"fname": names, "labels": ["Bark,Rain", "Bark", "", "Walk_and_footsteps"]}
    ).to_csv(tmp_path / "train_curated.csv", index=False)
    noisy = _linked(tmp_path, "train_noisy", fsdd_clips[4:6])
    pd.DataFrame({"fname": noisy, "labels": ["Rain", "Bark, Rain"]}).to_csv(
        tmp_path / "train_noisy.csv", index=False
    )
    test = _linked(tmp_path, "test", fsdd_clips[6:8])
    pd.DataFrame({"fname": test, "labels": ["Rain,Bark", "Bark"]}).to_csv(
        tmp_path / "test_post_competition.csv", index=False
    )
    assert detect_layout(tmp_path) == "fsdkaggle2019"
    table = load_dataset(tmp_path)
    assert is_multi_label(table) and table.attrs["multi_label"]
    assert clip_labels(table) == [
        ("Bark", "Rain"),
        ("Bark",),
        (),
        ("Walk_and_footsteps",),
        ("Rain",),
        ("Bark", "Rain"),
    ]
    assert table.attrs["background_clips"] == 1
    assert table["label"].tolist()[:3] == ["Bark;Rain", "Bark", ""]
    assert table["verified"].tolist() == [True] * 4 + [False] * 2
    assert all(Path(p).is_file() for p in table["path"])
    side = load_dataset(tmp_path, split="test")
    assert clip_labels(side) == [("Rain", "Bark"), ("Bark",)]


def test_multi_label_rows_with_bad_labels_are_named_by_line(tmp_path, fsdd_clips):
    names = _linked(tmp_path, "train_curated", fsdd_clips[:5])
    (tmp_path / "train_curated.csv").write_text(
        "fname,labels\n"
        f"{names[0]},Bark\n"
        f'{names[1]},"Bark,,Rain"\n'
        f'{names[2]},"../../etc,Rain"\n'
        f"{names[3]},Rain;Bark\n"
        f",Bark\n"
    )
    with pytest.raises(DatasetError) as info:
        load_dataset(tmp_path, "fsdkaggle2019")
    message = str(info.value)
    assert "line 3: an empty label" in message
    assert "line 4: label '../../etc' holds a path separator" in message
    assert "line 5: label 'Rain;Bark'" in message
    assert "line 6: no file name" in message
    assert "line 2" not in message


def test_multi_label_folds_are_stratified_by_each_clips_first_label(tmp_path, fsdd_clips):
    from soundsight.evaluation import holdout, strata

    names = _linked(tmp_path, "train_curated", fsdd_clips)
    cells = [f"{'ab'[i % 2]},{'cdefghijkl'[i % 10]}" for i in range(16)] + [""] * 4
    pd.DataFrame({"fname": names, "labels": cells}).to_csv(
        tmp_path / "train_curated.csv", index=False
    )
    table = load_dataset(tmp_path)
    assert strata(table).value_counts().to_dict() == {"a": 8, "b": 8, "": 4}
    train, valid = holdout(table, 0.25)
    assert len(valid) == 5 and is_multi_label(valid)
    assert strata(valid).value_counts().to_dict() == {"a": 2, "b": 2, "": 1}


def test_fsd50k_layout_splits_dev_by_its_split_column(tmp_path, fsdd_clips):
    truth = tmp_path / "FSD50K.ground_truth"
    truth.mkdir()
    for folder, clips in (
        ("FSD50K.dev_audio", fsdd_clips[:3]),
        ("FSD50K.eval_audio", [fsdd_clips[3]]),
    ):
        (tmp_path / folder).mkdir()
        for number, clip in enumerate(clips, start=10 if folder.startswith("FSD50K.e") else 1):
            (tmp_path / folder / f"{number}.wav").symlink_to(clip)
    pd.DataFrame(
        {
            "fname": [1, 2, 3],
            "labels": ["Speech,Male_speech_and_man_speaking", "Speech", "Bark"],
            "mids": ["/m/09x0r,/m/05zppz", "/m/09x0r", "/m/05tny_"],
            "split": ["train", "train", "val"],
        }
    ).to_csv(truth / "dev.csv", index=False)
    pd.DataFrame({"fname": [10], "labels": ["Bark,Speech"], "mids": ["x,y"]}).to_csv(
        truth / "eval.csv", index=False
    )
    assert detect_layout(tmp_path) == "fsd50k"
    train, valid, test = (load_dataset(tmp_path, split=s) for s in ("train", "valid", "test"))
    assert clip_labels(train) == [("Speech", "Male_speech_and_man_speaking"), ("Speech",)]
    assert valid["path"].tolist() == [str(fsdd_clips[2].resolve())]
    assert clip_labels(valid) == [("Bark",)]
    assert clip_labels(test) == [("Bark", "Speech")]
    assert all(Path(p).is_file() for t in (train, valid, test) for p in t["path"])


def test_csv_layout_with_a_label_separator(tmp_path, fsdd_clips, run_cli):
    pd.DataFrame(
        {"file": [str(p) for p in fsdd_clips[:3]], "tags": ["dog|rain", "", "rain"]}
    ).to_csv(tmp_path / "tags.csv", index=False)
    table = load_dataset(
        tmp_path,
        "csv",
        csv="tags.csv",
        path_column="file",
        label_column="tags",
        label_separator="|",
    )
    assert clip_labels(table) == [("dog", "rain"), (), ("rain",)]
    assert table.attrs["background_clips"] == 1
    single = load_dataset(tmp_path, "csv", csv="tags.csv", path_column="file", label_column="tags")
    assert not is_multi_label(single) and single["label"].tolist()[0] == "dog|rain"
    code, _, err = run_cli(
        "show-batch", tmp_path, "--label-separator", "|", "--out", tmp_path / "b.png"
    )
    assert code == 2 and "--label-separator is for --layout csv" in err


# -- model file ---------------------------------------------------------------------


def _record(**fields) -> dict:
    from soundsight.config import ModelConfig, config_to_dict

    record = {
        "format": 1,
        "labels": ["a", "b"],
        "features": config_to_dict(FeatureConfig()),
        "model": config_to_dict(ModelConfig(crop_seconds=1.0)),
    }
    return record | fields


def test_model_spec_multi_label_fields_are_checked_and_old_files_are_single_label():
    old = ModelSpec.from_dict(_record())
    assert not old.multi_label and old.thresholds == ()
    multi = ModelSpec.from_dict(_record(multi_label=True, thresholds=[0.3, 0.7]))
    assert multi.multi_label and multi.thresholds == (0.3, 0.7)
    assert ModelSpec.from_json(multi.to_json()) == multi
    for bad, words in (
        ({"multi_label": True, "thresholds": [0.3]}, "needs one per label"),
        ({"multi_label": False, "thresholds": [0.3, 0.4]}, "single-label model has none"),
        ({"multi_label": True, "thresholds": [0.3, 1.5]}, "numbers in \\(0, 1\\]"),
        ({"multi_label": "yes"}, "true or false"),
        ({"multi_label": True, "thresholds": [0.3, 0.4], "temperature": 2.0}, "no temperature"),
    ):
        with pytest.raises(ModelFileError, match=words):
            ModelSpec.from_dict(_record(**bad))


# -- a tiny multi-label model on real mixtures --------------------------------------


def _digits(fsdd_dir: Path, test_side: bool, per_digit: int) -> dict[str, list[Path]]:
    picked: dict[str, list[Path]] = {}
    for digit in range(10):
        paths = sorted((fsdd_dir / "recordings").glob(f"{digit}_*.wav"))
        side = [p for p in paths if (int(p.stem.split("_")[2]) < 5) == test_side]
        picked[str(digit)] = side[:: max(1, len(side) // per_digit)][:per_digit]
    return picked


def _write_side(
    root: Path, side: str, digits: dict[str, list[Path]], background: list[Path], mixtures: int
) -> None:
    """``root/<side>/`` WAVs: ``mixtures`` sums of two clips of different digits, one
    single digit per digit, and each ``background`` clip (ESC-50, no label) cut to 1 s;
    their ``fname,labels`` rows (FSDKaggle2019's format)."""
    from soundsight import load_clip

    rng = np.random.default_rng(len(side))
    folder = root / side
    folder.mkdir(parents=True)
    rows = []
    pairs = list(itertools.combinations(sorted(digits), 2))
    for number in range(mixtures):
        first, second = pairs[rng.integers(len(pairs))]
        waves = [
            load_clip(digits[d][rng.integers(len(digits[d]))], SAMPLE_RATE) for d in (first, second)
        ]
        length = max(len(w) for w in waves)
        mix = sum(np.pad(w / np.abs(w).max(), (0, length - len(w))) for w in waves)
        sf.write(folder / f"mix{number}.wav", 0.5 * mix / np.abs(mix).max(), SAMPLE_RATE)
        rows.append((f"mix{number}.wav", f"{first},{second}"))
    for digit, paths in digits.items():
        sf.write(folder / f"single{digit}.wav", load_clip(paths[0], SAMPLE_RATE), SAMPLE_RATE)
        rows.append((f"single{digit}.wav", digit))
    for number, path in enumerate(background):
        wave = load_clip(path, SAMPLE_RATE)[:SAMPLE_RATE]
        sf.write(folder / f"ambience{number}.wav", wave, SAMPLE_RATE)
        rows.append((f"ambience{number}.wav", ""))
    csv = "train_curated.csv" if side == "train_curated" else "test_post_competition.csv"
    pd.DataFrame(rows, columns=["fname", "labels"]).to_csv(root / csv, index=False)


@pytest.fixture(scope="module")
def mixtures(tmp_path_factory, fsdd_dir: Path, esc_clips: list[Path]) -> Path:
    """An FSDKaggle2019-layout folder of real mixtures (see :func:`_write_side`): 48
    training clips (30 mixtures), 24 validation clips (16 mixtures) on FSDD's test side."""
    root = tmp_path_factory.mktemp("mixtures")
    _write_side(root, "train_curated", _digits(fsdd_dir, False, 6), esc_clips[:8], 30)
    _write_side(root, "test", _digits(fsdd_dir, True, 3), esc_clips[8:], 16)
    return root


@pytest.fixture(scope="module")
def multi_model(tmp_path_factory, mixtures: Path) -> Path:
    """A multi-label model trained on :func:`mixtures` for one epoch (its run folder
    holds the scores); read-only."""
    from soundsight.training import TrainConfig, train

    out = tmp_path_factory.mktemp("multi_model") / "run"
    result = train(
        load_dataset(mixtures),
        out,
        valid=load_dataset(mixtures, split="test"),
        config=TrainConfig(stage1_epochs=0, stage2_epochs=1, batch_size=16),
        cache=out.parent / "cache",
        progress=False,
    )
    assert result.model_path.is_file()
    return result.model_path


@pytest.mark.slow
def test_multi_label_training_stores_thresholds_and_skips_calibration(multi_model, mixtures):
    from soundsight.modelfile import read_spec
    from soundsight.prediction import Classifier

    spec = read_spec(multi_model)
    assert spec.multi_label and spec.labels == tuple(str(d) for d in range(10))
    assert len(spec.thresholds) == 10 and all(0 < t <= 1 for t in spec.thresholds)
    assert spec.temperature == 1.0 and spec.rejection == {}
    assert "multi-label model" in spec.calibration["note"]
    assert spec.train["multi_label"] is True  # detected from the layout
    assert set(spec.metrics) == {"clips", "background_clips", "lwlrap", "mean_ap", "macro_f1"}
    assert spec.metrics["clips"] == 16 + 10 + 2 and spec.metrics["background_clips"] == 2
    run = multi_model.parent
    assert not (run / "confusion.csv").exists() and not (run / "reliability.csv").exists()
    predictions = pd.read_csv(run / "valid_predictions.csv", dtype={"labels": str})
    assert list(predictions.columns[:2]) == ["path", "labels"]
    assert predictions["labels"].str.contains(";").sum() == 16
    # The scores written are the metrics of the stored probabilities and thresholds.
    truth = np.array(
        [[str(d) in str(c).split(";") for d in range(10)] for c in predictions["labels"]]
    )
    scores = predictions[[str(d) for d in range(10)]].to_numpy()
    assert json.loads((run / "metrics.json").read_text())["lwlrap"] == pytest.approx(
        lwlrap(truth, scores), abs=1e-6
    )
    per_class = pd.read_csv(run / "per_class.csv")
    np.testing.assert_allclose(per_class["threshold"], spec.thresholds, atol=1e-6)
    # Reloaded: sigmoids (not a softmax: rows need not sum to 1) and the thresholds.
    classifier = Classifier.load(multi_model)
    assert classifier.net.multi_label
    clip = mixtures / "test" / "mix0.wav"
    answer = classifier.predict(clip)
    assert all(p >= spec.thresholds[classifier.labels.index(label)] for label, p in answer)
    probabilities = classifier.probabilities([classifier.log_mel(clip)])[0]
    assert probabilities.min() > 0 and probabilities.max() < 1
    assert not np.isclose(probabilities.sum(), 1.0)


@pytest.mark.slow
def test_train_cli_detects_the_multi_label_layout(mixtures, tmp_path, run_cli):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        "train", mixtures, "--out", out, "--epochs", "1", "--cache", tmp_path / "c",
        "--mix-probability", "0.2",
    )  # fmt: skip
    assert code == 0, err
    assert "background clips (no label): 8 training, 2 validation" in stdout
    assert "validation: 28 clips (2 without a label), lwlrap" in stdout
    from soundsight.modelfile import read_spec

    spec = read_spec(out / "model.safetensors")
    assert spec.multi_label and spec.train["mix_probability"] == 0.2
    assert (out / "pr_curves.png").is_file() and not (out / "confusion.png").exists()


def test_mix_probability_needs_multi_label_clips(fsdd_subset, tmp_path, run_cli):
    code, _, err = run_cli("train", fsdd_subset, "--out", tmp_path, "--mix-probability", "0.3")
    assert code == 2 and "--mix-probability is for multi-label training" in err


@pytest.mark.slow
def test_predict_writes_every_label_above_its_threshold(multi_model, mixtures, tmp_path, run_cli):
    from soundsight.modelfile import read_spec

    spec = read_spec(multi_model)
    out = tmp_path / "preds.csv"
    code, _, err = run_cli("predict", multi_model, mixtures / "test", "--out", out)
    assert code == 0, err
    table = pd.read_csv(out, dtype={"labels": str}, keep_default_na=False)
    assert list(table.columns) == ["fname", "labels", "path", *spec.labels]
    assert len(table) == 28
    for _, row in table.iterrows():
        named = set(filter(None, row["labels"].split(";")))
        cuts = zip(spec.labels, spec.thresholds, strict=True)
        assert named == {label for label, cut in cuts if row[label] >= cut}
    # One low threshold for every label: several labels per clip, most probable first.
    code, _, err = run_cli(
        "predict", multi_model, mixtures / "test", "--threshold", "0.05", "--out", out
    )
    assert code == 0, err
    table = pd.read_csv(out, dtype={"labels": str}, keep_default_na=False)
    several = table[table["labels"].str.contains(";")]
    assert len(several) >= 10
    for _, row in several.iterrows():
        named = row["labels"].split(";")
        probabilities = [row[label] for label in named]
        assert probabilities == sorted(probabilities, reverse=True)
        assert min(probabilities) >= 0.05


@pytest.mark.slow
def test_evaluate_reports_lwlrap_and_map(multi_model, mixtures, tmp_path, run_cli):
    out = tmp_path / "scores"
    code, stdout, err = run_cli(
        "evaluate",
        multi_model,
        mixtures,
        "--split",
        "test",
        "--out",
        out,
        "--cache",
        tmp_path / "c",
    )
    assert code == 0, err
    assert "28 clips (2 without a label), lwlrap" in stdout and "mAP" in stdout
    assert "macro F1" in stdout and "most confused" not in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    trained = json.loads((multi_model.parent / "metrics.json").read_text())
    for key in ("lwlrap", "mean_ap", "macro_f1"):  # the same clips as validation
        assert metrics[key] == pytest.approx(trained[key], abs=1e-4)
    assert not (out / "confusion.csv").exists()


@pytest.mark.slow
def test_report_of_a_multi_label_run_has_no_confusion_matrix(multi_model, tmp_path):
    import shutil

    from soundsight.report import write_report
    from soundsight.report.plotting import MULTI_LABEL_PLOTS, SINGLE_LABEL_PLOTS

    run = tmp_path / "run"
    shutil.copytree(multi_model.parent, run)
    page = write_report(run, multi_model.parent.parent / "cache").read_text()
    pictures = {p.stem for p in run.glob("*.png")}
    assert MULTI_LABEL_PLOTS | {"per_class", "top_losses", "history"} <= pictures
    assert not SINGLE_LABEL_PLOTS & pictures
    assert "lwlrap" in page and "mAP" in page and "multi-label model" in page
    losses = pd.read_csv(run / "top_losses.csv", dtype={"label": str, "predicted": str})
    assert len(losses) == 12
    assert list(losses["loss"]) == sorted(losses["loss"], reverse=True)
    assert losses["label"].fillna("").str.contains(";").any()


@pytest.mark.slow
def test_detect_uses_the_tuned_thresholds(multi_model, mixtures):
    from soundsight.detection import DetectConfig, detect, thresholds
    from soundsight.prediction import Classifier

    classifier = Classifier.load(multi_model)
    np.testing.assert_allclose(thresholds(classifier, DetectConfig()), classifier.spec.thresholds)
    found = detect(
        classifier, [mixtures / "test" / "mix0.wav"], progress=False, keep_timelines=True
    )
    line = next(iter(found.timelines.values()))
    assert line.probabilities.shape[1] == 10
    assert set(found.events["event_label"]) <= set(classifier.labels)


@pytest.mark.slow
def test_a_single_label_model_refuses_multi_label_input(tiny_model, mixtures, run_cli, tmp_path):
    code, _, err = run_cli("evaluate", tiny_model, mixtures, "--split", "test", "--cache", tmp_path)
    assert code == 2 and "the model is single-label" in err
    code, _, err = run_cli("predict", tiny_model, mixtures / "test", "--threshold", "0.3")
    assert code == 2 and "--threshold is for multi-label models" in err


@pytest.mark.slow
def test_exported_multi_label_model_keeps_its_sigmoids_and_thresholds(
    multi_model, mixtures, tmp_path, run_cli
):
    from soundsight.export import export_onnx
    from soundsight.prediction import Classifier
    from soundsight.runtime import OnnxClassifier

    onnx = OnnxClassifier.load(export_onnx(multi_model, tmp_path / "model.onnx"))
    torch_model = Classifier.load(multi_model)
    assert onnx.spec.multi_label and onnx.spec.thresholds == torch_model.spec.thresholds
    clips = sorted((mixtures / "test").glob("*.wav"))[:6]
    expected, _ = torch_model.predict_files(clips, workers=0, progress=False)
    found, _ = onnx.predict_files(clips, progress=False)
    labels = torch_model.labels
    np.testing.assert_allclose(found[labels], expected[labels], atol=1e-4)
    for clip in clips:  # the same labels above their thresholds (none is a hair from one)
        answer, reference = onnx.predict(clip), torch_model.predict(clip)
        assert [label for label, _ in answer] == [label for label, _ in reference]
        assert [p for _, p in answer] == pytest.approx([p for _, p in reference], abs=1e-4)
    out = tmp_path / "onnx.csv"
    code, _, err = run_cli("predict", tmp_path / "model.onnx", *clips, "--out", out)
    assert code == 0, err
    assert list(pd.read_csv(out).columns[:3]) == ["fname", "labels", "path"]


@pytest.mark.slow
def test_cross_validation_of_a_multi_label_set(mixtures, tmp_path, run_cli):
    code, stdout, err = run_cli(
        "cv", mixtures, "--folds", "2", "--out", tmp_path / "cv", "--epochs", "1",
        "--cache", tmp_path / "c",
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert [fold["clips"] for fold in summary["folds"]] == [24, 24]
    assert set(summary["mean"]) == {"clips", "background_clips", "lwlrap", "mean_ap", "macro_f1"}
    assert "lwlrap:" in stdout and "accuracy" not in stdout

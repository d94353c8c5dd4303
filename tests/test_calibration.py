"""Calibrated probabilities and the 'unknown' answer: fitted by training, stored in the
model file, applied the same way by every path that scores a clip."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from soundsight import load_dataset
from soundsight.calibration import (
    DEFAULT_REJECTION_SCORE,
    MIN_CALIBRATION_CLIPS,
    Rejection,
    calibrate,
    check_keep,
    ece_noise_floor,
    expected_calibration_error,
    reliability,
    threshold_for_keep,
)
from soundsight.errors import ConfigError
from soundsight.modelfile import METADATA_KEY, ModelFileError, read_spec, save_model_file
from soundsight.models import SoundNet, tempered_probabilities, window_logits
from soundsight.prediction import Classifier, evaluate
from soundsight.serving import ServeConfig, create_app
from soundsight.tables import read_csv


def _record(model_file) -> dict:
    with safe_open(model_file, framework="pt") as handle:
        return json.loads(handle.metadata()[METADATA_KEY])


def _window_logits(classifier: Classifier, clips) -> tuple[torch.Tensor, list[int]]:
    """Raw logits of each clip's evaluation windows, and the windows per clip."""
    windows = [classifier.view.windows(classifier.log_mel(c)) for c in clips]
    with torch.inference_mode():
        logits = window_logits(classifier.net, torch.from_numpy(np.concatenate(windows))[:, None])
    return logits[0], [len(w) for w in windows]


def test_ece_and_reliability_on_known_cases():
    targets = np.array([0, 1, 0, 1])
    right = np.eye(2)[targets]
    assert expected_calibration_error(right, targets) == 0.0
    # Four clips at 0.75 confidence, three right: calibrated; all wrong: gap 0.75.
    sure = np.array([[0.75, 0.25]] * 4)
    assert expected_calibration_error(sure, np.array([0, 0, 0, 1])) == pytest.approx(0.0)
    assert expected_calibration_error(sure, np.array([1, 1, 1, 1])) == pytest.approx(0.75)
    table = reliability(sure, np.array([0, 0, 0, 1]))
    assert len(table) == 15 and table["clips"].sum() == 4
    assert table.loc[table["clips"] > 0, "accuracy"].item() == pytest.approx(0.75)


def test_ece_noise_floor_is_what_a_calibrated_model_measures_on_that_many_clips():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.3, 0.95, 2000)
    probabilities = np.stack([confidence, 1 - confidence], axis=1)
    floors = {n: ece_noise_floor(probabilities[:n]) for n in (80, 400, 2000)}
    # Sampling noise shrinks with the clips, about as 1/sqrt(n); on 80 clips it alone
    # is far above a 0.03 goal.
    assert floors[80] > floors[400] > floors[2000] and floors[80] > 0.08
    assert floors[80] / floors[2000] == pytest.approx(5, rel=0.3)
    # Labels drawn from the model's own probabilities: the measured ECE is the floor,
    # not zero; the same labels made all wrong are far above it.
    measured = []
    for seed in range(200):
        right = np.random.default_rng(seed).random(80) < confidence[:80]
        measured.append(expected_calibration_error(probabilities[:80], np.where(right, 0, 1)))
    assert np.mean(measured) == pytest.approx(floors[80], rel=0.1)
    wrong = 1 - probabilities[:80].argmax(axis=1)
    assert expected_calibration_error(probabilities[:80], wrong) > 5 * floors[80]
    assert ece_noise_floor(probabilities[:0]) == 0.0


def test_threshold_keeps_the_stated_share_and_keep_is_checked():
    scores = np.linspace(0, 1, 101)
    threshold = threshold_for_keep(scores, 0.95)
    assert (scores >= threshold).mean() >= 0.95
    assert (scores >= threshold).sum() == 96  # not one more clip dropped than needed
    assert threshold_for_keep(scores, 1.0) == 0.0
    for bad in (0, 1.5, -0.1, float("nan")):
        with pytest.raises(ConfigError, match=r"\(0, 1\]"):
            check_keep(bad)


def test_training_stores_a_fitted_temperature_and_the_every_path_applies_it(
    tiny_model, fsdd_clips, fsdd_dir, tmp_path
):
    spec = read_spec(tiny_model)
    assert spec.temperature != 1.0
    assert spec.calibration["clips"] >= MIN_CALIBRATION_CLIPS
    assert {"ece_before", "ece_after"} <= set(spec.calibration)
    assert spec.calibration["nll_after"] <= spec.calibration["nll_before"] + 1e-6
    assert spec.rejection["score"] == DEFAULT_REJECTION_SCORE and spec.rejection["keep"] == 0.95

    classifier = Classifier.load(tiny_model)
    clip = fsdd_clips[4]
    logits, counts = _window_logits(classifier, [clip])
    expected = tempered_probabilities(logits, spec.temperature).mean(0).numpy()
    plain = logits.softmax(-1).mean(0).numpy()
    assert not np.allclose(expected, plain, atol=1e-3)  # the temperature matters here

    predicted = dict(classifier.predict(clip, top_k=10))
    np.testing.assert_allclose(
        [predicted[label] for label in classifier.labels], expected, atol=1e-5
    )
    frame, _ = classifier.predict_files([clip], progress=False)
    np.testing.assert_allclose(frame[classifier.labels].to_numpy()[0], expected, atol=1e-5)
    table = load_dataset(fsdd_dir, "fsdd", "test")
    table = table[[Path(p).name == clip.name for p in table["path"]]]
    assert len(table) == 1
    _, scored, _ = evaluate(classifier, table, cache=tmp_path / "cache", progress=False)
    np.testing.assert_allclose(scored[classifier.labels].to_numpy()[0], expected, atol=1e-5)
    app = create_app(classifier, ServeConfig(workers=1, queue_size=1))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        answer = client.post(
            "/predict", files={"file": (clip.name, clip.read_bytes())}, params={"top_k": 10}
        ).json()
    served = {p["label"]: p["probability"] for p in answer["predictions"]}
    np.testing.assert_allclose([served[label] for label in classifier.labels], expected, atol=1e-5)


def test_an_old_model_file_without_the_new_fields_loads_at_temperature_one(
    tiny_model, tmp_path, fsdd_clips
):
    # The landed main's format: the same record without temperature, calibration and
    # rejection, and no checksum beside it.
    record = _record(tiny_model)
    for name in ("temperature", "calibration", "rejection"):
        record.pop(name)
    old = tmp_path / "old.safetensors"
    save_file(load_file(tiny_model), old, metadata={METADATA_KEY: json.dumps(record)})
    spec = read_spec(old)
    assert (spec.temperature, spec.calibration, spec.rejection) == (1.0, {}, {})
    classifier = Classifier.load(old)
    assert classifier.rejection is None and classifier.known(np.eye(10)).all()
    clip = fsdd_clips[4]
    logits, _ = _window_logits(classifier, [clip])
    got = dict(classifier.predict(clip, top_k=10))
    plain = logits.softmax(-1).mean(0).numpy()
    np.testing.assert_allclose([got[label] for label in classifier.labels], plain, atol=1e-5)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("temperature", -1.0, "field 'temperature'"),
        ("temperature", "1", "field 'temperature'"),
        ("temperature", 1e9, "field 'temperature'"),
        ("calibration", [1], "field 'calibration'"),
        ("rejection", {"score": "vibes", "threshold": 0.5, "keep": 0.95, "clips": 30}, "score"),
        (
            "rejection",
            {"score": "max_probability", "threshold": 0.5, "keep": 2, "clips": 3},
            "keep",
        ),
        (
            "rejection",
            {"score": "centroid_cosine", "threshold": 0.5, "keep": 0.9, "clips": 3},
            "centroids",
        ),
    ],
)
def test_hand_edited_calibration_fields_are_refused_naming_the_field(
    tiny_model, tmp_path, field, value, message
):
    record = _record(tiny_model)
    record[field] = value
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(tiny_model), edited, metadata={METADATA_KEY: json.dumps(record)})
    with pytest.raises(ModelFileError, match=message) as caught:
        read_spec(edited)
    assert str(edited) in str(caught.value)


def test_a_small_validation_side_keeps_temperature_one_and_says_so(tiny_model, fsdd_clips):
    classifier = Classifier.load(tiny_model)
    clips = fsdd_clips[:10]
    logits, counts = _window_logits(classifier, clips)
    targets = [classifier.labels.index(c.name.split("_")[0]) for c in clips]
    result = calibrate(logits, counts, targets)
    assert result.temperature == 1.0 and result.rejection is None
    assert (
        "10 clips" in result.summary["note"] and "temperature kept at 1" in result.summary["note"]
    )


def _noise(write_audio, seconds: float = 1.0):
    rng = np.random.default_rng(0)
    return write_audio("noise.wav", 0.3 * rng.standard_normal(int(8000 * seconds)), 8000)


def _resaved(tiny_model, path, **changes):
    """The tiny model's weights saved again with ``changes`` to its record."""
    spec = read_spec(tiny_model)
    net = SoundNet(spec.model, len(spec.labels), spec.features.floor_db, pretrained=False)
    net.backbone.load_state_dict(load_file(tiny_model))
    save_model_file(path, net, replace(spec, **changes))
    return path


def _rejecting_everything(tiny_model, path):
    """The tiny model with a rule that keeps only clips at probability >= 1: every
    clip is unknown (for the plumbing, whatever the tiny model's quality)."""
    rule = Rejection("max_probability", 1.0, 0.95, 30).to_dict()
    return _resaved(tiny_model, path, rejection=rule)


def test_noise_is_unknown_and_predict_keeps_the_best_known_label(
    tiny_model, write_audio, run_cli, fsdd_clips, tmp_path
):
    noise = _noise(write_audio)
    classifier = Classifier.load(tiny_model)
    frame, _ = classifier.predict_files([noise, *fsdd_clips], progress=False)
    probabilities = frame[classifier.labels].to_numpy()
    # White noise is less like any digit than the real digits are (at the rule's
    # 95%-of-validation threshold the spoken digits are mostly kept).
    known = frame.attrs["known"]
    assert not known[0] and known[1:].mean() >= 0.6
    embeddings = classifier.embeddings(classifier.log_mel(c) for c in [noise, *fsdd_clips])
    np.testing.assert_array_equal(classifier.known(probabilities, embeddings), known)

    out = tmp_path / "predictions.csv"
    code, _, _ = run_cli(
        "predict", str(tiny_model), str(noise), *map(str, fsdd_clips[:3]), "--out", str(out)
    )
    assert code == 0
    rows = read_csv(out, text=("fname", "label", "path", "best_label")).set_index("fname")
    assert rows.loc["noise.wav", "label"] == "unknown"
    assert rows.loc["noise.wav", "best_label"] in classifier.labels
    assert rows.loc["noise.wav", "best_probability"] == pytest.approx(
        probabilities[0].max(), abs=1e-5
    )

    code, _, _ = run_cli(
        "predict",
        str(tiny_model),
        str(noise),
        "--out",
        str(out),
        "--unknown-label",
        "none of these",
    )
    assert read_csv(out, text=("label",))["label"].tolist() == ["none of these"]
    code, _, _ = run_cli("predict", str(tiny_model), str(noise), "--out", str(out), "--no-unknown")
    assert read_csv(out, text=("label",))["label"].iloc[0].split()[0] in classifier.labels
    code, _, err = run_cli("predict", str(tiny_model), str(noise), "--unknown-label", "3")
    assert code == 2 and "'3' is one of the model's labels" in err


def test_serve_answers_unknown_with_the_closest_known_label(tiny_model, tmp_path, write_audio):
    model = _rejecting_everything(tiny_model, tmp_path / "strict.safetensors")
    noise = _noise(write_audio)
    app = create_app(Classifier.load(model), ServeConfig(workers=1, queue_size=1))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        answer = client.post("/predict", files={"file": ("noise.wav", noise.read_bytes())}).json()
    assert answer["unknown"] is True and answer["label"] == "unknown"
    assert answer["predictions"][0]["label"] in Classifier.load(model).labels


def test_keep_outside_zero_to_one_is_a_clear_error(run_cli, fsdd_subset, tmp_path):
    for bad in ("0", "1.5", "lots"):
        code, _, err = run_cli("train", str(fsdd_subset), "--out", str(tmp_path), "--keep", bad)
        assert code == 2 and "--keep" in err and "(0, 1]" in err


def test_report_shows_ece_before_after_and_the_reliability_diagram(tiny_model, tmp_path):
    from soundsight.report import write_report

    run = tmp_path / "run"
    shutil.copytree(tiny_model.parent, run, ignore=shutil.ignore_patterns("checkpoints"))
    table = read_csv(run / "reliability.csv", text=("side",))
    assert set(table["side"]) == {"before", "after"} and len(table) == 30
    page = write_report(run).read_text()
    spec = read_spec(run / "model.safetensors")
    assert "ECE before" in page and "ECE after" in page
    assert f"{spec.calibration['ece_after']:.4f}" in page
    assert f"{spec.calibration['ece_floor']:.4f}" in page
    assert "reliability diagram before and after temperature scaling" in page
    assert (run / "reliability.png").is_file()


def test_report_says_when_nothing_was_fitted(tiny_model, tmp_path):
    from soundsight.report import write_report

    run = tmp_path / "run"
    shutil.copytree(tiny_model.parent, run, ignore=shutil.ignore_patterns("checkpoints"))
    note = (
        "validation side has 8 clips, fewer than 20: temperature kept at 1, no 'unknown' threshold"
    )
    _resaved(
        tiny_model,
        run / "model.safetensors",
        temperature=1.0,
        calibration={"clips": 8, "note": note},
        rejection={},
    )
    page = write_report(run, replot=True).read_text()
    assert "fewer than 20: temperature kept at 1" in page
    assert "off: every clip gets a known label" in page


def test_centroids_that_do_not_match_the_labels_are_refused(tiny_model, tmp_path):
    record = _record(tiny_model)
    record["rejection"]["centroids"] = record["rejection"]["centroids"][:3]
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(tiny_model), edited, metadata={METADATA_KEY: json.dumps(record)})
    with pytest.raises(ModelFileError, match="field 'rejection': 3 centroids for 10 labels"):
        Classifier.load(edited)

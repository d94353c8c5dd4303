"""One path from clip to prediction: the same real clip gives the same probabilities
through every entry point (predict from a path, from bytes, batch prediction,
evaluation through the feature cache, the HTTP server, and training's validation)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from soundsight import load_dataset
from soundsight.prediction import Classifier, evaluate
from soundsight.serving import ServeConfig, create_app
from soundsight.tables import read_csv


def test_every_entry_point_scores_a_clip_the_same(tiny_model, fsdd_dir, tmp_path):
    classifier = Classifier.load(tiny_model)
    labels = classifier.labels
    # Training's own validation scores, written at the end of the run.
    trained = read_csv(tiny_model.parent / "valid_predictions.csv", text=("path", "label"))
    trained = trained.iloc[:6].reset_index(drop=True)
    paths = trained["path"].tolist()

    from_path = classifier.probabilities(classifier.log_mel(p) for p in paths)
    from_bytes = classifier.probabilities(classifier.log_mel(Path(p).read_bytes()) for p in paths)
    batch, failures = classifier.predict_files(paths, workers=0, progress=False)
    assert failures == [] and batch["path"].tolist() == paths
    clips = load_dataset(fsdd_dir, "fsdd", "test")
    clips = clips.set_index("path").loc[paths].reset_index()
    _, evaluated, _ = evaluate(classifier, clips, cache=tmp_path / "cache", progress=False)
    client = TestClient(create_app(classifier, ServeConfig(workers=1)), base_url="http://127.0.0.1")
    served = []
    for path in paths:
        answer = client.post(
            "/predict",
            params={"top_k": len(labels)},
            files={"file": (Path(path).name, Path(path).read_bytes(), "audio/wav")},
        )
        assert answer.status_code == 200, answer.text
        by_label = {p["label"]: p["probability"] for p in answer.json()["predictions"]}
        served.append([by_label[label] for label in labels])

    # Same featuriser, same network, same windows: equal up to the last bits that
    # batch sizes change in a convolution.
    for other in (from_bytes, batch[labels], evaluated[labels], np.array(served)):
        np.testing.assert_allclose(np.asarray(other, np.float32), from_path, atol=1e-6)
    # Training validated with batch norms unfolded (Classifier.load folds them).
    np.testing.assert_allclose(trained[labels].to_numpy(np.float32), from_path, atol=1e-4)


def test_a_clips_scores_do_not_depend_on_batching_or_its_neighbours(tiny_model, esc_clips):
    from soundsight.prediction import score_log_mels

    classifier = Classifier.load(tiny_model)
    # A 5-s ESC clip (2 windows of the tiny model's crop), a short FSDD-like stretch,
    # and a 30-s clip made of six ESC clips (many windows: several forward passes).
    dbs = [classifier.log_mel(esc_clips[0]), classifier.log_mel(esc_clips[1])[:, :20]]
    dbs.append(np.concatenate([classifier.log_mel(c) for c in esc_clips[2:8]], axis=1))
    alone = [
        list(score_log_mels(classifier.net, classifier.view, [db], embed=True))[0] for db in dbs
    ]
    for batch in (1, 3, 64):
        together = list(
            score_log_mels(
                classifier.net, classifier.view, dbs, embed=True, windows_per_batch=batch
            )
        )
        assert len(together) == len(dbs)
        for (p, e), (p0, e0) in zip(together, alone, strict=True):
            np.testing.assert_allclose(p, p0, atol=1e-6)
            np.testing.assert_allclose(e, e0, atol=1e-4)


def test_a_long_recording_read_in_blocks_scores_as_when_decoded_whole(
    tiny_model, esc_clips, tmp_path, monkeypatch
):
    import soundfile as sf

    from soundsight import prediction

    # Over 2 minutes of real ESC-50 clips, one after the other, at their 44.1 kHz.
    long = tmp_path / "long.flac"
    written = 0
    with sf.SoundFile(long, "w", 44100, 1) as out:
        for clip in esc_clips * 4:
            samples = sf.read(clip, dtype="float32")[0]
            out.write(samples)
            written += len(samples)
            if written > 130 * 44100:
                break
    classifier = Classifier.load(tiny_model)
    whole = classifier.probabilities([classifier.log_mel(long)])[0]
    assert sf.info(long).duration > prediction.STREAM_SECONDS  # so this one streams
    streamed = classifier.predict(long, top_k=len(classifier.labels))
    batch, _ = classifier.predict_files([long, esc_clips[0]], workers=0, progress=False)
    by_label = dict(streamed)
    np.testing.assert_allclose([by_label[label] for label in classifier.labels], whole, atol=1e-5)
    np.testing.assert_allclose(batch.loc[0, classifier.labels].to_numpy(float), whole, atol=1e-5)
    single = classifier.probabilities([classifier.log_mel(esc_clips[0])])[0]
    np.testing.assert_allclose(batch.loc[1, classifier.labels].to_numpy(float), single, atol=1e-6)

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
    client = TestClient(create_app(classifier, ServeConfig(workers=1)))
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

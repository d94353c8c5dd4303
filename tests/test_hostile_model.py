"""Model files are untrusted input: every header field is checked, each problem named
with the file and the field, and old model files keep loading."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from soundsight.modelfile import DIGEST_KEY, METADATA_KEY, ModelFileError, read_spec
from soundsight.prediction import Classifier


def _record(model_file) -> dict:
    with safe_open(model_file, framework="pt") as handle:
        return json.loads(handle.metadata()[METADATA_KEY])


def _write(path, tensors, header_text: str, digest: str | None = None):
    header = {METADATA_KEY: header_text}
    if digest is not None:
        header[DIGEST_KEY] = digest
    save_file(tensors, path, metadata=header)
    return path


def _edited(tiny_model, tmp_path, edit) -> str:
    record = _record(tiny_model)
    edit(record)
    return json.dumps(record)


def test_a_model_file_written_by_the_previous_release_loads_and_predicts_alike(
    tiny_model, tmp_path, fsdd_clips
):
    # The format of the landed main before this change: the same JSON record, no
    # checksum beside it.
    old = _write(
        tmp_path / "old.safetensors", load_file(tiny_model), json.dumps(_record(tiny_model))
    )
    clip = fsdd_clips[10]
    expected = Classifier.load(tiny_model).predict(clip, top_k=3)
    got = Classifier.load(old).predict(clip, top_k=3)
    assert [label for label, _ in got] == [label for label, _ in expected]
    np.testing.assert_allclose([p for _, p in got], [p for _, p in expected], atol=1e-6)


EDITS = {
    "crop_seconds 1e6": (lambda r: r["model"].update(crop_seconds=1e6), "model.*crop_seconds"),
    "crop_seconds -1": (lambda r: r["model"].update(crop_seconds=-1.0), "model.*crop_seconds"),
    "sample_rate 1e9": (lambda r: r["features"].update(sample_rate=1e9), "features.sample_rate"),
    "sample_rate huge int": (
        lambda r: r["features"].update(sample_rate=10**9),
        "features.*sample_rate must be",
    ),
    "input_scale 50": (lambda r: r["model"].update(input_scale=50.0), "model.*input_scale"),
    "n_mels as text": (lambda r: r["features"].update(n_mels="128"), "features.n_mels"),
    "unknown encoding": (lambda r: r["model"].update(encoding="jet"), "model.*encoding"),
    "unknown field": (lambda r: r["features"].update(colour="red"), "unknown keys"),
    "labels missing": (lambda r: r.pop("labels"), "no 'labels' field"),
    "a label that is not a string": (lambda r: r["labels"].__setitem__(0, 7), "labels"),
    "a label twice": (lambda r: r["labels"].__setitem__(1, r["labels"][0]), "twice"),
    "metrics not numbers": (lambda r: r.update(metrics={"accuracy": "high"}), "metrics"),
}


@pytest.mark.parametrize("case", sorted(EDITS))
def test_a_hand_edited_header_is_refused_naming_the_file_and_field(tiny_model, tmp_path, case):
    edit, message = EDITS[case]
    target = _write(
        tmp_path / "edited.safetensors", load_file(tiny_model), _edited(tiny_model, tmp_path, edit)
    )
    with pytest.raises(ModelFileError, match=rf"edited\.safetensors: .*{message}"):
        Classifier.load(target)


@pytest.mark.parametrize(
    "header, message",
    [("[1, 2, 3]", "must be a JSON object, not list"), ("{not json", "not valid JSON")],
)
def test_a_header_that_is_not_a_json_object_is_refused(tiny_model, tmp_path, header, message):
    target = _write(tmp_path / "odd.safetensors", load_file(tiny_model), header)
    with pytest.raises(ModelFileError, match=rf"odd\.safetensors: .*{message}"):
        read_spec(target)


def test_a_label_count_other_than_the_head_size_names_the_tensor_and_both_shapes(
    tiny_model, tmp_path
):
    text = _edited(tiny_model, tmp_path, lambda r: r["labels"].append("extra"))
    target = _write(tmp_path / "more.safetensors", load_file(tiny_model), text)
    with pytest.raises(ModelFileError, match=r"more\.safetensors: tensor '.*' has shape \(10, "):
        Classifier.load(target)


def test_an_edit_that_keeps_every_field_valid_is_caught_by_the_checksum(tiny_model, tmp_path):
    # n_mels 64 under weights trained on 128 bands is a valid-looking header: only the
    # checksum written with the model can tell.
    with safe_open(tiny_model, framework="pt") as handle:
        digest = handle.metadata()[DIGEST_KEY]
    text = _edited(tiny_model, tmp_path, lambda r: r["features"].update(n_mels=64))
    target = _write(tmp_path / "n_mels.safetensors", load_file(tiny_model), text, digest)
    with pytest.raises(ModelFileError, match=r"n_mels\.safetensors: .*checksum mismatch"):
        Classifier.load(target)

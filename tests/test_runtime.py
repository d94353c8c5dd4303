"""The torch-free runtime: an exported file answers as the torch Classifier does, in
Python, on the command line (with torch unimportable) and in the server."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import soundfile as sf
from conftest import run_without_heavy_modules
from fastapi.testclient import TestClient
from PIL import Image

from soundsight.modelfile import ModelFileError
from soundsight.prediction import Classifier
from soundsight.runtime import MAX_SECONDS, OnnxClassifier, load_classifier, palette_png
from soundsight.serving import ServeConfig, create_app, load_for_serving


@pytest.fixture(scope="module")
def onnx_classifier(tiny_onnx: Path) -> OnnxClassifier:
    return OnnxClassifier.load(tiny_onnx, threads=1)


@pytest.fixture(scope="module")
def torch_classifier(tiny_model: Path) -> Classifier:
    return Classifier.load(tiny_model)


def test_predict_matches_torch_for_paths_bytes_and_waveforms(
    onnx_classifier, torch_classifier, fsdd_clips, esc_clips
):
    for clip in [*fsdd_clips[:4], *esc_clips[:3]]:
        expected = torch_classifier.predict(clip, top_k=10)
        for given in (clip, clip.read_bytes(), torch_classifier.featurise.waveform(clip)):
            got = onnx_classifier.predict(given, top_k=10)
            assert [label for label, _ in got] == [label for label, _ in expected]
            assert np.allclose([p for _, p in got], [p for _, p in expected], atol=1e-4)


def test_predict_files_matches_torch_and_reports_bad_files(
    onnx_classifier, torch_classifier, fsdd_clips, make_bad_clips, tmp_path
):
    bad = make_bad_clips(tmp_path)
    paths = [str(fsdd_clips[0]), *map(str, bad.values()), str(fsdd_clips[1])]
    frame, failures = onnx_classifier.predict_files(paths, progress=False)
    expected, expected_failures = torch_classifier.predict_files(paths, workers=0, progress=False)
    assert list(frame["path"]) == list(expected["path"])
    difference = frame[onnx_classifier.labels].to_numpy() - expected.iloc[:, 1:].to_numpy()
    assert np.abs(difference).max() <= 1e-4
    assert failures == expected_failures


def test_recording_past_the_limit_is_refused_from_its_header(onnx_classifier, tmp_path, fsdd_clips):
    # 8 kHz keeps the file small; the limit is in seconds.
    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(int((MAX_SECONDS + 5) * 8000), np.float32), 8000)
    frame, failures = onnx_classifier.predict_files([long, fsdd_clips[0]], progress=False)
    assert list(frame["path"]) == [str(fsdd_clips[0])]
    assert failures[0][0] == str(long) and "--runtime torch" in failures[0][1]


def test_spectrogram_png_is_the_torch_runtimes_picture(
    onnx_classifier, torch_classifier, esc_clips
):
    wave = torch_classifier.featurise.waveform(esc_clips[0])
    _, db, _ = onnx_classifier.analyse(wave)
    ours = Image.open(io.BytesIO(onnx_classifier.spectrogram_png(db))).convert("RGB")
    theirs = Image.open(io.BytesIO(torch_classifier.spectrogram_png(db))).convert("RGB")
    assert ours.size == theirs.size == (db.shape[1], db.shape[0])
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_palette_png_is_read_back_by_pillow():
    index = np.arange(256, dtype=np.uint8).reshape(8, 32)
    palette = np.stack([np.arange(256), 255 - np.arange(256), np.zeros(256)], 1).astype(np.uint8)
    image = Image.open(io.BytesIO(palette_png(index, palette)))
    assert image.mode == "P" and image.size == (32, 8)
    assert np.array_equal(np.asarray(image.convert("RGB")), palette[index])


def test_files_that_are_not_ours_are_refused_clearly(tiny_onnx, tmp_path):
    proto = onnx.load(tiny_onnx)
    del proto.metadata_props[:]
    onnx.save(proto, tmp_path / "foreign.onnx")
    with pytest.raises(ModelFileError, match="not one soundsight exported"):
        OnnxClassifier.load(tmp_path / "foreign.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelFileError, match="junk.onnx: not an ONNX model"):
        OnnxClassifier.load(tmp_path / "junk.onnx")
    with pytest.raises(ModelFileError, match="not found"):
        OnnxClassifier.load(tmp_path / "missing.onnx")


@pytest.mark.parametrize("name", ["samples", "waveform_22050"])
def test_a_graph_taking_other_inputs_is_refused(tiny_onnx, tmp_path, name):
    # An input soundsight does not feed; or another rate, which only a frozen export's
    # graph takes (this is a fine-tuned network's).
    proto = onnx.load(tiny_onnx)
    proto.graph.input.append(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["n"])
    )
    onnx.save(proto, tmp_path / "odd.onnx")
    with pytest.raises(ModelFileError, match=f"graph takes.*{name}.*not waveform"):
        OnnxClassifier.load(tmp_path / "odd.onnx")


def test_an_opset_the_runtime_lacks_names_the_ones_it_runs(tiny_onnx, tmp_path):
    proto = onnx.load(tiny_onnx)
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 99
    onnx.save(proto, tmp_path / "future.onnx")
    with pytest.raises(ModelFileError, match=r"needs ONNX opset 99.*opsets 17 to \d+"):
        OnnxClassifier.load(tmp_path / "future.onnx")


def test_runtime_choice(tiny_onnx, tiny_model):
    assert isinstance(load_classifier(tiny_onnx), OnnxClassifier)
    with pytest.raises(Exception, match="runs exported .onnx files"):
        load_classifier(tiny_model, "onnx")
    with pytest.raises(Exception, match="runs with --runtime onnx"):
        load_classifier(tiny_onnx, "torch")


def test_cli_predict_of_an_onnx_file_never_imports_torch(
    tiny_onnx, tiny_model, fsdd_subset, tmp_path, run_cli
):
    out = tmp_path / "onnx.csv"
    run_without_heavy_modules(
        f"""
        from soundsight.cli import main
        status = main(["predict", {str(tiny_onnx)!r}, {str(fsdd_subset)!r}, "--out", {str(out)!r}])
        assert status == 0, status
        """
    )
    torch_csv = tmp_path / "torch.csv"
    status, _, err = run_cli("predict", str(tiny_model), str(fsdd_subset), "--out", str(torch_csv))
    assert status == 0, err
    assert_same_predictions(out, torch_csv)


def test_serving_an_onnx_file_never_imports_torch(tiny_onnx, fsdd_clips):
    run_without_heavy_modules(
        f"""
        from fastapi.testclient import TestClient
        from soundsight.serving import ServeConfig, create_app, load_for_serving
        settings = ServeConfig(workers=1)
        app = create_app(load_for_serving({str(tiny_onnx)!r}, settings), settings)
        with TestClient(app, base_url="http://127.0.0.1") as client:
            with open({str(fsdd_clips[0])!r}, "rb") as clip:
                answer = client.post("/predict", files={{"file": ("a.wav", clip.read())}},
                                     params={{"spectrogram": "true"}})
        assert answer.status_code == 200, answer.text
        assert answer.json()["spectrogram_png"]
        """
    )


def test_server_answers_as_the_torch_server(tiny_onnx, torch_classifier, esc_clips):
    settings = ServeConfig(workers=1, torch_threads=1)
    app = create_app(load_for_serving(tiny_onnx, settings), settings)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        clip = esc_clips[0]
        answer = client.post("/predict", files={"file": (clip.name, clip.read_bytes())})
    assert answer.status_code == 200, answer.text
    expected = torch_classifier.predict(clip, top_k=5)
    got = [(p["label"], p["probability"]) for p in answer.json()["predictions"]]
    assert [label for label, _ in got] == [label for label, _ in expected]
    assert np.allclose([p for _, p in got], [p for _, p in expected], atol=1e-4)


#: The repository (installed from its folder, as a user would from a checkout).
ROOT = Path(__file__).resolve().parents[1]
#: The issue's bound on the runtime install (site-packages, pip's own tools left out).
MAX_INSTALL_MB = 300
#: What ``python -m venv`` puts in every venv: the installer, not the runtime.
VENV_TOOLS = ("pip", "setuptools", "pkg_resources", "_distutils_hack", "distutils-precedence")


def site_packages_mb(venv: Path) -> float:
    """MB of the packages installed in ``venv`` (its pip and setuptools left out)."""
    (folder,) = venv.glob("lib/python*/site-packages")
    return (
        sum(
            f.stat().st_size
            for entry in folder.iterdir()
            if not entry.name.startswith(VENV_TOOLS)
            for f in ([entry] if entry.is_file() else entry.rglob("*"))
            if f.is_file()
        )
        / 1e6
    )


def test_the_base_install_predicts_an_onnx_file_without_torch(
    tmp_path, tiny_onnx, tiny_model, fsdd_subset, run_cli
):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [python, "-m", "pip", "install", "-q", "-c", ROOT / "requirements/lock.txt", ROOT],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, timeout=60)
    assert no_torch.returncode != 0, "torch is importable in the runtime install"
    assert site_packages_mb(venv) <= MAX_INSTALL_MB

    out = tmp_path / "onnx.csv"
    predict = subprocess.run(
        [venv / "bin" / "soundsight", "predict", tiny_onnx, fsdd_subset, "--out", out],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert predict.returncode == 0, predict.stderr
    expected = tmp_path / "torch.csv"
    status, _, err = run_cli("predict", str(tiny_model), str(fsdd_subset), "--out", str(expected))
    assert status == 0, err
    assert_same_predictions(out, expected)


def assert_same_predictions(got, expected) -> None:
    """Two prediction CSVs: the same columns and labels (``unknown`` included), the
    best probability to fp32 precision (ONNX Runtime and torch round differently)."""
    a, b = (pd.read_csv(p, dtype={"label": str, "best_label": str}) for p in (got, expected))
    assert list(a.columns) == list(b.columns)
    probability = [c for c in a.columns if c.endswith("probability")]
    pd.testing.assert_frame_equal(a.drop(columns=probability), b.drop(columns=probability))
    np.testing.assert_allclose(a[probability], b[probability], atol=1e-4)

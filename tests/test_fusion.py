"""Late fusion (soundsight.frozen.fuse, ``soundsight fuse``) on real ESC-50 clips: a
fine-tuned Lite0 and a frozen aisfx head trained on the same five classes, fused into
one model file that predict, evaluate, detect and serve run."""

from __future__ import annotations

import base64
import io
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import run_without_heavy_modules
from PIL import Image

from soundsight import load_dataset
from soundsight.detection import detect
from soundsight.frozen import (
    FUSION_WEIGHTS,
    FrozenClassifier,
    FrozenError,
    fuse,
    fusion_table,
    head_logits,
    held_out_side,
    part_heads,
    train_frozen,
)
from soundsight.modelfile import (
    FrozenSpec,
    ModelFileError,
    model_kind,
    read_frozen_model_file,
    read_spec,
    save_frozen_model_file,
)
from soundsight.prediction import Classifier
from soundsight.training import TrainConfig, train


@pytest.fixture(scope="module")
def runs(esc_five, tmp_path_factory) -> dict[str, Path]:
    """A fine-tuned Lite0 (one short epoch) and a frozen aisfx head, both trained by
    default on the same clips, so with the same held-out 20%; and their fusion."""
    root = tmp_path_factory.mktemp("fusion")
    clips = load_dataset(esc_five)
    cache = root / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = train(
            clips,
            root / "network",
            config=TrainConfig(stage1_epochs=0, stage2_epochs=1, batch_size=16),
            cache=cache,
            progress=False,
        ).model_path
        frozen = train_frozen(clips, root / "frozen", "aisfx", cache=cache, progress=False)
    fused = fuse(
        network,
        frozen.model_path,
        root / "fused",
        valid=held_out_side(clips, network, frozen.model_path),
        cache=cache,
        progress=False,
    )
    return {
        "network": network,
        "frozen": frozen.model_path,
        "fused": fused.model_path,
        "cache": cache,
        "root": root,
    }


def test_weight_is_chosen_on_the_side_both_models_held_out(runs):
    root = runs["root"]
    side = {
        name: sorted(pd.read_csv(root / name / "valid_predictions.csv")["path"])
        for name in ("network", "frozen", "fused")
    }
    assert side["fused"] == side["network"] == side["frozen"] and side["fused"]
    table = pd.read_csv(root / "fused" / "fusion.csv")
    assert list(table["weight"]) == list(FUSION_WEIGHTS)
    assert (root / "fused" / "fusion.png").stat().st_size > 10_000
    _, spec = read_frozen_model_file(runs["fused"])
    best = table["accuracy"].max()
    assert table.set_index("weight").loc[spec.weight, "accuracy"] == best
    assert spec.metrics["accuracy"] == pytest.approx(best)
    fusion = spec.train["fusion"]
    assert fusion["network_accuracy"] == table["accuracy"].iloc[0]
    assert fusion["head_accuracy"] == table["accuracy"].iloc[-1]
    # aisfx's attribution carries over; the network's record and labels are kept whole.
    assert "CC-BY-4.0" in spec.licences and spec.notice
    assert spec.network == read_spec(runs["network"])
    assert model_kind(runs["fused"]) == "frozen"


def test_fused_probabilities_are_the_weighted_mean_of_the_parts(runs, esc_five):
    fused = FrozenClassifier.load(runs["fused"])
    head = FrozenClassifier.load(runs["frozen"])
    network = Classifier.load(runs["network"])
    weight = fused.spec.weight
    clips = sorted((esc_five / "audio").iterdir())[::8]  # one of each class
    frame, failures = fused.predict_files(clips, progress=False)
    head_frame, _ = head.predict_files(clips, progress=False)
    network_frame, _ = network.predict_files(clips, progress=False)
    labels = fused.labels
    expected = (
        weight * head_frame[labels].to_numpy() + (1 - weight) * network_frame[labels].to_numpy()
    )
    assert not failures and list(frame["path"]) == [str(c) for c in clips]
    np.testing.assert_allclose(frame[labels].to_numpy(), expected, atol=1e-5)
    top = fused.predict(clips[0], top_k=5)
    assert dict(top) == pytest.approx(dict(zip(labels, expected[0], strict=True)), abs=1e-4)


def test_cli_fuse_predict_evaluate_and_serve(runs, esc_five, noise_clips, run_cli, tmp_path):
    from fastapi.testclient import TestClient

    from soundsight.serving import ServeConfig, create_app, load_for_serving

    out = tmp_path / "fused"
    code, stdout, err = run_cli(
        "fuse", runs["network"], runs["frozen"], esc_five, "--out", out, "--cache", runs["cache"],
        "--noise", *noise_clips[:2],
    )  # fmt: skip
    assert code == 0, err
    assert re.search(r"fused at weight \d\.\d\d", stdout) and "honest" in stdout
    assert re.search(r"the same \d+ clips in noise: network [\d.]+, frozen head", stdout)
    model = out / "model.safetensors"
    clip = sorted((esc_five / "audio").iterdir())[0]
    code, stdout, err = run_cli("predict", model, clip)
    assert code == 0 and "CC-BY-4.0" in err
    expected = FrozenClassifier.load(model).predict(clip)[0]
    assert expected[0] in stdout
    code, stdout, _ = run_cli("evaluate", model, esc_five, "--cache", runs["cache"])
    assert code == 0 and "40 clips" in stdout
    settings = ServeConfig(workers=1, queue_size=2)
    with TestClient(
        create_app(load_for_serving(model, settings), settings), base_url="http://127.0.0.1"
    ) as client:
        answer = client.post(
            "/predict",
            files={"file": (clip.name, clip.read_bytes())},
            params={"spectrogram": "true", "timeline": "true"},
        ).json()
    assert answer["label"] == expected[0]
    # The page's timeline: detect's events on the upload, through the same fused streams.
    events = detect(model, [clip], progress=False).events
    assert [e["event_label"] for e in answer["events"]] == list(events["event_label"])
    assert [e["onset"] for e in answer["events"]] == pytest.approx(list(events["onset"]), abs=0.3)
    assert answer["predictions"][0]["probability"] == pytest.approx(expected[1], abs=2e-3)
    # The page shows the fused network's own log-mel: its mel bands are the rows.
    image = Image.open(io.BytesIO(base64.b64decode(answer["spectrogram_png"])))
    assert image.height == read_spec(runs["network"]).features.n_mels


def test_frozen_and_fused_models_export_to_onnx_and_run_torch_free(
    runs, esc_five, run_cli, tmp_path
):
    from fastapi.testclient import TestClient

    from soundsight.runtime import OnnxClassifier
    from soundsight.serving import ServeConfig, create_app, load_for_serving

    clips = sorted((esc_five / "audio").iterdir())
    for name in ("frozen", "fused"):
        onnx_file = tmp_path / f"{name}.onnx"
        code, _, err = run_cli("export", runs[name], "--out", onnx_file)
        assert code == 0, err
        exported, original = OnnxClassifier.load(onnx_file), FrozenClassifier.load(runs[name])
        # aisfx reads 44.1 kHz; the fused Lite0 22.05 kHz, the graph's second input.
        assert exported.features.sample_rate == 44100
        assert exported.rates == ([22050] if name == "fused" else [])
        assert exported.spec == original.spec and "CC-BY-4.0" in exported.spec.notice
        got, _ = exported.predict_files(clips, progress=False)
        expected, _ = original.predict_files(clips, progress=False)
        labels = original.labels
        assert list(got["path"]) == list(expected["path"]) and len(got) == 40
        assert np.abs(got[labels].to_numpy() - expected[labels].to_numpy()).max() <= 1e-4, name
        # The page's log-mel: the fused network's own, else the default one at 44.1 kHz.
        wave = exported.waveform(clips[0])
        db = exported.analyse(wave)[1]
        assert np.abs(db - original.analyse(wave)[1]).max() <= 0.0625
    # The CLI's CSV and the server's answer, from the exported fused model.
    code, _, err = run_cli(
        "predict", tmp_path / "fused.onnx", *clips[:4], "--out", tmp_path / "o.csv"
    )
    assert code == 0 and "CC-BY-4.0" in err
    code, _, err = run_cli("predict", runs["fused"], *clips[:4], "--out", tmp_path / "t.csv")
    assert code == 0, err
    onnx_rows, torch_rows = pd.read_csv(tmp_path / "o.csv"), pd.read_csv(tmp_path / "t.csv")
    assert list(onnx_rows["label"]) == list(torch_rows["label"])
    settings = ServeConfig(workers=1, queue_size=2)
    served = load_for_serving(tmp_path / "fused.onnx", settings)
    with TestClient(create_app(served, settings), base_url="http://127.0.0.1") as client:
        answer = client.post(
            "/predict", files={"file": (clips[0].name, clips[0].read_bytes())},
            params={"spectrogram": "true"},
        ).json()  # fmt: skip
    top = FrozenClassifier.load(runs["fused"]).predict(clips[0])[0][0]
    assert answer["label"] == top
    image = Image.open(io.BytesIO(base64.b64decode(answer["spectrogram_png"])))
    assert image.height == read_spec(runs["network"]).features.n_mels
    # Torch-free: predicting with the exported frozen model never imports torch.
    run_without_heavy_modules(
        f"""
        from soundsight.runtime import OnnxClassifier
        clf = OnnxClassifier.load({str(tmp_path / "fused.onnx")!r})
        assert clf.predict({str(clips[0])!r})[0][0] == {top!r}
        """
    )
    # int8 is for fine-tuned networks: said, nothing written.
    code, _, err = run_cli(
        "export", runs["frozen"], "--out", tmp_path / "q.onnx", "--quantize", "dynamic", "--force"
    )
    assert code == 2 and "fp32" in err and not (tmp_path / "q.onnx").exists()


def test_fusion_table_prefers_accuracy_then_log_loss_then_an_even_mean():
    targets = np.array([0, 1, 2, 0])
    right = np.eye(3)[targets] * 0.9 + 0.1 / 3
    wrong = np.eye(3)[[1, 2, 0, 1]] * 0.9 + 0.1 / 3
    table = fusion_table(right, wrong, targets)  # the head right, the network wrong
    assert table["weight"].iloc[0] == 1.0 and table["accuracy"].iloc[0] == 1.0
    assert table.set_index("weight").loc[0.0, "accuracy"] == 0.0
    # Equal parts: every weight ties on both scores; the even mean is kept.
    assert fusion_table(right, right, targets)["weight"].iloc[0] == 0.5


def test_bad_fusions_are_refused_by_name(runs, esc_five, tmp_path, tiny_model):
    clips = load_dataset(esc_five)
    other_seed = train_frozen(
        clips, tmp_path / "seed1", "aisfx", cache=runs["cache"], seed=1, progress=False
    )
    with pytest.raises(FrozenError, match=r"different seeds \(0 and 1\)"):
        held_out_side(clips, runs["network"], other_seed.model_path)
    with pytest.raises(FrozenError, match="different labels"):
        fuse(tiny_model, runs["frozen"], tmp_path / "a", weight=0.5)
    with pytest.raises(FrozenError, match="already a fusion"):
        fuse(runs["network"], runs["fused"], tmp_path / "b", weight=0.5)
    with pytest.raises(FrozenError, match="either validation clips"):
        fuse(runs["network"], runs["frozen"], tmp_path / "c")
    with pytest.raises(FrozenError, match="from 0 to 1"):
        fuse(runs["network"], runs["frozen"], tmp_path / "d", weight=1.5)
    fixed = fuse(runs["network"], runs["frozen"], tmp_path / "e", weight=0.25)
    assert read_frozen_model_file(fixed.model_path)[1].weight == 0.25


def test_fused_model_file_fields_are_validated(runs, tmp_path):
    tensors, spec = read_frozen_model_file(runs["fused"])
    record = json.loads(spec.to_json())
    for field, value, named in (
        ("weight", 1.5, "'weight'"),
        ("weight", True, "'weight'"),
        ("network", {**record["network"], "labels": ["a", "b", "c", "d", "e"]}, "head's labels"),
    ):
        with pytest.raises(ModelFileError, match=named):
            FrozenSpec.from_json(json.dumps({**record, field: value}), "m")
    with pytest.raises(ModelFileError, match="come together"):
        FrozenSpec.from_json(json.dumps({k: v for k, v in record.items() if k != "weight"}))
    # The network's weights and its record come together, and must fit the network.
    head_only = {k: v for k, v in tensors.items() if not k.startswith("network.")}
    with pytest.raises(ModelFileError, match="come together"):
        save_frozen_model_file(tmp_path / "x.safetensors", head_only, spec)
    name = next(k for k in tensors if k.startswith("network.") and tensors[k].ndim == 4)
    bent = dict(tensors) | {name: torch.zeros(1, 1, 1, 1)}
    save_frozen_model_file(tmp_path / "bent.safetensors", bent, spec)
    with pytest.raises(ModelFileError, match=re.escape(name.removeprefix("network."))):
        FrozenClassifier.load(tmp_path / "bent.safetensors")


def test_cli_fuse_chooses_on_the_test_side_that_train_validated_on(fsdd_dir, run_cli, tmp_path):
    """A layout with a test side (FSDD): train validates both models on it, so fuse
    chooses its weight there, never on training clips."""
    root = tmp_path / "fsdd"
    names = [
        f"{digit}_{speaker}_{index}.wav"
        for digit in (1, 2)
        for speaker in ("jackson", "theo")
        for index in (0, 1, 5, 6, 7, 8)
    ]
    (root / "recordings").mkdir(parents=True)
    for name in names:
        (root / "recordings" / name).symlink_to(fsdd_dir / "recordings" / name)
    common = ("--cache", tmp_path / "cache")
    code, _, err = run_cli(
        "train", root, "--out", tmp_path / "net", "--stage1-epochs", "0", "--stage2-epochs",
        "1", *common,
    )  # fmt: skip
    assert code == 0, err
    code, _, err = run_cli(
        "train",
        root,
        "--backbone",
        "aisfx+tf_efficientnet_lite0",
        "--out",
        tmp_path / "head",
        *common,
    )
    assert code == 0, err
    code, stdout, err = run_cli(
        "fuse", tmp_path / "net" / "model.safetensors", tmp_path / "head" / "model.safetensors",
        root, "--out", tmp_path / "fused", *common,
    )  # fmt: skip
    assert code == 0, err
    assert "validation (8 clips)" in stdout
    chosen = pd.read_csv(tmp_path / "fused" / "valid_predictions.csv")["path"]
    assert sorted(Path(p).name for p in chosen) == sorted(
        n for n in names if "_0." in n or "_1." in n
    )


#: ESC-50 fold-2 classes heard as noise by the noisy validation copy (none of esc_five's).
NOISE_CLASSES = ("rain", "wind", "crickets")


@pytest.fixture(scope="module")
def noise_clips(esc50_dir) -> list[Path]:
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv")
    rows = meta[meta["category"].isin(NOISE_CLASSES)].head(6)
    return [esc50_dir / "audio" / name for name in rows["filename"]]


def test_over_background_mixes_at_the_ratio_drawn_and_reads_a_stretch(noise_clips, esc_clips):
    from soundsight.audio import load_clip, read_segment
    from soundsight.soundscapes import background_stretch, over_background

    rate = 22050
    clip = load_clip(esc_clips[0], rate)[: rate // 2] * 0.1  # quiet: no peak limiting
    for snr in (-6.0, 0.0, 12.0):
        mixed = over_background(clip, noise_clips, rate, np.random.default_rng(1), (snr, snr))
        noise = mixed - clip
        ratio = 20 * np.log10(np.sqrt(np.mean(clip**2)) / np.sqrt(np.mean(noise**2)))
        assert len(mixed) == len(clip) and ratio == pytest.approx(snr, abs=0.01)
    # One seeded stretch of one recording, resampled: the same draws give the same audio.
    stretch = background_stretch(noise_clips, 1.5, 44100, np.random.default_rng(3))
    rng = np.random.default_rng(3)
    path = noise_clips[int(rng.integers(len(noise_clips)))]
    start = float(rng.uniform(0.0, 5.0 - 1.5))
    expected, source_rate = read_segment(path, start, start + 1.5)
    assert source_rate == 44100 and len(stretch) == len(expected) == 66150
    np.testing.assert_array_equal(stretch, expected)


def test_noisy_validation_copy_weighs_the_weight_in_noise(runs, esc_five, noise_clips, tmp_path):
    clips = load_dataset(esc_five)
    valid = held_out_side(clips, runs["network"], runs["frozen"])
    result = fuse(
        runs["network"], runs["frozen"], tmp_path / "noisy", valid=valid,
        cache=runs["cache"], progress=False, noise=noise_clips, snr_db=(-6.0, 0.0),
    )  # fmt: skip
    _, spec = read_frozen_model_file(result.model_path)
    fusion = spec.train["fusion"]
    assert fusion["noisy_clips"] == fusion["valid_clips"] == len(valid)
    table = pd.read_csv(tmp_path / "noisy" / "fusion.csv")
    assert {"clean_accuracy", "noisy_accuracy"} <= set(table.columns)
    # The weight is the best over both copies together: the mean of the two accuracies.
    both = (table["clean_accuracy"] + table["noisy_accuracy"]) / 2
    np.testing.assert_allclose(table["accuracy"], both, atol=1e-9)
    assert table.set_index("weight").loc[spec.weight, "accuracy"] == table["accuracy"].max()
    # The clean scores are the ones written, at the weight chosen.
    assert spec.metrics["accuracy"] == pytest.approx(
        table.set_index("weight").loc[spec.weight, "clean_accuracy"]
    )
    # A validation clip of a label neither model knows is left out, with a warning.
    foreign = pd.DataFrame({"path": [str(noise_clips[0])], "label": ["rain"]})
    with pytest.warns(UserWarning, match="labels without training clips; left out of the choice"):
        again = fuse(
            runs["network"], runs["frozen"], tmp_path / "foreign",
            valid=pd.concat([valid, foreign]), cache=runs["cache"], progress=False,
        )  # fmt: skip
    assert read_frozen_model_file(again.model_path)[1].train["fusion"]["valid_clips"] == len(valid)
    with pytest.raises(FrozenError, match="give them too"):
        fuse(runs["network"], runs["frozen"], tmp_path / "x", weight=0.5, noise=noise_clips)


def test_detect_slides_frozen_and_fused_models_part_by_part(runs, esc_five, tmp_path):
    # A clip shorter than every window is one window of each stream, so its timeline
    # row is the model's own clip probabilities: the parts' shares of the head's
    # logits add up to the head's, and the fusion blends as predict does.
    first = sorted((esc_five / "audio").iterdir())[0]
    wave, rate = sf.read(first, dtype="float32")
    short = tmp_path / "short.wav"
    sf.write(short, wave[: int(0.8 * rate)], rate)
    for name in ("frozen", "fused"):
        model = FrozenClassifier.load(runs[name])
        line = detect(model, [short], progress=False, keep_timelines=True).timelines[str(short)]
        expected, _ = model.predict_files([short], progress=False)
        assert len(line.centres) == 1
        np.testing.assert_allclose(line.probabilities, expected[model.labels].to_numpy(), atol=1e-4)


def test_detect_and_evaluate_events_with_frozen_and_fused_models(runs, esc_five, run_cli, tmp_path):
    # Three 5-s clips of three labels end to end: along the frozen aisfx head's
    # timeline, the windows wholly inside each clip name its label.
    chosen = sorted((esc_five / "audio").iterdir())[::8][:3]
    labels = pd.read_csv(esc_five / "meta" / "esc50.csv").set_index("filename")["category"]
    waves = [sf.read(path, dtype="float32")[0] for path in chosen]
    rate = sf.info(chosen[0]).samplerate
    recording = tmp_path / "scenes" / "three.wav"
    recording.parent.mkdir()
    sf.write(recording, np.concatenate(waves), rate)
    frozen = FrozenClassifier.load(runs["frozen"])
    line = detect(frozen, [recording], progress=False, keep_timelines=True).timelines[
        str(recording)
    ]
    assert line.duration == pytest.approx(15.0, abs=0.05)
    assert np.diff(line.centres).max() <= 0.26  # the 0.25-s hop, each stream's own
    for number, path in enumerate(chosen):
        start = 5 * number + line.window_seconds / 2
        inside = (line.centres >= start) & (line.centres <= start + 5 - line.window_seconds)
        mean = line.probabilities[inside].mean(0)
        assert frozen.labels[int(mean.argmax())] == labels[path.name]
    # The fused model through the command line: events, a picture, sed_eval scores.
    code, stdout, err = run_cli(
        "detect", runs["fused"], recording, "--out", tmp_path / "events.csv",
        "--plot", tmp_path / "pictures",
    )  # fmt: skip
    assert code == 0, err
    events = pd.read_csv(tmp_path / "events.csv")
    assert set(events["event_label"]) <= set(frozen.labels) and len(events)
    assert (tmp_path / "pictures" / "three.png").stat().st_size > 10_000
    reference = tmp_path / "scenes" / "events.csv"
    pd.DataFrame(
        {
            "filename": ["three.wav"] * 3,
            "onset": [0.0, 5.0, 10.0],
            "offset": [5.0, 10.0, 15.0],
            "event_label": [labels[path.name] for path in chosen],
        }
    ).to_csv(reference, index=False)
    code, stdout, err = run_cli("evaluate", runs["frozen"], recording.parent, "--events", reference)
    assert code == 0, err
    assert float(re.search(r"segment-based \(1 s\) F1 ([\d.]+)", stdout).group(1)) >= 0.6


def test_part_heads_add_up_to_the_head():
    rng = np.random.default_rng(0)
    head = {
        "mean": rng.normal(size=8).astype(np.float32),
        "scale": rng.uniform(0.5, 2, size=8).astype(np.float32),
        "coef": rng.normal(size=(3, 8)).astype(np.float32),
        "intercept": rng.normal(size=3).astype(np.float32),
    }
    vectors = rng.normal(size=(4, 8))
    shares = part_heads(head, [5, 3])
    summed = head_logits(shares[0], vectors[:, :5]) + head_logits(shares[1], vectors[:, 5:])
    np.testing.assert_allclose(summed, head_logits(head, vectors), rtol=1e-6)
    with pytest.raises(FrozenError, match="parts of 7 dims for a head over 8"):
        part_heads(head, [4, 3])


def test_report_of_frozen_and_fused_runs(runs, tmp_path):
    import shutil

    from soundsight.report import write_report

    for name in ("frozen", "fused"):
        folder = shutil.copytree(runs["root"] / name, tmp_path / name)
        page = write_report(folder, runs["cache"]).read_text()
        valid = pd.read_csv(folder / "valid_predictions.csv")
        for picture in ("confusion", "per_class", "top_losses", "tsne"):
            assert (folder / f"{picture}.png").stat().st_size > 5_000, picture
        # The t-SNE places every validation clip by the parts' embeddings.
        assert sorted(pd.read_csv(folder / "tsne.csv")["path"]) == sorted(valid["path"])
        assert "aisfx 512-d" in page and "frozen parts' embeddings" in page
        assert "CC-BY-4.0" in page
    assert "weight of the head" in page and "Late fusion" in page
    assert "fused network: model" in page

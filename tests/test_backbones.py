"""The backbone registry: offline weights for EfficientNet-Lite0/1/2 and the
audio-pretrained aisfx network (its front end, its checkpoint, its licence notice), and
the errors for unknown backbones, weights that do not fit and weights not installed."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from soundsight.aisfx import AISFX_FEATURES, BLOCK_FRAMES, EMBEDDING_DIM, NOTICE, wheel_path
from soundsight.config import FeatureConfig, ModelConfig, config_from_dict
from soundsight.features import Featuriser, mel_filterbank
from soundsight.models import (
    OFFLINE_BACKBONES,
    SoundNet,
    WeightsError,
    backbone_configs,
    create_backbone,
    window_scores,
)

ESC_DOG = "2-104105-A-19.flac"  # a real ESC-50 clip, 5 s at 44.1 kHz

needs_aisfx = pytest.mark.skipif(
    not wheel_path().is_file(), reason="aisfx weights not installed (python -m soundsight.weights)"
)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails, as on a machine without network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _features_for(name: str) -> FeatureConfig:
    return backbone_configs(FeatureConfig(), ModelConfig(backbone=name, crop_seconds=2.0))[0]


@pytest.mark.parametrize("name", sorted(OFFLINE_BACKBONES))
def test_each_offline_backbone_loads_and_predicts_a_real_clip_without_network(
    name, no_network, esc50_dir
):
    if name == "aisfx" and not wheel_path().is_file():
        pytest.skip("aisfx weights not installed")
    features = _features_for(name)
    _, model = backbone_configs(features, ModelConfig(backbone=name))
    net = SoundNet(model, 4, features.floor_db).eval()
    # The pretrained tensors are the package's, not a random initialisation.
    pretrained = OFFLINE_BACKBONES[name].weights()
    first = next(iter(pretrained.values()))
    assert torch.equal(next(iter(net.backbone.state_dict().values())), first)
    db = Featuriser(features)(esc50_dir / "audio" / ESC_DOG)
    frames = 100
    windows = torch.from_numpy(np.stack([db[:, :frames], db[:, frames : 2 * frames]]))[:, None]
    with torch.inference_mode():
        probabilities, embeddings = window_scores(net, windows, embed=True)
    assert probabilities.shape == (2, 4)
    assert torch.allclose(probabilities.sum(-1), torch.ones(2))
    assert embeddings is not None and embeddings.shape[0] == 2
    assert embeddings.shape[1] == (EMBEDDING_DIM if name == "aisfx" else 1280)
    assert embeddings.std() > 0  # a real clip gives a non-constant embedding


def test_backbones_command_lists_offline_and_missing_weights(run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("SOUNDSIGHT_WEIGHTS", str(tmp_path))  # no aisfx wheel there
    code, out, _ = run_cli("backbones")
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    for version in (0, 1, 2):
        assert lines[f"tf_efficientnet_lite{version}"].split()[1] == "offline"
    assert lines["aisfx"].split()[1] == "missing"
    assert "python -m soundsight.weights" in lines["aisfx"]
    assert "resnet34" in out and "hub" in out


def test_unknown_backbone_lists_the_offline_ones():
    with pytest.raises(WeightsError) as err:
        create_backbone("efficientnet_lite9", 3)
    for name in OFFLINE_BACKBONES:
        assert name in str(err.value)


def test_hub_backbone_without_network_says_how_to_get_weights(no_network):
    with pytest.raises(WeightsError, match="resnet34: cannot download .* --weights PATH"):
        create_backbone("resnet34", 3)


def test_weights_file_that_does_not_fit_names_the_tensor_and_both_shapes(tmp_path):
    # The package's own (lukemelas) names, matched to timm's by order, one of them reshaped.
    state = OFFLINE_BACKBONES["tf_efficientnet_lite1"].weights()
    names = list(state)
    state[names[5]] = torch.zeros(3, 3)
    path = tmp_path / "lite1.pth"
    torch.save(state, path)
    target = create_backbone("tf_efficientnet_lite1", 3, "none").state_dict()
    expected = tuple(list(target.values())[5].shape)
    with pytest.raises(WeightsError) as err:
        create_backbone("tf_efficientnet_lite1", 3, str(path))
    message = str(err.value)
    assert str(path) in message and names[5] in message
    assert "(3, 3)" in message and str(expected) in message


def test_missing_aisfx_weights_name_the_command_that_installs_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUNDSIGHT_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsError, match=r"`python -m soundsight\.weights`"):
        create_backbone("aisfx", 3)


def test_a_file_that_is_not_the_aisfx_wheel_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUNDSIGHT_WEIGHTS", str(tmp_path))
    wheel_path().write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(WeightsError, match="not the aisfx 0.1.2 wheel"):
        create_backbone("aisfx", 3)


def test_aisfx_features_are_aisfxs_own_front_end(esc50_dir):
    """aisfx's ``spectrogram_librosa.compute_spectrogram`` then its 'original'
    normalisation, computed with librosa on the same waveform (minus 1: soundsight's
    offset that makes silence the floor)."""
    librosa = pytest.importorskip("librosa")
    featurise = Featuriser(AISFX_FEATURES)
    path = esc50_dir / "audio" / ESC_DOG
    wave = featurise.waveform(path)
    power = librosa.feature.melspectrogram(
        y=wave / np.abs(wave).max(),
        sr=44100,
        n_mels=96,
        norm=1.0,
        fmin=0.0,
        fmax=22050.0,
        htk=True,
        hop_length=1024,
        win_length=2048,
        pad_mode="constant",
    )
    expected = np.log10(power * 1e4 + 1) / 9.457798957824707 - 1
    features = featurise(path)
    assert features.shape == expected.shape == (96, 216)
    np.testing.assert_allclose(features, expected, atol=5e-4)  # float16 storage
    frames, blocks = featurise.stream(path, block_seconds=1.0)
    assert frames == 216
    np.testing.assert_allclose(np.concatenate(list(blocks), axis=1), features, atol=1e-6)


def test_htk_filterbank_is_librosas():
    librosa = pytest.importorskip("librosa")
    expected = librosa.filters.mel(
        sr=44100, n_fft=2048, n_mels=96, fmin=0.0, fmax=22050.0, htk=True, norm=1.0
    )
    np.testing.assert_allclose(mel_filterbank(44100, 2048, 96, htk=True), expected, atol=1e-6)


def test_feature_configs_from_before_the_front_end_field_keep_their_meaning_and_digest():
    old = {
        "sample_rate": 22050,
        "n_fft": 1024,
        "hop_length": 256,
        "n_mels": 128,
        "fmin": 20.0,
        "fmax": None,
        "top_db": 80.0,
    }
    config = config_from_dict(FeatureConfig, old)
    assert config.front_end == "log_mel_db"
    # The digest soundsight gave this config before the field existed: caches stay valid.
    assert config.digest == "89faacb9c5b5"
    assert AISFX_FEATURES.digest != config.digest


#: Embedding values of the wheel's own pipeline on :data:`ESC_DOG`: aisfx 0.1.2's
#: ``spectrogram_librosa.compute_spectrogram``, ``spectrogram_normalize`` and
#: ``blocking(100, hop 50)``, then ``EmbeddingNet('max', 3, 1, 64)`` with the
#: checkpoint's ``embedding_net.*`` tensors; computed once from the wheel's files
#: (aisfx itself cannot be installed next to soundsight) and kept here. Blocks 0 and 1
#: (frames 0-99 and 50-149), first six dimensions.
WHEEL_EMBEDDING = {
    0: [0.77284, 0.52820, 0.71216, 0.72142, 1.16187, 0.15231],
    1: [1.76855, 0.63029, 0.75169, 0.79902, 1.06769, 0.25202],
}


@needs_aisfx
def test_aisfx_embedding_equals_the_wheels_on_a_real_clip(esc50_dir, no_network):
    net = SoundNet(ModelConfig(backbone="aisfx", crop_seconds=2.32), 3, -1.0).eval()
    db = Featuriser(AISFX_FEATURES)(esc50_dir / "audio" / ESC_DOG)
    blocks = [db[:, start : start + BLOCK_FRAMES] for start in (0, 50)]
    with torch.inference_mode():
        _, embeddings = window_scores(net, torch.from_numpy(np.stack(blocks))[:, None], True)
    assert embeddings is not None and embeddings.shape == (2, EMBEDDING_DIM)
    for block, values in WHEEL_EMBEDDING.items():
        # Within the float16 rounding of the features (0.0065 at most, measured).
        np.testing.assert_allclose(embeddings[block, :6].numpy(), values, atol=0.01)


def test_aisfx_reads_only_its_own_front_end():
    features, model = backbone_configs(FeatureConfig(), ModelConfig(backbone="aisfx"))
    assert features == AISFX_FEATURES
    assert model.crop_seconds == pytest.approx(2.32)
    with pytest.raises(WeightsError, match="aisfx reads only its own front end"):
        backbone_configs(FeatureConfig(n_mels=64), ModelConfig(backbone="aisfx"))
    lite = ModelConfig(backbone="tf_efficientnet_lite2")
    assert backbone_configs(FeatureConfig(n_mels=64), lite) == (FeatureConfig(n_mels=64), lite)


@needs_aisfx
@pytest.mark.slow
def test_aisfx_model_trains_predicts_and_carries_its_licence_notice(fsdd_subset, tmp_path, run_cli):
    from soundsight import load_dataset
    from soundsight.modelfile import read_spec
    from soundsight.prediction import Classifier
    from soundsight.training import TrainConfig, train

    clips = load_dataset(fsdd_subset)
    result = train(
        clips,
        tmp_path / "run",
        valid=clips,
        model=ModelConfig(backbone="aisfx"),
        config=TrainConfig(stage1_epochs=0, stage2_epochs=1, batch_size=10),
        cache=tmp_path / "cache",
        progress=False,
    )
    spec = read_spec(result.model_path)
    assert spec.notice == NOTICE and "CC-BY-4.0" in spec.notice
    assert spec.features == AISFX_FEATURES
    classifier = Classifier.load(result.model_path)
    top = classifier.predict(clips["path"][0], top_k=3)
    assert len(top) == 3 and {label for label, _ in top} <= set(spec.labels)
    code, out, err = run_cli("predict", result.model_path, clips["path"][0])
    assert code == 0 and err.count("CC-BY-4.0") == 1 and "CC-BY" not in out


@pytest.mark.slow
def test_linear_probe_alone_fits_the_head_on_frozen_embeddings(fsdd_dir, tmp_path):
    """LP-FT's first step on real FSDD clips (4 digits, 3 clips per speaker; validated
    on the official test side): the probe's head beats chance by far (0.67 measured,
    chance 0.25) and the body is untouched."""
    from soundsight import load_dataset
    from soundsight.training import lp_ft_recipe, train

    def pick(split: str, per_speaker: int):
        table = load_dataset(fsdd_dir, "fsdd", split).sort_values("path")
        table = table[table["label"].isin(["0", "1", "2", "3"])]
        return table.groupby(["label", "group"]).head(per_speaker)

    clips, valid = pick("train", 3), pick("test", 1)
    result = train(
        clips,
        tmp_path / "run",
        valid=valid,
        config=lp_ft_recipe(epochs=0),
        cache=tmp_path / "cache",
        progress=False,
    )
    assert result.history == []  # no epoch ran: the probe is the whole training
    from soundsight.modelfile import read_model_file

    tensors, spec = read_model_file(result.model_path)
    assert spec.train["linear_probe"] is True
    pretrained = OFFLINE_BACKBONES["tf_efficientnet_lite0"].weights()
    assert torch.equal(tensors["conv_stem.weight"], next(iter(pretrained.values())))
    assert tensors["classifier.weight"].abs().sum() > 0  # fitted, not the zero init
    assert result.metrics["accuracy"] > 0.5  # chance is 0.25


@pytest.mark.slow
def test_lp_ft_recipe_trains_from_the_probe(run_cli, fsdd_subset, tmp_path):
    code, out, err = run_cli(
        "train",
        fsdd_subset,
        "--out",
        tmp_path / "run",
        "--cache",
        tmp_path / "cache",
        "--recipe",
        "lp-ft",
        "--epochs",
        "1",
        "--batch-size",
        "8",
    )
    assert code == 0, err
    assert "linear probe: head fitted on frozen embeddings" in out
    assert "validation:" in out

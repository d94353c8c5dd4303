"""The data behind each interpretation plot, and the plots' labelling (no training)."""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import matplotlib
import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from soundsight import plots
from soundsight.evaluation import score
from soundsight.features import FeatureConfig


def predictions_frame(n: int = 40, k: int = 5, seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """A ``valid_predictions.csv``-shaped frame: path, label, one probability per label."""
    rng = np.random.default_rng(seed)
    labels = [f"class_{i}" for i in range(k)]
    probabilities = rng.dirichlet(np.ones(k), size=n)
    targets = rng.integers(0, k, n)
    frame = pd.DataFrame(probabilities, columns=labels)
    frame.insert(0, "label", [labels[t] for t in targets])
    frame.insert(0, "path", [f"/clips/{i}.wav" for i in range(n)])
    return frame, labels


def test_top_losses_are_sorted_by_minus_log_probability_of_the_true_label():
    frame, labels = predictions_frame()
    frame.loc[3, frame.loc[3, "label"]] = 0.0  # a certain mistake: loss floored, not inf
    top = plots.top_losses(frame, labels, n=10)
    assert len(top) == 10
    assert top["loss"].is_monotonic_decreasing
    for row in top.itertuples():
        source = frame[frame["path"] == row.path].iloc[0]
        assert row.p_true == pytest.approx(source[row.label])
        assert row.loss == pytest.approx(-math.log(max(source[row.label], 1e-8)))
        assert row.predicted == source[labels].astype(float).idxmax()
        assert row.p_predicted == pytest.approx(source[labels].max())
    assert top.loc[0, "path"] == "/clips/3.wav"
    assert top.loc[0, "loss"] == pytest.approx(-math.log(1e-8))
    # No clip outside the top has a larger loss than the smallest inside it.
    everything = plots.top_losses(frame, labels, n=len(frame))
    assert len(everything) == len(frame)
    assert everything["loss"].iloc[10:].max() <= top["loss"].min()


def test_confusion_from_predictions_sums_to_the_clips_and_matches_scoring():
    frame, labels = predictions_frame(n=57, k=6)
    confusion = plots.confusion_from_predictions(frame, labels)
    assert confusion.sum() == len(frame)
    targets = frame["label"].map({label: i for i, label in enumerate(labels)}).to_numpy()
    expected = score(frame[labels].to_numpy(), targets, labels)["confusion"]
    np.testing.assert_array_equal(confusion, expected)
    np.testing.assert_array_equal(confusion.sum(axis=1), np.bincount(targets, minlength=6))


def test_normalised_confusion_rows_are_fractions_of_each_true_class():
    confusion = np.array([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    rates = plots.normalised_confusion(confusion)
    np.testing.assert_allclose(rates.sum(axis=1), [1, 0, 1])
    np.testing.assert_allclose(rates[0], [0.75, 0.25, 0])
    np.testing.assert_allclose(rates[2], [0.25, 0.25, 0.5])


def test_recall_order_puts_best_recognised_classes_first():
    rng = np.random.default_rng(1)
    confusion = rng.integers(0, 5, (12, 12)) + np.diag(rng.integers(0, 20, 12))
    order = plots.confusion_order(confusion, "recall")
    assert sorted(order) == list(range(12))
    recall = np.diag(plots.normalised_confusion(confusion))[order]
    assert np.all(np.diff(recall) <= 0)
    np.testing.assert_array_equal(plots.confusion_order(confusion, "label"), np.arange(12))


def test_cluster_order_puts_classes_mistaken_for_each_other_side_by_side():
    confusion = np.diag([10] * 6)
    confusion[0, 4] = confusion[4, 0] = 6
    confusion[1, 5] = confusion[5, 1] = 6
    order = list(plots.confusion_order(confusion, "cluster"))
    assert sorted(order) == list(range(6))
    assert abs(order.index(0) - order.index(4)) == 1
    assert abs(order.index(1) - order.index(5)) == 1
    with pytest.raises(ValueError, match="unknown order"):
        plots.confusion_order(confusion, "size")


def test_history_frame_runs_over_both_stages_in_order():
    history = pd.DataFrame(
        {
            "stage": ["2", "1", "2"],
            "epoch": ["2", "1", "1"],
            "train_loss": ["1.0", "2.0", "1.5"],
            "valid_loss": ["0.9", "1.9", "1.2"],
            "error_rate": ["0.1", "0.5", "0.25"],
            "seconds": ["1", "1", "1"],
        }
    )
    frame = plots.history_frame(history)
    assert frame[["stage", "epoch"]].values.tolist() == [[1, 1], [2, 1], [2, 2]]
    assert frame["position"].tolist() == [1, 2, 3]
    assert frame["error_percent"].tolist() == pytest.approx([50, 25, 10])


def test_steps_per_epoch_follows_the_loader_dropping_the_last_partial_batch():
    assert plots.steps_per_epoch(100, 16) == 6
    assert plots.steps_per_epoch(96, 16) == 6
    assert plots.steps_per_epoch(16, 16) == 1  # one batch: nothing dropped
    assert plots.steps_per_epoch(5, 16) == 1


def test_lr_schedule_is_one_cycle_per_stage_with_the_recipes_peaks():
    train = {"stage1_epochs": 1, "stage2_epochs": 3, "lr": 2e-3, "body_lr": 1e-3}
    schedule = plots.lr_schedule(train, 40)  # warm-up ends on a whole step: exact peaks
    assert len(schedule) == 40 + 120
    stage1, stage2 = (schedule[schedule["stage"] == s] for s in (1, 2))
    assert stage1["body_lr"].isna().all()
    assert stage1["head_lr"].max() == pytest.approx(2e-3)
    assert stage2["head_lr"].max() == pytest.approx(2e-3)
    assert stage2["body_lr"].max() == pytest.approx(1e-3)
    for stage in (stage1, stage2):
        assert stage["head_lr"].iloc[0] == pytest.approx(2e-3 / 25)  # OneCycleLR div_factor
        peak = int(stage["head_lr"].to_numpy().argmax())
        assert peak / len(stage) == pytest.approx(0.25, abs=0.05)  # pct_start
        assert stage["head_lr"].iloc[-1] < 2e-3 / 25 / 100  # annealed far below the start
    assert schedule["epoch"].iloc[0] == 0
    assert stage2["epoch"].iloc[0] == 1
    assert schedule["epoch"].iloc[-1] == pytest.approx(4 - 1 / 40)
    assert schedule["epoch"].is_monotonic_increasing
    empty = plots.lr_schedule({**train, "stage1_epochs": 0, "stage2_epochs": 0}, 10)
    assert len(empty) == 0


def test_lr_schedule_matches_what_the_training_module_configures():
    """Reconstructed rates equal those of ClipClassifier.configure_optimizers, stepped."""
    from soundsight.models import ModelConfig, SoundNet
    from soundsight.training import ClipClassifier, TrainConfig

    config = TrainConfig(stage1_epochs=0, stage2_epochs=2, lr=3e-3, stage2_lr=1e-3, body_lr=5e-4)
    net = SoundNet(ModelConfig(crop_seconds=1.0), 3, -80.0, pretrained=False)
    module = ClipClassifier(net, config, 3, -80.0)
    module.set_stage(2)
    steps = 7
    module._trainer = SimpleNamespace(estimated_stepping_batches=2 * steps)
    setup = module.configure_optimizers()
    optimizer, scheduler = setup["optimizer"], setup["lr_scheduler"]["scheduler"]
    actual = []
    for _ in range(2 * steps):
        actual.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    expected = plots.lr_schedule(
        {"stage1_epochs": 0, "stage2_epochs": 2, "lr": 3e-3, "stage2_lr": 1e-3, "body_lr": 5e-4},
        steps,
    )
    np.testing.assert_allclose(expected[["head_lr", "body_lr"]].to_numpy(), actual, rtol=1e-9)


def blobs(per_class: int = 20, dims: int = 64, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 10, (3, dims))
    x = np.concatenate([c + rng.normal(0, 1, (per_class, dims)) for c in centres])
    return x, np.repeat(["a", "b", "c"], per_class)


def test_tsne_keeps_separate_classes_apart_and_is_deterministic():
    x, labels = blobs()
    positions = plots.tsne_positions(x, seed=0)
    assert positions.shape == (60, 2)
    distance = ((positions[:, None] - positions[None]) ** 2).sum(-1)
    np.fill_diagonal(distance, np.inf)
    nearest = labels[distance.argmin(axis=1)]
    assert (nearest == labels).all()
    np.testing.assert_allclose(plots.tsne_positions(x, seed=0), positions)
    with pytest.raises(ValueError, match="at least 4"):
        plots.tsne_positions(x[:3])


def test_thumbnail_canvas_puts_each_thumbnail_at_its_position():
    positions = np.array([[0.0, 0.0], [10.0, 5.0], [5.0, 2.5]])
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    images = [np.full((8, 8, 3), c, np.uint8) for c in colours]
    canvas, (left, right, bottom, top) = plots.thumbnail_canvas(positions, images, size=200)
    assert canvas.shape == (200, 200, 3)
    for (x, y), colour in zip(positions, colours, strict=True):
        column = int((x - left) / (right - left) * 200)
        row = int((top - y) / (top - bottom) * 200)
        assert tuple(canvas[row, column]) == colour
    assert tuple(canvas[100, 2]) == (255, 255, 255)  # background stays white


def test_label_styles_are_distinct_colour_blind_safe_pairs():
    labels = [f"label{i}" for i in range(50)]
    styles = plots.label_styles(labels)
    assert len(set(styles.values())) == 50
    assert {colour for colour, _ in styles.values()} <= set(plots.OKABE_ITO)


def test_mel_ticks_rise_with_frequency_and_do_not_crowd():
    features = FeatureConfig()
    positions, names = plots.mel_ticks(features)
    assert names[-1] == "8k" and "1k" in names
    assert np.all(np.diff(positions) >= 0.08 * features.n_mels)
    assert positions[0] > 0 and positions[-1] < features.n_mels


SAFE_MAPS = {plots.SPECTROGRAM_CMAP, plots.MATRIX_CMAP, "magma", "viridis", "cividis"}


def assert_labelled(figure: Figure, name: str = "") -> None:
    """Every drawn axes has a title (its own or the figure's) and both axis labels
    (its own or the figure's super-labels), and colour maps are colour-blind safe."""
    assert isinstance(figure, Figure), name
    png = io.BytesIO()
    figure.savefig(png, format="png", dpi=40)  # it renders
    assert png.getvalue().startswith(b"\x89PNG"), name
    for ax in figure.axes:
        if not ax.get_visible():
            continue
        if ax.get_label() == "<colorbar>":
            assert ax.get_ylabel() or ax.get_xlabel(), "colour bar without a label"
            continue
        assert ax.get_title() or ax.get_title(loc="left") or figure.get_suptitle(), name
        assert ax.get_xlabel() or figure.get_supxlabel(), f"{name}: no x label"
        assert ax.get_ylabel() or figure.get_supylabel(), f"{name}: no y label"
        for image in ax.get_images():
            if image.get_array().ndim == 2:
                assert image.get_cmap().name in SAFE_MAPS


def test_every_plot_has_titles_labelled_axes_and_safe_colours():
    frame, labels = predictions_frame(n=60, k=5)
    confusion = plots.confusion_from_predictions(frame, labels)
    features = FeatureConfig(sample_rate=8000, n_fft=256, hop_length=64, n_mels=40)
    rng = np.random.default_rng(0)
    spectrograms = [rng.uniform(-80, 0, (40, 50 + 10 * i)).astype(np.float32) for i in range(5)]
    history = pd.DataFrame(
        {
            "stage": [1, 2, 2],
            "epoch": [1, 1, 2],
            "train_loss": [2.0, 1.5, 1.0],
            "valid_loss": [1.9, 1.2, 0.9],
            "error_rate": [0.5, 0.25, 0.1],
            "seconds": [1, 1, 1],
        }
    )
    per_class = score(
        frame[labels].to_numpy(), frame["label"].map(labels.index).to_numpy(), labels
    )["per_class"]
    x, blob_labels = blobs()
    positions = plots.tsne_positions(x)
    thumbnails = [np.full((10, 10, 3), 128, np.uint8)] * len(positions)
    figures = {
        "batch": plots.plot_batch(spectrograms, labels, features),
        "history": plots.plot_history(history),
        "schedule": plots.plot_lr_schedule(
            plots.lr_schedule(
                {"stage1_epochs": 1, "stage2_epochs": 2, "lr": 1e-3, "body_lr": 5e-4}, 5
            )
        ),
        "lr_find": plots.plot_lr_find(np.logspace(-6, 0, 50), np.linspace(3, 1, 50), 1e-3),
        "confusion": plots.plot_confusion(confusion, labels),
        "per_class": plots.plot_per_class(per_class),
        "top_losses": plots.plot_top_losses(
            plots.top_losses(frame, labels, 5), spectrograms, features
        ),
        "tsne": plots.plot_tsne(None, blob_labels, positions),
        "thumbnails": plots.plot_tsne_thumbnails(positions, thumbnails, blob_labels),
        "cv": plots.plot_cv_summary(
            pd.DataFrame({"fold": [0, 1], "accuracy": [0.8, 0.7], "map3": [0.85, 0.8]})
        ),
    }
    for name, figure in figures.items():
        assert_labelled(figure, name)


def test_confusion_matrix_stays_legible_at_50_classes():
    rng = np.random.default_rng(0)
    labels = [f"a_long_class_name_{i}" for i in range(50)]
    confusion = rng.integers(0, 2, (50, 50)) + np.diag(rng.integers(2, 9, 50))
    small = plots.plot_confusion(confusion[:10, :10], labels[:10])
    large = plots.plot_confusion(confusion, labels)
    ax = large.axes[0]
    assert len(ax.get_xticklabels()) == len(ax.get_yticklabels()) == 50
    font = ax.get_yticklabels()[0].get_fontsize()
    assert font >= 7
    # The figure grows with the classes: each row stays taller than its label's text.
    row_points = large.get_size_inches()[1] * 72 * 0.7 / 50
    assert row_points > font * 1.2
    assert large.get_size_inches()[0] > small.get_size_inches()[0]
    assert ax.get_images()[0].get_cmap().name == plots.MATRIX_CMAP
    # Normalised colours, raw counts written in the non-zero cells.
    assert ax.get_images()[0].get_array().max() <= 1.0
    assert len(ax.texts) == int((confusion > 0).sum())
    assert str(int(confusion.sum())) in ax.get_title()


def test_per_class_chart_sorts_by_f1_and_shows_support():
    per_class = pd.DataFrame(
        {
            "label": ["dog", "cat", "cow"],
            "precision": [0.5, 1.0, 0.2],
            "recall": [0.5, 1.0, 0.1],
            "f1": [0.5, 1.0, 0.133],
            "support": [2, 3, 4],
        }
    )
    figure = plots.plot_per_class(per_class)
    names = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert names == ["cow (n=4)", "dog (n=2)", "cat (n=3)"]  # bottom to top: best on top


def test_figures_work_without_pyplot_state():
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.plot_history(
        pd.DataFrame(
            {
                "stage": [2],
                "epoch": [1],
                "train_loss": [1.0],
                "valid_loss": [1.0],
                "error_rate": [0.5],
            }
        )
    )
    assert plt.get_fignums() == before  # nothing left open for the caller to close
    assert matplotlib.colormaps[plots.MATRIX_CMAP] is not None
    torch.manual_seed(0)

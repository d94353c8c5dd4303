"""Run plots and report.html end to end on a real (tiny) trained run, and the report in
real headless Chromium: every image loads, every audio player has a playable source,
nothing is fetched from the network, and the page is not blank."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
from PIL import Image

from soundsight import report
from soundsight.modelfile import read_spec
from soundsight.report import RUN_PLOTS, plot_run, plots_are_current, write_report
from soundsight.report.plotting import MULTI_LABEL_PLOTS

#: Plots a run with a model file, history and validation predictions must have
#: (lr_find only with --lr auto).
EXPECTED = set(RUN_PLOTS) - {"lr_find"} - MULTI_LABEL_PLOTS


@pytest.fixture(scope="module")
def plotted_run(tmp_path_factory, tiny_model: Path) -> tuple[Path, Path, list[Path]]:
    """A copy of the session's tiny run (which is read-only), plotted once:
    ``(run folder, feature cache, PNG paths)``."""
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_model.parent, run)
    cache = tiny_model.parent.parent / "cache"
    return run, cache, plot_run(run, cache)


def test_plot_run_writes_every_plot_as_a_png(plotted_run):
    run, _, paths = plotted_run
    assert {p.stem for p in paths} == EXPECTED
    for path in paths:
        assert path.parent == run
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert min(image.size) > 200
            pixels = np.asarray(image.convert("L"), float)
        assert pixels.std() > 5, f"{path.name} looks blank"
    assert plots_are_current(run)


def test_plot_data_matches_the_validation_set(plotted_run):
    run, _, _ = plotted_run
    predictions = pd.read_csv(run / "valid_predictions.csv", dtype={"label": str})
    confusion = pd.read_csv(run / "confusion.csv", index_col=0)
    assert confusion.to_numpy().sum() == len(predictions)  # one cell per validation clip
    losses = pd.read_csv(run / "top_losses.csv", dtype={"label": str, "predicted": str})
    assert len(losses) == min(report.TOP_LOSSES, len(predictions))
    assert losses["loss"].is_monotonic_decreasing
    np.testing.assert_allclose(losses["loss"], -np.log(np.maximum(losses["p_true"], 1e-8)))
    assert set(losses["path"]) <= set(predictions["path"])
    tsne = pd.read_csv(run / "tsne.csv", dtype={"label": str})
    assert sorted(tsne["path"]) == sorted(predictions["path"])
    assert np.isfinite(tsne[["x", "y"]].to_numpy()).all()


def test_lr_schedule_uses_the_checkpoints_steps_per_epoch(plotted_run):
    run, _, _ = plotted_run
    train = read_spec(run / "model.safetensors").train
    steps = report.steps_per_epoch_from_checkpoints(run, train)
    # tiny_model: 100 training clips in batches of 16, the last partial batch dropped.
    assert steps == {2: 100 // 16}


def test_lr_schedule_without_checkpoints_and_lr_finder_data(plotted_run, tmp_path):
    run, _, _ = plotted_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints", "*.png"))
    train = read_spec(copy / "model.safetensors").train
    assert report.steps_per_epoch_from_checkpoints(copy, train) is None
    lrs = np.logspace(-6, 0, 40)
    pd.DataFrame({"lr": lrs, "loss": 3 - np.tanh(np.log10(lrs) + 3), "suggestion": 1e-3}).to_csv(
        copy / "lr_find.csv", index=False
    )
    data = {}
    figures = dict(report.run_figures(copy, names=["lr_schedule", "lr_find"], data=data))
    assert set(figures) == {"lr_schedule", "lr_find"}
    assert "unknown" in figures["lr_schedule"].axes[0].get_title()
    assert len(data["lr_schedule"]) == 100 * train["stage2_epochs"]


def test_embeddings_average_each_clips_windows(plotted_run):
    from soundsight.prediction import Classifier

    run, cache, _ = plotted_run
    classifier = Classifier.load(run / "model.safetensors")
    rng = np.random.default_rng(0)
    short = rng.uniform(-80, 0, (classifier.features.n_mels, 20)).astype(np.float32)
    long = rng.uniform(-80, 0, (classifier.features.n_mels, 200)).astype(np.float32)
    together = report.clip_embeddings(classifier, [short, long])
    apart = np.concatenate([report.clip_embeddings(classifier, [x]) for x in (short, long)])
    assert together.shape == (2, apart.shape[1])
    np.testing.assert_allclose(together, apart, rtol=0.05, atol=0.05)  # bf16 tolerance


def test_plots_are_redone_when_the_results_change(plotted_run, tmp_path, monkeypatch):
    run, cache, _ = plotted_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("checkpoints"))
    assert plots_are_current(copy)
    replotted = []
    monkeypatch.setattr(report.plotting, "plot_run", lambda *args: replotted.append(args))
    write_report(copy, cache)
    assert not replotted  # up to date: the report reuses the PNGs
    history = copy / "history.csv"
    stat = history.stat()
    os.utime(history, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**10))
    assert not plots_are_current(copy)
    write_report(copy, cache)
    assert replotted == [(copy, cache, False)]
    os.utime(history, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert plots_are_current(copy)
    (copy / "tsne.png").unlink()  # a PNG gone: not current either
    assert not plots_are_current(copy)


def test_figures_for_notebooks(plotted_run):
    from matplotlib.figure import Figure

    run, cache, _ = plotted_run
    figures = report.figures(run, cache, names=["history", "confusion", "top_losses"])
    assert set(figures) == {"history", "confusion", "top_losses"}
    assert all(isinstance(f, Figure) for f in figures.values())


SOURCES = re.compile(r"""(?:src|href)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)


def assert_self_contained(html: str) -> None:
    for source in SOURCES.findall(html):
        assert source.startswith(("data:", "#")), f"external reference: {source[:80]}"
    assert "@import" not in html and "url(" not in html


def test_report_is_one_self_contained_file(plotted_run):
    run, cache, _ = plotted_run
    path = write_report(run, cache)
    assert path == run / "report.html"
    html = path.read_text(encoding="utf-8")
    assert_self_contained(html)
    assert html.count("<img ") == len(EXPECTED)
    assert html.count("<audio ") == len(pd.read_csv(run / "top_losses.csv"))
    for text in ("Configuration", "training recipe", "Most-confused pairs", "Top losses", "t-SNE"):
        assert text in html
    assert f"{read_spec(run / 'model.safetensors').metrics['accuracy']:.4f}" in html


def test_report_of_an_evaluation_folder_without_model_or_audio(plotted_run, tmp_path):
    """``evaluate --out`` folders hold only CSVs; clips may have moved away."""
    run, cache, _ = plotted_run
    folder = tmp_path / "evaluation"
    folder.mkdir()
    for name in ("valid_predictions.csv", "confusion.csv", "per_class.csv", "most_confused.csv"):
        shutil.copy(run / name, folder / name)
    predictions = pd.read_csv(folder / "valid_predictions.csv", dtype={"label": str})
    predictions["path"] = [str(tmp_path / "gone" / Path(p).name) for p in predictions["path"]]
    predictions.to_csv(folder / "valid_predictions.csv", index=False)
    html = write_report(folder, cache).read_text()
    assert_self_contained(html)
    assert "audio file unreadable" in html
    assert {p.stem for p in folder.glob("*.png")} == {"confusion", "per_class", "top_losses"}


#: Labels that pandas' defaults turn into NaN (NA, null) or numbers (0, 01), a
#: spreadsheet formula, and markup: each must stay its own class, shown as text.
TRICKY_LABELS = ("NA", "null", "0", "01", "=1+1", "<b>x</b>")
#: A clip file name that is markup.
TRICKY_NAME = "<img src=x onerror=alert(1)>.wav"


@pytest.fixture(scope="module")
def tricky_run(tmp_path_factory, fsdd_clips) -> tuple[Path, list[str]]:
    """An ``evaluate --out`` style folder, written by training's own ``write_metrics``,
    whose labels are :data:`TRICKY_LABELS` (two real FSDD clips each, one of them
    named :data:`TRICKY_NAME`), some clips misclassified: ``(folder, clip paths)``."""
    from soundsight.evaluation import score
    from soundsight.training import write_metrics

    folder = tmp_path_factory.mktemp("tricky")
    paths = [str(p) for p in fsdd_clips[: 2 * len(TRICKY_LABELS)]]
    (folder / TRICKY_NAME).symlink_to(paths[0])
    paths[0] = str(folder / TRICKY_NAME)
    targets = np.repeat(np.arange(len(TRICKY_LABELS)), 2)
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(len(TRICKY_LABELS)), len(paths))
    probabilities[::3, targets[::3]] += 2.0  # every third clip right, the others as drawn
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    metrics = score(probabilities, targets, TRICKY_LABELS)
    write_metrics(folder, metrics, list(TRICKY_LABELS), paths, probabilities, targets)
    return folder, paths


def _per_class_labels(html: str) -> list[str]:
    """The label column of the report's per-class table, unescaped."""
    import html as markup

    table = html.split("<summary>per_class.csv</summary>", 1)[1].split("</table>", 1)[0]
    return [markup.unescape(cell) for cell in re.findall(r"<tr><td>(.*?)</td>", table)]


def test_report_keeps_every_label_a_string_of_its_own(tricky_run, tmp_path):
    folder, paths = tricky_run
    html = write_report(folder, tmp_path / "cache").read_text(encoding="utf-8")
    assert_self_contained(html)
    assert _per_class_labels(html) == list(TRICKY_LABELS)
    run = report.RunData.load(folder)
    assert run.labels == list(TRICKY_LABELS)
    assert run.confusion.shape == (6, 6) and run.confusion.sum() == len(paths)
    confused = set(run.most_confused["true"]) | set(run.most_confused["predicted"])
    assert len(confused) > 1 and confused <= set(TRICKY_LABELS)
    assert len(run.top_losses) == len(paths)
    assert set(run.top_losses["label"]) == set(TRICKY_LABELS)
    assert set(run.top_losses["predicted"]) <= set(TRICKY_LABELS)


def test_report_shows_labels_and_file_names_as_text_not_markup(tricky_run, tmp_path):
    folder, _ = tricky_run
    html = write_report(folder, tmp_path / "cache").read_text(encoding="utf-8")
    assert "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;.wav" in html
    assert html.count("<img ") == len(list(folder.glob("*.png")))  # no injected image


@pytest.mark.parametrize(
    ("name", "subtype", "mime"),
    [
        ("clip.flac", "PCM_16", "audio/flac"),
        ("clip.wav", "PCM_16", "audio/wav"),
        ("double.wav", "DOUBLE", "audio/wav"),  # not playable as is: re-encoded
        ("clip.aiff", "PCM_16", "audio/wav"),
    ],
)
def test_audio_is_embedded_in_a_format_browsers_play(write_audio, make_sine, name, subtype, mime):
    path = write_audio(name, make_sine(440, 0.5, 16000), 16000, subtype=subtype)
    uri = report.audio_uri(path, sample_rate=8000)
    assert uri.startswith(f"data:{mime};base64,")
    data, rate = sf.read(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert len(data) / rate == pytest.approx(0.5, abs=0.01)
    if name == "double.wav":
        assert sf.info(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).subtype == "PCM_16"
    assert report.audio_uri(path.with_name("missing.wav")) is None


@pytest.fixture(scope="module")
def cv_folder(plotted_run, tmp_path_factory) -> Path:
    """A cv output folder made of two copies of the plotted run (plots kept current)."""
    run, _, _ = plotted_run
    folder = tmp_path_factory.mktemp("cv")
    folds = []
    for k in range(2):
        shutil.copytree(run, folder / f"fold{k}", ignore=shutil.ignore_patterns("checkpoints"))
        metrics = json.loads((run / "metrics.json").read_text())
        folds.append({"fold": k, **metrics})
    frame = pd.DataFrame(folds)
    summary = {
        "folds": folds,
        "mean": frame.drop(columns="fold").mean().to_dict(),
        "std": frame.drop(columns="fold").std(ddof=0).to_dict(),
    }
    (folder / "cv.json").write_text(json.dumps(summary))
    return folder


def test_cv_report_has_the_summary_and_a_section_per_fold(cv_folder, plotted_run):
    _, cache, _ = plotted_run
    assert report.is_cv_folder(cv_folder)
    html = write_report(cv_folder, cache).read_text()
    assert_self_contained(html)
    assert "Cross-validation" in html
    assert "id='fold0'" in html and "id='fold1'" in html
    assert (cv_folder / "cv_summary.png").is_file()
    assert html.count("<img ") == 1 + 2 * len(EXPECTED)


def test_cli_report_and_show_batch(plotted_run, fsdd_subset, tmp_path, run_cli):
    run, cache, _ = plotted_run
    code, out, err = run_cli("report", run, "--cache", cache)
    assert code == 0, err
    assert str(run / "report.html") in out
    png = tmp_path / "batch.png"
    code, out, err = run_cli("show-batch", fsdd_subset, "--out", png, "--n", "6", "--cols", "3")
    assert code == 0, err
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 300
    code, _, err = run_cli("report", tmp_path / "missing")
    assert code == 2 and "not found" in err


# ------------------------------------------------------------------------ Chromium


AUDIO_STATE = """async () => Promise.all(Array.from(document.querySelectorAll('audio')).map(a =>
  new Promise(resolve => {
    const source = a.querySelector('source');
    const done = () => resolve({
      id: a.id, ready: a.readyState, duration: a.duration,
      error: a.error ? a.error.code : null, source: a.currentSrc.slice(0, 24),
      playable: a.canPlayType(source ? source.type : ''),
    });
    if (a.readyState >= 1 || a.error) return done();
    a.addEventListener('loadedmetadata', done);
    a.addEventListener('error', done, true);
    a.load();
    setTimeout(done, 15000);
  })))"""


def check_in_chromium(browser, path: Path, screenshot: Path) -> None:
    fetched = []
    page = browser.new_page(viewport={"width": 1280, "height": 1000})

    def route(request_route):
        url = request_route.request.url
        if url.startswith(("file:", "data:")):
            request_route.continue_()
        else:
            fetched.append(url)
            request_route.abort()

    page.route("**/*", route)
    page.goto(path.resolve().as_uri(), wait_until="load")
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
    )
    audio = page.evaluate(AUDIO_STATE)
    page.screenshot(path=str(screenshot), full_page=True)
    page.close()
    assert not fetched, f"the report fetched {fetched}"
    assert images, "no images in the report"
    for alt, complete, width in images:
        assert complete and width > 0, f"image {alt!r} did not load"
    assert audio, "no audio players in the report"
    for player in audio:
        assert player["source"].startswith("data:audio/"), player
        assert player["playable"] in ("maybe", "probably"), player
        assert player["error"] is None and player["ready"] >= 1, player
        assert player["duration"] > 0, player
    with Image.open(screenshot) as image:
        pixels = np.asarray(image.convert("L"), float)
    assert pixels.shape[0] > 2000  # the whole page, not one screen
    assert pixels.std() > 20, "the screenshot is blank"
    assert (pixels < 128).mean() > 0.02, "the screenshot is nearly all white"


def test_report_in_headless_chromium(chromium, plotted_run, tmp_path):
    run, cache, _ = plotted_run
    check_in_chromium(chromium, write_report(run, cache), tmp_path / "report.png")


def test_cv_report_in_headless_chromium(chromium, cv_folder, plotted_run, tmp_path):
    _, cache, _ = plotted_run
    check_in_chromium(chromium, write_report(cv_folder, cache), tmp_path / "cv_report.png")

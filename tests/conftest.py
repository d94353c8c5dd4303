"""Shared fixtures: the real datasets in ../shared/datasets, small real subsets of
them (symlinked, never copied), and generated clips (sines, noise, broken files)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"

FSDD_SPEAKERS = ("george", "jackson", "lucas", "nicolas", "theo", "yweweler")
#: 20 real FSDD clips: two per digit, different speakers and indices (test and train side).
FSDD_SAMPLE = tuple(
    name
    for digit in range(10)
    for name in (
        f"{digit}_{FSDD_SPEAKERS[digit % 6]}_{digit % 5}.wav",
        f"{digit}_{FSDD_SPEAKERS[(digit + 3) % 6]}_{10 + 3 * digit}.wav",
    )
)
#: Rows of ESC-50's meta/esc50.csv taken into the small ESC subset.
ESC_SAMPLE_ROWS = 10
#: ESC-50 classes and clips per class of the five-class subset (:func:`esc_five`).
ESC_FIVE_CLASSES = ("airplane", "breathing", "brushing_teeth", "can_opening", "car_horn")
ESC_FIVE_PER_CLASS = 8


@pytest.fixture(autouse=True)
def _torch_threads_restored() -> Iterator[None]:
    """Put torch's process-wide thread count back after each test: serving sets it to
    one per worker, and a test that loads a model for serving must not change the
    numerics (and so the small trained models) of every test after it."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not (DATASETS / "fsdd").is_dir() or not (DATASETS / "esc50-fold2").is_dir():
        pytest.skip(f"real datasets not found at {DATASETS} (see its README.md)")
    return DATASETS


@pytest.fixture(scope="session")
def fsdd_dir(datasets_dir: Path) -> Path:
    return datasets_dir / "fsdd"


@pytest.fixture(scope="session")
def esc50_dir(datasets_dir: Path) -> Path:
    return datasets_dir / "esc50-fold2"


@pytest.fixture(scope="session")
def fsdd_clips(fsdd_dir: Path) -> list[Path]:
    """The 20 real FSDD files of :data:`FSDD_SAMPLE`."""
    paths = [fsdd_dir / "recordings" / name for name in FSDD_SAMPLE]
    missing = [p for p in paths if not p.is_file()]
    assert not missing, f"FSDD sample files missing: {missing}"
    return paths


@pytest.fixture(scope="session")
def esc_meta(esc50_dir: Path) -> pd.DataFrame:
    """The first :data:`ESC_SAMPLE_ROWS` rows of the real ESC-50 metadata."""
    return pd.read_csv(esc50_dir / "meta" / "esc50.csv", dtype=str).head(ESC_SAMPLE_ROWS)


@pytest.fixture(scope="session")
def esc_clips(esc50_dir: Path, esc_meta: pd.DataFrame) -> list[Path]:
    return [esc50_dir / "audio" / name for name in esc_meta["filename"]]


def _link(target: Path, link: Path) -> Path:
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


@pytest.fixture(scope="session")
def fsdd_subset(tmp_path_factory, fsdd_clips: list[Path]) -> Path:
    """Folder-per-class dataset (``<digit>/<name>.wav``) of symlinks to 20 real clips.

    Shared by the whole session: treat it as read-only.
    """
    root = tmp_path_factory.mktemp("fsdd_subset")
    for clip in fsdd_clips:
        _link(clip, root / clip.name.split("_")[0] / clip.name)
    return root


@pytest.fixture(scope="session")
def esc_subset(tmp_path_factory, esc50_dir: Path, esc_meta: pd.DataFrame) -> Path:
    """ESC-50 layout (``meta/esc50.csv`` trimmed to 10 rows + ``audio/`` symlinks).

    Shared by the whole session: treat it as read-only.
    """
    return _esc_layout(tmp_path_factory.mktemp("esc_subset"), esc50_dir, esc_meta)


@pytest.fixture(scope="session")
def esc_five(tmp_path_factory, esc50_dir: Path) -> Path:
    """ESC-50 layout of symlinks: the first 8 fold-2 clips of 5 classes (40 clips,
    grouped by source file as ESC-50 is).

    Shared by the whole session: treat it as read-only.
    """
    meta = pd.read_csv(esc50_dir / "meta" / "esc50.csv", dtype=str)
    rows = pd.concat(
        [meta[meta["category"] == c].head(ESC_FIVE_PER_CLASS) for c in ESC_FIVE_CLASSES]
    )
    return _esc_layout(tmp_path_factory.mktemp("esc_five"), esc50_dir, rows)


def _esc_layout(root: Path, esc50_dir: Path, rows: pd.DataFrame) -> Path:
    """``root`` as an ESC-50 folder of ``rows``: their metadata and audio symlinks."""
    (root / "meta").mkdir()
    rows.to_csv(root / "meta" / "esc50.csv", index=False)
    for name in rows["filename"]:
        _link(esc50_dir / "audio" / name, root / "audio" / name)
    return root


def sine(freq: float, seconds: float, sr: int, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


@pytest.fixture
def write_audio(tmp_path: Path) -> Callable[..., Path]:
    """``write_audio(name, data, sr, **soundfile_kwargs)`` -> path under tmp_path."""

    def write(name: str, data: np.ndarray, sr: int, **kwargs) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, data, sr, **kwargs)
        return path

    return write


@pytest.fixture
def make_sine() -> Callable[..., np.ndarray]:
    """``make_sine(freq, seconds, sr, amp=0.5)`` -> float32 waveform."""
    return sine


#: Broken clips made by :func:`make_bad_clips`: name -> expected words of the reason.
BAD_CLIPS = {
    "empty.wav": "file is empty (0 bytes)",
    "header_only.wav": "no audio samples",
    "text.wav": "not a readable audio file",
    "nan.wav": "contains NaN or infinite samples",
    "inf.wav": "contains NaN or infinite samples",
    "truncated.flac": "not a readable audio file",
}


def _make_bad_clips(folder: Path, real_wav: Path, real_flac: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in BAD_CLIPS}
    paths["empty.wav"].write_bytes(b"")
    sf.write(paths["header_only.wav"], np.zeros(0, np.float32), 8000, subtype="PCM_16")
    paths["text.wav"].write_text("this is a text file, not a WAV\n" * 20)
    wave = sine(440, 0.5, 8000)
    wave[100] = np.nan
    sf.write(paths["nan.wav"], wave, 8000, subtype="FLOAT")
    wave = sine(440, 0.5, 8000)
    wave[200] = np.inf
    sf.write(paths["inf.wav"], wave, 8000, subtype="DOUBLE")
    data = real_flac.read_bytes()
    paths["truncated.flac"].write_bytes(data[: len(data) // 2])
    # A WAV cut in the middle still holds its first half: it decodes (not a failure).
    data = real_wav.read_bytes()
    (folder / "truncated_ok.wav").write_bytes(data[: len(data) // 2])
    return paths


@pytest.fixture
def make_bad_clips(fsdd_clips, esc_clips) -> Callable[[Path], dict[str, Path]]:
    """``make_bad_clips(folder)`` writes :data:`BAD_CLIPS` (plus ``truncated_ok.wav``,
    a real WAV cut in half, which decodes) and returns name -> path of the bad ones."""
    return lambda folder: _make_bad_clips(folder, fsdd_clips[0], esc_clips[0])


@pytest.fixture
def bad_clip_reasons() -> dict[str, str]:
    return dict(BAD_CLIPS)


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Run ``soundsight`` in this process: ``run_cli(*args) -> (code, stdout, stderr)``."""
    from soundsight.cli import main

    # main() sets process-wide warning formatting; keep it to this test.
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        with warnings.catch_warnings():
            try:
                code = main([str(a) for a in args])
            except SystemExit as exit_:
                code = exit_.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


#: Clips per digit in the training and validation sets of :func:`tiny_model`.
TINY_MODEL_TRAIN_PER_DIGIT = 10
TINY_MODEL_VALID_PER_DIGIT = 3


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, fsdd_dir: Path) -> Path:
    """Path of a small FSDD digit model trained once per session (~100 real clips,
    one epoch: tens of seconds on 2 cores). It works but is not accurate: tests may rely
    on its file format, labels and determinism, not on its predictions being right.

    Shared by the whole session: treat it as read-only.
    """
    from soundsight import load_dataset
    from soundsight.training import TrainConfig, train

    def pick(split: str, per_digit: int) -> pd.DataFrame:
        table = load_dataset(fsdd_dir, "fsdd", split).sort_values("path")
        # Every speaker in each digit (round-robin over the sorted files), not just the
        # first speaker alphabetically.
        table = table.assign(rank=table.groupby(["label", "group"]).cumcount())
        table = table.sort_values(["rank", "path"]).groupby("label").head(per_digit)
        return table.drop(columns="rank").sort_values("path").reset_index(drop=True)

    root = tmp_path_factory.mktemp("tiny_model")
    result = train(
        pick("train", TINY_MODEL_TRAIN_PER_DIGIT),
        root / "run",
        valid=pick("test", TINY_MODEL_VALID_PER_DIGIT),
        config=TrainConfig(stage1_epochs=0, stage2_epochs=1, batch_size=16),
        cache=root / "cache",
        progress=False,
    )
    assert result.model_path.is_file()
    return result.model_path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory, tiny_model: Path) -> Path:
    """:func:`tiny_model` exported by ``soundsight export`` (front end in the graph),
    once per session; read-only."""
    from soundsight.export import export_onnx

    return export_onnx(tiny_model, tmp_path_factory.mktemp("tiny_onnx") / "model.onnx")


#: Debian's Chromium (scripts/install-system-deps.sh); Playwright drives it, never its
#: own downloaded browser. The flags keep it from reaching for the network.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def require_browser(chromium: Path = CHROMIUM):
    """Playwright's sync API, or skip; under CI=true a missing browser is a failure."""
    problems = []
    if not chromium.is_file():
        problems.append(f"{chromium} missing (run scripts/install-system-deps.sh)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
        problems.append("playwright not installed (pip install -e '.[dev]')")
    if problems:
        message = "; ".join(problems)
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"browser test cannot run in CI: {message}")
        pytest.skip(message)
    return sync_playwright


@pytest.fixture
def chromium() -> Iterator:
    """A headless Chromium browser (Playwright), closed after the test."""
    sync_playwright = require_browser()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


#: Test modules that train models throughout (minutes on 2 cores).
TRAINING_MODULES = {"test_training", "test_distributed", "test_hostile_training"}


def pytest_collection_modifyitems(config, items):
    """Mark every test that trains (a training module, or one that needs the session's
    tiny model) as ``slow``: ``make test-fast`` runs the rest, for the inner loop."""
    for item in items:
        needs_model = {"tiny_model", "tiny_onnx"} & set(item.fixturenames)
        if item.module.__name__ in TRAINING_MODULES or needs_model:
            item.add_marker(pytest.mark.slow)


#: What predicting or serving an .onnx model must never import.
HEAVY = ("torch", "timm", "lightning", "librosa", "matplotlib", "sklearn", "scipy", "PIL")


def run_without_heavy_modules(code: str) -> None:
    """Run ``code`` in a fresh Python where every import of :data:`HEAVY` fails, and
    check that none of them got loaded by the end."""
    blocker = f"""
        import sys
        class Blocker:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {HEAVY!r}:
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Blocker())
        """
    check = f"""
        loaded = [m for m in {HEAVY!r} if m in sys.modules]
        assert not loaded, loaded
        """
    source = "".join(textwrap.dedent(part) for part in (blocker, code, check))
    result = subprocess.run(
        [sys.executable, "-c", source], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr

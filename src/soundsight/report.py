"""What a run learned: its plots as PNGs, and one self-contained HTML report.

:func:`plot_run` writes the interpretation plots of a run folder (``train``) or of
each fold of a cross-validation folder (``cv``) next to the run's CSVs;
:func:`write_report` writes ``report.html``, a single file with every image and the
top-loss clips' audio embedded as data URIs (it fetches nothing), plus the run's
config, metrics tables and most-confused pairs. :func:`run_figures` gives the same
plots as matplotlib figures, for notebooks.

Files written into a run folder::

    history.png          train/valid loss and error per epoch, both stages
    lr_schedule.png      one-cycle learning rates per step (see below)
    confusion.png        row-normalised confusion matrix, sorted by recall
    per_class.png        precision / recall / F1 per class
    top_losses.png       the worst validation clips: spectrogram, labels, p, loss
    top_losses.csv       the same clips as data
    tsne.png             t-SNE of penultimate embeddings, coloured by label
    tsne_thumbnails.png  spectrogram thumbnails at the t-SNE positions
    tsne.csv             path, label, x, y
    plots.json           what was plotted, from which inputs (to skip redoing it)
    report.html          (write_report)

``lr_find.png`` is training's own (``--lr auto``); when ``lr_find.csv`` (columns
``lr``, ``loss``, and the suggestion in ``suggestion``) is present it is redrawn with
:func:`soundsight.plots.plot_lr_find`.

The learning-rate schedule is reconstructed, not recorded: it is deterministic given
the recipe in the model file (peak rates after any LR finder, epochs per stage) and
the number of optimiser steps per epoch, which is read from the stage's Lightning
checkpoint (its OneCycleLR state holds ``total_steps``). Without checkpoints the
steps per epoch are unknown; the curve is then drawn with 100 steps per epoch, which
is the same shape on the epoch axis (one-cycle phases are fractions of the stage).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from . import plots
from .audio import AudioError, load_clip
from .cache import DEFAULT_CACHE, CacheError, FeatureCache
from .config import config_from_dict
from .errors import ConfigError
from .features import FeatureConfig, LogMel

#: PNGs of a run folder, in report order.
RUN_PLOTS = (
    "history",
    "lr_schedule",
    "lr_find",
    "confusion",
    "per_class",
    "top_losses",
    "tsne",
    "tsne_thumbnails",
)
#: Validation clips shown in the top-losses figure (and playable in the report).
TOP_LOSSES = 12
#: Most clips in the t-SNE plots (a stratified sample beyond), and most thumbnails.
MAX_TSNE_CLIPS = 2000
MAX_THUMBNAILS = 600
#: Thumbnail side in pixels on the t-SNE canvas.
THUMBNAIL = 40
#: PNG resolution.
DPI = 110
#: Embedded as they are (Chromium, Firefox and Safari play these); other audio, or
#: files above :data:`MAX_RAW_AUDIO` bytes, is re-encoded as 16-bit WAV.
AUDIO_MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}
PLAYABLE_WAV = {"PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT"}
MAX_RAW_AUDIO = 4 << 20
#: Longest audio embedded per clip when re-encoding (seconds).
MAX_AUDIO_SECONDS = 30.0


# ------------------------------------------------------------------------ run data


def read_model_metadata(path: str | os.PathLike) -> dict:
    """The JSON config of a model file, without loading its weights."""
    from safetensors import safe_open

    from .modelfile import METADATA_KEY

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    return json.loads(header[METADATA_KEY]) if METADATA_KEY in header else {}


def _read_csv(path: Path, **options) -> pd.DataFrame | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    try:
        return pd.read_csv(path, **options)
    except pd.errors.EmptyDataError:
        return None


@dataclass
class RunData:
    """The files of one run folder, read (any of them may be missing)."""

    folder: Path
    metadata: dict = field(default_factory=dict)
    labels: list[str] = field(default_factory=list)
    features: FeatureConfig | None = None
    history: pd.DataFrame | None = None
    predictions: pd.DataFrame | None = None
    confusion: np.ndarray | None = None
    per_class: pd.DataFrame | None = None
    most_confused: pd.DataFrame | None = None
    metrics: dict = field(default_factory=dict)
    failures: pd.DataFrame | None = None

    @property
    def model_path(self) -> Path:
        return self.folder / "model.safetensors"

    @classmethod
    def load(cls, folder: str | os.PathLike) -> RunData:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: run folder not found")
        run = cls(folder)
        if run.model_path.is_file():
            run.metadata = read_model_metadata(run.model_path)
        predictions = _read_csv(folder / "valid_predictions.csv", dtype={"label": str})
        if predictions is not None:
            predictions["label"] = predictions["label"].astype(str)
            run.predictions = predictions
            run.labels = [str(c) for c in predictions.columns[2:]]
        elif "labels" in run.metadata:
            run.labels = [str(label) for label in run.metadata["labels"]]
        if "features" in run.metadata:
            run.features = config_from_dict(FeatureConfig, run.metadata["features"])
        run.history = _read_csv(folder / "history.csv")
        confusion = _read_csv(folder / "confusion.csv", index_col=0)
        if confusion is not None:
            run.confusion = confusion.to_numpy()
        elif run.predictions is not None:
            run.confusion = plots.confusion_from_predictions(run.predictions, run.labels)
        run.per_class = _read_csv(folder / "per_class.csv", dtype={"label": str})
        run.most_confused = _read_csv(
            folder / "most_confused.csv", dtype={"true": str, "predicted": str}
        )
        if (folder / "metrics.json").is_file():
            run.metrics = json.loads((folder / "metrics.json").read_text())
        elif "metrics" in run.metadata:
            run.metrics = dict(run.metadata["metrics"])
        run.failures = _read_csv(folder / "failures.csv")
        return run

    def inputs(self) -> dict[str, float]:
        """Modification times of the files the plots are made from."""
        names = ("model.safetensors", "valid_predictions.csv", "history.csv", "lr_find.csv")
        return {
            name: (self.folder / name).stat().st_mtime
            for name in names
            if (self.folder / name).is_file()
        }


def is_cv_folder(folder: str | os.PathLike) -> bool:
    """A ``cv`` output folder: ``cv.json`` and ``fold*/`` run folders."""
    folder = Path(folder)
    return (folder / "cv.json").is_file() and any(folder.glob("fold*/"))


def cv_folds(folder: Path) -> list[Path]:
    folds = [p for p in folder.glob("fold*") if p.is_dir() and p.name[4:].isdigit()]
    return sorted(folds, key=lambda p: int(p.name[4:]))


# ---------------------------------------------------------------- spectrograms, embeddings


class LogMels:
    """Log-mels of clips: from the feature cache when they are in it, else computed
    from the audio (failures give None). Keeps nothing in memory."""

    def __init__(self, features: FeatureConfig, cache: str | os.PathLike | None = None):
        self.features = features
        self.cache = None
        try:
            self.cache = FeatureCache(cache or DEFAULT_CACHE, features)
        except CacheError:
            self.cache = None
        self._logmel: LogMel | None = None

    def __call__(self, path: str) -> np.ndarray | None:
        if self.cache is not None and path in self.cache:
            try:
                return np.asarray(self.cache.load(path), np.float32)
            except (CacheError, OSError, ValueError):
                pass
        try:
            wave = load_clip(path, self.features.sample_rate)
        except AudioError:
            return None
        if self._logmel is None:
            self._logmel = LogMel(self.features)
        with torch.inference_mode():
            return self._logmel(torch.from_numpy(wave)[None])[0].numpy()


def _fast_autocast(device: torch.device):
    """bfloat16 autocast on CPUs with native bf16 (about 2.4x faster on this machine's
    2 cores; ample precision for a t-SNE picture); a no-op elsewhere."""
    fast = device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(fast))


def idle_threads() -> int:
    """torch threads worth using now: the cores not busy with other processes (the
    1-minute load average, this process counted as idle), at most torch's setting.
    On a shared 2-core machine under training load, 2 threads embedded 20 windows/s
    and 1 thread 80-90: threads waiting for a descheduled sibling waste the cores."""
    try:
        load = os.getloadavg()[0]
    except OSError:
        return torch.get_num_threads()
    idle = int((os.cpu_count() or 1) + 1 - load)
    return max(1, min(torch.get_num_threads(), idle))


def clip_embeddings(
    classifier, log_mels: Sequence[np.ndarray], batch_windows: int = 64
) -> np.ndarray:
    """Penultimate embeddings ``(clips, dim)`` of :class:`~soundsight.prediction.Classifier`'s
    network: the mean over each clip's evaluation windows, as its probabilities are."""
    net, view = classifier.net.eval(), classifier.view
    out: list[torch.Tensor] = []
    pending: list[np.ndarray] = []
    counts: list[int] = []

    def flush():
        if not pending:
            return
        x = torch.from_numpy(np.concatenate(pending))[:, None].to(classifier.device)
        with torch.inference_mode(), _fast_autocast(x.device):
            embedded = net.embed(x).float().cpu()
        out.extend(chunk.mean(0) for chunk in embedded.split(counts))
        pending.clear()
        counts.clear()

    threads = torch.get_num_threads()
    torch.set_num_threads(idle_threads())
    try:
        for db in log_mels:
            windows = view.windows(db)
            pending.append(windows)
            counts.append(len(windows))
            if sum(counts) >= batch_windows:
                flush()
        flush()
    finally:
        torch.set_num_threads(threads)
    return torch.stack(out).numpy() if out else np.zeros((0, 0), np.float32)


def _sample(frame: pd.DataFrame, limit: int, seed: int = 0) -> pd.DataFrame:
    """At most ``limit`` rows, every label represented in proportion."""
    if len(frame) <= limit:
        return frame
    fraction = limit / len(frame)
    parts = [
        group.sample(max(1, round(len(group) * fraction)), random_state=seed)
        for _, group in frame.groupby("label", sort=True)
    ]
    return pd.concat(parts).sort_index()


def steps_per_epoch_from_checkpoints(folder: Path, train: dict) -> dict[int, int] | None:
    """Optimiser steps per epoch of each stage, from the stages' last checkpoints
    (their OneCycleLR ``total_steps`` over the stage's epochs)."""
    steps = {}
    for stage, key in ((1, "stage1_epochs"), (2, "stage2_epochs")):
        epochs = int(train.get(key, 0))
        if epochs <= 0:
            continue
        path = folder / "checkpoints" / f"stage{stage}" / "last.ckpt"
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            total = int(state["lr_schedulers"][0]["total_steps"])
        except Exception:  # noqa: BLE001 - any unreadable checkpoint: fall back
            return None
        steps[stage] = max(1, total // epochs)
    return steps or None


# -------------------------------------------------------------------------- figures


def _say(progress: bool, message: str, started: float) -> None:
    if progress:
        print(f"  {message} ({time.perf_counter() - started:.1f} s)", flush=True)


def run_figures(
    run_dir: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    top: int = TOP_LOSSES,
    progress: bool = False,
    data: dict | None = None,
) -> Iterator[tuple[str, Figure]]:
    """Yield ``(name, figure)`` for each plot a run folder has the data for.

    ``names`` limits which (see :data:`RUN_PLOTS`). Embeddings need the model file
    and the clips (from ``cache``, else decoded). ``data``, when given, receives the
    data behind the plots (``top_losses`` frame, ``tsne`` frame, ``lr_schedule``).
    """
    run = RunData.load(run_dir)
    wanted = set(names or RUN_PLOTS)
    data = {} if data is None else data
    started = time.perf_counter()

    if "history" in wanted and run.history is not None and len(run.history):
        yield "history", plots.plot_history(run.history)
        _say(progress, "history", started)

    if "lr_schedule" in wanted and "train" in run.metadata:
        train = run.metadata["train"]
        steps = steps_per_epoch_from_checkpoints(run.folder, train)
        if steps is None:
            steps = {1: 100, 2: 100}
            note = "steps per epoch unknown (no checkpoints): drawn at 100 per epoch"
        else:
            note = ", ".join(f"stage {s}: {n} steps/epoch" for s, n in steps.items())
        schedule = plots.lr_schedule(train, steps)
        data["lr_schedule"] = schedule
        if len(schedule):
            yield "lr_schedule", plots.plot_lr_schedule(schedule, note)
            _say(progress, "learning-rate schedule", started)

    lr_find_csv = run.folder / "lr_find.csv"
    if "lr_find" in wanted and lr_find_csv.is_file():
        frame = pd.read_csv(lr_find_csv)
        suggestion = frame["suggestion"].dropna().iloc[0] if "suggestion" in frame else None
        yield "lr_find", plots.plot_lr_find(frame["lr"], frame["loss"], suggestion)

    if "confusion" in wanted and run.confusion is not None and len(run.labels):
        yield "confusion", plots.plot_confusion(run.confusion, run.labels)
        _say(progress, "confusion matrix", started)

    if "per_class" in wanted and run.per_class is not None and len(run.per_class):
        yield "per_class", plots.plot_per_class(run.per_class)
        _say(progress, "per-class scores", started)

    need_clips = wanted & {"top_losses", "tsne", "tsne_thumbnails"}
    if not need_clips or run.predictions is None or not len(run.predictions):
        return
    features = run.features or FeatureConfig()
    log_mels = LogMels(features, cache)

    if "top_losses" in wanted:
        losses = plots.top_losses(run.predictions, run.labels, top)
        data["top_losses"] = losses
        spectrograms = [log_mels(p) for p in losses["path"]]
        yield "top_losses", plots.plot_top_losses(losses, spectrograms, features)
        _say(progress, "top losses", started)

    if not wanted & {"tsne", "tsne_thumbnails"} or not run.model_path.is_file():
        return
    from .prediction import Classifier

    clips = _sample(run.predictions[["path", "label"]], MAX_TSNE_CLIPS)
    if len(clips) < 5:
        return
    classifier = Classifier.load(run.model_path)
    thumbnails, kept, dbs = [], [], []
    for i, path in enumerate(clips["path"]):
        db = log_mels(path)
        if db is None:
            continue
        dbs.append(db)
        kept.append(i)
        image = plots.colorize(db, features.floor_db, plots.SPECTROGRAM_CMAP)
        thumbnails.append(_resize(image, THUMBNAIL))
    clips = clips.iloc[kept].reset_index(drop=True)
    _say(progress, f"{len(clips)} log-mels", started)
    embeddings = clip_embeddings(classifier, dbs)
    del dbs
    _say(progress, f"embeddings {embeddings.shape}", started)
    positions = plots.tsne_positions(embeddings)
    _say(progress, "t-SNE", started)
    tsne = clips.assign(x=positions[:, 0], y=positions[:, 1])
    data["tsne"] = tsne
    labels = clips["label"].astype(str).tolist()
    if "tsne" in wanted:
        yield "tsne", plots.plot_tsne(None, labels, positions)
    if "tsne_thumbnails" in wanted:
        shown = _sample(tsne, MAX_THUMBNAILS).index.to_numpy()
        yield (
            "tsne_thumbnails",
            plots.plot_tsne_thumbnails(
                positions[shown], [thumbnails[i] for i in shown], [labels[i] for i in shown]
            ),
        )
    _say(progress, "t-SNE plots", started)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))


def figures(
    run_dir: str | os.PathLike, cache: str | os.PathLike | None = None, **options
) -> dict[str, Figure]:
    """Every plot of a run folder as matplotlib figures (for notebooks)."""
    return dict(run_figures(run_dir, cache, **options))


def _save(figure: Figure, path: Path) -> Path:
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    figure.savefig(tmp, dpi=DPI, facecolor="white")
    os.replace(tmp, path)
    figure.clear()
    return path


def _plot_one_run(folder: Path, cache, progress: bool) -> list[Path]:
    data: dict = {}
    written = []
    for name, figure in run_figures(folder, cache, progress=progress, data=data):
        written.append(_save(figure, folder / f"{name}.png"))
    if "top_losses" in data:
        data["top_losses"].to_csv(folder / "top_losses.csv", index=False)
    if "tsne" in data:
        data["tsne"].to_csv(folder / "tsne.csv", index=False)
    if (folder / "lr_find.png").is_file() and folder / "lr_find.png" not in written:
        written.append(folder / "lr_find.png")  # training's own
    manifest = {
        "plots": [p.name for p in written],
        "inputs": RunData.load(folder).inputs(),
        "made": datetime.now().isoformat(timespec="seconds"),
    }
    (folder / "plots.json").write_text(json.dumps(manifest, indent=2))
    return written


def plots_are_current(folder: str | os.PathLike) -> bool:
    """Whether ``plots.json`` exists, its PNGs too, and no input changed since."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "plots.json").read_text())
    except (OSError, ValueError):
        return False
    if not all((folder / name).is_file() for name in manifest.get("plots", [])):
        return False
    return manifest.get("inputs") == RunData.load(folder).inputs()


def plot_run(
    run_dir: str | os.PathLike, cache: str | os.PathLike | None = None, progress: bool = False
) -> list[Path]:
    """Write the interpretation PNGs of a run folder and return their paths.

    For a ``cv`` folder, each ``fold*/`` run whose plots are missing or older than its
    results is plotted, and ``cv_summary.png`` (scores per fold) is written beside
    ``cv.json``. ``cache`` is the feature cache (default: training's default); clips
    not in it are decoded. Safe to call again: PNGs are replaced atomically.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: run folder not found")
    if not is_cv_folder(folder):
        if progress:
            print(f"plotting {folder}", flush=True)
        return _plot_one_run(folder, cache, progress)
    written = []
    for fold in cv_folds(folder):
        if plots_are_current(fold):
            manifest = json.loads((fold / "plots.json").read_text())
            written.extend(fold / name for name in manifest["plots"])
        else:
            if progress:
                print(f"plotting {fold}", flush=True)
            written.extend(_plot_one_run(fold, cache, progress))
    summary = json.loads((folder / "cv.json").read_text())
    written.append(
        _save(plots.plot_cv_summary(pd.DataFrame(summary["folds"])), folder / "cv_summary.png")
    )
    return written


# --------------------------------------------------------------------------- report

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', 'DejaVu Sans', sans-serif;
       margin: 0 auto; max-width: 1200px; padding: 1rem 2rem 4rem; color: #1a1a1a;
       line-height: 1.45; }
h1 { margin-bottom: 0.2rem; } h2 { border-bottom: 2px solid #0072B2; padding-bottom: 0.2rem;
     margin-top: 2.5rem; } h3 { margin-top: 1.8rem; }
.sub { color: #555; font-size: 0.9rem; margin-top: 0; }
img.plot { max-width: 100%; height: auto; border: 1px solid #ddd; margin: 0.5rem 0; }
table { border-collapse: collapse; font-size: 0.88rem; margin: 0.5rem 0; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #eef3f8; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.configs { display: flex; flex-wrap: wrap; gap: 1.5rem; align-items: flex-start; }
.metrics td { font-size: 1.05rem; }
nav a { margin-right: 1rem; } details { margin: 0.8rem 0; }
summary { cursor: pointer; font-weight: 600; }
.wrong { color: #D55E00; font-weight: 600; } .right { color: #009E73; font-weight: 600; }
audio { height: 2.2rem; vertical-align: middle; }
.note { color: #555; font-size: 0.88rem; }
"""


def _png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def audio_uri(path: str | os.PathLike, sample_rate: int = 22050) -> str | None:
    """A ``data:`` URI of a clip that browsers play: the file's own bytes for WAV
    (browser-playable sample formats), FLAC, OGG and MP3 up to 4 MB; otherwise the
    clip decoded (first 30 s, at ``sample_rate``) and encoded as 16-bit WAV.
    None when the file cannot be read."""
    import soundfile as sf

    path = Path(path)
    mime = AUDIO_MIME.get(path.suffix.lower())
    try:
        size = path.stat().st_size
        if mime == "audio/wav" and sf.info(str(path)).subtype not in PLAYABLE_WAV:
            mime = None
        if mime is not None and 0 < size <= MAX_RAW_AUDIO:
            return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")
        wave = load_clip(path, sample_rate, MAX_AUDIO_SECONDS)
    except (OSError, RuntimeError, AudioError):
        return None
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, format="WAV", subtype="PCM_16")
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _table(frame: pd.DataFrame, floats: str = "{:.4f}", **options) -> str:
    formatters = {
        column: (lambda v, f=floats: "" if pd.isna(v) else f.format(v))
        for column in frame.columns
        if pd.api.types.is_float_dtype(frame[column])
    }
    return frame.to_html(index=False, border=0, formatters=formatters, escape=True, **options)


def _config_table(title: str, config: dict) -> str:
    rows = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>"
        for k, v in config.items()
    )
    return f"<table><caption><b>{html.escape(title)}</b></caption>{rows}</table>"


def _image(folder: Path, name: str, alt: str) -> str:
    path = folder / f"{name}.png"
    if not path.is_file():
        return ""
    return f'<img class="plot" src="{_png_uri(path)}" alt="{html.escape(alt)}">'


def _metrics_table(metrics: dict) -> str:
    names = {"clips": "clips", "accuracy": "accuracy", "error_rate": "error rate", "map3": "MAP@3"}
    cells = []
    for key, name in names.items():
        if key in metrics:
            value = metrics[key]
            text = f"{value:.4f}" if isinstance(value, float) else str(value)
            cells.append(f"<th>{name}</th><td class='num'>{text}</td>")
    return f"<table class='metrics'><tr>{''.join(cells)}</tr></table>"


def _top_losses_section(run: RunData, prefix: str) -> str:
    path = run.folder / "top_losses.csv"
    losses = _read_csv(path, dtype={"label": str, "predicted": str})
    if losses is None:
        return ""
    sample_rate = run.features.sample_rate if run.features else 22050
    rows = []
    for rank, row in enumerate(losses.itertuples(index=False), 1):
        uri = audio_uri(row.path, sample_rate)
        if uri is None:
            player = "<span class='note'>audio file unreadable</span>"
        else:
            mime = uri[5 : uri.index(";")]
            player = (
                f"<audio controls preload='metadata' id='{prefix}audio{rank}'>"
                f"<source src='{uri}' type='{mime}'>your browser cannot play {mime}</audio>"
            )
        verdict = "right" if row.predicted == row.label else "wrong"
        rows.append(
            f"<tr><td class='num'>{rank}</td><td>{html.escape(Path(row.path).name)}</td>"
            f"<td>{html.escape(row.label)}</td>"
            f"<td class='{verdict}'>{html.escape(row.predicted)}</td>"
            f"<td class='num'>{row.p_predicted:.3f}</td><td class='num'>{row.p_true:.3f}</td>"
            f"<td class='num'>{row.loss:.3f}</td><td>{player}</td></tr>"
        )
    head = (
        "<tr><th>#</th><th>clip</th><th>true label</th><th>predicted</th><th>p(predicted)</th>"
        "<th>p(true)</th><th>loss</th><th>listen</th></tr>"
    )
    return f"<table>{head}{''.join(rows)}</table>"


def _run_section(folder: Path, prefix: str = "", level: int = 2) -> str:
    """The report body of one run folder (headings at ``level``)."""
    run = RunData.load(folder)
    h, hh = f"h{level}", f"h{level + 1}"
    parts = [f"<{h} id='{prefix}summary'>Summary</{h}>", _metrics_table(run.metrics)]
    if run.failures is not None and len(run.failures):
        parts.append(
            f"<p class='note'>{len(run.failures)} clips could not be decoded and were left out:</p>"
            + _table(run.failures.head(50))
        )
    if run.metadata:
        configs = [
            _config_table(title, run.metadata[key])
            for key, title in (
                ("train", "training recipe"),
                ("model", "model"),
                ("features", "log-mel features"),
            )
            if key in run.metadata
        ]
        parts.append(f"<{h} id='{prefix}config'>Configuration</{h}>")
        parts.append(f"<div class='configs'>{''.join(configs)}</div>")
        labels = ", ".join(html.escape(str(label)) for label in run.metadata.get("labels", []))
        parts.append(
            f"<details><summary>{len(run.labels)} labels</summary><p>{labels}</p></details>"
        )

    parts.append(f"<{h} id='{prefix}training'>Training</{h}>")
    parts.append(_image(folder, "history", "loss and error rate per epoch"))
    if run.history is not None:
        parts.append(f"<details><summary>history.csv</summary>{_table(run.history)}</details>")
    parts.append(_image(folder, "lr_schedule", "learning-rate schedule"))
    if (folder / "lr_find.png").is_file():
        parts.append(f"<{hh}>Learning-rate finder</{hh}>")
        parts.append(
            _image(folder, "lr_find", "learning-rate range test with the suggestion marked")
        )

    parts.append(f"<{h} id='{prefix}errors'>What it gets wrong</{h}>")
    parts.append(_image(folder, "confusion", "confusion matrix"))
    if run.most_confused is not None:
        shown = run.most_confused.head(25)
        parts.append(
            f"<{hh}>Most-confused pairs (true → predicted)</{hh}>"
            + (_table(shown) if len(shown) else "<p>None: every validation clip was right.</p>")
        )
        if len(run.most_confused) > len(shown):
            parts.append(
                f"<p class='note'>{len(shown)} of {len(run.most_confused)} pairs shown.</p>"
            )
    parts.append(f"<{hh}>Per-class scores</{hh}>")
    parts.append(_image(folder, "per_class", "precision, recall and F1 per class"))
    if run.per_class is not None:
        parts.append(f"<details><summary>per_class.csv</summary>{_table(run.per_class)}</details>")

    parts.append(f"<{h} id='{prefix}top-losses'>Top losses: listen to what it got wrong</{h}>")
    parts.append(_image(folder, "top_losses", "the validation clips with the largest loss"))
    parts.append(_top_losses_section(run, prefix))

    if (folder / "tsne.png").is_file():
        parts.append(f"<{h} id='{prefix}embeddings'>What it learned: embeddings</{h}>")
        parts.append(
            "<p class='note'>t-SNE of the penultimate-layer embeddings (each clip's windows "
            "averaged). Nearby points are clips the network represents alike.</p>"
        )
        parts.append(_image(folder, "tsne", "t-SNE of embeddings coloured by label"))
        parts.append(_image(folder, "tsne_thumbnails", "spectrogram thumbnails at t-SNE positions"))
    return "\n".join(p for p in parts if p)


def _page(title: str, subtitle: str, nav: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p class="sub">{subtitle}</p>
<nav>{nav}</nav>
{body}
</body>
</html>
"""


def write_report(
    run_dir: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    replot: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``RUN/report.html``, one self-contained file, and return its path.

    Plots are made first when missing or older than the run's results (or always,
    with ``replot``). For a ``cv`` folder the report holds the per-fold summary table
    and plot, then one section per fold (the first one open, the others folded) with
    everything a single run's report has.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: run folder not found")
    cv = is_cv_folder(folder)
    folds = cv_folds(folder) if cv else [folder]
    if (
        replot
        or not all(plots_are_current(f) for f in folds)
        or (cv and not (folder / "cv_summary.png").is_file())
    ):
        plot_run(folder, cache, progress)
    made = datetime.now().strftime("%Y-%m-%d %H:%M")
    subtitle = f"{html.escape(str(folder.resolve()))} · generated {made} by soundsight"
    if not cv:
        sections = ("summary", "config", "training", "errors", "top-losses", "embeddings")
        nav = " ".join(f"<a href='#{s}'>{s.replace('-', ' ')}</a>" for s in sections)
        page = _page(f"soundsight report: {folder.name}", subtitle, nav, _run_section(folder))
    else:
        summary = json.loads((folder / "cv.json").read_text())
        frame = pd.DataFrame(summary["folds"])
        mean_std = pd.DataFrame(
            [
                {"": "mean", **summary["mean"]},
                {"": "std", **summary["std"]},
            ]
        )
        body = [
            "<h2 id='cv'>Cross-validation</h2>",
            _table(frame),
            _table(mean_std),
            _image(folder, "cv_summary", "scores per fold"),
        ]
        for i, fold in enumerate(folds):
            body.append(
                f"<details id='{fold.name}' {'open' if i == 0 else ''}><summary>"
                f"<h2 style='display:inline'>{html.escape(fold.name)}</h2></summary>"
                f"{_run_section(fold, prefix=f'{fold.name}-', level=3)}</details>"
            )
        nav = "<a href='#cv'>summary</a> " + " ".join(
            f"<a href='#{f.name}'>{f.name}</a>" for f in folds
        )
        page = _page(
            f"soundsight cross-validation report: {folder.name}", subtitle, nav, "\n".join(body)
        )
    target = folder / "report.html"
    tmp = target.with_name(f".report.{os.getpid()}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target


# ----------------------------------------------------------------------- show-batch


def batch_figure(
    clips: pd.DataFrame,
    features: FeatureConfig | None = None,
    n: int = 16,
    cols: int | None = None,
    seed: int = 0,
    cache: str | os.PathLike | None = None,
    names: bool = False,
) -> Figure:
    """A grid of ``n`` random clips' log-mels with their labels (``show-batch``).

    ``clips`` is a dataset table (:func:`soundsight.load_dataset`); clips that cannot
    be decoded are skipped. Log-mels come from ``cache`` when there, else are computed.
    """
    features = features or FeatureConfig()
    if not len(clips):
        raise ConfigError("the dataset has no clips")
    sample = clips.sample(min(n, len(clips)), random_state=seed)
    sample = sample.assign(label=sample["label"].astype("string").fillna("(no label)"))
    sample = sample.sort_values(["label", "path"])
    log_mels = LogMels(features, cache)
    shown, labels, files = [], [], []
    for path, label in zip(sample["path"], sample["label"], strict=True):
        db = log_mels(path)
        if db is not None:
            shown.append(db)
            labels.append(str(label))
            files.append(Path(path).name)
    if not shown:
        raise ConfigError("none of the sampled clips could be decoded")
    return plots.plot_batch(
        shown,
        labels,
        features,
        names=files if names else None,
        cols=cols,
        title=f"{len(shown)} random clips of {len(clips)}: log-mel spectrograms with their labels",
    )


def show_batch(
    clips: pd.DataFrame,
    out: str | os.PathLike,
    features: FeatureConfig | None = None,
    **options,
) -> Path:
    """Write :func:`batch_figure` as a PNG and return its path."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return _save(batch_figure(clips, features, **options), out)

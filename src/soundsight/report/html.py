"""Writing ``report.html``: a run's plots, tables and clips rendered into one HTML file.

The page is the Jinja2 template ``soundsight/templates/report.html`` (its CSS inline),
rendered with autoescaping on, so labels, file names and config values are always
text, never markup. Every image and the top-loss clips' audio are embedded as ``data:``
URIs: the file fetches nothing and can be mailed or archived on its own.
"""

from __future__ import annotations

import base64
import io
import json
import os
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from pathlib import Path

import jinja2
import pandas as pd

from ..audio import AudioError, load_clip
from ..config import config_to_dict
from ..files import write_whole
from ..modelfile import FrozenSpec, ModelSpec
from . import plotting
from .run import CVData, RunData, cv_folds, is_cv_folder

#: Embedded as they are (Chromium, Firefox and Safari play these); other audio, or
#: files above :data:`MAX_RAW_AUDIO` bytes, is re-encoded as 16-bit WAV.
AUDIO_MIME = {".wav": "audio/wav", ".flac": "audio/flac", ".ogg": "audio/ogg", ".mp3": "audio/mpeg"}
PLAYABLE_WAV = {"PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT"}
MAX_RAW_AUDIO = 4 << 20
#: Longest audio embedded per clip when re-encoding (seconds).
MAX_AUDIO_SECONDS = 30.0
#: Rows shown of the failures and most-confused tables.
MAX_FAILURES = 50
MAX_CONFUSED = 25
#: The summary metrics, in order, with their names on the page.
METRICS = {
    "clips": "clips",
    "accuracy": "accuracy",
    "error_rate": "error rate",
    "map3": "MAP@3",
    "background_clips": "clips without a label",
    "lwlrap": "lwlrap",
    "mean_ap": "mAP",
    "macro_f1": "macro F1",
}
#: Titled tables of (field, value) rows: the report's configuration section.
ConfigTables = list[tuple[str, list[tuple[str, str]]]]
#: The model file's configs shown, with their captions.
CONFIGS = {"train": "training recipe", "model": "model", "features": "log-mel features"}
#: A single run's sections, for the page's navigation.
SECTIONS = (
    "summary",
    "config",
    "training",
    "errors",
    "calibration",
    "top-losses",
    "embeddings",
)


@cache
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("soundsight", "templates"),
        autoescape=jinja2.select_autoescape(("html",), default=True, default_for_string=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _data_uri(mime: str, content: bytes) -> str:
    return f"data:{mime};base64," + base64.b64encode(content).decode("ascii")


def audio_uri(path: str | os.PathLike, sample_rate: int = 22050) -> str | None:
    """A ``data:`` URI of a clip that browsers play.

    Parameters
    ----------
    path : path-like
        The clip.
    sample_rate : int
        Rate of the re-encoded WAV, when the file is not embedded as it is.

    Returns
    -------
    str or None
        The file's own bytes for WAV (browser-playable sample formats), FLAC, OGG and
        MP3 up to 4 MB; otherwise the clip decoded (first 30 s) and encoded as 16-bit
        WAV. None when the file cannot be read.
    """
    import soundfile as sf

    path = Path(path)
    mime = AUDIO_MIME.get(path.suffix.lower())
    try:
        size = path.stat().st_size
        if mime == "audio/wav" and sf.info(str(path)).subtype not in PLAYABLE_WAV:
            mime = None
        if mime is not None and 0 < size <= MAX_RAW_AUDIO:
            return _data_uri(mime, path.read_bytes())
        wave = load_clip(path, sample_rate, MAX_AUDIO_SECONDS)
    except (OSError, RuntimeError, AudioError):
        return None
    buffer = io.BytesIO()
    sf.write(buffer, wave, sample_rate, format="WAV", subtype="PCM_16")
    return _data_uri("audio/wav", buffer.getvalue())


@dataclass
class Table:
    """A frame as the template shows it: column names and formatted cells."""

    columns: list[str]
    rows: list[list[str]]
    numeric: list[bool]

    @classmethod
    def of(cls, frame: pd.DataFrame, floats: str = "{:.4f}") -> Table:
        """``frame``'s cells as text: floats with ``floats`` (NaN empty), others as is."""
        columns = [frame.iloc[:, i] for i in range(frame.shape[1])]
        cells = [
            ["" if pd.isna(v) else floats.format(v) for v in column]
            if pd.api.types.is_float_dtype(column)
            else [str(v) for v in column]
            for column in columns
        ]
        return cls(
            columns=[str(name) for name in frame.columns],
            rows=[list(row) for row in zip(*cells, strict=True)],
            numeric=[pd.api.types.is_numeric_dtype(column) for column in columns],
        )


def _images(folder: Path, names: tuple[str, ...]) -> dict[str, str]:
    """``data:`` URIs of the folder's PNGs ``NAME.png`` that exist, by name."""
    paths = {name: folder / f"{name}.png" for name in names}
    return {
        name: _data_uri("image/png", p.read_bytes()) for name, p in paths.items() if p.is_file()
    }


def _top_loss_rows(run: RunData) -> list[dict]:
    """The top-loss clips with their audio (``uri``, ``mime``; None when unreadable)."""
    if run.top_losses is None:
        return []
    sample_rate = run.features.sample_rate if run.features else 22050
    rows = []
    for row in run.top_losses.itertuples(index=False):
        uri = audio_uri(row.path, sample_rate)
        rows.append(
            {
                "clip": Path(row.path).name,
                "label": row.label,
                "predicted": row.predicted,
                "right": row.predicted == row.label,
                "numbers": [f"{row.p_predicted:.3f}", f"{row.p_true:.3f}", f"{row.loss:.3f}"],
                "uri": uri,
                "mime": uri[5 : uri.index(";")] if uri else None,
            }
        )
    return rows


def _tables(run: RunData) -> dict[str, Table]:
    """The run's tables the page shows (long ones cut), by name."""
    frames = {
        "failures": (run.failures, MAX_FAILURES),
        "history": (run.history, None),
        "per_class": (run.per_class, None),
        "most_confused": (run.most_confused, MAX_CONFUSED),
    }
    return {
        name: Table.of(frame if rows is None else frame.head(rows))
        for name, (frame, rows) in frames.items()
        if frame is not None
    }


@dataclass
class RunSection:
    """What the template shows of one run folder (headings at ``level``; element ids
    start with ``prefix``)."""

    prefix: str
    level: int
    labels: list[str]
    images: dict[str, str]
    metrics: list[tuple[str, str]]
    configs: ConfigTables
    tables: dict[str, Table]
    failures: int
    confused: int
    top_losses: list[dict]
    calibration: list[tuple[str, str]]
    calibration_note: str | None
    #: A frozen-embedding model's run: its embeddings are its parts', not a network's.
    frozen: bool = False

    @classmethod
    def of(cls, folder: Path, prefix: str = "", level: int = 2) -> RunSection:
        """Read the run folder ``folder`` (:class:`RunData`) and format it."""
        run = RunData.load(folder)
        return cls(
            prefix=prefix,
            level=level,
            labels=run.labels,
            # learning_curve.png: `soundsight learning-curve DATA --out RUN`'s picture.
            # fusion.png: `soundsight fuse`'s accuracy against the head's weight.
            images=_images(folder, (*plotting.RUN_PLOTS, "learning_curve", "fusion")),
            metrics=[
                (name, f"{value:.4f}" if isinstance(value, float) else str(value))
                for key, name in METRICS.items()
                if (value := run.metrics.get(key)) is not None
            ],
            configs=_configs(run),
            tables=_tables(run),
            failures=0 if run.failures is None else len(run.failures),
            confused=0 if run.most_confused is None else len(run.most_confused),
            top_losses=_top_loss_rows(run),
            calibration=_calibration(run),
            calibration_note=run.spec.calibration.get("note") if run.spec else None,
            frozen=run.frozen is not None,
        )


def _cv_context(folder: Path) -> dict:
    """The template's data for a ``cv`` folder: scores and a section per fold."""
    cv = CVData.load(folder)
    mean_std = pd.DataFrame([{"": "mean", **cv.mean}, {"": "std", **cv.std}])
    folds = [(fold.name, RunSection.of(fold, prefix=f"{fold.name}-", level=3)) for fold in cv.folds]
    return {
        "title": f"soundsight cross-validation report: {folder.name}",
        "nav": [("cv", "summary")] + [(name, name) for name, _ in folds],
        "scores": Table.of(cv.scores),
        "mean_std": Table.of(mean_std),
        "images": _images(folder, ("cv_summary",)),
        "folds": folds,
    }


def _run_context(folder: Path) -> dict:
    """The template's data for a single run folder."""
    return {
        "title": f"soundsight report: {folder.name}",
        "nav": [(s, s.replace("-", " ")) for s in SECTIONS],
        "run": RunSection.of(folder),
    }


def write_report(
    run_dir: str | os.PathLike,
    cache: str | os.PathLike | None = None,
    replot: bool = False,
    progress: bool = False,
) -> Path:
    """Write ``RUN/report.html``, one self-contained file, and return its path.

    Parameters
    ----------
    run_dir : path-like
        A run folder, or a ``cv`` folder: then the report holds the per-fold scores
        and their plot, then one section per fold (the first one open, the others
        folded) with everything a single run's report has.
    cache : path-like, optional
        The feature cache the plots read log-mels from.
    replot : bool
        Redo the plots even when they are current (by default they are made only
        when missing or older than the run's results).
    progress : bool
        Print what is being plotted.
    """
    folder = Path(run_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: run folder not found")
    cv = is_cv_folder(folder)
    folds = cv_folds(folder) if cv else [folder]
    if (
        replot
        or not all(plotting.plots_are_current(f) for f in folds)
        or (cv and not (folder / "cv_summary.png").is_file())
    ):
        plotting.plot_run(folder, cache, progress)
    context = _cv_context(folder) if cv else _run_context(folder)
    page = (
        _environment()
        .get_template("report.html")
        .render(
            folder=str(folder.resolve()),
            made=datetime.now().strftime("%Y-%m-%d %H:%M"),
            cv=cv,
            **context,
        )
    )
    return write_whole(folder / "report.html", lambda file: file.write(page.encode("utf-8")))


def _calibration(run: RunData) -> list[tuple[str, str]]:
    """The model file's temperature, ECE before and after, and 'unknown' rule."""
    if run.spec is None:
        return []
    if run.spec.multi_label:  # no temperature, no 'unknown': one threshold per label
        cuts = run.spec.thresholds
        return [
            ("labels", str(len(cuts))),
            ("thresholds", f"{min(cuts):.3f} to {max(cuts):.3f} (per_class.csv)"),
        ]
    spec, rows = run.spec, [("temperature", f"{run.spec.temperature:.3f}")]
    if "clips" in spec.calibration:
        rows.append(("validation clips", str(spec.calibration["clips"])))
    for key, name in (
        ("ece_before", "ECE before"),
        ("ece_after", "ECE after"),
        ("ece_floor", "ECE a perfectly calibrated model would show on these clips"),
    ):
        if key in spec.calibration:
            rows.append((name, f"{spec.calibration[key]:.4f}"))
    rejection = spec.rejection
    if rejection:
        rows += [
            ("'unknown' score", str(rejection["score"])),
            ("threshold", f"{rejection['threshold']:.4f}"),
            ("known clips kept", f"{rejection['keep']:.0%}"),
        ]
    else:
        rows.append(("'unknown'", "off: every clip gets a known label"))
    return rows


def _configs(run: RunData) -> ConfigTables:
    """The model file's configs as (title, [(field, JSON value)]) tables; a frozen
    model's parts, head and fusion (and a fused network's configs)."""
    if run.frozen is not None:
        return _frozen_configs(run.frozen)
    return [] if run.spec is None else _spec_configs(run.spec)


def _spec_configs(spec: ModelSpec, title_prefix: str = "") -> ConfigTables:
    values = {
        "features": config_to_dict(spec.features),
        "model": config_to_dict(spec.model),
        "train": spec.train,
    }
    return [
        (title_prefix + title, [(str(k), json.dumps(v)) for k, v in values[key].items()])
        for key, title in CONFIGS.items()
        if values.get(key)
    ]


def _frozen_configs(frozen: FrozenSpec) -> ConfigTables:
    rows = [
        ("parts", frozen.backbone),
        ("embedding", " + ".join(f"{part.name} {part.dim}-d" for part in frozen.parts)),
        *((f"head {key}", json.dumps(value)) for key, value in frozen.head.items()),
        ("licences", ", ".join(frozen.licences) or "none recorded"),
    ]
    if frozen.network is None:
        return [("frozen embeddings", rows)]
    rows += [
        ("fused network", frozen.network.model.backbone),
        ("weight of the head", f"{frozen.weight:.2f} (of the network {1 - frozen.weight:.2f})"),
    ]
    return [
        ("frozen embeddings, late fusion", rows),
        *_spec_configs(frozen.network, "fused network: "),
    ]

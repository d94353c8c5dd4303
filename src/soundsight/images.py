"""Colour-mapped log-mel PNGs, one per clip, as the blog recipe's images.

Made from arrays with matplotlib's colour map and Pillow, without creating matplotlib
figures (the blog's per-clip ``specshow`` + ``savefig`` is its slowest step).

The PNGs are palette images: one byte per pixel, the colour map as the palette. Every
reader shows (and ``Image.convert("RGB")`` returns) the same colours as an RGB file,
but encoding one takes a third of the time, at half the file size (38 vs 74 kB for a
224 px ESC-50 clip).

Labels name folders, but a label is text chosen by whoever wrote the dataset, never a
path: :func:`label_folders` turns each into one safe folder name (``../../x`` cannot
climb out of the output folder, ``/abs`` cannot leave it), distinct labels into
distinct folders, and ``label_folders.csv`` in the output records which is which.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import re
from collections.abc import Iterable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .cache import MAX_DURATION, FeatureCache, featurise_job
from .features import FeatureConfig, colour_index, colour_table
from .files import write_whole
from .jobs import JobReport, is_disk_full, run_clip_jobs, stopped_by_full_disk
from .tables import write_csv

#: Where export-images records the folder of each label.
LABEL_FOLDERS = "label_folders.csv"
#: Characters a folder name must not hold: path separators, NUL and control characters.
_UNSAFE = re.compile(r"[/\\\x00-\x1f\x7f]")
#: Longest folder name kept as is, in UTF-8 bytes (file systems allow 255).
_MAX_NAME_BYTES = 200


def spectrogram_image(
    db: np.ndarray, floor_db: float, size: int | None = 224, cmap: str = "magma"
) -> Image.Image:
    """Palette image (mode ``"P"``) of a log-mel in dB, resized to ``size`` x ``size``
    (None keeps it). Resizing interpolates the dB values' colour-map positions, so every
    pixel has a colour of the map; ``.convert("RGB")`` gives the RGB image."""
    image = Image.fromarray(colour_index(db, floor_db))
    if size is not None:
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    image.putpalette(colour_table(cmap).tobytes())
    return image


def spectrogram_png(db: np.ndarray, floor_db: float) -> bytes:
    """The serve page's picture of a log-mel: :func:`spectrogram_image` at its own size,
    as PNG bytes."""
    png = io.BytesIO()
    spectrogram_image(db, floor_db, size=None).save(png, format="PNG")
    return png.getvalue()


def label_folders(labels: Iterable[str]) -> dict[str, str]:
    """One folder name per distinct label: one path component, never a path.

    A label that is already a plain name (no ``/``, ``\\``, control character, not
    ``.`` or ``..``, not empty, at most 200 bytes) is its own folder (``café ☕``
    stays). Others get their unsafe characters replaced by ``_``, surrounding dots
    and spaces stripped, and a hash of the label appended (``../../x`` ->
    ``_.._x-<hash>``). Names that would meet, also when compared without case (as
    macOS and Windows file systems do), get such a hash too, until all differ.
    """
    folders: dict[str, str] = {}
    for label in dict.fromkeys(labels):
        plain = label not in ("", ".", "..") and not _UNSAFE.search(label)
        if plain and len(label.encode()) <= _MAX_NAME_BYTES:
            folders[label] = label
        else:
            # At most 100 bytes of the label (cut on a character boundary) + the hash.
            kept = _UNSAFE.sub("_", label).strip(". ").encode()[:100]
            folders[label] = _hashed(kept.decode(errors="ignore"), label, 0)
    for attempt in itertools.count(1):
        owners: dict[str, list[str]] = {}
        for label, name in folders.items():
            owners.setdefault(name.casefold(), []).append(label)
        clashing = [label for group in owners.values() if len(group) > 1 for label in group]
        if not clashing:
            return folders
        for label in clashing:
            folders[label] = _hashed(folders[label], label, attempt)
    raise AssertionError("unreachable: itertools.count() never ends")


def _hashed(name: str, label: str, attempt: int) -> str:
    digest = hashlib.sha1(f"{attempt}\0{label}".encode()).hexdigest()[:8]
    return f"{name}-{digest}" if name else f"label-{digest}"


def image_paths(
    table: pd.DataFrame, out: Path, folders: dict[str, str] | None = None
) -> dict[str, Path]:
    """PNG path for each clip: ``out/<label folder>/<clip name>.png``
    (``out/<clip name>.png`` when unlabelled), the folders of :func:`label_folders`
    unless given; clips whose names collide get their parent folder's name too (and
    a hash of their path where that still collides)."""
    labels = table["label"]
    if folders is None:
        folders = label_folders(labels[labels.notna()].astype(str))
    targets: dict[str, Path] = {}
    taken: set[Path] = set()  # not targets.values(): that makes this quadratic
    for path, label in zip(table["path"], labels, strict=True):
        folder = out / folders[str(label)] if pd.notna(label) else out
        stem = Path(path).stem
        target = folder / f"{stem}.png"
        if target in taken:
            target = folder / f"{Path(path).parent.name}_{stem}.png"
        if target in taken:
            target = folder / f"{_hashed(Path(path).parent.name + '_' + stem, str(path), 0)}.png"
        targets[str(path)] = target
        taken.add(target)
    return targets


def _write_pngs(
    targets: dict[str, Path],
    floor_db: float,
    size: int,
    cmap: str,
    items: list[tuple[str, np.ndarray]],
) -> dict[str, str]:
    """Write each clip's PNG whole; returns the clips whose PNG could not be written.
    Renamed into place whole, but not flushed to disk: a PNG is cheap to make again.
    A full disk is raised."""
    failed = {}
    for path, db in items:
        target = targets[path]
        image = spectrogram_image(db, floor_db, size, cmap)
        try:
            write_whole(
                target,
                partial(image.save, format="PNG"),
                temporary=target.with_name(f".{target.name}.{os.getpid()}.tmp"),
                durable=False,
            )
        except OSError as err:
            if is_disk_full(err):
                raise
            failed[path] = f"cannot write its output ({err})"
    return failed


def export_images(
    clips: pd.DataFrame | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: FeatureConfig | None = None,
    size: int = 224,
    cmap: str = "magma",
    workers: int | None = None,
    progress: bool = True,
    cache: str | os.PathLike | None = None,
    max_duration: float | None = MAX_DURATION,
) -> JobReport:
    """Write one colour-mapped log-mel PNG per clip under ``out``; existing PNGs are
    kept, so an interrupted export resumes. Failures go to ``out/failures.csv``,
    warnings (truncated clips) to ``out/warnings.csv``, the folder of each label (see
    :func:`label_folders`) to ``out/label_folders.csv``.

    With ``cache`` (a :func:`~soundsight.prepare` folder), clips it holds under
    ``config`` are read from it instead of decoded; the rest are decoded, up to
    ``max_duration`` seconds per clip (see :func:`~soundsight.prepare`).

    Raises
    ------
    DiskFullError
        The disk filled up; the PNGs written are kept and a rerun resumes.
    """
    config = config or FeatureConfig()
    store = None if cache is None else FeatureCache(cache, config)
    table = (
        clips
        if isinstance(clips, pd.DataFrame)
        else pd.DataFrame({"path": [str(Path(p).resolve()) for p in clips], "label": pd.NA})
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = table["label"]
    folders = label_folders(labels[labels.notna()].astype(str))
    targets = image_paths(table, out, folders)
    todo = [p for p, target in targets.items() if not target.exists()]
    write = partial(_write_pngs, {p: targets[p] for p in todo}, config.floor_db, size, cmap)
    report = JobReport(total=len(targets), skipped=len(targets) - len(todo))
    try:
        write_csv(
            pd.DataFrame({"label": list(folders), "folder": list(folders.values())}, dtype=object),
            out / LABEL_FOLDERS,
        )
        run_clip_jobs(
            todo,
            featurise_job,
            (config, write, store, max_duration),
            workers,
            "export-images",
            progress,
            report,
        )
        report.write_failures(out / "failures.csv")
        report.write_warnings(out / "warnings.csv")
    except OSError as err:
        if not is_disk_full(err):
            raise
        for tmp in out.rglob(".*.png.*.tmp"):  # of this run's writers, all ended now
            tmp.unlink(missing_ok=True)
        kept = sum(target.exists() for target in targets.values())
        raise stopped_by_full_disk(err, out, report, kept, len(targets), "images") from None
    return report

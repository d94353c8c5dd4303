"""Dataset layouts: from a folder of labelled clips to one table of clips.

Every layout yields the same :class:`pandas.DataFrame`, one row per clip:

=========  =============================================================
path       absolute path of the audio file (str)
label      class name (str), or missing for unlabelled clips
fold       the dataset's own fold number (Int64), where it has folds
group      clips that must stay on one side of a split (str), e.g. the
           ESC-50 source recording or the FSDD speaker
verified   FSDKaggle2018 ``manually_verified`` flag (boolean); False for
           FSDKaggle2019's noisy training clips
labels     multi-label layouts only: the clip's labels, a tuple of str
           (empty: a background clip, none of the classes); ``label``
           then holds them joined by :data:`LABEL_JOIN` (``""`` for none)
=========  =============================================================

Multi-label layouts (FSDKaggle2019, FSD50K, ``csv`` with ``label_separator``) mark
their table with ``table.attrs["multi_label"] = True`` and count the clips without a
label in ``table.attrs["background_clips"]``. Every label is checked
(:func:`check_label`), and a bad row is named by its line in the CSV.

Layouts are looked up by name in :data:`LAYOUTS`; :func:`detect_layout` picks one
from the files present. Labels are strings as written (``NA``, ``null``, ``0``, ``01``
and ``1.0`` are five distinct labels), never numbers or NaN.

Folders are listed by :func:`audio_files`, which follows symbolic links but names what
it cannot list (a symlink loop, a broken link, a folder it may not read) instead of
passing over it: a layout that lists folders warns about those entries and keeps them
in ``table.attrs["skipped"]`` as ``(path, reason)`` pairs, which
:func:`~soundsight.prepare` writes to its ``warnings.csv``.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from stat import S_ISREG
from typing import Any, cast

import numpy as np
import pandas as pd

from .audio import AUDIO_EXTENSIONS
from .errors import SoundsightError
from .tables import restore_neutralised

COLUMNS = ("path", "label", "fold", "group", "verified")
#: Joins a multi-label clip's labels into its ``label`` cell, and its predictions'
#: labels in ``predict``'s CSV ("dog;rain"); no label may contain it.
LABEL_JOIN = ";"


class DatasetError(SoundsightError, ValueError):
    """A dataset folder or manifest that cannot be read as clips."""


def _table(frame: pd.DataFrame, root: Path) -> pd.DataFrame:
    """Normalise a layout's rows: all columns, typed, absolute paths, no duplicates.
    A ``labels`` column (tuples of str) makes it a multi-label table."""
    frame = frame.copy()
    multi = "labels" in frame
    if multi:
        frame["label"] = [LABEL_JOIN.join(labels) for labels in frame["labels"]]
    for column in COLUMNS:
        if column not in frame:
            frame[column] = pd.NA
    frame = frame[list(COLUMNS) + (["labels"] if multi else [])]
    frame["path"] = [str((root / p).resolve()) for p in frame["path"]]
    frame["label"] = frame["label"].astype("string").str.strip()
    frame["fold"] = frame["fold"].astype("Int64")
    frame["group"] = frame["group"].astype("string")
    frame["verified"] = frame["verified"].astype("boolean")
    duplicated = frame["path"].duplicated()
    if duplicated.any():
        conflicting = frame[frame["path"].isin(frame.loc[duplicated, "path"])]
        conflicts = conflicting.groupby("path")["label"].nunique(dropna=False)
        detail = "; different labels for " + ", ".join(conflicts[conflicts > 1].index[:3])
        warnings.warn(
            f"{root}: {int(duplicated.sum())} duplicate rows dropped, keeping the first of each "
            f"(e.g. {frame.loc[duplicated, 'path'].iloc[0]})"
            + (detail if (conflicts > 1).any() else ""),
            stacklevel=3,
        )
        frame = frame[~duplicated]
    frame = frame.reset_index(drop=True)
    if multi:
        frame.attrs["multi_label"] = True
        frame.attrs["background_clips"] = int(sum(not labels for labels in frame["labels"]))
    return frame


#: Characters no label may hold: path separators (a label names a folder in
#: ``export-images`` and the report, never a path) and :data:`LABEL_JOIN`.
_NOT_IN_LABELS = ("/", "\\", LABEL_JOIN)


def check_label(label: str) -> str | None:
    """What is wrong with ``label`` as a class name, or None: empty, a path (``/``,
    ``\\``, ``.`` or ``..``), the list separator :data:`LABEL_JOIN`, or a control
    character."""
    if not label:
        return "an empty label"
    if label in (".", "..") or any(c in label for c in _NOT_IN_LABELS):
        return f"label {label!r} holds a path separator, {LABEL_JOIN!r} or is . / .."
    if any(ord(c) < 32 for c in label):
        return f"label {label!r} holds a control character"
    return None


def split_labels(
    cells: Iterable[str], separator: str, csv_path: Path, problems: list[str] | None = None
) -> list[tuple[str, ...]]:
    """Each cell's labels (split at ``separator``, stripped; an empty cell: no label,
    a background clip), every label checked with :func:`check_label`.

    Raises
    ------
    DatasetError
        Naming ``csv_path`` and the line of each bad row (the first cell is on line 2:
        line 1 is the header). With ``problems``, they are added to it instead.
    """
    if not separator:
        raise DatasetError("the label separator cannot be empty")
    found: list[str] = [] if problems is None else problems
    rows: list[tuple[str, ...]] = []
    for number, cell in enumerate(cells, start=2):
        text = cell.strip() if isinstance(cell, str) else ""
        labels = tuple(part.strip() for part in text.split(separator)) if text else ()
        bad = next((p for p in map(check_label, labels) if p), None)
        if bad is None and len(set(labels)) != len(labels):
            bad = "a label named twice"
        if bad:
            found.append(f"{csv_path}, line {number}: {bad} in {cell!r}")
        rows.append(labels)
    if problems is None:
        _refuse(found)
    return rows


def _refuse(problems: list[str]) -> None:
    """A :class:`DatasetError` listing the bad rows (the first 20), if any."""
    if problems:
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise DatasetError("bad rows:\n  " + "\n  ".join(problems[:20]) + more)


def is_multi_label(table: pd.DataFrame) -> bool:
    """Whether ``table`` is a multi-label table (it has a ``labels`` column)."""
    return "labels" in table


def multi_hot(clips: list[tuple[str, ...]], index: dict[str, int]) -> np.ndarray:
    """A ``(clips, labels)`` float32 0/1 matrix of each clip's labels (``index``: label
    to column); a background clip is a row of zeros."""
    matrix = np.zeros((len(clips), len(index)), np.float32)
    for row, labels in enumerate(clips):
        matrix[row, [index[label] for label in labels]] = 1.0
    return matrix


def clip_labels(table: pd.DataFrame) -> list[tuple[str, ...]]:
    """Every clip's labels: the ``labels`` column of a multi-label table, else each
    clip's one ``label`` (none where it is missing)."""
    if is_multi_label(table):
        return [tuple(labels) for labels in table["labels"]]
    return [() if pd.isna(label) else (str(label),) for label in table["label"]]


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as err:
        raise DatasetError(f"{path}: cannot read CSV ({err})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DatasetError(
            f"{path}: missing column(s) {', '.join(missing)}; has {', '.join(frame.columns)}"
        )
    return frame


def audio_files(
    inputs: Iterable[str | os.PathLike],
) -> tuple[list[str], list[tuple[str, str]]]:
    """Expand files and folders into audio file paths, and say what was left out.

    Parameters
    ----------
    inputs : iterable of path-like
        Files (kept as given, whatever their extension: the decoder reports a file
        that is not audio or not there) and folders, searched recursively for names
        ending in one of :data:`~soundsight.audio.AUDIO_EXTENSIONS` (any case).
        Symbolic links are followed; a folder reached twice is listed once.

    Returns
    -------
    (files, skipped)
        ``files``: the inputs in the order given, each folder's files sorted.
        ``skipped``: ``(path, reason)`` for each entry that could not be listed: a
        symlink loop, a broken symlink, a folder that cannot be read, an audio-named
        entry that is not a regular file.
    """
    files: list[str] = []
    skipped: list[tuple[str, str]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found, problems = _walk(item)
            files.extend(found)
            skipped.extend(problems)
        else:
            files.append(str(item))
    return files, skipped


def _walk(root: Path) -> tuple[list[str], list[tuple[str, str]]]:
    found: list[Path] = []
    skipped: list[tuple[str, str]] = []

    def unreadable(err: OSError) -> None:
        skipped.append((err.filename, f"folder cannot be read ({err.strerror})"))

    # os.walk follows links into folders but keeps no record of where it has been, so
    # a link to a folder above it would recurse forever: folders are tracked by inode.
    seen = {_inode(root)}
    for folder, subfolders, names in os.walk(root, onerror=unreadable, followlinks=True):
        here = Path(folder)
        subfolders.sort()  # which of two ways into one folder is kept: the first by name
        for name in list(subfolders):
            path = here / name
            try:
                inode = _inode(path)
            except OSError as err:
                subfolders.remove(name)
                skipped.append((str(path), f"cannot be read ({err.strerror})"))
                continue
            if inode in seen:
                subfolders.remove(name)
                target = path.resolve()
                loop = here.resolve().is_relative_to(target)
                reason = "symlink loop: leads back to" if loop else "folder already listed as"
                skipped.append((str(path), f"{reason} {target}"))
            seen.add(inode)
        for name in names:
            path = here / name
            # os.walk lists a link it cannot follow (broken, or a loop) as a file.
            problem = _not_a_file(path)
            if problem is None:
                if path.suffix.lower() in AUDIO_EXTENSIONS:
                    found.append(path)
            elif path.suffix.lower() in AUDIO_EXTENSIONS or path.is_symlink():
                skipped.append((str(path), problem))
    return [str(p) for p in sorted(found)], skipped


def _inode(path: Path) -> tuple[int, int]:
    stat = path.stat()
    return stat.st_dev, stat.st_ino


def _not_a_file(path: Path) -> str | None:
    """Why ``path`` is not a regular file to read, or None."""
    try:
        stat = path.stat()
    except OSError as err:
        if err.errno == errno.ELOOP:
            return f"symlink loop ({path} -> {os.readlink(path)})"
        if err.errno == errno.ENOENT and path.is_symlink():
            return f"broken symlink: its target {os.readlink(path)} does not exist"
        return f"cannot be read ({err.strerror})"
    if not S_ISREG(stat.st_mode):
        return "not a regular file"
    return None


def _listed(folder: Path, skipped: list[tuple[str, str]]) -> list[Path]:
    """The audio files under ``folder``, adding what was left out to ``skipped``."""
    files, problems = audio_files([folder])
    skipped.extend(problems)
    return [Path(p) for p in files]


def _with_skipped(table: pd.DataFrame, root: Path, skipped: list[tuple[str, str]]):
    """``table`` carrying ``skipped`` in its attrs, with a warning when there are any."""
    if skipped:
        path, reason = skipped[0]
        warnings.warn(
            f"{root}: {len(skipped)} entries left out because they cannot be listed "
            f"(e.g. {path}: {reason})",
            stacklevel=3,
        )
    table.attrs["skipped"] = list(skipped)
    return table


def fsdkaggle2018(root: Path, split: str = "train") -> pd.DataFrame:
    """FSDKaggle2018: ``train.csv`` + ``audio_train/``; test side ``audio_test/`` with
    ``test_post_competition.csv`` (labelled) or ``sample_submission.csv`` (unlabelled)."""
    if split == "train":
        frame = _read_csv(root / "train.csv", ("fname", "label"))
        verified = frame.get("manually_verified")
        return _table(
            pd.DataFrame(
                {
                    "path": "audio_train/" + frame["fname"],
                    "label": frame["label"],
                    "verified": None if verified is None else verified.astype(int).astype(bool),
                }
            ),
            root,
        )
    if split != "test":
        raise DatasetError(f"{root}: split must be 'train' or 'test', not {split!r}")
    labelled = root / "test_post_competition.csv"
    if labelled.exists():
        frame = _read_csv(labelled, ("fname", "label"))
        if "usage" in frame:
            frame = frame[frame["usage"] != "Ignored"]
        return _table(
            pd.DataFrame({"path": "audio_test/" + frame["fname"], "label": frame["label"]}), root
        )
    frame = _read_csv(root / "sample_submission.csv", ("fname",))
    return _table(pd.DataFrame({"path": "audio_test/" + frame["fname"]}), root)


def _multi_label_rows(
    frame: pd.DataFrame,
    csv_path: Path,
    folder: str,
    separator: str = ",",
    extension: str = "",
    path_column: str = "fname",
    label_column: str = "labels",
) -> pd.DataFrame:
    """``path`` (``folder/<file><extension>``) and ``labels`` of a multi-label CSV's
    rows; a row without a file name, or with a bad label, is named by its line."""
    names = frame[path_column].str.strip()
    problems = [f"{csv_path}, line {i + 2}: no file name" for i in np.flatnonzero(names == "")]
    labels = split_labels(frame[label_column], separator, csv_path, problems)
    _refuse(sorted(problems, key=lambda p: int(p.split(", line ")[1].split(":")[0])))
    return pd.DataFrame({"path": folder + "/" + names + extension, "labels": labels})


def _first_file(root: Path, names: tuple[str, ...]) -> Path | None:
    return next((root / n for n in names if (root / n).is_file()), None)


#: FSDKaggle2019's CSVs and audio folders: Kaggle's names, then Zenodo's.
FSDKAGGLE2019_TRAIN = (
    (("train_curated.csv", "train_curated_post_competition.csv"), "train_curated", True),
    (("train_noisy.csv", "train_noisy_post_competition.csv"), "train_noisy", False),
)
FSDKAGGLE2019_TEST = ("test_post_competition.csv", "test.csv")


def fsdkaggle2019(root: Path, split: str = "train") -> pd.DataFrame:
    """FSDKaggle2019 (multi-label): ``train_curated.csv`` (``fname,labels``, labels
    comma-separated) + ``train_curated/``, and ``train_noisy.csv`` + ``train_noisy/``
    where present (``verified`` False: they weigh ``unverified_weight``); the test side
    ``test/`` with ``test_post_competition.csv`` (labelled) or ``sample_submission.csv``
    (unlabelled). The Zenodo release's ``*_post_competition.csv`` names work too."""
    if split == "train":
        parts = []
        for names, folder_, verified in FSDKAGGLE2019_TRAIN:
            csv_path = _first_file(root, names)
            if csv_path is None:
                if verified:
                    raise DatasetError(f"{root}: no {' or '.join(names)}")
                continue
            rows = _multi_label_rows(_read_csv(csv_path, ("fname", "labels")), csv_path, folder_)
            parts.append(rows.assign(verified=verified))
        return _table(pd.concat(parts, ignore_index=True), root)
    if split != "test":
        raise DatasetError(f"{root}: split must be 'train' or 'test', not {split!r}")
    csv_path = _first_file(root, FSDKAGGLE2019_TEST)
    if csv_path is not None:
        frame = _read_csv(csv_path, ("fname", "labels"))
        return _table(_multi_label_rows(frame, csv_path, "test"), root)
    frame = _read_csv(root / "sample_submission.csv", ("fname",))
    return _table(pd.DataFrame({"path": "test/" + frame["fname"]}), root)


#: FSD50K's ground truth folder, and its dev CSV's split names by our split names.
FSD50K_TRUTH = "FSD50K.ground_truth"
FSD50K_SPLITS = {"train": "train", "valid": "val"}


def fsd50k(root: Path, split: str = "train") -> pd.DataFrame:
    """FSD50K (multi-label): ``FSD50K.ground_truth/dev.csv`` (``fname,labels,mids,
    split``; ``split`` train or val) with ``FSD50K.dev_audio/<fname>.wav``, and
    ``eval.csv`` with ``FSD50K.eval_audio/`` as the test side. Splits: ``train``,
    ``valid`` (dev's val rows, what ``train`` validates on) and ``test``."""
    truth = root / FSD50K_TRUTH
    if split == "test":
        csv_path = truth / "eval.csv"
        frame = _read_csv(csv_path, ("fname", "labels"))
        return _table(
            _multi_label_rows(frame, csv_path, "FSD50K.eval_audio", extension=".wav"), root
        )
    if split not in FSD50K_SPLITS:
        raise DatasetError(f"{root}: split must be 'train', 'valid' or 'test', not {split!r}")
    csv_path = truth / "dev.csv"
    frame = _read_csv(csv_path, ("fname", "labels", "split"))
    rows = _multi_label_rows(frame, csv_path, "FSD50K.dev_audio", extension=".wav")
    return _table(rows[(frame["split"].str.strip() == FSD50K_SPLITS[split]).to_numpy()], root)


def esc50(root: Path, split: str = "train") -> pd.DataFrame:
    """ESC-50: ``meta/esc50.csv`` + ``audio/``; ``fold`` kept, ``src_file`` as group."""
    del split  # ESC-50 has folds, not a test side: use the folds for evaluation.
    frame = _read_csv(root / "meta" / "esc50.csv", ("filename", "fold", "category"))
    group = frame.get("src_file", None)
    return _table(
        pd.DataFrame(
            {
                "path": "audio/" + frame["filename"],
                "label": frame["category"],
                "fold": frame["fold"].astype(int),
                "group": group,
            }
        ),
        root,
    )


def folder(root: Path, split: str = "train") -> pd.DataFrame:
    """One sub-folder per class: ``ROOT/<label>/*.{wav,flac,ogg,mp3}``."""
    del split
    # Class folders that are links going nowhere (broken, or loops) are named too.
    # A link that does not resolve always has a reason (its stat fails), never None.
    skipped: list[tuple[str, str]] = [
        (str(p), cast(str, _not_a_file(p)))
        for p in sorted(root.iterdir())
        if p.is_symlink() and not p.exists()
    ]
    rows = [
        {"path": p, "label": sub.name}
        for sub in sorted(p for p in root.iterdir() if p.is_dir())
        for p in _listed(sub, skipped)
    ]
    if not rows:
        raise DatasetError(f"{root}: no audio files in class sub-folders")
    return _with_skipped(_table(pd.DataFrame(rows), root), root, skipped)


def regex(
    root: Path,
    split: str = "train",
    label_regex: str | None = None,
    group_regex: str | None = None,
) -> pd.DataFrame:
    """Labels from file names: the first group of ``label_regex`` searched in each
    file name (e.g. FSDD ``^(\\d+)_``); optional ``group_regex`` likewise."""
    del split
    if not label_regex:
        raise DatasetError("the regex layout needs --label-regex, e.g. '^(\\d+)_'")
    pattern = re.compile(label_regex)
    group_pattern = re.compile(group_regex) if group_regex else None
    rows: list[dict[str, Any]] = []
    unmatched: list[str] = []
    skipped: list[tuple[str, str]] = []
    for path in _listed(root, skipped):
        match = pattern.search(path.name)
        if not match:
            unmatched.append(path.name)
            continue
        group = group_pattern.search(path.name) if group_pattern else None
        rows.append(
            {
                "path": path,
                "label": match.group(1) if pattern.groups else match.group(0),
                "group": group.group(1) if group else None,
            }
        )
    if unmatched:
        warnings.warn(
            f"{root}: {len(unmatched)} files do not match {label_regex!r} and are left out "
            f"(e.g. {unmatched[0]})",
            stacklevel=2,
        )
    if not rows:
        raise DatasetError(f"{root}: no audio file name matches {label_regex!r}")
    return _with_skipped(_table(pd.DataFrame(rows), root), root, skipped)


def fsdd(root: Path, split: str = "train") -> pd.DataFrame:
    """Free Spoken Digit Dataset: ``{digit}_{speaker}_{index}.wav``; speaker is the
    group; the official split puts index 0-4 in ``test``, 5-49 in ``train``."""
    folder_ = root / "recordings" if (root / "recordings").is_dir() else root
    frame = regex(folder_, label_regex=r"^(\d+)_", group_regex=r"^\d+_([^_]+)_")
    index = frame["path"].str.extract(r"_(\d+)\.\w+$")[0].astype(int)
    if split not in ("train", "test", "all"):
        raise DatasetError(f"{root}: split must be 'train', 'test' or 'all', not {split!r}")
    if split == "all":
        return frame
    keep = index < 5 if split == "test" else index >= 5
    return frame[keep].reset_index(drop=True)


def csv_layout(
    root: Path,
    split: str = "train",
    csv: str | None = None,
    path_column: str = "path",
    label_column: str | None = "label",
    label_separator: str | None = None,
) -> pd.DataFrame:
    """Any CSV with a file column and an optional label column; file paths are
    relative to ``root`` (or absolute). Optional ``fold``/``group`` columns are kept.
    With ``label_separator``, each label cell lists a clip's labels (multi-label; an
    empty cell is a background clip)."""
    del split
    if not csv:
        raise DatasetError("the csv layout needs --csv FILE (and --path-column/--label-column)")
    csv_path = Path(csv) if Path(csv).is_absolute() else root / csv
    frame = _read_csv(csv_path, (path_column,))
    if label_column and label_column not in frame:
        raise DatasetError(f"{csv_path}: no label column {label_column!r}")
    # Text cells a soundsight CSV writer made inert (export-labels: a label "=x" is
    # written "'=x") read back as they were; a foreign "'abc" keeps its quote.
    table = pd.DataFrame({"path": frame[path_column].map(restore_neutralised)})
    if label_separator is not None:
        if not label_column:
            raise DatasetError("--label-separator needs a label column (--label-column)")
        table["labels"] = split_labels(
            frame[label_column].map(restore_neutralised), label_separator, csv_path
        )
    elif label_column:
        table["label"] = frame[label_column].map(restore_neutralised)
    for column in ("fold", "group"):
        if column in frame:
            table[column] = (
                pd.to_numeric(frame[column])
                if column == "fold"
                else frame[column].map(restore_neutralised)
            )
    return _table(table, root)


#: Layout name -> reader(root, split, **options).
LAYOUTS: dict[str, Callable[..., pd.DataFrame]] = {
    "fsdkaggle2018": fsdkaggle2018,
    "fsdkaggle2019": fsdkaggle2019,
    "fsd50k": fsd50k,
    "esc50": esc50,
    "fsdd": fsdd,
    "folder": folder,
    "regex": regex,
    "csv": csv_layout,
}

#: Layouts with a separate test side (``split="test"``); others hold one pool of clips.
TEST_SIDES = ("fsdkaggle2018", "fsdkaggle2019", "fsd50k", "fsdd")
#: The split ``train`` validates on, for layouts with a held-out side: the test side,
#: except FSD50K's, whose dev set names its own validation clips.
VALIDATION_SIDES = {name: "test" for name in TEST_SIDES} | {"fsd50k": "valid"}

_FSDD_NAME = re.compile(r"^\d+_[^_]+_\d+\.wav$")


def detect_layout(root: str | Path) -> str:
    """Name of the layout whose marker files exist under ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    if (root / "train.csv").is_file() and (root / "audio_train").is_dir():
        return "fsdkaggle2018"
    if _first_file(root, FSDKAGGLE2019_TRAIN[0][0]) and (root / "train_curated").is_dir():
        return "fsdkaggle2019"
    if (root / FSD50K_TRUTH / "dev.csv").is_file() and (root / "FSD50K.dev_audio").is_dir():
        return "fsd50k"
    if (root / "meta" / "esc50.csv").is_file() and (root / "audio").is_dir():
        return "esc50"
    recordings = root / "recordings" if (root / "recordings").is_dir() else root
    names = [p.name for p in recordings.glob("*.wav")][:50]
    if names and all(_FSDD_NAME.match(n) for n in names):
        return "fsdd"
    subdirs = [p for p in root.iterdir() if p.is_dir()]
    if any(audio_files([d])[0] for d in subdirs):
        return "folder"
    if not audio_files([root])[0]:
        raise DatasetError(f"{root}: no audio files ({', '.join(AUDIO_EXTENSIONS)}) found")
    raise DatasetError(
        f"{root}: unknown layout. Looked for train.csv + audio_train/ (fsdkaggle2018), "
        "train_curated.csv + train_curated/ (fsdkaggle2019), FSD50K.ground_truth/dev.csv + "
        "FSD50K.dev_audio/ (fsd50k), "
        "meta/esc50.csv + audio/ (esc50), recordings/{digit}_{speaker}_{n}.wav (fsdd), "
        "<label>/ sub-folders of audio (folder). Name one with --layout, e.g. "
        "--layout regex --label-regex '^(\\w+)-' or --layout csv --csv labels.csv"
    )


def load_dataset(
    root: str | Path, layout: str | None = None, split: str = "train", **options
) -> pd.DataFrame:
    """Read the clips of a dataset as a table (see the module docstring).

    Parameters
    ----------
    root : str or Path
        The dataset folder.
    layout : str, optional
        A name in :data:`LAYOUTS`; detected from the files present when omitted.
    split : str
        ``"train"`` or ``"test"`` for layouts with a test side (FSDKaggle2018, FSDD).
    **options
        Layout options: ``label_regex``/``group_regex`` (regex), ``csv``,
        ``path_column``, ``label_column``, ``label_separator`` (csv: multi-label).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    name = layout or detect_layout(root)
    if name not in LAYOUTS:
        raise DatasetError(f"unknown layout {name!r}; choose from {', '.join(LAYOUTS)}")
    table = LAYOUTS[name](root, split, **options)
    if table.empty:
        raise DatasetError(f"{root}: the {name} layout found no clips for split {split!r}")
    table.attrs["layout"] = name
    table.attrs["root"] = str(root)
    return table

"""The CSV files soundsight writes and reads back: text stays text, formulas stay inert.

Every CSV a run, ``prepare`` or ``predict`` writes goes through :func:`write_csv`, and
every one soundsight reads back through :func:`read_csv`, for two reasons pandas'
defaults do not cover:

* Labels, paths and file names are strings. ``pd.read_csv`` turns the labels ``NA``,
  ``null`` or ``None`` into NaN, and ``01`` or ``1.0`` into numbers; :func:`read_csv`
  keeps every text cell as written and numbers as numbers.
* Spreadsheets execute a cell that begins with ``=``, ``+``, ``-``, ``@`` (or a tab or
  carriage return): a label or file name chosen by someone else must not become a
  formula. As OWASP recommends ("CSV injection"), such text cells are written with a
  leading ``'``, which spreadsheets show as text and hide. Text that already begins with
  ``'`` gets one more, so :func:`read_csv` can drop exactly one and give back every
  value unchanged. Numeric columns are left alone (``-0.5`` stays a number).

Files are written whole (:func:`soundsight.files.write_whole`): readers never see half
a file, and two processes writing the same file never share a temporary.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .files import write_whole

#: First characters that make a spreadsheet read a cell as a formula (OWASP).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
QUOTE = "'"


def neutralise(text: str) -> str:
    """``text`` as a spreadsheet shows it, inert: a leading ``'`` where needed."""
    return QUOTE + text if text.startswith((*FORMULA_STARTS, QUOTE)) else text


def restore(text: str) -> str:
    """The inverse of :func:`neutralise`."""
    return text[1:] if text.startswith(QUOTE) else text


def restore_neutralised(text: str) -> str:
    """:func:`restore` only where :func:`neutralise` would have written ``text`` (a
    quote before a formula start or another quote), for CSVs that may come from
    soundsight or from elsewhere: a foreign ``'abc`` keeps its quote."""
    plain = restore(text)
    return plain if plain != text and neutralise(plain) == text else text


def _is_text(column: pd.Series) -> bool:
    return column.dtype == object or pd.api.types.is_string_dtype(column)


def write_csv(frame: pd.DataFrame, path: str | os.PathLike, index: bool = False) -> Path:
    """Write ``frame`` atomically, text cells and labels of the header (and of the index
    when ``index``) neutralised (see the module docstring)."""
    path = Path(path)
    out = frame.copy()
    for name in out.columns:
        if _is_text(out[name]):
            out[name] = out[name].map(lambda v: neutralise(v) if isinstance(v, str) else v)
    out.columns = [neutralise(c) if isinstance(c, str) else c for c in out.columns]
    if index:
        out.index = [neutralise(i) if isinstance(i, str) else i for i in out.index]
    return write_whole(path, lambda file: file.write(out.to_csv(index=index).encode("utf-8")))


def read_csv(
    path: str | os.PathLike, text: tuple[str, ...] = (), index_col: int | None = None
) -> pd.DataFrame:
    """Read a CSV written by :func:`write_csv`.

    Parameters
    ----------
    path : path-like
        The file.
    text : tuple of str
        Columns that are text whatever they look like (``path``, ``label``: the labels
        ``0``, ``01``, ``NA`` and ``null`` stay strings). The index, when ``index_col``
        is given, is text too.
    index_col : int, optional
        Column to use as the index (``confusion.csv``: labels in rows and columns).

    Other columns become numbers when every non-empty cell is one (empty cells NaN),
    and stay text otherwise. Text is given back exactly as it was before
    :func:`write_csv` neutralised it.
    """
    frame = pd.read_csv(
        path, dtype=str, keep_default_na=False, encoding="utf-8", index_col=index_col
    )
    frame.columns = [restore(c) for c in frame.columns]
    if index_col is not None:
        frame.index = [restore(i) for i in frame.index]
    for name in frame.columns:
        cells = frame[name]
        numbers = pd.to_numeric(cells.where(cells != ""), errors="coerce")
        if name not in text and numbers[cells != ""].notna().all():
            frame[name] = numbers
        else:
            frame[name] = cells.map(restore)
    return frame

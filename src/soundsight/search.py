"""Search hours of unlabelled audio by example: an index of window embeddings.

``soundsight index AUDIO... --out INDEX`` cuts every file, of any length, into windows
(the backbone's clip length, a hop of half of it), embeds each with the audio-pretrained
backbone (``aisfx``, :meth:`~soundsight.prediction.Classifier.from_backbone`) or a
trained model file's penultimate layer, and keeps:

``INDEX/index.sqlite`` (stdlib ``sqlite3``, WAL)
    ``meta`` (format, the embedder, the number of vectors committed), ``files`` (path,
    size, mtime, duration, first vector row, rows), ``windows`` (row, file, start,
    end), ``labels`` (the current verdict of each labelled window and label) and
    ``label_events`` (every click, with undo), ``dead`` (vector rows of files that
    changed and were indexed again).
``INDEX/vectors.f32``
    Every window's embedding, float32 rows in window order, appended file by file.

A file is one transaction: its vectors are appended and flushed to disk, then its rows
and the new vector count are committed together. ``kill -9`` at any moment therefore
leaves whole files only: vectors past the committed count are the unfinished file's,
cut off when a writer next opens the index, and a rerun embeds the files not yet in
it (incremental: files already indexed, same size and mtime, are skipped). Files are
read through the featuriser's block stream and the one windowed scorer
(:func:`~soundsight.detection.score_each_window`), so memory does not grow with a
file's length.

Search is exact: cosine similarity of standardised vectors (each dimension's mean and
standard deviation over the index, computed once per index state into
``INDEX/stats.npz``), one matrix-vector product over the memory-mapped vectors. On an
index of 1 M x 512 random float32 vectors, one thread, :func:`nearest` took 83-87 ms
(median of 5, load average 3; 141-209 ms at load 8-9, the 2 cores shared), inside the
100-200 ms asked for, so no nearest-neighbour library is needed (none is a dependency).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import re
import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import pandas as pd

from . import layouts
from .errors import ConfigError, SoundsightError
from .files import write_whole

if TYPE_CHECKING:
    from .features import Clip
    from .prediction import Classifier

INDEX_FORMAT = 1
DATABASE = "index.sqlite"
VECTORS = "vectors.f32"
STATS = "stats.npz"
LOCK = ".writer.lock"
#: Backbone a new index embeds with when no model file is given.
DEFAULT_BACKBONE = "aisfx"
#: Longest label accepted (a label is a name, not a document).
MAX_LABEL_CHARS = 200
#: Verdicts a click records: the window is / is not the label, or skipped.
VERDICTS = ("yes", "no", "skip")
#: Vectors read at a time when scanning the index (16 MB of 512-d float32).
SCAN_ROWS = 8192
#: Folder name of shard ``i`` of ``n`` inside an index folder.
SHARD_NAME = "shard-{index}of{count}"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY, path TEXT NOT NULL UNIQUE, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, duration REAL NOT NULL, first_row INTEGER NOT NULL,
    rows INTEGER NOT NULL, added REAL NOT NULL);
CREATE TABLE IF NOT EXISTS windows (
    row INTEGER PRIMARY KEY, file_id INTEGER NOT NULL, start REAL NOT NULL,
    end REAL NOT NULL);
CREATE INDEX IF NOT EXISTS windows_file ON windows (file_id);
CREATE TABLE IF NOT EXISTS dead (first_row INTEGER NOT NULL, rows INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS labels (
    row INTEGER NOT NULL, label TEXT NOT NULL, verdict INTEGER NOT NULL,
    PRIMARY KEY (row, label));
CREATE TABLE IF NOT EXISTS label_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, row INTEGER NOT NULL, label TEXT NOT NULL,
    verdict TEXT NOT NULL, at REAL NOT NULL, undone INTEGER NOT NULL DEFAULT 0);
"""


class SearchError(SoundsightError, ValueError):
    """An index, a query or a label that cannot be used, named with the problem."""


# ---------------------------------------------------------------------------- embedder


@dataclass(frozen=True)
class Embedder:
    """What an index's vectors were embedded with; stored in its ``meta`` table.

    Attributes
    ----------
    kind : str
        ``backbone`` (pretrained, no head) or ``model`` (a trained model file).
    name : str
        The backbone's name, or the model file's path.
    backbone : str
        The network under it.
    sha256 : str
        The model file's SHA-256 ("" for a backbone): a different file is refused.
    dim : int
        Length of each vector.
    window_seconds, hop_seconds : float
        Window length and the step between windows.
    """

    kind: str
    name: str
    backbone: str
    sha256: str
    dim: int
    window_seconds: float
    hop_seconds: float

    def __str__(self) -> str:
        if self.kind == "backbone":
            return f"the pretrained backbone {self.name}"
        return f"the model file {self.name} (backbone {self.backbone}, sha256 {self.sha256[:12]})"

    def same_network(self, other: Embedder) -> bool:
        return (self.kind, self.backbone, self.sha256) == (other.kind, other.backbone, other.sha256)

    @classmethod
    def from_json(cls, text: str, source: Path) -> Embedder:
        try:
            record = json.loads(text)
            embedder = cls(**record)
        except (json.JSONDecodeError, TypeError) as err:
            raise SearchError(f"{source}: the embedder record is not readable ({err})") from None
        if embedder.kind not in ("backbone", "model") or not 1 <= embedder.dim <= 65536:
            raise SearchError(f"{source}: the embedder record is not valid ({record})")
        return embedder


def _file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_embedder(
    model: str | os.PathLike | None = None,
    backbone: str = DEFAULT_BACKBONE,
    window_seconds: float | None = None,
) -> tuple[Classifier, Embedder]:
    """The network that embeds windows and its record: a trained model file's
    (``model``), else the pretrained ``backbone`` (:meth:`Classifier.from_backbone`)."""
    import torch

    from .prediction import Classifier

    if model is not None:
        if window_seconds is not None:
            raise ConfigError("a model file embeds its own window length: drop --window")
        classifier = Classifier.load(model)
        kind, name, sha = "model", str(Path(model).resolve()), _file_sha256(model)
    else:
        classifier = Classifier.from_backbone(backbone, window_seconds)
        kind, name, sha = "backbone", backbone, ""
    view, features = classifier.view, classifier.features
    if view.frames is None:
        raise ConfigError(
            f"{name}: the model squashes whole clips (--recipe seed); windows need crops"
        )
    probe = torch.zeros((1, 1, features.n_mels, view.frames)) + features.floor_db
    with torch.inference_mode():
        dim = int(classifier.net.embed(probe).shape[-1])
    frames = view.frames
    embedder = Embedder(
        kind=kind,
        name=name,
        backbone=classifier.spec.model.backbone,
        sha256=sha,
        dim=dim,
        window_seconds=features.frames_to_seconds(frames),
        hop_seconds=features.frames_to_seconds(max(1, frames // 2)),
    )
    return classifier, embedder


def embedder_for(index: Index, model: str | os.PathLike | None = None) -> Classifier:
    """The network that embedded ``index``, to embed queries with; ``model`` (a model
    file the caller names) must be that network, else :class:`SearchError` names both."""
    info = index.embedder
    if model is not None:
        asked_sha = _file_sha256(model)
        if info.kind != "model" or info.sha256 != asked_sha:
            raise SearchError(
                f"{index.folder} was built with {info}, not with the model file {model} "
                f"(sha256 {asked_sha[:12]}): queries must be embedded by the index's network"
            )
    if info.kind == "backbone":
        classifier, _ = load_embedder(backbone=info.name, window_seconds=info.window_seconds)
        return classifier
    path = Path(info.name)
    if not path.is_file() or _file_sha256(path) != info.sha256:
        raise SearchError(
            f"{index.folder} was built with {info}, which is no longer at {path} "
            "(moved or changed): the index cannot embed queries without it"
        )
    classifier, _ = load_embedder(model=path)
    return classifier


# ------------------------------------------------------------------------------- index


def check_label(label: object) -> str:
    """A label as the index stores it: a non-empty string (stripped) of at most
    :data:`MAX_LABEL_CHARS` printable characters that :func:`soundsight.layouts.check_label`
    accepts. Labels are names only: nothing ever becomes a path from them (exported clips
    are named by window number)."""
    if not isinstance(label, str):
        raise SearchError(f"a label must be a string, not {type(label).__name__}")
    text = label.strip()
    if not text:
        raise SearchError("a label must not be empty")
    if len(text) > MAX_LABEL_CHARS:
        raise SearchError(f"a label must be at most {MAX_LABEL_CHARS} characters")
    if not text.isprintable():
        raise SearchError(f"a label must not hold control characters: {text!r}")
    # The rule a data set's labels obey (no path separator, no list separator), so that
    # export-labels always writes a set that train reads.
    problem = layouts.check_label(text)
    if problem:
        raise SearchError(f"refused: {problem}")
    return text


@dataclass
class Stats:
    """Standardisation of an index state: per-dimension mean and std, and each row's
    norm once standardised (so a search is one product over the raw vectors)."""

    count: int
    mean: np.ndarray
    std: np.ndarray
    norms: np.ndarray


@dataclass
class FileSpace:
    """Per-file search's space for an index state (:meth:`Index.file_space`): the
    files in row order, the mean and std of their maxima, and their standardised unit
    vectors."""

    count: int
    files: pd.DataFrame
    mean: np.ndarray
    std: np.ndarray
    vectors: np.ndarray

    def query(self, windows: np.ndarray) -> np.ndarray:
        """A query's raw window embeddings ``(k, dim)`` -> a unit vector of this space."""
        return _unit((np.asarray(windows, np.float32).max(0) - self.mean) / self.std)


class Index:
    """An index folder (see the module docstring), open for reading and labelling;
    :meth:`writer` opens it for adding files.

    Raises :class:`SearchError` for a folder that is not an index.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        database = self.folder / DATABASE
        if not database.is_file():
            what = "not found" if not self.folder.exists() else f"has no {DATABASE}"
            raise SearchError(
                f"{self.folder}: not a soundsight index ({what}); build one with "
                "`soundsight index AUDIO... --out FOLDER`"
            )
        try:
            self.db = _connect(database)
            meta = dict(self.db.execute("SELECT key, value FROM meta"))
        except sqlite3.DatabaseError as err:
            raise SearchError(f"{database}: not a soundsight index ({err})") from None
        if meta.get("format") != str(INDEX_FORMAT) or "embedder" not in meta:
            raise SearchError(f"{database}: not a soundsight index of format {INDEX_FORMAT}")
        self.embedder = Embedder.from_json(meta["embedder"], database)
        self._stats: Stats | None = None
        self._files: FileSpace | None = None
        self._vectors: np.ndarray | None = None

    @classmethod
    def create(cls, folder: str | os.PathLike, embedder: Embedder) -> Index:
        """Open ``folder`` as an index, making it when new; an existing one must have been
        built with the same network (else :class:`SearchError` names both)."""
        folder = Path(folder)
        if not (folder / DATABASE).is_file():
            if folder.is_file():
                raise SearchError(f"{folder}: is a file, not an index folder")
            folder.mkdir(parents=True, exist_ok=True)
            db = _connect(folder / DATABASE)
            with db:
                db.executescript(_SCHEMA)
                db.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('format', ?), ('embedder', ?), "
                    "('vectors', '0')",
                    (str(INDEX_FORMAT), json.dumps(asdict(embedder))),
                )
            db.close()
        index = cls(folder)
        if not index.embedder.same_network(embedder) or index.embedder.dim != embedder.dim:
            raise SearchError(
                f"{folder} was built with {index.embedder}, not {embedder}: use another "
                "--out folder, or index with the same network"
            )
        return index

    def close(self) -> None:
        self.db.close()

    # ---- reading

    @property
    def count(self) -> int:
        """Vectors committed (rows of ``vectors.f32`` that belong to indexed files)."""
        return int(self.db.execute("SELECT value FROM meta WHERE key = 'vectors'").fetchone()[0])

    def vectors(self) -> np.ndarray:
        """The committed vectors ``(count, dim)``, memory-mapped (read-only). The map is
        kept until files are added: a fresh map of 1 M vectors costs every search ~50 ms
        of page faults (measured: 136 vs 85 ms per product)."""
        count, dim = self.count, self.embedder.dim
        if count == 0:
            return np.zeros((0, dim), np.float32)
        if self._vectors is not None and len(self._vectors) == count:
            return self._vectors
        path = self.folder / VECTORS
        if path.stat().st_size < count * dim * 4:
            raise SearchError(f"{path}: holds fewer vectors than {DATABASE} records ({count})")
        self._vectors = np.memmap(path, np.float32, "r", shape=(count, dim))
        return self._vectors

    def files(self) -> pd.DataFrame:
        return pd.read_sql_query(
            "SELECT id, path, duration, first_row, rows FROM files ORDER BY first_row", self.db
        )

    def windows(self, rows: Sequence[int] | np.ndarray) -> pd.DataFrame:
        """``row, file, start, end`` of the given vector rows, in the order given."""
        wanted = [int(r) for r in rows]
        found: dict[int, tuple] = {}
        for chunk in range(0, len(wanted), 500):
            part = wanted[chunk : chunk + 500]
            marks = ",".join("?" * len(part))
            for row, path, start, end in self.db.execute(
                "SELECT w.row, f.path, w.start, w.end FROM windows w JOIN files f "
                f"ON f.id = w.file_id WHERE w.row IN ({marks})",
                part,
            ):
                found[row] = (row, path, start, end)
        missing = [r for r in wanted if r not in found]
        if missing:
            raise SearchError(f"{self.folder}: no window {missing[0]} in the index")
        return pd.DataFrame([found[r] for r in wanted], columns=["row", "file", "start", "end"])

    def live(self) -> np.ndarray:
        """Whether each vector row belongs to a file still indexed (not replaced)."""
        alive = np.ones(self.count, bool)
        for first, rows in self.db.execute("SELECT first_row, rows FROM dead"):
            alive[first : first + rows] = False
        return alive

    def stats(self) -> Stats:
        """The standardisation of the current index state (computed in blocks, cached
        in ``stats.npz`` until files are added)."""
        count = self.count
        if self._stats is not None and self._stats.count == count:
            return self._stats
        path = self.folder / STATS
        with contextlib.suppress(OSError, ValueError, KeyError), np.load(path) as saved:
            if int(saved["count"]) == count:
                self._stats = Stats(count, saved["mean"], saved["std"], saved["norms"])
                return self._stats
        if count == 0:
            raise SearchError(f"{self.folder}: the index holds no windows yet")
        vectors = self.vectors()
        total = np.zeros(self.embedder.dim, np.float64)
        squares = np.zeros(self.embedder.dim, np.float64)
        for block in _blocks(vectors):
            total += block.sum(0, dtype=np.float64)
            squares += np.square(block, dtype=np.float64).sum(0)
        mean = total / count
        std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
        std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        mean = mean.astype(np.float32)
        norms = np.concatenate(
            [np.linalg.norm((block - mean) / std, axis=1) for block in _blocks(vectors)]
        )
        norms = np.maximum(norms, 1e-12).astype(np.float32)
        self._stats = Stats(count, mean, std, norms)

        def write(file) -> None:
            np.savez(file, count=count, mean=mean, std=std, norms=norms)

        write_whole(path, write, durable=False)  # cheap to make again
        return self._stats

    def standardised(self, vectors: np.ndarray) -> np.ndarray:
        """Rows of raw vectors -> standardised unit vectors (the space search works in)."""
        stats = self.stats()
        return _unit((np.asarray(vectors, np.float32) - stats.mean) / stats.std)

    def similarities(self, query: np.ndarray) -> np.ndarray:
        """Cosine similarity of every row (standardised) to ``query``, a standardised
        unit vector; rows of replaced files get -inf. One pass, in blocks."""
        stats = self.stats()
        weights = (np.asarray(query, np.float32) / stats.std).astype(np.float32)
        offset = float(stats.mean @ weights)
        scores = np.concatenate([block @ weights for block in _blocks(self.vectors())])
        scores = (scores - offset) / stats.norms
        scores[~self.live()] = -np.inf
        return scores

    def file_space(self) -> FileSpace:
        """Per-file search's space (:func:`nearest_files`): each indexed file as one
        vector, the element-wise maximum of its windows' embeddings, standardised over
        the files. aisfx itself max-pools over time, so a file's maximum is close to
        embedding it whole; on ESC-50 fold 2 it ranks files better than their best
        window does (precision@10 0.310 against 0.299, ``benchmarks/bench_search.py``).
        Read in blocks, kept until files are added."""
        count = self.count
        if self._files is not None and self._files.count == count:
            return self._files
        files = self.files()
        files = files[files["rows"] > 0].reset_index(drop=True)
        if files.empty:
            raise SearchError(f"{self.folder}: the index holds no windows yet")
        vectors = self.vectors()
        maxima = np.empty((len(files), self.embedder.dim), np.float32)
        for i, (first, rows) in enumerate(zip(files["first_row"], files["rows"], strict=True)):
            maxima[i] = np.max(
                [block.max(0) for block in _blocks(vectors[first : first + rows])], axis=0
            )
        mean = maxima.mean(0)
        std = maxima.std(0)
        std = np.where(std > 1e-6, std, 1.0).astype(np.float32)
        self._files = FileSpace(count, files, mean, std, _unit((maxima - mean) / std))
        return self._files

    def rows_of(self, path: str | os.PathLike) -> pd.DataFrame | None:
        """``row, start, end`` of an indexed file's windows (None: not indexed)."""
        found = self.db.execute(
            "SELECT id FROM files WHERE path = ?", (str(Path(path).resolve()),)
        ).fetchone()
        if found is None:
            return None
        return pd.read_sql_query(
            "SELECT row, start, end FROM windows WHERE file_id = ? ORDER BY row",
            self.db,
            params=(found[0],),
        )

    # ---- labels

    def label(self, row: int, label: object, verdict: str) -> int:
        """Record one click: window ``row`` is (``yes``) / is not (``no``) ``label``, or
        was ``skip``-ped; committed at once. Returns the event's id."""
        name = check_label(label)
        if verdict not in VERDICTS:
            raise SearchError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        row = int(row)
        if self.db.execute("SELECT 1 FROM windows WHERE row = ?", (row,)).fetchone() is None:
            raise SearchError(f"{self.folder}: no window {row} in the index")
        with self.db:
            event = self.db.execute(
                "INSERT INTO label_events (row, label, verdict, at) VALUES (?, ?, ?, ?)",
                (row, name, verdict, time.time()),
            ).lastrowid
            self._settle(row, name)
        return int(event or 0)

    def undo(self) -> dict | None:
        """Take back the last click not yet undone; returns it (None: nothing to undo)."""
        with self.db:
            last = self.db.execute(
                "SELECT id, row, label, verdict FROM label_events WHERE undone = 0 "
                "ORDER BY id DESC LIMIT 1"
            ).fetchone()
            if last is None:
                return None
            self.db.execute("UPDATE label_events SET undone = 1 WHERE id = ?", (last[0],))
            self._settle(last[1], last[2])
        return {"id": last[0], "row": last[1], "label": last[2], "verdict": last[3]}

    def _settle(self, row: int, label: str) -> None:
        """Set ``labels`` for (row, label) from its latest yes/no click not undone."""
        latest = self.db.execute(
            "SELECT verdict FROM label_events WHERE row = ? AND label = ? AND undone = 0 "
            "AND verdict != 'skip' ORDER BY id DESC LIMIT 1",
            (row, label),
        ).fetchone()
        self.db.execute("DELETE FROM labels WHERE row = ? AND label = ?", (row, label))
        if latest is not None:
            self.db.execute(
                "INSERT INTO labels VALUES (?, ?, ?)", (row, label, int(latest[0] == "yes"))
            )

    def labels(self, label: str | None = None) -> pd.DataFrame:
        """Current verdicts: ``row, label, verdict`` (1: is, 0: is not), ``file, start,
        end``; of one label, or all."""
        where, params = ("WHERE l.label = ?", (label,)) if label is not None else ("", ())
        return pd.read_sql_query(
            "SELECT l.row, l.label, l.verdict, f.path AS file, w.start, w.end FROM labels l "
            "JOIN windows w ON w.row = l.row JOIN files f ON f.id = w.file_id "
            f"{where} ORDER BY l.row",
            self.db,
            params=params,
        )

    def label_names(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT DISTINCT label FROM labels ORDER BY label")]

    def seen(self, label: str) -> set[int]:
        """Rows with any click for ``label`` not undone (yes, no or skip)."""
        return {
            r[0]
            for r in self.db.execute(
                "SELECT DISTINCT row FROM label_events WHERE label = ? AND undone = 0", (label,)
            )
        }


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")  # readers (the page) never block the writer
    db.execute("PRAGMA synchronous=NORMAL")  # WAL: a power cut loses at most the last file
    return db


def _unit(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=-1, keepdims=True), 1e-12)


def _blocks(vectors: np.ndarray, rows: int = SCAN_ROWS) -> Iterator[np.ndarray]:
    for start in range(0, len(vectors), rows):
        yield np.asarray(vectors[start : start + rows], np.float32)


# ---------------------------------------------------------------------------- indexing


@dataclass
class IndexReport:
    """What one ``index`` run did."""

    added: list[str] = field(default_factory=list)
    unchanged: int = 0
    replaced: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)
    audio_seconds: float = 0.0
    windows: int = 0
    elapsed: float = 0.0


class _Writer:
    """The one process adding vectors to an index (an exclusive ``flock``): cuts off
    what a killed run left past the committed count, then appends file by file."""

    def __init__(self, index: Index):
        self.index = index
        self.lock = open(index.folder / LOCK, "a")  # noqa: SIM115 - closed in close()
        try:
            fcntl.flock(self.lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.lock.close()
            raise SearchError(
                f"{index.folder}: another process is adding files to this index"
            ) from None
        self.row_bytes = index.embedder.dim * 4
        path = index.folder / VECTORS
        self.vectors = open(path, "ab+")  # noqa: SIM115 - closed in close()
        committed = index.count * self.row_bytes
        if os.fstat(self.vectors.fileno()).st_size > committed:
            self.vectors.truncate(committed)  # a killed run's unfinished file

    def close(self) -> None:
        self.vectors.close()
        self.lock.close()

    def add(
        self,
        path: str,
        size: int,
        mtime_ns: int,
        duration: float,
        windows: Iterator[tuple[float, float, np.ndarray]],
    ) -> int:
        """Append one file's ``(start, end, vector)`` windows and commit them with its
        row; a file indexed before under the same path is replaced. Returns the rows."""
        first = self.index.count
        spans: list[tuple[float, float]] = []
        chunk: list[np.ndarray] = []
        self.vectors.truncate(first * self.row_bytes)  # a failed file's rows; appends follow
        for start, end, vector in windows:
            spans.append((start, end))
            chunk.append(vector)
            if len(chunk) == 256:
                self.vectors.write(np.asarray(chunk, "<f4").tobytes())
                chunk = []
        if chunk:
            self.vectors.write(np.asarray(chunk, "<f4").tobytes())
        self.vectors.flush()
        os.fdatasync(self.vectors.fileno())
        db = self.index.db
        with db:
            old = db.execute("SELECT id, first_row, rows FROM files WHERE path = ?", (path,))
            for file_id, old_first, old_rows in old.fetchall():
                db.execute("INSERT INTO dead VALUES (?, ?)", (old_first, old_rows))
                db.execute("DELETE FROM windows WHERE file_id = ?", (file_id,))
                db.execute("DELETE FROM files WHERE id = ?", (file_id,))
                db.execute(
                    "DELETE FROM labels WHERE row >= ? AND row < ?",
                    (old_first, old_first + old_rows),
                )
            file_id = db.execute(
                "INSERT INTO files (path, size, mtime_ns, duration, first_row, rows, added) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (path, size, mtime_ns, duration, first, len(spans), time.time()),
            ).lastrowid
            db.executemany(
                "INSERT INTO windows VALUES (?, ?, ?, ?)",
                [(first + i, file_id, s, e) for i, (s, e) in enumerate(spans)],
            )
            db.execute(
                "UPDATE meta SET value = ? WHERE key = 'vectors'", (str(first + len(spans)),)
            )
        return len(spans)


def file_windows(
    classifier: Classifier, path: str | os.PathLike, hop_seconds: float, bar=None
) -> tuple[float, Iterator[tuple[float, float, np.ndarray]]]:
    """A file's duration and its windows ``(start s, end s, embedding)``, every
    ``hop_seconds``, through the featuriser's block stream and the one windowed scorer
    (:func:`~soundsight.detection.file_blocks`, :func:`~soundsight.detection.score_each_window`)."""
    from .detection import file_blocks, score_each_window, window_starts

    features, view = classifier.features, classifier.view
    window = view.frames
    assert window is not None
    frames, blocks = file_blocks(classifier, path)
    hop = max(1, round(hop_seconds * features.sample_rate / features.hop_length))
    starts = window_starts(frames, window, hop)
    duration = features.frames_to_seconds(frames)
    length = features.frames_to_seconds(window)

    def windows() -> Iterator[tuple[float, float, np.ndarray]]:
        scored = score_each_window(classifier, frames, blocks, starts, embed=True, bar=bar)
        for first, (_, embedding) in zip(starts, scored, strict=True):
            start = features.frames_to_seconds(int(first)) if frames > window else 0.0
            assert embedding is not None
            yield start, min(start + length, duration), embedding

    return duration, windows()


def parse_shard(text: str) -> tuple[int, int]:
    """``'i/n'`` -> ``(i, n)``, with ``0 <= i < n``."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not 0 <= int(match[1]) < int(match[2]):
        raise ConfigError(f"--shard must be 'i/n' with 0 <= i < n, got {text!r}")
    return int(match[1]), int(match[2])


def build_index(
    inputs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    model: str | os.PathLike | None = None,
    backbone: str = DEFAULT_BACKBONE,
    window_seconds: float | None = None,
    hop_seconds: float | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
) -> IndexReport:
    """Index audio files and folders into ``out`` (see the module docstring).

    Files already in the index, unchanged (same size and mtime), are skipped; changed
    ones are embedded again. With ``shard=(i, n)`` only every ``n``-th file (by sorted
    path) from the ``i``-th is done, into ``out/shard-IofN``; :func:`merge_shards`
    joins them. Files that cannot be decoded are listed in the report; the rest goes
    on. ``hop_seconds`` defaults to half the window.
    """
    from tqdm.auto import tqdm

    from .audio import AudioError, clip_duration
    from .layouts import audio_files

    started = time.monotonic()
    index_no, count = shard
    if not 0 <= index_no < count:
        raise ConfigError(f"shard index must be in 0..{count - 1}, got {index_no}")
    if hop_seconds is not None and not (math.isfinite(hop_seconds) and hop_seconds > 0):
        raise ConfigError(f"hop must be a positive number of seconds, got {hop_seconds}")
    listed, skipped = audio_files(inputs)
    report = IndexReport(failures=list(skipped))
    paths = sorted({str(Path(p).resolve()) for p in listed})[index_no::count]
    folder = Path(out) if count == 1 else Path(out) / SHARD_NAME.format(index=index_no, count=count)
    classifier, embedder = load_embedder(model, backbone, window_seconds)
    if hop_seconds is not None:
        embedder = Embedder(**{**asdict(embedder), "hop_seconds": hop_seconds})
    index = Index.create(folder, embedder)
    writer = _Writer(index)
    hop = index.embedder.hop_seconds
    try:
        known = {
            path: (size, mtime)
            for path, size, mtime in index.db.execute("SELECT path, size, mtime_ns FROM files")
        }
        todo: list[tuple[str, os.stat_result]] = []
        for path in paths:
            try:
                stat = os.stat(path)
            except OSError as err:
                report.failures.append((path, f"cannot access file ({err.strerror})"))
                continue
            if known.get(path) == (stat.st_size, stat.st_mtime_ns):
                report.unchanged += 1
            else:
                todo.append((path, stat))
        durations, total = {}, 0.0
        for path, _ in todo:
            with contextlib.suppress(AudioError):
                durations[path] = clip_duration(path)
                total += durations[path] / 3600  # summed as the bar will add them
        with tqdm(
            total=total,
            desc="index",
            unit="h audio",
            disable=not progress,
            bar_format="{l_bar}{bar}| {n:.3f}/{total:.3f} h audio [{elapsed}<{remaining}, "
            "{rate_noinv_fmt}]",
        ) as bar:
            for path, stat in todo:
                try:
                    duration, windows = file_windows(classifier, path, hop)
                    report.windows += writer.add(
                        path, stat.st_size, stat.st_mtime_ns, duration, windows
                    )
                except AudioError as err:
                    report.failures.append((path, err.reason))
                    continue
                (report.replaced if path in known else report.added).append(path)
                report.audio_seconds += duration
                bar.update(durations.get(path, duration) / 3600)
    finally:
        writer.close()
        index.close()
    report.elapsed = time.monotonic() - started
    return report


def merge_shards(out: str | os.PathLike) -> IndexReport:
    """Join every ``out/shard-IofN`` index into ``out`` (file by file, each committed:
    a killed merge resumes where it stopped; files already in ``out`` are skipped).
    The shard folders are kept: remove them once the merge is done."""
    started = time.monotonic()
    shards = sorted(Path(out).glob("shard-*of*"))
    if not shards:
        raise SearchError(f"{out}: no shard-IofN folders to merge")
    report = IndexReport()
    first = Index(shards[0])
    index = Index.create(out, first.embedder)
    first.close()
    writer = _Writer(index)
    try:
        known = {p for (p,) in index.db.execute("SELECT path FROM files")}
        for folder in shards:
            shard = Index(folder)
            if not shard.embedder.same_network(index.embedder):
                raise SearchError(
                    f"{folder} was built with {shard.embedder}, {out} with {index.embedder}"
                )
            vectors = shard.vectors()
            for path, size, mtime, duration, first_row, rows in shard.db.execute(
                "SELECT path, size, mtime_ns, duration, first_row, rows FROM files"
            ).fetchall():
                if path in known:
                    report.unchanged += 1
                    continue
                spans = shard.db.execute(
                    "SELECT start, end FROM windows WHERE row >= ? AND row < ? ORDER BY row",
                    (first_row, first_row + rows),
                ).fetchall()
                windows = ((s, e, vectors[first_row + i]) for i, (s, e) in enumerate(spans))
                report.windows += writer.add(path, size, mtime, duration, windows)
                report.added.append(path)
                report.audio_seconds += duration
            shard.close()
    finally:
        writer.close()
        index.close()
    report.elapsed = time.monotonic() - started
    return report


# ------------------------------------------------------------------------------ search


@dataclass
class Query:
    """A query as the index searches it: a standardised unit vector, what it was
    (``note`` says when a short clip was padded) and, for a clip, its windows' raw
    embeddings (what per-file search pools; None for a label)."""

    vector: np.ndarray
    source: str
    note: str = ""
    windows: np.ndarray | None = None


def clip_query(
    index: Index,
    clip: Clip,
    start: float | None = None,
    end: float | None = None,
    classifier: Classifier | None = None,
) -> Query:
    """The query of a clip (a path, encoded bytes or a waveform at the network's rate),
    or of its ``start``..``end`` seconds: the element-wise maximum of its windows'
    embeddings, standardised. A stretch of a file in the index takes its stored
    windows inside the stretch (the one overlapping most when none lies inside);
    anything else is embedded by the index's network (loaded when ``classifier`` is
    None) over its evaluation windows, a clip shorter than a window padded with silence
    and ``note`` saying so.

    The maximum, not the mean: aisfx max-pools over time, so the maximum over a clip's
    windows is close to embedding it whole, and a bark followed by seconds of quiet
    stays a bark (a mean leans towards the quiet windows, which match every clip's
    quiet tail; ESC-50 fold 2, files ranked by their best window: precision@10 0.299
    against 0.276)."""
    if start is not None and end is not None and not end > start >= 0:
        raise SearchError(f"need 0 <= start < end, got start {start} and end {end}")
    source = "upload" if not isinstance(clip, str | os.PathLike) else str(clip)
    if start is not None or end is not None:
        source += f" [{start or 0:g}-{end if end is not None else 'end'} s]"
    if isinstance(clip, str | os.PathLike):
        rows = index.rows_of(clip)
        if rows is not None and len(rows):
            lo = 0.0 if start is None else start
            hi = math.inf if end is None else end
            inside = rows[(rows["start"] >= lo - 1e-3) & (rows["end"] <= hi + 1e-3)]
            if inside.empty:
                overlap = np.minimum(rows["end"], hi) - np.maximum(rows["start"], lo)
                inside = rows.iloc[[int(np.argmax(overlap.to_numpy()))]]
            vectors = np.asarray(index.vectors()[inside["row"].to_numpy()])
            return Query(index.standardised(vectors.max(0)[None])[0], source, windows=vectors)
    import torch

    from .prediction import score_windows

    classifier = classifier or embedder_for(index)
    features, view = classifier.features, classifier.view
    assert view.frames is not None
    wave = classifier.featurise.waveform(clip)
    rate = features.sample_rate
    if start is not None or end is not None:
        wave = wave[int(round((start or 0) * rate)) : None if end is None else int(end * rate)]
    if len(wave) == 0:
        raise SearchError(f"{source}: no audio in the query")
    note = ""
    seconds = len(wave) / rate
    if seconds < index.embedder.window_seconds - 1e-3:
        note = (
            f"the query is {seconds:.2f} s, shorter than the index's "
            f"{index.embedder.window_seconds:.2f}-s window: padded with silence"
        )
    db = classifier.featurise.log_mels([wave])[0]
    with torch.inference_mode():  # each window its own "clip": one embedding per window
        scored = score_windows(classifier.net, ([w[None]] for w in view.windows(db)), embed=True)
        windows = np.stack([cast(np.ndarray, embedding) for _, embedding in scored])
    return Query(index.standardised(windows.max(0)[None])[0], source, note, windows)


def label_query(index: Index, label: object) -> Query:
    """The centroid of the windows labelled ``label`` (standardised, renormalised)."""
    name = check_label(label)
    rows = index.labels(name)
    rows = rows[rows["verdict"] == 1]
    if rows.empty:
        known = ", ".join(index.label_names()) or "none yet"
        raise SearchError(f"no window is labelled {name!r} (labels: {known})")
    z = index.standardised(index.vectors()[rows["row"].to_numpy()]).mean(0)
    return Query(z / max(float(np.linalg.norm(z)), 1e-12), f"label {name!r}")


def nearest(index: Index, query: Query, top: int = 20, exclude: Iterable[int] = ()) -> pd.DataFrame:
    """The ``top`` nearest windows: ``row, file, start, end, distance`` (1 - cosine of
    standardised vectors), nearest first; rows in ``exclude`` are left out."""
    if top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")
    scores = index.similarities(query.vector)
    left_out = np.fromiter(exclude, int)
    if len(left_out):
        scores[left_out] = -np.inf
    alive = int(np.isfinite(scores).sum())
    k = min(top, alive)
    if k == 0:
        return pd.DataFrame(columns=["row", "file", "start", "end", "distance"])
    best = np.argpartition(-scores, k - 1)[:k]
    best = best[np.lexsort((best, -scores[best]))]  # ties (max-pooled twins): lower row first
    hits = index.windows(best)
    hits["distance"] = (1.0 - scores[best]).astype(np.float64)
    return hits


def nearest_files(index: Index, query: Query, top: int = 20) -> pd.DataFrame:
    """The ``top`` nearest files to a clip query, in :meth:`Index.file_space`: ``row``
    (the file's first window), ``file``, ``start`` 0, ``end`` (its duration) and
    ``distance`` (1 - cosine), nearest first; ties in row order."""
    if top < 1:
        raise ConfigError(f"--top must be at least 1, got {top}")
    if query.windows is None:
        raise SearchError(f"per-file search takes a clip query, not {query.source}")
    space = index.file_space()
    scores = space.vectors @ space.query(query.windows)
    best = np.lexsort((np.arange(len(scores)), -scores))[:top]
    files = space.files.iloc[best]
    return pd.DataFrame(
        {
            "row": files["first_row"].to_numpy(),
            "file": files["path"].to_numpy(),
            "start": 0.0,
            "end": files["duration"].to_numpy(np.float64),
            "distance": (1.0 - scores[best]).astype(np.float64),
        }
    )


def search(
    index: str | os.PathLike | Index,
    query: Clip | None = None,
    top: int = 20,
    start: float | None = None,
    end: float | None = None,
    label: str | None = None,
    model: str | os.PathLike | None = None,
    per_file: bool = False,
) -> tuple[pd.DataFrame, Query]:
    """Search an index by example: a clip (path, bytes or waveform), a stretch of a
    file (``start``/``end``), or a ``label`` (the centroid of its labelled windows).
    ``model``, when given, must be the network the index was built with. Returns the
    hits (windows, :func:`nearest`; with ``per_file``, whole files ranked as one
    vector each, :func:`nearest_files`) and the query (its ``note`` says when it was
    padded)."""
    opened = index if isinstance(index, Index) else Index(index)
    try:
        if (query is None) == (label is None):
            raise SearchError("search by a clip or by a label (one of them)")
        if label is not None:
            asked = label_query(opened, label)
        else:
            assert query is not None
            classifier = embedder_for(opened, model) if model is not None else None
            asked = clip_query(opened, query, start, end, classifier)
        if per_file:
            return nearest_files(opened, asked, top), asked
        return nearest(opened, asked, top), asked
    finally:
        if not isinstance(index, Index):
            opened.close()


# ------------------------------------------------------------------------------ export


def export_labels(index: str | os.PathLike | Index, out: str | os.PathLike) -> Path:
    """Write the windows labelled "is LABEL" as a dataset ``soundsight train`` reads:
    ``OUT/clips/<row>_<n>.wav`` (exactly the window, at the file's rate) and
    ``OUT/labels.csv`` with ``path, label, group, file, onset, offset`` (``group`` the
    source file, so a grouped split keeps a recording's windows on one side); read it
    with ``load_dataset(OUT, layout="csv", csv="labels.csv")`` or ``soundsight train
    OUT --layout csv --csv labels.csv``. Clip names come from window numbers, never
    from labels. Returns the CSV's path."""
    import soundfile as sf

    from .audio import read_segment
    from .tables import write_csv

    opened = index if isinstance(index, Index) else Index(index)
    try:
        labelled = opened.labels()
        labelled = labelled[labelled["verdict"] == 1].reset_index(drop=True)
        if labelled.empty:
            raise SearchError(f"{opened.folder}: no window is labelled yet")
        folder = Path(out)
        (folder / "clips").mkdir(parents=True, exist_ok=True)
        names = []
        for n, row in enumerate(labelled.itertuples()):
            name = f"clips/{row.row:08d}_{n}.wav"
            samples, rate = read_segment(str(row.file), float(row.start), float(row.end))

            def write(file, samples: np.ndarray = samples, rate: int = rate) -> None:
                sf.write(file, samples, rate, format="WAV")

            write_whole(folder / name, write, durable=False)
            names.append(name)
        table = pd.DataFrame(
            {
                "path": names,
                "label": labelled["label"].astype(str),
                "group": labelled["file"].astype(str),
                "file": labelled["file"].astype(str),
                "onset": labelled["start"].round(4),
                "offset": labelled["end"].round(4),
            }
        )
        return write_csv(table, folder / "labels.csv")
    finally:
        if not isinstance(index, Index):
            opened.close()

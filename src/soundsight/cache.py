"""The feature cache: every clip decoded and featurised once, read by training forever.

Layout on disk::

    CACHE/<feature-config digest>/config.json        the FeatureConfig
    CACHE/<digest>/clips/<ab>/<clip key>.npy         float16 log-mel (n_mels, frames)
    CACHE/<digest>/failures[-shard].csv              path, reason of the last run
    CACHE/<digest>/warnings[-shard].csv              path, reason: done, but see why

A clip key hashes the file's resolved path, size and modification time, so an edited
file or a different feature config never meets stale features. Each entry is written
to a temporary name, flushed to disk and renamed into place, so a killed run (or a
crashed machine) leaves whole entries or none, and a rerun only computes what is
missing. An entry is checked against its ``.npy`` header (dtype, shape, file size;
nothing else read) before use: a damaged one counts as missing, so ``prepare``
recomputes it. Entries are plain ``.npy`` files, opened with memory mapping: a random
time crop reads only its own pages. The worker pool lives in :mod:`soundsight.jobs`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from .audio import AudioError, ClipHeader, read_clip
from .config import config_from_dict, config_to_dict
from .errors import ConfigError, SoundsightError
from .features import LOG_MEL_DTYPE, FeatureConfig, Featuriser
from .files import write_all_whole, write_whole
from .jobs import ClipOutcome, JobReport, is_disk_full, run_clip_jobs, stopped_by_full_disk

#: Longest clip, in seconds, that prepare (and so train) featurises unless told
#: otherwise: read from the header before decoding, so a 10-hour recording fails with
#: its duration instead of filling the memory. Featurising holds the whole clip (the
#: log-mel is in dB relative to its own maximum): about 60 MB per minute of audio in
#: each worker, so the default bounds a worker near 0.6 GB.
MAX_DURATION = 600.0
#: Samples featurised in one batch inside a worker: bounds the STFT's memory. On a CPU
#: batching buys nothing (one 5-s clip alone: 1.5 ms; nine per batch: 2.4 ms each, out
#: of cache), so a batch holds one such clip, or several short ones.
BATCH_SAMPLES = 1 << 17


#: Where features are cached when no cache folder is named: entries are keyed by
#: feature config and file identity, so one cache serves every run and dataset safely.
DEFAULT_CACHE = Path(os.environ.get("SOUNDSIGHT_CACHE", Path.home() / ".cache" / "soundsight"))


class CacheError(SoundsightError, ValueError):
    """A cache folder that does not hold what was asked of it."""


def clip_key(path: str | os.PathLike) -> str:
    """Identity of a source file: its resolved path, size and modification time."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return hashlib.sha1(f"{resolved}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:24]


class FeatureCache:
    """Log-mel spectrograms of clips under one feature config, stored on disk.

    Parameters
    ----------
    root : str or Path
        The cache folder (it may hold several configs side by side).
    config : FeatureConfig, optional
        Which features; when omitted, the single config already in ``root`` is used.
    """

    def __init__(self, root: str | os.PathLike, config: FeatureConfig | None = None):
        root = Path(root)
        if (root / "config.json").is_file():
            # ``root`` is one config's folder itself: it must hold the features asked for.
            stored = _read_config(root / "config.json")
            if config is not None and stored != config:
                raise CacheError(
                    f"{root} holds features made with different parameters "
                    f"({_differences(stored, config)}); refusing to mix them. Use the "
                    f"cache's parent folder, and the right features are prepared beside them"
                )
            root, config = root.parent, stored
        self.root = root
        self.config = config or self._only_config(self.root)
        self.folder = self.root / self.config.digest
        config_file = self.folder / "config.json"
        if config_file.exists() and _read_config(config_file) != self.config:
            raise CacheError(f"{config_file}: holds {_read_config(config_file)}, not {self.config}")

    @staticmethod
    def _only_config(root: Path) -> FeatureConfig:
        configs = sorted(root.glob("*/config.json"))
        if len(configs) != 1:
            found = f"{len(configs)} configs" if configs else "no prepared features"
            raise CacheError(f"{root}: {found}; name the FeatureConfig to use")
        return _read_config(configs[0])

    def entry(self, path: str | os.PathLike) -> Path:
        """Where the features of the clip at ``path`` (as it is now) are stored."""
        key = clip_key(path)
        return self.folder / "clips" / key[:2] / f"{key}.npy"

    def __contains__(self, path) -> bool:
        """Whether the clip at ``path`` has a whole entry (a damaged one does not count)."""
        try:
            entry = self.entry(path)
        except OSError:
            return False
        return entry.exists() and _damage(entry, self.config.n_mels) is None

    def damage(self, path: str | os.PathLike) -> str | None:
        """Why the stored entry of the clip at ``path`` cannot be used (e.g. ``"empty
        (0 bytes)"``); None when it is whole or absent. Reads the entry's header only."""
        try:
            entry = self.entry(path)
        except OSError:
            return None
        return _damage(entry, self.config.n_mels)

    def stored_entry(self, path: str | os.PathLike) -> Path:
        """The cache entry of the clip at ``path`` as the file is now.

        Raises
        ------
        CacheError
            The source file cannot be read, or the clip is not in the cache.
        """
        try:
            entry = self.entry(path)
        except OSError as err:
            raise CacheError(f"{path}: cannot read the source file ({err.strerror})") from None
        if not entry.exists():
            raise CacheError(f"{path}: not in the cache {self.folder} (run prepare)")
        return entry

    def load(self, path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
        """Log-mel of a clip, ``(n_mels, frames)`` float16 in dB, memory-mapped.

        Raises
        ------
        CacheError
            The source file cannot be read, the clip is not in the cache, or its entry
            is damaged (the message names the clip, the entry and what is wrong).
        """
        entry = self.stored_entry(path)
        damage = _damage(entry, self.config.n_mels)
        if damage is not None:
            raise CacheError(
                f"{path}: its cache entry {entry} is damaged ({damage}); "
                "run prepare again to recompute it"
            )
        return np.load(entry, mmap_mode="r" if mmap else None)

    def write(self, path: str | os.PathLike, features: np.ndarray) -> Path:
        """Store one clip's features whole (:func:`~soundsight.files.write_whole`); a
        failed write (a full disk) leaves no temporary behind."""
        entry, save, tmp = self._entry_writer(path, features)
        return write_whole(entry, save, temporary=tmp)

    def write_many(self, items: Sequence[tuple[str, np.ndarray]]) -> dict[str, str]:
        """Store several clips' features whole, flushed to disk together (what
        ``prepare`` does per chunk of clips); returns the clips that could not be
        written, with the reason. A full disk is raised."""
        writers = {str(path): self._entry_writer(path, features) for path, features in items}
        failed = write_all_whole(list(writers.values()))
        by_entry = {entry: path for path, (entry, _, _) in writers.items()}
        return {
            by_entry[entry]: f"cannot write its output ({err})" for entry, err in failed.items()
        }

    def _entry_writer(self, path: str | os.PathLike, features: np.ndarray):
        entry = self.entry(path)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.stem}.{socket.gethostname()}.{os.getpid()}.tmp")
        data = np.ascontiguousarray(features, dtype=LOG_MEL_DTYPE)
        return entry, (lambda file: np.save(file, data)), tmp

    def save_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / "config.json"
        if not target.exists():
            text = json.dumps(config_to_dict(self.config), indent=2).encode()
            write_whole(target, lambda file: file.write(text))

    def remove_stale_temporaries(self) -> int:
        """Delete temporary files left by killed writers on this host."""
        host = socket.gethostname()
        removed = 0
        for tmp in self.folder.glob("clips/*/*.tmp"):
            # <key>.<host>.<pid>.tmp, where the host name may itself contain dots.
            _, _, rest = tmp.name.removesuffix(".tmp").partition(".")
            writer_host, _, pid = rest.rpartition(".")
            if writer_host == host and pid.isdigit() and not _pid_alive(int(pid)):
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("clips/*/*.npy"))


def _damage(entry: Path, n_mels: int) -> str | None:
    """Why ``entry`` is not a whole float16 ``(n_mels, frames)`` array, from its header
    and size alone; None when it is whole or absent."""
    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    try:
        with open(entry, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size == 0:
                return "empty (0 bytes)"
            version = np.lib.format.read_magic(handle)
            if version not in readers:
                return f"not a .npy file written by prepare (format version {version})"
            shape, fortran, dtype = readers[version](handle)
            data_start = handle.tell()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        return f"unreadable .npy header ({err})"
    if dtype != np.float16 or fortran or len(shape) != 2 or shape[0] != n_mels or not shape[1]:
        return f"holds a {dtype} array of shape {shape}, not float16 ({n_mels}, frames)"
    expected = data_start + shape[0] * shape[1] * dtype.itemsize
    if size != expected:
        return f"truncated: {size} bytes where its header needs {expected}"
    return None


def _read_config(path: Path) -> FeatureConfig:
    try:
        return config_from_dict(FeatureConfig, json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise CacheError(f"{path}: not a feature config ({err})") from None


def _differences(a: FeatureConfig, b: FeatureConfig) -> str:
    return ", ".join(
        f"{name} {getattr(a, name)} vs {getattr(b, name)}"
        for name in a.__dataclass_fields__
        if getattr(a, name) != getattr(b, name)
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def featurise_clips(
    paths: Sequence[str],
    featurise: Featuriser,
    max_duration: float | None = None,
) -> Iterable[tuple[str, np.ndarray | None, str | None, float, str | None]]:
    """Decode and featurise clips in batches bounded by :data:`BATCH_SAMPLES`.

    Yields ``(path, features or None, error or None, audio seconds, warning or None)``
    per clip. A clip whose header says it lasts over ``max_duration`` seconds fails
    without being decoded; a truncated one is featurised from what it holds, with a
    warning.
    """
    config = featurise.config
    pending: list[tuple[str, np.ndarray, str | None]] = []

    def flush():
        features = featurise.log_mels([wave for _, wave, _ in pending])
        for (path, wave, warning), row in zip(pending, features, strict=True):
            yield path, row, None, len(wave) / config.sample_rate, warning
        pending.clear()

    def refuse(header: ClipHeader) -> str | None:
        if max_duration is not None and header.duration > max_duration:
            return _too_long(header.duration, max_duration)
        return None

    for path in paths:
        try:
            # The header's length bounds the read too: a header that understates the
            # length (a damaged file) cannot make this clip grow past the limit.
            wave, header = read_clip(path, config.sample_rate, max_duration, refuse)
        except AudioError as err:
            yield path, None, err.reason, 0.0, None
            continue
        except Exception as err:  # noqa: BLE001 - a broken clip must never stop the batch
            yield path, None, f"{type(err).__name__}: {err}", 0.0, None
            continue
        if pending and sum(len(w) for _, w, _ in pending) + len(wave) > BATCH_SAMPLES:
            yield from flush()
        pending.append((path, wave, header.truncated))
    if pending:
        yield from flush()


def _too_long(duration: float, limit: float) -> str:
    hours, rest = divmod(round(duration), 3600)
    return (
        f"lasts {duration:.1f} s ({hours} h {rest // 60:02d} min {rest % 60:02d} s), over "
        f"the limit of {limit:g} s per clip (prepare's max_duration); not decoded. Raise "
        "max_duration to prepare it, or cut the recording into shorter clips"
    )


def featurise_job(
    config: FeatureConfig,
    write: Callable[[list[tuple[str, np.ndarray]]], dict[str, str]],
    cache: FeatureCache | None = None,
    max_duration: float | None = None,
) -> dict:
    """Worker set-up for :func:`~soundsight.jobs.run_clip_jobs`: decode and featurise
    each clip of a chunk (see :func:`featurise_clips`), then ``write(items)`` the
    chunk's ``(path, log_mel)`` pairs together, which returns the clips it could not
    write and why. Those fail alone; a full disk stops the job (it is raised). Clips
    already in ``cache`` (same config) are read from it instead of decoded."""
    featurise = Featuriser(config)

    def from_cache(chunk: list[str], decode: list[str]):
        for path in chunk:
            if cache is None or path not in cache:
                decode.append(path)
                continue
            try:
                features = np.asarray(cache.load(path, mmap=False), np.float32)
            except (CacheError, OSError, ValueError):  # a damaged entry: decode instead
                decode.append(path)
                continue
            # The clip's length to within one hop: the cache keeps frames, not samples.
            yield path, features, None, config.frames_to_seconds(features.shape[1] - 1), None

    def process(chunk: list[str]) -> list[ClipOutcome]:
        decode: list[str] = []
        results = []
        done: list[tuple[str, np.ndarray]] = []
        # featurise_clips starts once from_cache is exhausted: ``decode`` is complete.
        for path, features, error, seconds, warning in itertools.chain(
            from_cache(chunk, decode), featurise_clips(decode, featurise, max_duration)
        ):
            if error is None:
                done.append((path, features))
            results.append(ClipOutcome(path, error, seconds, warning))
        unwritten = write(done)
        return [
            outcome._replace(error=unwritten[outcome.path])
            if outcome.path in unwritten
            else outcome
            for outcome in results
        ]

    return {"process": process}


def prepare(
    clips: pd.DataFrame | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: FeatureConfig | None = None,
    workers: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    max_duration: float | None = MAX_DURATION,
) -> tuple[FeatureCache, JobReport]:
    """Decode and featurise every clip not yet in the cache at ``out``.

    Parameters
    ----------
    clips : DataFrame or sequence of paths
        A dataset table (see :func:`soundsight.load_dataset`) or audio file paths.
    out : path
        Cache folder; created if needed.
    config : FeatureConfig, optional
        Feature parameters (defaults to ``FeatureConfig()``).
    workers : int, optional
        Worker processes (default: one per core; 0 runs in this process).
    shard : (index, count)
        Only do the clips of shard ``index`` of ``count`` (by sorted path), so that
        several machines can fill one cache; entries need no merging.
    progress : bool
        Show a progress bar.
    max_duration : float or None
        Longest clip in seconds (default :data:`MAX_DURATION`, 10 minutes), read from
        each file's header before it is decoded: a longer clip fails, with its duration
        and the limit as the reason, and the others go on. It bounds each worker's
        memory (see :data:`MAX_DURATION`); None lifts the limit. Not a feature
        parameter: entries made under any limit are the same.

    Returns
    -------
    (FeatureCache, JobReport)
        The cache, and what was done, skipped, failed and warned about. Failures and
        warnings (truncated files, recomputed damaged entries, files the dataset
        listing left out) are also written to ``failures.csv`` and ``warnings.csv`` in
        the cache's config folder.

    Raises
    ------
    DiskFullError
        The disk filled up: the message names the cache folder and how many entries
        are whole; no temporary file is left, and rerunning the same call resumes.

    Examples
    --------
    >>> cache, report = prepare(load_dataset("data/fsdd"), "cache")  # doctest: +SKIP
    >>> print(report.summary("prepared"))  # doctest: +SKIP
    prepared 3000 clips, skipped 0 already done, 0 failed, 0 warnings, in 20.1 s (...)
    """
    config = config or FeatureConfig()
    if max_duration is not None and not max_duration > 0:
        raise ConfigError(f"max_duration must be a positive number of seconds, got {max_duration}")
    listing = clips.attrs.get("skipped", []) if isinstance(clips, pd.DataFrame) else []
    paths = list(clips["path"]) if isinstance(clips, pd.DataFrame) else [str(p) for p in clips]
    paths = sorted(set(map(str, paths)))
    index, count = shard
    if not 0 <= index < count:
        raise ConfigError(f"shard index must be in 0..{count - 1}, got {index}")
    paths = paths[index::count]
    cache = FeatureCache(out, config)
    cache.save_config()
    cache.remove_stale_temporaries()
    todo = [p for p in paths if p not in cache]
    report = JobReport(total=len(paths), skipped=len(paths) - len(todo))
    if index == 0:  # the dataset's listing is one per run, not one per shard
        report.warnings.extend(listing)
    for path in todo:
        damage = cache.damage(path)
        if damage is not None:
            report.warnings.append((path, f"cache entry was damaged ({damage}); recomputed"))
    suffix = "" if count == 1 else f"-shard{index}of{count}"
    try:
        # Workers are forked, so the bound method travels without pickling.
        run_clip_jobs(
            todo,
            featurise_job,
            (config, cache.write_many, None, max_duration),
            workers,
            "prepare",
            progress,
            report,
        )
        report.write_failures(cache.folder / f"failures{suffix}.csv")
        report.write_warnings(cache.folder / f"warnings{suffix}.csv")
    except OSError as err:
        if not is_disk_full(err):
            raise
        cache.remove_stale_temporaries()  # those of the pool's workers, now ended
        kept = sum(p in cache for p in paths)
        raise stopped_by_full_disk(err, cache.folder, report, kept, len(paths), "entries") from None
    return cache, report

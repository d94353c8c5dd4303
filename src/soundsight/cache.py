"""The feature cache: every clip decoded and featurised once, read by training forever.

Layout on disk::

    CACHE/<feature-config digest>/config.json        the FeatureConfig
    CACHE/<digest>/clips/<ab>/<clip key>.npy         float16 log-mel (n_mels, frames)
    CACHE/<digest>/failures[-shard].csv              path, reason of the last run

A clip key hashes the file's resolved path, size and modification time, so an edited
file or a different feature config never meets stale features. Each entry is written
to a temporary name and renamed into place, so a killed run leaves whole entries or
none, and a rerun only computes what is missing. Entries are plain ``.npy`` files,
opened with memory mapping: a random time crop reads only its own pages.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import multiprocessing
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .audio import AudioError, load_clip
from .config import config_from_dict, config_to_dict
from .errors import ConfigError, SoundsightError
from .features import FeatureConfig, LogMel, flush_denormals

#: Most clips handed to a worker at once, and most source bytes in one such chunk:
#: small enough to keep memory bounded for long clips, large enough to amortise IPC.
CHUNK_CLIPS = 16
CHUNK_BYTES = 16 << 20
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
        try:
            return self.entry(path).exists()
        except OSError:
            return False

    def load(self, path: str | os.PathLike, mmap: bool = True) -> np.ndarray:
        """Log-mel of a clip, ``(n_mels, frames)`` float16 in dB, memory-mapped."""
        try:
            entry = self.entry(path)
        except OSError as err:
            raise CacheError(f"{path}: cannot read the source file ({err.strerror})") from None
        if not entry.exists():
            raise CacheError(f"{path}: not in the cache {self.folder} (run prepare)")
        return np.load(entry, mmap_mode="r" if mmap else None)

    def write(self, path: str | os.PathLike, features: np.ndarray) -> Path:
        """Store one clip's features atomically (temporary file, then rename)."""
        entry = self.entry(path)
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.stem}.{socket.gethostname()}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:
            np.save(handle, np.ascontiguousarray(features, dtype=np.float16))
        os.replace(tmp, entry)
        return entry

    def save_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.folder / "config.json"
        if not target.exists():
            tmp = target.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(config_to_dict(self.config), indent=2))
            os.replace(tmp, target)

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


@dataclass
class JobReport:
    """Outcome of a run over many clips (prepare, export-images)."""

    total: int = 0
    done: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    audio_seconds: float = 0.0
    seconds: float = 0.0

    @property
    def failed(self) -> int:
        return len(self.failures)

    def summary(self, what: str) -> str:
        rate = self.done / self.seconds if self.seconds else 0.0
        realtime = self.audio_seconds / self.seconds if self.seconds else 0.0
        return (
            f"{what} {self.done} clips, skipped {self.skipped} already done, "
            f"{self.failed} failed, in {self.seconds:.1f} s "
            f"({rate:.0f} clips/s, {realtime:.0f}x real time)"
        )

    def write_failures(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "reason"])
            writer.writerows(self.failures)
        os.replace(tmp, path)


# Worker-process state, set once per process by the pool initializer.
_WORKER: dict = {}


def _init_worker(setup: Callable[..., dict], args: tuple) -> None:
    # One thread per process: the pool already uses every core, and torch's
    # intra-op threads would only contend. Silent stretches make subnormal floats
    # that slow every op about five-fold unless flushed to zero.
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    _WORKER.clear()
    _WORKER.update(setup(*args))


def _run_chunk(chunk: list[str]) -> list[tuple[str, str | None, float]]:
    return _WORKER["process"](chunk)


def _chunks(paths: Sequence[str]) -> list[list[str]]:
    """Group paths into worker tasks of similar clip size, largest first."""
    sizes = {}
    for path in paths:
        try:
            sizes[path] = os.path.getsize(path)
        except OSError:
            sizes[path] = 0  # the worker reports why it cannot read it
    ordered = sorted(paths, key=lambda p: -sizes[p])
    chunks, current, current_bytes = [], [], 0
    for path in ordered:
        if current and (len(current) >= CHUNK_CLIPS or current_bytes + sizes[path] > CHUNK_BYTES):
            chunks.append(current)
            current, current_bytes = [], 0
        current.append(path)
        current_bytes += sizes[path]
    if current:
        chunks.append(current)
    return chunks


def run_clip_jobs(
    paths: Sequence[str],
    setup: Callable[..., dict],
    setup_args: tuple,
    workers: int | None,
    desc: str,
    progress: bool = True,
) -> JobReport:
    """Run a per-clip job over ``paths`` in worker processes, with a progress bar.

    ``setup(*setup_args)`` runs once in each worker and returns ``{"process": fn}``
    where ``fn(list_of_paths)`` returns ``(path, error_or_None, audio_seconds)`` per
    clip; it must catch per-clip errors so that one bad clip never stops the rest.
    ``workers=0`` runs in this process.
    """
    report = JobReport(total=len(paths))
    start = time.perf_counter()
    chunks = _chunks(paths)
    workers = (os.cpu_count() or 1) if workers is None else workers
    with tqdm(total=len(paths), desc=desc, unit="clip", disable=not progress) as bar:

        def collect(results: Iterable[tuple[str, str | None, float]]) -> None:
            for path, error, seconds in results:
                if error is None:
                    report.done += 1
                    report.audio_seconds += seconds
                else:
                    report.failures.append((path, error))
                bar.update(1)
            bar.set_postfix(failed=report.failed, refresh=False)

        if workers == 0 or len(chunks) <= 1:
            previous = dict(_WORKER)
            threads = torch.get_num_threads()  # _init_worker sets 1; the caller's is restored
            try:
                with flush_denormals():  # _init_worker's flushing must not outlive this
                    _init_worker(setup, setup_args)
                    for chunk in chunks:
                        collect(_run_chunk(chunk))
            finally:
                _WORKER.clear()
                _WORKER.update(previous)
                torch.set_num_threads(threads)
        else:
            # fork, as torch's DataLoader does: workers inherit the imported libraries
            # (spawn/forkserver re-import torch and librosa, ~4 s, longer than preparing
            # ESC-50). Like DataLoader workers they set one thread before any torch op,
            # which keeps fork safe after the parent has used OpenMP.
            context = multiprocessing.get_context("fork")
            with context.Pool(
                min(workers, len(chunks)), initializer=_init_worker, initargs=(setup, setup_args)
            ) as pool:
                for results in pool.imap_unordered(_run_chunk, chunks):
                    collect(results)
    report.seconds = time.perf_counter() - start
    return report


def featurise_clips(
    paths: Sequence[str], config: FeatureConfig, logmel: LogMel
) -> Iterable[tuple[str, np.ndarray | None, str | None, float]]:
    """Decode and featurise clips in batches bounded by :data:`BATCH_SAMPLES`.

    Yields ``(path, features or None, error or None, audio seconds)`` per clip.
    """
    pending: list[tuple[str, np.ndarray]] = []

    def flush():
        lengths = torch.tensor([len(w) for _, w in pending])
        batch = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(w) for _, w in pending], True)
        with torch.inference_mode():
            features = logmel(batch, lengths).numpy()
        for (path, wave), row in zip(pending, features, strict=True):
            frames = config.num_frames(len(wave))
            yield path, row[:, :frames], None, len(wave) / config.sample_rate
        pending.clear()

    for path in paths:
        try:
            wave = load_clip(path, config.sample_rate)
        except AudioError as err:
            yield path, None, err.reason, 0.0
            continue
        except Exception as err:  # noqa: BLE001 - a broken clip must never stop the batch
            yield path, None, f"{type(err).__name__}: {err}", 0.0
            continue
        if pending and sum(len(w) for _, w in pending) + len(wave) > BATCH_SAMPLES:
            yield from flush()
        pending.append((path, wave))
    if pending:
        yield from flush()


def featurise_job(
    config: FeatureConfig,
    write: Callable[[str, np.ndarray], object],
    cache: FeatureCache | None = None,
) -> dict:
    """Worker set-up for :func:`run_clip_jobs`: decode and featurise each clip, then
    ``write(path, log_mel)``; an ``OSError`` from ``write`` fails that clip only.
    Clips already in ``cache`` (same config) are read from it instead of decoded."""
    logmel = LogMel(config)

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
            yield path, features, None, config.frames_to_seconds(features.shape[1] - 1)

    def process(chunk: list[str]) -> list[tuple[str, str | None, float]]:
        decode: list[str] = []
        results = []
        # featurise_clips starts once from_cache is exhausted: ``decode`` is complete.
        for path, features, error, seconds in itertools.chain(
            from_cache(chunk, decode), featurise_clips(decode, config, logmel)
        ):
            if error is None:
                try:
                    write(path, features)
                except OSError as err:
                    error = f"cannot write its output ({err})"
            results.append((path, error, seconds))
        return results

    return {"process": process}


def prepare(
    clips: pd.DataFrame | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    config: FeatureConfig | None = None,
    workers: int | None = None,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
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

    Returns
    -------
    (FeatureCache, JobReport)
        The cache, and what was done, skipped and failed. Failures are also written
        to ``failures.csv`` in the cache's config folder.
    """
    config = config or FeatureConfig()
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
    # Workers are forked, so the bound method travels without pickling.
    report = run_clip_jobs(todo, featurise_job, (config, cache.write), workers, "prepare", progress)
    report.total = len(paths)
    report.skipped = len(paths) - len(todo)
    name = "failures.csv" if count == 1 else f"failures-shard{index}of{count}.csv"
    report.write_failures(cache.folder / name)
    return cache, report

"""The worker pool that runs one job per clip (prepare, export-images) and its report.

A job is a ``setup`` function run once in each worker process; it returns
``{"process": fn}`` where ``fn(chunk_of_paths)`` returns one :class:`ClipOutcome` per
clip. Clips travel in chunks of similar file size (at most :data:`CHUNK_CLIPS` clips,
:data:`CHUNK_BYTES` bytes) so that memory stays bounded and IPC is amortised. One bad
clip is one failure in the :class:`JobReport`; a full disk stops the job (every clip
after it would fail the same way) as an ``OSError`` whose :func:`is_disk_full` is true.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from tqdm.auto import tqdm

from .errors import SoundsightError
from .features import flush_denormals
from .tables import write_csv

#: Most clips handed to a worker at once, and most source bytes in one such chunk:
#: small enough to keep memory bounded for long clips, large enough to amortise IPC.
CHUNK_CLIPS = 16
CHUNK_BYTES = 16 << 20

#: errno values of a write that failed for want of space (disk full, quota exceeded).
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write refused because the disk (or quota) is full."""
    return isinstance(err, OSError) and err.errno in DISK_FULL


class DiskFullError(SoundsightError):
    """A run stopped because its output disk is full; the message says what was kept
    and that rerunning resumes."""


def stopped_by_full_disk(
    err: OSError, folder: Path, report: JobReport, kept: int, total: int, what: str
) -> DiskFullError:
    """The error for a job that ``err`` (a full disk) stopped while writing to
    ``folder``: ``kept`` of ``total`` outputs (``what``: "entries", "images") are whole."""
    return DiskFullError(
        f"{folder}: the disk is full ({err.strerror}); stopped after "
        f"{report.done} clips done and {report.failed} failed in this run. {kept} of {total} "
        f"{what} are whole and kept, no partial file is left. Free some space and rerun the "
        f"same command: it resumes with the {total - kept} left"
    )


class ClipOutcome(NamedTuple):
    """What a job did with one clip."""

    path: str
    #: Why the clip failed (nothing was written for it), or None.
    error: str | None
    #: Seconds of audio processed.
    seconds: float
    #: Something the user should know although the clip was done (e.g. truncated).
    warning: str | None = None


@dataclass
class JobReport:
    """Outcome of a run over many clips (prepare, export-images).

    ``failures`` and ``warnings`` are ``(path, reason)`` pairs: failed clips produced
    nothing; warnings name clips that were done but not as asked (a truncated file) and
    entries that were left out while listing the clips (a broken symlink).
    """

    total: int = 0
    done: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
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
            f"{self.failed} failed, {len(self.warnings)} warnings, in {self.seconds:.1f} s "
            f"({rate:.0f} clips/s, {realtime:.0f}x real time)"
        )

    def write_failures(self, path: Path) -> None:
        """Write ``failures`` as a ``path, reason`` CSV (atomically, see tables)."""
        _write_pairs(self.failures, path)

    def write_warnings(self, path: Path) -> None:
        """Write ``warnings`` as a ``path, reason`` CSV (atomically, see tables)."""
        _write_pairs(self.warnings, path)


def _write_pairs(pairs: list[tuple[str, str]], path: Path) -> None:
    write_csv(pd.DataFrame(pairs, columns=["path", "reason"], dtype=object), path)


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


def _run_chunk(chunk: list[str]) -> list[ClipOutcome]:
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
    chunks: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
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
    report: JobReport | None = None,
) -> JobReport:
    """Run a per-clip job over ``paths`` in worker processes, with a progress bar.

    ``setup(*setup_args)`` runs once in each worker and returns ``{"process": fn}``
    where ``fn(list_of_paths)`` returns a :class:`ClipOutcome` per clip; it must catch
    per-clip errors so that one bad clip never stops the rest. ``workers=0`` runs in
    this process. Outcomes are added to ``report`` (a new one by default) as they come,
    so that a caller still holds what was done when an error (a full disk) stops the
    job part-way.
    """
    report = report or JobReport(total=len(paths))
    start = time.perf_counter()
    chunks = _chunks(paths)
    workers = (os.cpu_count() or 1) if workers is None else workers
    with tqdm(total=len(paths), desc=desc, unit="clip", disable=not progress) as bar:

        def collect(results: Iterable[ClipOutcome]) -> None:
            for outcome in results:
                if outcome.error is None:
                    report.done += 1
                    report.audio_seconds += outcome.seconds
                else:
                    report.failures.append((outcome.path, outcome.error))
                if outcome.warning is not None:
                    report.warnings.append((outcome.path, outcome.warning))
                bar.update(1)
            bar.set_postfix(failed=report.failed, refresh=False)

        try:
            if workers == 0 or len(chunks) <= 1:
                previous = dict(_WORKER)
                threads = torch.get_num_threads()  # _init_worker sets 1; restored below
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
                # (spawn/forkserver re-import torch and librosa, ~4 s, longer than
                # preparing ESC-50). Like DataLoader workers they set one thread before
                # any torch op, which keeps fork safe after the parent has used OpenMP.
                context = multiprocessing.get_context("fork")
                with context.Pool(
                    min(workers, len(chunks)),
                    initializer=_init_worker,
                    initargs=(setup, setup_args),
                ) as pool:
                    for results in pool.imap_unordered(_run_chunk, chunks):
                        collect(results)
        finally:
            report.seconds = time.perf_counter() - start
    return report

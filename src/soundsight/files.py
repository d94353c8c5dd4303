"""Writing files whole: a temporary name beside the target, flushed to disk, renamed.

Readers (training, a browser, a second process) never see half a file: a write that
fails or is killed leaves the old file, or none, and removes its temporary. The data
is flushed with ``fdatasync`` before the rename, so a power cut cannot leave a renamed
but empty file either (``fdatasync`` rather than ``fsync``: the data is what must be
durable, not the timestamps; it costs half as much here).
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_whole(
    path: str | os.PathLike,
    write: Callable[[BinaryIO], object],
    temporary: str | os.PathLike | None = None,
    durable: bool = True,
) -> Path:
    """Write ``path`` atomically with ``write(file)`` and return it.

    Parameters
    ----------
    path : path-like
        The target; its folder is created when missing.
    write : callable
        Writes the content into the binary file it is given.
    temporary : path-like, optional
        The temporary's name, for callers that clean up stale temporaries by their
        names (the feature cache names them by host and process); default a unique
        name beside the target.
    durable : bool
        Flush the data to disk before the rename. False for files that are cheap to
        make again and many (exported PNGs): the rename still makes them whole after
        any crash of the process, not after a power cut.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if temporary is None:
        handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        file = os.fdopen(handle, "wb")
    else:
        tmp = Path(temporary)
        file = open(tmp, "wb")  # noqa: SIM115 - closed below, before the rename
    try:
        with file:
            write(file)
            file.flush()
            if durable:
                os.fdatasync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_all_whole(
    items: list[tuple[Path, Callable[[BinaryIO], object], Path]],
) -> dict[Path, OSError]:
    """Write several files whole with one wait for the disk: every temporary is written,
    then each is flushed (``fdatasync``; once the first has committed the file system's
    journal the others find little left to do), then each renamed into place.

    ``items`` are ``(target, write, temporary)``. Returns the targets that failed, with
    their error (their temporaries removed); the rest are in place. A full disk is
    raised after the files written whole before it are in place.

    Per-file ``fdatasync`` costs about 2 ms here, more than featurising a 5-s clip;
    flushing a chunk of entries together costs a fraction of that per entry.
    """
    failed: dict[Path, OSError] = {}
    written: list[tuple[Path, Path]] = []
    full: OSError | None = None
    try:
        for target, write, tmp in items:
            try:
                with open(tmp, "wb") as file:
                    write(file)
                written.append((target, tmp))
            except OSError as err:
                Path(tmp).unlink(missing_ok=True)
                if err.errno == errno.ENOSPC:
                    full = err  # keep what was written whole, then say so
                    break
                failed[target] = err
        for _, tmp in written:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        while written:
            target, tmp = written[0]
            os.replace(tmp, target)
            written.pop(0)
        if full is not None:
            raise full
    except BaseException:
        for _, tmp in written:
            Path(tmp).unlink(missing_ok=True)
        raise
    return failed

"""Writing files whole: a temporary name beside the target, flushed to disk, renamed.

Readers (training, a browser, a second process) never see half a file: a write that
fails or is killed leaves the old file, or none, and removes its temporary. The data
is flushed with ``fdatasync`` before the rename, so a power cut cannot leave a renamed
but empty file either (``fdatasync`` rather than ``fsync``: the data is what must be
durable, not the timestamps; it costs half as much here).
"""

from __future__ import annotations

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

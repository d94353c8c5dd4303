"""Writing the report's files whole: a unique temporary name, flushed, renamed into place.

Readers of a run folder (a browser, a second ``report``) never see half a PNG or half a
``report.html``, and two processes writing the same file never share a temporary.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_whole(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` atomically with ``write(file)`` and return it.

    Parameters
    ----------
    path : Path
        The target; its folder must exist.
    write : callable
        Writes the content into the binary file it is given.
    """
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

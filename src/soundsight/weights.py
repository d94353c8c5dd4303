"""Fetch the pretrained weights that no installed package carries: ``python -m
soundsight.weights`` (``make install`` runs it).

Today that is the aisfx checkpoint (:mod:`soundsight.aisfx`): its wheel is downloaded
with ``pip download aisfx==0.1.2 --no-deps`` (pip, not an HTTP client of our own: it
honours the user's index, proxy and certificate settings) into
``$SOUNDSIGHT_WEIGHTS`` (default ``~/.cache/soundsight``), and the checkpoint is read
from the wheel's zip when a model is built. The wheel is kept whole rather than
unpacked: its RECORD holds the checkpoint's hash, and one file is all there is to check.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from .aisfx import AISFX_VERSION, read_checkpoint, weights_folder, wheel_path
from .errors import SoundsightError


def fetch_aisfx(folder: str | Path | None = None) -> Path:
    """Download the aisfx wheel into ``folder`` (default :func:`weights_folder`) unless
    a readable one is there; return its path. The download goes to a temporary folder
    first and is moved in only once its checkpoint reads, so an interrupted or broken
    download never leaves a wheel that looks installed."""
    target = Path(folder) / wheel_path().name if folder is not None else wheel_path()
    if target.is_file():
        read_checkpoint(target)  # raises WeightsError (with the fix) when it is broken
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".aisfx-") as scratch:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"aisfx=={AISFX_VERSION}", "--no-deps"]
            + ["--only-binary", ":all:", "--quiet", "--dest", scratch],
            check=True,
        )
        downloaded = Path(scratch) / target.name
        read_checkpoint(downloaded)
        downloaded.replace(target)
    return target


def main() -> int:
    try:
        path = fetch_aisfx()
    except subprocess.CalledProcessError as err:
        print(f"error: pip download of aisfx=={AISFX_VERSION} failed ({err})", file=sys.stderr)
        return 1
    except (SoundsightError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"aisfx {AISFX_VERSION} weights: {path} (default folder: {weights_folder()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

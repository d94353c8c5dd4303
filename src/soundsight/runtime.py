"""The torch-free prediction runtime: an exported ``.onnx`` model run by ONNX Runtime.

:class:`OnnxClassifier` answers as :class:`soundsight.prediction.Classifier` does
(``predict``, ``top``, ``clip_probabilities``, ``analyse``, ``predict_files`` and the
same CSV through :func:`submission`), from a file written by ``soundsight export``
with the front end inside the graph (see :mod:`soundsight.export`). It needs numpy,
soundfile, soxr (through :mod:`soundsight.audio`) and onnxruntime only: nothing here
or in what it imports loads torch, timm, Lightning, librosa, matplotlib or sklearn, so
the base install (no ``train`` extra) predicts and serves.

:class:`ClipScorer` is what the server needs of a classifier; both runtimes have it.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import pandas as pd
import soxr
from tqdm.auto import tqdm

from .audio import AudioError, clip_duration, decode_bytes, load_clip
from .calibration import UNKNOWN_LABEL, Rejection, known_clips
from .errors import ConfigError
from .layouts import LABEL_JOIN
from .modelfile import FROZEN_KIND, FrozenSpec, ModelFileError, ModelSpec

if TYPE_CHECKING:
    from .config import FeatureConfig

#: ``metadata_props`` keys of an exported file (written by :mod:`soundsight.export`).
SPEC_KEY = "soundsight"  # the ModelSpec JSON (modelfile.ModelSpec.to_json)
LABELS_KEY = "soundsight.labels"  # the labels as a JSON list, for tools that want only them
INPUT_KEY = "soundsight.input"  # "waveform" or "log-mel"
QUANTIZATION_KEY = "soundsight.quantization"  # "none", "dynamic" or "static"
PALETTE_KEY = "soundsight.palette"  # the page's colour map: 256 RGB triples, as JSON
#: A frozen-embedding export's input of the clip at another rate (Hz) than
#: ``waveform``'s, which is the highest its parts read (``spec.features.sample_rate``).
RATE_INPUT = "waveform_{}"
RATE_KEY = "soundsight.sample_rate"  # a frozen export's: the rate of ``waveform``
#: A clip as callers hold it: a file path, encoded bytes (an upload), or a mono float32
#: waveform at the model's sample rate (``features.Clip``, which module imports torch).
AnyClip = str | os.PathLike | bytes | np.ndarray
#: Longest recording (seconds, from its header) the runtime scores: the graph holds a
#: clip's log-mel and all its windows at once, so this bounds its memory (about 0.2 GB
#: for 120 s of 3-s windows); the torch runtime streams longer ones.
MAX_SECONDS = 120.0
#: Clips in flight per thread of :meth:`OnnxClassifier.predict_files` (decoded or
#: being scored ahead of the one it hands back next).
PREFETCH = 2
#: What one run of the graph gives: window probabilities, log-mel, clip embedding.
_Scored = tuple[np.ndarray, np.ndarray, np.ndarray | None]


class ClipScorer(Protocol):
    """What the server needs of a classifier (both runtimes have it)."""

    labels: list[str]
    features: FeatureConfig

    def analyse(self, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
        """A mono waveform at ``features.sample_rate`` -> (probabilities, log-mel,
        whether it is one of the known classes)."""
        ...

    def top(self, probabilities: np.ndarray, k: int = 3) -> list[tuple[str, float]]: ...

    def spectrogram_png(self, db: np.ndarray) -> bytes:
        """The page's picture of a log-mel from :meth:`analyse`, as PNG bytes."""
        ...


def top_labels(
    labels: Sequence[str], probabilities: np.ndarray, k: int = 3
) -> list[tuple[str, float]]:
    """The ``k`` most probable (label, probability) pairs, best first."""
    if k < 1:
        raise ConfigError(f"top_k must be at least 1, got {k}")
    order = np.argsort(-probabilities)[:k]
    return [(labels[i], float(probabilities[i])) for i in order]


def present_labels(
    labels: Sequence[str], probabilities: np.ndarray, thresholds: Sequence[float] | np.ndarray
) -> list[tuple[str, float]]:
    """A multi-label model's answer: every (label, probability) at or above the
    label's threshold, most probable first (none: nothing the model knows is there)."""
    probabilities = np.asarray(probabilities)
    order = np.argsort(-probabilities, kind="stable")
    chosen = probabilities >= np.asarray(thresholds)
    return [(labels[i], float(probabilities[i])) for i in order if chosen[i]]


def answer(
    spec: ModelSpec | FrozenSpec, probabilities: np.ndarray, top_k: int = 3
) -> list[tuple[str, float]]:
    """What ``predict`` answers for one clip, with either runtime: the ``top_k`` most
    probable labels, or for a multi-label model every label at or above its threshold
    (:func:`present_labels`; ``top_k`` does not apply)."""
    if spec.multi_label:
        return present_labels(spec.labels, probabilities, spec.thresholds)
    return top_labels(spec.labels, probabilities, top_k)


def submission(
    frame: pd.DataFrame,
    labels: Sequence[str],
    top_k: int = 3,
    root: str | os.PathLike | None = None,
    known: np.ndarray | None = None,
    unknown_label: str = UNKNOWN_LABEL,
    thresholds: Sequence[float] | np.ndarray | None = None,
) -> pd.DataFrame:
    """The Kaggle submission format, ``fname`` and the ``top_k`` labels space-separated,
    plus ``path``: the file relative to ``root`` (where it lies below it), since two
    folders may hold files of the same name.

    With ``known`` (one flag per row, :meth:`Classifier.known`), a clip that is not
    known gets ``unknown_label`` as its label, and the columns ``best_label`` and
    ``best_probability`` keep the most probable known label either way.

    With ``thresholds`` (a multi-label model's, one per label) the answer is
    ``fname``, ``labels``: every label at or above its threshold, most probable first,
    joined by ``;`` ("dog;rain"; empty for none), ``path``, then every label's
    probability in a column of its own (``top_k`` and ``known`` do not apply)."""
    if top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}")
    if thresholds is not None:
        present = frame[list(labels)].to_numpy()
        return pd.DataFrame(
            {
                "fname": [Path(p).name for p in frame["path"]],
                "labels": [
                    LABEL_JOIN.join(name for name, _ in present_labels(labels, row, thresholds))
                    for row in present
                ],
                "path": [_relative(p, root) for p in frame["path"]],
            }
        ).join(frame[list(labels)].reset_index(drop=True))
    probabilities = frame[list(labels)].to_numpy()
    top = np.argsort(-probabilities, axis=1)[:, :top_k]
    answers = [" ".join(labels[i].replace(" ", "_") for i in row) for row in top]
    result = pd.DataFrame(
        {
            "fname": [Path(p).name for p in frame["path"]],
            "label": answers,
            "path": [_relative(p, root) for p in frame["path"]],
        }
    )
    if known is not None:
        if unknown_label in labels:
            raise ConfigError(
                f"--unknown-label {unknown_label!r} is one of the model's labels; choose "
                "another name"
            )
        result["label"] = np.where(known, answers, unknown_label)
        result["best_label"] = [labels[row[0]] for row in top]
        result["best_probability"] = probabilities.max(axis=1) if len(frame) else []
    return result


def _relative(path: str, root: str | os.PathLike | None) -> str:
    if root is None:
        return str(path)
    try:
        return str(Path(path).relative_to(root))
    except ValueError:
        return str(path)


def is_onnx(path: str | os.PathLike) -> bool:
    """Whether ``path`` names an ONNX file (by its suffix), which the ONNX runtime runs."""
    return Path(path).suffix.lower() == ".onnx"


def session_options(threads: int | None = None):
    """ONNX Runtime settings for CPU inference: ``threads`` intra-op threads (None: one
    per core), one inter-op thread (the graph is a chain), subnormals flushed to zero
    (silent stretches give them; each op on them is about five times slower)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.log_severity_level = 3  # errors only: the load failures below say more
    return options


def _open_session(path: Path, threads: int | None):
    """An ONNX Runtime session of ``path``; :class:`ModelFileError` for files it cannot
    run, naming the opsets it can where the file needs another."""
    import onnxruntime as ort

    try:
        return ort.InferenceSession(
            str(path), session_options(threads), providers=["CPUExecutionProvider"]
        )
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own untyped errors
        message = str(err)
        if "opset" not in message.lower():
            raise ModelFileError(
                f"{path}: not an ONNX model ONNX Runtime loads ({message})"
            ) from None
        # onnxruntime states its range only in this message ("... is till opset 23.").
        needed = re.search(r"[Oo]pset (\d+) is", message)
        newest = re.search(r"till opset (\d+)", message)
        works = f"17 to {newest[1]}" if newest else "17 and up, as far as this onnxruntime goes"
        raise ModelFileError(
            f"{path}: needs ONNX opset {needed[1] if needed else '(see below)'}, which "
            f"onnxruntime {ort.__version__} lacks; it runs soundsight exports of opsets "
            f"{works}: export again with --opset, or upgrade onnxruntime ({message.strip()})"
        ) from None


class OnnxClassifier:
    """A model exported by ``soundsight export`` (front end in the graph), ready to
    label clips with ONNX Runtime.

    Examples
    --------
    >>> clf = OnnxClassifier.load("model.onnx")
    >>> clf.predict("7_theo_3.wav", top_k=3)
    [('7', 0.98), ('1', 0.01), ('9', 0.003)]
    """

    def __init__(
        self,
        session,
        spec: ModelSpec | FrozenSpec,
        palette: np.ndarray,
        source: Path,
        features: FeatureConfig | None = None,
    ):
        self.session = session
        self.spec = spec
        self.labels = list(spec.labels)
        #: What clips are decoded to; a frozen export's (``features``, which it needs)
        #: are its highest part rate.
        if isinstance(spec, FrozenSpec):
            if features is None:
                raise ModelFileError(f"{source}: a frozen export needs its sample rate")
            self.features = features
        else:
            self.features = spec.features
        self.palette = palette
        self.source = source
        #: The graph's other inputs: the clip resampled to each of these rates (Hz).
        self.rates = _other_rates([i.name for i in session.get_inputs()]) or []
        #: When a clip is answered ``unknown`` (None: never; see soundsight.calibration).
        try:
            rule = {} if isinstance(spec, FrozenSpec) else spec.rejection
            self.rejection = Rejection.from_dict(rule, len(spec.labels))
        except ValueError as err:
            raise ModelFileError(f"{source}: field 'rejection': {err}") from None
        outputs = [o.name for o in session.get_outputs()]
        needs = self.rejection is not None and self.rejection.needs_embeddings
        if needs and "embeddings" not in outputs:
            raise ModelFileError(
                f"{source}: its 'unknown' rule reads embeddings, which this export "
                "lacks; export the model again"
            )
        self._outputs = ["probabilities", "log_mel"] + (
            ["embeddings"] if "embeddings" in outputs else []
        )

    @classmethod
    def load(cls, path: str | os.PathLike, threads: int | None = None) -> OnnxClassifier:
        """Open an exported ``.onnx`` file with ``threads`` intra-op threads (None: one
        per core).

        Raises
        ------
        ModelFileError
            Not a file, not ONNX, an opset the installed runtime lacks, no soundsight
            metadata, a metadata field out of range, or a graph without the front end.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"{path}: model file not found")
        session = _open_session(path, threads)
        metadata = session.get_modelmeta().custom_metadata_map
        if SPEC_KEY not in metadata:
            raise ModelFileError(
                f"{path}: an ONNX model, but not one soundsight exported (no "
                f"{SPEC_KEY!r} metadata with its labels and features)"
            )
        spec, features = _exported_spec(metadata, path)
        if metadata.get(INPUT_KEY) != "waveform":
            raise ModelFileError(
                f"{path}: exported with --input {metadata.get(INPUT_KEY)}: the graph "
                "takes log-mel windows; the runtime needs the front end in the graph "
                "(soundsight export MODEL --input waveform)"
            )
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        # A frozen export's parts may read other rates (RATE_INPUT), below waveform's.
        rates = _other_rates(inputs)
        if (
            inputs[:1] != ["waveform"]
            or outputs[:2] != ["probabilities", "log_mel"]
            or rates is None
            or (rates and (features is None or max(rates) >= features.sample_rate))
        ):
            raise ModelFileError(
                f"{path}: graph takes {inputs} and gives {outputs}, not "
                "waveform -> probabilities, log_mel"
            )
        try:
            palette = np.asarray(json.loads(metadata[PALETTE_KEY]), np.uint8).reshape(256, 3)
        except (KeyError, ValueError, TypeError):
            raise ModelFileError(f"{path}: metadata {PALETTE_KEY!r} is not 256 colours") from None
        return cls(session, spec, palette, path, features)

    @property
    def quantization(self) -> str:
        """``none`` (fp32), ``dynamic`` or ``static`` (int8)."""
        return self.session.get_modelmeta().custom_metadata_map.get(QUANTIZATION_KEY, "none")

    def waveform(self, clip: AnyClip) -> np.ndarray:
        """The clip as a mono float32 waveform at the model's sample rate: a file path
        (refused past :data:`MAX_SECONDS` from its header, before decoding), encoded
        bytes, or samples."""
        rate = self.features.sample_rate
        if isinstance(clip, bytes):
            wave, source = decode_bytes(clip, rate), "<upload>"
        elif isinstance(clip, np.ndarray):
            wave, source = np.ascontiguousarray(clip, np.float32), "<waveform>"
        else:
            seconds = clip_duration(clip)
            if seconds > MAX_SECONDS:
                raise _too_long(clip, seconds)
            wave, source = load_clip(clip, rate), str(clip)
        if wave.ndim != 1 or not len(wave):
            raise AudioError(source, f"a waveform is a non-empty 1-D array, not {wave.shape}")
        if len(wave) > MAX_SECONDS * rate:
            raise _too_long(source, len(wave) / rate)
        return wave

    def window_probabilities(self, wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each evaluation window's probabilities ``(windows, labels)`` and the log-mel
        of a waveform from :meth:`waveform`: one run of the graph."""
        probabilities, db, _ = self._run(wave)
        return probabilities, db

    def _run(self, wave: np.ndarray, session=None) -> _Scored:
        """One run of the graph (in ``session``, a session of this file; None: the
        classifier's): window probabilities, log-mel, clip embedding (the mean over
        windows, as the torch scorer's; None for exports without it)."""
        feeds = {"waveform": wave}
        for rate in self.rates:  # soxr HQ, as FrozenClassifier.at_rate resamples
            feeds[RATE_INPUT.format(rate)] = soxr.resample(
                wave, self.features.sample_rate, rate, quality="HQ"
            )
        outputs = (session or self.session).run(self._outputs, feeds)
        embedding = outputs[2].mean(0) if len(outputs) > 2 else None
        return outputs[0], outputs[1], embedding

    def known(self, probabilities: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """As :meth:`soundsight.prediction.Classifier.known`."""
        return known_clips(self.rejection, probabilities, embeddings)

    def analyse(self, clip: AnyClip) -> tuple[np.ndarray, np.ndarray, bool]:
        """A clip's probabilities (the mean over its windows), its log-mel, and whether
        it is one of the known classes (:meth:`known`)."""
        windows, db, embedding = self._run(self.waveform(clip))
        probabilities = windows.mean(0)
        return probabilities, db, bool(self.known(probabilities, embedding)[0])

    def clip_probabilities(self, clip: AnyClip) -> np.ndarray:
        """Class probabilities of one clip (path, bytes or waveform), windows averaged."""
        return self.analyse(clip)[0]

    def top(self, probabilities: np.ndarray, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` most probable (label, probability) pairs, best first."""
        return top_labels(self.labels, probabilities, k)

    def predict(self, clip: AnyClip, top_k: int = 3):
        """The ``top_k`` (label, probability) pairs for one clip (path, bytes or
        waveform); a multi-label model's labels at or above their thresholds."""
        return answer(self.spec, self.clip_probabilities(clip), top_k)

    def spectrogram_png(self, db: np.ndarray) -> bytes:
        """The page's picture of a log-mel: the colour map of the feature cache's
        images (``images.spectrogram_image``, unresized), low frequencies at the bottom."""
        floor = np.float32(self.features.floor_db)
        # features.colour_index's binning (that module imports torch).
        scaled = np.clip(1.0 - db.astype(np.float32) / floor, 0.0, 1.0)
        index = np.minimum(scaled[::-1] * np.float32(256), 255).astype(np.uint8)
        return palette_png(index, self.palette)

    def predict_files(
        self, paths: Sequence[str | os.PathLike], progress: bool = True
    ) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
        """Probabilities for many files, one clip per thread (decoding and scoring it),
        as many threads as the session has intra-op threads (soundfile, soxr and ONNX
        Runtime release the GIL). Whole clips in parallel keep every core busy where
        one clip's operators split across threads wait for each other at every one:
        on 2 busy cores, 80 ESC-50 clips took 2.7 s (1.3 s CPU) this way, 4.0 s (2.0 s
        CPU) with one decoding thread ahead of a two-thread session.

        Returns a frame (``path`` then one column per label) and the files that could
        not be read, as ``(path, reason)``; one bad file never stops the rest.
        """
        rows: list[np.ndarray] = []
        embeddings: list[np.ndarray | None] = []
        kept: list[str] = []
        failures: list[tuple[str, str]] = []
        with tqdm(total=len(paths), desc="predict", unit="clip", disable=not progress) as bar:
            for path, scored in self._scored([str(p) for p in paths]):
                bar.update(1)
                if isinstance(scored, str):
                    failures.append((path, scored))
                    continue
                windows, _, embedding = scored
                rows.append(windows.mean(0))
                embeddings.append(embedding)
                kept.append(path)
        frame = pd.DataFrame(
            np.stack(rows) if rows else np.zeros((0, len(self.labels)), np.float32),
            columns=self.labels,
        )
        frame.insert(0, "path", kept)
        with_embeddings = bool(rows) and all(e is not None for e in embeddings)
        frame.attrs["known"] = (
            self.known(frame[self.labels].to_numpy(), np.stack(embeddings))  # type: ignore[arg-type]
            if with_embeddings
            else self.known(frame[self.labels].to_numpy())
            if rows
            else np.ones(0, bool)
        )
        return frame, failures

    def _scored(self, paths: list[str]) -> Iterator[tuple[str, _Scored | str]]:
        """Each path, in order, with :meth:`_run`'s outputs or the reason it has none;
        at most :data:`PREFETCH` clips per thread in flight (memory stays bounded)."""
        workers = min(self.session.get_session_options().intra_op_num_threads, len(paths))
        # Clips in parallel: a one-thread session, opened for them (0.06 s).
        session = self.session if workers <= 1 else _open_session(self.source, 1)

        def score(path: str) -> _Scored | str:
            try:
                return self._run(self.waveform(path), session)
            except AudioError as err:
                return err.reason

        ahead = max(1, workers) * PREFETCH
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="soundsight-clip") as pool:
            pending = [pool.submit(score, p) for p in paths[:ahead]]
            for number, path in enumerate(paths):
                scored = pending.pop(0).result()
                if number + ahead < len(paths):
                    pending.append(pool.submit(score, paths[number + ahead]))
                yield path, scored


def _other_rates(inputs: Sequence[str]) -> list[int] | None:
    """The rates (Hz) of a graph's inputs after ``waveform`` (each named
    :data:`RATE_INPUT`); None where one is named otherwise."""
    pattern = re.escape(RATE_INPUT).replace(r"\{\}", "([1-9][0-9]{3,5})")
    found = [re.fullmatch(pattern, name) for name in inputs[1:]]
    return None if not all(found) else [int(m.group(1)) for m in found if m]


def _exported_spec(
    metadata: dict[str, str], path: Path
) -> tuple[ModelSpec | FrozenSpec, FeatureConfig | None]:
    """The model record in an export's metadata, validated; for a frozen-embedding
    model also the features clips are decoded to (its ``RATE_KEY``)."""
    from .config import FeatureConfig

    text = metadata[SPEC_KEY]
    try:
        kind = json.loads(text).get("kind")
    except (json.JSONDecodeError, AttributeError):
        kind = None  # ModelSpec.from_json says what is wrong
    if kind != FROZEN_KIND:
        return ModelSpec.from_json(text, path), None
    spec = FrozenSpec.from_json(text, path)
    rate = metadata.get(RATE_KEY, "")
    if not rate.isdigit() or not 1000 <= int(rate) <= 384_000:
        raise ModelFileError(f"{path}: metadata {RATE_KEY!r} is not a sample rate: {rate!r}")
    return spec, FeatureConfig(sample_rate=int(rate))


def _too_long(source: str | os.PathLike, seconds: float) -> AudioError:
    return AudioError(
        source,
        f"{seconds:.0f} s long; the ONNX runtime scores recordings of up to {MAX_SECONDS:g} s "
        "(split it, or use --runtime torch, which streams)",
    )


def palette_png(index: np.ndarray, palette: np.ndarray) -> bytes:
    """A palette PNG (colour type 3, 8 bits) of an index image ``(rows, columns)``.

    Written with zlib by hand because Pillow is not part of the runtime install; the
    format is a signature and three chunks (PNG specification, section 5 and 11)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")

    rows, columns = index.shape
    # Width, height, 8 bits per index, colour type 3 (palette), default methods.
    header = columns.to_bytes(4, "big") + rows.to_bytes(4, "big") + bytes([8, 3, 0, 0, 0])
    # Each row starts with filter type 0 (none).
    raw = np.hstack([np.zeros((rows, 1), np.uint8), np.ascontiguousarray(index, np.uint8)])
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            chunk(b"IHDR", header),
            chunk(b"PLTE", np.ascontiguousarray(palette, np.uint8).tobytes()),
            chunk(b"IDAT", zlib.compress(raw.tobytes(), 6)),
            chunk(b"IEND", b""),
        ]
    )


def load_classifier(
    path: str | os.PathLike, runtime: str | None = None, threads: int | None = None
):
    """The classifier of a model file in the runtime asked for: ``onnx``
    (:class:`OnnxClassifier`), ``torch`` (:class:`soundsight.prediction.Classifier`,
    needs the ``train`` extra; for a frozen-embedding model file,
    :class:`soundsight.frozen.FrozenClassifier`), or None: ``onnx`` for a ``.onnx``
    file, else torch."""
    runtime = runtime or ("onnx" if is_onnx(path) else "torch")
    if runtime == "onnx":
        if not is_onnx(path):
            raise ConfigError(
                f"{path}: --runtime onnx runs exported .onnx files; make one with "
                f"soundsight export {path} --out model.onnx"
            )
        return OnnxClassifier.load(path, threads)
    if runtime != "torch":
        raise ConfigError(f"runtime must be onnx or torch, got {runtime!r}")
    if is_onnx(path):
        raise ConfigError(f"{path}: an ONNX file runs with --runtime onnx, not torch")
    import torch

    from .modelfile import FROZEN_KIND, model_kind
    from .prediction import Classifier

    if threads:
        torch.set_num_threads(threads)
    if model_kind(path) == FROZEN_KIND:
        from .frozen import FrozenClassifier

        return FrozenClassifier.load(path, threads)
    return Classifier.load(path)

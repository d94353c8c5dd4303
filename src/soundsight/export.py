"""Export a trained model to ONNX, for the torch-free runtime (:mod:`soundsight.runtime`).

Two kinds of file, both carrying the model file's whole :class:`ModelSpec` (labels,
feature and model config, recipe, metrics) in their ``metadata_props``, so that the
``.onnx`` file alone tells how it was trained and what it answers:

* ``waveform`` (the default): the whole path from a clip to its windows' class
  probabilities inside the graph. Input ``waveform`` ``(samples,)`` float32, one mono
  clip at the model's sample rate; outputs ``probabilities`` ``(windows, labels)``
  (each evaluation window's softmax, whose mean is the clip's prediction) and
  ``log_mel`` ``(n_mels, frames)`` in dB. In between, exactly what
  :class:`~soundsight.features.Featuriser`, :class:`~soundsight.data.ClipView` and
  :func:`~soundsight.models.window_scores` do in torch: centred STFT (ONNX ``STFT``,
  opset 17 and up), power, Slaney mel product, dB relative to the clip's loudest bin,
  clipped at ``-top_db``, rounded to float16 as the feature cache stores it, the
  evenly spaced windows (or the squashed image), the colour map look-up, the
  normalisation, the network and its softmax.
* ``log-mel``: the network alone. Input ``log_mel_windows`` ``(windows, 1, n_mels,
  frames)`` in dB, output ``probabilities``, for callers with their own front end.

:func:`quantize` makes an int8 copy of an exported file with ONNX Runtime's
quantisation tools and measures what it costs in accuracy on the run's validation clips.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from .errors import SoundsightError
from .features import LogMel, colour_table
from .files import write_whole
from .modelfile import ModelSpec
from .models import SoundNet, window_scores
from .runtime import INPUT_KEY, LABELS_KEY, PALETTE_KEY, QUANTIZATION_KEY, SPEC_KEY

#: What the graph takes: a clip's samples, or log-mel windows.
INPUTS = ("waveform", "log-mel")
#: Opsets the export offers: ``STFT`` entered ONNX in 17.
MIN_OPSET = 17
DEFAULT_OPSET = 18
#: Largest accuracy drop (percentage points) int8 may cost without ``force``.
MAX_ACCURACY_DROP = 1.0


class ExportError(SoundsightError, ValueError):
    """A model that cannot be exported as asked, or an int8 copy refused."""


class WaveformGraph(torch.nn.Module):
    """One clip's samples ``(n,)`` -> its windows' probabilities and its log-mel: the
    torch path of prediction (``Featuriser`` -> ``ClipView.windows`` ->
    ``window_scores``) written with shape arithmetic the exporter can keep symbolic
    (no branch on the clip's length), so one graph serves every length."""

    mel_basis: torch.Tensor
    window: torch.Tensor

    def __init__(self, net: SoundNet, spec: ModelSpec):
        super().__init__()
        from .data import ClipView

        self.net = net
        self.features = spec.features
        self.view = ClipView.for_model(spec.model, spec.features)
        logmel = LogMel(spec.features)
        # Dense: ONNX has no sparse product (LogMel uses one on CPUs for speed only).
        self.register_buffer("mel_basis", logmel.mel_basis.clone(), persistent=False)
        self.register_buffer("window", logmel.window.clone(), persistent=False)

    def log_mel(self, waveform: torch.Tensor) -> torch.Tensor:
        """:class:`LogMel` of one clip, at the cache's float16 precision."""
        cfg = self.features
        n = waveform.shape[0]
        half = cfg.n_fft // 2
        # Clips shorter than a window count as n_fft samples (LogMel pads them): pad
        # with n_fft zeros, then keep the frames LogMel has (centred padding is zeros
        # too, so every kept frame sees the same samples).
        frames = 1 + torch.sym_max(n, cfg.n_fft) // cfg.hop_length
        padded = torch.nn.functional.pad(waveform, (half, half + cfg.n_fft))
        spec = torch.stft(
            padded,
            cfg.n_fft,
            cfg.hop_length,
            window=self.window,
            center=False,
            return_complex=True,
        )[:, :frames]
        parts = torch.view_as_real(spec)
        power = parts[..., 0].square() + parts[..., 1].square()
        db = 10.0 * torch.log10(torch.matmul(self.mel_basis, power).clamp_min(1e-10))
        db = db - db.amax(dim=(0, 1), keepdim=True)
        if cfg.top_db is not None:
            db = db.clamp_min(cfg.floor_db)
        return db.half().float()

    def windows(self, db: torch.Tensor) -> torch.Tensor:
        """:meth:`ClipView.windows` of a log-mel, ``(k, 1, n_mels, frames)``."""
        view = self.view
        if view.size is not None:
            size = (view.size, view.size)
            return torch.nn.functional.interpolate(db[None, None], size=size, mode="bilinear")
        width = view.frames
        assert width is not None
        length = db.shape[1]
        step = max(1, 2 * width // 3)
        spare = length - width
        # ClipView.starts without its branch: a clip longer than a window has
        # ceil(spare / step) + 1 windows at numpy.linspace(0, spare, count) rounded; a
        # shorter one has one window centred in silence.
        # (Only floor divisions of non-negative numbers: ONNX's integer Div truncates.)
        count = (torch.sym_max(spare, 0) + step - 1) // step + 1
        number = torch.arange(count, dtype=torch.float64)
        # (numpy.linspace also sets its last value to the end point exactly; the end
        # point is a whole number, which rounding gives back anyway.)
        # A symbolic float while exporting (torch's stubs do not say it multiplies tensors).
        ratio = cast(float, torch.sym_max(spare, 0) / torch.sym_max(count - 1, 1))
        spread = number * ratio
        centred = -(torch.sym_max(-spare, 0) // 2)
        starts = spread.round().long() + centred
        silence = db.new_full((db.shape[0], width), view.floor_db)
        padded = torch.cat([silence, db, silence], dim=1)
        columns = starts[:, None] + torch.arange(width)[None, :] + width
        picked = padded.index_select(1, columns.reshape(-1))
        return picked.reshape(db.shape[0], -1, width).permute(1, 0, 2)[:, None]

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        db = self.log_mel(waveform)
        probabilities, embeddings = window_scores(self.net, self.windows(db), embed=True)
        assert embeddings is not None
        # The embeddings feed the 'unknown' rule (distance to class centroids).
        return probabilities, db, embeddings


class WindowGraph(torch.nn.Module):
    """Log-mel windows ``(k, 1, n_mels, frames)`` in dB -> their probabilities."""

    def __init__(self, net: SoundNet):
        super().__init__()
        self.net = net

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        return window_scores(self.net, windows)[0]


def _example_clip(spec: ModelSpec) -> np.ndarray:
    """A clip a few windows long (noise, so that no value is degenerate) to trace with."""
    from .data import ClipView

    view = ClipView.for_model(spec.model, spec.features)
    seconds = 2.5 * (spec.model.crop_seconds or 1.0) if view.frames else 2.0
    samples = int(seconds * spec.features.sample_rate)
    return np.random.default_rng(0).standard_normal(samples).astype(np.float32) * 0.1


def export_onnx(
    model: str | os.PathLike,
    out: str | os.PathLike,
    input: str = "waveform",
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write an ONNX file of a model file (``model.safetensors``).

    Parameters
    ----------
    model : path-like
        A soundsight model file.
    out : path-like
        The ``.onnx`` file to write (atomically).
    input : {"waveform", "log-mel"}
        What the graph takes: a clip's samples (the whole front end in the graph) or
        log-mel windows (the network only); see the module docstring.
    opset : int
        ONNX opset, 17 or later (``STFT``).

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    ExportError
        An unknown ``input`` or an opset without ``STFT``.
    ModelFileError
        ``model`` is not a readable model file.
    """
    import onnx

    from .prediction import Classifier

    if input not in INPUTS:
        raise ExportError(f"input must be one of {', '.join(INPUTS)}, got {input!r}")
    if opset < MIN_OPSET:
        raise ExportError(f"opset {opset} has no STFT operator: use {MIN_OPSET} or later")
    classifier = Classifier.load(model)
    spec, net = classifier.spec, classifier.net.eval()
    # Channels-last strides are a torch-on-CPU speed-up; ONNX Runtime picks its own.
    net.backbone.to(memory_format=torch.contiguous_format)
    if input == "waveform":
        graph: torch.nn.Module = WaveformGraph(net, spec).eval()
        example: tuple[torch.Tensor, ...] = (torch.from_numpy(_example_clip(spec)),)
        inputs, outputs = ["waveform"], ["probabilities", "log_mel", "embeddings"]
        dynamic = {"waveform": {0: torch.export.Dim("samples", min=1, max=2**31 - 1)}}
    else:
        graph = WindowGraph(net).eval()
        windows = classifier.view.windows(classifier.log_mel(_example_clip(spec)))
        example = (torch.from_numpy(windows)[:, None],)
        inputs, outputs = ["log_mel_windows"], ["probabilities"]
        dynamic = {"windows": {0: torch.export.Dim("windows", min=1, max=4096)}}
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(
            graph,
            example,
            dynamo=True,
            opset_version=opset,
            dynamic_shapes=dynamic,
            optimize=True,
            verbose=False,
            input_names=inputs,
            output_names=outputs,
        )
    assert program is not None, "dynamo=True always returns a program"
    proto = program.model_proto
    _set_metadata(proto, spec, input, "none")
    onnx.checker.check_model(proto)
    return write_whole(out, lambda file: file.write(proto.SerializeToString()))


def _set_metadata(proto, spec: ModelSpec, input: str, quantization: str) -> None:
    """Write soundsight's keys into ``proto.metadata_props`` (replacing any there)."""
    values = {
        SPEC_KEY: spec.to_json(),
        LABELS_KEY: json.dumps(list(spec.labels)),
        INPUT_KEY: input,
        QUANTIZATION_KEY: quantization,
        # The serve page's colour map (images.spectrogram_image's), so that the runtime
        # draws it without matplotlib.
        PALETTE_KEY: json.dumps(colour_table("magma").tolist()),
    }
    kept = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "soundsight"


#: Operators int8 covers: the network's convolutions and its head. The front end (STFT,
#: mel product, logarithm) stays fp32: 8 bits cannot hold an 80 dB range.
QUANTIZED_OPS = ("Conv", "Gemm")


def validation_clips(model: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The validation clips stored with a model's run (``RUN/valid_predictions.csv``
    beside ``RUN/model.safetensors``, as ``report`` reads them): paths and labels.

    Raises
    ------
    ExportError
        The run folder has no validation predictions.
    """
    from .report.run import read_run_csv

    folder = Path(model).parent
    table = read_run_csv(folder, "valid_predictions.csv")
    if table is None or not len(table):
        raise ExportError(
            f"{folder}: no validation clips stored with the run (valid_predictions.csv) to "
            "check int8 accuracy on; pass --force to quantise without the check"
        )
    if "labels" in table:
        raise ExportError(
            f"{folder}: a multi-label model's run; the int8 check is top-1 accuracy, which "
            "it has not: pass --force to quantise without the check"
        )
    return table["path"].astype(str).tolist(), table["label"].astype(str).tolist()


def onnx_accuracy(path: str | os.PathLike, clips: Sequence[str], labels: Sequence[str]) -> float:
    """Top-1 accuracy (%) of an exported file on labelled clips (unreadable ones count as
    wrong: a clip the fp32 file reads, int8 reads too)."""
    from .runtime import OnnxClassifier

    classifier = OnnxClassifier.load(path)
    frame, _ = classifier.predict_files(list(clips), progress=False)
    best = frame[classifier.labels].to_numpy().argmax(axis=1)
    predicted = dict(zip(frame["path"], (classifier.labels[i] for i in best), strict=True))
    hits = sum(predicted.get(str(c)) == label for c, label in zip(clips, labels, strict=True))
    return 100.0 * hits / max(len(clips), 1)


#: Calibration clips static int8 reads at most (its ranges settle well before).
CALIBRATION_CLIPS = 100


class _Calibration:
    """ONNX Runtime's calibration reader: the user's clips, decoded one at a time at
    the model's rate (unreadable ones skipped: they only make the set smaller)."""

    def __init__(self, paths: list[str], sample_rate: int):
        self.paths, self.sample_rate = iter(paths[:CALIBRATION_CLIPS]), sample_rate

    def get_next(self) -> dict[str, np.ndarray] | None:
        from .audio import AudioError, load_clip
        from .runtime import MAX_SECONDS

        for path in self.paths:
            try:
                return {"waveform": load_clip(path, self.sample_rate, MAX_SECONDS)}
            except AudioError:
                continue
        return None


def calibration_clips(folder: str | os.PathLike | None) -> list[str]:
    """The audio files of ``folder`` (as ``predict`` finds them), for static int8.

    Raises
    ------
    ExportError
        No folder given, or no audio file in it.
    """
    from .layouts import audio_files

    if folder is None:
        raise ExportError(
            "--quantize static needs calibration clips: pass --calibration DIR with a "
            "few dozen clips like those the model will hear (or use --quantize dynamic)"
        )
    paths, _ = audio_files([str(folder)])
    if not paths:
        raise ExportError(f"{folder}: no audio clips to calibrate int8 with")
    return [str(p) for p in paths]


def quantize(
    model: str | os.PathLike,
    fp32: str | os.PathLike,
    out: str | os.PathLike,
    mode: str,
    calibration: str | os.PathLike | None = None,
    force: bool = False,
) -> tuple[float | None, float | None]:
    """Write an int8 copy of the exported ``fp32`` file (of model file ``model``) to
    ``out``: ``dynamic`` (weights int8, activations quantised on the fly) or ``static``
    (activations' ranges calibrated on the clips of ``calibration``), convolutions and
    head only (:data:`QUANTIZED_OPS`).

    Returns the top-1 accuracy (%) of the fp32 and int8 files on the run's validation
    clips (:func:`validation_clips`); (None, None) when ``force`` skipped a missing set.

    Raises
    ------
    ExportError
        An unknown mode, static without calibration clips, no validation clips (unless
        ``force``), or int8 losing more than :data:`MAX_ACCURACY_DROP` points (unless
        ``force``); nothing is written then.
    """
    import onnx
    from onnxruntime import quantization as ortq

    if mode not in ("dynamic", "static"):
        raise ExportError(f"--quantize must be dynamic or static, got {mode!r}")
    from .modelfile import read_spec

    spec = read_spec(model)
    calibrate = calibration_clips(calibration) if mode == "static" else []
    try:
        clips, labels = validation_clips(model)
    except ExportError:
        if not force:
            raise
        clips, labels = [], []
    with tempfile.TemporaryDirectory(prefix="soundsight-int8-") as scratch:
        draft = Path(scratch) / "int8.onnx"
        common = {"op_types_to_quantize": list(QUANTIZED_OPS), "per_channel": True}
        if mode == "dynamic":
            ortq.quantize_dynamic(fp32, draft, weight_type=ortq.QuantType.QInt8, **common)
        else:
            ortq.quantize_static(
                fp32,
                draft,
                _Calibration(calibrate, spec.features.sample_rate),
                quant_format=ortq.QuantFormat.QDQ,
                activation_type=ortq.QuantType.QInt8,
                weight_type=ortq.QuantType.QInt8,
                **common,
            )
        proto = onnx.load(draft)
        _set_metadata(proto, spec, "waveform", mode)
        onnx.save(proto, draft)
        before = after = None
        if clips:
            before, after = onnx_accuracy(fp32, clips, labels), onnx_accuracy(draft, clips, labels)
            if before - after > MAX_ACCURACY_DROP and not force:
                raise ExportError(
                    f"int8 ({mode}) drops validation accuracy from {before:.1f}% to "
                    f"{after:.1f}% ({len(clips)} clips), more than {MAX_ACCURACY_DROP:g} "
                    "point; nothing written (keep fp32, try --quantize static with "
                    "calibration clips, or --force)"
                )
        data = draft.read_bytes()
    write_whole(out, lambda file: file.write(data))
    return before, after

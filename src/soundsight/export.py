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
  :func:`~soundsight.models.window_scores` do in torch: centred STFT power (as a
  convolution and a product, :class:`FactoredPower`), Slaney mel product, dB relative
  to the clip's loudest bin, clipped at ``-top_db``, rounded to float16 as the feature
  cache stores it, the evenly spaced windows (or the squashed image), the colour map
  look-up (normalisation folded into its table), the network and its softmax.
* ``waveform`` of a frozen-embedding or fused model (:class:`FrozenGraph`): every
  network part's front end and network, the head, a fused network; one input per rate
  the parts read (``waveform`` the highest, ``waveform_<rate>`` the others), one row of
  ``probabilities``. A BirdNET part is TFLite and is refused.
* ``log-mel``: the network alone. Input ``log_mel_windows`` ``(windows, 1, n_mels,
  frames)`` in dB, output ``probabilities``, for callers with their own front end.

:func:`quantize` makes an int8 copy of an exported file with ONNX Runtime's
quantisation tools and measures what it costs in accuracy on the run's validation clips.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import numpy as np
import torch

from .config import FeatureConfig
from .errors import SoundsightError
from .features import LogMel, aisfx_scale, colour_table
from .files import write_whole
from .modelfile import FROZEN_KIND, FrozenSpec, ModelSpec, model_kind
from .models import SoundNet, window_scores
from .runtime import (
    INPUT_KEY,
    LABELS_KEY,
    PALETTE_KEY,
    QUANTIZATION_KEY,
    RATE_INPUT,
    RATE_KEY,
    SPEC_KEY,
)

#: What the graph takes: a clip's samples, or log-mel windows.
INPUTS = ("waveform", "log-mel")
#: Opsets the export offers (torch's exporter writes 18 and converts to older ones;
#: 17 is the oldest tested).
MIN_OPSET = 17
DEFAULT_OPSET = 18
#: Largest accuracy drop (percentage points) int8 may cost without ``force``.
MAX_ACCURACY_DROP = 1.0


class ExportError(SoundsightError, ValueError):
    """A model that cannot be exported as asked, or an int8 copy refused."""


class LogMelGraph(torch.nn.Module):
    """One clip's samples ``(n,)`` -> its :class:`LogMel` ``(n_mels, frames)`` at the
    cache's float16 precision, with shape arithmetic the exporter keeps symbolic."""

    mel_basis: torch.Tensor

    def __init__(self, features: FeatureConfig):
        super().__init__()
        self.features = features
        logmel = LogMel(features)
        self.power = FactoredPower(logmel.window, features.n_fft, features.hop_length)
        # Dense: ONNX has no sparse product (LogMel uses one on CPUs for speed only). Its
        # columns follow the bins in FactoredPower's order (zero where no bin is).
        basis = torch.zeros(logmel.mel_basis.shape[0], len(self.power.bins))
        kept = self.power.bins >= 0
        basis[:, kept] = logmel.mel_basis[:, self.power.bins[kept]]
        self.register_buffer("mel_basis", basis, persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """dB below the clip's loudest bin, or aisfx's scale (``FeatureConfig.front_end``)."""
        cfg = self.features
        n = waveform.shape[0]
        half = cfg.n_fft // 2
        # Clips shorter than a window count as n_fft samples (LogMel pads them): pad
        # with n_fft zeros, then keep the frames LogMel has (centred padding is zeros
        # too, so every kept frame sees the same samples).
        frames = 1 + torch.sym_max(n, cfg.n_fft) // cfg.hop_length
        padded = torch.nn.functional.pad(waveform, (half, half + cfg.n_fft))
        power = torch.matmul(self.mel_basis, self.power(padded, frames))
        if cfg.front_end == "aisfx":
            return aisfx_scale(power, waveform.abs().amax(dim=0)).half().float()
        db = 10.0 * torch.log10(power.clamp_min(1e-10))
        db = db - db.amax(dim=(0, 1), keepdim=True)
        if cfg.top_db is not None:
            db = db.clamp_min(cfg.floor_db)
        return db.half().float()


class WaveformGraph(torch.nn.Module):
    """One clip's samples ``(n,)`` -> its windows' probabilities and its log-mel: the
    torch path of prediction (``Featuriser`` -> ``ClipView.windows`` ->
    ``window_scores``) written with shape arithmetic the exporter can keep symbolic
    (no branch on the clip's length), so one graph serves every length."""

    def __init__(self, net: SoundNet, spec: ModelSpec):
        super().__init__()
        from .data import ClipView

        self.net = net
        self.view = ClipView.for_model(spec.model, spec.features)
        self.log_mel = LogMelGraph(spec.features)

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
        # Frames as rows (a look-up of whole rows, quicker than of single values).
        silence = db.new_full((width, db.shape[0]), view.floor_db)
        padded = torch.cat([silence, db.T, silence], dim=0)
        columns = starts[:, None] + torch.arange(width)[None, :] + width
        picked = padded.index_select(0, columns.reshape(-1))
        return picked.reshape(-1, width, db.shape[0]).transpose(1, 2)[:, None]

    def forward(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        db = self.log_mel(waveform)
        probabilities, embeddings = window_scores(self.net, self.windows(db), embed=True)
        assert embeddings is not None
        # The embeddings feed the 'unknown' rule (distance to class centroids).
        return probabilities, db, embeddings


class FrozenGraph(torch.nn.Module):
    """A frozen-embedding model (:class:`~soundsight.frozen.FrozenClassifier`) from
    waveforms to the clip's probabilities ``(1, labels)`` and the page's log-mel.

    Inputs: the clip at each rate a part reads, highest first (``rates``; the runtime
    resamples with soxr as the torch path does). Each part is its network's
    :class:`WaveformGraph`, whose window embeddings are max-pooled (``frozen.POOLING``)
    into the part's vector; the head standardises the joined vector, applies its
    weights and a softmax; a fused network's windows are averaged and blended in at the
    model's weight. The page's log-mel is the fused network's, else the default log-mel
    at the highest rate, as ``FrozenClassifier.analyse`` gives them."""

    mean: torch.Tensor
    scale: torch.Tensor
    coef: torch.Tensor
    intercept: torch.Tensor

    def __init__(
        self,
        parts: Sequence[tuple[int, WaveformGraph]],
        head: dict[str, np.ndarray],
        rates: Sequence[int],
        network: tuple[int, WaveformGraph] | None = None,
        weight: float = 1.0,
    ):
        super().__init__()
        self.part_inputs = [number for number, _ in parts]
        self.parts = torch.nn.ModuleList(graph for _, graph in parts)
        for name in ("mean", "scale", "coef", "intercept"):
            self.register_buffer(name, torch.from_numpy(head[name]).float(), persistent=False)
        self.network_input = network[0] if network else None
        self.network = network[1] if network else None
        self.weight = weight
        self.page = None if network else LogMelGraph(FeatureConfig(sample_rate=rates[0]))

    def forward(self, *waveforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vectors = [
            graph(waveforms[number])[2].amax(dim=0)
            for number, graph in zip(self.part_inputs, self.parts, strict=True)
        ]
        scaled = (torch.cat(vectors) - self.mean) / self.scale
        logits = scaled @ self.coef.T + self.intercept
        probabilities = torch.softmax(logits, dim=0)[None]
        if self.network is None:
            assert self.page is not None
            return probabilities, self.page(waveforms[0])
        assert self.network_input is not None
        windows, db, _ = self.network(waveforms[self.network_input])
        fused = self.weight * probabilities + (1 - self.weight) * windows.mean(0, keepdim=True)
        return fused, db


def _frozen_graph(model: str | os.PathLike) -> tuple[FrozenGraph, FrozenSpec, list[int]]:
    """The :class:`FrozenGraph` of a frozen model file, its record and its input rates.

    Raises :class:`ExportError` for a BirdNET part: a TFLite graph (its mel front end
    inside), which has no torch form to export."""
    from .frozen import NETWORK_DIMS, FrozenClassifier, NetworkPart
    from .modelfile import read_any_spec

    recorded = cast(FrozenSpec, read_any_spec(model))
    # Refused from the record, before BirdNET's runtime is needed to load the model.
    tflite = [part.name for part in recorded.parts if part.name not in NETWORK_DIMS]
    if tflite:
        raise ExportError(
            f"{model}: part {', '.join(tflite)} is a TFLite network (ai-edge-litert) with no "
            "ONNX form: it stays TFLite, so this model runs with --runtime torch only; a "
            "frozen model of its other parts exports (e.g. --backbone aisfx)"
        )
    classifier = FrozenClassifier.load(model)
    spec = classifier.spec
    network = classifier.network
    rates = sorted(
        {part.sample_rate for part in classifier.parts}
        | ({network.features.sample_rate} if network else set()),
        reverse=True,
    )

    def graph_of(clf) -> WaveformGraph:
        net = clf.net.eval()
        net.backbone.to(memory_format=torch.contiguous_format)
        return WaveformGraph(net, clf.spec).eval()

    parts = [
        (rates.index(part.sample_rate), graph_of(cast(NetworkPart, part).classifier))
        for part in classifier.parts
    ]
    fused = (rates.index(network.features.sample_rate), graph_of(network)) if network else None
    graph = FrozenGraph(parts, classifier.head, rates, fused, spec.weight).eval()
    return graph, spec, rates


class FactoredPower(torch.nn.Module):
    """The power spectrogram of ``torch.stft(padded, n_fft, hop, window, center=False)``
    ``(bins, frames)`` as one grouped convolution and one batched product: a two-factor
    Cooley-Tukey DFT, ``n_fft = rows * columns`` (Cooley and Tukey 1965).

    Hand-written because ONNX Runtime's ``STFT`` kernel (the one ONNX operator for it)
    spent 6.2 ms on a 5-s clip at 22.05 kHz (ORT's profiler, 1 thread), a third of the
    whole graph, where this convolution and product take about 1 ms together. The
    samples are laid out as rows of ``columns`` samples (``columns`` divides both
    ``n_fft`` and ``hop``, chosen near the square root of ``n_fft``); each frame is
    ``n_fft / columns`` consecutive rows. Step one, a convolution over rows (one group
    per column, the window folded in): the DFT of length ``n_fft / columns`` down each
    column. Step two, per inner frequency: the twiddled DFT of length ``columns``
    across them, a batched matrix product. Bins come out in the order of
    :attr:`bins` (the FFT bin of each row, -1 where none: the rows past ``n_fft // 2``
    that the product computes anyway); callers reorder what they multiply with them.
    """

    steps: torch.Tensor
    twiddles: torch.Tensor

    def __init__(self, window: torch.Tensor, n_fft: int, hop: int):
        super().__init__()
        common = math.gcd(n_fft, hop)
        # The divisor of gcd(n_fft, hop) nearest sqrt(n_fft) in ratio: the fewest products.
        columns = min(
            (d for d in range(1, common + 1) if common % d == 0),
            key=lambda d: abs(math.log(d * d / n_fft)),
        )
        rows = n_fft // columns
        outer = (n_fft // 2) // rows + 1  # outer frequencies any inner one needs
        self.columns, self.rows, self.outer, self.stride = columns, rows, outer, hop // columns
        w = window.double().numpy()
        row, column, inner = np.arange(rows), np.arange(columns), np.arange(rows)
        angle = 2 * np.pi * np.outer(inner, row) / rows  # (inner, row)
        windowed = w[column[:, None] + columns * row[None, :]][:, None, :]  # (column, 1, row)
        # Step one's kernels, (column, real/imaginary, inner) x row.
        steps = np.stack([windowed * np.cos(angle), -windowed * np.sin(angle)], axis=1)
        self.register_buffer(
            "steps", torch.tensor(steps.reshape(-1, 1, rows), dtype=torch.float32), False
        )
        bins = inner[:, None] + rows * np.arange(outer)[None, :]  # (inner, outer)
        angle = 2 * np.pi * column[None, None, :] * bins[:, :, None] / n_fft
        cos = np.cos(angle) * (bins <= n_fft // 2)[:, :, None]
        sin = np.sin(angle) * (bins <= n_fft // 2)[:, :, None]
        # Step two: (inner, (real/imaginary out, outer), (real/imaginary in, column)).
        twiddles = np.zeros((rows, 2, outer, 2, columns))
        twiddles[:, 0, :, 0], twiddles[:, 0, :, 1] = cos, sin
        twiddles[:, 1, :, 0], twiddles[:, 1, :, 1] = -sin, cos
        self.register_buffer(
            "twiddles",
            torch.tensor(twiddles.reshape(rows, 2 * outer, 2 * columns), dtype=torch.float32),
            False,
        )
        self.bins = torch.from_numpy(np.where(bins <= n_fft // 2, bins, -1).reshape(-1))

    def forward(self, padded: torch.Tensor, frames: torch.Tensor | int) -> torch.Tensor:
        """Power ``(rows * outer, frames)`` of the first ``frames`` frames of ``padded``
        (a 1-D waveform long enough for them)."""
        columns, rows = self.columns, self.rows
        # The rows the frames cover (hop and n_fft are multiples of columns), so that the
        # convolution gives exactly ``frames`` (cutting its output would copy it twice).
        grid = padded[: ((frames - 1) * self.stride + rows) * columns].reshape(-1, columns)
        down = torch.nn.functional.conv1d(
            grid.T[None], self.steps, stride=self.stride, groups=columns
        )
        # (column, real/imaginary, inner, frame) -> (inner, (real/imaginary, column), frame)
        down = down.reshape(columns, 2, rows, -1).permute(2, 1, 0, 3).reshape(rows, 2 * columns, -1)
        across = torch.matmul(self.twiddles, down).reshape(rows, 2, self.outer, -1)
        return (across[:, 0].square() + across[:, 1].square()).reshape(rows * self.outer, -1)


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
        A soundsight model file: a fine-tuned network, or a frozen-embedding model
        (:class:`FrozenGraph`; its network parts and head, a fused network too; a
        BirdNET part stays TFLite and is refused).
    out : path-like
        The ``.onnx`` file to write (atomically).
    input : {"waveform", "log-mel"}
        What the graph takes: a clip's samples (the whole front end in the graph) or
        log-mel windows (the network only; fine-tuned networks); see the module
        docstring.
    opset : int
        ONNX opset, 17 or later.

    Returns
    -------
    Path
        ``out``.

    Raises
    ------
    ExportError
        An unknown ``input``, an opset before 17, or a frozen model with a BirdNET part
        or ``input="log-mel"``.
    ModelFileError
        ``model`` is not a readable model file.
    """
    from .prediction import Classifier

    if input not in INPUTS:
        raise ExportError(f"input must be one of {', '.join(INPUTS)}, got {input!r}")
    if opset < MIN_OPSET:
        raise ExportError(
            f"opset {opset} is older than the export writes: use {MIN_OPSET} or later"
        )
    if model_kind(model) == FROZEN_KIND:
        if input != "waveform":
            raise ExportError(
                f"{model}: a frozen-embedding model exports with --input waveform only "
                "(its parts have different front ends)"
            )
        return _export_frozen(model, out, opset)
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
    return _write(graph, example, inputs, outputs, dynamic, spec, opset, out, input)


def _export_frozen(model: str | os.PathLike, out: str | os.PathLike, opset: int) -> Path:
    """:func:`export_onnx` of a frozen-embedding model file: its :class:`FrozenGraph`."""
    import soxr

    graph, spec, rates = _frozen_graph(model)
    # The example clip at each rate, as the runtime resamples it (soxr HQ).
    noise = np.random.default_rng(0).standard_normal(5 * rates[0]).astype(np.float32) * 0.1
    example = tuple(
        torch.from_numpy(np.ascontiguousarray(soxr.resample(noise, rates[0], rate)))
        for rate in rates
    )
    inputs = ["waveform"] + [RATE_INPUT.format(rate) for rate in rates[1:]]
    dynamic = {
        # FrozenGraph.forward's *waveforms: one dynamic length per input.
        "waveforms": tuple(
            {0: torch.export.Dim(f"samples_{rate}", min=1, max=2**31 - 1)} for rate in rates
        )
    }
    return _write(
        graph, example, inputs, ["probabilities", "log_mel"], dynamic, spec, opset, out,
        rate=rates[0],
    )  # fmt: skip


def _write(
    graph: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    inputs: list[str],
    outputs: list[str],
    dynamic: dict,
    spec: ModelSpec | FrozenSpec,
    opset: int,
    out: str | os.PathLike,
    input: str = "waveform",
    rate: int | None = None,
) -> Path:
    """Export ``graph`` traced on ``example``, with soundsight's metadata, to ``out``."""
    import onnx

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
    _set_metadata(proto, spec, input, "none", rate)
    onnx.checker.check_model(proto)
    return write_whole(out, lambda file: file.write(proto.SerializeToString()))


def _set_metadata(
    proto, spec: ModelSpec | FrozenSpec, input: str, quantization: str, rate: int | None = None
) -> None:
    """Write soundsight's keys into ``proto.metadata_props`` (replacing any there);
    ``rate``: a frozen export's ``waveform`` rate."""
    values = {
        SPEC_KEY: spec.to_json(),
        LABELS_KEY: json.dumps(list(spec.labels)),
        INPUT_KEY: input,
        QUANTIZATION_KEY: quantization,
        # The serve page's colour map (images.spectrogram_image's), so that the runtime
        # draws it without matplotlib.
        PALETTE_KEY: json.dumps(colour_table("magma").tolist()),
    } | ({RATE_KEY: str(rate)} if rate else {})
    kept = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    proto.producer_name = "soundsight"


def front_end_nodes(proto) -> list[str]:
    """Names of the nodes before a waveform graph's network: those that compute
    ``log_mel`` (the STFT's convolution and the mel product among them), the windows
    and the colour map, which int8 leaves in fp32: 8 bits cannot hold an 80 dB range
    (quantising ``log_mel`` moved it by up to 0.16 dB).

    The network starts at the first convolution outside the ``log_mel`` computation
    (the backbone's stem); the front end is everything its input is computed from."""
    producer = {output: node for node in proto.graph.node for output in node.output}

    def ancestors(tensor: str) -> set[str]:
        names: set[str] = set()
        pending = [tensor]
        while pending:
            node = producer.get(pending.pop())
            if node is not None and node.name not in names:
                names.add(node.name)
                pending.extend(node.input)
        return names

    log_mel = ancestors("log_mel")
    # graph.node is in topological order (an ONNX requirement).
    stem = next(n for n in proto.graph.node if n.op_type == "Conv" and n.name not in log_mel)
    return sorted(ancestors(stem.input[0]) | log_mel)


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
    (activations' ranges calibrated on the clips of ``calibration``), the network only
    (:func:`front_end_nodes` stay fp32).

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
    if model_kind(model) == FROZEN_KIND:
        raise ExportError(
            f"{model}: int8 is for fine-tuned networks; a frozen-embedding model exports "
            "in fp32 (drop --quantize)"
        )
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
        # Every operator of the network that ONNX Runtime quantises (convolutions, the
        # residual additions, pooling, the head), so that activations stay int8 from one
        # convolution to the next; the front end stays fp32 (front_end_nodes).
        common = {"per_channel": True, "nodes_to_exclude": front_end_nodes(onnx.load(fp32))}
        if mode == "dynamic":
            ortq.quantize_dynamic(fp32, draft, weight_type=ortq.QuantType.QInt8, **common)
        else:
            ortq.quantize_static(
                fp32,
                draft,
                _Calibration(calibrate, spec.features.sample_rate),
                quant_format=ortq.QuantFormat.QDQ,
                # Unsigned activations, signed weights: the u8 x s8 product that x86's
                # VNNI instructions take: a 5-s clip's graph in 7.3 ms, 10.8 with s8 x s8
                # (1 thread, busy machine; fp32 13.2). Without VNNI (AVX2 only) the
                # product may saturate: the accuracy check below is on this machine.
                activation_type=ortq.QuantType.QUInt8,
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

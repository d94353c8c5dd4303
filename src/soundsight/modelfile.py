"""The model file: one typed record of a trained model, written and read here only.

``model.safetensors`` holds the network's weights (safetensors: raw tensors, no pickled
code) and, in its header, a JSON :class:`ModelSpec`: labels, the feature config, the
model config, the training recipe and the validation metrics. That record alone
rebuilds the exact path from a clip to its prediction; prediction, evaluation, the
report and the server all read it through :func:`read_spec` / :func:`read_model_file`.

A model file is untrusted input. Every field of its header is checked before anything
is built from it (types, ranges, one label per output of the head), and each problem is
reported with the file and the field. Files written since format 1 also carry a
SHA-256 of the header and the tensors together, so a header edited by hand (say
``n_mels`` changed under weights trained on 128 bands) is refused instead of silently
changing predictions; older files without it still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import FeatureConfig, ModelConfig, config_to_dict
from .errors import ConfigError, SoundsightError
from .files import write_whole

if TYPE_CHECKING:
    import torch

    from .models import SoundNet

#: Metadata key in the safetensors header holding the model file's JSON record.
METADATA_KEY = "soundsight"
#: Metadata key of the SHA-256 over the record and the tensors (see :func:`_digest`).
DIGEST_KEY = "soundsight_sha256"
MODEL_FORMAT = 1
#: More labels than this is not a label set but a mistake (or an attack on memory).
MAX_LABELS = 100_000


class ModelFileError(SoundsightError, ValueError):
    """A file that is not a readable soundsight model."""


@dataclass(frozen=True)
class ModelSpec:
    """Everything a trained model needs besides its weights.

    Attributes
    ----------
    labels : tuple of str
        Class names, in the order of the head's outputs.
    features : FeatureConfig
        How a waveform became the log-mels the model was trained on.
    model : ModelConfig
        Backbone, input encoding and the clip views (crop length or image size).
    train : dict
        The training recipe (``TrainConfig`` as a plain dict), for the record.
    metrics : dict
        Validation scores at the end of training (``accuracy``, ``map3``...).
    notice : str
        Licence notice of the pretrained weights the model was built on (the aisfx
        backbone's CC-BY-4.0 attribution), shown by predict and serve; "" if none.
    temperature : float
        Logits are divided by it before the softmax (fitted on the validation side,
        :mod:`soundsight.calibration`); 1 in files from before it existed.
    calibration : dict
        How it was fitted: ``clips``, ``ece_before``, ``ece_after``... or a ``note``
        saying why it was not (too few validation clips).
    rejection : dict
        :meth:`soundsight.calibration.Rejection.to_dict`: the score and threshold below
        which a clip is ``unknown``; ``{}``: every clip gets a known label.
    multi_label : bool
        Several labels per clip: the head's outputs are independent sigmoids, and a
        label is present at or above its threshold. False in files from before it
        existed (single-label: one softmax).
    thresholds : tuple of float
        A multi-label model's per-label thresholds (tuned for F1 on the validation
        side), one per label; empty for a single-label model.
    """

    labels: tuple[str, ...]
    features: FeatureConfig
    model: ModelConfig
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    notice: str = ""
    temperature: float = 1.0
    calibration: dict[str, Any] = field(default_factory=dict)
    rejection: dict[str, Any] = field(default_factory=dict)
    multi_label: bool = False
    thresholds: tuple[float, ...] = ()

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": MODEL_FORMAT,
                "labels": list(self.labels),
                "features": config_to_dict(self.features),
                "model": config_to_dict(self.model),
                "train": self.train,
                "metrics": self.metrics,
                "notice": self.notice,
                "temperature": self.temperature,
                "calibration": self.calibration,
                "rejection": self.rejection,
                "multi_label": self.multi_label,
                "thresholds": list(self.thresholds),
            }
        )

    @classmethod
    def from_json(cls, text: str, source: str | os.PathLike = "model file") -> ModelSpec:
        """Parse and validate a header; :class:`ModelFileError` names ``source`` and the
        field for any problem."""
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelFileError(f"{source}: header is not valid JSON ({err})") from None
        return cls.from_dict(record, source)

    @classmethod
    def from_dict(cls, record: Any, source: str | os.PathLike = "model file") -> ModelSpec:
        if not isinstance(record, dict):
            raise ModelFileError(
                f"{source}: header must be a JSON object, not {type(record).__name__}"
            )
        if record.get("format") != MODEL_FORMAT:
            raise ModelFileError(f"{source}: model format {record.get('format')!r} not supported")
        for name in ("labels", "features", "model"):
            if name not in record:
                raise ModelFileError(f"{source}: header has no {name!r} field")
        labels = record["labels"]
        if (
            not isinstance(labels, list)
            or not 1 <= len(labels) <= MAX_LABELS
            or not all(isinstance(label, str) and label for label in labels)
        ):
            raise ModelFileError(
                f"{source}: field 'labels' must be a list of 1 to {MAX_LABELS} non-empty strings"
            )
        if len(set(labels)) != len(labels):
            raise ModelFileError(f"{source}: field 'labels' names a label twice")
        for name in ("train", "metrics"):
            if not isinstance(record.get(name, {}), dict):
                raise ModelFileError(f"{source}: field {name!r} must be a JSON object")
        metrics = record.get("metrics", {})
        if not all(isinstance(v, int | float) for v in metrics.values()):
            raise ModelFileError(f"{source}: field 'metrics' must map names to numbers")
        if not isinstance(record.get("notice", ""), str):
            raise ModelFileError(f"{source}: field 'notice' must be a string")
        return cls(
            labels=tuple(labels),
            features=_config(FeatureConfig, record["features"], "features", source),
            model=_config(ModelConfig, record["model"], "model", source),
            train=dict(record.get("train", {})),
            metrics=dict(metrics),
            notice=record.get("notice", ""),
            **_scores_meaning(record, source),
            **_multi_label(record, len(labels), source),
        )


def _multi_label(record: dict, labels: int, source: str | os.PathLike) -> dict[str, Any]:
    """``multi_label`` and ``thresholds``, checked: one threshold in (0, 1] per label
    for a multi-label model (which has no temperature or 'unknown' rule), none for a
    single-label one; files from before them are single-label."""
    multi = record.get("multi_label", False)
    thresholds = record.get("thresholds", [])
    if not isinstance(multi, bool):
        raise ModelFileError(f"{source}: field 'multi_label' must be true or false")
    if not isinstance(thresholds, list) or not all(
        isinstance(t, int | float) and not isinstance(t, bool) and 0 < t <= 1 for t in thresholds
    ):
        raise ModelFileError(f"{source}: field 'thresholds' must be a list of numbers in (0, 1]")
    if len(thresholds) != (labels if multi else 0):
        raise ModelFileError(
            f"{source}: field 'thresholds' has {len(thresholds)} values; a "
            + (f"multi-label model needs one per label ({labels})" if multi else "")
            + ("" if multi else "single-label model has none")
        )
    if multi and (record.get("temperature", 1.0) != 1.0 or record.get("rejection", {})):
        raise ModelFileError(
            f"{source}: a multi-label model has no temperature or 'unknown' rule "
            "(fields 'temperature' and 'rejection')"
        )
    return {"multi_label": multi, "thresholds": tuple(float(t) for t in thresholds)}


def _scores_meaning(record: dict, source: str | os.PathLike) -> dict[str, Any]:
    """The calibration fields, checked; files from before them get temperature 1 and
    no rejection."""
    from .calibration import check_calibration, check_rejection, check_temperature

    checks = {
        "temperature": (1.0, check_temperature),
        "calibration": ({}, check_calibration),
        "rejection": ({}, check_rejection),
    }
    values = {}
    for name, (default, check) in checks.items():
        try:
            values[name] = check(record.get(name, default))
        except ValueError as err:
            raise ModelFileError(f"{source}: field {name!r}: {err}") from None
    return values


def _config(cls: type, values: Any, name: str, source: str | os.PathLike):
    """A config dataclass from header values. Each field's type is checked strictly
    against the dataclass's annotations by pydantic (JSON gives ``1e9`` as a float
    where an int is due, a list where a number is due...), then the dataclass's own
    ``__post_init__`` checks the ranges."""
    from pydantic import TypeAdapter, ValidationError

    if not isinstance(values, dict):
        raise ModelFileError(f"{source}: field {name!r} must be a JSON object")
    types = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ModelFileError(f"{source}: field {name!r} has unknown keys {unknown}")
    checked = {}
    for key, value in values.items():
        try:
            checked[key] = TypeAdapter(types[key]).validate_python(value, strict=True)
        except ValidationError as err:
            problem = err.errors()[0]["msg"]
            raise ModelFileError(f"{source}: field '{name}.{key}': {problem}") from None
    try:
        return cls(**checked)
    except ConfigError as err:
        raise ModelFileError(f"{source}: field {name!r}: {err}") from None


def _digest(record: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the JSON record and every tensor's name, shape, dtype and bytes."""
    import torch

    sha = hashlib.sha256(record.encode())
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        sha.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
        sha.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def save_model_file(path: str | os.PathLike, net: SoundNet, spec: ModelSpec) -> Path:
    """Write ``net``'s backbone weights and ``spec`` into one file, atomically."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in net.backbone.state_dict().items()}
    record = spec.to_json()
    header = {METADATA_KEY: record, DIGEST_KEY: _digest(record, tensors)}
    return write_whole(path, lambda file: file.write(save(tensors, metadata=header)))


def _header(path: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise ModelFileError(f"{path}: model file not found")
    try:
        with safe_open(path, framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: not a soundsight model file ({err})") from None
    if METADATA_KEY not in header:
        raise ModelFileError(f"{path}: a safetensors file, but without soundsight metadata")
    return header


def read_spec(path: str | os.PathLike) -> ModelSpec:
    """The validated record of a model file, without reading its weights."""
    path = Path(path)
    return ModelSpec.from_json(_header(path)[METADATA_KEY], path)


def read_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelSpec]:
    """Weights and validated record of a model file; no pickled code is ever run.

    Raises :class:`ModelFileError` naming the file and the problem: not a model file,
    a header field of the wrong type or out of range, or a header that no longer
    matches the weights it was saved with.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    header = _header(path)
    spec = ModelSpec.from_json(header[METADATA_KEY], path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: not a soundsight model file ({err})") from None
    if DIGEST_KEY in header and header[DIGEST_KEY] != _digest(header[METADATA_KEY], tensors):
        raise ModelFileError(
            f"{path}: header or weights changed after the model was saved (checksum "
            "mismatch); retrain, or restore the original file"
        )
    return tensors, spec


def check_fits(path: str | os.PathLike, net: torch.nn.Module, tensors: dict) -> None:
    """Raise :class:`ModelFileError` unless ``tensors`` are exactly ``net``'s weights,
    naming the first missing, unexpected or mis-shaped tensor (with both shapes)."""
    expected = net.state_dict()
    for name, tensor in expected.items():
        if name not in tensors:
            raise ModelFileError(f"{path}: weights lack tensor {name!r} of the backbone")
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise ModelFileError(
                f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, the "
                f"network needs {tuple(tensor.shape)} (labels and head size disagree?)"
            )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ModelFileError(f"{path}: weights hold tensors the backbone lacks: {unexpected[:3]}")

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

import dataclasses
import hashlib
import json
import os
import re
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
#: The header's ``kind`` of a frozen-embedding model (:class:`FrozenSpec`); a header
#: without ``kind`` is a network's (:class:`ModelSpec`).
FROZEN_KIND = "frozen"
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
        if record.get("kind") == FROZEN_KIND:
            raise ModelFileError(
                f"{source}: a frozen-embedding model ({record.get('backbone', '?')}): "
                "`soundsight predict`, `evaluate`, `detect`, `cv`, `serve`, `report` and "
                "`export` take it; it is not a network to fine-tune"
            )
        for name in ("labels", "features", "model"):
            if name not in record:
                raise ModelFileError(f"{source}: header has no {name!r} field")
        labels = _labels(record, source)
        metrics = _train_and_metrics(record, source)
        if not isinstance(record.get("notice", ""), str):
            raise ModelFileError(f"{source}: field 'notice' must be a string")
        return cls(
            labels=tuple(labels),
            features=_config(FeatureConfig, record["features"], "features", source),
            model=_config(ModelConfig, record["model"], "model", source),
            train=dict(record.get("train", {})),
            metrics=metrics,
            notice=record.get("notice", ""),
            **_scores_meaning(record, source),
            **_multi_label(record, len(labels), source),
        )


def _labels(record: dict, source: str | os.PathLike) -> list[str]:
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
    return labels


def _train_and_metrics(record: dict, source: str | os.PathLike) -> dict[str, float]:
    """The ``metrics`` (names to numbers), once ``train`` and ``metrics`` are objects."""
    for name in ("train", "metrics"):
        if not isinstance(record.get(name, {}), dict):
            raise ModelFileError(f"{source}: field {name!r} must be a JSON object")
    metrics = record.get("metrics", {})
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()):
        raise ModelFileError(f"{source}: field 'metrics' must map names to numbers")
    return dict(metrics)


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
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.backbone.state_dict().items()}
    return _save(path, tensors, spec.to_json())


def _save(path: str | os.PathLike, tensors: dict[str, torch.Tensor], record: str) -> Path:
    from safetensors.torch import save

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
    path = Path(path)
    header = _header(path)
    spec = ModelSpec.from_json(header[METADATA_KEY], path)
    return _tensors(path, header), spec


def _tensors(path: Path, header: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of a model file whose header was read, checked against its checksum."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise ModelFileError(f"{path}: not a soundsight model file ({err})") from None
    if DIGEST_KEY in header and header[DIGEST_KEY] != _digest(header[METADATA_KEY], tensors):
        raise ModelFileError(
            f"{path}: header or weights changed after the model was saved (checksum "
            "mismatch); retrain, or restore the original file"
        )
    return tensors


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


# ------------------------------------------------------------ frozen-embedding models

#: The tensors of a frozen-embedding model: the StandardScaler's ``mean`` and ``scale``
#: (D,), the logistic regression's ``coef`` (labels, D) and ``intercept`` (labels,).
FROZEN_TENSORS = ("mean", "scale", "coef", "intercept")
#: Widest clip vector a frozen model may ask for (the widest part, BirdNET, is 1024; a
#: list of every part 5,376).
MAX_EMBEDDING_DIM = 65_536
_PART_NAME = re.compile(r"^[a-z0-9_]{1,64}$")
_DIGEST = re.compile(r"^[0-9a-f]{12}$")


@dataclass(frozen=True)
class FrozenPart:
    """One frozen backbone of a frozen-embedding model: its name, embedding width and
    the digest of its configuration (model version, front end, windows), which must
    match the installed part's at load."""

    name: str
    dim: int
    digest: str


@dataclass(frozen=True)
class FrozenSpec:
    """Everything a frozen-embedding model (:mod:`soundsight.frozen`) is besides its
    four tensors (:data:`FROZEN_TENSORS`).

    Attributes
    ----------
    labels : tuple of str
        Class names, in the order of the head's rows.
    parts : tuple of FrozenPart
        The backbones whose clip embeddings are concatenated, in order.
    notices : tuple of str
        The parts' licence notices (attribution, BirdNET's non-commercial terms).
    licences : tuple of str
        SPDX identifiers of the parts' weights (``CC-BY-NC-SA-4.0`` for BirdNET).
    versions : dict
        Package versions the model was built with (soundsight, scikit-learn, ...).
    head : dict
        The head's recipe: ``C``, ``max_iter``.
    train : dict
        What it was trained on (clips, seconds...), for the record.
    metrics : dict
        Validation scores (``accuracy``, ``map3``...).
    network : ModelSpec, optional
        Late fusion (:func:`soundsight.frozen.fuse`): a fine-tuned single-label network
        with the same labels, whose weights are the file's ``network.*`` tensors; a
        clip's probabilities are ``weight`` times the head's plus ``1 - weight`` times
        the network's. None: the head alone.
    weight : float
        The head's share of the fused probabilities, in [0, 1]; 1 without a network.
    """

    labels: tuple[str, ...]
    parts: tuple[FrozenPart, ...]
    notices: tuple[str, ...] = ()
    licences: tuple[str, ...] = ()
    versions: dict[str, str] = field(default_factory=dict)
    head: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    network: ModelSpec | None = None
    weight: float = 1.0
    #: What predict reads of any model: one label per clip, no thresholds.
    multi_label: bool = field(default=False, init=False)
    thresholds: tuple[float, ...] = field(default=(), init=False)

    @property
    def backbone(self) -> str:
        return "+".join(part.name for part in self.parts)

    @property
    def dim(self) -> int:
        return sum(part.dim for part in self.parts)

    @property
    def notice(self) -> str:
        """The notices, joined (a fused network's too): what predict prints."""
        notices = [*self.notices, self.network.notice if self.network else ""]
        return " ".join(notice for notice in notices if notice)

    def to_json(self) -> str:
        record = {
            "format": MODEL_FORMAT,
            "kind": FROZEN_KIND,
            "backbone": self.backbone,
            "labels": list(self.labels),
            "parts": [dataclasses.asdict(part) for part in self.parts],
            "notices": list(self.notices),
            "licences": list(self.licences),
            "versions": self.versions,
            "head": self.head,
            "train": self.train,
            "metrics": self.metrics,
        }
        if self.network is not None:
            record |= {"network": json.loads(self.network.to_json()), "weight": self.weight}
        return json.dumps(record)

    @classmethod
    def from_json(cls, text: str, source: str | os.PathLike = "model file") -> FrozenSpec:
        """Parse and validate a frozen model's header, every field;
        :class:`ModelFileError` names ``source`` and the field."""
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelFileError(f"{source}: header is not valid JSON ({err})") from None
        if not isinstance(record, dict) or record.get("kind") != FROZEN_KIND:
            raise ModelFileError(f"{source}: not a frozen-embedding model file")
        if record.get("format") != MODEL_FORMAT:
            raise ModelFileError(f"{source}: model format {record.get('format')!r} not supported")
        known = {"format", "kind", "backbone", "labels", "parts", "notices", "licences"}
        known |= {"versions", "head", "train", "metrics", "network", "weight"}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ModelFileError(f"{source}: header has unknown fields {unknown}")
        for name in ("labels", "parts"):
            if name not in record:
                raise ModelFileError(f"{source}: header has no {name!r} field")
        labels = _labels(record, source)
        metrics = _train_and_metrics(record, source)
        parts = _frozen_parts(record["parts"], source)
        if record.get("backbone") != "+".join(part.name for part in parts):
            raise ModelFileError(f"{source}: field 'backbone' does not name its parts")
        for name in ("notices", "licences"):
            values = record.get(name, [])
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ModelFileError(f"{source}: field {name!r} must be a list of strings")
        versions = record.get("versions", {})
        if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
            raise ModelFileError(f"{source}: field 'versions' must map packages to strings")
        return cls(
            labels=tuple(labels),
            parts=parts,
            notices=tuple(record.get("notices", [])),
            licences=tuple(record.get("licences", [])),
            versions=dict(versions),
            head=_frozen_head(record.get("head", {}), source),
            train=dict(record.get("train", {})),
            metrics=metrics,
            **_fused_network(record, labels, source),
        )


def _fused_network(record: dict, labels: list[str], source: str | os.PathLike) -> dict[str, Any]:
    """A frozen header's late-fusion fields, validated: ``network`` (a fine-tuned
    single-label network's full header, labels as the head's) and ``weight``."""
    if ("network" in record) != ("weight" in record):
        raise ModelFileError(f"{source}: fields 'network' and 'weight' come together")
    if "network" not in record:
        return {}
    network = ModelSpec.from_dict(record["network"], f"{source} (fused network)")
    if network.multi_label or list(network.labels) != labels:
        raise ModelFileError(
            f"{source}: field 'network' must be a single-label network with the head's labels"
        )
    weight = record["weight"]
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not 0 <= weight <= 1:
        raise ModelFileError(f"{source}: field 'weight' must be a number from 0 to 1")
    return {"network": network, "weight": float(weight)}


def _frozen_parts(values: Any, source: str | os.PathLike) -> tuple[FrozenPart, ...]:
    if not isinstance(values, list) or not values:
        raise ModelFileError(f"{source}: field 'parts' must be a non-empty list")
    parts = []
    for i, value in enumerate(values):
        if (
            not isinstance(value, dict)
            or set(value) != {"name", "dim", "digest"}
            or not isinstance(value["name"], str)
            or not _PART_NAME.match(value["name"])
            or not isinstance(value["dim"], int)
            or isinstance(value["dim"], bool)
            or not 1 <= value["dim"] <= MAX_EMBEDDING_DIM
            or not isinstance(value["digest"], str)
            or not _DIGEST.match(value["digest"])
        ):
            raise ModelFileError(
                f"{source}: field 'parts[{i}]' must be {{name, dim (1 to "
                f"{MAX_EMBEDDING_DIM}), digest (12 hex digits)}}"
            )
        parts.append(FrozenPart(value["name"], value["dim"], value["digest"]))
    if len({part.name for part in parts}) != len(parts):
        raise ModelFileError(f"{source}: field 'parts' names a part twice")
    if sum(part.dim for part in parts) > MAX_EMBEDDING_DIM:
        raise ModelFileError(f"{source}: field 'parts' asks for over {MAX_EMBEDDING_DIM} features")
    return tuple(parts)


def _frozen_head(values: Any, source: str | os.PathLike) -> dict[str, Any]:
    if not isinstance(values, dict) or set(values) - {"C", "max_iter"}:
        raise ModelFileError(f"{source}: field 'head' must be {{C, max_iter}}")
    c, max_iter = values.get("C", 1.0), values.get("max_iter", 100)
    if not isinstance(c, int | float) or isinstance(c, bool) or not 0 < c < float("inf"):
        raise ModelFileError(f"{source}: field 'head.C' must be a positive number")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1:
        raise ModelFileError(f"{source}: field 'head.max_iter' must be a positive integer")
    return dict(values)


#: Prefix of a fused network's tensors in a frozen model file (``network.conv_stem...``).
NETWORK_PREFIX = "network."


def save_frozen_model_file(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], spec: FrozenSpec
) -> Path:
    """Write a frozen-embedding model (its :data:`FROZEN_TENSORS`, a fused network's
    weights under :data:`NETWORK_PREFIX`, and ``spec``) into one file, atomically,
    checked as it will be read."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _check_frozen_tensors(path, tensors, spec)
    return _save(path, tensors, spec.to_json())


def _check_frozen_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], spec: FrozenSpec
) -> None:
    import torch

    network = [name for name in tensors if name.startswith(NETWORK_PREFIX)]
    if bool(network) != (spec.network is not None):
        raise ModelFileError(
            f"{path}: a fused network's weights and its header field 'network' come together"
        )
    if set(tensors) - set(network) != set(FROZEN_TENSORS):
        raise ModelFileError(
            f"{path}: a frozen model holds exactly {', '.join(FROZEN_TENSORS)}"
            f"{' and its network' if network else ''}, not "
            f"{', '.join(sorted(set(tensors) - set(network)))}"
        )
    labels, dim = len(spec.labels), spec.dim
    shapes = {"mean": (dim,), "scale": (dim,), "coef": (labels, dim), "intercept": (labels,)}
    for name, shape in shapes.items():
        tensor = tensors[name]
        if tuple(tensor.shape) != shape or tensor.dtype != torch.float32:
            raise ModelFileError(
                f"{path}: tensor {name!r} is {tensor.dtype} {tuple(tensor.shape)}; the header's "
                f"{labels} labels and {dim} features need float32 {shape}"
            )
        if not torch.isfinite(tensor).all():
            raise ModelFileError(f"{path}: tensor {name!r} holds NaN or infinite values")
    if not (tensors["scale"] > 0).all():
        raise ModelFileError(f"{path}: tensor 'scale' must be positive")


def model_kind(path: str | os.PathLike) -> str:
    """``frozen`` for a frozen-embedding model file, else ``network`` (what
    :func:`read_model_file` reads; it reports any problem with the file)."""
    try:
        record = json.loads(_header(Path(path))[METADATA_KEY])
    except (ModelFileError, json.JSONDecodeError):
        return "network"
    frozen = isinstance(record, dict) and record.get("kind") == FROZEN_KIND
    return FROZEN_KIND if frozen else "network"


def read_frozen_model_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], FrozenSpec]:
    """Tensors and validated record of a frozen-embedding model file (checksum, every
    header field, the tensors' names, shapes, dtypes and values); no pickled code."""
    path = Path(path)
    header = _header(path)
    spec = FrozenSpec.from_json(header[METADATA_KEY], path)
    tensors = _tensors(path, header)
    _check_frozen_tensors(path, tensors, spec)
    return tensors, spec


def read_any_spec(path: str | os.PathLike) -> ModelSpec | FrozenSpec:
    """The validated record of either kind of model file, without its tensors (what
    ``soundsight serve`` prints the notice from before it loads the model)."""
    path = Path(path)
    text = _header(path)[METADATA_KEY]
    if model_kind(path) == FROZEN_KIND:
        return FrozenSpec.from_json(text, path)
    return ModelSpec.from_json(text, path)

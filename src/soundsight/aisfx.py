"""The aisfx audio embedding network, re-declared here, and its pretrained checkpoint.

aisfx (A. B. Ma and A. Lerch, "Representation Learning for the Automatic Indexing of
Sound Effects Libraries", ISMIR 2022; https://github.com/alisonbma/aisfx) is a 9-layer
CNN pretrained on sound-effect libraries whose 512-d embedding beats ImageNet
backbones on few-clip sound classification (see the README's "Backbones"). Its PyPI
package pins librosa==0.9.2 and numpy==1.23, so it cannot be a dependency: the
network is declared again below (:class:`AisfxNet`, parameter names kept so the
checkpoint loads by key) and the checkpoint is read out of the package's wheel,
fetched once by :mod:`soundsight.weights` (``make install`` runs it).

The network code and the checkpoint are licensed CC-BY-4.0 (Copyright (c) 2022 A.B. Ma
and A. Lerch; ``aisfx/models/cnn2d.py``, itself after the DCASE 2018 cross-task
baseline, https://arxiv.org/abs/1808.00773); model files built on them carry
:data:`NOTICE`.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import FeatureConfig

AISFX_VERSION = "0.1.2"
#: The checkpoint's place inside the aisfx wheel.
CHECKPOINT_MEMBER = "aisfx/models/checkpoint.pth"
#: Prefix of the embedding network's tensors in the checkpoint (the rest, ``fc.*``,
#: are the heads of its nine pretraining data sets, which soundsight replaces).
EMBEDDING_PREFIX = "embedding_net."
EMBEDDING_DIM = 512
#: What installs the checkpoint (:mod:`soundsight.weights`; ``make install`` runs it).
FETCH_COMMAND = "python -m soundsight.weights"
NOTICE = (
    "Built on the aisfx embedding network and checkpoint (A. B. Ma and A. Lerch, ISMIR "
    "2022, https://github.com/alisonbma/aisfx), licensed CC-BY-4.0 "
    "(https://creativecommons.org/licenses/by/4.0/); soundsight re-declared the network "
    "and fine-tuned its weights."
)

#: aisfx's own front end (its ``inference.py`` constants): 44.1 kHz, 96 HTK mel bands
#: over 0-22.05 kHz, 2048-sample windows, hop 1024, on the peak-normalised waveform,
#: scaled ``log10(1 + 1e4 * S) / 9.4578`` (see :class:`soundsight.features.LogMel`).
AISFX_FEATURES = FeatureConfig(
    sample_rate=44100,
    n_fft=2048,
    hop_length=1024,
    n_mels=96,
    fmin=0.0,
    fmax=None,
    top_db=None,
    front_end="aisfx",
)
#: aisfx embeds blocks of 100 frames (2.32 s), soundsight's crop and window length.
BLOCK_FRAMES = 100
BLOCK_SECONDS = round(AISFX_FEATURES.frames_to_seconds(BLOCK_FRAMES), 2)


def weights_folder() -> Path:
    """Where fetched weights live: ``$SOUNDSIGHT_WEIGHTS``, else ``~/.cache/soundsight``."""
    return Path(os.environ.get("SOUNDSIGHT_WEIGHTS") or Path.home() / ".cache" / "soundsight")


def wheel_path() -> Path:
    return weights_folder() / f"aisfx-{AISFX_VERSION}-py2.py3-none-any.whl"


def _numpy_globals() -> list:
    """The numpy types the checkpoint's pickle names (the data-set table holds
    ``np.int64`` indices), allowed by name so ``weights_only`` loading accepts them and
    nothing else; numpy 2 moved ``numpy.core`` to ``numpy._core``."""
    from numpy._core.multiarray import scalar

    return [
        (scalar, "numpy.core.multiarray.scalar"),
        np.dtype,
        np.dtypes.Int64DType,
        np.dtypes.Float64DType,
    ]


def read_checkpoint(wheel: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
    """The embedding network's pretrained tensors (``conv_block1.conv1.weight``...,
    under :data:`EMBEDDING_PREFIX`) from the aisfx wheel, never executing pickled code.

    Raises :class:`~soundsight.models.WeightsError` naming the command that installs
    the wheel when it is missing, and the file when it is not an aisfx wheel.
    """
    from .models import WeightsError

    path = Path(wheel) if wheel is not None else wheel_path()
    if not path.is_file():
        raise WeightsError(
            f"aisfx weights not installed ({path} missing); install them with "
            f"`{FETCH_COMMAND}` (or `make install`)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(CHECKPOINT_MEMBER)
        with torch.serialization.safe_globals(_numpy_globals()):
            state, _datasets = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (zipfile.BadZipFile, KeyError, ValueError, RuntimeError) as err:
        raise WeightsError(
            f"{path}: not the aisfx {AISFX_VERSION} wheel ({err}); remove it and run "
            f"`{FETCH_COMMAND}`"
        ) from None
    return {k: v for k, v in state.items() if k.startswith(EMBEDDING_PREFIX)}


class ConvBlock(torch.nn.Module):
    """Two 3x3 convolutions, each batch-normalised and rectified, then pooling
    (aisfx's ``ConvBlock``, CC-BY-4.0, A.B. Ma and A. Lerch)."""

    def __init__(self, in_channels: int, out_channels: int, pool: tuple[int, int]):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(out_channels)
        self.bn2 = torch.nn.BatchNorm2d(out_channels)
        self.pool = pool
        for conv in (self.conv1, self.conv2):
            torch.nn.init.kaiming_uniform_(conv.weight, nonlinearity="leaky_relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return F.max_pool2d(x, self.pool) if self.pool != (1, 1) else x


class EmbeddingNet(torch.nn.Module):
    """aisfx's ``EmbeddingNet('max', 3, 1, 64)`` (CC-BY-4.0, A.B. Ma and A. Lerch):
    four conv blocks of 64, 128, 256, 512 channels, max-pooled 2x2 after the first three."""

    def __init__(self, channels: int = 64):
        super().__init__()
        widths = [1, channels, 2 * channels, 4 * channels, 8 * channels]
        for i in range(4):
            pool = (2, 2) if i < 3 else (1, 1)
            self.add_module(f"conv_block{i + 1}", ConvBlock(widths[i], widths[i + 1], pool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(batch, 1, frames, bands)`` -> feature map ``(batch, 512, frames/8, bands/8)``."""
        for block in self.children():
            x = block(x)
        return x


class AisfxNet(torch.nn.Module):
    """aisfx's embedding network with a new linear head, behind the part of timm's
    interface soundsight uses (``forward_features``, ``forward_head``,
    ``get_classifier``, ``default_cfg``), so :class:`~soundsight.models.SoundNet`,
    training, prediction and batch-norm folding treat it as any backbone.

    The embedding is aisfx's: the feature map averaged over frequency, then its
    maximum over time (512-d).
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.embedding_net = EmbeddingNet()
        self.classifier = torch.nn.Linear(EMBEDDING_DIM, num_classes)
        self.default_cfg = {"architecture": "aisfx", "classifier": "classifier"}
        self.pretrained_cfg = self.default_cfg
        self.num_features = EMBEDDING_DIM

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedding_net(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = x.mean(dim=3).amax(dim=2)
        return pooled if pre_logits else self.classifier(pooled)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> torch.nn.Module:
        return self.classifier


class AisfxInput(torch.nn.Module):
    """Features of the ``aisfx`` front end ``(batch, 1, bands, frames)`` -> the
    network's input ``(batch, 1, frames, bands)`` on aisfx's own scale (soundsight
    keeps them shifted by -1 so silence is the floor, as in dB; see
    :class:`soundsight.features.LogMel`)."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features + 1.0).transpose(2, 3)

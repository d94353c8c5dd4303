"""soundsight: classify sounds by fine-tuning pretrained CNNs on log-mel spectrograms.

Every public name loads its module on first use, so ``import soundsight`` (and the
CLI's ``--help``) stay quick: torch, timm, Lightning and librosa are imported only by
the work that needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: Public name -> module that defines it.
_PUBLIC = {
    "SoundsightError": "errors",
    "ConfigError": "errors",
    "FeatureConfig": "config",
    "ModelConfig": "config",
    "AUDIO_EXTENSIONS": "audio",
    "AudioError": "audio",
    "decode_bytes": "audio",
    "load_clip": "audio",
    "CacheError": "cache",
    "FeatureCache": "cache",
    "JobReport": "cache",
    "prepare": "cache",
    "Featuriser": "features",
    "LogMel": "features",
    "colorize": "features",
    "log_mel": "features",
    "export_images": "images",
    "spectrogram_image": "images",
    "LAYOUTS": "layouts",
    "DatasetError": "layouts",
    "detect_layout": "layouts",
    "load_dataset": "layouts",
    "ModelSpec": "modelfile",
    "ModelFileError": "modelfile",
    "read_spec": "modelfile",
    "train": "training",
    "cross_validate": "training",
    "lr_find": "training",
    "TrainConfig": "config",
    "Classifier": "prediction",
    "evaluate": "prediction",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'soundsight' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])


__all__ = sorted(_PUBLIC)

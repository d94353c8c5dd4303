"""soundsight: classify sounds by fine-tuning ImageNet CNNs on log-mel spectrograms."""

from .audio import AUDIO_EXTENSIONS, AudioError, decode_bytes, load_clip
from .cache import CacheError, FeatureCache, JobReport, prepare
from .errors import ConfigError, SoundsightError
from .features import FeatureConfig, LogMel, colorize, log_mel
from .images import export_images, spectrogram_image
from .layouts import LAYOUTS, DatasetError, detect_layout, load_dataset

#: Heavier parts (Lightning, timm) load on first use, so that ``import soundsight`` for
#: decoding and preparing features stays quick and small.
_LAZY = {
    "train": "training",
    "cross_validate": "training",
    "lr_find": "training",
    "TrainConfig": "training",
    "ModelConfig": "models",
    "Classifier": "prediction",
    "evaluate": "prediction",
}


def __getattr__(name: str):
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'soundsight' has no attribute {name!r}")


__all__ = [
    *_LAZY,
    "AUDIO_EXTENSIONS",
    "AudioError",
    "CacheError",
    "ConfigError",
    "DatasetError",
    "FeatureCache",
    "FeatureConfig",
    "JobReport",
    "LAYOUTS",
    "LogMel",
    "SoundsightError",
    "colorize",
    "decode_bytes",
    "detect_layout",
    "export_images",
    "load_clip",
    "load_dataset",
    "log_mel",
    "prepare",
    "spectrogram_image",
]

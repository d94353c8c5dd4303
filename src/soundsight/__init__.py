"""soundsight: classify sounds by fine-tuning ImageNet CNNs on log-mel spectrograms."""

from .audio import AUDIO_EXTENSIONS, AudioError, decode_bytes, load_clip
from .cache import CacheError, FeatureCache, JobReport, prepare
from .features import FeatureConfig, LogMel, colorize, log_mel
from .images import export_images, spectrogram_image
from .layouts import LAYOUTS, DatasetError, detect_layout, load_dataset

__all__ = [
    "AUDIO_EXTENSIONS",
    "AudioError",
    "CacheError",
    "DatasetError",
    "FeatureCache",
    "FeatureConfig",
    "JobReport",
    "LAYOUTS",
    "LogMel",
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

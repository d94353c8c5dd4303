"""The clips a training run sees: split, prepared, checked, and served in batches.

:class:`ClipDataModule` is a LightningDataModule. Set up once (``prepare_data`` then
``setup``, which :func:`soundsight.train` calls before building the network, since the
network needs the labels and the crop length), it holds the training and validation
tables, the labels, the resolved model config and the clips left out with their
reasons (``failures.csv``). Lightning then asks it for loaders every epoch: clips whose
file was edited or deleted since the run began are left out from then on and reported
like clips that failed to decode (each dataset read the features found at set-up, so a
change never breaks an epoch under way).

The run folder's ``clips.csv`` records what the run trains and validates on (path,
label, split, file identity): ``--resume`` compares the data set with it and refuses a
changed one, which would put clips the model trained on into validation.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import pandas as pd
import torch

from .cache import DEFAULT_CACHE, FeatureCache, JobReport, clip_key, prepare
from .config import BACKGROUND_LABEL
from .data import BackgroundNoise, CachedClips, ClipView, collate_windows, quiet_stretch_bank
from .distributed import is_global_zero, launch_rank
from .evaluation import holdout
from .features import FeatureConfig
from .layouts import DatasetError, clip_labels, is_multi_label, multi_hot
from .models import ModelConfig
from .tables import read_csv, write_csv

if TYPE_CHECKING:
    from .training import TrainConfig

#: File identity recorded for a clip whose file cannot be read (see :func:`identity`).
MISSING = "missing"


def identity(path: str) -> str:
    """What a clip's file is now: its cache key (resolved path, size, modification
    time), or :data:`MISSING`."""
    try:
        return clip_key(path)
    except OSError:
        return MISSING


def snapshot(train: pd.DataFrame, valid: pd.DataFrame) -> pd.DataFrame:
    """``path, label, split, key`` of every clip of a run, as ``clips.csv`` holds it."""
    parts = [
        pd.DataFrame({"path": table["path"].astype(str), "label": table["label"], "split": split})
        for table, split in ((train, "train"), (valid, "valid"))
    ]
    frame = pd.concat(parts, ignore_index=True)
    return frame.assign(key=[identity(p) for p in frame["path"]])


def _names(paths, limit: int = 3) -> str:
    paths = sorted(paths)
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def describe_changes(before: pd.DataFrame, now: pd.DataFrame) -> str | None:
    """What differs between two :func:`snapshot` tables, in words (None: nothing)."""
    before = before.drop_duplicates("path").set_index("path")
    now = now.drop_duplicates("path").set_index("path")
    common = before.index.intersection(now.index)
    parts = []
    for what, paths in (
        ("added", now.index.difference(before.index)),
        ("removed", before.index.difference(now.index)),
    ):
        if len(paths):
            parts.append(f"{len(paths)} clips {what} ({_names(paths)})")
    for column, what in (
        ("key", "edited or deleted"),
        ("label", "relabelled"),
        ("split", "moved between training and validation"),
    ):
        differ = common[before.loc[common, column] != now.loc[common, column]]
        if len(differ):
            parts.append(f"{len(differ)} clips {what} ({_names(differ)})")
    return "; ".join(parts) or None


class _Numbered(torch.utils.data.Dataset):
    """Validation clips that carry their row number in place of the (unused) loss
    weight: under DDP each rank validates a share, padded with repeats to equal
    shares, and the row numbers put the gathered shares back in order."""

    def __init__(self, clips: torch.utils.data.Subset):
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int):
        view, target, _ = self.clips[index]
        return view, target, torch.tensor(index)


class ClipDataModule(L.LightningDataModule):
    """Training and validation clips of one run, from the feature cache.

    Parameters
    ----------
    clips : DataFrame
        Training clips (:func:`soundsight.load_dataset`).
    out : path
        The run folder (``failures.csv``, ``clips.csv``).
    valid : DataFrame, optional
        Validation clips; default: :func:`soundsight.evaluation.holdout`'s 20% of
        ``clips``.
    features, model, config : FeatureConfig, ModelConfig, TrainConfig
        Feature parameters; the network (its crop length is resolved from the clips
        when unset); the recipe (batch size, workers, seed, balance, weights).
    cache : path, optional
        Feature cache folder (default :data:`soundsight.cache.DEFAULT_CACHE`).
    resume : bool
        The run continues from a checkpoint: its ``clips.csv`` must match the data.
    force : bool
        Resume even on a changed data set.
    progress : bool
        Show preparation's progress bar.
    noise : sequence of paths, optional
        Background recordings mixed into training views (``config.noise_probability``,
        :class:`soundsight.data.BackgroundNoise`); prepared into the cache like clips,
        listed in ``noise.csv``; one that fails to decode is reported and left out.
    """

    def __init__(
        self,
        clips: pd.DataFrame,
        *,
        out: str | os.PathLike,
        valid: pd.DataFrame | None = None,
        features: FeatureConfig,
        model: ModelConfig,
        config: TrainConfig,
        cache: str | os.PathLike | None = None,
        resume: bool = False,
        force: bool = False,
        progress: bool = True,
        noise: Sequence[str | os.PathLike] = (),
    ):
        super().__init__()
        self.out = Path(out)
        self.features = features
        self.model = model
        self.config = config
        self.cache_root = Path(cache) if cache is not None else DEFAULT_CACHE
        self.resume = resume
        self.force = force
        self.progress = progress
        self.failures: list[tuple[str, str]] = []
        self.labels: list[str] = []
        self.background_clips: dict[str, int] = {}
        self._clips = _labelled(clips)
        self._given_valid = valid
        self._snapshot: pd.DataFrame | None = None
        self._feature_cache: FeatureCache | None = None
        self._report: JobReport | None = None
        self._tables: dict[str, pd.DataFrame] = {}
        self._sets: dict[str, CachedClips] = {}
        self._kept: dict[str, np.ndarray] = {}
        self._noise = [str(p) for p in noise]
        self._noise_report: JobReport | None = None

    # -- set-up ---------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Split the clips, check a resumed run's data, and prepare every clip's
        features. Under a launcher that starts several processes (torchrun, srun),
        each first prepares its own shard, then whatever is still missing: entries
        are renamed into place whole, so a clip done twice is only wasted work, and
        every process returns with the whole cache; no barrier needed. (Lightning's
        own launcher starts its processes after this ran in the first.)"""
        if self._snapshot is not None:
            return
        train, valid = self._split()
        self._snapshot = snapshot(train, valid)
        self._check_resumable()
        if is_global_zero():
            write_csv(self._snapshot, self.out / "clips.csv")
        self._feature_cache, self._report = prepare_shards(
            pd.concat([train, valid]), self.cache_root, self.features, self.progress
        )
        self._tables = {"train": train, "valid": valid}
        if self._noise:
            _, self._noise_report = prepare_shards(
                pd.DataFrame({"path": self._noise}), self.cache_root, self.features, self.progress
            )

    def _split(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        if self._given_valid is not None:
            return self._clips, _labelled(self._given_valid)
        return holdout(self._clips, 0.2, self.config.seed)

    def _check_resumable(self) -> None:
        if not self.resume or self.force:
            return
        assert self._snapshot is not None
        saved = self.out / "clips.csv"
        if not saved.exists():
            raise DatasetError(
                f"{self.out}: no clips.csv records what this run trained on, so a "
                "changed data set cannot be told from the same one; start a new run, or "
                "resume with force=True (--force)"
            )
        changes = describe_changes(read_csv(saved, text=("path", "label", "key")), self._snapshot)
        if changes:
            raise DatasetError(
                f"{saved}: the data set changed since this run started: {changes}. "
                "Resuming would validate on clips the model has trained on; start a new "
                "run (another --out), or resume with force=True (--force)"
            )

    def setup(self, stage: str | None = None) -> None:
        """Leave out the clips that failed (and labels absent from training), resolve
        the crop length, and build the datasets; done once (Lightning calls it again
        at each fit, which changes nothing)."""
        if self._sets:
            return
        self.prepare_data()
        assert self._feature_cache is not None and self._report is not None
        cache = self._feature_cache
        self._leave_out(self._report.failures, "could not be decoded")
        train, valid = (self._cached(self._tables[s], cache) for s in ("train", "valid"))
        multi = self.config.multi_label
        if multi:
            self.labels = sorted({label for labels in clip_labels(train) for label in labels})
            known = set(self.labels)
            unseen = np.array([not set(labels) <= known for labels in clip_labels(valid)], bool)
            if not self.labels:
                raise DatasetError(
                    f"none of the {len(train)} training clips has a label: nothing to learn"
                )
        else:
            self.labels = sorted(train["label"].unique())
            unseen = ~valid["label"].isin(self.labels).to_numpy()
        if unseen.any():
            warnings.warn(
                f"{int(unseen.sum())} validation clips have labels absent from training "
                "and are left out",
                stacklevel=3,
            )
            valid = valid[~unseen].reset_index(drop=True)
        for split, table in (("training", train), ("validation", valid)):
            if table.empty:
                raise DatasetError(
                    f"no {split} clips left ({len(self._clips)} labelled clips given, "
                    f"{len(self.failures)} left out): too small to train and validate; "
                    "give each label at least 2 clips that decode"
                )
        frames = np.array([cache.load(p).shape[1] for p in train["path"]])
        seconds = frames * self.features.hop_length / self.features.sample_rate
        self.model = resolve_crop(self.model, seconds)
        view = ClipView.for_model(self.model, self.features)
        index = {label: i for i, label in enumerate(self.labels)}
        weights = np.where(
            train["verified"].fillna(True).to_numpy(bool), 1.0, self.config.unverified_weight
        )
        self._tables = {"train": train, "valid": valid}
        targets = {
            split: multi_hot(clip_labels(table), index) if multi else table["label"].map(index)
            for split, table in self._tables.items()
        }
        #: Multi-label clips without a label (background), per split.
        self.background_clips = {
            split: int((target.sum(1) == 0).sum()) if multi else 0
            for split, target in targets.items()
        }
        own = targets["train"].sum(1) == 0 if multi else train["label"] == BACKGROUND_LABEL
        noise = self._background_noise(
            cache, view, list(train["path"][np.asarray(own)]), list(train["path"])
        )
        self._sets = {
            "train": CachedClips(
                cache, train["path"], targets["train"], view, True, weights, noise
            ),
            "valid": CachedClips(cache, valid["path"], targets["valid"], view, False),
        }
        self._kept = {split: np.arange(len(self._tables[split])) for split in self._sets}

    def _background_noise(
        self, cache: FeatureCache, view: ClipView, own: list[str], clips: list[str]
    ) -> BackgroundNoise | None:
        """The noise recordings that decoded (the others reported and left out), else
        (``config.background_noise``) the training side's own background clips
        ``own``, else the quiet stretches of its ``clips``; listed in ``noise.csv``.
        None without any."""
        if not self._noise:
            if not self.config.background_noise:
                return None
            if own:
                return self._mixer(cache, view, own, "background clips")
            return self._quiet_stretches(cache, view, clips)
        assert self._noise_report is not None
        failures = sorted(self._noise_report.failures)
        failed = {path for path, _ in failures}
        if failures:
            shown = "; ".join(f"{path}: {reason}" for path, reason in failures[:3])
            more = f"; and {len(failures) - 3} more" if len(failures) > 3 else ""
            warnings.warn(
                f"{len(failures)} noise recordings could not be decoded and are left out "
                f"({shown}{more})",
                stacklevel=4,
            )
        paths = [p for p in self._noise if p not in failed and p in cache]
        if not paths:
            raise DatasetError(
                f"none of the {len(self._noise)} noise recordings decodes: nothing to mix "
                "into training"
            )
        return self._mixer(cache, view, paths, "noise recordings")

    def _mixer(
        self, cache: FeatureCache, view: ClipView, paths: list[str], what: str
    ) -> BackgroundNoise:
        self._list_noise(pd.DataFrame({"path": paths}), f"{len(paths)} {what}")
        config = self.config
        return BackgroundNoise(
            cache,
            paths,
            view,
            self.features,
            config.noise_probability,
            (config.noise_snr_min, config.noise_snr_max),
        )

    def _quiet_stretches(
        self, cache: FeatureCache, view: ClipView, clips: list[str]
    ) -> BackgroundNoise | None:
        bank, frames = quiet_stretch_bank(cache, clips, view, self.features)
        if bank is None:
            return None
        seconds = bank.shape[1] * self.features.hop_length / self.features.sample_rate
        table = pd.DataFrame({"path": list(frames), "quiet_frames": list(frames.values())})
        self._list_noise(table, f"the quiet stretches of {len(frames)} clips ({seconds:.0f} s)")
        config = self.config
        return BackgroundNoise(
            cache,
            [],
            view,
            self.features,
            config.noise_probability,
            (config.noise_snr_min, config.noise_snr_max),
            bank,
        )

    def _list_noise(self, table: pd.DataFrame, what: str) -> None:
        """Write ``noise.csv`` (once, on the first process) and say what the noise is."""
        if self._is_global_zero():
            write_csv(table, self.out / "noise.csv")
            if self.progress:
                print(f"training views mixed with {what} as noise (noise.csv)")

    def _cached(self, table: pd.DataFrame, cache: FeatureCache) -> pd.DataFrame:
        """The rows whose features are in the cache; a clip edited or deleted since it
        was prepared is left out with the reason."""
        present = np.array([p in cache for p in table["path"]], bool)
        failed = {path for path, _ in self.failures}
        changed = [
            (p, f"{_changed(p)} after it was prepared")
            for p in table["path"][~present]
            if p not in failed
        ]
        self._leave_out(changed, "were edited or deleted after they were prepared")
        return table[present].reset_index(drop=True)

    def _leave_out(self, failures: list[tuple[str, str]], why: str) -> None:
        """Record clips left out, and warn ``N clips <why> and are left out``; rank 0
        rewrites ``failures.csv`` with all of them."""
        self.failures.extend(failures)
        if self._is_global_zero():
            table = pd.DataFrame(self.failures, columns=["path", "reason"])
            write_csv(table, self.out / "failures.csv")
        if failures:
            names = _names(path for path, _ in failures)
            warnings.warn(
                f"{len(failures)} clips {why} and are left out ({names}; see "
                f"{self.out / 'failures.csv'})",
                stacklevel=4,
            )

    def _is_global_zero(self) -> bool:
        return self.trainer.is_global_zero if self.trainer is not None else is_global_zero()

    # -- per epoch ------------------------------------------------------------------

    def _drop_changed(self) -> None:
        """Leave out, from now on, clips whose file changed since the run began.

        Every rank must leave out the same clips (their shares would otherwise differ
        in size), so rank 0's findings are broadcast to the others."""
        assert self._snapshot is not None
        keys = dict(zip(self._snapshot["path"], self._snapshot["key"], strict=True))
        kept = {
            split: [self._tables[split]["path"].iloc[i] for i in rows]
            for split, rows in self._kept.items()
        }
        changed = sorted(
            {p for paths in kept.values() for p in paths if identity(p) != keys.get(p)}
        )
        if self.trainer is not None:
            changed = self.trainer.strategy.broadcast(changed, src=0)
        if not changed:
            return
        gone = set(changed)
        for split, paths in kept.items():
            self._kept[split] = np.array(
                [i for i, p in zip(self._kept[split], paths, strict=True) if p not in gone], int
            )
        self._leave_out(
            [(p, f"{_changed(p)} during training") for p in changed],
            "changed or were deleted during training",
        )
        if not len(self._kept["train"]) or not len(self._kept["valid"]):
            raise DatasetError("every training or validation clip changed during training")

    @property
    def valid(self) -> pd.DataFrame:
        """The validation clips now in use, in the order of their predictions."""
        return self._tables["valid"].iloc[self._kept["valid"]].reset_index(drop=True)

    def _loader_options(self) -> dict:
        return {
            "num_workers": self.config.num_workers,
            "persistent_workers": self.config.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),
        }

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        self._drop_changed()
        rows = self._kept["train"]
        clips = torch.utils.data.Subset(self._sets["train"], rows.tolist())
        sampler = None
        if self.config.balanced:
            labels = self._tables["train"]["label"].iloc[rows]
            counts = labels.map(labels.value_counts()).to_numpy()
            sampler = torch.utils.data.WeightedRandomSampler(1.0 / counts, len(counts))
        return torch.utils.data.DataLoader(
            clips,
            self.config.batch_size,
            shuffle=sampler is None,
            sampler=sampler,
            # A last partial batch is dropped (BatchNorm on a batch of one is noise),
            # unless it is the only one.
            drop_last=len(clips) > self.config.batch_size,
            **self._loader_options(),
        )

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self.windows_dataloader("valid")

    def windows_dataloader(
        self, split: str, every_rank: bool = True
    ) -> torch.utils.data.DataLoader:
        """The clips of ``split`` (``train`` or ``valid``) in the validation loader's
        form: every evaluation window of each clip, no augmentation, row numbers (the
        linear probe of LP-FT reads the training clips so). ``every_rank=False`` when
        one process alone asks (rank 0 calibrating): the clips left out stay as they
        are, since agreeing on changed files needs every rank."""
        if every_rank:
            self._drop_changed()
        rows = self._kept[split].tolist()
        dataset = self._sets[split]
        if dataset.train:  # the same clips, as evaluation windows
            dataset = copy.copy(dataset)
            dataset.train = False
        clips = _Numbered(torch.utils.data.Subset(dataset, rows))
        return torch.utils.data.DataLoader(
            clips,
            max(1, self.config.batch_size // 4),
            collate_fn=collate_windows,
            **self._loader_options(),
        )


def _labelled(table: pd.DataFrame) -> pd.DataFrame:
    """Clips with a label, labels as strings (a table built by hand may hold numbers);
    every clip of a multi-label table, background clips (no label) included."""
    if is_multi_label(table):
        return table.reset_index(drop=True)
    labelled = table[table["label"].notna()]
    return labelled.assign(label=labelled["label"].astype(str)).reset_index(drop=True)


def _changed(path: str) -> str:
    """How a clip's file changed: ``deleted`` or ``edited``."""
    return "deleted" if identity(path) == MISSING else "edited"


def resolve_crop(model: ModelConfig, durations: np.ndarray) -> ModelConfig:
    """Pick the crop length from the data when unset: the 90th percentile of clip
    durations, between 1 and 3 seconds (short clips waste no compute on padding;
    long ones are seen through several crops)."""
    if model.image_size is not None or model.crop_seconds is not None:
        return model
    seconds = float(np.clip(np.percentile(durations, 90), 1.0, 3.0))
    return replace(model, crop_seconds=round(seconds, 2))


def prepare_shards(
    table: pd.DataFrame,
    cache: str | os.PathLike | None,
    features: FeatureConfig | None,
    progress: bool,
) -> tuple[FeatureCache, JobReport]:
    """:func:`soundsight.prepare` for every launched process: under a launcher that
    starts several (torchrun, srun), this one's shard first, then the rest (see
    :meth:`ClipDataModule.prepare_data`)."""
    cache = cache or DEFAULT_CACHE
    rank, world = launch_rank()
    workers = None
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        workers = max(1, (os.cpu_count() or 1) // local)
        prepare(table, cache, features, workers, shard=(rank, world), progress=False)
    return prepare(table, cache, features, workers, progress=progress and is_global_zero())

"""Fine-tuning a backbone on cached log-mels with Lightning, in the blog's two stages.

The science lives in :class:`ClipClassifier` (a LightningModule: augmentation, loss,
optimiser and schedule); :func:`train` does the engineering (cache, splits, loaders,
trainer, checkpoints, model file). Stage 1 trains the new head with the body frozen;
stage 2 unfreezes everything, the body at a lower learning rate than the head; each
stage runs its own one-cycle schedule.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.data import Mixup

from .cache import DEFAULT_CACHE, FeatureCache, prepare
from .config import config_to_dict
from .data import CachedClips, ClipView, collate_windows
from .errors import ConfigError
from .evaluation import holdout, make_folds, score
from .features import FeatureConfig, flush_denormals
from .modelfile import ModelSpec, save_model_file
from .models import ModelConfig, SoundNet, clip_probabilities
from .plots import plot_lr_find

#: The headline scores kept in metrics.json, model files and CV summaries.
SUMMARY = ("clips", "accuracy", "error_rate", "map3")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (augmentation, schedule, optimiser).

    Attributes
    ----------
    stage1_epochs, stage2_epochs : int
        Epochs with the body frozen, then with everything trainable.
    lr : float
        Peak (one-cycle) learning rate of the head in stage 1, and in stage 2 unless
        ``stage2_lr`` is set.
    stage2_lr : float or None
        Peak learning rate of the head in stage 2 (None: ``lr``).
    body_lr : float
        Peak learning rate of the body in stage 2 (discriminative rates).
    batch_size, weight_decay : ...
        AdamW settings.
    mixup : float
        Mixup Beta(alpha, alpha) parameter; 0 turns it off.
    freq_masks, time_masks : int
        SpecAugment: masked frequency bands / time spans per training view.
    freq_mask_width, time_mask_width : float
        Largest mask, as a fraction of the bands / frames.
    unverified_weight : float
        Loss weight of clips whose ``verified`` flag is False (FSDKaggle2018).
    balanced : bool
        Sample classes equally often instead of by frequency.
    label_smoothing : float
        Cross-entropy label smoothing.
    seed : int
        Seeds Python, NumPy and torch (workers included).
    num_workers : int
        DataLoader worker processes (0: load in the training process).
    """

    stage1_epochs: int = 1
    stage2_epochs: int = 9
    lr: float = 2e-3
    stage2_lr: float | None = None
    body_lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.01
    mixup: float = 0.0
    freq_masks: int = 2
    time_masks: int = 2
    freq_mask_width: float = 0.15
    time_mask_width: float = 0.15
    unverified_weight: float = 0.5
    balanced: bool = False
    label_smoothing: float = 0.1
    seed: int = 0
    num_workers: int = 0

    def __post_init__(self):
        if self.stage1_epochs < 0 or self.stage2_epochs < 0 or self.epochs < 1:
            raise ConfigError(f"need at least one epoch and none negative: {self}")

    @property
    def epochs(self) -> int:
        return self.stage1_epochs + self.stage2_epochs


def seed_recipe(epochs: int = 10) -> tuple[ModelConfig, TrainConfig]:
    """The blog's recipe, for comparison on equal terms: whole clip squashed to a
    224x224 magma image, ImageNet normalisation, no augmentation, stage 1 at fastai's
    default 3e-3, stage 2 at 1e-5 (body) / 1e-4 (head)."""
    stage1 = max(1, epochs // 3)
    return (
        ModelConfig(encoding="magma", imagenet_normalization=True, image_size=224),
        TrainConfig(
            stage1_epochs=stage1,
            stage2_epochs=epochs - stage1,
            lr=3e-3,
            stage2_lr=1e-4,
            body_lr=1e-5,
            mixup=0.0,
            freq_masks=0,
            time_masks=0,
            unverified_weight=1.0,
            label_smoothing=0.0,
        ),
    )


def spec_augment(db: torch.Tensor, config: TrainConfig, floor: float) -> torch.Tensor:
    """SpecAugment frequency and time masking, each view masked independently.

    Written here because torchaudio's maskers are not a dependency; masked cells are
    set to silence (the floor), which the colour map shows as black.
    """
    batch, _, bands, frames = db.shape
    out = db.clone()
    for axis, size, count, width in (
        (2, bands, config.freq_masks, config.freq_mask_width),
        (3, frames, config.time_masks, config.time_mask_width),
    ):
        positions = torch.arange(size, device=db.device)
        for _ in range(count):
            widths = (torch.rand(batch, device=db.device) * width * size).long()
            starts = (torch.rand(batch, device=db.device) * (size - widths)).long()
            mask = (positions >= starts[:, None]) & (positions < (starts + widths)[:, None])
            shape = (batch, 1, size, 1) if axis == 2 else (batch, 1, 1, size)
            out = out.masked_fill(mask.view(shape), floor)
    return out


class ClipClassifier(L.LightningModule):
    """The classifier's science: augmentation, loss, optimiser, schedule, metrics."""

    def __init__(self, net: SoundNet, config: TrainConfig, num_classes: int, floor_db: float):
        super().__init__()
        self.net = net
        self.config = config
        self.num_classes = num_classes
        self.floor_db = floor_db
        self.stage = 2
        self.lr = config.lr  # read and set by Lightning's LR finder
        self.mixup = (
            Mixup(
                mixup_alpha=config.mixup,
                label_smoothing=config.label_smoothing,
                num_classes=num_classes,
            )
            if config.mixup > 0
            else None
        )
        self._valid_outputs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def set_stage(self, stage: int) -> None:
        """Stage 1 freezes the body (the new head learns first); stage 2 trains all."""
        self.stage = stage
        for parameter in self.net.body_parameters():
            parameter.requires_grad_(stage == 2)

    def training_step(self, batch, batch_index):
        db, targets, weights = batch
        if self.config.freq_masks or self.config.time_masks:
            db = spec_augment(db, self.config, self.floor_db)
        images = self.net.encoder(db)
        if self.mixup is not None and len(targets) % 2 == 0:
            images, soft = self.mixup(images, targets)
        else:
            soft = F.one_hot(targets, self.num_classes).float()
            soft = (
                soft * (1 - self.config.label_smoothing)
                + self.config.label_smoothing / self.num_classes
            )
        logits = self.net.backbone(images)
        losses = -(soft * F.log_softmax(logits, dim=-1)).sum(-1)
        loss = (losses * weights).sum() / weights.sum()
        self.log(
            "train_loss",
            loss,
            on_step=True,
            on_epoch=True,
            prog_bar=True,
            batch_size=len(targets),
            sync_dist=True,
        )
        return loss

    def validation_step(self, batch, batch_index):
        # The third field is each clip's row in the validation table (see _Numbered).
        windows, targets, rows, counts = batch
        probabilities = clip_probabilities(self.net, windows, counts).float()
        self._valid_outputs.append((probabilities.cpu(), targets.cpu(), rows.cpu()))
        loss = F.nll_loss(probabilities.clamp_min(1e-8).log(), targets)
        error = (probabilities.argmax(-1) != targets).float().mean()
        self.log("valid_loss", loss, prog_bar=True, batch_size=len(targets), sync_dist=True)
        self.log("error_rate", error, prog_bar=True, batch_size=len(targets), sync_dist=True)

    def on_validation_epoch_start(self):
        self._valid_outputs.clear()

    def configure_optimizers(self):
        # Rates are kept in proportion to self.lr, which Lightning's LR finder changes.
        scale = self.lr / self.config.lr
        head_lr = self.lr
        if self.stage == 2 and self.config.stage2_lr is not None:
            head_lr = self.config.stage2_lr * scale
        groups = [{"params": self.net.head_parameters(), "lr": head_lr}]
        peaks = [head_lr]
        if self.stage == 2:
            body_lr = self.config.body_lr * scale
            groups.append({"params": self.net.body_parameters(), "lr": body_lr})
            peaks.append(body_lr)
        optimizer = torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=peaks,
            total_steps=max(1, self.trainer.estimated_stepping_batches),
            pct_start=0.25,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class EpochTable(L.Callback):
    """Prints and saves the blog's per-epoch table
    (stage, epoch, train_loss, valid_loss, error_rate, time)."""

    COLUMNS = ("stage", "epoch", "train_loss", "valid_loss", "error_rate", "seconds")

    def __init__(self, path: Path, quiet: bool = False):
        self.path = path
        self.quiet = quiet
        self.started = time.perf_counter()

    def on_train_epoch_start(self, trainer, module):
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        # Lightning runs the epoch's validation before this hook, so both losses are in.
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        row = {
            "stage": module.stage,
            "epoch": trainer.current_epoch + 1,
            "train_loss": float(metrics.get("train_loss_epoch", math.nan)),
            "valid_loss": float(metrics.get("valid_loss", math.nan)),
            "error_rate": float(metrics.get("error_rate", math.nan)),
            "seconds": round(time.perf_counter() - self.started, 1),
        }
        rows = read_history(self.path)
        rows = [
            r for r in rows if (int(r["stage"]), int(r["epoch"])) != (row["stage"], row["epoch"])
        ]
        rows.append(row)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, self.COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        if not self.quiet:
            if len(rows) == 1:
                print("  ".join(f"{c:>10}" for c in self.COLUMNS))
            print(
                "  ".join(
                    f"{row[c]:>10.4f}" if isinstance(row[c], float) else f"{row[c]:>10}"
                    for c in self.COLUMNS
                )
            )


def read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@dataclass
class TrainResult:
    model_path: Path
    metrics: dict
    history: list[dict]
    failures: list[tuple[str, str]]


def _cached_subset(table: pd.DataFrame, cache: FeatureCache) -> pd.DataFrame:
    return table[[p in cache for p in table["path"]]].reset_index(drop=True)


def resolve_crop(model: ModelConfig, durations: np.ndarray) -> ModelConfig:
    """Pick the crop length from the data when unset: the 90th percentile of clip
    durations, between 1 and 3 seconds (short clips waste no compute on padding;
    long ones are seen through several crops)."""
    if model.image_size is not None or model.crop_seconds is not None:
        return model
    seconds = float(np.clip(np.percentile(durations, 90), 1.0, 3.0))
    return replace(model, crop_seconds=round(seconds, 2))


def _device_count(devices) -> int:
    """How many devices a Lightning ``devices`` value names (1 for 'auto' and -1)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text) if text.isdigit() else 1


def distribution(devices="auto", num_nodes: int = 1) -> tuple[object, int, str]:
    """Lightning's ``devices``, ``num_nodes`` and ``strategy`` for this process.

    Several processes (``devices`` > 1, ``num_nodes`` > 1, or a launcher's
    ``WORLD_SIZE`` > 1) train with DistributedDataParallel, ``"ddp"`` (gloo on CPUs,
    NCCL on GPUs). Under torchrun, ``devices="auto"`` means the processes torchrun
    started on each node, so ``torchrun --nproc_per_node N`` needs no other flag.
    """
    env = os.environ
    if devices == "auto" and "TORCHELASTIC_RUN_ID" in env and "LOCAL_WORLD_SIZE" in env:
        devices = int(env["LOCAL_WORLD_SIZE"])
        num_nodes = max(1, int(env.get("WORLD_SIZE", devices)) // devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    several = num_nodes > 1 or int(env.get("WORLD_SIZE", 1)) > 1 or _device_count(devices) > 1
    return devices, num_nodes, "ddp" if several else "auto"


def precision() -> str:
    """bf16 mixed precision on GPUs that have it; fp32 on CPUs (bf16 autocast on a CPU
    was not reliably faster here)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _launch_rank() -> tuple[int, int]:
    """(rank, world size) given by an external launcher (torchrun, SLURM's srun), known
    before any process group exists; (0, 1) without one."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def is_global_zero() -> bool:
    """Whether this is the process that writes a run's files (rank 0 of any launcher;
    the only process of a plain run)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    # Lightning's own launcher (--devices N alone) marks the processes it starts.
    env = os.environ
    return _launch_rank()[0] == 0 and env.get("LOCAL_RANK", "0") == env.get("NODE_RANK", "0") == "0"


def _trainer(
    out: Path, stage: int, epochs: int, table: EpochTable, progress: bool, devices, num_nodes: int
) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    # The newest epoch's state as last.ckpt, replaced every epoch (Lightning writes it
    # atomically), which is what --resume continues from.
    checkpoints = ModelCheckpoint(
        dirpath=out / "checkpoints" / f"stage{stage}",
        filename="last",
        save_top_k=1,
        enable_version_counter=False,
    )
    devices, num_nodes, strategy = distribution(devices, num_nodes)
    return L.Trainer(
        max_epochs=epochs,
        accelerator="auto",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
        precision=precision(),
        callbacks=[checkpoints, table],
        logger=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=False,
        default_root_dir=out,
    )


@dataclass
class _Run:
    """Everything a training run is set up with (shared by train and lr_find)."""

    module: ClipClassifier
    train_loader: torch.utils.data.DataLoader
    valid_loader: torch.utils.data.DataLoader
    valid: pd.DataFrame
    labels: list[str]
    model: ModelConfig
    failures: list[tuple[str, str]]


class _Numbered(torch.utils.data.Dataset):
    """Validation clips that carry their row number in place of the (unused) loss
    weight: under DDP each rank validates a share, padded with repeats to equal
    shares, and the row numbers put the gathered shares back in order."""

    def __init__(self, clips: CachedClips):
        self.clips = clips

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int):
        view, target, _ = self.clips[index]
        return view, target, torch.tensor(index)


def _gather_valid_outputs(module: ClipClassifier, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and targets of all ``count`` validation clips, in table order, on
    every rank (each rank scored only its share of them)."""
    outputs = module._valid_outputs
    local = tuple(torch.cat([o[k] for o in outputs]).numpy() for k in range(3))
    shares = [local]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        shares = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(shares, local)
    probabilities = np.zeros((count, local[0].shape[1]), np.float32)
    targets = np.zeros(count, np.int64)
    seen = np.zeros(count, bool)
    for share_probabilities, share_targets, rows in shares:
        # Padding repeats a clip on another rank; its copies are equal, either one serves.
        probabilities[rows], targets[rows], seen[rows] = share_probabilities, share_targets, True
    if not seen.all():
        raise RuntimeError(f"validation scored {int(seen.sum())} of {count} clips")
    return probabilities, targets


def _prepare_all(table: pd.DataFrame, cache, features: FeatureConfig, progress: bool):
    """Prepare every clip before training. Under a launcher that starts several
    processes (torchrun, srun), each first prepares its own shard, then whatever is
    still missing: entries are renamed into place whole, so a clip done twice is only
    wasted work, and every process returns with the whole cache; no barrier needed.
    (Lightning's own launcher starts its processes after this ran in the first.)"""
    cache = cache or DEFAULT_CACHE
    rank, world = _launch_rank()
    workers = None
    if world > 1:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        workers = max(1, (os.cpu_count() or 1) // local)
        prepare(table, cache, features, workers, shard=(rank, world), progress=False)
    return prepare(table, cache, features, workers, progress=progress and is_global_zero())


def _setup(clips, out, valid, features, model, config, cache, pretrained, progress) -> _Run:
    out.mkdir(parents=True, exist_ok=True)
    # Reading crops from memory-mapped features is cheap: extra loader processes would
    # only take cores from the model, so Lightning's advice to add some is silenced.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    L.seed_everything(config.seed, workers=True, verbose=False)
    if valid is None:
        clips, valid = holdout(clips, 0.2, config.seed)
    feature_cache, report = _prepare_all(pd.concat([clips, valid]), cache, features, progress)
    if is_global_zero():
        report.write_failures(out / "failures.csv")
    if report.failed:
        warnings.warn(
            f"{report.failed} clips could not be decoded and are left out "
            f"(see {out / 'failures.csv'})",
            stacklevel=3,
        )
    clips = _cached_subset(clips, feature_cache)
    valid = _cached_subset(valid, feature_cache)
    labels = sorted(clips["label"].dropna().unique())
    unseen = ~valid["label"].isin(labels)
    if unseen.any():
        warnings.warn(
            f"{int(unseen.sum())} validation clips have labels absent from training "
            "and are left out",
            stacklevel=3,
        )
        valid = valid[~unseen].reset_index(drop=True)
    index = {label: i for i, label in enumerate(labels)}

    frames = np.array([feature_cache.load(p).shape[1] for p in clips["path"]])
    model = resolve_crop(model, frames * features.hop_length / features.sample_rate)
    view = ClipView.for_model(model, features)
    weights = np.where(clips["verified"].fillna(True).to_numpy(bool), 1.0, config.unverified_weight)
    train_set = CachedClips(
        feature_cache, clips["path"], clips["label"].map(index), view, True, weights
    )
    valid_set = _Numbered(
        CachedClips(feature_cache, valid["path"], valid["label"].map(index), view, False)
    )
    sampler = None
    if config.balanced:
        counts = clips["label"].map(clips["label"].value_counts()).to_numpy()
        sampler = torch.utils.data.WeightedRandomSampler(1.0 / counts, len(counts))
    loader_args = {
        "num_workers": config.num_workers,
        "persistent_workers": config.num_workers > 0,
        "pin_memory": torch.cuda.is_available(),
    }
    train_loader = torch.utils.data.DataLoader(
        train_set,
        config.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        drop_last=len(train_set) > config.batch_size,
        **loader_args,
    )
    valid_loader = torch.utils.data.DataLoader(
        valid_set, max(1, config.batch_size // 4), collate_fn=collate_windows, **loader_args
    )
    net = SoundNet(model, len(labels), features.floor_db, pretrained=pretrained)
    module = ClipClassifier(net, config, len(labels), features.floor_db)
    return _Run(module, train_loader, valid_loader, valid, labels, model, report.failures)


@flush_denormals()
def train(
    clips: pd.DataFrame,
    out: str | Path,
    valid: pd.DataFrame | None = None,
    features: FeatureConfig | None = None,
    model: ModelConfig | None = None,
    config: TrainConfig | None = None,
    cache: str | Path | None = None,
    resume: bool = False,
    pretrained: bool = True,
    lr_find: bool = False,
    progress: bool = True,
    devices="auto",
    num_nodes: int = 1,
) -> TrainResult:
    """Fine-tune a backbone on labelled clips and write ``out/model.safetensors``.

    Parameters
    ----------
    clips : DataFrame
        Training clips (:func:`soundsight.load_dataset`).
    out : path
        Run folder: model file, per-epoch ``history.csv``, ``metrics.json``,
        checkpoints (for ``resume``), ``failures.csv``.
    valid : DataFrame, optional
        Validation clips; default: a stratified (and grouped, where the dataset has
        groups) 20% of ``clips``.
    features, model, config : FeatureConfig, ModelConfig, TrainConfig
        Feature parameters, network and input encoding, and recipe.
    cache : path, optional
        Feature cache folder (default :data:`DEFAULT_CACHE`); missing clips are
        prepared first, clips that fail to decode are reported and left out.
    resume : bool
        Continue from the last checkpoint in ``out``.
    pretrained : bool
        False trains the backbone from random weights (for comparison).
    lr_find : bool
        Pick the head's learning rate with Lightning's LR finder (``--lr auto``);
        the body's keeps its ratio to the head's.
    devices, num_nodes
        Passed to Lightning's Trainer. Several processes (here, under torchrun or under
        SLURM) train with DDP: ``config.batch_size`` is per process, every process
        runs this function, and only rank 0 writes the run's files; the validation
        scores cover all clips, gathered from every rank.
    """
    features = features or FeatureConfig()
    config = config or TrainConfig()
    out = Path(out)
    if lr_find and distribution(devices, num_nodes)[2] == "ddp":
        raise ConfigError("--lr auto runs in one process: run lr-find first, then train with --lr")
    run = _setup(
        clips, out, valid, features, model or ModelConfig(), config, cache, pretrained, progress
    )
    module = run.module
    if lr_find:
        module.lr = find_learning_rate(module, run.train_loader, out / "lr_find.png", progress)
        scale = module.lr / config.lr
        config = replace(
            config,
            lr=module.lr,
            body_lr=config.body_lr * scale,
            stage2_lr=None if config.stage2_lr is None else config.stage2_lr * scale,
        )
        module.config = config
        if progress:
            print(
                f"learning rate from the LR finder: {module.lr:.2e} (plot: {out / 'lr_find.png'})"
            )

    table = EpochTable(out / "history.csv", quiet=not progress)
    last = {stage: out / "checkpoints" / f"stage{stage}" / "last.ckpt" for stage in (1, 2)}
    for stage, epochs in ((1, config.stage1_epochs), (2, config.stage2_epochs)):
        if epochs <= 0 or (resume and stage == 1 and last[2].exists()):
            continue
        module.set_stage(stage)
        trainer = _trainer(out, stage, epochs, table, progress, devices, num_nodes)
        ckpt = last[stage] if resume and last[stage].exists() else None
        trainer.fit(module, run.train_loader, run.valid_loader, ckpt_path=ckpt)
    module.set_stage(2)

    trainer.validate(module, run.valid_loader, verbose=False)
    probabilities, targets = _gather_valid_outputs(module, len(run.valid))
    metrics = score(probabilities, targets, run.labels)
    model_path = out / "model.safetensors"
    if trainer.is_global_zero:
        save_model_file(
            model_path,
            module.net,
            ModelSpec(
                labels=tuple(run.labels),
                features=features,
                model=run.model,
                train=config_to_dict(config),
                metrics={k: metrics[k] for k in SUMMARY},
            ),
        )
        write_metrics(out, metrics, run.labels, run.valid["path"].tolist(), probabilities, targets)
    return TrainResult(model_path, metrics, read_history(out / "history.csv"), run.failures)


@flush_denormals()
def lr_find(
    clips: pd.DataFrame,
    out: str | Path,
    features: FeatureConfig | None = None,
    model: ModelConfig | None = None,
    config: TrainConfig | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> float:
    """Run the LR range test alone: saves ``out/lr_find.png``, returns the suggestion."""
    out = Path(out)
    run = _setup(
        clips,
        out,
        None,
        features or FeatureConfig(),
        model or ModelConfig(),
        config or TrainConfig(),
        cache,
        True,
        progress,
    )
    return find_learning_rate(run.module, run.train_loader, out / "lr_find.png", progress)


def write_metrics(out: Path, metrics: dict, labels, paths, probabilities, targets) -> None:
    """metrics.json, per-class and confusion CSVs, and per-clip validation predictions."""
    summary = {k: metrics[k] for k in SUMMARY}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    metrics["per_class"].to_csv(out / "per_class.csv", index=False)
    pd.DataFrame(metrics["confusion"], index=labels, columns=labels).to_csv(out / "confusion.csv")
    metrics["most_confused"].to_csv(out / "most_confused.csv", index=False)
    frame = pd.DataFrame(probabilities, columns=labels)
    frame.insert(0, "label", [labels[t] for t in targets])
    frame.insert(0, "path", paths)
    frame.to_csv(out / "valid_predictions.csv", index=False)


def find_learning_rate(module: ClipClassifier, loader, plot_path: Path, progress: bool) -> float:
    """Lightning's LR range test on the unfrozen network; saves the loss-vs-lr plot
    (suggestion marked) and returns the suggested head learning rate."""
    from lightning.pytorch.tuner import Tuner

    module.set_stage(2)
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=progress,
        enable_model_summary=False,
        default_root_dir=plot_path.parent,
    )
    finder = Tuner(trainer).lr_find(
        module,
        train_dataloaders=loader,
        min_lr=1e-6,
        max_lr=1.0,
        num_training=min(100, 3 * len(loader)),
        update_attr=False,
    )
    suggestion = finder.suggestion()
    results = pd.DataFrame(finder.results)
    results.assign(suggestion=suggestion).to_csv(plot_path.with_suffix(".csv"), index=False)
    figure = plot_lr_find(results["lr"], results["loss"], suggestion)
    figure.savefig(plot_path, dpi=120)
    if suggestion is None or not math.isfinite(suggestion):
        raise RuntimeError(f"the LR finder found no usable learning rate (see {plot_path})")
    return float(suggestion)


@dataclass
class CVResult:
    folds: list[dict]
    mean: dict
    std: dict


def cross_validate(
    clips: pd.DataFrame,
    out: str | Path,
    n_folds: int = 5,
    features: FeatureConfig | None = None,
    model: ModelConfig | None = None,
    config: TrainConfig | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    **train_options,
) -> CVResult:
    """Train and score one model per fold (:func:`soundsight.evaluation.make_folds`:
    stratified, grouped where the dataset has groups); ``out/fold{k}`` holds each run
    and ``out/cv.json`` the per-fold scores with their mean and standard deviation.
    Under DDP every process draws the same seeded folds, and Lightning's distributed
    sampler shards each fold's training and validation clips across the ranks."""
    out = Path(out)
    config = config or TrainConfig()
    folds = make_folds(clips, n_folds, config.seed)
    rows = []
    for k, valid_index in enumerate(folds):
        mask = np.zeros(len(clips), bool)
        mask[valid_index] = True
        result = train(
            clips[~mask],
            out / f"fold{k}",
            valid=clips[mask],
            features=features,
            model=model,
            config=config,
            cache=cache,
            progress=progress,
            **train_options,
        )
        rows.append({"fold": k, **{key: result.metrics[key] for key in SUMMARY}})
        if progress and is_global_zero():
            print(
                f"fold {k}: accuracy {result.metrics['accuracy']:.4f} "
                f"MAP@3 {result.metrics['map3']:.4f} ({result.metrics['clips']} clips)"
            )
    frame = pd.DataFrame(rows)
    mean = frame[list(SUMMARY)].mean().to_dict()
    std = frame[list(SUMMARY)].std(ddof=0).to_dict()
    if is_global_zero():
        summary = {"folds": rows, "mean": mean, "std": std}
        (out / "cv.json").write_text(json.dumps(summary, indent=2))
    return CVResult(rows, mean, std)

"""Fine-tuning a backbone on cached log-mels with Lightning, in the blog's two stages.

The science lives in :class:`ClipClassifier` (a LightningModule: augmentation, loss,
optimiser, schedule, validation scores); the clips come from
:class:`~soundsight.datamodule.ClipDataModule`; :func:`train`, :func:`cross_validate`
and :func:`lr_find` put them together with a Lightning Trainer (checkpoints, the
per-epoch table, several processes through :mod:`soundsight.distributed`) and write
the model file and the scores (:func:`soundsight.evaluation.write_metrics`). Stage 1
trains the new head with the body frozen; stage 2 unfreezes everything, the body at a
lower learning rate than the head; each stage runs its own one-cycle schedule
(:mod:`soundsight.schedule`).

A multi-label table (:func:`soundsight.layouts.is_multi_label`), or
``TrainConfig(multi_label=True)``, trains the same way with sigmoid outputs, binary
cross-entropy and clips mixed in pairs (:func:`mix_clips`); instead of the temperature
and the ``unknown`` rule, each label gets a threshold tuned for F1 on the validation
clips (:func:`soundsight.evaluation.tune_thresholds`), stored in the model file.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.data import Mixup

from .calibration import (
    DEFAULT_KEEP,
    DEFAULT_REJECTION_SCORE,
    REJECTION_SCORES,
    calibrate,
    check_keep,
    class_centroids,
)
from .config import TrainConfig, config_to_dict
from .datamodule import ClipDataModule
from .distributed import distribution, gather_in_order, is_global_zero, precision
from .errors import ConfigError
from .evaluation import (
    describe_scores,
    make_folds,
    score,
    summary,
    tune_thresholds,
    write_json,
    write_metrics,
)
from .features import FeatureConfig, add_log_mels, flush_denormals
from .layouts import DatasetError, is_multi_label
from .modelfile import ModelSpec, check_fits, save_model_file
from .models import (
    FoldEnsemble,
    ModelConfig,
    SoundNet,
    backbone_configs,
    clip_probabilities,
    licence_notice,
    window_logits,
)
from .plots import plot_lr_find
from .schedule import one_cycle_options
from .tables import read_csv, write_csv


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


def lp_ft_recipe(epochs: int = 10) -> TrainConfig:
    """LP-FT (Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features"): the
    head is first fitted to convergence on the frozen body's embeddings
    (:func:`fit_linear_probe`), then everything is fine-tuned for ``epochs`` epochs
    (no stage 1: the probe replaces it). ``epochs=0`` keeps the body frozen: the probe
    alone (frozen features + logistic regression)."""
    return TrainConfig(linear_probe=True, stage1_epochs=0, stage2_epochs=epochs)


#: Inverse L2 strength of the linear probe's logistic regression, on standardised
#: embeddings (sklearn's default).
PROBE_C = 1.0


def fit_linear_probe(module: ClipClassifier, data: ClipDataModule) -> float:
    """Set the head of ``module``'s network to a logistic regression fitted on the
    frozen body's embeddings of every training window (each window labelled with its
    clip's label); returns the probe's accuracy on those windows.

    sklearn's ``LogisticRegression`` (lbfgs, to convergence) on standardised
    embeddings; the standardisation is folded into the head's weights and bias, so
    the network is unchanged otherwise. A label the probe never saw (none, here:
    labels come from the training clips) would keep a zero row.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    net = module.net
    head = net.backbone.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"the linear probe needs a linear head; {net.config.backbone} has none")
    embeddings, targets = [], []
    net.eval()
    with torch.inference_mode():
        for windows, clip_targets, _rows, counts in data.windows_dataloader("train"):
            embeddings.append(net.embed(windows).float())
            targets.append(clip_targets.repeat_interleave(counts))
    net.train()
    features = torch.cat(embeddings).numpy()
    labels = torch.cat(targets).numpy()
    scaler = StandardScaler().fit(features)
    probe = LogisticRegression(C=PROBE_C, max_iter=5000)
    probe.fit(scaler.transform(features), labels)
    coef = probe.coef_ / scaler.scale_
    intercept = probe.intercept_ - coef @ scaler.mean_
    if coef.shape[0] == 1:  # two labels: sklearn gives one row, the logit of class 1
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-1, 1]) * intercept / 2
    weight = torch.zeros_like(head.weight)
    bias = torch.zeros_like(head.bias)
    weight[probe.classes_] = torch.as_tensor(coef, dtype=weight.dtype)
    bias[probe.classes_] = torch.as_tensor(intercept, dtype=bias.dtype)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return float(probe.score(scaler.transform(features), labels))


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


def mix_clips(
    db: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    probability: float,
    features: FeatureConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multi-label training examples made of two clips: each view of the batch, with
    ``probability``, gets another view of the batch added to it (their powers summed,
    :func:`soundsight.features.add_log_mels`), and the union of both clips' labels
    (``targets``: 0/1 rows); the pair weighs as the lighter of the two. A background
    clip (no label) mixed in is ambience under the other's labels."""
    count = len(targets)
    if count < 2 or probability <= 0:
        return db, targets, weights
    own = torch.arange(count, device=db.device)
    partner = torch.randperm(count, device=db.device)
    chosen = (torch.rand(count, device=db.device) < probability) & (partner != own)
    if not chosen.any():
        return db, targets, weights
    db, targets, weights = db.clone(), targets.clone(), weights.clone()
    others = partner[chosen]
    db[chosen] = add_log_mels(db[chosen], db[others], features).to(db.dtype)
    targets[chosen] = torch.maximum(targets[chosen], targets[others])
    weights[chosen] = torch.minimum(weights[chosen], weights[others])
    return db, targets, weights


class ClipClassifier(L.LightningModule):
    """The classifier's science: augmentation, loss, optimiser, schedule, metrics.

    Single-label (the default): softmax cross-entropy with label smoothing and
    optional mixup. Multi-label (``config.multi_label``, a net built with
    ``multi_label=True``): clips mixed in pairs (:func:`mix_clips`) and binary
    cross-entropy on each label's logit, the same smoothing pulling targets towards
    1/2; its validation ``error_rate`` is the share of wrong (clip, label) decisions at
    probability 0.5.
    """

    def __init__(
        self,
        net: SoundNet,
        config: TrainConfig,
        num_classes: int,
        floor_db: float,
        features: FeatureConfig | None = None,
    ):
        super().__init__()
        self.net = net
        self.config = config
        self.num_classes = num_classes
        self.floor_db = floor_db
        self.features = features or FeatureConfig()
        if config.multi_label != net.multi_label:
            raise ConfigError("a multi-label recipe needs a multi-label network, and only it")
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
        smoothing = self.config.label_smoothing
        if self.config.multi_label:
            db, targets, weights = mix_clips(
                db, targets, weights, self.config.mix_probability, self.features
            )
        if self.config.freq_masks or self.config.time_masks:
            db = spec_augment(db, self.config, self.floor_db)
        images = self.net.encoder(db)
        if self.config.multi_label:
            logits = self.net.backbone(images)
            soft = targets.float() * (1 - smoothing) + smoothing / 2
            losses = F.binary_cross_entropy_with_logits(
                logits.float(), soft, reduction="none"
            ).mean(-1)
        else:
            if self.mixup is not None and len(targets) % 2 == 0:
                images, soft = self.mixup(images, targets)
            else:
                soft = F.one_hot(targets, self.num_classes).float()
                soft = soft * (1 - smoothing) + smoothing / self.num_classes
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
        # The third field is each clip's row in the validation table (see _Numbered
        # in datamodule.py).
        windows, targets, rows, counts = batch
        probabilities = clip_probabilities(self.net, windows, counts).float()
        self._valid_outputs.append((probabilities.cpu(), targets.cpu(), rows.cpu()))
        if self.config.multi_label:
            # By hand: F.binary_cross_entropy is refused under CUDA autocast (bf16).
            p = probabilities.clamp(1e-7, 1 - 1e-7)
            loss = -(targets * p.log() + (1 - targets) * (1 - p).log()).mean()
            error = ((probabilities >= 0.5) != (targets > 0.5)).float().mean()
        else:
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
            **one_cycle_options(int(self.trainer.estimated_stepping_batches)),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def validation_results(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and targets of all ``count`` clips of the last validation, in
        table order, on every rank (each rank scored only its share of them)."""
        local = [torch.cat([o[k] for o in self._valid_outputs]) for k in range(3)]
        world = self.trainer.world_size
        # Lightning's sampler gives every rank an equal share, so the shapes agree; in
        # one process all_gather gives back its input, without a rank dimension.
        gathered = self.all_gather(local) if world > 1 else [t[None] for t in local]
        probabilities, targets, rows = (t.cpu().numpy() for t in gathered)
        shares = [(probabilities[r], targets[r], rows[r]) for r in range(world)]
        return gather_in_order(shares, count)


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
        rows = [
            r
            for r in read_history(self.path)
            if (int(r["stage"]), int(r["epoch"])) != (row["stage"], row["epoch"])
        ]
        rows.append(row)
        write_csv(pd.DataFrame(rows, columns=list(self.COLUMNS)), self.path)
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
    """The rows of a run's ``history.csv`` (none before its first epoch)."""
    if not path.exists():
        return []
    return read_csv(path).to_dict("records")


@dataclass
class TrainResult:
    model_path: Path
    metrics: dict
    history: list[dict]
    failures: list[tuple[str, str]]


def _trainer(
    out: Path,
    stage: int,
    epochs: int,
    *,
    table: EpochTable,
    progress: bool,
    devices,
    num_nodes: int,
) -> L.Trainer:
    from lightning.pytorch.callbacks import ModelCheckpoint

    # The newest epoch's state as last.ckpt, replaced every epoch (Lightning writes it
    # atomically), which is what --resume continues from.
    checkpoints = ModelCheckpoint(
        dirpath=_checkpoint(out, stage).parent,
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
        # Loaders are asked for again each epoch: the data module leaves out clips
        # whose file changed meanwhile.
        reload_dataloaders_every_n_epochs=1,
    )


def _checkpoint(out: Path, stage: int) -> Path:
    """The checkpoint ``--resume`` continues a stage from."""
    return out / "checkpoints" / f"stage{stage}" / "last.ckpt"


#: Why ``noise`` is refused for a frozen-embedding backbone.
NOISE_FROZEN = (
    "--noise mixes noise into fine-tuning's cached log-mels; a frozen-embedding backbone "
    "embeds each clip once, as it is, so noise is not mixed into it (not built)"
)


def noise_recordings(
    noise: str | os.PathLike | Sequence[str | os.PathLike] | None,
) -> list[str]:
    """The audio files of ``noise`` (files, or folders searched as ``predict`` does);
    none for None.

    Raises
    ------
    DatasetError
        ``noise`` given, but holding no audio file.
    """
    if noise is None:
        return []
    from .layouts import audio_files

    given = [noise] if isinstance(noise, str | os.PathLike) else list(noise)
    paths, skipped = audio_files(given)
    if skipped:
        shown = "; ".join(f"{path}: {reason}" for path, reason in skipped[:3])
        more = f"; and {len(skipped) - 3} more" if len(skipped) > 3 else ""
        warnings.warn(
            f"{len(skipped)} noise entries could not be listed and are left out ({shown}{more})",
            stacklevel=3,
        )
    if not paths:
        shown = ", ".join(map(str, given[:3]))
        raise DatasetError(f"{shown}: no audio recordings to use as background noise")
    return paths


def _data(
    clips: pd.DataFrame,
    out: Path,
    config: TrainConfig,
    features: FeatureConfig,
    model: ModelConfig,
    **options,
) -> ClipDataModule:
    """The run's data module (``options``: :class:`ClipDataModule`'s), seeded and set
    up: the network needs its labels and crop length. A backbone pretrained on its own
    front end (aisfx) gets it, and crops of the blocks it was pretrained on."""
    features, model = backbone_configs(features, model)
    options.update(features=features, model=model)
    out.mkdir(parents=True, exist_ok=True)
    L.seed_everything(config.seed, workers=True, verbose=False)
    data = ClipDataModule(clips, out=out, config=config, **options)
    data.prepare_data()
    data.setup("fit")
    return data


def _classifier(data: ClipDataModule, pretrained: bool) -> ClipClassifier:
    floor = data.features.floor_db
    multi = data.config.multi_label
    net = SoundNet(data.model, len(data.labels), floor, pretrained=pretrained, multi_label=multi)
    return ClipClassifier(net, data.config, len(data.labels), floor, data.features)


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
    force: bool = False,
    keep: float = DEFAULT_KEEP,
    rejection: str = DEFAULT_REJECTION_SCORE,
    noise: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> TrainResult:
    """Fine-tune a backbone on labelled clips and write ``out/model.safetensors``.

    Parameters
    ----------
    clips : DataFrame
        Training clips (:func:`soundsight.load_dataset`); labels are strings. A
        multi-label table (several labels per clip, or none) makes it multi-label
        training (``config.multi_label`` is set).
    out : path
        Run folder: model file, per-epoch ``history.csv``, ``metrics.json`` and the
        other scores (:func:`soundsight.evaluation.write_metrics`), checkpoints (for
        ``resume``), ``failures.csv``, ``clips.csv`` (what the run trained on).
    valid : DataFrame, optional
        Validation clips; default: a stratified (and grouped, where the dataset has
        groups) 20% of ``clips``.
    features, model, config : FeatureConfig, ModelConfig, TrainConfig
        Feature parameters, network and input encoding, and recipe.
    cache : path, optional
        Feature cache folder (default :data:`soundsight.cache.DEFAULT_CACHE`); missing
        clips are prepared first. Clips that fail to decode, and clips whose file is
        edited or deleted during the run, are reported and left out.
    resume : bool
        Continue from the last checkpoint in ``out``; refused (``DatasetError``,
        naming the clips) when the data set changed since the run started.
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
    force : bool
        With ``resume``: continue even on a changed data set.
    keep : float
        Share of known validation clips the ``unknown`` threshold keeps, in (0, 1]
        (:func:`soundsight.calibration.calibrate`, which also fits the temperature).
    rejection : str
        The rejection score of that threshold
        (:data:`soundsight.calibration.REJECTION_SCORES`).
    noise : path or sequence of paths, optional
        Background recordings (files, or folders searched for audio) mixed into
        training views at random event-to-background ratios (``config``'s
        ``noise_probability``, ``noise_snr_min``, ``noise_snr_max``): a model that
        will hear its sounds in noise learns them in noise. Validation stays clean.
    """
    check_keep(keep)
    _refuse_frozen(model)
    if model is not None and model.members != 1:
        raise ConfigError(
            "an ensemble is not trained: `soundsight cv --ensemble` builds one from its "
            "fold models (members must be 1 here)"
        )
    if rejection not in REJECTION_SCORES:
        raise ConfigError(f"unknown rejection score {rejection!r}; choose from {REJECTION_SCORES}")
    features = features or FeatureConfig()
    config = config or TrainConfig()
    if not config.multi_label and any(t is not None and is_multi_label(t) for t in (clips, valid)):
        config = replace(config, multi_label=True)
    out = Path(out)
    if lr_find and distribution(devices, num_nodes)[2] == "ddp":
        raise ConfigError("--lr auto runs in one process: run lr-find first, then train with --lr")
    resuming = resume and any(_checkpoint(out, stage).exists() for stage in (1, 2))
    data = _data(
        clips,
        out,
        config,
        valid=valid,
        features=features,
        model=model or ModelConfig(),
        cache=cache,
        resume=resuming,
        force=force,
        progress=progress,
        noise=noise_recordings(noise),
    )
    module = _classifier(data, pretrained)
    background = data.background_clips
    if progress and is_global_zero() and any(background.values()):
        print(
            f"background clips (no label): {background['train']} training, "
            f"{background['valid']} validation"
        )
    if lr_find:
        _use_found_rate(module, data, out / "lr_find.png", progress)
    trainer = _fit_stages(
        module, data, out, resume=resuming, progress=progress, devices=devices, num_nodes=num_nodes
    )
    return _validate_and_save(trainer, module, data, out, keep, rejection)


def _refuse_frozen(model: ModelConfig | None) -> None:
    """Frozen-embedding backbones (``birdnet``, ``+`` lists) fine-tune nothing: they
    train by :func:`soundsight.frozen.train_frozen` (``soundsight train`` and ``cv``)."""
    from .frozen import is_frozen_backbone

    if model is not None and is_frozen_backbone(model.backbone):
        raise ConfigError(
            f"--backbone {model.backbone} is a frozen-embedding model (embeddings + logistic "
            "regression): `soundsight train` and `soundsight cv` fit it; lr-find and "
            "fine-tuning recipes do not apply"
        )


def _validation_logits(net: SoundNet, data: ClipDataModule):
    """Every validation clip's window logits (the clips' windows consecutive), window
    counts and targets, in the order of :attr:`ClipDataModule.valid`, scored in one
    process (what temperature scaling is fitted on)."""
    device = next(net.parameters()).device
    net.eval()
    logits, embeddings, counts, targets, rows = [], [], [], [], []
    with torch.inference_mode():
        for windows, target, row, count in data.windows_dataloader("valid", every_rank=False):
            scores, pooled = window_logits(net, windows.to(device))
            logits.append(scores.float().cpu())
            embeddings += [e.mean(0) for e in pooled.float().cpu().split(count.tolist())]
            counts.append(count)
            targets.append(target)
            rows.append(row)
    counts_, rows_ = torch.cat(counts), torch.cat(rows)
    order = torch.argsort(rows_).tolist()
    per_clip = torch.cat(logits).split(counts_.tolist())
    return (
        torch.cat([per_clip[i] for i in order]),
        counts_[order].tolist(),
        torch.cat(targets)[order].numpy(),
        torch.stack([embeddings[i] for i in order]).numpy(),
    )


def _class_centroids(net: SoundNet, data: ClipDataModule) -> np.ndarray:
    """Class centroids of the training clips' embeddings (their evaluation windows,
    scored by the one windowed scorer), for the ``centroid_cosine`` rejection score."""
    from .prediction import score_log_mels

    clips = data._sets["train"]  # the training clips as cached: entries, targets, view
    log_mels = (np.load(entry, mmap_mode="r") for entry in clips.entries)
    with torch.inference_mode():
        # With embed=True every clip has an embedding (never None).
        rows = [
            cast(np.ndarray, e) for _, e in score_log_mels(net, clips.view, log_mels, embed=True)
        ]
    return class_centroids(np.stack(rows), clips.targets.numpy(), len(data.labels))


def _validate_and_save(
    trainer: L.Trainer,
    module: ClipClassifier,
    data: ClipDataModule,
    out: Path,
    keep: float,
    rejection: str,
) -> TrainResult:
    """Score the trained network on every validation clip and give its scores their
    meaning there: for a single-label model, fit the temperature and the ``unknown``
    threshold (the scores then are the calibrated ones a user will read); for a
    multi-label one, tune each label's threshold for F1 (it has neither temperature nor
    ``unknown``). Rank 0 writes the model file and the scores."""
    trainer.validate(module, datamodule=data, verbose=False)
    probabilities, targets = module.validation_results(len(data.valid))
    thresholds = None
    meaning: dict = {}
    reliability = None
    if module.config.multi_label:
        thresholds = tune_thresholds(targets, probabilities)
        meaning = {
            "calibration": {"clips": len(targets), "note": MULTI_LABEL_CALIBRATION},
            "multi_label": True,
            "thresholds": tuple(float(t) for t in thresholds),
        }
    elif trainer.is_global_zero:
        probabilities, targets, meaning, reliability = _calibrated(
            module, data, probabilities, targets, keep, rejection
        )
    metrics = score(probabilities, targets, data.labels, thresholds)
    model_path = out / "model.safetensors"
    if trainer.is_global_zero:
        spec = ModelSpec(
            labels=tuple(data.labels),
            features=data.features,
            model=data.model,
            train=config_to_dict(module.config),
            metrics=summary(metrics),
            notice=licence_notice(data.model.backbone),
            **meaning,
        )
        save_model_file(model_path, module.net, spec)
        paths = data.valid["path"].tolist()
        write_metrics(out, metrics, data.labels, paths, probabilities, targets)
        if reliability is not None:
            write_csv(reliability, out / "reliability.csv")
    return TrainResult(model_path, metrics, read_history(out / "history.csv"), data.failures)


#: What a multi-label model file says of calibration (the ``calibration`` field).
MULTI_LABEL_CALIBRATION = (
    "multi-label model: no temperature scaling and no 'unknown' rule (both are for one "
    "label per clip); a label is present at or above its own threshold, tuned for F1 "
    "on the validation clips"
)


def _calibrated(
    module: ClipClassifier,
    data: ClipDataModule,
    probabilities: np.ndarray,
    targets: np.ndarray,
    keep: float,
    rejection: str,
) -> tuple[np.ndarray, np.ndarray, dict, pd.DataFrame]:
    """Fit a single-label model's temperature and ``unknown`` rule on the validation
    clips (rank 0 alone, scoring every clip itself): the clips' calibrated
    probabilities and targets, the model file's fields for them and the reliability
    table."""
    logits, counts, fitted_targets, embeddings = _validation_logits(module.net, data)
    centroids = _class_centroids(module.net, data) if rejection == "centroid_cosine" else None
    calibrated = calibrate(
        logits,
        counts,
        fitted_targets,
        keep=keep,
        score=rejection,
        embeddings=embeddings,
        centroids=centroids,
    )
    if len(fitted_targets) == len(targets):
        probabilities, targets = calibrated.probabilities, fitted_targets
    if "note" in calibrated.summary:
        warnings.warn(calibrated.summary["note"], stacklevel=4)
    meaning = {
        "temperature": calibrated.temperature,
        "calibration": calibrated.summary,
        "rejection": calibrated.rejection.to_dict() if calibrated.rejection else {},
    }
    return probabilities, targets, meaning, calibrated.reliability


def _use_found_rate(
    module: ClipClassifier, data: ClipDataModule, plot_path: Path, progress: bool
) -> None:
    """Set the head's rate from the LR finder, every other rate in proportion."""
    config = module.config
    module.lr = find_learning_rate(module, data, plot_path, progress)
    scale = module.lr / config.lr
    module.config = replace(
        config,
        lr=module.lr,
        body_lr=config.body_lr * scale,
        stage2_lr=None if config.stage2_lr is None else config.stage2_lr * scale,
    )
    if progress:
        print(f"learning rate from the LR finder: {module.lr:.2e} (plot: {plot_path})")


def _fit_stages(
    module: ClipClassifier,
    data: ClipDataModule,
    out: Path,
    *,
    resume: bool,
    progress: bool,
    devices,
    num_nodes: int,
) -> L.Trainer:
    """Stage 1 (body frozen) then stage 2, each from its checkpoint when resuming; the
    last stage's Trainer is returned, the network left in stage 2."""
    table = EpochTable(out / "history.csv", quiet=not progress)
    config = module.config
    trainer = None
    if config.linear_probe and not (resume and any(_checkpoint(out, s).exists() for s in (1, 2))):
        accuracy = fit_linear_probe(module, data)
        if progress and is_global_zero():
            print(f"linear probe: head fitted on frozen embeddings (accuracy {accuracy:.4f})")
    for stage, epochs in ((1, config.stage1_epochs), (2, config.stage2_epochs)):
        if epochs <= 0 or (resume and stage == 1 and _checkpoint(out, 2).exists()):
            continue
        module.set_stage(stage)
        trainer = _trainer(
            out, stage, epochs, table=table, progress=progress, devices=devices, num_nodes=num_nodes
        )
        last = _checkpoint(out, stage)
        trainer.fit(module, datamodule=data, ckpt_path=last if resume and last.exists() else None)
    module.set_stage(2)
    if trainer is None:  # the linear probe alone: a Trainer only to validate with
        trainer = _trainer(
            out, 2, 0, table=table, progress=progress, devices=devices, num_nodes=num_nodes
        )
    return trainer


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
    _refuse_frozen(model)
    out = Path(out)
    features, model = features or FeatureConfig(), model or ModelConfig()
    data = _data(
        clips,
        out,
        config or TrainConfig(),
        features=features,
        model=model,
        cache=cache,
        progress=progress,
    )
    return find_learning_rate(_classifier(data, True), data, out / "lr_find.png", progress)


def find_learning_rate(
    module: ClipClassifier, data: ClipDataModule, plot_path: Path, progress: bool
) -> float:
    """Lightning's LR range test on the unfrozen network; saves the loss-vs-lr plot
    (suggestion marked) and its points (``lr_find.csv``), and returns the suggested
    head learning rate."""
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
    loader = data.train_dataloader()  # training batches only: no validation in the test
    finder = Tuner(trainer).lr_find(
        module,
        train_dataloaders=loader,
        min_lr=1e-6,
        max_lr=1.0,
        num_training=min(100, 3 * len(loader)),
        update_attr=False,
    )
    if finder is None:  # Lightning skips the test under fast_dev_run
        raise RuntimeError("the LR finder did not run")
    suggestion = finder.suggestion()
    results = pd.DataFrame(finder.results)
    write_csv(results.assign(suggestion=suggestion), plot_path.with_suffix(".csv"))
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


#: What an ensemble model file says of calibration (its ``calibration`` field).
ENSEMBLE_CALIBRATION = (
    "ensemble of fold models: each member's own temperature (fitted on its validation "
    "fold) is folded into its head, and the ensemble's logits are their mean; no clip "
    "is left that no member saw, so nothing is fitted for the ensemble itself and it has "
    "no 'unknown' rule"
)


def ensemble_model_file(members: list[str | Path], path: str | Path) -> Path:
    """Write one model file whose network averages the logits of the fine-tuned models
    ``members`` (:class:`~soundsight.models.FoldEnsemble`): the fold models of
    ``soundsight cv --ensemble``, which must share features and network.

    Its labels are the union of theirs (a fold can lack a class's clips); a class's
    logit is the mean over the members that know it. Each member's head is divided
    by its temperature first, so the mean is of calibrated logits. Its ``metrics`` are
    the members' validation scores averaged (each on its own fold: an estimate of one
    member, not of the ensemble, which needs clips no member saw).
    """
    from .modelfile import read_model_file

    if len(members) < 2:
        raise ConfigError(f"an ensemble needs at least 2 model files, got {len(members)}")
    read = [read_model_file(member) for member in members]
    first = read[0][1]
    for member, (_, spec) in zip(members, read, strict=True):
        if spec.multi_label:
            raise ConfigError(f"{member}: a multi-label model; ensembles are single-label only")
        if (spec.features, spec.model) != (first.features, first.model):
            raise ConfigError(f"{member}: its features or network differ from {members[0]}'s")
    labels = sorted({label for _, spec in read for label in spec.labels})
    model = replace(first.model, members=len(members))
    net = SoundNet(model, len(labels), first.features.floor_db, pretrained=False)
    assert isinstance(net.backbone, FoldEnsemble)  # members > 1
    known = torch.zeros(len(members), len(labels))
    for k, (member, (tensors, spec), network) in enumerate(
        zip(members, read, net.backbone.networks, strict=True)
    ):
        rows = torch.tensor([labels.index(label) for label in spec.labels])
        known[k, rows] = 1.0
        head = {id(p) for p in network.get_classifier().parameters()}
        for name, parameter in network.named_parameters():
            if id(parameter) in head and name in tensors:  # the member's rows, tempered
                wide = torch.zeros_like(parameter)
                wide[rows] = tensors[name].to(wide.dtype) / spec.temperature
                tensors[name] = wide
        check_fits(member, network, tensors)
        network.load_state_dict(tensors)
    net.backbone.known.copy_(known)
    keys = sorted(set.intersection(*(set(spec.metrics) for _, spec in read)))
    spec = ModelSpec(
        labels=tuple(labels),
        features=first.features,
        model=model,
        train={**first.train, "ensemble_of": [str(Path(m)) for m in members]},
        metrics={k: float(np.mean([spec.metrics[k] for _, spec in read])) for k in keys},
        notice=first.notice,
        calibration={"members": len(members), "note": ENSEMBLE_CALIBRATION},
    )
    return save_model_file(path, net, spec)


def cross_validate(
    clips: pd.DataFrame,
    out: str | Path,
    n_folds: int = 5,
    features: FeatureConfig | None = None,
    model: ModelConfig | None = None,
    config: TrainConfig | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
    accept_licence: str | None = None,
    ensemble: bool = False,
    **train_options,
) -> CVResult:
    """Train and score one model per fold (:func:`soundsight.evaluation.make_folds`:
    stratified, grouped where the dataset has groups); ``out/fold{k}`` holds each run
    and ``out/cv.json`` the per-fold scores with their mean and standard deviation.
    ``train_options`` go to :func:`train` (``pretrained``, ``devices``, ``resume``,
    ``force``...). Under DDP every process draws the same seeded folds, and
    Lightning's distributed sampler shards each fold's training and validation clips
    across the ranks. A frozen-embedding backbone (``birdnet``, a ``+`` list) fits each
    fold's head by :func:`soundsight.frozen.train_frozen` instead (``accept_licence``
    for BirdNET; ``train_options`` do not apply), every fold reading the one
    embedding cache, so the folds after the first cost seconds. ``ensemble`` also
    writes ``out/ensemble.safetensors`` (:func:`ensemble_model_file`: the fold models'
    mean, a model like any other; fine-tuned backbones only)."""
    from .frozen import is_frozen_backbone, train_frozen

    out = Path(out)
    config = config or TrainConfig()
    folds = make_folds(clips, n_folds, config.seed)
    frozen = model is not None and is_frozen_backbone(model.backbone)
    if frozen and train_options.get("noise"):
        raise ConfigError(NOISE_FROZEN)
    if ensemble and frozen:
        raise ConfigError(
            "--ensemble averages fine-tuned fold models; a frozen-embedding backbone's "
            "fold heads cannot be combined yet"
        )
    rows = []
    for k, valid_index in enumerate(folds):
        mask = np.zeros(len(clips), bool)
        mask[valid_index] = True
        if frozen:
            assert model is not None  # for the type checker: frozen implies a model
            result = train_frozen(
                clips[~mask],
                out / f"fold{k}",
                model.backbone,
                valid=clips[mask],
                cache=cache,
                accept_licence=accept_licence,
                seed=config.seed,
                progress=progress,
            )
        else:
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
        rows.append({"fold": k, **summary(result.metrics)})
        if progress and is_global_zero():
            print(f"fold {k}: {describe_scores(result.metrics)}")
    frame = pd.DataFrame(rows)
    keys = [key for key in rows[0] if key != "fold"]
    mean = frame[keys].mean().to_dict()
    std = frame[keys].std(ddof=0).to_dict()
    if is_global_zero():
        write_json(out / "cv.json", {"folds": rows, "mean": mean, "std": std})
        if ensemble:
            folds_models = [out / f"fold{k}" / "model.safetensors" for k in range(len(folds))]
            ensemble_model_file(list(folds_models), out / "ensemble.safetensors")
    return CVResult(rows, mean, std)

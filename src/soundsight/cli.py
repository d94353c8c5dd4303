"""The ``soundsight`` command: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

# Only light modules here: everything heavy (pandas, torch, Lightning) is imported by
# the command that needs it, so `soundsight --help` answers at once.
from .config import ENCODINGS, FRONT_ENDS, FeatureConfig, ModelConfig, TrainConfig
from .errors import SoundsightError


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
    from .layouts import LAYOUTS

    parser.add_argument("data", help="dataset folder")
    group = parser.add_argument_group("dataset layout (detected when --layout is omitted)")
    group.add_argument(
        "--layout", choices=sorted(LAYOUTS), help="how clips and labels are laid out"
    )
    group.add_argument(
        "--split",
        default="train",
        help="'train' or 'test' side, for layouts that have one (default: train)",
    )
    group.add_argument(
        "--label-regex",
        help="regex layout: first group of this regex in the file name is the label",
    )
    group.add_argument(
        "--group-regex", help="regex layout: first group is the clip's group (e.g. speaker)"
    )
    group.add_argument("--csv", help="csv layout: CSV file listing clips")
    group.add_argument("--path-column", default="path", help="csv layout: column with file paths")
    group.add_argument("--label-column", default="label", help="csv layout: column with labels")
    group.add_argument(
        "--label-separator",
        help="csv layout: the label column lists several labels per clip, separated by "
        "this (e.g. ','; multi-label; an empty cell is a background clip)",
    )


def _dataset(args: argparse.Namespace, split: str | None = None):
    options = {}
    if args.layout == "regex":
        options = {"label_regex": args.label_regex, "group_regex": args.group_regex}
    elif args.layout == "csv":
        options = {
            "csv": args.csv,
            "path_column": args.path_column,
            "label_column": args.label_column,
            "label_separator": args.label_separator,
        }
    elif args.label_separator is not None:
        raise SoundsightError("--label-separator is for --layout csv")
    from .layouts import load_dataset

    return load_dataset(args.data, args.layout, split or args.split, **options)


def _add_feature_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("log-mel features")
    defaults = FeatureConfig()
    for spec in fields(FeatureConfig):
        default = getattr(defaults, spec.name)
        kind = float if spec.name in ("fmin", "fmax", "top_db") else type(default)
        group.add_argument(
            f"--{spec.name.replace('_', '-')}",
            type=kind,
            default=default,
            choices=FRONT_ENDS if spec.name == "front_end" else None,
            help=f"(default: {default})",
        )


def _features(args: argparse.Namespace) -> FeatureConfig:
    if args.front_end == "aisfx":  # fixed by the network pretrained on it
        from .aisfx import AISFX_FEATURES

        return AISFX_FEATURES
    return FeatureConfig(**{f.name: getattr(args, f.name) for f in fields(FeatureConfig)})


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a probability in (0, 1], got {text!r}")
    return value


def _label_threshold(text: str) -> tuple[str, float]:
    label, sep, value = text.rpartition("=")
    if not sep or not label:
        raise argparse.ArgumentTypeError(f"expected LABEL=PROBABILITY, got {text!r}")
    try:
        return label, _probability(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LABEL=PROBABILITY, got {text!r} ({value!r} is not a number)"
        ) from None


def _keep(text: str) -> float:
    from .calibration import check_keep

    try:
        return check_keep(float(text))
    except (ValueError, SoundsightError) as err:
        raise argparse.ArgumentTypeError(
            f"must be a share of known clips in (0, 1], got {text!r}"
        ) from err


def _add_score_args(parser: argparse.ArgumentParser) -> None:
    """What training fits so that its scores mean something (soundsight.calibration)."""
    group = parser.add_argument_group("calibrated scores and 'unknown'")
    group.add_argument(
        "--keep",
        type=_keep,
        default=0.95,
        help="share of known validation clips the 'unknown' threshold keeps, in (0, 1] "
        "(default 0.95)",
    )
    from .calibration import DEFAULT_REJECTION_SCORE, REJECTION_SCORES

    group.add_argument(
        "--rejection-score",
        choices=REJECTION_SCORES,
        default=DEFAULT_REJECTION_SCORE,
        help="what 'unknown' is judged by: the top calibrated probability, or the "
        "embedding's cosine similarity to the nearest class centroid of the training "
        f"clips (default {DEFAULT_REJECTION_SCORE}, the better measured)",
    )


def _add_unknown_args(parser: argparse.ArgumentParser) -> None:
    """How ``predict`` writes clips below the model file's 'unknown' threshold."""
    group = parser.add_argument_group("'unknown' answers")
    group.add_argument(
        "--unknown-label",
        default="unknown",
        help="label written for clips unlike every known class (default 'unknown'); "
        "best_label and best_probability keep the most probable known label",
    )
    group.add_argument(
        "--no-unknown", action="store_true", help="always write the most probable known label"
    )


def _add_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: one per CPU core; 0 = none)",
    )


def cmd_prepare(args: argparse.Namespace) -> int:
    from .cache import prepare

    table = _dataset(args)
    index, _, count = args.shard.partition("/")
    cache, report = prepare(
        table, args.out, _features(args), args.workers, shard=(int(index), int(count or 1))
    )
    print(report.summary("prepared"))
    print(f"cache: {cache.folder} ({cache.size_bytes() / 1e6:.1f} MB)")
    if report.failed:
        print(
            f"{report.failed} clips failed; see {cache.folder / 'failures.csv'}:", file=sys.stderr
        )
        for path, reason in report.failures[:10]:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


def cmd_export_images(args: argparse.Namespace) -> int:
    from .images import export_images

    report = export_images(
        _dataset(args),
        args.out,
        _features(args),
        args.size,
        args.cmap,
        args.workers,
        cache=args.cache,
    )
    print(report.summary("exported"))
    if report.failed:
        print(f"{report.failed} clips failed; see {args.out}/failures.csv", file=sys.stderr)
        return 1
    return 0


#: One line of help per recipe field; the flags themselves come from the dataclasses'
#: fields (:func:`_add_config_flags`), so a new field is a new flag with no other edit.
MODEL_HELP = {
    "backbone": "a backbone of `soundsight backbones` (offline) or any timm model name, "
    "e.g. resnet34 (hub); birdnet or a '+' list (aisfx+birdnet): frozen embeddings and a "
    "logistic-regression head",
    "weights": "'default' (offline ImageNet checkpoint, else the hub), 'hub', 'none', "
    "or a .pth/.safetensors file",
    "encoding": f"log-mel to RGB: {', '.join(ENCODINGS)}",
    "imagenet_normalization": "normalise with ImageNet's mean/std, not the weights' own",
    "crop_seconds": "training crop / sliding window (default: from clip durations)",
    "image_size": "squash each whole clip to this square size instead of cropping",
    "input_scale": "upsample log-mels by this factor",
}
TRAIN_HELP = {
    "stage1_epochs": "epochs with the body frozen",
    "stage2_epochs": "epochs with everything trainable",
    "stage2_lr": "head learning rate in stage 2 (default: --lr)",
    "body_lr": "body learning rate in stage 2",
    "batch_size": "clips per optimiser step (per process under DDP)",
    "weight_decay": "AdamW weight decay",
    "mixup": "mixup alpha (0: off)",
    "freq_masks": "SpecAugment frequency masks per view",
    "time_masks": "SpecAugment time masks per view",
    "freq_mask_width": "largest frequency mask, as a fraction of the bands",
    "time_mask_width": "largest time mask, as a fraction of the frames",
    "unverified_weight": "loss weight of unverified FSDKaggle2018 clips",
    "balanced": "class-balanced sampling",
    "label_smoothing": "cross-entropy label smoothing",
    "seed": "random seed",
    "num_workers": "DataLoader worker processes",
    "linear_probe": "LP-FT: fit the head on frozen embeddings first (logistic regression)",
    "multi_label": "several labels per clip: sigmoid outputs, binary cross-entropy, "
    "per-class thresholds (set by itself for a multi-label layout)",
    "mix_probability": "multi-label: share of training examples that are two clips summed",
    "noise_probability": "share of training views mixed with noise (--noise, or the "
    "background clips)",
    "noise_snr_min": "lowest event-to-background ratio noise is mixed at, dB",
    "noise_snr_max": "highest event-to-background ratio noise is mixed at, dB",
    "background_noise": "without --noise: the training side's own 'background' clips (or "
    "multi-label clips with no label) are the noise, or, with none, its clips' quiet "
    "stretches (default on)",
}


def _add_config_flags(group, cls: type, helps: dict[str, str]) -> None:
    """A ``--field-name`` flag for each field of config dataclass ``cls`` named in
    ``helps``, typed from the field's default; unset flags stay None, so the recipe's
    own value applies."""
    defaults = cls()
    for spec in fields(cls):
        if spec.name not in helps:
            continue
        default = getattr(defaults, spec.name)
        flag = f"--{spec.name.replace('_', '-')}"
        if isinstance(default, bool):
            # --flag / --no-flag: a switch that is on by default can be turned off.
            group.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=helps[spec.name]
            )
            continue
        kind = {"stage2_lr": float, "crop_seconds": float, "image_size": int}.get(
            spec.name, type(default)
        )
        shown = "" if default is None else f" (default {default})"
        group.add_argument(flag, type=kind, help=f"{helps[spec.name]}{shown}")


def _overrides(args: argparse.Namespace, helps: dict[str, str]) -> dict:
    return {name: getattr(args, name) for name in helps if getattr(args, name) is not None}


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument(
        "--cache", help="feature cache folder (default: $SOUNDSIGHT_CACHE or ~/.cache/soundsight)"
    )
    group = parser.add_argument_group("recipe (defaults are the measured default recipe)")
    group.add_argument(
        "--recipe",
        choices=("default", "seed", "lp-ft"),
        default="default",
        help="'seed' reproduces the blog: whole clip squashed to 224x224, "
        "ImageNet normalisation, no augmentation, stage 2 at 1e-5/1e-4; 'lp-ft' fits "
        "the head on frozen embeddings (logistic regression), then fine-tunes all",
    )
    group.add_argument(
        "--no-pretrained", action="store_true", help="random initial weights, for comparison"
    )
    group.add_argument(
        "--epochs",
        type=int,
        help=f"total epochs, split 1 : rest between stages (default {defaults.epochs})",
    )
    group.add_argument(
        "--lr", help=f"head learning rate, or 'auto' for the LR finder (default {defaults.lr})"
    )
    _add_config_flags(group, ModelConfig, MODEL_HELP)
    _add_config_flags(group, TrainConfig, TRAIN_HELP)
    group = parser.add_argument_group(
        "distributed (DDP; launch with torchrun or srun, or let Lightning start the processes)"
    )
    group.add_argument(
        "--devices",
        default="auto",
        help="processes (CPU) or GPUs per node; under torchrun 'auto' is its --nproc_per_node "
        "(default auto)",
    )
    group.add_argument("--num-nodes", type=int, default=1, help="machines (default 1)")


def _recipe(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig]:
    """ModelConfig and TrainConfig from --recipe plus any explicit overrides."""
    from dataclasses import replace

    from .training import lp_ft_recipe, seed_recipe

    if args.recipe == "seed":
        model, config = seed_recipe(args.epochs or TrainConfig().epochs)
    elif args.recipe == "lp-ft":
        model, config = ModelConfig(), lp_ft_recipe(TrainConfig().epochs)
    else:
        model, config = ModelConfig(), TrainConfig()
    model = replace(model, **_overrides(args, MODEL_HELP))
    overrides = _overrides(args, TRAIN_HELP)
    if args.lr not in (None, "auto"):
        overrides["lr"] = float(args.lr)
    if args.epochs and args.recipe != "seed":
        stage1 = overrides.get("stage1_epochs", min(config.stage1_epochs, args.epochs - 1))
        overrides["stage1_epochs"], overrides["stage2_epochs"] = stage1, args.epochs - stage1
    return model, replace(config, **overrides)


def _train_valid(args: argparse.Namespace):
    """Training clips and validation clips: the dataset's own test side where it has a
    labelled one, else None (train holds out a grouped, stratified 20%)."""
    from .layouts import VALIDATION_SIDES, is_multi_label

    table = _dataset(args, "train")
    side = VALIDATION_SIDES.get(table.attrs["layout"])
    if side is not None:
        valid = _dataset(args, side)
        if is_multi_label(valid) or valid["label"].notna().all():
            return table, valid
    return table, None


def cmd_train(args: argparse.Namespace) -> int:
    from .frozen import is_frozen_backbone
    from .layouts import is_multi_label
    from .training import is_global_zero, train

    clips, valid = _train_valid(args)
    model, config = _recipe(args)
    if is_frozen_backbone(model.backbone):
        return _train_frozen(args, clips, valid, model.backbone, config.seed)
    if args.mix_probability is not None and not (config.multi_label or is_multi_label(clips)):
        raise SoundsightError(
            "--mix-probability is for multi-label training: give --multi-label, or a "
            "multi-label layout (fsdkaggle2019, fsd50k, csv with --label-separator)"
        )
    result = train(
        clips,
        args.out,
        valid=valid,
        features=_features(args),
        model=model,
        config=config,
        cache=args.cache,
        resume=args.resume,
        force=args.force,
        pretrained=not args.no_pretrained,
        lr_find=args.lr == "auto",
        devices=args.devices,
        num_nodes=args.num_nodes,
        keep=args.keep,
        rejection=args.rejection_score,
        noise=args.noise,
    )
    if not is_global_zero():  # under DDP, rank 0 alone reports and plots
        return 0
    _print_scores("validation", result.metrics)
    print(f"model written to {result.model_path}")
    _print_plots(args.out, args.cache)
    return 0


def _print_plots(out: str, cache: str | None) -> None:
    """Plot a run folder (:func:`soundsight.report.plot_run`) and say where."""
    from .report import plot_run

    print(
        f"plots: {len(plot_run(out, cache))} PNGs in {out} "
        f"(soundsight report {out} makes report.html)"
    )


def _train_frozen(args: argparse.Namespace, clips, valid, backbone: str, seed: int) -> int:
    """``train --backbone birdnet`` or a ``+`` list: frozen embeddings + logistic
    regression (:func:`soundsight.frozen.train_frozen`)."""
    from .frozen import train_frozen
    from .training import NOISE_FROZEN

    if args.noise:
        raise SoundsightError(NOISE_FROZEN)
    result = train_frozen(
        clips,
        args.out,
        backbone,
        valid=valid,
        cache=args.cache,
        accept_licence=args.accept_licence,
        seed=seed,
    )
    _print_scores("validation", result.metrics)
    print(f"model written to {result.model_path} (frozen {backbone} embeddings + logistic head)")
    _print_plots(args.out, args.cache)
    return _report_failures(result.failures)


def cmd_lr_find(args: argparse.Namespace) -> int:
    from .training import lr_find

    model, config = _recipe(args)
    suggestion = lr_find(
        _dataset(args, "train"), args.out, _features(args), model, config, args.cache
    )
    print(f"suggested learning rate: {suggestion:.2e}; plot: {Path(args.out) / 'lr_find.png'}")
    return 0


def cmd_cv(args: argparse.Namespace) -> int:
    import pandas as pd

    from .report import plot_run
    from .training import cross_validate, is_global_zero

    model, config = _recipe(args)
    result = cross_validate(
        _dataset(args, "train"),
        args.out,
        args.folds,
        _features(args),
        model,
        config,
        args.cache,
        accept_licence=args.accept_licence,
        ensemble=args.ensemble,
        noise=args.noise,
        pretrained=not args.no_pretrained,
        devices=args.devices,
        num_nodes=args.num_nodes,
        keep=args.keep,
        rejection=args.rejection_score,
    )
    if not is_global_zero():
        return 0
    print(pd.DataFrame(result.folds).to_string(index=False))
    for key in list(result.mean)[1:]:
        print(f"{key}: {result.mean[key]:.4f} +- {result.std[key]:.4f}")
    print(
        f"results: {Path(args.out) / 'cv.json'}; plots: {len(plot_run(args.out, args.cache))} PNGs"
    )
    if args.ensemble:
        print(
            f"ensemble of the {args.folds} fold models: {Path(args.out) / 'ensemble.safetensors'}"
        )
    return 0


def cmd_fuse(args: argparse.Namespace) -> int:
    from .frozen import fuse, held_out_side
    from .modelfile import read_frozen_model_file

    if args.whole:
        valid = _dataset(args)
    else:  # the clips train validated both models on
        clips, valid = _train_valid(args)
        if valid is None:
            valid = held_out_side(clips, args.network, args.frozen)
    result = fuse(
        args.network, args.frozen, args.out, valid=valid, cache=args.cache, noise=args.noise
    )
    spec = read_frozen_model_file(result.model_path)[1]
    fusion = spec.train["fusion"]
    print(
        f"validation ({fusion['valid_clips']} clips): network {fusion['network_accuracy']:.4f}, "
        f"frozen head {fusion['head_accuracy']:.4f}, fused at weight {spec.weight:.2f} "
        f"{result.metrics['accuracy']:.4f} (chosen on these clips: score the model on "
        "others for an honest figure)"
    )
    if "noisy_accuracy" in fusion:
        print(
            f"the same {fusion['noisy_clips']} clips in noise: network "
            f"{fusion['noisy_network_accuracy']:.4f}, frozen head "
            f"{fusion['noisy_head_accuracy']:.4f}, fused {fusion['noisy_accuracy']:.4f}"
        )
    print(f"model: {result.model_path}; weights tried: {Path(args.out) / 'fusion.png'}")
    _print_plots(args.out, args.cache)
    return _report_failures(result.failures)


def _print_scores(what: str, metrics: dict) -> None:
    from .evaluation import describe_scores

    print(f"{what}: {describe_scores(metrics)}")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import write_metrics
    from .prediction import evaluate

    if args.events:
        return _evaluate_events(args)
    clips = _dataset(args)
    metrics, frame, failures = evaluate(args.model, clips, args.cache)
    _print_scores(f"{args.data} ({args.split})", metrics)
    print(metrics["per_class"].to_string(index=False, float_format="%.3f"))
    if len(metrics.get("most_confused", ())):
        print("most confused (true -> predicted):")
        print(metrics["most_confused"].head(10).to_string(index=False))
    if args.out:
        labels = list(frame.columns[2:])
        if "labels" in frame:  # a multi-label model: each clip's labels, 0/1 per label
            from .layouts import LABEL_JOIN, multi_hot

            index = {label: i for i, label in enumerate(labels)}
            given = [tuple(filter(None, cell.split(LABEL_JOIN))) for cell in frame["labels"]]
            targets = multi_hot(given, index)
        else:
            targets = frame["label"].map({label: i for i, label in enumerate(labels)}).to_numpy()
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_metrics(
            Path(args.out),
            metrics,
            labels,
            frame["path"].tolist(),
            frame[labels].to_numpy(),
            targets,
        )
        print(f"metrics written to {args.out}")
    return _report_failures(failures)


def _evaluate_events(args: argparse.Namespace) -> int:
    """``evaluate --events``: detect on the annotated files, score with sed_eval."""
    from .detection import detect
    from .evaluation import event_scores, read_event_annotations, write_json
    from .runtime import load_classifier
    from .tables import write_csv

    classifier = load_classifier(args.model, "torch")
    settings = _detect_settings(args)
    reference = read_event_annotations(args.events, args.data, classifier.labels)
    if args.tune:
        return _tune_detection(args, classifier, reference, settings)
    names = list(dict.fromkeys(reference["filename"]))
    paths = dict(zip(reference["path"], reference["filename"], strict=True))
    found = detect(classifier, list(paths), settings)
    estimated = found.events.assign(filename=found.events["filename"].map(paths))
    scored = [n for n in names if str(Path(args.data) / n) in found.durations]
    labels = [label for label in classifier.labels if label not in settings.background]
    scores = event_scores(reference, estimated, labels, scored)
    print(
        f"{args.events}: {scores['files']} files, segment-based (1 s) F1 "
        f"{scores['segment_f1']:.4f}, error rate {scores['segment_error_rate']:.4f}; "
        f"event-based (200 ms collar) F1 {scores['event_f1']:.4f}, "
        f"error rate {scores['event_error_rate']:.4f}"
    )
    print(scores["per_class"].to_string(index=False, float_format="%.3f"))
    if args.out:
        out = Path(args.out)
        write_csv(estimated, out / "events.csv")
        write_csv(scores.pop("per_class"), out / "per_class_events.csv")
        write_json(out / "event_metrics.json", scores)
        print(f"events and metrics written to {args.out}")
    return _report_failures(found.failures)


def _tune_detection(args: argparse.Namespace, classifier, reference, settings) -> int:
    """``evaluate --events --tune``: the best post-processing on the annotated set."""
    from .detection import tune
    from .tables import write_csv

    best, table = tune(classifier, reference, settings, metric=args.tune)
    print(table.head(10).to_string(index=False))
    flags = " ".join(
        f"--{flag} {value:g}"
        for flag, value in (
            ("smooth", best.smooth_seconds),
            ("merge-gap", best.merge_gap),
            ("min-duration", best.min_duration),
            ("threshold", best.threshold),
        )
        if value is not None
    )
    flags += "".join(f" --label-threshold {k}={v:g}" for k, v in best.label_thresholds.items())
    print(f"best {args.tune} {table[args.tune].iloc[0]:.4f} of {len(table)} settings: {flags}")
    if args.out:
        write_csv(table, Path(args.out) / "tuning.csv")
        print(f"every setting's scores written to {Path(args.out) / 'tuning.csv'}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .frozen import FrozenClassifier
    from .layouts import DatasetError, audio_files, load_dataset
    from .runtime import OnnxClassifier, load_classifier, submission
    from .tables import write_csv

    if args.data:
        paths = list(load_dataset(args.data, args.layout, args.split)["path"])
    else:
        paths, skipped = audio_files(args.paths)
        for path, reason in skipped:
            warnings.warn(f"skipped {path}: {reason}", stacklevel=1)
    if not paths:
        raise DatasetError(f"no audio files in {', '.join(args.paths or [args.data])}")
    classifier = load_classifier(args.model, args.runtime, args.threads)
    spec = classifier.spec
    if args.threshold is not None and not spec.multi_label:
        raise SoundsightError(
            f"--threshold is for multi-label models; {args.model} is single-label (one "
            "label per clip: use --top-k, and its 'unknown' threshold)"
        )
    _print_notice(spec.notice)
    frozen = isinstance(classifier, FrozenClassifier)
    if isinstance(classifier, OnnxClassifier | FrozenClassifier):
        frame, failures = classifier.predict_files(paths)
    else:
        frame, failures = classifier.predict_files(paths, workers=args.workers)
    root = args.data or (args.paths[0] if len(args.paths) == 1 else None)
    known = thresholds = None
    if spec.multi_label:
        thresholds = (
            [args.threshold] * len(spec.labels) if args.threshold is not None else spec.thresholds
        )
    elif not args.no_unknown:
        if classifier.rejection is None and not frozen:
            print(
                f"note: {args.model} has no 'unknown' threshold (trained before it existed, "
                "or on too few validation clips): every file gets a known label",
                file=sys.stderr,
            )
        known = frame.attrs["known"]
    result = submission(
        frame,
        classifier.labels,
        args.top_k,
        root,
        known=known,
        unknown_label=args.unknown_label,
        thresholds=thresholds,
    )
    if args.out:
        write_csv(result, args.out)
        print(f"{len(result)} predictions written to {args.out}")
    else:
        print(result.to_string(index=False))
    if args.probabilities:
        write_csv(frame, args.probabilities)
    return _report_failures(failures)


def cmd_detect(args: argparse.Namespace) -> int:
    from .detection import detect, write_events
    from .layouts import DatasetError, audio_files

    paths, skipped = audio_files(args.paths)
    for path, reason in skipped:
        warnings.warn(f"skipped {path}: {reason}", stacklevel=1)
    if not paths:
        raise DatasetError(f"no audio files in {', '.join(args.paths)}")
    found = detect(args.model, paths, _detect_settings(args), picture_folder=args.plot)
    if args.out:
        write_events(found, args.out)
        print(f"{len(found.events)} events in {len(found.durations)} files written to {args.out}")
    else:
        print(found.events.to_string(index=False))
    if args.plot:
        print(f"timeline pictures written to {args.plot}")
    return _report_failures(found.failures)


def _report_failures(failures: list[tuple[str, str]]) -> int:
    if failures:
        print(f"{len(failures)} files could not be read:", file=sys.stderr)
        for path, reason in failures:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serving import ServeConfig, serve

    settings = ServeConfig(
        max_upload_bytes=int(args.max_upload_mb * 1e6),
        max_duration=args.max_duration,
        workers=args.workers or ServeConfig().workers,
        queue_size=args.queue_size,
        top_k=args.top_k,
        torch_threads=args.torch_threads or None,
        allowed_hosts=args.allowed_host,
    )
    if not Path(args.model).is_file():
        raise FileNotFoundError(f"model file not found: {args.model}")
    from .modelfile import read_any_spec
    from .runtime import OnnxClassifier, is_onnx

    # An export's record is in its metadata, read by opening it (its workers reopen it).
    spec = OnnxClassifier.load(args.model, 1).spec if is_onnx(args.model) else None
    _print_notice((spec or read_any_spec(args.model)).notice)
    serve(
        args.model,
        args.host,
        args.port,
        settings,
        access_log=not args.no_access_log,
        runtime=args.runtime,
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import tempfile

    from .export import export_onnx, quantize

    if args.calibration and args.quantize != "static":
        raise SoundsightError("--calibration is for --quantize static")
    if args.quantize and args.input != "waveform":
        raise SoundsightError("--quantize needs --input waveform (the runtime's files)")
    if not args.quantize:
        export_onnx(args.model, args.out, args.input, args.opset)
        print(f"ONNX model ({args.input} in) written to {args.out}")
        return 0
    with tempfile.TemporaryDirectory(prefix="soundsight-export-") as scratch:
        fp32 = export_onnx(args.model, Path(scratch) / "fp32.onnx", args.input, args.opset)
        before, after = quantize(
            args.model, fp32, args.out, args.quantize, args.calibration, args.force
        )
    if before is not None and after is not None:
        print(f"validation accuracy: fp32 {before:.2f}%, int8 {after:.2f}%")
    print(f"int8 ({args.quantize}) ONNX model written to {args.out}")
    return 0


def _print_notice(notice: str) -> None:
    """A model's licence notice (its pretrained weights' attribution), once, on stderr
    so that predictions on stdout stay machine-readable."""
    if notice:
        print(f"note: {notice}", file=sys.stderr)


def cmd_backbones(args: argparse.Namespace) -> int:
    from .models import OFFLINE_BACKBONES, offline_status

    for name, problem in offline_status().items():
        where = OFFLINE_BACKBONES[name].origin
        print(f"{name:<24} {'offline' if not problem else 'missing'}  {problem or where}")
    from .birdnet import BirdnetMissingError, model_path

    try:
        where, problem = f"{model_path()} (frozen only; CC BY-NC-SA 4.0, non-commercial)", ""
    except BirdnetMissingError as err:
        problem = str(err)
    print(f"{'birdnet':<24} {'offline' if not problem else 'missing'}  {problem or where}")
    print("a '+' list of these (aisfx+birdnet) trains frozen embeddings and a logistic head")
    print(
        "any other timm model name (e.g. resnet34) loads its ImageNet weights from the "
        "Hugging Face hub (network needed), or from --weights PATH"
    )
    return 0


def cmd_show_batch(args: argparse.Namespace) -> int:
    from .report import show_batch

    figure_path = show_batch(
        _dataset(args),
        args.out,
        _features(args),
        n=args.n,
        cols=args.cols,
        seed=args.seed,
        cache=args.cache,
        names=args.names,
    )
    print(f"batch written to {figure_path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    import time

    from .report import write_report

    started = time.perf_counter()
    path = write_report(args.run, args.cache, replot=args.replot, progress=True)
    print(f"report written to {path} ({time.perf_counter() - started:.1f} s)")
    return 0


def cmd_learning_curve(args: argparse.Namespace) -> int:
    from .learning_curve import learning_curve

    result = learning_curve(
        _dataset(args, "train"),
        args.out,
        cache=args.cache,
        features=_features(args),
        repeats=args.repeats,
    )
    print(result.curve.to_string(index=False))
    summary = result.summary
    print(
        f"accuracy now ({summary['clips_per_class_now']} clips per class): "
        f"{summary['accuracy_now']:.3f}"
    )
    if summary["accuracy_at_2x"] is not None:
        print(f"power-law fit at twice the clips: {summary['accuracy_at_2x']:.3f}")
    if summary["gain_most"]:
        print(f"classes that would gain most from more clips: {', '.join(summary['gain_most'])}")
    print(f"picture and numbers in {args.out} (learning_curve.png, learning_curve*.csv)")
    return 0


def _args_learning_curve(p: argparse.ArgumentParser) -> None:
    _add_dataset_args(p)
    p.add_argument("--out", required=True, help="folder for learning_curve.png and its CSVs")
    p.add_argument("--cache", help="feature cache folder")
    p.add_argument("--repeats", type=_positive_int, default=3, help="held-out splits (default 3)")
    _add_feature_args(p)


@dataclass(frozen=True)
class Command:
    """One subcommand: its name and help, what adds its arguments, what runs it."""

    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _args_prepare(p: argparse.ArgumentParser) -> None:
    _add_dataset_args(p)
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--shard", default="0/1", help="do only shard i of n, as 'i/n' (default 0/1)")
    _add_feature_args(p)
    _add_workers(p)


def _args_export_images(p: argparse.ArgumentParser) -> None:
    _add_dataset_args(p)
    p.add_argument("--out", required=True, help="output folder (one sub-folder per label)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--cmap", default="magma", help="matplotlib colour map (default magma)")
    p.add_argument(
        "--cache",
        help="read log-mels from this prepare folder where it has them, instead of decoding",
    )
    _add_feature_args(p)
    _add_workers(p)


def _args_train(p: argparse.ArgumentParser) -> None:
    _add_dataset_args(p)
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument(
        "--force",
        action="store_true",
        help="with --resume: continue even though the data set changed since the run began",
    )
    _add_training_args(p)
    _add_noise_arg(p)
    _add_feature_args(p)
    _add_score_args(p)
    _add_licence_arg(p)


def _add_noise_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--noise",
        nargs="+",
        metavar="PATH",
        help="background recordings (files or folders) mixed into training views at random "
        "event-to-background ratios, for a model that will hear its sounds in noise",
    )


def _add_licence_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--accept-licence",
        metavar="LICENCE",
        help="accept the licence of a backbone that needs it: cc-by-nc-sa-4.0 for birdnet "
        "(BirdNET V2.4: non-commercial, share-alike; or set SOUNDSIGHT_ACCEPT_LICENCE)",
    )


def _args_lr_find(p: argparse.ArgumentParser) -> None:
    _add_dataset_args(p)
    p.add_argument("--out", required=True, help="folder for lr_find.png")
    _add_training_args(p)
    _add_feature_args(p)


def _args_cv(p: argparse.ArgumentParser) -> None:
    _add_dataset_args(p)
    p.add_argument("--out", required=True, help="folder for the fold runs and cv.json")
    p.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    p.add_argument(
        "--ensemble",
        action="store_true",
        help="also write OUT/ensemble.safetensors: one model averaging the fold models' "
        "logits, for predict/evaluate/serve/detect/export like any model",
    )
    _add_training_args(p)
    _add_noise_arg(p)
    _add_feature_args(p)
    _add_score_args(p)
    _add_licence_arg(p)


def _args_fuse(p: argparse.ArgumentParser) -> None:
    p.add_argument("network", help="a fine-tuned single-label model file (train)")
    p.add_argument("frozen", help="a frozen-embedding model file with the same labels")
    _add_dataset_args(p)
    p.add_argument("--out", required=True, help="folder for model.safetensors and the scores")
    p.add_argument("--cache", help="feature cache folder")
    p.add_argument(
        "--whole",
        action="store_true",
        help="DATA is a validation set neither model trained on: choose the weight on all "
        "its clips (default: on the clips train validated both models on, DATA's test "
        "side where it has one, else the 20%% it held out)",
    )
    p.add_argument(
        "--noise",
        nargs="+",
        metavar="PATH",
        help="background recordings (files or folders): the weight is also scored on a "
        "copy of the validation clips heard in them (event-to-background -6 to +12 dB), so "
        "that a part brittle in noise weighs less",
    )


def _args_evaluate(p: argparse.ArgumentParser) -> None:
    from .detection import TUNING_METRICS

    p.add_argument("model", help="model file (model.safetensors)")
    _add_dataset_args(p)
    p.set_defaults(split="test")
    p.add_argument("--out", help="folder for metrics.json, per_class.csv, confusion.csv, ...")
    p.add_argument("--cache", help="feature cache folder")
    p.add_argument(
        "--events",
        help="sound-event evaluation: a DCASE CSV filename,onset,offset,event_label "
        "(file names relative to DATA); reports segment- and event-based F1 and "
        "error rate (sed_eval)",
    )
    p.add_argument(
        "--tune",
        choices=TUNING_METRICS,
        help="with --events: try every post-processing setting of the grid (threshold, "
        "smoothing, gap merging, minimum duration), then each label's threshold, on "
        "these annotated recordings, a validation set, and print the detect flags that "
        "score best on this metric",
    )
    _add_detect_settings(p)


def _args_predict(p: argparse.ArgumentParser) -> None:
    from .layouts import LAYOUTS

    p.add_argument("model", help="model file (model.safetensors or an exported .onnx)")
    p.add_argument("paths", nargs="*", help="audio files or folders")
    p.add_argument("--data", help="predict a dataset's clips instead (see --split)")
    p.add_argument("--layout", choices=sorted(LAYOUTS), help="layout of --data")
    p.add_argument("--split", default="test", help="side of --data to predict (default test)")
    p.add_argument("--top-k", type=_positive_int, default=3, help="labels per file (default 3)")
    p.add_argument(
        "--threshold",
        type=_probability,
        help="multi-label models: one probability threshold for every label, in place of "
        "the per-class thresholds tuned at training",
    )
    p.add_argument(
        "--out",
        help="CSV file for fname,label (a multi-label model: fname,labels,path and each "
        "label's probability; default: print)",
    )
    p.add_argument("--probabilities", help="also write per-class probabilities to this CSV")
    _add_workers(p)
    _add_unknown_args(p)
    _add_runtime(p)
    p.add_argument(
        "--threads", type=int, help="inference threads (default: torch's, or one per core)"
    )


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--runtime",
        choices=("onnx", "torch"),
        help="onnx (ONNX Runtime, an exported .onnx file; no torch needed) or torch "
        "(model.safetensors); default: onnx for a .onnx MODEL, else torch",
    )


def _detect_settings(args: argparse.Namespace):
    """The DetectConfig of ``detect``'s (and ``evaluate --events``') flags."""
    from .detection import DetectConfig

    return DetectConfig(
        hop_seconds=args.hop,
        smooth_seconds=args.smooth,
        threshold=args.threshold,
        label_thresholds=dict(args.label_threshold or ()),
        min_duration=args.min_duration,
        merge_gap=args.merge_gap,
        background=tuple(args.background or DetectConfig.background),
    )


def _args_detect(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file (model.safetensors)")
    p.add_argument("paths", nargs="+", help="audio files or folders (any length)")
    p.add_argument("--out", help="events file: .csv (DCASE columns) or .json (default: print)")
    p.add_argument("--plot", help="folder for one PNG per file: spectrogram and event bands")
    _add_detect_settings(p)


def _add_detect_settings(p: argparse.ArgumentParser) -> None:
    from .detection import DetectConfig

    d = DetectConfig()
    group = p.add_argument_group("from probabilities to events")
    # Each numeric flag sets the DetectConfig field of the same meaning, defaulting to it.
    for flag, field, what in (
        ("--hop", "hop_seconds", "seconds between windows"),
        ("--smooth", "smooth_seconds", "median filter length in seconds"),
        ("--min-duration", "min_duration", "drop shorter events, seconds"),
        ("--merge-gap", "merge_gap", "join events of a label closer than this, seconds"),
    ):
        default = getattr(d, field)
        group.add_argument(flag, type=float, default=default, help=f"{what} ({default})")
    group.add_argument(
        "--threshold",
        type=float,
        help="probability at which a label is active (default: the model's tuned "
        "per-class thresholds, else 0.5)",
    )
    group.add_argument(
        "--label-threshold",
        action="append",
        type=_label_threshold,
        metavar="LABEL=P",
        help="one label's threshold, in place of --threshold's (repeatable; "
        "evaluate --events --tune prints the ones that score best)",
    )
    group.add_argument(
        "--background",
        action="append",
        help="label meaning 'nothing of interest', never an event (repeatable; "
        "default: 'background' where the model has it)",
    )


def _args_serve(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file (model.safetensors or an exported .onnx)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--max-upload-mb", type=float, default=20.0, help="largest upload in MB (default 20)"
    )
    p.add_argument(
        "--max-duration",
        type=float,
        default=30.0,
        help="analyse at most this many seconds of a clip (default 30)",
    )
    p.add_argument(
        "--workers", type=int, default=None, help="inference threads (default: CPU cores, max 4)"
    )
    p.add_argument(
        "--queue-size",
        type=int,
        default=16,
        help="requests that may wait for a worker; more get 503 (default 16)",
    )
    p.add_argument("--top-k", type=_positive_int, default=5, help="labels per answer (default 5)")
    p.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="threads per inference, torch's or ONNX Runtime's (default 1; 0 = the "
        "runtime's default)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        help="Host header value to accept, repeatable ('*.example.com', '*' for any); "
        "default: the loopback names and the --host address",
    )
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    _add_runtime(p)


def _args_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model file (model.safetensors)")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="file format (onnx)")
    p.add_argument("--out", required=True, help="file to write (model.onnx)")
    p.add_argument(
        "--input",
        choices=("waveform", "log-mel"),
        default="waveform",
        help="waveform: the whole front end in the graph, samples in (what predict and "
        "serve run); log-mel: the network only, log-mel windows in (default waveform)",
    )
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 17 or later (default 18)")
    p.add_argument(
        "--quantize",
        choices=("dynamic", "static"),
        help="also make it int8 (convolutions and head); refused if it costs more than "
        "1 point of validation accuracy",
    )
    p.add_argument("--calibration", help="folder of clips to calibrate --quantize static on")
    p.add_argument("--force", action="store_true", help="write the int8 file whatever its accuracy")


def _args_backbones(p: argparse.ArgumentParser) -> None:
    """No arguments: it lists the registry."""


def _args_show_batch(p: argparse.ArgumentParser) -> None:
    _add_dataset_args(p)
    p.add_argument("--out", default="batch.png", help="PNG file (default batch.png)")
    p.add_argument("--n", type=int, default=16, help="clips to show (default 16)")
    p.add_argument("--cols", type=int, help="grid columns (default: a square grid)")
    p.add_argument("--seed", type=int, default=0, help="which random clips (default 0)")
    p.add_argument("--names", action="store_true", help="also print file names")
    p.add_argument("--cache", help="feature cache to read log-mels from (else decoded)")
    _add_feature_args(p)


def cmd_index(args: argparse.Namespace) -> int:
    from .search import build_index, merge_shards, parse_shard

    if args.merge:
        if args.paths:
            raise SoundsightError("--merge joins the shards of --out: give no AUDIO with it")
        report = merge_shards(args.out)
    else:
        if not args.paths:
            raise SoundsightError("name the audio files or folders to index")
        report = build_index(
            args.paths,
            args.out,
            model=args.model,
            backbone=args.backbone,
            window_seconds=args.window,
            hop_seconds=args.hop,
            shard=parse_shard(args.shard),
        )
    hours = report.audio_seconds / 3600
    speed = report.audio_seconds / report.elapsed if report.elapsed else 0.0
    print(
        f"{len(report.added)} files added ({report.windows} windows, {hours:.3f} h of audio, "
        f"{speed:.0f}x real time), {len(report.replaced)} changed files indexed again, "
        f"{report.unchanged} unchanged skipped: {args.out}"
    )
    return _report_failures(report.failures)


def cmd_search(args: argparse.Namespace) -> int:
    from .search import search
    from .tables import write_csv

    if (args.query is None) == (args.label is None):
        raise SoundsightError("give a QUERY clip or --label LABEL (one of them)")
    hits, query = search(
        args.index,
        args.query,
        args.top,
        args.start,
        args.end,
        args.label,
        args.model,
        per_file=args.per_file,
    )
    if query.note:
        print(f"note: {query.note}", file=sys.stderr)
    hits = hits[["file", "start", "end", "distance", "row"]]
    if args.out:
        write_csv(hits, args.out)
        print(f"{len(hits)} hits for {query.source} written to {args.out}")
    else:
        print(hits.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    from .label_app import serve_labelling

    serve_labelling(args.index, args.host, args.port, args.allowed_host)
    return 0


def cmd_fit_labels(args: argparse.Namespace) -> int:
    from .labelling import reports_table, train_heads
    from .search import Index

    index = Index(args.index)
    try:
        heads = train_heads(index, seed=args.seed)
    finally:
        index.close()
    print(reports_table(heads).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def cmd_suggest(args: argparse.Namespace) -> int:
    from .labelling import suggest
    from .search import Index

    index = Index(args.index)
    try:
        table = suggest(index, args.label, args.count, args.strategy, args.seed)
    finally:
        index.close()
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def cmd_export_labels(args: argparse.Namespace) -> int:
    from .search import export_labels

    path = export_labels(args.index, args.out)
    print(
        f"labelled windows written to {path} (train with: soundsight train {args.out} "
        "--layout csv --csv labels.csv)"
    )
    return 0


def _args_index(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", metavar="AUDIO", help="audio files or folders (any length)")
    p.add_argument("--out", required=True, help="index folder (created, or added to)")
    p.add_argument("--model", help="embed with a trained model file instead of the backbone")
    p.add_argument("--backbone", default="aisfx", help="pretrained backbone (default aisfx)")
    p.add_argument(
        "--window", type=float, help="window seconds (default: the backbone's clip length)"
    )
    p.add_argument("--hop", type=float, help="seconds between windows (default: half a window)")
    p.add_argument(
        "--shard",
        default="0/1",
        help="do only shard i of n, as 'i/n', into OUT/shard-IofN (default 0/1)",
    )
    p.add_argument("--merge", action="store_true", help="join OUT/shard-* into OUT")


def _args_search(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index folder (soundsight index)")
    p.add_argument("query", nargs="?", help="query clip (an audio file)")
    p.add_argument("--start", type=float, help="query: seconds into the file where it starts")
    p.add_argument("--end", type=float, help="query: seconds into the file where it ends")
    p.add_argument("--label", help="query: the centroid of the windows labelled LABEL")
    p.add_argument("--top", type=_positive_int, default=20, help="hits (default 20)")
    p.add_argument("--model", help="the model file the index was built with (checked)")
    p.add_argument(
        "--per-file",
        action="store_true",
        help="rank whole files (each as the maximum of its windows' embeddings), not windows",
    )
    p.add_argument("--out", help="write the hits as CSV (default: print)")


def _args_label(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index folder (soundsight index)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    p.add_argument(
        "--allowed-host",
        action="append",
        help="Host header value to accept, repeatable; default: the loopback names and --host",
    )


def _args_fit_labels(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index folder (soundsight index)")
    p.add_argument("--seed", type=int, default=0, help="seed of folds and background draws")


def _args_suggest(p: argparse.ArgumentParser) -> None:
    from .labelling import STRATEGIES

    p.add_argument("index", help="index folder (soundsight index)")
    p.add_argument("label", help="the label to find windows for")
    p.add_argument("--count", type=_positive_int, default=10, help="windows (default 10)")
    p.add_argument("--strategy", choices=STRATEGIES, default="margin", help="(default margin)")
    p.add_argument("--seed", type=int, default=0, help="seed (random strategy)")


def _args_export_labels(p: argparse.ArgumentParser) -> None:
    p.add_argument("index", help="index folder (soundsight index)")
    p.add_argument("--out", required=True, help="dataset folder to write")


def _args_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder of train, or folder of cv")
    p.add_argument("--cache", help="feature cache folder (clips not in it are decoded)")
    p.add_argument("--replot", action="store_true", help="redraw plots even if up to date")


COMMANDS = (
    Command(
        "prepare",
        "decode and featurise a dataset into a cache",
        "Decode every clip once, compute log-mel features in "
        "parallel and store them in a resumable, crash-safe cache.",
        _args_prepare,
        cmd_prepare,
    ),
    Command(
        "export-images",
        "write one colour-mapped log-mel PNG per clip",
        "Write a PNG spectrogram per clip, like the blog "
        "recipe's images, resumably (existing PNGs are kept).",
        _args_export_images,
        cmd_export_images,
    ),
    Command(
        "train",
        "fine-tune an ImageNet backbone on a dataset",
        "Fine-tune in two stages (head, then all with "
        "discriminative learning rates), validate on the dataset's test "
        "side or a grouped 20%% hold-out, and write RUN/model.safetensors.",
        _args_train,
        cmd_train,
    ),
    Command(
        "lr-find",
        "learning-rate range test (plot + suggestion)",
        "Run Lightning's LR range test on the unfrozen "
        "network; save OUT/lr_find.png and print the suggested rate.",
        _args_lr_find,
        cmd_lr_find,
    ),
    Command(
        "cv",
        "k-fold cross-validation (stratified, grouped)",
        "Train one model per fold: the dataset's own folds "
        "when it has --folds of them, else stratified folds grouped by "
        "source recording or speaker; report mean and spread.",
        _args_cv,
        cmd_cv,
    ),
    Command(
        "fuse",
        "late fusion of a fine-tuned model and a frozen-embedding one",
        "One model file whose probabilities are the weighted mean of a fine-tuned "
        "network's and a frozen-embedding head's, the weight chosen on validation "
        "clips neither trained on; predict, evaluate and serve run it.",
        _args_fuse,
        cmd_fuse,
    ),
    Command(
        "evaluate",
        "score a model on labelled clips",
        "Accuracy, MAP@3, per-class precision/recall/F1, "
        "confusion matrix and most-confused pairs on labelled clips "
        "(default: the dataset's test side where it has one).",
        _args_evaluate,
        cmd_evaluate,
    ),
    Command(
        "predict",
        "label audio files with a trained model",
        "Top-k labels per file (sliding windows averaged "
        "over long clips), in the Kaggle submission format.",
        _args_predict,
        cmd_predict,
    ),
    Command(
        "detect",
        "a timeline of sound events in recordings of any length",
        "Slide the model's window along each file (read in blocks), smooth the "
        "frame-wise probabilities with a median filter and turn them into events "
        "(onset, offset, label, peak probability): CSV in the DCASE format or JSON, "
        "and with --plot a PNG of the spectrogram with the event bands.",
        _args_detect,
        cmd_detect,
    ),
    Command(
        "serve",
        "serve a model over HTTP: JSON API and a page to try it",
        "Load a model once and serve it with uvicorn: POST /predict "
        "(multipart field 'file' or raw audio body), GET /labels, GET /health, "
        "OpenAPI docs at /docs, and a page at / to drop in a sound and see its "
        "spectrogram and labels. Binds to loopback unless --host says otherwise.",
        _args_serve,
        cmd_serve,
    ),
    Command(
        "export",
        "export a model to ONNX for the torch-free runtime",
        "Write MODEL as an ONNX file: by default the whole path from a clip's samples "
        "to its windows' probabilities (STFT, mel, dB, windows, colour map, network), "
        "with the labels and feature config in its metadata, so that `predict` and "
        "`serve` run it with ONNX Runtime alone (no torch). Optionally int8.",
        _args_export,
        cmd_export,
    ),
    Command(
        "backbones",
        "list the backbones whose pretrained weights are installed (offline)",
        "List the registered backbones, whether their pretrained weights are "
        "installed here (no network needed) and where they come from; any other timm "
        "name needs the hub.",
        _args_backbones,
        cmd_backbones,
    ),
    Command(
        "show-batch",
        "a grid of log-mel spectrograms with their labels (PNG)",
        "Draw a random sample of a dataset's clips as log-mel "
        "spectrograms (time in s, frequency in Hz on the mel scale) with their labels.",
        _args_show_batch,
        cmd_show_batch,
    ),
    Command(
        "report",
        "interpretation plots and a self-contained report.html for a run",
        "Write a run's (or cv folder's) plots as PNGs: history, "
        "learning-rate schedule, confusion matrix, per-class scores, top losses, "
        "t-SNE of embeddings; then RUN/report.html, one file with every image and "
        "the top-loss clips' audio embedded.",
        _args_report,
        cmd_report,
    ),
    Command(
        "learning-curve",
        "do I have enough clips? accuracy against clips per class",
        "Accuracy on a grouped held-out fifth against 1, 2, 4, 8... training clips "
        "per class (3 splits), a power-law fit extrapolated to twice the clips, and "
        "per-class recall naming the classes that would gain most from more clips. "
        "Fast recipe: a logistic-regression probe on the pretrained backbone's "
        "embeddings. Writes OUT/learning_curve.png and CSVs.",
        _args_learning_curve,
        cmd_learning_curve,
    ),
    Command(
        "index",
        "index hours of unlabelled audio for search by example",
        "Cut every file (any length, read in blocks) into windows of the backbone's "
        "clip length at a hop of half of it, embed each with the audio-pretrained "
        "backbone (aisfx) or a trained --model, and store them in OUT (SQLite + a "
        "vector file). Incremental (only new or changed files are embedded) and "
        "resumable after any interruption (a file is committed whole or not at all).",
        _args_index,
        cmd_index,
    ),
    Command(
        "search",
        "the windows of an index nearest to a clip, a stretch or a label",
        "Exact cosine search on standardised embeddings: QUERY is a clip, or a file "
        "with --start/--end, or --label LABEL (the centroid of its labelled windows). "
        "Prints file, start, end, distance of the --top nearest windows.",
        _args_search,
        cmd_search,
    ),
    Command(
        "label",
        "a local page to search an index and label what it finds",
        "Serve a page: query by upload or by a window, listen to each hit and see its "
        "spectrogram, mark it 'is LABEL' / 'is not' / skip (keys y, n, s, u to undo); "
        "every click is committed to the index at once. Train a head per label and "
        "get suggestions of what to label next. Loopback only unless --host; any "
        "other host needs the token printed at start.",
        _args_label,
        cmd_label,
    ),
    Command(
        "fit-labels",
        "fit a linear head per label on an index's labelled windows",
        "Logistic regression on the standardised embeddings of each label's windows, "
        "cross-validated accuracy and average precision per label, and scores of every "
        "window (kept in INDEX/scores.npz for suggest).",
        _args_fit_labels,
        cmd_fit_labels,
    ),
    Command(
        "suggest",
        "windows of an index to label next",
        "Windows not yet labelled for LABEL: the least certain ones, spread out "
        "(margin), the highest scored (top), or random.",
        _args_suggest,
        cmd_suggest,
    ),
    Command(
        "export-labels",
        "write an index's labelled windows as a dataset to train on",
        "One WAV per window labelled 'is LABEL' and OUT/labels.csv (path, label, group, "
        "file, onset, offset), which `soundsight train OUT --layout csv --csv "
        "labels.csv` reads.",
        _args_export_labels,
        cmd_export_labels,
    ),
)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The ``soundsight`` parser. With ``only``, only that command's arguments are
    added (the others are listed by name and help): ``soundsight --help`` then needs
    none of the imports that building every command's arguments would pull in."""
    parser = argparse.ArgumentParser(
        prog="soundsight",
        description="Classify sounds by fine-tuning pretrained CNNs on log-mel spectrograms.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        sub = commands.add_parser(command.name, help=command.help, description=command.description)
        if only is None or only == command.name:
            command.arguments(sub)
            sub.set_defaults(func=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(only=command).parse_args(argv)
    # Lightning's start-up banners (accelerator lists, tips) drown the epoch table.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
    try:
        return args.func(args)
    except SoundsightError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # files: not found, not readable, disk full
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

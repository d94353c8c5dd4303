"""The ``soundsight`` command: a thin shell over the Python API."""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import fields

from .audio import AudioError
from .cache import CacheError, prepare
from .features import FeatureConfig
from .images import export_images
from .layouts import LAYOUTS, DatasetError, load_dataset


def _add_dataset_args(parser: argparse.ArgumentParser) -> None:
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


def _dataset(args: argparse.Namespace, split: str | None = None):
    options = {}
    if args.layout == "regex":
        options = {"label_regex": args.label_regex, "group_regex": args.group_regex}
    elif args.layout == "csv":
        options = {
            "csv": args.csv,
            "path_column": args.path_column,
            "label_column": args.label_column,
        }
    return load_dataset(args.data, args.layout, split or args.split, **options)


def _add_feature_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("log-mel features")
    defaults = FeatureConfig()
    for spec in fields(FeatureConfig):
        default = getattr(defaults, spec.name)
        kind = float if spec.name in ("fmin", "fmax", "top_db") else int
        group.add_argument(
            f"--{spec.name.replace('_', '-')}",
            type=kind,
            default=default,
            help=f"(default: {default})",
        )


def _features(args: argparse.Namespace) -> FeatureConfig:
    return FeatureConfig(**{f.name: getattr(args, f.name) for f in fields(FeatureConfig)})


def _add_workers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: one per CPU core; 0 = none)",
    )


def cmd_prepare(args: argparse.Namespace) -> int:
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
    report = export_images(
        _dataset(args), args.out, _features(args), args.size, args.cmap, args.workers
    )
    print(report.summary("exported"))
    if report.failed:
        print(f"{report.failed} clips failed; see {args.out}/failures.csv", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="soundsight",
        description="Classify sounds by fine-tuning ImageNet CNNs on log-mel spectrograms.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser(
        "prepare",
        help="decode and featurise a dataset into a cache",
        description="Decode every clip once, compute log-mel features in "
        "parallel and store them in a resumable, crash-safe cache.",
    )
    _add_dataset_args(p)
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--shard", default="0/1", help="do only shard i of n, as 'i/n' (default 0/1)")
    _add_feature_args(p)
    _add_workers(p)
    p.set_defaults(func=cmd_prepare)

    p = commands.add_parser(
        "export-images",
        help="write one colour-mapped log-mel PNG per clip",
        description="Write a PNG spectrogram per clip, like the blog "
        "recipe's images, resumably (existing PNGs are kept).",
    )
    _add_dataset_args(p)
    p.add_argument("--out", required=True, help="output folder (one sub-folder per label)")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default 224)")
    p.add_argument("--cmap", default="magma", help="matplotlib colour map (default magma)")
    _add_feature_args(p)
    _add_workers(p)
    p.set_defaults(func=cmd_export_images)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
    try:
        return args.func(args)
    except (DatasetError, AudioError, CacheError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

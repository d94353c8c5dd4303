"""Issue-19 figure: does choosing the fusion weight on a noisy copy of the validation
clips (``soundsight fuse --noise``) keep a fused model's accuracy in noise?

FSDD (official split) against ESC-50 fold 2's ambience, split by source recording into
a validation half and a test half as in ``bench_noise.py``. On FSDD's training side:
``train`` (Lite0, the default recipe) and an aisfx frozen head (``train_frozen``), both
holding out the same grouped 20%; then ``fuse`` twice, the weight chosen on that 20%
as it is, and on it plus a copy heard in the validation-half ambience
(``noise=``, -6..+12 dB). All four models are scored on FSDD's test side as it is and
mixed with the test-half ambience at ``--snr`` dB (``bench_noise.noisy_copy``).

Run on demand::

    python benchmarks/bench_fuse_noise.py --work DIR [--snr 0]

Results go to benchmarks/results/fuse_noise.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

from bench_fuse import accuracy
from bench_noise import ambience_halves, noisy_copy
from machine import measured_line, run_record

import soundsight as ss
from soundsight.files import write_whole
from soundsight.frozen import FrozenClassifier, fuse, held_out_side, train_frozen

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", type=float, default=0.0, help="test mixtures' ratio, dB")
    parser.add_argument("--work", required=True, help="folder for the runs and the cache")
    args = parser.parse_args()
    meta = run_record()
    work = Path(args.work)
    cache = work / "cache"
    train_side = ss.load_dataset(DATASETS / "fsdd", split="train")
    test_side = ss.load_dataset(DATASETS / "fsdd", split="test")
    valid_noise, test_noise = ambience_halves()
    noisy_test = noisy_copy(test_side, test_noise, args.snr, work / f"noisy{args.snr:g}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = ss.train(train_side, work / "network", cache=cache, progress=False).model_path
    head = train_frozen(train_side, work / "head", "aisfx", cache=cache, progress=False).model_path
    valid = held_out_side(train_side, network, head)
    models = {"Lite0 fine-tuned (default recipe)": network, "aisfx frozen": head}
    for name, folder, noise in (
        ("fuse, clean validation", "fused-clean", None),
        ("fuse --noise (validation + its noisy copy)", "fused-noisy", valid_noise),
    ):
        models[name] = fuse(
            network, head, work / folder, valid=valid, cache=cache, progress=False, noise=noise
        ).model_path
    rows = []
    for name, model in models.items():
        row = {
            "model": name,
            "clean": accuracy(model, test_side, cache),
            "noisy": accuracy(model, noisy_test, cache),
        }
        if name.startswith("fuse"):
            row["weight"] = FrozenClassifier.load(model).spec.weight
        rows.append(row)
        print(row, flush=True)
    meta["load_average_at_end"] = os.getloadavg()[0]
    record = {
        "meta": meta,
        "snr_db": args.snr,
        "valid_clips": len(valid),
        "valid_noise_clips": len(valid_noise),
        "test_noise_clips": len(test_noise),
        "test_clips": len(test_side),
        "rows": rows,
    }
    text = json.dumps(record, indent=2)
    write_whole(RESULTS / "fuse_noise.json", lambda f: f.write(text.encode()))
    lines = [
        f"{measured_line(meta)} FSDD official split; fusion weight chosen on the grouped "
        f"{len(valid)} clips held out of the training side; test side {len(test_side)} clips, "
        f"as they are and in ESC ambience at {args.snr:g} dB.",
        "",
        f"| model | clean | ambience at {args.snr:g} dB | frozen head's weight |",
        "|---|---|---|---|",
    ]
    for row in rows:
        weight = f"{row['weight']:.2f}" if "weight" in row else ""
        lines.append(
            f"| {row['model']} | {100 * row['clean']:.2f}% | {100 * row['noisy']:.2f}% | {weight} |"
        )
    table = "\n".join(lines) + "\n"
    write_whole(RESULTS / "fuse_noise.md", lambda f: f.write(table.encode()))
    print(table)


if __name__ == "__main__":
    main()

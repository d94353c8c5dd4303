"""Issue-19 figure: does training with background noise (``train --noise``) keep a
model's accuracy when its test clips are heard in noise?

FSDD (spoken digits, official split) against ESC-50 fold 2's ambience (rain, wind,
crickets, sea waves, ...). The ambience clips are split by source recording into two
halves that share no recording: one is the training noise, the other the test noise.
Three models are trained on FSDD's training side with the default recipe: one without
noise (``background_noise=False``), one as the recipe comes (FSDD has no background
clips, so its clips' own quiet stretches are the noise), and one with ``noise=`` the
training half (the recipe's noise share and ratios). All are scored on FSDD's test
side as it is and with each clip mixed (waveforms summed) with a random stretch of a
test-half recording at ``--snr`` dB event-to-background (the clip's energy over the
noise's, over the clip's length).

Run on demand::

    python benchmarks/bench_noise.py [--snr 0] [--work DIR]

Results go to benchmarks/results/noise.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import soundfile as sf
from machine import measured_line, run_record

import soundsight as ss
from soundsight.audio import load_clip
from soundsight.config import TrainConfig
from soundsight.files import write_whole
from soundsight.prediction import evaluate
from soundsight.training import train

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RESULTS = Path(__file__).resolve().parent / "results"
#: ESC-50 classes that are ambience rather than events.
AMBIENCE = (
    "rain",
    "wind",
    "crickets",
    "sea_waves",
    "crackling_fire",
    "insects",
    "thunderstorm",
    "chirping_birds",
    "water_drops",
    "pouring_water",
)
RATE = 8000  # FSDD's


def ambience_halves() -> tuple[list[str], list[str]]:
    """ESC ambience clips, split by source recording into training and test noise."""
    esc = ss.load_dataset(DATASETS / "esc50-fold2")
    ambience = esc[esc["label"].isin(AMBIENCE)]
    sources = sorted(ambience["group"].unique())
    test_sources = set(sources[1::2])
    test = ambience["group"].isin(test_sources)
    return ambience[~test]["path"].tolist(), ambience[test]["path"].tolist()


def noisy_copy(clips: pd.DataFrame, noise: list[str], snr_db: float, folder: Path) -> pd.DataFrame:
    """Each clip mixed with a random stretch of a random noise recording at ``snr_db``."""
    rng = np.random.default_rng(0)
    waves = [load_clip(path, RATE) for path in noise]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for path in clips["path"]:
        clip = load_clip(path, RATE)
        source = waves[rng.integers(len(waves))]
        start = rng.integers(0, max(1, len(source) - len(clip)))
        stretch = np.resize(source[start:], len(clip))  # repeated if the clip is longer
        gain = np.sqrt(np.sum(clip**2) / max(np.sum(stretch**2), 1e-12) * 10 ** (-snr_db / 10))
        mixed = clip + gain * stretch
        mixed /= max(1.0, float(np.abs(mixed).max()))  # no clipping; the ratio stays
        out = folder / Path(path).name
        sf.write(out, mixed.astype(np.float32), RATE, subtype="FLOAT")
        paths.append(str(out))
    return clips.assign(path=paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--snr", type=float, default=0.0, help="test mixtures' ratio, dB")
    parser.add_argument("--work", help="folder for runs and caches (default: a temp folder)")
    args = parser.parse_args()
    meta = run_record()
    train_side = ss.load_dataset(DATASETS / "fsdd", split="train")
    test_side = ss.load_dataset(DATASETS / "fsdd", split="test")
    train_noise, test_noise = ambience_halves()
    config = TrainConfig()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        cache = work / "cache"
        noisy = noisy_copy(test_side, test_noise, args.snr, work / f"noisy{args.snr:g}")
        for name, noise, own in (
            ("no noise (--no-background-noise)", None, False),
            ("default recipe (its clips' quiet stretches)", None, True),
            ("default recipe + --noise", train_noise, True),
        ):
            started = time.perf_counter()
            run = work / ("noise" if noise else "quiet" if own else "clean")
            recipe = TrainConfig(background_noise=own)
            result = train(train_side, run, config=recipe, cache=cache, progress=False, noise=noise)
            seconds = time.perf_counter() - started
            scores = {
                side: float(
                    evaluate(result.model_path, table, cache=cache, progress=False)[0]["accuracy"]
                )
                for side, table in (("clean", test_side), ("noisy", noisy))
            }
            rows.append({"model": name, "train_seconds": seconds, **scores})
    meta["load_average_at_end"] = os.getloadavg()[0]
    record = {
        "meta": meta,
        "snr_db": args.snr,
        "recipe": {
            "noise_probability": config.noise_probability,
            "noise_snr_db": [config.noise_snr_min, config.noise_snr_max],
        },
        "train_noise_clips": len(train_noise),
        "test_noise_clips": len(test_noise),
        "test_clips": len(test_side),
        "rows": rows,
    }
    text = json.dumps(record, indent=2)
    write_whole(RESULTS / "noise.json", lambda f: f.write(text.encode()))
    drops = [row["clean"] - row["noisy"] for row in rows]
    lines = [
        f"{measured_line(meta)} FSDD official "
        f"split; test side ({len(test_side)} clips) clean and mixed with ESC ambience at "
        f"{args.snr:g} dB ({len(test_noise)} test-noise clips; training noise: the other "
        f"{len(train_noise)}, no recording shared).",
        "",
        "| model | clean | in noise | drop | trained in |",
        "|---|---|---|---|---|",
        *(
            f"| {row['model']} | {100 * row['clean']:.2f}% | {100 * row['noisy']:.2f}% | "
            f"{100 * drop:.2f} points | {row['train_seconds']:.0f} s |"
            for row, drop in zip(rows, drops, strict=True)
        ),
        "",
        *(
            f"{row['model']}: drop / the drop without noise {drop / max(drops[0], 1e-9):.2f} "
            f"(goal <= 0.5); clean accuracy {100 * (row['clean'] - rows[0]['clean']):+.2f} "
            "points."
            for row, drop in zip(rows[1:], drops[1:], strict=True)
        ),
    ]
    write_whole(RESULTS / "noise.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

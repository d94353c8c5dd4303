"""Benchmark: search by example and labelling (issue #18).

1. Retrieval: every ESC-50 fold-2 clip is a file of one index (aisfx, and the ImageNet
   EfficientNet-Lite0 as the baseline, both with 2.32-s windows at half-window hops).
   Each clip's stored windows are the query; files are ranked by their best window
   (window search) and as one vector each (``search --per-file``), the query's own
   ``src_file`` left out; precision@10 is the share of the ten first files of the
   query's class (ESC fold 2 has 8 clips per class: the ceiling, with
   ``src_file`` mates left out, is reported beside it).
2. Simulated user: ESC fold 2 plus FSDD (30 clips per digit) in one index; for each of
   10 classes (7 ESC categories, 3 digits) the user gives one example clip (all its
   windows labelled "is"), then labels 10 windows per round for 8 rounds, answering as
   the windows' source files' labels say, with the windows picked by ``top`` hits,
   ``margin`` (least certain, spread out) or ``random``. After each round the heads are
   trained (:func:`soundsight.labelling.train_heads`) and their average precision over
   the windows not labelled yet is recorded (positives: windows of the class's files).
   Curves of mean AP per round go to ``search_curves.png``.
3. Indexing a long recording (ESC clips end to end, ``--hours``, default 10) with
   ``soundsight index`` in its own process: times real time, peak RSS, index size per
   hour of audio.
4. Search latency (median of 20 queries, warm): on the retrieval index, the long
   recording's index, and an index of 1 M random 512-d vectors (exact numpy search,
   one thread).

``--quick`` shrinks each part (4 ESC classes, 5 classes, 3 rounds, a 1-minute recording,
100 k synthetic vectors) to check the script; its figures mean nothing.

    nice -n 19 python benchmarks/bench_search.py [--quick]

Writes ``benchmarks/results/search.json`` and ``.md`` (``search_quick.*``) and the
picture ``search_curves.png`` (``search_curves_quick.png``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from bench_predict_memory import long_recording, peak_rss_mb
from machine import REFERENCE_STEP_MS_THERE, cpu_model, reference_step_ms

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
ESC = DATA / "esc50-fold2"
RESULTS = ROOT / "benchmarks" / "results"
WINDOW = 2.32
ESC_CLASSES = ("dog", "rooster", "rain", "church_bells", "crying_baby", "chainsaw", "clock_tick")
DIGITS = ("0", "3", "7")
STRATEGIES = ("top", "margin", "random")


def esc_meta(quick: bool) -> pd.DataFrame:
    meta = pd.read_csv(ESC / "meta" / "esc50.csv")
    if quick:  # 4 classes, all their clips
        meta = meta[meta["category"].isin(["dog", "rooster", "rain", "clock_tick"])]
    meta = meta.assign(path=[str((ESC / "audio" / f).resolve()) for f in meta["filename"]])
    return meta.reset_index(drop=True)


def fsdd_clips(per_digit: int) -> pd.DataFrame:
    rows = []
    for digit in DIGITS:
        paths = sorted((DATA / "fsdd" / "recordings").glob(f"{digit}_*.wav"))[:per_digit]
        rows += [(str(p.resolve()), digit) for p in paths]
    return pd.DataFrame(rows, columns=["path", "label"])


def precision_at_10(folder: Path, meta: pd.DataFrame) -> dict:
    """Precision@10 over distinct files, two ways: files ranked by their best window
    (window search, :func:`~soundsight.search.clip_query` of the stored windows) and by
    :func:`~soundsight.search.nearest_files` (``search --per-file``)."""
    from soundsight.search import Index, clip_query, nearest_files

    index = Index(folder)
    files = index.files().merge(meta, on="path")
    files = files.sort_values("first_row").reset_index(drop=True)
    firsts = files["first_row"].to_numpy()
    same_source = files["src_file"].to_numpy()
    category = files["category"].to_numpy()
    by_window, by_file, ceilings = [], [], []
    for i, row in files.iterrows():
        query = clip_query(index, row.path)
        per_window = np.maximum.reduceat(index.similarities(query.vector), firsts)
        per_window[same_source == row.src_file] = -np.inf
        best = np.argsort(-per_window)[:10]
        by_window.append(float((category[best] == row.category).mean()))
        ranked = nearest_files(index, query, top=len(files)).merge(
            files[["path", "src_file", "category"]], left_on="file", right_on="path"
        )
        ranked = ranked[ranked["src_file"] != row.src_file].head(10)
        by_file.append(float((ranked["category"] == row.category).mean()))
        others = int(((category == row.category) & (same_source != row.src_file)).sum())
        ceilings.append(min(10, others) / 10)
        del i
    index.close()
    return {
        "queries": len(by_window),
        "precision_at_10": round(statistics.mean(by_window), 4),
        "precision_at_10_per_file": round(statistics.mean(by_file), 4),
        "ceiling": round(statistics.mean(ceilings), 4),
    }


def simulate(folder: Path, truth: dict[str, str], classes: list[str], rounds: int) -> dict:
    """AP per round per strategy (mean over classes), the oracle answering by file."""
    from sklearn.metrics import average_precision_score

    from soundsight.labelling import suggest, train_heads
    from soundsight.search import Index

    index = Index(folder)
    windows = index.windows(np.flatnonzero(index.live()))
    window_class = windows["file"].map(truth).to_numpy()
    rng = np.random.default_rng(0)
    curves: dict[str, list[list[float]]] = {s: [] for s in STRATEGIES}
    for label in classes:
        files = sorted(f for f, c in truth.items() if c == label)
        seed_file = files[int(rng.integers(len(files)))]
        target = window_class == label
        for strategy in STRATEGIES:
            with index.db:
                index.db.execute("DELETE FROM labels")
                index.db.execute("DELETE FROM label_events")
            for row in index.rows_of(seed_file)["row"]:
                index.label(int(row), label, "yes")
            aps = []
            for round_no in range(rounds + 1):
                heads = train_heads(index, seed=round_no, save=False)
                scores = heads.scores[windows["row"].to_numpy(), heads.labels.index(label)]
                # Over the windows not yet labelled: what the user has yet to find.
                unseen = ~windows["row"].isin(index.seen(label)).to_numpy()
                # (NaN once every positive is labelled: nothing left to find.)
                left = target[unseen]
                aps.append(
                    float(average_precision_score(left, scores[unseen])) if left.any() else np.nan
                )
                if round_no == rounds:
                    break
                picks = suggest(index, label, 10, strategy, seed=round_no, heads=heads)
                for row, file in zip(picks["row"], picks["file"], strict=True):
                    index.label(int(row), label, "yes" if truth[file] == label else "no")
            curves[strategy].append(aps)
    index.close()
    return {
        s: [round(float(v), 4) for v in np.nanmean(np.array(c), axis=0)] for s, c in curves.items()
    }


def draw(curves: dict, classes: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for strategy, values in curves.items():
        axes.plot(range(len(values)), values, marker="o", label=strategy)
    axes.set_xlabel("round (10 labels each; round 0: the one example clip)")
    axes.set_ylabel("mean AP over the windows not labelled yet")
    axes.set_title(f"simulated labelling, {classes} classes (ESC-50 fold 2 + FSDD)")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend()
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def latency_ms(folder: Path, queries: int = 20) -> float:
    from soundsight.search import Index, Query, nearest

    index = Index(folder)
    rng = np.random.default_rng(1)
    nearest(index, Query(index.standardised(index.vectors()[:1])[0], "warm-up"), 20)
    times = []
    for _ in range(queries):
        row = int(rng.integers(index.count))
        query = Query(index.standardised(index.vectors()[row : row + 1])[0], "bench")
        started = time.perf_counter()
        nearest(index, query, 20)
        times.append((time.perf_counter() - started) * 1000)
    index.close()
    return round(statistics.median(times), 1)


def synthetic_index(folder: Path, count: int) -> Path:
    """An index of ``count`` random 512-d vectors (one fake file), written through the
    index's own writer."""
    from soundsight.search import Embedder, Index, _Writer

    if folder.exists():
        shutil.rmtree(folder)
    embedder = Embedder("backbone", "aisfx", "aisfx", "", 512, 2.32, 1.16)
    index = Index.create(folder, embedder)
    writer = _Writer(index)
    rng = np.random.default_rng(2)

    def windows():
        for start in range(0, count, 4096):
            block = rng.standard_normal((min(4096, count - start), 512), dtype=np.float32)
            for i, vector in enumerate(block):
                yield (start + i) * 1.16, (start + i) * 1.16 + 2.32, vector

    writer.add("/synthetic.wav", 0, 0, count * 1.16, windows())
    writer.close()
    index.stats()  # computed once per index state (not part of a query)
    index.close()
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small version (checks the script)")
    parser.add_argument("--work", default="/tmp/bench_search")
    parser.add_argument(
        "--hours", type=float, default=10.0, help="length of the recording indexed (default 10)"
    )
    args = parser.parse_args()
    import torch

    from soundsight.search import build_index

    torch.set_num_threads(1)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = dt.datetime.now(dt.UTC)
    load_start = os.getloadavg()[0]
    results: dict = {
        "started": started.isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} x {cpu_model()}",
        "load_at_start": round(load_start, 2),
        "quick": args.quick,
        "reference_step_ms": round(reference_step_ms(3 if args.quick else 10), 1),
    }
    print(results, flush=True)

    # 1. retrieval
    meta = esc_meta(args.quick)
    retrieval = {}
    for backbone in ("aisfx", "tf_efficientnet_lite0"):
        folder = work / f"esc-{backbone}"
        shutil.rmtree(folder, ignore_errors=True)  # timed from scratch
        report = build_index(
            list(meta["path"]), folder, backbone=backbone, window_seconds=WINDOW, progress=False
        )
        retrieval[backbone] = precision_at_10(folder, meta)
        retrieval[backbone]["index_s"] = round(report.elapsed, 1)
        print(backbone, retrieval[backbone], flush=True)
    results["retrieval"] = retrieval

    # 2. simulated user
    digits = fsdd_clips(8 if args.quick else 30)
    folder = work / "mixed"  # the aisfx ESC index, with the digits added (incremental)
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(work / "esc-aisfx", folder)
    build_index(list(digits["path"]), folder, window_seconds=WINDOW, progress=False)
    truth = dict(zip(meta["path"], meta["category"], strict=True))
    truth |= dict(zip(digits["path"], digits["label"], strict=True))
    classes = list(ESC_CLASSES if not args.quick else ("dog", "rooster")) + list(DIGITS)
    rounds = 3 if args.quick else 8
    curves = simulate(folder, truth, classes, rounds)
    results["simulated_user"] = {"classes": classes, "rounds": rounds, "mean_ap": curves}
    print(results["simulated_user"], flush=True)
    suffix = "_quick" if args.quick else ""
    draw(curves, len(classes), RESULTS / f"search_curves{suffix}.png")

    # 3. indexing throughput and memory, in its own process
    minutes = 1 if args.quick else round(args.hours * 60)
    recording = long_recording(work / f"long-{minutes}min.flac", minutes)
    target = work / "long-index"
    if target.exists():
        shutil.rmtree(target)
    command = [
        sys.executable,
        "-m",
        "soundsight.cli",
        "index",
        str(recording),
        "--out",
        str(target),
    ]
    rss, wall, status = peak_rss_mb(command)
    size = sum(p.stat().st_size for p in target.iterdir() if p.is_file())
    results["indexing"] = {
        "audio_minutes": minutes,
        "wall_s": round(wall, 1),
        "times_real_time": round(minutes * 60 / wall, 1),
        "peak_rss_mb": round(rss),
        "index_mb_per_hour": round(size / 1e6 / (minutes / 60), 2),
        "exit_status": status,
    }
    print(results["indexing"], flush=True)

    # 4. latency
    synthetic = 100_000 if args.quick else 1_000_000
    results["search_latency_ms"] = {
        "retrieval_index": latency_ms(work / "esc-aisfx"),
        "long_recording_index": latency_ms(target),
        f"synthetic_{synthetic}": latency_ms(synthetic_index(work / "synthetic", synthetic)),
    }
    print(results["search_latency_ms"], flush=True)
    results["load_at_end"] = round(os.getloadavg()[0], 2)
    (RESULTS / f"search{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / f"search{suffix}.md").write_text(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = [
        f"Measured {results['started']} on {results['machine']}, load "
        f"{results['load_at_start']} at the start and {results['load_at_end']} at the end"
        + (
            " (--quick: the figures check the script, they mean nothing)"
            if results["quick"]
            else ""
        )
        + f"; reference step {results['reference_step_ms']} ms ({REFERENCE_STEP_MS_THERE} ms "
        "where the goals were set: scale the goals' times by the ratio)",
        "",
        "| retrieval, ESC-50 fold 2 | precision@10, files by best window | "
        "per file (search --per-file) | ceiling | index s |",
        "|---|---|---|---|---|",
    ]
    for name, row in results["retrieval"].items():
        lines.append(
            f"| {name} ({row['queries']} queries) | {row['precision_at_10']} | "
            f"{row['precision_at_10_per_file']} | {row['ceiling']} | {row['index_s']} |"
        )
    sim = results["simulated_user"]
    lines += [
        "",
        "| strategy | " + " | ".join(f"AP round {i}" for i in range(sim["rounds"] + 1)) + " |",
    ]
    lines.append("|---" * (sim["rounds"] + 2) + "|")
    for strategy, values in sim["mean_ap"].items():
        lines.append(f"| {strategy} | " + " | ".join(f"{v:.3f}" for v in values) + " |")
    ix = results["indexing"]
    lines += [
        "",
        f"Indexing {ix['audio_minutes']} min of audio: {ix['wall_s']} s ({ix['times_real_time']}x "
        f"real time), peak RSS {ix['peak_rss_mb']} MB, {ix['index_mb_per_hour']} MB of index "
        "per hour of audio.",
        "",
        "Search latency (median of 20, ms): "
        + ", ".join(f"{k} {v}" for k, v in results["search_latency_ms"].items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

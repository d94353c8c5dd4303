"""Benchmark: peak memory of ``soundsight predict`` on long recordings (issue #11).

Builds recordings of 5, 20 and 60 minutes (and 3 hours with ``--hours 3``) from the
real ESC-50 clips in ../shared/datasets, 44.1 kHz FLAC, written block by block; runs
``soundsight predict MODEL FILE`` on each in its own process and reads that process's
peak resident memory from the kernel (``wait4`` rusage). Goal: <= 1.2 GB on the 1-hour
file, and no growth with duration beyond a few minutes.

    python benchmarks/bench_predict_memory.py --model runs/fsdd/model.safetensors

Writes ``benchmarks/results/predict_memory.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import soundfile as sf
from machine import REFERENCE_STEP_MS_THERE, cpu_model, reference_step_ms

ROOT = Path(__file__).resolve().parents[1]
ESC = ROOT.parent / "shared" / "datasets" / "esc50-fold2" / "audio"
RESULTS = ROOT / "benchmarks" / "results"
GOAL_MB = 1200


def long_recording(path: Path, minutes: float) -> Path:
    """ESC-50 clips one after another until ``minutes`` are written (cached)."""
    if path.is_file() and sf.info(path).duration >= minutes * 60 - 1:
        return path
    clips = sorted(ESC.glob("*.flac"))
    target, written = int(minutes * 60 * 44100), 0
    tmp = path.with_suffix(".tmp.flac")
    with sf.SoundFile(tmp, "w", 44100, 1, format="FLAC") as out:
        while written < target:
            for clip in clips:
                samples = sf.read(clip, dtype="float32")[0][: target - written]
                out.write(samples)
                written += len(samples)
                if written >= target:
                    break
    tmp.replace(path)
    return path


#: Runs ``argv[1:]`` and prints its peak RSS (KB), wall seconds and exit status. A small
#: launcher because Linux carries the spawning process's peak RSS into the child's
#: ``ru_maxrss`` across ``exec`` (subprocess starts children with vfork, sharing the
#: parent's memory until then): spawned from a benchmark that has trained a model, a
#: 1.1-GB ``detect`` measured 1.8 GB. The launcher's own memory is a few MB.
_LAUNCHER = """
import os, subprocess, sys, time
started = time.perf_counter()
process = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=sys.stderr)
_, status, usage = os.wait4(process.pid, 0)
print(usage.ru_maxrss, time.perf_counter() - started, os.waitstatus_to_exitcode(status))
"""


def peak_rss_mb(command: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MB, wall seconds, exit status) of ``command`` in its own process,
    started by a small launcher process (:data:`_LAUNCHER`)."""
    # stderr (the progress bar) goes to a file: an unread pipe fills up on a long
    # recording and blocks the child.
    with tempfile.TemporaryFile() as log:
        done = subprocess.run(
            [sys.executable, "-c", _LAUNCHER, *command], stdout=subprocess.PIPE, stderr=log
        )
        log.seek(0)
        if done.returncode:  # the launcher itself failed: the command could not start
            tail = log.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"could not run {command[0]}: {tail}")
        rss_kb, wall, status = done.stdout.split()
        if int(status):
            print(log.read().decode(errors="replace")[-2000:], file=sys.stderr)
    return int(rss_kb) / 1024, float(wall), int(status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "runs" / "fsdd" / "model.safetensors"))
    parser.add_argument("--work", default="/tmp/soundsight-bench-memory")
    parser.add_argument("--hours", type=float, default=1.0, help="longest recording")
    args = parser.parse_args()
    if not Path(args.model).is_file():
        sys.exit(f"model file not found: {args.model} (make run writes runs/fsdd/...)")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    reference = reference_step_ms()
    print(
        f"{os.cpu_count()} x {cpu_model()}, load {load_start:.2f}, reference step "
        f"{reference:.0f} ms (201 ms where the goals were set)",
        flush=True,
    )
    rows = []
    for minutes in sorted({5.0, 20.0, 60.0, args.hours * 60}):
        clip = long_recording(work / f"long_{minutes:g}min.flac", minutes)
        command = [sys.executable, "-m", "soundsight.cli", "predict", args.model, str(clip)]
        rss, wall, code = peak_rss_mb(command)
        rows.append(
            {
                "minutes": minutes,
                "peak_rss_mb": round(rss, 1),
                "wall_s": round(wall, 1),
                "exit": code,
                "x_real_time": round(minutes * 60 / wall, 1),
            }
        )
        print(rows[-1], flush=True)
    one_hour = next(r for r in rows if r["minutes"] == 60.0)
    results = {
        "machine": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
            "reference_step_ms": round(reference, 1),
            "reference_step_ms_there": REFERENCE_STEP_MS_THERE,
        },
        "model": args.model,
        "rows": rows,
        "goal": {
            "one_hour_peak_rss_mb": GOAL_MB,
            "passed": one_hour["peak_rss_mb"] <= GOAL_MB and one_hour["exit"] == 0,
        },
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "predict_memory.json").write_text(json.dumps(results, indent=2))
    lines = [
        f"{results['machine']['date']}, {os.cpu_count()} x {cpu_model()}, load average "
        f"{load_start:.2f} at start; reference step {reference:.0f} ms (201 ms where the "
        "goals were set)",
        "",
        "| recording | peak RSS | wall | x real time | exit |",
        "|---:|---:|---:|---:|---:|",
        *[
            f"| {r['minutes']:g} min | {r['peak_rss_mb']:.0f} MB | {r['wall_s']:.1f} s | "
            f"{r['x_real_time']:.0f}x | {r['exit']} |"
            for r in rows
        ],
        "",
        f"goal: peak RSS on 1 hour <= {GOAL_MB} MB: "
        f"{'PASS' if results['goal']['passed'] else 'FAIL'}",
    ]
    (RESULTS / "predict_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

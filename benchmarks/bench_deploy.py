"""Benchmark: the torch path against the exported ONNX model, fp32 and int8 (issue #13).

Run on a quiet machine with a trained model file::

    python benchmarks/bench_deploy.py --model runs/fsdd/model.safetensors \
        [--esc-model runs/esc/model.safetensors] [--venv /tmp/soundsight-runtime]

It exports MODEL (``soundsight export``: fp32, and int8 static calibrated on clips of
the model's training side, kept whatever its accuracy so that it can be measured), then
measures side by side, as the issue's table asks:

1. one 5-s 44.1 kHz ESC-50 clip, warm: median ms of ``predict(path)`` in each runtime;
2. ``soundsight predict`` over the 414 ESC-50 clips, whole process with its start-up;
3. ``soundsight serve``: requests per second with 8 clients (bench_serve's clients);
4. the runtime install: a fresh venv with the base install only (``--venv``, made when
   missing), its site-packages in MB (pip and setuptools left out) and whether torch
   imports there;
5. process start to first prediction (``soundsight predict MODEL one.wav``), each
   runtime, and from the runtime venv;
6. top-1 agreement with torch and accuracy on FSDD's test side (and on the ESC-50
   fold-2 model's validation clips with ``--esc-model``).

``--quick`` runs every part small (a few clips and requests, no venv unless given), to
check the script; its figures mean nothing. Writes ``benchmarks/results/deploy.json``
and ``deploy.md`` (into ``--work`` with ``--quick``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from bench_serve import Bench, free_port, start_server, wait_ready
from machine import REFERENCE_STEP_MS_THERE, cpu_model, reference_step_ms

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
ESC_AUDIO = DATASETS / "esc50-fold2" / "audio"
RESULTS = ROOT / "benchmarks" / "results"
#: Pip's own tools in a venv: not part of the runtime.
VENV_TOOLS = ("pip", "setuptools", "pkg_resources", "_distutils_hack", "distutils-precedence")


def export_all(model: Path, work: Path, calibration_from: str | None) -> dict[str, Path]:
    """fp32 and int8 exports of ``model`` in ``work`` (kept between runs)."""
    from soundsight.export import export_onnx, quantize
    from soundsight.layouts import load_dataset
    from soundsight.modelfile import read_spec

    fp32, int8 = work / f"{model.parent.name}.onnx", work / f"{model.parent.name}-int8.onnx"
    if not fp32.is_file():
        export_onnx(model, fp32)
    if not int8.is_file():
        calibration = work / f"{model.parent.name}-calibration"
        if not calibration.is_dir():
            calibration.mkdir()
            clips = load_dataset(calibration_from or _dataset_of(model), split="train")["path"]
            for number, path in enumerate(clips.sample(64, random_state=0)):
                (calibration / f"{number}{Path(path).suffix}").symlink_to(path)
        read_spec(model)  # a bad model file fails here, before the long part
        quantize(model, fp32, int8, "static", calibration, force=True)
    return {"torch": model, "onnx": fp32, "int8": int8}


def _dataset_of(model: Path) -> str:
    """The data set a run trained on, from its clips.csv (its first clip's folder)."""
    first = (model.parent / "clips.csv").read_text().splitlines()[1].split(",")[0]
    for name in ("fsdd", "esc50-fold2"):
        if f"/{name}/" in first:
            return str(DATASETS / name)
    raise SystemExit(f"cannot tell the data set of {model}; pass --calibration-data")


def load(runtime: str, path: Path, threads: int):
    from soundsight.runtime import load_classifier

    return load_classifier(path, "torch" if runtime == "torch" else "onnx", threads)


def warm_clip_ms(models: dict[str, Path], clip: Path, repeats: int, threads: int) -> dict:
    """Median and p90 ms of ``predict(clip)`` (decode, resample, score), after warm-up."""
    out = {}
    for runtime, path in models.items():
        classifier = load(runtime, path, threads)
        for _ in range(3):
            classifier.predict(clip)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            classifier.predict(clip)
            times.append((time.perf_counter() - started) * 1000)
        times.sort()
        out[runtime] = {
            "median_ms": round(statistics.median(times), 2),
            "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
        }
    return out


def timed(command: list[str], env: dict | None = None) -> tuple[float, int]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, env=env, timeout=1800)
    if result.returncode:
        print(result.stderr.decode()[-2000:], file=sys.stderr)
    return time.perf_counter() - started, result.returncode


def soundsight(runtime: str, path: Path, *args: str) -> list[str]:
    runtime_flag = ["--runtime", "torch" if runtime == "torch" else "onnx"]
    return [sys.executable, "-m", "soundsight.cli", "predict", str(path), *args, *runtime_flag]


def predict_folder(models: dict[str, Path], folder: Path, clips: int, work: Path) -> dict:
    """Whole ``soundsight predict`` processes over ``folder`` (start-up included)."""
    out = {}
    for runtime, path in models.items():
        seconds, status = timed(
            soundsight(runtime, path, str(folder), "--out", str(work / "p.csv"))
        )
        out[runtime] = {"seconds": round(seconds, 2), "clips_per_s": round(clips / seconds, 1)}
        out[runtime]["exit"] = status
    return out


def first_prediction(models: dict[str, Path], clip: Path, work: Path, venv: Path | None) -> dict:
    """Seconds from process start to its first (only) prediction written."""
    out = {}
    for runtime, path in models.items():
        seconds, _ = timed(soundsight(runtime, path, str(clip), "--out", str(work / "one.csv")))
        out[runtime] = round(seconds, 2)
    if venv is not None:
        command = [str(venv / "bin" / "soundsight"), "predict", str(models["onnx"]), str(clip)]
        seconds, _ = timed([*command, "--out", str(work / "one.csv")], {"PATH": "/usr/bin:/bin"})
        out["onnx_runtime_venv"] = round(seconds, 2)
    return out


def serve_rps(models: dict[str, Path], clip: Path, requests: int, clients: int) -> dict:
    """Requests per second of ``soundsight serve`` with ``clients`` concurrent clients."""
    out = {}
    for runtime, path in models.items():
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        log = Path(tempfile.mkdtemp(prefix="bench_deploy_")) / "serve.log"
        flag = ["--runtime", "torch" if runtime == "torch" else "onnx"]
        server = start_server(path, port, log, flag)
        try:
            wait_ready(base, server, log)
            bench = Bench(base, clip, psutil.Process(server.pid), time.monotonic() + 600)
            bench.sequential(min(20, requests))
            result = bench.concurrent(requests, clients)
        finally:
            server.terminate()
            server.wait(15)
        out[runtime] = {
            "rps": result["throughput_rps"],
            "p50_ms": result["latency_ms"]["p50"],
            "cpu_s_per_request": result["server_cpu_s_per_request"],
            "errors": result["errors"],
        }
    return out


def runtime_venv(venv: Path, make: bool) -> dict | None:
    """The base install in ``venv`` (made with pip and the lock when missing): its size
    and whether torch imports there."""
    python = venv / "bin" / "python"
    if not python.is_file():
        if not make:
            return None
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        lock = ROOT / "requirements" / "lock.txt"
        install = [str(python), "-m", "pip", "install", "-q", "-c", str(lock), str(ROOT)]
        subprocess.run(install, check=True, timeout=3600)
    (site,) = venv.glob("lib/python*/site-packages")
    sizes = {"all": 0, "runtime": 0}
    for entry in site.iterdir():
        files = [entry] if entry.is_file() else [f for f in entry.rglob("*") if f.is_file()]
        size = sum(f.stat().st_size for f in files)
        sizes["all"] += size
        sizes["runtime"] += 0 if entry.name.startswith(VENV_TOOLS) else size
    torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode
    return {
        "path": str(venv),
        "site_packages_mb": round(sizes["runtime"] / 1e6, 1),
        "with_pip_setuptools_mb": round(sizes["all"] / 1e6, 1),
        "torch_importable": torch == 0,
    }


def agreement(models: dict[str, Path], paths: list[str], labels: list[str], threads: int) -> dict:
    """Top-1 accuracy of each runtime and the share of clips whose top-1 equals torch's."""
    tops = {}
    for runtime, path in models.items():
        frame, _ = load(runtime, path, threads).predict_files(paths, progress=False)
        classifier_labels = list(frame.columns[1:])
        best = frame[classifier_labels].to_numpy().argmax(axis=1)
        tops[runtime] = dict(zip(frame["path"], (classifier_labels[i] for i in best), strict=True))
    truth = dict(zip(paths, labels, strict=True))
    out = {"clips": len(paths)}
    for runtime, top in tops.items():
        out[runtime] = {
            "accuracy": round(100 * sum(top[p] == truth[p] for p in top) / len(paths), 2),
            "same_top1_as_torch": sum(top[p] == tops["torch"].get(p) for p in top),
        }
    return out


def markdown(results: dict) -> str:
    m, warm, whole = results["machine"], results["warm_clip"], results["predict_esc"]
    serve, start, venv = results["serve"], results["first_prediction"], results["runtime_venv"]
    rows = [
        "| figure | torch | ONNX fp32 | ONNX int8 | goal |",
        "|---|---|---|---|---|",
        "| predict one 5-s 44.1 kHz clip, warm, median (ms) | "
        + " | ".join(f"{warm[r]['median_ms']}" for r in ("torch", "onnx", "int8"))
        + " | <= 8 (fp32), <= 6 (int8) |",
        f"| `predict` over {results['esc_clips']} ESC clips, whole process (s) | "
        + " | ".join(f"{whole[r]['seconds']}" for r in ("torch", "onnx", "int8"))
        + " | <= 4 |",
        f"| serve, {results['clients']} clients (req/s) | "
        + " | ".join(f"{serve[r]['rps']}" for r in ("torch", "onnx", "int8"))
        + " | >= 100 |",
        "| process start to first prediction (s) | "
        + " | ".join(f"{start[r]}" for r in ("torch", "onnx", "int8"))
        + " | <= 1 |",
    ]
    if venv:
        rows.append(
            f"| runtime install, site-packages (MB) | — | {venv['site_packages_mb']} "
            f"(torch importable: {venv['torch_importable']}) | | <= 300 |"
        )
    for name, part in results["accuracy"].items():
        rows.append(
            f"| top-1 accuracy, {name} ({part['clips']} clips) | "
            + " | ".join(
                f"{part[r]['accuracy']}% (same top-1 as torch: {part[r]['same_top1_as_torch']})"
                for r in ("torch", "onnx", "int8")
            )
            + " | fp32 identical, int8 within 1 point |"
        )
    head = (
        f"# Deploy benchmark{' (quick: figures mean nothing)' if results['quick'] else ''}\n\n"
        f"{m['date']}, {m['cpus']} x {m['cpu']}, load {m['load_start']:.2f} -> "
        f"{m['load_end']:.2f}, reference step {m['reference_step_ms']} ms "
        f"({REFERENCE_STEP_MS_THERE:.0f} ms where the goals were set)\n\n"
    )
    return head + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="FSDD model.safetensors")
    parser.add_argument("--esc-model", type=Path, help="an ESC-50 fold-2 model, for accuracy")
    parser.add_argument("--calibration-data", help="data set whose train side calibrates int8")
    parser.add_argument("--venv", type=Path, help="runtime venv (made when missing)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/soundsight-bench-deploy"))
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="every part, small")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"model file not found: {args.model}")
    from soundsight.layouts import load_dataset

    args.work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()[0]
    reference = reference_step_ms(3 if args.quick else 10)
    models = export_all(args.model, args.work, args.calibration_data)
    esc = sorted(ESC_AUDIO.glob("*.flac"))
    folder = ESC_AUDIO
    if args.quick:
        esc = esc[:8]
        folder = args.work / "esc-quick"
        folder.mkdir(exist_ok=True)
        for clip in esc:
            if not (folder / clip.name).exists():
                (folder / clip.name).symlink_to(clip)
    print("warm clip", flush=True)
    warm = warm_clip_ms(models, esc[0], 5 if args.quick else 100, args.threads)
    print("predict over the ESC clips", flush=True)
    whole = predict_folder(models, folder, len(esc), args.work)
    print("first prediction", flush=True)
    venv = runtime_venv(args.venv, make=not args.quick) if args.venv else None
    start = first_prediction(models, esc[0], args.work, args.venv if venv else None)
    print("serve", flush=True)
    serve = serve_rps(models, esc[0], 16 if args.quick else 400, args.clients)
    print("accuracy", flush=True)
    fsdd = load_dataset(DATASETS / "fsdd", split="test")
    if args.quick:
        fsdd = fsdd.head(12)
    accuracy = {
        "FSDD test side": agreement(
            models, list(map(str, fsdd["path"])), list(fsdd["label"]), args.threads
        )
    }
    if args.esc_model:
        from soundsight.export import validation_clips

        paths, labels = validation_clips(args.esc_model)
        if args.quick:
            paths, labels = paths[:12], labels[:12]
        esc_models = export_all(args.esc_model, args.work, str(DATASETS / "esc50-fold2"))
        accuracy["ESC-50 fold-2 model, its validation clips"] = agreement(
            esc_models, paths, labels, args.threads
        )
    import onnxruntime
    import torch

    results = {
        "quick": args.quick,
        "model": str(args.model),
        "exports": {k: str(v) for k, v in models.items()},
        "threads": args.threads,
        "clients": args.clients,
        "esc_clips": len(esc),
        "machine": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
            "reference_step_ms": round(reference, 1),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
        },
        "warm_clip": warm,
        "predict_esc": whole,
        "serve": serve,
        "first_prediction": start,
        "runtime_venv": venv,
        "accuracy": accuracy,
    }
    # A quick run's figures mean nothing: they stay in the work folder.
    folder = args.work if args.quick else args.results
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "deploy.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (folder / "deploy.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

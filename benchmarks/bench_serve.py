"""Benchmark: ``soundsight serve`` latency, throughput and memory on loopback.

Run on demand with a trained model file (required; train one with ``soundsight train``)::

    python benchmarks/bench_serve.py --model runs/fsdd/model.safetensors

It starts ``soundsight serve MODEL`` in a subprocess on 127.0.0.1 (a free port), sends
one real 5-second clip from ``../shared/datasets/esc50-fold2`` (relative to the
repository root) as a multipart upload, as the page does, and measures:

1. latency of one client: ``--single`` sequential requests (default 200), p50 / p99;
2. throughput with ``--clients`` concurrent clients (default 8), ``--concurrent``
   requests in all (default 400), counting every non-200 answer or failure as an error;
3. the server's RSS (psutil) after the 100th and after the 1000th request: the
   difference must stay within 50 MB (requests past the first two phases are sent by
   the concurrent clients until 1000 in all have been answered).

Every loop is bounded in count, and the whole run in time (``--time-limit``, default
600 s); traffic goes to 127.0.0.1 only. Prints a summary and writes
``benchmarks/results/serve.json`` (every figure) and ``serve.md`` (a table).
The machine is shared: the load average and the server's own CPU seconds per request
are recorded beside the wall-clock figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from machine import cpu_model, reference_step_ms

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"
ESC_AUDIO = DATASETS / "esc50-fold2" / "audio"
RESULTS = REPO / "benchmarks" / "results"
#: Requests after which RSS is read, and the allowed growth between the two readings.
RSS_AT = (100, 1000)
RSS_GROWTH_LIMIT_MB = 50.0
WARMUP = 10


class Deadline(Exception):
    pass


class Bench:
    """Sends requests and counts them; RSS is read when the count reaches RSS_AT."""

    def __init__(self, base: str, clip: Path, process: psutil.Process, deadline: float):
        self.base, self.process, self.deadline = base, process, deadline
        self.data, self.name = clip.read_bytes(), clip.name
        self.sent = 0
        self.rss: dict[int, float] = {}
        # USS (memory only this process holds) beside RSS: most of the RSS is torch's
        # and its libraries' shared code pages.
        self.uss: dict[int, float] = {}
        self.lock = threading.Lock()

    def one(self, client: httpx.Client) -> tuple[float, bool, float | None]:
        """One request: (seconds, ok, server processing ms)."""
        if time.monotonic() > self.deadline:
            raise Deadline
        start = time.perf_counter()
        try:
            response = client.post(
                "/predict", files={"file": (self.name, self.data)}, params={"top_k": 5}
            )
            ok = response.status_code == 200
            processing = response.json()["processing_ms"] if ok else None
        except httpx.HTTPError:
            ok, processing = False, None
        elapsed = time.perf_counter() - start
        with self.lock:
            self.sent += 1
            if self.sent in RSS_AT:
                memory = self.process.memory_full_info()
                self.rss[self.sent] = memory.rss / 1e6
                self.uss[self.sent] = memory.uss / 1e6
        return elapsed, ok, processing

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=60.0)

    def sequential(self, count: int) -> dict:
        latencies, processing, errors = [], [], 0
        cpu = self.process.cpu_times()
        start = time.perf_counter()
        with self.client() as client:
            for _ in range(count):
                seconds, ok, server_ms = self.one(client)
                latencies.append(seconds)
                errors += not ok
                if server_ms is not None:
                    processing.append(server_ms)
        return summary(latencies, errors, time.perf_counter() - start, processing, cpu, self)

    def concurrent(self, count: int, clients: int) -> dict:
        shares = [count // clients + (i < count % clients) for i in range(clients)]
        cpu = self.process.cpu_times()

        def run(share: int):
            out = []
            with self.client() as client:
                for _ in range(share):
                    try:
                        out.append(self.one(client))
                    except Deadline:
                        break
            return out

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = [r for part in pool.map(run, shares) for r in part]
        wall = time.perf_counter() - start
        if len(results) < count:
            raise Deadline
        return summary(
            [r[0] for r in results],
            sum(not r[1] for r in results),
            wall,
            [r[2] for r in results if r[2] is not None],
            cpu,
            self,
        )


def summary(latencies, errors, wall, processing, cpu_before, bench: Bench) -> dict:
    cpu_after = bench.process.cpu_times()
    cpu = (cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system)
    ordered = sorted(latencies)
    return {
        "requests": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 2),
        "latency_ms": {
            "p50": round(1000 * percentile(ordered, 50), 2),
            "p90": round(1000 * percentile(ordered, 90), 2),
            "p99": round(1000 * percentile(ordered, 99), 2),
            "max": round(1000 * ordered[-1], 2),
            "mean": round(1000 * statistics.fmean(ordered), 2),
        },
        "server_processing_ms_p50": round(statistics.median(processing), 2) if processing else None,
        "server_cpu_s_per_request": round(cpu / len(latencies), 4),
    }


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: Path, port: int, log: Path, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "soundsight.cli", "serve", str(model)]
    command += ["--port", str(port), "--no-access-log", *extra]
    with open(log, "wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(base: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            response = httpx.get(f"{base}/health", timeout=2)
            if response.status_code == 200:
                return response.json()
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"server not ready in {timeout:.0f} s:\n{log.read_text()}")


def markdown(results: dict) -> str:
    m, single, conc, rss = (
        results["machine"],
        results["single"],
        results["concurrent"],
        results["rss"],
    )
    lines = [
        f"Benchmark `python benchmarks/bench_serve.py --model {results['model']}`, "
        f"{m['date']}, {m['cpus']} x {m['cpu']}, load average {m['load_start']:.2f} at start "
        f"and {m['load_end']:.2f} at the end (the machine is shared); reference step "
        f"{m['reference_step_ms']} ms (201 ms where the goals were set); "
        f"server: {results['server']['workers']} worker threads, torch 1 thread each, "
        f"queue {results['server']['capacity']}; client: httpx on 127.0.0.1.",
        "",
        f"Clip: `{results['clip']}` (5 s, 44.1 kHz FLAC, {results['clip_bytes'] / 1e3:.0f} kB), "
        "multipart upload, top 5 labels, no spectrogram image.",
        "",
        "| phase | requests | errors | p50 ms | p99 ms | mean ms | req/s "
        "| server ms p50 | server CPU s/req |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in (("1 client", single), (f"{results['clients']} clients", conc)):
        lat = r["latency_ms"]
        lines.append(
            f"| {label} | {r['requests']} | {r['errors']} | {lat['p50']:.1f} | {lat['p99']:.1f} "
            f"| {lat['mean']:.1f} | {r['throughput_rps']:.1f} | {r['server_processing_ms_p50']} "
            f"| {r['server_cpu_s_per_request']} |"
        )
    lines += [
        "",
        "| goal | measured | target | |",
        "|---|---:|---:|---|",
        f"| errors with {results['clients']} concurrent clients | {conc['errors']} | 0 "
        f"| {'PASS' if conc['errors'] == 0 else 'FAIL'} |",
        f"| RSS after {RSS_AT[1]} requests minus after {RSS_AT[0]} | {rss['growth_mb']:+.1f} MB "
        f"| <= {RSS_GROWTH_LIMIT_MB:.0f} MB | {'PASS' if rss['pass'] else 'FAIL'} |",
        "",
        f"Server RSS: {rss['after_100_mb']:.0f} MB after {RSS_AT[0]} requests, "
        f"{rss['after_1000_mb']:.0f} MB after {RSS_AT[1]} (USS, memory held by the server "
        f"alone: {rss['uss_after_100_mb']:.0f} MB and {rss['uss_after_1000_mb']:.0f} MB; the "
        "rest is shared library pages, mostly torch's).",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model.safetensors to serve")
    parser.add_argument("--clip", type=Path, help="5-s clip (default: first ESC-50 FLAC)")
    parser.add_argument("--single", type=int, default=200, help="single-client requests")
    parser.add_argument("--concurrent", type=int, default=400, help="requests, all clients")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--time-limit", type=float, default=600, help="whole run, seconds")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--server-arg", action="append", default=[], help="passed to serve")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"model file not found: {args.model}")
    clip = args.clip or sorted(ESC_AUDIO.glob("*.flac"))[0]
    total = WARMUP + args.single + args.concurrent
    if args.single + WARMUP < RSS_AT[0] or total > RSS_AT[1]:
        parser.error(f"need {RSS_AT[0]} <= warm-up + --single and the total <= {RSS_AT[1]}")

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkdtemp(prefix="bench_serve_")) / "serve.log"
    load_start = os.getloadavg()[0]
    server = start_server(args.model, port, log, args.server_arg)
    try:
        health = wait_ready(base, server, log)
        bench = Bench(base, clip, psutil.Process(server.pid), time.monotonic() + args.time_limit)
        print(f"server up on {base} ({health['workers']} workers); warming up", flush=True)
        bench.sequential(WARMUP)
        print(f"1 client: {args.single} requests", flush=True)
        single = bench.sequential(args.single)
        print(f"{args.clients} clients: {args.concurrent} requests", flush=True)
        concurrent = bench.concurrent(args.concurrent, args.clients)
        rest = RSS_AT[1] - bench.sent
        print(f"{rest} more requests ({args.clients} clients) to reach {RSS_AT[1]}", flush=True)
        filler = bench.concurrent(rest, args.clients)
    except Deadline:
        print(f"error: time limit of {args.time_limit:.0f} s reached", file=sys.stderr)
        return 1
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)

    growth = bench.rss[RSS_AT[1]] - bench.rss[RSS_AT[0]]
    import torch

    results = {
        "model": str(args.model),
        "clip": clip.name,
        "clip_bytes": clip.stat().st_size,
        "clients": args.clients,
        "server": {"workers": health["workers"], "capacity": health["capacity"]},
        "machine": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "load_start": load_start,
            "reference_step_ms": round(reference_step_ms(), 1),
            "load_end": os.getloadavg()[0],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "single": single,
        "concurrent": concurrent,
        "filler": filler,
        "rss": {
            "after_100_mb": round(bench.rss[RSS_AT[0]], 1),
            "after_1000_mb": round(bench.rss[RSS_AT[1]], 1),
            "growth_mb": round(growth, 1),
            "uss_after_100_mb": round(bench.uss[RSS_AT[0]], 1),
            "uss_after_1000_mb": round(bench.uss[RSS_AT[1]], 1),
            "limit_mb": RSS_GROWTH_LIMIT_MB,
            "pass": growth <= RSS_GROWTH_LIMIT_MB,
        },
        "errors_total": single["errors"] + concurrent["errors"] + filler["errors"],
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.results / "serve.md").write_text(text)
    print(text)
    return 0 if results["rss"]["pass"] and concurrent["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

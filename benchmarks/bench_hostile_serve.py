"""Benchmark: ``soundsight serve`` under hostile load on loopback: memory over bursts of
near-limit uploads, and normal requests while slow clients hold connections.

Run on demand with a trained model file (required; train one with ``soundsight train``)::

    python benchmarks/bench_hostile_serve.py --model runs/fsdd/model.safetensors

It starts ``soundsight serve MODEL`` in a subprocess on 127.0.0.1 (a free port) with its
default settings, and:

1. memory: ``--bursts`` bursts (default 10) of ``--burst-size`` concurrent uploads
   (default 8, half multipart as the page sends, half the raw body) of one WAV just
   under the 20 MB limit, made of real ESC-50 clips end to end (16-bit mono 44.1 kHz,
   about 3.7 minutes; the server analyses its first 30 s). After each burst, once
   ``/health`` reports nothing pending, the server's RSS is read (psutil). The goal:
   RSS after the last burst minus after the first <= 50 MB.
2. slow clients: for ``--hostile-seconds`` (default 15), ``--tricklers`` connections
   (default 20) send a request's headers and then its body 1 byte a second, and
   ``--stallers`` (default 90) send half a request's headers and then nothing, while
   one client sends a real FSDD clip every 0.25 s. The goal: every such normal request
   answered 200.

Every loop is bounded in count and time; traffic goes to 127.0.0.1 only. Prints a
summary and writes ``benchmarks/results/hostile_serve.json`` (every figure) and
``hostile_serve.md``. Memory figures do not depend on the load of the (shared)
machine, which is recorded with the CPU model beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil
import soundfile as sf
from bench_serve import ESC_AUDIO, RESULTS, free_port, start_server, wait_ready
from machine import cpu_model

FSDD_AUDIO = ESC_AUDIO.parents[1] / "fsdd" / "recordings"
RSS_GROWTH_LIMIT_MB = 50.0
#: Bytes of the near-limit upload (the server's default limit is 20 MB).
UPLOAD_BYTES = 19_800_000


def near_limit_wav(folder: Path, size: int = UPLOAD_BYTES) -> Path:
    """A 16-bit mono 44.1 kHz WAV of ``size`` bytes, real ESC-50 clips end to end."""
    samples = (size - 44) // 2
    pieces, total = [], 0
    for clip in sorted(ESC_AUDIO.glob("*.flac")):
        wave, rate = sf.read(clip, dtype="float32", always_2d=True)
        assert rate == 44100, clip
        pieces.append(wave.mean(axis=1))
        total += len(pieces[-1])
        if total >= samples:
            break
    path = folder / "near_limit.wav"
    sf.write(path, np.concatenate(pieces)[:samples], 44100, subtype="PCM_16")
    return path


def rss_mb(process: psutil.Process) -> tuple[float, float]:
    memory = process.memory_full_info()
    return memory.rss / 1e6, memory.uss / 1e6


def wait_idle(client: httpx.Client, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health").json()["pending"]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"server still busy after {timeout:.0f} s")
        time.sleep(0.1)


def bursts(base: str, clip: Path, process: psutil.Process, count: int, size: int) -> dict:
    data = clip.read_bytes()

    def upload(i: int) -> int:
        with httpx.Client(base_url=base, timeout=120) as client:
            if i % 2:
                response = client.post(
                    "/predict",
                    content=data,
                    params={"filename": clip.name},
                    headers={"content-type": "audio/wav"},
                )
            else:
                response = client.post("/predict", files={"file": (clip.name, data, "audio/wav")})
            return response.status_code

    rss, uss, statuses = [], [], []
    with httpx.Client(base_url=base, timeout=10) as health, ThreadPoolExecutor(size) as pool:
        for burst in range(count):
            statuses += pool.map(upload, range(size))
            wait_idle(health)
            time.sleep(1.0)  # let freed buffers settle before reading RSS
            memory = rss_mb(process)
            rss.append(round(memory[0], 1))
            uss.append(round(memory[1], 1))
            print(f"burst {burst + 1}/{count}: RSS {memory[0]:.0f} MB", flush=True)
    growth = rss[-1] - rss[0]
    return {
        "bursts": count,
        "burst_size": size,
        "upload_bytes": len(data),
        "errors": sum(status != 200 for status in statuses),
        "rss_mb": rss,
        "uss_mb": uss,
        "growth_mb": round(growth, 1),
        "limit_mb": RSS_GROWTH_LIMIT_MB,
        "pass": growth <= RSS_GROWTH_LIMIT_MB,
    }


def slow_clients(port: int, seconds: float, tricklers: int, stallers: int) -> dict:
    """Normal requests while slow clients hold connections; bounded by ``seconds``."""
    clip = sorted(FSDD_AUDIO.glob("*.wav"))[0]
    data = clip.read_bytes()
    head = (
        f"POST /predict?filename={clip.name} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: audio/wav\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode()
    half_head = f"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()

    def connect(first: bytes) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(first)
        return sock

    slow = [connect(head) for _ in range(tricklers)]
    stalled = [connect(half_head) for _ in range(stallers)]
    statuses: list[int | str] = []
    stop = time.monotonic() + seconds

    def trickle() -> None:
        sent = 0
        while time.monotonic() < stop and sent < len(data):
            for sock in slow:
                # OSError: the server closed it (timed out), which is the point.
                with contextlib.suppress(OSError):
                    sock.sendall(data[sent : sent + 1])
            sent += 1
            time.sleep(1.0)

    trickler = threading.Thread(target=trickle)
    trickler.start()
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        while time.monotonic() < stop:
            try:
                statuses.append(client.post("/predict", content=data).status_code)
            except httpx.HTTPError as err:
                statuses.append(type(err).__name__)
            time.sleep(0.25)
    trickler.join()
    answers = {}
    for sock in slow + stalled:
        sock.settimeout(0.2)
        try:
            reply = sock.recv(200)
            answer = reply.split(b"\r\n", 1)[0].decode() if reply else "closed"
        except TimeoutError:
            answer = "open"
        except OSError:
            answer = "closed"
        answers[answer] = answers.get(answer, 0) + 1
        sock.close()
    named = [str(status) for status in statuses]
    return {
        "seconds": seconds,
        "tricklers": tricklers,
        "stallers": stallers,
        "normal_requests": len(statuses),
        "normal_ok": sum(status == 200 for status in statuses),
        "normal_statuses": {s: named.count(s) for s in sorted(set(named))},
        "slow_connections_at_end": answers,
        "pass": bool(statuses) and all(status == 200 for status in statuses),
    }


def markdown(results: dict) -> str:
    m, memory, slow = results["machine"], results["memory"], results["slow_clients"]
    return "\n".join(
        [
            f"Benchmark `python benchmarks/bench_hostile_serve.py --model {results['model']}`, "
            f"{m['date']}, {m['cpus']} x {m['cpu']}, load average {m['load_start']:.2f} at "
            f"start and {m['load_end']:.2f} at the end (the machine is shared); server: "
            f"`soundsight serve` defaults ({results['server']['workers']} workers, capacity "
            f"{results['server']['capacity']}); client: httpx and raw sockets on 127.0.0.1.",
            "",
            f"Memory: {memory['bursts']} bursts of {memory['burst_size']} concurrent uploads "
            f"(half multipart, half raw body) of a {memory['upload_bytes'] / 1e6:.1f} MB WAV "
            "(real ESC-50 clips end to end); RSS read after each burst once nothing is pending.",
            f"Slow clients: {slow['tricklers']} connections sending their body 1 byte/s and "
            f"{slow['stallers']} that never finish their headers, for {slow['seconds']:g} s, "
            "while one client sends a real FSDD clip every 0.25 s.",
            "",
            "| goal | measured | target | |",
            "|---|---:|---:|---|",
            f"| RSS after burst {memory['bursts']} minus after burst 1 "
            f"| {memory['growth_mb']:+.1f} MB | <= {memory['limit_mb']:.0f} MB "
            f"| {'PASS' if memory['pass'] else 'FAIL'} |",
            f"| upload errors in the bursts | {memory['errors']} | 0 "
            f"| {'PASS' if memory['errors'] == 0 else 'FAIL'} |",
            f"| normal requests answered 200 beside slow clients "
            f"| {slow['normal_ok']} of {slow['normal_requests']} | all "
            f"| {'PASS' if slow['pass'] else 'FAIL'} |",
            "",
            f"RSS after each burst (MB): {', '.join(f'{v:.0f}' for v in memory['rss_mb'])}; "
            f"USS: {', '.join(f'{v:.0f}' for v in memory['uss_mb'])}.",
            f"Normal answers: {slow['normal_statuses']}; slow connections at the end: "
            f"{slow['slow_connections_at_end']}.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="model.safetensors to serve")
    parser.add_argument("--bursts", type=int, default=10)
    parser.add_argument("--burst-size", type=int, default=8, help="concurrent uploads a burst")
    parser.add_argument("--hostile-seconds", type=float, default=15.0)
    parser.add_argument("--tricklers", type=int, default=20)
    parser.add_argument("--stallers", type=int, default=90)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not args.model.is_file():
        parser.error(f"model file not found: {args.model}")
    if not 2 <= args.bursts <= 50 or not 1 <= args.burst_size <= 16:
        parser.error("need 2 <= --bursts <= 50 and 1 <= --burst-size <= 16 (bounded run)")
    if not 0 < args.hostile_seconds <= 120:
        parser.error("need 0 < --hostile-seconds <= 120 (bounded run)")

    folder = Path(tempfile.mkdtemp(prefix="bench_hostile_"))
    clip = near_limit_wav(folder)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = folder / "serve.log"
    load_start = os.getloadavg()[0]
    print(f"{os.cpu_count()} x {cpu_model()}, load average {load_start:.2f}", flush=True)
    server = start_server(args.model, port, log, [])
    try:
        health = wait_ready(base, server, log)
        process = psutil.Process(server.pid)
        print(f"server up on {base}; {args.bursts} bursts of {args.burst_size}", flush=True)
        memory = bursts(base, clip, process, args.bursts, args.burst_size)
        print(f"slow clients for {args.hostile_seconds:g} s", flush=True)
        slow = slow_clients(port, args.hostile_seconds, args.tricklers, args.stallers)
    finally:
        server.terminate()
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        clip.unlink()

    results = {
        "model": str(args.model),
        "server": {"workers": health["workers"], "capacity": health["capacity"]},
        "machine": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "cpus": os.cpu_count(),
            "cpu": cpu_model(),
            "load_start": load_start,
            "load_end": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "memory": memory,
        "slow_clients": slow,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "hostile_serve.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (args.results / "hostile_serve.md").write_text(text)
    print(text)
    return 0 if memory["pass"] and memory["errors"] == 0 and slow["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())

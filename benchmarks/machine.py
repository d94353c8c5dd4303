"""What machine a benchmark ran on (shared by the scripts in this folder)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: The reference step on the machine the issues' times were set on (ms).
REFERENCE_STEP_MS_THERE = 201.0


def reference_step_ms(steps: int = 10) -> float:
    """Median time of a plain timm ``tf_efficientnet_lite0`` training step (batch 16,
    input 3x128x87, AdamW, 2 threads), the figure the issues' times were set against
    (201 ms there): scale a target time by ``reference_step_ms() / 201``."""
    import statistics
    import time

    import timm
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = timm.create_model("tf_efficientnet_lite0", num_classes=10)
        optimizer = torch.optim.AdamW(model.parameters())
        x, y = torch.randn(16, 3, 128, 87), torch.randint(0, 10, (16,))
        times = []
        for step in range(steps + 2):
            started = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
            if step >= 2:  # the first steps warm up allocators and kernels
                times.append((time.perf_counter() - started) * 1000)
        return statistics.median(times)
    finally:
        torch.set_num_threads(threads)


def run_record() -> dict:
    """When and where a benchmark starts: date, cores, CPU, load average, reference
    step; :func:`measured_line` says it in a sentence once ``load_average_at_end``
    is added."""
    import os
    from datetime import UTC, datetime

    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "load_average_at_start": os.getloadavg()[0],
        "reference_step_ms": round(reference_step_ms(), 1),
    }


def measured_line(meta: dict) -> str:
    """ "Measured <date> on <cores> cores, <cpu>, load ..., reference step ..." """
    return (
        f"Measured {meta['date']} on {meta['cores']} cores, {meta['cpu']}, load average "
        f"{meta['load_average_at_start']:.2f} at the start, {meta['load_average_at_end']:.2f} "
        f"at the end; reference step {meta['reference_step_ms']} ms "
        f"({REFERENCE_STEP_MS_THERE} ms where the issues' times were set)."
    )

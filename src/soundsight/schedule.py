"""The one-cycle learning-rate schedule each training stage runs, in one place.

Training (``ClipClassifier.configure_optimizers``) gives these settings to torch's
:class:`~torch.optim.lr_scheduler.OneCycleLR`; the plots draw the rates
:func:`one_cycle` returns, which come from the same scheduler with the same settings,
so the two cannot disagree. Nothing here imports torch at module level: the plotting
and report code imports this module without paying for torch until it asks for rates.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

#: Fraction of a stage's steps spent warming up to the peak rate.
PCT_START = 0.25
#: The rate starts at peak / DIV_FACTOR and ends at peak / DIV_FACTOR / FINAL_DIV_FACTOR
#: (torch's defaults, named so that training and plots share them).
DIV_FACTOR = 25.0
FINAL_DIV_FACTOR = 1e4
#: Cosine warm-up and annealing.
ANNEAL_STRATEGY = "cos"


def warmup_fraction(total_steps: int) -> float:
    """``pct_start`` for a stage of ``total_steps`` optimiser steps.

    torch's OneCycleLR peaks at step ``pct_start * total_steps - 1`` and divides by
    zero when that is exactly step 0 (with 0.25: a stage of exactly 4 steps, e.g. one
    epoch of 64 to 79 clips at batch 16). There the peak moves to step 1, where the
    schedules of 5 to 7 steps already reach it (their peak step lies between 0 and 1).
    """
    if float(PCT_START * total_steps) - 1 == 0:
        return 2 / total_steps
    return PCT_START


def one_cycle_options(total_steps: int) -> dict[str, Any]:
    """Keyword arguments of torch's ``OneCycleLR`` for a stage of ``total_steps``
    optimiser steps (at least 1), ``max_lr`` aside."""
    total_steps = max(1, int(total_steps))
    return {
        "total_steps": total_steps,
        "pct_start": warmup_fraction(total_steps),
        "div_factor": DIV_FACTOR,
        "final_div_factor": FINAL_DIV_FACTOR,
        "anneal_strategy": ANNEAL_STRATEGY,
    }


def one_cycle(peaks: Sequence[float], total_steps: int) -> np.ndarray:
    """Learning rate of each parameter group at each optimiser step.

    Parameters
    ----------
    peaks : sequence of float
        Peak rate of each parameter group (the head's first, then the body's).
    total_steps : int
        Optimiser steps in the stage (at least 1 is used).

    Returns
    -------
    ndarray, shape (steps, groups)
        The rates training uses, from torch's own scheduler run on throwaway
        parameters (nothing else is touched: the result depends on the arguments only).
    """
    import torch

    options = one_cycle_options(total_steps)
    steps = options["total_steps"]
    parameters = [torch.nn.Parameter(torch.zeros(1)) for _ in peaks]
    optimizer = torch.optim.AdamW(
        [{"params": [p], "lr": peak} for p, peak in zip(parameters, peaks, strict=True)]
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=list(peaks), **options)
    rates = np.empty((steps, len(peaks)))
    for step in range(steps):
        rates[step] = [group["lr"] for group in optimizer.param_groups]
        optimizer.step()
        if step + 1 < steps:  # one more step past the last raises in torch
            schedule.step()
    return rates

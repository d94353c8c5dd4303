"""Training in several processes: launch settings, ranks, and gathered validation.

Inside a fit, Lightning knows the ranks (``trainer.is_global_zero``,
``trainer.strategy.all_gather`` / ``broadcast``) and training asks it. Two questions
come before any Trainer exists or after it is gone, and are answered here: which
devices and strategy to ask Lightning for (:func:`distribution`), and which process of
an external launcher this is (:func:`launch_rank`, :func:`is_global_zero`: feature
preparation is sharded by it, and the CLI reports only from rank 0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from lightning.fabric.plugins.environments import TorchElasticEnvironment


def _device_count(devices) -> int:
    """How many devices a Lightning ``devices`` value names (1 for 'auto' and -1)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    return int(text) if text.isdigit() else 1


def distribution(devices="auto", num_nodes: int = 1) -> tuple[object, int, str]:
    """Lightning's ``devices``, ``num_nodes`` and ``strategy`` for this process.

    Several processes (``devices`` > 1, ``num_nodes`` > 1, or a launcher's
    ``WORLD_SIZE`` > 1) train with DistributedDataParallel, ``"ddp"`` (gloo on CPUs,
    NCCL on GPUs). Under torchrun, ``devices="auto"`` means the processes torchrun
    started on each node, so ``torchrun --nproc_per_node N`` needs no other flag.
    """
    env = os.environ
    if devices == "auto" and TorchElasticEnvironment.detect() and "LOCAL_WORLD_SIZE" in env:
        devices = int(env["LOCAL_WORLD_SIZE"])
        num_nodes = max(1, int(env.get("WORLD_SIZE", devices)) // devices)
    elif isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    several = num_nodes > 1 or int(env.get("WORLD_SIZE", 1)) > 1 or _device_count(devices) > 1
    return devices, num_nodes, "ddp" if several else "auto"


def precision() -> Literal["bf16-mixed", "32-true"]:
    """bf16 mixed precision on GPUs that have it; fp32 on CPUs (bf16 autocast on a CPU
    was not reliably faster here)."""
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def launch_rank() -> tuple[int, int]:
    """(rank, world size) given by an external launcher (torchrun, SLURM's srun); (0, 1)
    without one.

    Read from the launcher's variables because it is needed before any Trainer or
    process group exists (to shard feature preparation); Lightning's cluster
    environments answer the same only once a Trainer has chosen one.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def is_global_zero() -> bool:
    """Whether this is the process that writes a run's files and reports (rank 0 of any
    launcher; the only process of a plain run).

    Asked outside a fit (the CLI after :func:`soundsight.train`, cross-validation
    between folds), where no Trainer is at hand: the process group when one exists,
    else the launchers' variables, read now (Lightning's ``rank_zero_only.rank`` is
    read once at import, before a launcher's variables may be set).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    # Lightning's own launcher (--devices N alone) marks the processes it starts.
    env = os.environ
    return launch_rank()[0] == 0 and env.get("LOCAL_RANK", "0") == env.get("NODE_RANK", "0") == "0"


def gather_in_order(
    shares: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Put validation shares back in table order.

    Parameters
    ----------
    shares : sequence of (probabilities, targets, rows)
        What each rank scored: Lightning's distributed sampler gives every rank an
        equal share, padded with repeats of other clips, in its own order; ``rows``
        are the clips' rows in the validation table.
    count : int
        Clips in the validation table.

    Returns
    -------
    (probabilities, targets)
        ``(count, classes)`` and ``(count,)`` (multi-label: ``(count, classes)``), row
        ``i`` for clip ``i``.
    """
    classes = shares[0][0].shape[1]
    probabilities = np.zeros((count, classes), np.float32)
    first_targets = shares[0][1]
    targets = np.zeros((count, *first_targets.shape[1:]), first_targets.dtype)
    seen = np.zeros(count, bool)
    for share_probabilities, share_targets, rows in shares:
        # Padding repeats a clip on another rank; its copies are equal, either one serves.
        probabilities[rows], targets[rows], seen[rows] = share_probabilities, share_targets, True
    if not seen.all():
        raise RuntimeError(f"validation scored {int(seen.sum())} of {count} clips")
    return probabilities, targets

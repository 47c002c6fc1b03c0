"""Data-parallel training across processes (``torchrun``), the standard way.

Launch any study with ``torchrun --nproc_per_node N -m transferlab.cli run study.yaml``; each
process becomes one DDP rank through Lightning Fabric. ``train.batch_size`` stays the *global*
batch: every rank builds the same global batch (same seeded order and augmentation) and trains on
its slice, so a run on N processes follows the single-process run with the same global batch (up
to floating-point summation order and, for BatchNorm in train mode, per-rank batch statistics).
Evaluation batches are dealt round-robin to the ranks and the metrics are reduced across them.
Only rank 0 writes the run directory and checkpoints.
"""

from __future__ import annotations

import atexit
import functools
import os
from collections.abc import Iterator
from typing import Any

import torch
from lightning.fabric import Fabric

from transferlab.config import ExperimentConfig
from transferlab.data.batches import Batches
from transferlab.engine.precision import resolve_precision


def world() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def fabric_kwargs() -> dict[str, Any]:
    """Fabric arguments for this process: DDP over the torchrun world, or a single device."""
    rank, size = world()
    if size <= 1:
        return {"devices": 1}
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(size)))
    return {"devices": local, "num_nodes": size // local, "strategy": "ddp"}


class SliceOfGlobalBatch:
    """Training batches for one rank: its contiguous slice of every global batch.

    A global batch smaller than the number of ranks (a tiny last batch) is skipped on every rank,
    since an empty slice has no mean loss.
    """

    def __init__(self, batches: Batches, rank: int, size: int) -> None:
        self.batches, self.rank, self.size = batches, rank, size

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.batches:
            if len(y) < self.size:
                continue
            yield x.tensor_split(self.size)[self.rank], y.tensor_split(self.size)[self.rank]


class RoundRobin:
    """Evaluation batches for one rank: batch i goes to rank i % world (metrics are reduced later)."""

    def __init__(self, batches: Batches, rank: int, size: int) -> None:
        self.batches, self.rank, self.size = batches, rank, size

    def set_epoch(self, epoch: int) -> None:
        self.batches.set_epoch(epoch)

    def __len__(self) -> int:
        return len(range(self.rank, len(self.batches), self.size))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i, batch in enumerate(self.batches):
            if i % self.size == self.rank:
                yield batch


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place) when running distributed; unchanged otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def shutdown() -> None:
    """Leave the process group (no-op for a plain process).

    Without this a rank that finishes first exits while gloo's worker threads are still alive, and
    the C++ runtime aborts it ("terminate called without an active exception", SIGABRT), which
    torchrun reports as a failed job although every result was written. No barrier: a rank that is
    done need not wait for the others, and after an error the others may never arrive.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@functools.cache
def leave_process_group_at_exit() -> None:
    """Register (once) ``shutdown`` at interpreter exit, while Python is still alive.

    Called where the process group is joined (``make_fabric``), so the CLI and a user's own
    script calling ``run_study`` under torchrun both exit cleanly, without guessing when the user is
    done with the process group.
    """
    atexit.register(shutdown)


def make_fabric(cfg: ExperimentConfig) -> Fabric:
    """A Fabric for this process: one device, or DDP over the ``torchrun`` world.

    ``train.precision: auto`` is normally resolved before the run directory records the config
    (``kinds.base.resolve_run_config``); a config that still says ``auto`` (``fit`` called from Python)
    is resolved here the same way.
    """
    precision = resolve_precision(cfg.train.precision, cfg.train.accelerator)
    fabric = Fabric(accelerator=cfg.train.accelerator, precision=precision, **fabric_kwargs())
    fabric.launch()  # joins the process group under torchrun; nothing to do for a single process
    if world()[1] > 1:
        leave_process_group_at_exit()  # a gloo rank that exits without leaving is aborted at teardown
    return fabric

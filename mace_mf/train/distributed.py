"""Training in several processes (``torchrun``): who is who, the process group, shards and reductions.

``torchrun --nproc_per_node N -m mace_mf.cli train RECIPE --out DIR`` runs the same recipe in N
processes; nothing in the recipe changes. Every process builds the same model and data (the data
split is a pure function of the seed) and trains a shard of each batch; gradients are averaged by
``DistributedDataParallel``. Choices, and why:

- ``training.batch_size`` stays the **global** batch: one optimisation step still sees the same
  configurations as in one process, and each of the N processes takes ``batch_size / N`` of them
  (a contiguous slice of the ``(seed, epoch)`` permutation that one process would batch), so the
  learning rate and the loss curve carry over unchanged. It must divide by N.
- Each loss term is a mean over the labelled entries of the *whole* batch: the label counts are
  summed across processes before the loss (one small all-reduce per step), each process divides
  its own squared errors by the global count and scales by N, so DDP's average of gradients is
  exactly the gradient one process would take. A process whose shard of a short last batch is
  empty trains on a padding graph whose labels are all masked (zero loss, zero gradient).
- Metrics: training terms are reduced with the same all-reduce as the divergence check;
  validation is predicted on a shard per process and gathered, so every process computes the same
  metrics and takes the same scheduler and early-stopping decisions.
- Only rank 0 writes files (run folder, checkpoints, report, exports), logs to W&B and shows
  progress; the others log warnings only.

gloo is the backend on CPU and nccl on CUDA (device ``cuda:LOCAL_RANK``).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from mace_mf.errors import RecipeError, RunError

log = logging.getLogger(__name__)

T = TypeVar("T")
# A process that waits longer than this for the others has lost them (a crash torchrun did not
# report, a rank stuck in I/O); rank 0's final evaluation happens after the others have left.
TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Dist()


def from_env() -> Dist:
    """Read torchrun's ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` (absent: one process)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise RunError(
            "WORLD_SIZE/RANK/LOCAL_RANK: not integers; launch with torchrun, or unset them for one process"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise RunError(f"RANK {rank} / WORLD_SIZE {world}: inconsistent; launch with torchrun")
    return Dist(rank, world, local)


def local_device(device: torch.device, dist: Dist) -> torch.device:
    """The device of this process: on CUDA, one GPU per local rank (the recipe's index is ignored)."""
    if dist.enabled and device.type == "cuda":
        if dist.local_rank >= torch.cuda.device_count():
            raise RecipeError(
                f"device: local rank {dist.local_rank} needs cuda:{dist.local_rank} but "
                f"{torch.cuda.device_count()} GPU(s) are visible; lower --nproc_per_node"
            )
        return torch.device("cuda", dist.local_rank)
    return device


@contextmanager
def session(device: torch.device) -> Iterator[Dist]:
    """Join the process group for the length of a run (gloo on CPU, nccl on CUDA), then leave it.

    A group that already exists (a caller's) is used and left alone; one process needs none.
    Non-zero ranks log warnings only while the session lasts.
    """
    dist = from_env()
    if not dist.enabled:
        yield dist
        return
    owned = not tdist.is_initialized()
    if owned:
        if device.type == "cuda":
            torch.cuda.set_device(local_device(device, dist))
        tdist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    package_log = logging.getLogger("mace_mf")
    previous_level = package_log.level
    if not dist.is_main:
        package_log.setLevel(logging.WARNING)
    try:
        if tdist.get_world_size() != dist.world_size or tdist.get_rank() != dist.rank:
            raise RunError("process group: rank/size differ from RANK/WORLD_SIZE; launch with torchrun")
        yield dist
    finally:
        package_log.setLevel(previous_level)
        if owned and tdist.is_initialized():
            tdist.destroy_process_group()


@contextmanager
def rank0_first(dist: Dist) -> Iterator[None]:
    """Rank 0 runs the block before the others (downloads, label caches: written once, then read)."""
    if dist.enabled and not dist.is_main:
        tdist.barrier()
    yield
    if dist.enabled and dist.is_main:
        tdist.barrier()


def broadcast(dist: Dist, value: T) -> T:
    """Rank 0's ``value`` on every rank."""
    if not dist.enabled:
        return value
    box = [value]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(dist: Dist, value: T) -> list[T]:
    """Every rank's ``value``, in rank order."""
    if not dist.enabled:
        return [value]
    gathered: list[Any] = [None] * dist.world_size
    tdist.all_gather_object(gathered, value)
    return gathered


def all_reduce_sum(dist: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over ranks, in place (nothing to do in one process)."""
    if dist.enabled:
        tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM)
    return tensor


def shard_bounds(n: int, dist: Dist) -> tuple[int, int]:
    """This rank's contiguous ``[start, stop)`` of ``n`` items; sizes differ by at most one."""
    base, extra = divmod(n, dist.world_size)
    start = dist.rank * base + min(dist.rank, extra)
    return start, start + base + (1 if dist.rank < extra else 0)


def local_batch_size(batch_size: int, dist: Dist) -> int:
    """Configurations per process and step: ``training.batch_size`` is the global batch."""
    if batch_size % dist.world_size:
        raise RecipeError(
            f"training.batch_size: {batch_size} configurations per step do not divide among "
            f"{dist.world_size} processes; make it a multiple of {dist.world_size} (it is the global batch)"
        )
    return batch_size // dist.world_size

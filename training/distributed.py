"""Process-group set-up from torchrun's environment, and the few collective helpers the loop needs."""
from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

# How long a collective may wait for the slowest rank before the job is aborted. While rank 0 writes an epoch's
# checkpoints (up to three, each hashed after writing: ~3 GB apiece for ConvNeXt-L with EMA and AdamW state) the other
# ranks wait at a barrier; NCCL's default, 10 minutes, can pass on slow shared storage (a k8s ReadWriteMany volume).
# 30 minutes: gloo's default, which the CPU runs already had.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env() -> DistInfo:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); NCCL on GPUs, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)


@contextlib.contextmanager
def process_group_from_env() -> Iterator[DistInfo]:
    """The process group of one run: joined from torchrun's environment, destroyed when the run ends or fails.

    PyTorch asks for destroy_process_group() before exit (NCCL warns at exit without it, and may leak resources). A
    group that was already initialised when the run began is its creator's to destroy, and is left as it is.
    """
    created = not is_initialized()
    dist_info = init_from_env()
    try:
        yield dist_info
    finally:
        if created and is_initialized():
            dist.destroy_process_group()


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Every process takes rank 0's buffers (BatchNorm's running statistics): each process's last training forward
    moved its own by a momentum step, and DDP broadcasts them only at the start of its next forward. Evaluation runs
    outside DDP, so it takes them here, and every process scores its shard with the statistics rank 0 saves."""
    if not is_initialized() or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_gather_objects(value) -> list:
    """Every process's `value`, indexed by rank ([value] on one process); every process must call it."""
    if not is_initialized():
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if is_initialized():
        dist.barrier()

"""The process group torchrun's environment starts: its backend and how long a collective waits for the slowest rank."""
from __future__ import annotations

import datetime

import torch.distributed as dist

from training.distributed import init_from_env


def test_collectives_wait_30_minutes_for_rank_0s_checkpoint_writes(monkeypatch):
    """NCCL's default of 10 minutes aborted a job whose rank 0 was still writing and hashing an epoch's checkpoints
    (three of ~3 GB for ConvNeXt-L with EMA) on slow shared storage while the other ranks waited at the barrier."""
    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **options: joined.append((backend, options)))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # this machine: gloo
    info = init_from_env()
    assert (info.rank, info.world_size, info.local_rank) == (1, 2, 1)
    assert joined == [("gloo", {"timeout": datetime.timedelta(minutes=30)})]

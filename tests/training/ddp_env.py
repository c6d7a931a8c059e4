"""What a gloo test process needs to join a 2-process group as torchrun would start it (CPU, localhost)."""
import os

import torch

from tests.ports import free_port  # noqa: F401 (the tests take it from here)


def join_as_torchrun(rank: int, world_size: int, port: int) -> None:
    """torchrun's environment for `rank`, and one thread: two processes share the test machine's cores."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world_size),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)

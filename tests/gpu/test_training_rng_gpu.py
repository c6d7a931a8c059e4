"""A training checkpoint's CUDA RNG state: the process's own device's, restored there (older lists included)."""
from __future__ import annotations

import pytest
import torch

from training.checkpoint import rng_state, save_atomic, set_rng_state

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with CUDA: the CUDA generator's state is saved and restored")


def test_the_current_devices_cuda_draws_continue_after_a_restore(tmp_path):
    save_atomic({"rng": rng_state()}, tmp_path / "c.pth")
    expected = torch.rand(4, device="cuda")
    saved = torch.load(tmp_path / "c.pth", weights_only=True)["rng"]
    assert isinstance(saved["cuda"], torch.Tensor)  # one device's state, whatever number of GPUs the process saw
    set_rng_state(saved)
    assert torch.equal(torch.rand(4, device="cuda"), expected)


def test_an_older_checkpoints_list_of_every_device_restores_the_current_devices_entry():
    saved = {**rng_state(), "cuda": torch.cuda.get_rng_state_all()}  # the format before: one state per device
    expected = torch.rand(4, device="cuda")
    set_rng_state(saved)
    assert torch.equal(torch.rand(4, device="cuda"), expected)

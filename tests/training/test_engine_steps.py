"""What one optimizer step is, in training.engine: --accum-steps, --clip-grad and --amp (bf16; fp16 with its
GradScaler), on a small real network and real optimizers; and a whole demo run with all three."""
import json

import pytest
import torch
from torch import nn

from model.checkpoints import read_checkpoint
from training.__main__ import main
from training.engine import EpochSettings, StepPlan, TrainState, train_one_epoch

IMAGES = 16


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))


def batches(batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    images, labels = torch.randn(IMAGES, 6, generator=generator), torch.randint(0, 3, (IMAGES,), generator=generator)
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, IMAGES, batch_size)]


def train(model: nn.Module, batch_size: int, settings: EpochSettings, lr: float = 0.5,
          scaler: torch.amp.GradScaler | None = None) -> TrainState:
    steps = IMAGES // (batch_size * settings.accum_steps)
    state = TrainState(model=model, unwrapped=model, optimizer=torch.optim.SGD(model.parameters(), lr=lr),
                       plan=StepPlan(peak_lr=lr, min_lr=lr, warmup_steps=0, total_steps=steps, steps_per_epoch=steps),
                       scaler=scaler)
    train_one_epoch(state, nn.CrossEntropyLoss(), batches(batch_size), settings)
    return state


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


CPU = torch.device("cpu")


def test_two_accumulated_half_batches_step_as_one_full_batch():
    """Each micro-batch's loss is divided by accum_steps and the optimizer steps once per accumulation: the weights
    are those of the same images in one batch (the official --update_freq)."""
    full_model, accumulated_model = network(), network()
    full = train(full_model, 8, EpochSettings(CPU))
    accumulated = train(accumulated_model, 4, EpochSettings(CPU, accum_steps=2))
    assert full.plan.step == accumulated.plan.step == 2
    for a, b in zip(weights(full_model), weights(accumulated_model), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(weights(full_model), weights(network()), strict=True))


def test_clip_grad_bounds_each_steps_gradient_norm():
    """With SGD at lr 1, a step moves the weights by the clipped gradient: its norm is at most --clip-grad; without
    clipping the same step moves them much further."""
    start = weights(network())
    clipped_model, free_model = network(), network()
    train(clipped_model, 16, EpochSettings(CPU, clip_grad=0.01), lr=1.0)
    train(free_model, 16, EpochSettings(CPU), lr=1.0)

    def moved(model):
        return torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(weights(model), start, strict=True))).item()

    assert moved(clipped_model) == pytest.approx(0.01, rel=1e-4)
    assert moved(free_model) > 0.1


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_steps_stay_close_to_fp32(amp):
    """Autocast on the CPU in either precision (fp16 through a GradScaler, which unscales before the step): the
    weights after an epoch differ from the fp32 run's (the lower precision ran) by its rounding, not by a step."""
    reference_model, amp_model = network(), network()
    train(reference_model, 4, EpochSettings(CPU))
    scaler = torch.amp.GradScaler("cpu") if amp == "fp16" else None
    state = train(amp_model, 4, EpochSettings(CPU, amp=amp), scaler=scaler)
    if scaler is not None:
        assert scaler.get_scale() > 1  # it scaled the loss (and so had to unscale the gradients)
    moved = max((a - b).abs().max().item() for a, b in zip(weights(reference_model), weights(network()),
                                                             strict=True))
    differs = max((a - b).abs().max().item() for a, b in zip(weights(reference_model), weights(amp_model),
                                                               strict=True))
    assert state.plan.step == 4
    assert 0 < differs < 0.05 * moved, (differs, moved)  # autocast did run in the lower precision


def test_a_demo_run_with_accumulation_clipping_and_fp16_writes_its_checkpoints(tmp_path):
    """The flags every ImageNet command in the README uses, through the real CLI: it trains, logs finite losses
    and writes a checkpoint that records them."""
    output = tmp_path / "run"
    argv = ["--preset", "demo", "--output", str(output), "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "4",
            "--accum-steps", "2", "--clip-grad", "1.0", "--amp", "fp16", "--max-steps-per-epoch", "2",
            "--log-every", "1", "--workers", "0", "--quiet"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "epoch_step" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    checkpoint = read_checkpoint(output / "checkpoint_last.pth")
    config = checkpoint["config"]
    assert (config["accum_steps"], config["clip_grad"], config["amp"]) == (2, 1.0, "fp16")
    assert checkpoint["scaler"]  # the GradScaler's state, for an exact resume

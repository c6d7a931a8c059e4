"""A tiny real run through `python -m training` writes a checkpoint that model.create_model loads."""
import json
import subprocess
import sys

import pytest
import torch

from model import create_model
from tests.model.random_weights import randomise
from training.__main__ import main


def test_cli_run_writes_an_exportable_checkpoint(tmp_path):
    out = tmp_path / "run"
    subprocess.run(
        [sys.executable, "-m", "training", "--preset", "demo", "--epochs", "1", "--max-steps-per-epoch", "3",
         "--batch-size", "16", "--output", str(out)], check=True, timeout=120,
    )
    checkpoint = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert checkpoint["model_name"] == "convnext_atto"
    assert checkpoint["class_names"] == [str(i) for i in range(10)]
    assert checkpoint["data_config"]["input_size"] == 32 and checkpoint["data_config"]["crop_pct"] == 1.0
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in checkpoint["model"])
    model = create_model(checkpoint["model_name"], **checkpoint["model_kwargs"], checkpoint=out / "checkpoint_best.pth")
    assert model.head.out_features == 10
    saved_config = json.loads((out / "config.json").read_text())
    assert saved_config == checkpoint["config"] and saved_config["max_steps_per_epoch"] == 3
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "summary" and records[-2]["steps"] == 3


def test_cli_rejects_an_unknown_amp_mode(capsys):
    assert main(["--preset", "demo", "--amp", "fp8"]) == 2
    assert "--amp" in capsys.readouterr().err


def test_cli_rejects_an_unknown_preset():
    with pytest.raises(SystemExit):
        main(["--preset", "imagenet5k"])


def test_finetune_from_an_official_1000_class_checkpoint_reinitialises_only_the_head(tmp_path):
    official = randomise(create_model("convnext_atto", num_classes=1000))  # no two blocks alike, unlike at init
    torch.save({"model": official.state_dict()}, tmp_path / "official.pth")  # the official checkpoint layout
    out = tmp_path / "ft"
    subprocess.run(
        [sys.executable, "-m", "training", "--preset", "demo", "--finetune", str(tmp_path / "official.pth"),
         "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size", "8", "--base-lr", "0", "--output", str(out)],
        check=True, timeout=120,
    )
    tuned = torch.load(out / "checkpoint_last.pth", weights_only=True)["model"]
    assert tuned["head.weight"].shape == (10, 320)
    # lr 0: the body is exactly the official weights, so the checkpoint was really loaded under the new head.
    body = {k: v for k, v in official.state_dict().items() if not k.startswith("head.")}
    assert sorted(tuned) == sorted([*body, "head.bias", "head.weight"])
    for name, value in body.items():
        assert torch.equal(tuned[name], value), name

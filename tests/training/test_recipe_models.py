"""What the recipe asks of the models and the runtime: ResNet-50 stochastic depth, GPU math flags, the CLI help,
and the squash evaluation carried from a training checkpoint into an export."""
import pytest
import torch
from torchvision.models import resnet50

from export.onnx import load_source
from model import create_model
from model.convnext import DropPath
from training.__main__ import main
from training.checkpoint import rng_state
from training.config import PRESETS, resolve
from training.distributed import DistInfo
from training.resume import restore_rng
from training.run import configure_cuda_math, model_kwargs_for


def test_resnet50_gets_stochastic_depth_from_the_run_with_torchvision_names():
    kwargs = model_kwargs_for(resolve("in1k", {"model": "resnet50"}), 4)
    assert kwargs["drop_path_rate"] == 0.1
    model = create_model("resnet50", **kwargs)
    assert list(model.state_dict()) == list(resnet50(num_classes=4).state_dict())  # torchvision checkpoints load
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert len(rates) == 16 and rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("override", [{"layer_scale_init": 1e-6}, {"head_init_scale": 0.5}])
def test_resnet50_refuses_the_convnext_inits_instead_of_dropping_them(override):
    with pytest.raises(ValueError, match="resnet50 has no layer scale .* apply to ConvNeXt models only"):
        resolve("in1k", {"model": "resnet50", **override})


def test_resnet50_records_the_inits_it_runs_with_not_the_presets():
    """finetune's head scale 0.001 is ConvNeXt's: a ResNet-50 fine-tune's config.json says 1.0, what it runs with."""
    config = resolve("finetune", {"model": "resnet50", "layer_decay": 1.0})
    assert (config.head_init_scale, config.layer_scale_init) == (1.0, None)
    assert resolve("in1k", {"model": "resnet50", "layer_scale_init": 0.0, "head_init_scale": 1.0}).head_init_scale == 1


@pytest.mark.parametrize("rate", [0.0, 0.5])
def test_resnet50_drops_residual_branches_only_while_training(rate):
    model = create_model("resnet50", num_classes=4, drop_path_rate=rate)
    images = torch.randn(4, 3, 32, 32)
    outputs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        outputs.append(model.train()(images))
    assert torch.equal(outputs[0], outputs[1]) == (rate == 0.0)
    model.eval()
    assert torch.equal(model(images), model(images))


def test_gpu_runs_turn_on_tf32_and_cudnn_benchmark_and_cpu_runs_leave_them():
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = False
        configure_cuda_math(torch.device("cpu"))
        assert not (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.benchmark)
        configure_cuda_math(torch.device("cuda", 0))  # only sets flags: no GPU needed to check the decision
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = flags


def test_help_lists_every_preset(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"  {name} " in out, name
    assert "--model-key" in out and "--crop-mode" in out and "--disable-eval" in out


def test_a_squash_checkpoint_exports_a_squash_manifest_preprocess(tmp_path):
    model = create_model("convnext_atto", num_classes=3)
    data_config = {"input_size": 64, "crop_pct": 1.0, "crop_mode": "squash", "interpolation": "bicubic",
                   "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    torch.save({"model": model.state_dict(), "model_name": "convnext_atto", "model_kwargs": {"num_classes": 3},
                "data_config": data_config, "class_names": ["a", "b", "c"]}, tmp_path / "c.pth")
    preprocess = load_source(None, tmp_path / "c.pth").preprocess
    assert (preprocess.crop_mode, preprocess.resize_px, preprocess.crop_px) == ("squash", 64, 64)
    data_config.pop("crop_mode")  # a checkpoint from before crop_mode: today's behaviour
    torch.save({"model": model.state_dict(), "model_name": "convnext_atto", "model_kwargs": {"num_classes": 3},
                "data_config": data_config, "class_names": ["a", "b", "c"]}, tmp_path / "old.pth")
    assert load_source(None, tmp_path / "old.pth").preprocess.crop_mode == "center"


def test_a_resume_on_another_process_count_reseeds_each_rank_and_says_so(capsys):
    saved = [rng_state(), rng_state()]  # a checkpoint written by 2 processes
    draws = []
    for rank, world_size in ((0, 1), (0, 3), (1, 3)):
        restore_rng(saved, DistInfo(rank, world_size, rank), seed=0, epoch=4)
        draws.append(torch.rand(3))
    assert "RNG states for 2 processes, this run has 1" in capsys.readouterr().err
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[1], draws[2])  # per rank, reproducible
    legacy = rng_state()  # older checkpoints: one dict, one process
    expected = torch.rand(3)
    restore_rng(legacy, DistInfo(), seed=0, epoch=4)
    assert torch.equal(torch.rand(3), expected)

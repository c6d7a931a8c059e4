"""--resume refuses what it cannot continue with one error line (a weights-only file, another model's checkpoint),
and continues with the flags' optimizer settings."""
import dataclasses
import json
import shutil

import pytest
import torch

from convnext_files import sidecar_path
from model.checkpoints import read_checkpoint
from training.__main__ import main
from training.config import PRESETS
from training.distributed import DistInfo
from training.run import train

TINY = dataclasses.replace(PRESETS["demo"], epochs=1, batch_size=8, max_steps_per_epoch=1, disable_eval=True,
                           quiet=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The checkpoint_last.pth of a one-epoch demo run (convnext_atto, 10 digit classes)."""
    output = tmp_path_factory.mktemp("finished")
    train(dataclasses.replace(TINY, output=str(output)), DistInfo())
    return output / "checkpoint_last.pth"


def _resume(tmp_path, checkpoint, *flags: str) -> list[str]:
    return ["--preset", "demo", "--epochs", "2", "--batch-size", "8", "--max-steps-per-epoch", "1", "--quiet",
            "--output", str(tmp_path / "run"), "--resume", str(checkpoint), *flags]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1 and lines[0].startswith("python -m training: error: "), err
    return lines[0]


def test_resuming_another_models_checkpoint_is_one_error_naming_both_models(finished, tmp_path, capsys):
    assert main(_resume(tmp_path, finished, "--model", "convnext_femto")) == 2
    line = _one_error_line(capsys)
    assert "model convnext_atto (this run: convnext_femto)" in line and "--finetune" in line


def test_resuming_a_checkpoint_of_another_class_count_is_one_error(finished, tmp_path, capsys):
    saved = read_checkpoint(finished)
    saved["model_kwargs"]["num_classes"] = 5  # as a run on a 5-class --data-dir records it
    saved["model"]["head.weight"], saved["model"]["head.bias"] = saved["model"]["head.weight"][:5], saved[
        "model"]["head.bias"][:5]
    torch.save(saved, tmp_path / "five.pth")
    assert main(_resume(tmp_path, tmp_path / "five.pth")) == 2
    assert "num_classes 5 (this run: 10)" in _one_error_line(capsys)


def test_a_checkpoint_from_before_the_activation_was_recorded_resumes_under_its_models_own(finished, tmp_path,
                                                                                          capsys):
    """Older runs recorded no activation in model_kwargs: they ran the model's own (GELU for ConvNeXt), which this run
    builds too; under --activation relu the same file is refused."""
    saved = read_checkpoint(finished)
    del saved["model_kwargs"]["activation"]
    torch.save(saved, tmp_path / "older.pth")
    assert main(_resume(tmp_path, tmp_path / "older.pth")) == 0
    assert "error" not in capsys.readouterr().err
    assert main(_resume(tmp_path, tmp_path / "older.pth", "--activation", "relu",
                        "--output", str(tmp_path / "relu"))) == 2
    assert "activation gelu (this run: relu)" in _one_error_line(capsys)


def test_resuming_a_weights_only_file_says_to_use_finetune(finished, tmp_path, capsys):
    torch.save({"model": read_checkpoint(finished)["model"]}, tmp_path / "weights.pth")  # an official release's layout
    assert main(_resume(tmp_path, tmp_path / "weights.pth")) == 2
    line = _one_error_line(capsys)
    assert "is not a training checkpoint (it has no optimizer," in line and "use --finetune" in line


def test_resuming_weights_that_do_not_fit_is_one_error_not_torchs_listing(finished, tmp_path, capsys):
    """Layer scale 0 builds no gammas: the checkpoint's gammas do not fit (the strict load's error, shortened)."""
    assert main(_resume(tmp_path, finished, "--layer-scale-init", "0")) == 2
    line = _one_error_line(capsys)
    assert "its weights do not fit this run's convnext_atto (Unexpected key(s)" in line and "--finetune" in line


def test_a_resume_trains_with_this_runs_weight_decay_and_betas_and_says_which_changed(finished, tmp_path, capsys):
    """Optimizer.load_state_dict takes the saved group settings: the flags (and config.json) must win."""
    resumed = dataclasses.replace(TINY, epochs=2, weight_decay=0.5, beta2=0.95, output=str(tmp_path / "run"),
                                  resume=str(finished))
    train(resumed, DistInfo())
    groups = read_checkpoint(tmp_path / "run" / "checkpoint_last.pth")["optimizer"]["param_groups"]
    assert sorted({group["weight_decay"] for group in groups}) == [0.0, 0.5]  # biases, norms, gammas: none
    assert {tuple(group["betas"]) for group in groups} == {(0.9, 0.95)}
    err = capsys.readouterr().err
    changed = "weight_decay 0.05 -> 0.5, betas (0.9, 0.999) -> (0.9, 0.95)"
    assert f"warning: this run's optimizer settings replace {finished}'s: {changed}\n" in err


def test_resuming_a_finished_run_says_there_is_nothing_to_train(finished, tmp_path, capsys):
    """A requeued job that already ran its epochs: exit 0, one warning line, nothing written."""
    assert main([*_resume(tmp_path, finished), "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert f"warning: nothing to train: {finished} has 1 epoch(s) done and --epochs is 1; raise --epochs" in err
    assert {path.name for path in (tmp_path / "run").iterdir()} <= {"tb"}  # no config.json, log or checkpoint


def _rerun(output, *flags: str) -> list[str]:
    """The command that made `finished`, run again into its folder (a re-applied Job, a rerun script)."""
    return ["--preset", "demo", "--epochs", "1", "--batch-size", "8", "--max-steps-per-epoch", "1", "--quiet",
            "--disable-eval", "--output", str(output), *flags]


def test_a_new_run_into_an_earlier_runs_output_is_refused_before_any_work(finished, capsys):
    """Started over at epoch 0, it would replace the earlier run's checkpoint_last.pth without a word."""
    before = {path.name: path.read_bytes() for path in finished.parent.iterdir() if path.is_file()}
    assert main(_rerun(finished.parent)) == 2
    line = _one_error_line(capsys)
    assert f"--output {finished.parent} holds an earlier run's checkpoint_last.pth: pass --resume {finished}" in line
    assert "--overwrite-checkpoints to start over" in line
    assert {path.name: path.read_bytes() for path in finished.parent.iterdir() if path.is_file()} == before


def test_overwrite_checkpoints_starts_over_in_an_earlier_runs_output(finished, tmp_path, capsys):
    output = tmp_path / "again"
    output.mkdir()
    (output / "checkpoint_last.pth").write_bytes(finished.read_bytes())
    assert main(_rerun(output, "--overwrite-checkpoints")) == 0
    assert "error" not in capsys.readouterr().err
    replaced = read_checkpoint(output / "checkpoint_last.pth")  # this run's, not the copy of the earlier one's
    assert replaced["epoch"] == 0 and replaced["config"]["overwrite_checkpoints"] is True


def _folder_of(finished, tmp_path, *names: str):
    """A copy of the earlier run's folder keeping only `names` (each with its sidecar); checkpoint_best*.pth are its
    checkpoint_last.pth, as the first epoch of a run with eval (and EMA) writes them."""
    output = tmp_path / "earlier"
    output.mkdir()
    for name in names:
        source = finished if name.startswith("checkpoint_") else finished.parent / name
        shutil.copyfile(source, output / name)
        if name.startswith("checkpoint_"):
            sidecar_path(output / name).write_text(sidecar_path(finished).read_text().replace(finished.name, name))
    return output


def _start_events(output) -> int:
    return [json.loads(line).get("event") for line in (output / "log.jsonl").read_text().splitlines()].count("start")


def test_a_new_run_into_a_folder_with_best_checkpoints_but_no_last_is_refused(finished, tmp_path, capsys):
    """The first epoch writes its best checkpoints before checkpoint_last.pth: a kill between the writes leaves them
    alone, and a new run would replace one and leave the other beside its own."""
    output = _folder_of(finished, tmp_path, "checkpoint_best.pth", "checkpoint_best_ema.pth", "log.jsonl")
    before = {path.name: path.read_bytes() for path in output.iterdir()}
    assert main(_rerun(output)) == 2
    line = _one_error_line(capsys)
    assert (f"--output {output} holds an earlier run's checkpoint_best.pth and checkpoint_best_ema.pth but no "
            f"checkpoint_last.pth (a run stopped during its first save?): pass --resume {output}/checkpoint_best.pth "
            "to continue from it, --overwrite-checkpoints to start over and remove them") in line
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert main(_rerun(output, "--resume", str(output / "checkpoint_best.pth"), "--epochs", "2")) == 0  # as it says
    assert read_checkpoint(output / "checkpoint_last.pth")["epoch"] == 1


def test_a_start_over_that_would_remove_its_own_finetune_source_is_refused_before_any_work(finished, tmp_path, capsys):
    """`--finetune <output>/checkpoint_best.pth --overwrite-checkpoints` removed the file it fine-tunes from: rank 0
    unlinks it while the other torchrun processes may still be loading it, and it is gone after the run. Refused
    (exit 2), however the path is spelled, and nothing is removed; --finetune from elsewhere starts over as before."""
    output = _folder_of(finished, tmp_path, "checkpoint_best.pth", "checkpoint_last.pth", "log.jsonl")
    before = {path.name: path.read_bytes() for path in output.iterdir()}
    for source in (output / "checkpoint_best.pth", output.parent / ".." / output.parent.name / output.name /
                   "checkpoint_last.pth"):
        assert main(_rerun(output, "--overwrite-checkpoints", "--finetune", str(source))) == 2
        line = _one_error_line(capsys)
        assert (f"--finetune {source} is one of the checkpoints --overwrite-checkpoints removes from --output {output}"
                in line and "copy it out of that folder" in line), line
        assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert main(_rerun(output, "--overwrite-checkpoints", "--finetune", str(finished))) == 0


def test_resume_and_overwrite_checkpoints_together_are_refused(finished, tmp_path, capsys):
    """--resume continues the run in --output and --overwrite-checkpoints starts a new one: one of them."""
    output = _folder_of(finished, tmp_path, "checkpoint_last.pth")
    before = {path.name: path.read_bytes() for path in output.iterdir()}
    resumed = output / "checkpoint_last.pth"
    assert main(_rerun(output, "--resume", str(resumed), "--epochs", "2", "--overwrite-checkpoints")) == 2
    assert f"--resume {resumed} continues the run in --output {output} and --overwrite-checkpoints starts a new one" \
        in _one_error_line(capsys)
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before


def test_overwrite_checkpoints_removes_every_file_of_the_earlier_run_and_says_so(finished, tmp_path, capsys):
    """This run (no eval) writes no best checkpoint: the earlier run's would stay beside its checkpoint_last.pth, and
    its log.jsonl would hold both runs' lines."""
    output = _folder_of(finished, tmp_path, "checkpoint_best.pth", "checkpoint_best_ema.pth", "checkpoint_last.pth",
                        "config.json", "log.jsonl")
    assert main(_rerun(output, "--overwrite-checkpoints")) == 0
    err = capsys.readouterr().err
    assert (f"warning: this run starts over in {output}: removed the earlier run's checkpoint_best.pth, "
            "checkpoint_best_ema.pth, checkpoint_last.pth, config.json, log.jsonl\n") in err
    assert sorted(path.name for path in output.iterdir() if path.name != "tb") == [
        "checkpoint_last.pth", "checkpoint_last.pth.sha256", "config.json", "log.jsonl"]
    assert _start_events(output) == 1
    assert json.loads((output / "config.json").read_text())["overwrite_checkpoints"] is True


def test_a_run_that_saved_no_checkpoint_is_started_over_without_its_log(finished, tmp_path, capsys):
    """Stopped in its first epoch, a run leaves config.json and log.jsonl: nothing to resume, so the same command
    starts over (a restarted Job), and its log.jsonl holds this run's lines only."""
    output = _folder_of(finished, tmp_path, "config.json", "log.jsonl")
    assert main(_rerun(output)) == 0
    err = capsys.readouterr().err
    assert f"warning: this run starts over in {output}: removed the earlier run's config.json, log.jsonl\n" in err
    assert _start_events(output) == 1

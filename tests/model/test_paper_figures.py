"""Params and GFLOPs (MACs) of every model the paper reports, within 1% of Tables 1, 2 and 9; `python -m model`."""
from __future__ import annotations

import subprocess
import sys

import pytest

from model import MODEL_CONFIGS
from model.__main__ import main
from model.flops import measure, within_paper_rounding

PAPER_ROWS = [
    pytest.param(name, figures, id=f"{name}-{figures.input_size_px}")
    for name, cfg in MODEL_CONFIGS.items()
    for figures in cfg.paper_figures()
]


def test_every_paper_table_row_is_covered():
    covered = {(p.values[0], p.values[1].input_size_px) for p in PAPER_ROWS}
    expected = {(f"convnext_{s}", 224) for s in ("tiny", "small", "base", "large", "xlarge")}
    expected |= {("convnext_base", 384), ("convnext_large", 384), ("resnet50", 224)}
    expected |= {(f"convnext_isotropic_{s}", 224) for s in ("small", "base", "large")}
    assert covered == expected


@pytest.mark.parametrize(("name", "paper"), PAPER_ROWS)
def test_params_and_macs_match_the_paper(name, paper):
    cost = measure(name, paper.input_size_px)
    # 1%, or the paper's own rounding: it prints 22M for the 22.3M isotropic ConvNeXt-S.
    assert within_paper_rounding(cost.params_m, paper.params_m), (cost.params_m, paper.params_m)
    assert within_paper_rounding(cost.gmacs, paper.gflops), (cost.gmacs, paper.gflops)
    assert abs(cost.gmacs - paper.gflops) / paper.gflops <= 0.01


def test_within_paper_rounding_rejects_two_percent_off():
    assert not within_paper_rounding(28.6 * 1.02, 28.6)
    assert within_paper_rounding(22.3, 22.0)
    assert not within_paper_rounding(22.6, 22.0)


def test_info_prints_params_and_gmacs(capsys):
    assert main(["info", "convnext_tiny", "--input-size", "384", "--activation", "relu"]) == 0
    assert capsys.readouterr().out.strip() == (
        "convnext_tiny (relu, 1000 classes) at 384x384: 28.59 M params, 13.09 GMACs"
    )


@pytest.mark.parametrize(("name", "size", "message"), [
    ("convnext_tiny", "0", "must be a positive number of px, got 0"),
    ("convnext_tiny", "-5", "must be a positive number of px, got -5"),
    ("convnext_tiny", "16", "16 px is too small for convnext_tiny, which downsamples 32x: pass at least 32"),
    ("convnext_isotropic_small", "8", "pass at least 16"),
])
def test_info_refuses_an_input_size_the_model_cannot_run_on(capsys, name, size, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["info", name, "--input-size", size])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("python -m model") and "error: argument --input-size: " in err and message in err


def test_the_smallest_input_size_is_the_models_total_stride(capsys):
    assert main(["info", "convnext_isotropic_small", "--input-size", "16"]) == 0
    assert main(["info", "convnext_tiny", "--input-size", "32"]) == 0
    assert "at 16x16" in capsys.readouterr().out
    with pytest.raises(ValueError, match="pass at least 32"):
        measure("convnext_tiny", 31)


def test_table_lists_every_model_against_the_paper():
    result = subprocess.run([sys.executable, "-m", "model", "info", "--all"], capture_output=True, text=True,
                            check=True)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| convnext") or line.startswith("| res")]
    assert {row.split("|")[1].strip() for row in rows} == set(MODEL_CONFIGS)
    assert "| convnext_large | 384 | 197.77 | 198 | 100.98 | 101 | -0.0% | Table 1 |" in rows


def test_info_rejects_an_unknown_model(capsys):
    with pytest.raises(SystemExit):
        main(["info", "convnext_gigantic"])
    assert "invalid choice" in capsys.readouterr().err

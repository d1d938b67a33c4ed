"""benchmarks/quality.py's larger-set schedule: K times the data for the same number of optimiser steps."""
from __future__ import annotations


import pytest

from helpers.benchmarks import benchmark_module


@pytest.fixture(scope="module")
def quality():
    return benchmark_module("quality")


def options(argv: list[str]) -> dict[str, float]:
    return {argv[i]: float(argv[i + 1]) for i in range(0, len(argv), 2)}


def test_scale_one_keeps_the_params_schedule(quality):
    assert quality.schedule({"epochs": 16, "warmup_epochs": 0.5}, 1) == []
    assert quality.dataset_name(0, 1) == "data-seed0"


@pytest.mark.parametrize("epochs, warmup, scale, images", [(16, 0.5, 4, 5000), (14, 0.5, 4, 5000), (9, 0.0, 2, 300)])
def test_larger_set_keeps_the_number_of_steps(quality, epochs, warmup, scale, images):
    got = options(quality.schedule({"epochs": epochs, "warmup_epochs": warmup}, scale))
    # images seen over the run: never fewer than at scale 1, at most one (larger) epoch more
    seen, seen_before = got["--epochs"] * images * scale, epochs * images
    assert seen_before <= seen < seen_before + images * scale
    assert got["--epochs"] == int(got["--epochs"])
    assert got["--warmup-epochs"] * images * scale == pytest.approx(warmup * images)  # the same warmup steps
    assert quality.dataset_name(3, scale) == f"data-seed3-x{scale}"


@pytest.mark.parametrize("steps", [2.0, 0.5])
def test_more_steps_multiply_the_steps_and_keep_the_warmup(quality, steps):
    images, scale, section = 5000, 4, {"epochs": 16, "warmup_epochs": 0.5}
    got = options(quality.schedule(section, scale, steps))
    assert got["--epochs"] * images * scale == steps * section["epochs"] * images
    assert got["--warmup-epochs"] * images * scale == pytest.approx(section["warmup_epochs"] * images)
    assert options(quality.schedule(section, 1, steps))["--epochs"] == steps * section["epochs"]


def test_a_failed_pipeline_command_is_one_line_naming_its_log(quality, tmp_path):
    log = tmp_path / "run" / "log.txt"
    with pytest.raises(quality.ChildFailed) as failure:
        quality.run(quality.pipeline("evaluate", "--model", tmp_path / "missing.pt"), log, 1)
    assert str(failure.value) == f"evaluate exited with 2; its log: {log}"
    assert "Missing option" in log.read_text()  # the command's own error is in its log

"""benchmarks/gpu_check.py where it can run without a GPU: its refusal without CUDA, the CPU dry run of the
same code paths (clearly labelled as not a GPU measurement), and a broken device path failing loudly."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.benchmarks import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def run(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def gpu_check():
    return benchmark_module("gpu_check")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_without_cuda_in_one_line():
    result = run()
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert "no CUDA device" in line and "--device cpu --tiny" in line


def test_cpu_needs_the_dry_run_flag():
    result = run("--device", "cpu")
    assert result.returncode == 2 and "--tiny" in result.stderr and result.stdout == ""


def test_cpu_dry_run_exercises_every_part_and_says_it_measures_no_gpu():
    result = run("--device", "cpu", "--tiny")
    assert result.returncode == 0, result.stderr[-3000:]
    [line] = result.stdout.strip().splitlines()
    report = json.loads(line)
    assert report["ok"] is True and report["gpu_measurement"] is False and "NOT a GPU measurement" in report["note"]
    extraction = report["extraction"]
    # float16 storage of a float32 forward: at most half a float16 ulp of the largest value (2^-11 relative)
    assert extraction["fp16_cache_vs_fp32_forward"]["max_difference_over_norm"] <= 2.0**-11
    assert extraction["end_to_end_over_forward"]["min"] <= extraction["end_to_end_over_forward"]["median"]
    pools = report["pools"]
    assert pools["scan_engine"] == "torch-cpu"  # the torch engine (what runs on CUDA), checked against numpy
    assert pools["exact_data"] == {"thresholds_equal": True, "negative_pairs_equal": True}
    steps = report["train_step"]
    assert steps["amp"] is False and set(steps["median_step_s"]) == {"plain", "ekd_cached", "ekd_online"}
    assert all(part["peak_gpu_memory_gib"] is None for part in (extraction, pools, steps))


def test_a_device_path_that_disagrees_fails_loudly(gpu_check, monkeypatch, capsys):
    """Negative control: the torch engine's products nudged by 1e-3 -> thresholds differ -> exit 1, one line."""
    from pipeline.search import backends

    exact = backends.TorchEngine.sims
    monkeypatch.setattr(backends.TorchEngine, "sims", lambda self, a, b: exact(self, a, b) + 1e-3)
    assert gpu_check.main(["--device", "cpu", "--tiny", "--parts", "pools"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    [line] = captured.err.strip().splitlines()
    assert line.startswith("gpu_check: FAILED: build-pools: thresholds")

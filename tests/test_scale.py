"""benchmarks/scale.py --tiny: the scale benchmark's code paths (every stage at two sizes, the killed and
resumed training epoch, the sampled-threshold check) still run and print their JSON lines. No timing is
checked: the figures are measured by the full run (docs/scale.md)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # processes of their own: skip locally with -m "not slow"; CI runs them

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["synthesize", "extract-teacher", "build-pools", "train-student", "evaluate"]


@pytest.mark.slow
def test_scale_tiny(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--tiny", "--work", str(tmp_path),
                           "--plot", str(tmp_path / "scale.png")], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    by_stage = {line["stage"]: line for line in lines}
    assert [s for s in STAGES if s in by_stage] == STAGES
    for stage in ("synthesize", "extract-teacher", "build-pools", "train-student"):
        line = by_stage[stage]
        assert line["sizes"] == [600, 1200] and len(line["wall_s"]) == 2
        assert all(rss > 0 for rss in line["peak_rss_mb"]) and all(d > 0 for d in line["disk_bytes"])
        assert isinstance(line["b_wall"], float)
    train = by_stage["train-student"]
    assert train["epoch"] == ["measured", "extrapolated"]
    assert train["resume_ok"][1] is True  # the killed epoch continued from its mid-epoch checkpoint
    error = by_stage["sample-error"]
    assert set(error["true_fpr_over_target"]) == {"exact", "300"}
    assert error["true_fpr_over_target"]["exact"]["1e-2"] == pytest.approx(1.0, abs=0.01)
    assert (tmp_path / "scale.png").stat().st_size > 0

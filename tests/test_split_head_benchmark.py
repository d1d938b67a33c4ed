"""benchmarks/split_head.py at a tiny size (1,001 classes, 2 gloo ranks, 16-d): its JSON against a direct
computation of what each rank's slice holds (rows x dim x 4 B) and of what a step communicates; its formulas
and README table; bad option values refused in one line. No timing thresholds."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.benchmarks import benchmark_module

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "split_head.py"
CLASSES, RANKS, DIM, BATCH = 1001, 2, 16, 8


@pytest.fixture(scope="module")
def bench():
    return benchmark_module("split_head")


@pytest.fixture(scope="module")
def result():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--classes", str(CLASSES), "--ranks", str(RANKS),
                           "--dim", str(DIM), "--batch", str(BATCH), "--steps", "2", "--warmup", "1",
                           "--replicated-full-ranks", str(RANKS)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = done.stdout.strip().splitlines()
    return json.loads(line)


@pytest.mark.slow
def test_each_ranks_head_memory_is_its_rows_times_dim_times_4(result):
    memory = result["head_memory_per_rank"]
    rows = [501, 500]  # contiguous, the first rank one row more
    assert memory["split"]["rows"] == rows
    for buffer in ("weights", "gradient", "momentum"):
        assert memory["split"][f"{buffer}_bytes"] == [r * DIM * 4 for r in rows]
        assert memory["replicated"][f"{buffer}_bytes"] == CLASSES * DIM * 4
    assert memory["split"]["total_bytes"] == [3 * r * DIM * 4 for r in rows]
    assert memory["replicated"]["measured_on_ranks"] == RANKS
    assert memory["check"]["max_deviation_rows"] == 0.5  # 501 and 500 against 1001 / 2
    assert memory["replicated_over_split"] == pytest.approx(CLASSES / 501, abs=1e-3)


@pytest.mark.slow
def test_communication_counted_from_the_collectives_is_the_formula(result):
    n = RANKS * BATCH
    want = [("all_gather", n * DIM * 4), ("all_gather", n * 8), ("all_reduce", n * 4), ("all_reduce", 2 * n * 4),
            ("all_reduce", n * DIM * 4)]
    split = result["head_communication_per_step"]["split"]
    assert [(c["op"], c["bytes"]) for c in split["measured"]] == want
    assert split["measured_bytes"] == split["formula_bytes"] == sum(size for _, size in want)
    # ring algorithms on 2 ranks: half of each all-gather's result, all of each all-reduce's
    wire = sum(size * (1 if op == "all_reduce" else 0.5) for op, size in want)
    assert split["ring_wire_bytes_per_rank"] == round(wire)
    replicated = result["head_communication_per_step"]["replicated"]
    assert replicated["measured"] == [{"op": "all_reduce", "what": "head gradient", "bytes": CLASSES * DIM * 4}]
    assert replicated["measured_bytes"] == replicated["formula_bytes"] == CLASSES * DIM * 4
    assert replicated["all_reduce_wall_s_min"] > 0
    ratio = result["head_communication_per_step"]["replicated_over_split"]
    assert ratio == pytest.approx(CLASSES * DIM * 4 / sum(size for _, size in want), abs=0.01)


@pytest.mark.slow
def test_the_report_names_its_setup_and_times_both_heads(result):
    assert result["ok"] is True and result["ranks"] == RANKS and result["global_batch"] == RANKS * BATCH
    assert result["replicated_setup"]["full_ranks"] == RANKS
    times = result["step_time"]
    for head in ("split", "replicated"):
        assert times[head]["wall_s_min"] > 0 and times[head]["cpu_s_min"] > 0
    assert len(result["peak_rss_bytes_per_rank"]) == RANKS
    only = result["memory_only"]  # the defaults: WebFace42M on 8 ranks, at this run's dim
    assert (only["classes"], only["ranks"]) == (2_059_906, 8)
    assert only["split_per_rank"]["rows"] == math.ceil(2_059_906 / 8) == 257_489
    assert only["split_per_rank"]["total_bytes"] == 3 * 257_489 * DIM * 4
    assert only["replicated_per_rank"]["total_bytes"] == 3 * 2_059_906 * DIM * 4


def test_formulas_at_glint360k_on_4_ranks_meet_the_target(bench):
    split = bench.communication(bench.split_collectives(512, 4, 128), 4)["bytes"]
    assert split == 512 * 512 * 4 * 2 + 512 * 8 + 512 * 4 * 3
    whole = bench.communication(bench.replicated_collectives(360_232, 512), 4)["bytes"]
    assert whole == 360_232 * 512 * 4 and whole / split >= 100
    assert bench.split_memory(360_232, 512, 4)["weights_bytes"] == 90_058 * 512 * 4


def test_the_readme_table_has_the_three_datasets_at_8_gpus(bench, capsys):
    assert bench.main(["--table"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "8 GPUs, 512-d, batch 128 per GPU" in lines[0] and len(lines) == 5
    glint = next(line for line in lines if line.startswith("| Glint360K"))
    cells = [cell.strip() for cell in glint.strip("|").split("|")]
    # 45,029 rows x 512 x 4 B x 3; the whole head x 3; 1,024 x 512 x 4 x 2 + 1,024 x (8 + 12); 0.74 GB
    assert cells[1:] == ["360,232", "277 MB", "2.21 GB", "4.21 MB", "738 MB", "175x"]


@pytest.mark.parametrize("args, message", [
    (["--classes", "0"], "argument --classes: 0: must be >= 1"),
    (["--ranks", "two"], "argument --ranks: 'two': not an integer"),
    (["--ranks", "100000"], "argument --ranks: 100000: more processes than this machine can run"),
    (["--warmup", "-1"], "argument --warmup: -1: must be >= 0"),
    (["--classes", "3", "--ranks", "4"], "--classes 3: fewer classes than --ranks 4 cannot be split"),
    (["--ranks", "2", "--replicated-full-ranks", "3"], "--replicated-full-ranks 3: more than --ranks 2"),
])
def test_bad_values_are_one_error_line_after_the_usage(bench, capsys, args, message):
    with pytest.raises(SystemExit) as exited:
        bench.parse(args)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    [line] = [line for line in err.splitlines() if not line.startswith(("usage:", " "))]
    assert line.startswith(f"split_head.py: error: {message}"), err

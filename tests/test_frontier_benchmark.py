"""benchmarks/frontier.py: MACs, the schedule search, the resumable ledger, and the summary's figures."""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

from helpers.benchmarks import BENCHMARKS, benchmark_module
from pipeline.models.complexity import complexity, count_macs

FRONTIER = {
    "seeds": [1, 2, 3], "search_seed": 0,
    "schedules": {"e8": {"epochs": 8}, "e16": {"epochs": 16}, "e24": {"epochs": 24}},
    "sizes": {"small": {"arch": "mbf", "width": 0.25}, "large": {"arch": "r18", "width": 0.5}},
    "methods": {"baseline": {"kd": "none"}, "l2_hard_pairs": {"kd": "l2"}, "ekd": {"kd": "l2+ekd"}},
}
PARAMS = {"student": {"epochs": 16, "warmup_epochs": 0.5}, "frontier": FRONTIER}


@pytest.fixture(scope="module")
def frontier():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield benchmark_module("frontier")
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def report():
    return benchmark_module("frontier_report")


def test_macs_of_a_small_network_by_hand():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    # 8x8x4 outputs x 3 inputs x 9 taps; 4x4x4 depthwise outputs x 1 input x 9 taps; 64 inputs x 5 outputs
    assert count_macs(model, 8) == 8 * 8 * 4 * 3 * 9 + 4 * 4 * 4 * 9 + 64 * 5
    assert complexity(model, 8)["parameters"] == (4 * 3 * 9 + 4) + (4 * 9 + 4) + (64 * 5 + 5)
    assert model.training  # the count leaves the model as it found it


def test_macs_scale_with_the_image_area_and_hooks_are_removed():
    from pipeline.models import get_model

    model = get_model("mbf", width=0.25, num_features=128, input_size=32)
    small = count_macs(model, 32)
    assert all(not m._forward_hooks for m in model.modules())
    bigger = get_model("mbf", width=0.25, num_features=128, input_size=64)
    # every conv's output grows 4x; only the embedding layer (a fixed-size linear/conv head) does not
    assert 3.5 * small < count_macs(bigger, 64) <= 4 * small
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 128)


def _search_entries(frontier, scores: dict[str, float], method="baseline", size="small"):
    return {frontier.Job("search", size, method, s, 0).key: {"monitor": {"tpr@fpr=1e-4": v}} for s, v in scores.items()}


def test_the_schedule_with_the_best_monitor_tpr_is_chosen_and_ties_keep_the_cheaper(frontier):
    schedules = list(FRONTIER["schedules"])
    entries = _search_entries(frontier, {"e8": 0.30, "e16": 0.35, "e24": 0.34})
    assert frontier.choose_schedules(entries, "small", "baseline", schedules, 0) == "e16"
    entries = _search_entries(frontier, {"e8": 0.35, "e16": 0.35, "e24": 0.30})
    assert frontier.choose_schedules(entries, "small", "baseline", schedules, 0) == "e8"
    entries = _search_entries(frontier, {"e8": 0.35, "e16": 0.36})
    assert frontier.choose_schedules(entries, "small", "baseline", schedules, 0) is None  # e24 still missing


def test_test_runs_are_planned_only_after_the_whole_search_with_its_choice(frontier):
    entries = _search_entries(frontier, {"e8": 0.30, "e16": 0.31})
    assert frontier.plan(FRONTIER, ["small"], ["baseline"], "test", entries) == []
    entries.update(_search_entries(frontier, {"e24": 0.40}))
    jobs = frontier.plan(FRONTIER, ["small"], ["baseline"], "test", entries)
    assert [(j.schedule, j.seed) for j in jobs] == [("e24", 1), ("e24", 2), ("e24", 3)]
    search = frontier.plan(FRONTIER, ["small"], ["baseline", "ekd"], "search", {})
    assert {(j.method, j.schedule, j.seed) for j in search} == {(m, s, 0) for m in ("baseline", "ekd")
                                                                for s in ("e8", "e16", "e24")}


def test_options_are_the_cli_merge_of_the_sections(frontier):
    job = frontier.Job("test", "large", "ekd", "e24", 1)
    assert frontier.resolved_options(PARAMS, job) == {"epochs": 24, "warmup_epochs": 0.5, "arch": "r18",
                                                      "width": 0.5, "kd": "l2+ekd"}
    assert job.sections()[1:] == ["frontier.sizes.large", "frontier.methods.ekd", "frontier.schedules.e24"]


def test_a_torn_ledger_line_is_skipped_and_a_later_line_wins(frontier, tmp_path, capsys):
    ledger = tmp_path / "runs.jsonl"
    ledger.write_text(json.dumps({"key": "a", "v": 1}) + "\n" + json.dumps({"key": "a", "v": 2}) + '\n{"key": "b", "v')
    assert frontier.read_ledger(ledger) == {"a": {"key": "a", "v": 2}}
    assert "line 3" in capsys.readouterr().err


class FakeRuns:
    """Stands in for the pipeline commands: writes what train-student and evaluate would, records calls, and
    can fail (a kill) at a given call."""

    def __init__(self, fail_at: int | None = None):
        self.calls, self.fail_at = [], fail_at

    def __call__(self, command, log, threads):
        command = list(map(str, command))
        out = command[command.index("--out") + 1]
        self.calls.append((command[3], out))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("killed")
        from pathlib import Path

        out = Path(out)
        if command[3] == "train-student":
            seed, epochs = int(command[command.index("--seed") + 1]), int(out.parent.name[1:])
            (out / "dvclive").mkdir(parents=True, exist_ok=True)
            monitor = {"tpr@fpr=1e-4": epochs / 100 + seed / 1000}
            (out / "dvclive" / "metrics.json").write_text(json.dumps({"eval": {"monitor": monitor,
                                                                               "val": {"accuracy": 0.9}}}))
        else:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps({"test": {f"tpr@fpr={f}": 0.5 for f in ("1e-3", "1e-4", "1e-5")}}))


def _sweep(frontier, tmp_path, monkeypatch, runs, params=PARAMS):
    monkeypatch.setattr(frontier, "run", runs)
    monkeypatch.setattr(frontier.Sweep, "complexity", lambda self, job: {"parameters": 1, "macs": 2})
    monkeypatch.setattr(frontier.Sweep, "fidelity", lambda self, model: {})
    sweep = frontier.Sweep(params, {"data": "d", "cache": "c", "pools": "p", "teacher": "t"}, tmp_path / "work",
                           tmp_path / "runs.jsonl", 1, "teacher-1")
    for phase in frontier.PHASES:
        sweep.run_all(frontier.plan(params["frontier"], ["small"], ["baseline", "ekd"], phase, sweep.entries))
    return sweep


def test_a_killed_sweep_reruns_only_what_is_missing_and_test_rec_waits_for_the_choice(frontier, tmp_path, monkeypatch):
    with pytest.raises(RuntimeError):
        _sweep(frontier, tmp_path, monkeypatch, FakeRuns(fail_at=4))
    finished = frontier.read_ledger(tmp_path / "runs.jsonl")
    assert len(finished) == 5  # the failed run's siblings still finish
    runs = FakeRuns()
    sweep = _sweep(frontier, tmp_path, monkeypatch, runs)
    trained = [out for command, out in runs.calls if command == "train-student"]
    assert len(trained) == 1 + 2 * 3  # the failed search run, then 3 test seeds for each method
    assert not any(entry["run"] in trained for entry in finished.values())
    evaluated = [i for i, (command, _) in enumerate(runs.calls) if command == "evaluate"]
    first_test = min(i for i, (command, out) in enumerate(runs.calls) if "seed1" in out)
    assert len(evaluated) == 6 and min(evaluated) > first_test  # only test runs read test.rec
    tests = [e for e in sweep.entries.values() if e["phase"] == "test"]
    assert {e["schedule"] for e in tests} == {"e24"}  # the best monitor of the fake runs
    assert _sweep(frontier, tmp_path, monkeypatch, again := FakeRuns()).entries.keys() == sweep.entries.keys()
    assert again.calls == []  # everything finished: nothing runs again


def test_a_changed_option_or_teacher_reruns_the_run(frontier, tmp_path, monkeypatch):
    _sweep(frontier, tmp_path, monkeypatch, FakeRuns())
    changed = json.loads(json.dumps(PARAMS))
    changed["frontier"]["methods"]["ekd"]["ekd_weight"] = 0.5
    runs = FakeRuns()
    _sweep(frontier, tmp_path, monkeypatch, runs, changed)
    assert {out.split("/")[-3] for c, out in runs.calls if c == "train-student"} == {"ekd"}
    assert len([c for c, _ in runs.calls if c == "train-student"]) == 3 + 3


def _test_entry(size, method, seed, tprs, parameters=100, cos=(0.9, 0.8)):
    return {"phase": "test", "size": size, "method": method, "schedule": "e16", "seed": seed,
            "parameters": parameters, "macs": 10 * parameters,
            "test": {f"tpr@fpr={f}": v for f, v in zip(("1e-3", "1e-4", "1e-5"), tprs)},
            "fidelity": {"train": {"cos_to_teacher": cos[0], "pair_corr": 0.5},
                         "test": {"cos_to_teacher": cos[1], "pair_corr": 0.4}}}


def test_the_summary_against_a_direct_computation(report, tmp_path):
    base = {1: 0.20, 2: 0.22, 3: 0.21}
    ekd = {1: 0.30, 2: 0.35, 3: 0.31}
    l2 = {1: 0.29, 2: 0.33, 3: 0.32}
    entries = [_test_entry("small", m, s, (0.5, v[s], 0.1)) for m, v in
               (("baseline", base), ("ekd", ekd), ("l2_hard_pairs", l2)) for s in (1, 2, 3)]
    entries.append({"phase": "search", "size": "small", "method": "ekd", "schedule": "e8", "seed": 0,
                    "parameters": 100, "macs": 1000, "monitor": {"tpr@fpr=1e-4": 0.25}})
    teacher_test = {"tpr@fpr=1e-3": 0.6, "tpr@fpr=1e-4": 0.34, "tpr@fpr=1e-5": 0.2,
                    "tpr_se": {"1e-3": 0.005, "1e-4": 0.004, "1e-5": 0.003}}
    summary = report.summarise(entries, FRONTIER, teacher_test)
    small = summary["sizes"]["small"]
    assert list(summary["sizes"]) == ["small"] and small["search"] == {"ekd": {"e8": 0.25}}
    got = small["methods"]["ekd"]["1e-4"]
    mean = sum(ekd.values()) / 3
    se = math.sqrt(sum((v - mean) ** 2 for v in ekd.values()) / 2 / 3)
    assert got["mean"] == pytest.approx(mean) and got["se"] == pytest.approx(se)
    diffs = [ekd[s] - base[s] for s in (1, 2, 3)]
    assert got["vs_baseline"]["mean"] == pytest.approx(sum(diffs) / 3)
    assert got["gap_closed"]["mean"] == pytest.approx(sum((ekd[s] - base[s]) / (0.34 - base[s]) for s in base) / 3)
    assert got["vs_teacher"]["mean"] == pytest.approx(mean - 0.34)
    assert got["vs_teacher"]["se"] == pytest.approx(math.sqrt(se ** 2 + 0.004 ** 2))
    term = small["ekd_term"]["1e-4"]
    assert term["diffs"] == pytest.approx([ekd[s] - l2[s] for s in (1, 2, 3)])
    assert small["best"] == "ekd" and set(small["within_1se_of_best"]) == {"ekd", "l2_hard_pairs"}
    assert small["methods"]["ekd"]["fidelity"]["cos_to_teacher"]["test"]["mean"] == pytest.approx(0.8)
    report.plot(summary, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:4] == b"\x89PNG"


def test_a_pinned_teacher_is_a_byte_copy_that_the_sweep_reads_back(frontier, tmp_path):
    made = {"teacher": tmp_path / "t" / "model.pt", "cache": tmp_path / "c" / "teacher.h5",
            "pools": tmp_path / "p", "metrics": tmp_path / "e" / "metrics.json"}
    for key, path in made.items():
        target = path / "pools.h5" if key == "pools" else path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(key.encode() * 3)
    (made["pools"] / "thresholds.json").write_text("{}")
    params = {"data": {"dir": "d"}, "teacher": {"checkpoint": str(made["teacher"]), "eval_dir": str(tmp_path / "e")},
              "extract": {"out": str(made["cache"])}, "pools": {"out": str(made["pools"])}}
    paths = frontier.teacher_paths(params, None)
    assert {k: paths[k] for k in made} == made
    frontier.pin_teacher(paths, tmp_path / "pinned")
    pinned = frontier.teacher_paths(params, tmp_path / "pinned")
    for key in ("teacher", "cache", "metrics"):
        assert pinned[key].read_bytes() == made[key].read_bytes() and pinned[key] != made[key]
    assert sorted(p.name for p in pinned["pools"].iterdir()) == ["pools.h5", "thresholds.json"]
    assert not list((tmp_path / "pinned").rglob("*.partial"))

"""benchmarks/ensemble.py: the members' commands, the ensemble students' commands (every member cache, no
single-model fidelity), and the summary's figures against a direct computation."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from helpers.benchmarks import BENCHMARKS, benchmark_module


@pytest.fixture(scope="module")
def ensemble():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield benchmark_module("ensemble")
    finally:
        sys.path.remove(str(BENCHMARKS))


class Recorder:
    """Stands in for `run`: records each pipeline command and writes the file the command would."""

    def __init__(self):
        self.commands = []

    def __call__(self, command, log, threads):
        command = [str(c) for c in command]
        self.commands.append(command[3:])
        out = Path(command[command.index("--out") + 1])
        if command[3] == "train-teacher":
            out.mkdir(parents=True, exist_ok=True)
            (out / "model.pt").write_bytes(b"model")
        elif command[3] == "extract-teacher":
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(b"cache")
        elif command[3] == "train-student":
            (out / "dvclive").mkdir(parents=True, exist_ok=True)
            (out / "dvclive" / "metrics.json").write_text(json.dumps(
                {"eval": {"monitor": {"tpr@fpr=1e-4": 0.3}, "val": {"accuracy": 0.9}}}))
        else:  # evaluate
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps({"test": {f"tpr@fpr=1e-{k}": 0.1 * k for k in (3, 4, 5)}}))


def test_members_are_trained_and_extracted_once_and_pinned_members_never(ensemble, tmp_path, monkeypatch):
    runs = Recorder()
    monkeypatch.setattr(ensemble, "run", runs)
    specs = {"pinned": {"pinned": str(tmp_path / "frontier")}, "mbf": {"arch": "mbf", "width": 1.0, "seed": 0}}
    for _ in range(2):  # the second pass finds every output and runs nothing
        for name, spec in specs.items():
            paths = ensemble.member_paths(name, spec, tmp_path / "work")
            ensemble.prepare_member(name, spec, paths, Path("data"), tmp_path / "log", 1)
    assert [c[0] for c in runs.commands] == ["train-teacher", "extract-teacher"]
    train, extract = runs.commands
    assert train[train.index("--arch") + 1] == "mbf" and train[train.index("--width") + 1] == "1.0"
    assert train[train.index("--seed") + 1] == "0" and "params.yaml:teacher_training.demo" in train
    assert extract[extract.index("--teacher") + 1] == str(tmp_path / "work" / "teachers" / "mbf" / "model.pt")
    pinned = ensemble.member_paths("pinned", specs["pinned"], tmp_path / "work")
    assert pinned["cache"] == tmp_path / "frontier" / "teacher.h5"


def test_the_ensemble_of_models_is_evaluated_with_every_member(ensemble, tmp_path, monkeypatch):
    runs = Recorder()
    monkeypatch.setattr(ensemble, "run", runs)
    test = ensemble.evaluated([Path("a.pt"), Path("b.pt")], Path("data"), tmp_path / "eval", tmp_path / "log", 1)
    assert runs.commands[0][runs.commands[0].index("--model"):][:4] == ["--model", "a.pt", "--model", "b.pt"]
    assert test["tpr@fpr=1e-4"] == pytest.approx(0.4)
    ensemble.evaluated([Path("a.pt")], Path("data"), tmp_path / "eval", tmp_path / "log", 1)
    assert len(runs.commands) == 1  # evaluated once


def test_ensemble_students_read_every_member_cache_and_skip_fidelity(ensemble, tmp_path, monkeypatch):
    import frontier

    runs = Recorder()
    monkeypatch.setattr(frontier, "run", runs)
    monkeypatch.setattr(frontier.Sweep, "complexity", lambda self, job: {"parameters": 1, "macs": 2})
    params = {"student": {"epochs": 16}, "frontier": {"sizes": {"s": {"arch": "mbf"}}, "methods": {"ekd": {}},
                                                      "schedules": {"e16": {"epochs": 16}}}}
    sweep = frontier.Sweep(params, {"data": "d", "teacher": None, "cache": [Path("a.h5"), Path("b.h5")],
                                    "pools": "p"}, tmp_path / "work", tmp_path / "runs.jsonl", 1, "ensemble-id")
    sweep.run_all([frontier.Job("test", "s", "ekd", "e16", 1)])
    student = runs.commands[0]
    caches = [student[i + 1] for i, a in enumerate(student) if a == "--cache"]
    assert caches == ["a.h5", "b.h5"]
    (entry,) = sweep.entries.values()
    assert "fidelity" not in entry and entry["teacher"] == "ensemble-id"


def test_ensemble_against_its_best_member_by_hand(ensemble):
    a = {f: {"tpr": t, "se": s} for f, t, s in (("1e-3", 0.7, 0.004), ("1e-4", 0.45, 0.005), ("1e-5", 0.2, 0.0))}
    b = {f: {"tpr": t, "se": s} for f, t, s in (("1e-3", 0.65, 0.003), ("1e-4", 0.40, 0.005), ("1e-5", 0.2, 0.0))}
    got = ensemble.versus(a, b)
    assert got["1e-4"]["mean"] == pytest.approx(0.05)
    assert got["1e-4"]["se"] == pytest.approx(math.sqrt(2) * 0.005)
    assert got["1e-3"]["z"] == pytest.approx(0.05 / 0.005)
    assert math.isnan(got["1e-5"]["z"])
    jobs = [ensemble.Job("test", "s", "ekd", "e16", seed) for seed in (1, 2, 3)]
    entries = {j.key: {"seed": j.seed, "test": {f"tpr@fpr={f}": 0.1 * j.seed for f in ("1e-3", "1e-4", "1e-5")}}
               for j in jobs[:2]}
    assert ensemble.student_summary(entries, jobs)["1e-4"] == {1: pytest.approx(0.1), 2: pytest.approx(0.2)}


def test_the_frontier_runs_of_the_same_jobs_and_teacher_are_reused_and_the_frontier_ledger_untouched(
        ensemble, tmp_path, monkeypatch):
    import frontier

    runs = Recorder()
    monkeypatch.setattr(frontier, "run", runs)
    monkeypatch.setattr(frontier.Sweep, "complexity", lambda self, job: {"parameters": 1, "macs": 2})
    monkeypatch.setattr(frontier.Sweep, "fidelity", lambda self, model: {})
    params = {"student": {"epochs": 16}, "frontier": {"sizes": {"s": {"arch": "mbf"}}, "methods": {"ekd": {}},
                                                      "schedules": {"e16": {"epochs": 16}}}}
    jobs = [frontier.Job("test", "s", "ekd", "e16", seed) for seed in (1, 2)]
    paths = {"data": "d", "teacher": "t", "cache": "c", "pools": "p"}
    theirs = frontier.Sweep(params, paths, tmp_path / "frontier", tmp_path / "frontier.jsonl", 1, "pinned")
    theirs.run_all(jobs[:1])
    before = (tmp_path / "frontier.jsonl").read_text()
    mine = frontier.Sweep(params, paths, tmp_path / "mine", tmp_path / "mine.jsonl", 1, "pinned")
    ensemble.reuse(mine, tmp_path / "frontier.jsonl", jobs)
    runs.commands.clear()
    mine.run_all(jobs)
    trained = [c for c in runs.commands if c[0] == "train-student"]
    assert len(trained) == 1 and "seed2" in trained[0][trained[0].index("--out") + 1]  # seed 1 was reused
    assert (tmp_path / "frontier.jsonl").read_text() == before
    other = frontier.Sweep(params, paths, tmp_path / "other", tmp_path / "other.jsonl", 1, "another-teacher")
    ensemble.reuse(other, tmp_path / "frontier.jsonl", jobs)
    runs.commands.clear()
    other.run_all(jobs)
    assert len([c for c in runs.commands if c[0] == "train-student"]) == 2  # another teacher: nothing reused

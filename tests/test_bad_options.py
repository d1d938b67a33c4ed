"""Options and params.yaml values that would silently train nothing, something else, or write elsewhere are
refused with one line naming the option (or the params file, section and key), exit code 2, nothing written."""
from __future__ import annotations

import math

import pytest
from helpers.console import one_line_error

from pipeline.errors import PipelineError
from pipeline.training.config import TrainConfig


@pytest.mark.parametrize("margin, m, ok", [("arcface", 0.5, True), ("arcface", 0.0, True), ("arcface", 1.5, True),
                                           ("arcface", math.pi / 2, False), ("arcface", 10, False),
                                           ("cosface", 0.4, True), ("cosface", 1.99, True), ("cosface", 2.0, False)])
def test_margin_is_bounded_per_head(margin, m, ok):
    if ok:
        assert TrainConfig(margin=margin, margin_m=m).margin_m == m
    else:
        with pytest.raises(PipelineError, match=f"--margin-m .*--margin {margin}.*must be <"):
            TrainConfig(margin=margin, margin_m=m)


@pytest.mark.parametrize("milestones", ["-5,1000", "0", "5,3", "4,4", "21", "nan"])
def test_bad_milestones_are_refused(milestones):
    with pytest.raises(PipelineError, match="--lr-milestones"):
        TrainConfig(epochs=20, lr_schedule="step", lr_milestones=milestones)


def test_good_milestones_pass():
    assert TrainConfig(epochs=20, lr_milestones="10,15,20").lr_milestones == (10.0, 15.0, 20.0)


@pytest.mark.parametrize("section, message", [
    ("bool_int", "p.yaml:bool_int: epochs: true is a boolean; this option takes an integer"),
    ("bool_float", "p.yaml:bool_float: lr: false is a boolean; this option takes a number"),
    ("null_required", "p.yaml:null_required: data: null is not a value of this option"),
    ("null_default", "p.yaml:null_default: epochs: null is not a value of this option"),
    ("list_scalar", "p.yaml:list_scalar: epochs: [1, 2] is a list; this option takes one value"),
    ("dict_scalar", "p.yaml:dict_scalar: margin: a dict is not a value of this option"),
    ("int_flag", "p.yaml:int_flag: amp: 1 is not a boolean"),
    ("bool_text", "p.yaml:bool_text: arch: true is a boolean; this option takes text"),
    ("empty_path", "an empty path names no file or folder"),
])
def test_params_values_of_the_wrong_yaml_type_are_refused(tmp_path, capsys, monkeypatch, section, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text(
        "bool_int: {epochs: true}\nbool_float: {lr: false}\nnull_required: {data: null}\nnull_default: {epochs: null}\n"
        "list_scalar: {epochs: [1, 2]}\ndict_scalar: {margin: {a: 1}}\nint_flag: {amp: 1}\nbool_text: {arch: yes}\n"
        "empty_path: {out: ''}\n")
    line = one_line_error(capsys, "train-teacher", "--data", tmp_path / "nowhere", "--params", f"p.yaml:{section}")
    assert message in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_params_values_that_fit_are_taken(tmp_path, capsys, monkeypatch):
    """A list for the comma-separated milestones, a string number (YAML reads 1e-4 as text), null for an option
    without a default: all pass the params check (the run then stops at the missing data)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.yaml").write_text("s: {lr_milestones: [2, 3], epochs: 4, lr: 1e-4, margin_m: null, amp: false}\n")
    line = one_line_error(capsys, "train-teacher", "--data", tmp_path / "nowhere", "--out", tmp_path / "run", "--params", "p.yaml:s")
    assert "no face set here" in line


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", " x", "a\\b"])
def test_student_name_must_be_one_folder_name(tmp_path, capsys, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    line = one_line_error(capsys, "train-student", "--data", tmp_path / "nowhere", "--name", name, "--kd", "none")
    assert line.startswith(f"error: --name {name!r}: a student name must be a single folder name")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", [["synthesize", "--out", ""], ["export", "--model", "m.pt", "--onnx", ""],
                                     ["report", "--teacher", "t", "--students", "s", "--out", ""],
                                     ["train-teacher", "--data", "d", "--out", " "]])
def test_empty_paths_are_refused(tmp_path, capsys, monkeypatch, command):
    monkeypatch.chdir(tmp_path)
    assert "an empty path names no file or folder" in one_line_error(capsys, *command)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command, message", [
    (["synthesize", "--out", "s", "--identities", 10**9], "--identities 1000000000: must be <= 10000000"),
    (["synthesize", "--out", "s", "--images-per-identity", 10**9], "--images-per-identity 1000000000: must be <="),
    (["train-teacher", "--data", "d", "--out", "t", "--embedding-size", 10**9], "--embedding-size 1000000000: must"),
])
def test_absurd_sizes_are_refused_before_allocating(tmp_path, capsys, monkeypatch, command, message):
    monkeypatch.chdir(tmp_path)
    assert one_line_error(capsys, *command).startswith(f"error: {message}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("batch", [49, 10**9])
def test_batch_larger_than_the_data_is_one_line(random_faces, tmp_path, capsys, batch):
    line = one_line_error(capsys, "train-teacher", "--data", random_faces, "--out", tmp_path / "run", "--arch", "mbf",
                          "--width", 0.125, "--embedding-size", 16, "--batch-size", batch, "--workers", 0,
                          "--device", "cpu")
    assert line == (f"error: --batch-size {batch} x 1 processes: more than the 48 images of the training data (one "
                    "batch is drawn without repeats)")

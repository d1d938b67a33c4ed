"""A damaged run folder on resume (`train-teacher`; students resume through the same code): a checkpoint.pt
whose entries are missing or of the wrong type, or whose tensors do not fit the model or optimiser, and a
damaged DVCLive history, are one line naming the file, exit 2. Damage in history rows the resumed run logs
again is dropped with them."""
from __future__ import annotations

import re
import shutil

import pytest
import torch
from helpers.console import console, one_line_error

from pipeline import cli

ARGS = ["train-teacher", "--arch", "mbf", "--width", 0.125, "--embedding-size", 16, "--epochs", 2, "--batch-size", 8,
        "--workers", 0, "--device", "cpu", "--log-every", 1]


@pytest.fixture(scope="module")
def stopped(random_faces, tmp_path_factory):
    """A run stopped after epoch 1 of 2 (6 steps, every step logged): checkpoint.pt and dvclive/."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(a) for a in [*ARGS, "--data", random_faces, "--out", out, "--stop-after-epochs", 1]])
    assert exit_info.value.code in (0, None) and (out / "checkpoint.pt").is_file()
    return out


def _copy(stopped, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    return run


def _edit(change):
    def damage(run):
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        change(state)
        torch.save(state, run / "checkpoint.pt")
    return damage


def _first(tensors: dict, dim: int = 1) -> str:
    return next(key for key, value in tensors.items() if value.dim() >= dim)


def _wider(state):  # a model tensor as a run of another width would have it
    key = _first(state["trainee"])
    state["trainee"][key] = torch.zeros(state["trainee"][key].shape[0] * 2, *state["trainee"][key].shape[1:])


def _retyped(dtype):
    def change(state):
        key = _first(state["trainee"])
        state["trainee"][key] = state["trainee"][key].to(dtype)
    return change


def _momentum_reshaped(state):
    slot = next(s for s in state["optimizer"]["state"].values() if "momentum_buffer" in s)
    slot["momentum_buffer"] = slot["momentum_buffer"].reshape(-1)[:-1]


def _parameter_dropped(state):
    state["optimizer"]["param_groups"][0]["params"].pop()


CHECKPOINTS = {
    "model tensor of another width": (_edit(_wider), r"model tensor '.*' is torch.float32 \(\d+, .*this run's"),
    "model tensor float64": (_edit(_retyped(torch.float64)), r"model tensor '.*' is torch.float64"),
    "model tensor int64": (_edit(_retyped(torch.int64)), r"model tensor '.*' is torch.int64"),
    "momentum of another shape": (_edit(_momentum_reshaped), r"optimiser momentum_buffer of parameter \d+ is"),
    "optimiser lacks a parameter": (_edit(_parameter_dropped), r"the optimiser state holds \d+ parameters, this run's"),
    "scheduler missing": (_edit(lambda s: s.pop("scheduler")), r"entry 'scheduler' is missing"),
    "model as a list": (_edit(lambda s: s.update(trainee=[1, 2])), r"entry 'trainee' is a list, expected a dict"),
    "epochs as text": (_edit(lambda s: s.update(epochs_done="1")), r"entry 'epochs_done' is a str"),
    "negative epochs": (_edit(lambda s: s.update(epochs_done=-3)), r"entry 'epochs_done' is -3"),
    "rng state too short": (_edit(lambda s: s.update(torch_rng=torch.zeros(1, 3, dtype=torch.uint8))),
                            r"\(RuntimeError\)"),
    "model tensor as a string": (_edit(lambda s: s["trainee"].update({_first(s["trainee"]): "x"})),
                                 r"model tensor '.*' is a str, not a tensor"),
}

@pytest.mark.parametrize("case", list(CHECKPOINTS))
def test_damaged_checkpoint_is_one_line(case, stopped, random_faces, tmp_path, capsys):
    run = _copy(stopped, tmp_path)
    damage, message = CHECKPOINTS[case]
    damage(run)
    line = one_line_error(capsys, *ARGS, "--data", random_faces, "--out", run)
    assert line.startswith(f"error: {run / 'checkpoint.pt'}: cannot resume: "), line
    assert line.endswith("; delete it or use --no-resume") and re.search(message, line), line
    assert not (run / "model.pt").exists()


def test_undamaged_copy_resumes(stopped, random_faces, tmp_path, capsys):
    """The cases here fail for their damage: the same run folder undamaged resumes and finishes."""
    run = _copy(stopped, tmp_path)
    code, lines = console(capsys, *ARGS, "--data", random_faces, "--out", run)
    assert code in (0, None) and (run / "model.pt").is_file(), lines


LOSS = ("plots", "metrics", "train", "loss.tsv")
HISTORIES = {  # damage to line 3 of train/loss.tsv (step 1, before the resume step 6)
    "garbage bytes": b"\xff\xfe\x00garbage\x81\n",
    "text value": b"1\tlow\n",
    "NaN value": b"1\tnan\n",
    "a field missing": b"1\n",
    "a field too many": b"1\t2.0\t3.0\n",
    "fractional step": b"1.5\t2.0\n",
}


def _lines(run) -> list[bytes]:
    return (run / "dvclive").joinpath(*LOSS).read_bytes().splitlines(keepends=True)


@pytest.mark.parametrize("case", list(HISTORIES))
def test_damaged_history_before_the_resume_step_is_one_line(case, stopped, random_faces, tmp_path, capsys):
    run = _copy(stopped, tmp_path)
    lines = _lines(run)
    assert lines[0] == b"step\tloss\n" and lines[2].startswith(b"1\t")  # the layout damaged here
    lines[2] = HISTORIES[case]
    (run / "dvclive").joinpath(*LOSS).write_bytes(b"".join(lines))
    line = one_line_error(capsys, *ARGS, "--data", random_faces, "--out", run)
    assert line.startswith(f"error: {(run / 'dvclive').joinpath(*LOSS)} line 3: damaged row "), line
    assert not (run / "model.pt").exists()


def test_damaged_history_after_the_resume_step_is_dropped(stopped, random_faces, tmp_path, capsys):
    """Rows a killed run logged after its checkpoint, damaged among them, are replaced by the resumed run's."""
    run = _copy(stopped, tmp_path)
    lines = _lines(run)
    extra = [b"6\t2.0\n", b"\xff\xfe garbage\n", b"8\tnan\n"]
    (run / "dvclive").joinpath(*LOSS).write_bytes(b"".join(lines + extra))
    code, output = console(capsys, *ARGS, "--data", random_faces, "--out", run)
    assert code in (0, None), output
    steps = [int(row.split(b"\t")[0]) for row in _lines(run)[1:]]
    assert steps == list(range(12))

"""Damaged result files at `pipeline report`: metrics.json, roc.csv, ijbc.json and DVCLive .tsv files that are
truncated, garbage, of wrong types, NaN or missing columns are one line naming the file, exit code 2, and no
report written."""
from __future__ import annotations

import pytest
from helpers.console import one_line_error
from test_report import ROC, _write_ijb, write_eval

GARBAGE = b"\xff\xfe\x00garbage\x81"


@pytest.fixture
def runs(tmp_path):
    write_eval(tmp_path / "teacher", {"1e-3": 0.7, "1e-4": 0.5}, 0.95, params=2_930_000)
    write_eval(tmp_path / "students" / "baseline", {"1e-3": 0.5, "1e-4": 0.1}, 0.90, params=140_000)
    _write_ijb(tmp_path / "teacher", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    metrics = tmp_path / "runs" / "baseline" / "dvclive" / "plots" / "metrics" / "epoch"
    metrics.mkdir(parents=True)
    (metrics / "epoch.tsv").write_text("step\tepoch\n9\t1\n19\t2\n")
    return tmp_path


def report(capsys, root) -> str:
    line = one_line_error(capsys, "report", "--teacher", root / "teacher", "--students", root / "students",
                          "--out", root / "report", "--runs", root / "runs")
    assert not (root / "report").exists()
    return line


METRICS = {
    "truncated": b'{"val": {"accuracy": 0.9',
    "garbage": GARBAGE,
    "a list": b"[1, 2]",
    "accuracy as text": b'{"val": {"accuracy": "high"}}',
    "NaN accuracy": b'{"val": {"accuracy": NaN}}',
    "tpr above 1": b'{"test": {"tpr@fpr=1e-4": 3}}',
    "test as a list": b'{"test": [0.5]}',
    "params as text": b'{"model": {"params": "many"}}',
    "SE above 0.5": b'{"test": {"tpr@fpr=1e-4": 0.5, "tpr_se": {"1e-4": 0.7}}}',
    "resolved as a number": b'{"test": {"tpr@fpr=1e-4": 0.5, "tpr_se": {}, "resolved": {"1e-4": 1}}}',
    "pair count as a float": b'{"test": {"tpr@fpr=1e-4": 0.5, "positive_pairs": 10.5, "negative_pairs": 99}}',
}
ROCS = {
    "truncated": ROC[:-9].encode() + b"\n0.5,",
    "garbage": GARBAGE,
    "no tpr column": b"fpr,threshold\n0.0,0.9\n",
    "text for a number": b"fpr,tpr,threshold\nzero,0.1,0.9\n",
    "NaN fpr": b"fpr,tpr,threshold\nnan,0.1,0.9\n",
    "NaN threshold": b"fpr,tpr,threshold\n0.0,0.1,nan\n",
}
IJBS = {
    "truncated": b'{"tpr@fpr=1e-4": 0.',
    "garbage": GARBAGE,
    "tpr as text": b'{"tpr@fpr=1e-4": "x"}',
    "NaN tpr": b'{"tpr@fpr=1e-4": NaN}',
    "negative pairs as a float": b'{"tpr@fpr=1e-4": 0.5, "negative_pairs": 1.5}',
    "SE as text": b'{"tpr@fpr=1e-4": 0.5, "tpr_se": {"1e-4": "small"}}',
    "SE as a list": b'{"tpr@fpr=1e-4": 0.5, "tpr_se": [0.01]}',
    "resolved as text": b'{"tpr@fpr=1e-4": 0.5, "resolved": {"1e-4": "yes"}}',
    "impostor count negative": b'{"tpr@fpr=1e-4": 0.5, "resolved": {}, "impostor_pairs": {"1e-4": -3}}',
}
HISTORIES = {
    "truncated": b"step\tepoch\n9\t",
    "garbage": GARBAGE,
    "no value column": b"step\n9\n",
    "text step": b"step\tepoch\nnine\t1\n",
    "NaN value": b"step\tepoch\n9\tnan\n",
}


@pytest.mark.parametrize("damage", METRICS)
def test_damaged_metrics_json(runs, capsys, damage):
    path = runs / "students" / "baseline" / "metrics.json"
    path.write_bytes(METRICS[damage])
    assert report(capsys, runs).startswith(f"error: {path}: ")


@pytest.mark.parametrize("damage", ROCS)
def test_damaged_roc_csv(runs, capsys, damage):
    path = runs / "teacher" / "roc.csv"
    path.write_bytes(ROCS[damage])
    assert report(capsys, runs).startswith(f"error: {path}: ")


@pytest.mark.parametrize("damage", IJBS)
def test_damaged_ijb_json(runs, capsys, damage):
    path = runs / "teacher" / "ijbc.json"
    path.write_bytes(IJBS[damage])
    assert report(capsys, runs).startswith(f"error: {path}: ")


@pytest.mark.parametrize("damage", HISTORIES)
def test_damaged_dvclive_history(runs, capsys, damage):
    path = runs / "runs" / "baseline" / "dvclive" / "plots" / "metrics" / "epoch" / "epoch.tsv"
    path.write_bytes(HISTORIES[damage])
    assert report(capsys, runs).startswith(f"error: {path}: ")


def test_the_undamaged_files_make_a_report(runs, capsys):
    from helpers.console import console

    code, lines = console(capsys, "report", "--teacher", runs / "teacher", "--students", runs / "students",
                          "--out", runs / "report", "--runs", runs / "runs", "--baseline", "baseline")
    assert code == 0, lines
    assert (runs / "report" / "report.md").is_file()

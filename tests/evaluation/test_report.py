"""`pipeline report` against hand-written evaluation folders: the table's numbers, gap closed by hand, the
thresholds table, the training faces, and the one-line errors."""
from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.processes import error_line
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.evaluation.curves import epochs_of, read_history
from pipeline.formats.source import open_face_source
from pipeline.formats.jpeg import encode_jpeg
from pipeline.formats.recordio import write_face_recordio
from pipeline.formats.summary import sample_sheet

ROC = "fpr,tpr,threshold\n0.0,0.0,inf\n1e-05,0.2,0.9\n0.0001,0.4,0.8\n0.001,0.6,0.7\n0.01,0.8,0.5\n1.0,1.0,-1.0\n"


def write_eval(folder, tpr: dict, accuracy: float, params: int | None = None, roc: str = ROC,
               counts: tuple[int, int] | None = None) -> None:
    """metrics.json + roc.csv; `counts` (genuine, impostor pairs): the test set's, from which the report derives
    each TPR's SE and resolution (as for a file written before they were stored)."""
    folder.mkdir(parents=True)
    metrics = {"val": {"accuracy": accuracy, "std": 0.01, "threshold": 1.0, "pairs": 100},
               "test": {f"tpr@fpr={k}": v for k, v in tpr.items()}}
    if counts:
        metrics["test"].update(positive_pairs=counts[0], negative_pairs=counts[1])
    if params is not None:
        metrics["model"] = {"kind": "checkpoint", "name": "mbf", "params": params}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    (folder / "roc.csv").write_text(roc)


@pytest.fixture
def evaluations(tmp_path):
    write_eval(tmp_path / "teacher", {"1e-2": 0.9, "1e-3": 0.7, "1e-4": 0.5, "1e-5": 0.3}, 0.95, params=2_930_000)
    students = tmp_path / "students"
    write_eval(students / "baseline", {"1e-2": 0.8, "1e-3": 0.5, "1e-4": 0.1, "1e-5": 0.1}, 0.90, params=140_000)
    write_eval(students / "ekd", {"1e-2": 0.85, "1e-3": 0.6, "1e-4": 0.4, "1e-5": 0.2}, 0.92, params=140_000)
    (tmp_path / "thresholds.json").write_text(json.dumps({"1e-1": 0.2, "1e-2": 0.4, "1e-3": 0.55, "1e-4": 0.65,
                                                          "1e-5": 0.72, "1e-6": 0.8, "counts": {"N": 10}}))
    return tmp_path


def run_report(root, *extra):
    return CliRunner().invoke(app, ["report", "--teacher", str(root / "teacher"), "--students",
                                    str(root / "students"), "--out", str(root / "report"), *map(str, extra)])


def table_row(report: str, name: str) -> list[str]:
    line = next(line for line in report.splitlines() if line.startswith(f"| {name} ("))
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_numbers_and_gap_closed_by_hand(evaluations):
    write_eval(evaluations / "students" / "ekd2", {"1e-2": 0.85, "1e-3": 0.6, "1e-4": 0.4, "1e-5": 0.2}, 0.92,
               params=140_000, counts=(10_000, 12_487_500))  # the demo test set: 1e-5 is 124 impostors
    result = run_report(evaluations, "--thresholds", evaluations / "thresholds.json")
    assert result.exit_code == 0, result.output
    report = (evaluations / "report" / "report.md").read_text()
    header = table_row(report.replace("| model |", "| model (x) |"), "model")
    ekd = dict(zip(header, table_row(report, "ekd")))
    assert ekd["params (M)"] == "0.140" and ekd["val acc"] == "0.9200"
    assert ekd["TPR@1e-4"] == "0.400"  # no pair counts in its metrics.json: no SE
    ekd2 = dict(zip(header, table_row(report, "ekd2")))
    assert ekd2["TPR@1e-4"] == "0.400 ± 0.005"  # sqrt(0.4 * 0.6 / 10,000) = 0.0049
    assert ekd2["TPR@1e-2"] == "0.850 ± 0.004" and ekd2["gap closed @1e-4"] == "0.750"
    # gap closed = (student - baseline) / (teacher - baseline): (0.4 - 0.1) / (0.5 - 0.1) = 0.75 at 1e-4
    assert ekd["gap closed @1e-4"] == "0.750" and ekd["gap closed @1e-3"] == f"{(0.6 - 0.5) / (0.7 - 0.5):.3f}"
    # at 1e-5: (0.2 - 0.1) / (0.3 - 0.1)
    assert ekd["gap closed @1e-5"] == "0.500"
    baseline = dict(zip(header, table_row(report, "baseline")))
    assert baseline["gap closed @1e-4"] == "0.000"
    summary = json.loads((evaluations / "report" / "summary.json").read_text())
    assert summary["ekd"] == {"role": "student", "params": 140_000, "acc_val": 0.92, "tpr@1e-2": 0.85,
                              "tpr@1e-3": 0.6, "tpr@1e-4": 0.4, "tpr@1e-5": 0.2}
    assert summary["ekd2"]["tpr_se@1e-4"] == pytest.approx((0.4 * 0.6 / 10_000) ** 0.5)
    # thresholds: the teacher's training thresholds beside each model's test threshold at the nearest FPR
    row = next(line for line in report.splitlines() if line.startswith("| 1e-4 |"))
    assert [c.strip() for c in row.strip("|").split("|")] == ["1e-4", "0.6500"] + ["0.8000"] * 4
    assert (evaluations / "report" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gap_closed_is_undefined_when_the_teacher_does_not_beat_the_baseline(evaluations):
    write_eval(evaluations / "weak-teacher", {"1e-2": 0.7, "1e-3": 0.5, "1e-4": 0.1, "1e-5": 0.1}, 0.9)
    result = CliRunner().invoke(app, ["report", "--teacher", str(evaluations / "weak-teacher"), "--students",
                                      str(evaluations / "students"), "--out", str(evaluations / "report")])
    assert result.exit_code == 0, result.output
    report = (evaluations / "report" / "report.md").read_text()
    header = table_row(report.replace("| model |", "| model (x) |"), "model")
    ekd = dict(zip(header, table_row(report, "ekd")))
    assert ekd["gap closed @1e-4"] == "n/r" and ekd["gap closed @1e-3"] == "n/r"  # teacher 0.5 == baseline 0.5
    assert "@1e-3: teacher - baseline = +0.000, not above 2 x its standard error 0.000" in report


def test_test_set_gap_closed_only_where_resolved(tmp_path):
    """A small test set: 1e-5 is 2 impostors of 200,000 (n/r), at 1e-3 the gap 0.6 - 0.57 is inside 2 combined
    SEs of 1,000 genuine pairs (0.044), at 1e-2 and 1e-4 it is resolved."""
    counts = (1_000, 200_000)
    write_eval(tmp_path / "teacher", {"1e-2": 0.9, "1e-3": 0.6, "1e-4": 0.5, "1e-5": 0.3}, 0.95, counts=counts)
    for name, tpr in (("baseline", {"1e-2": 0.8, "1e-3": 0.57, "1e-4": 0.1, "1e-5": 0.1}),
                      ("ekd", {"1e-2": 0.85, "1e-3": 0.58, "1e-4": 0.4, "1e-5": 0.2})):
        write_eval(tmp_path / "students" / name, tpr, 0.9, counts=counts)
    assert run_report(tmp_path).exit_code == 0
    report = (tmp_path / "report" / "report.md").read_text()
    header = table_row(report.replace("| model |", "| model (x) |"), "model")
    ekd = dict(zip(header, table_row(report, "ekd")))
    assert ekd["TPR@1e-3"] == "0.580 ± 0.016"
    assert [ekd[f"gap closed @{f}"] for f in ("1e-2", "1e-3", "1e-4", "1e-5")] == ["0.500", "n/r", "0.750", "n/r"]
    note = next(line for line in report.splitlines() if line.startswith("n/r (test set)"))
    assert "@1e-3: teacher - baseline = +0.030, not above 2 x its standard error 0.022" in note
    assert "@1e-5: FPR not resolved (fewer than 10 impostor pairs above its threshold)" in note
    assert "@1e-2" not in note and "@1e-4" not in note


def test_training_faces_from_the_synthetic_contact_sheet(evaluations):
    data = evaluations / "data"
    data.mkdir()
    sheet = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    Image.fromarray(sheet).save(data / "contact_sheet.png")
    assert run_report(evaluations, "--data", data).exit_code == 0
    np.testing.assert_array_equal(np.asarray(Image.open(evaluations / "report" / "contact_sheet.png")), sheet)
    assert "![training faces](contact_sheet.png)" in (evaluations / "report" / "report.md").read_text()


def test_training_faces_of_a_recordio_set_are_its_first_identities(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (16, 16, 3), dtype=np.uint8) for _ in range(12)]
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]
    write_face_recordio(tmp_path, [(encode_jpeg(im), lab) for im, lab in zip(images, labels)], num_classes=4)
    source = open_face_source(tmp_path)
    sheet = sample_sheet(source, identities=2, images=3)
    assert sheet.shape == (32, 48, 3)
    expected = np.zeros_like(sheet)
    for column, index in enumerate((0, 1, 2)):
        expected[:16, column * 16:(column + 1) * 16] = source.decode(index)
    for column, index in enumerate((3, 4)):  # identity 1 has two images: the third tile stays black
        expected[16:, column * 16:(column + 1) * 16] = source.decode(index)
    np.testing.assert_array_equal(sheet, expected)


def test_missing_evaluations_are_one_line_errors(evaluations):
    result = CliRunner().invoke(app, ["report", "--teacher", str(evaluations / "nowhere"), "--students",
                                      str(evaluations / "students"), "--out", str(evaluations / "report")])
    assert result.exit_code == 2
    assert "nowhere/metrics.json: missing (run `pipeline evaluate" in result.output
    result = CliRunner().invoke(app, ["report", "--teacher", str(evaluations / "teacher"), "--students",
                                      str(evaluations / "empty"), "--out", str(evaluations / "report")])
    assert result.exit_code == 2 and "no evaluated student runs" in result.output
    assert not (evaluations / "report" / "report.md").exists()


def test_training_histories_become_curves_and_diagnostics(evaluations):
    runs = evaluations / "runs"
    for name, kd in (("baseline", False), ("ekd", True)):
        metrics = runs / name / "dvclive" / "plots" / "metrics"
        (metrics / "epoch").mkdir(parents=True)
        (metrics / "epoch" / "epoch.tsv").write_text("step\tepoch\n9\t1\n19\t2\n")
        (metrics / "eval" / "monitor").mkdir(parents=True)
        (metrics / "eval" / "monitor" / "tpr@fpr=1e-4.tsv").write_text("step\ttpr@fpr=1e-4\n9\t0.2\n19\t0.3\n")
        if kd:
            (metrics / "kd" / "ekd").mkdir(parents=True)
            (metrics / "kd" / "grad_ratio_ekd.tsv").write_text("step\tgrad_ratio_ekd\n0\t0.5\n10\t0.4\n")
            (metrics / "kd" / "ekd" / "pairs_critical_positive.tsv").write_text(
                "step\tpairs_critical_positive\n0\t12\n10\t9\n")
    result = run_report(evaluations, "--runs", runs, "--runs", evaluations / "no-such-folder")
    assert result.exit_code == 0, result.output
    report = (evaluations / "report" / "report.md").read_text()
    assert "![curves](curves.png)" in report and "![diagnostics](diagnostics.png)" in report
    for name in ("curves.png", "diagnostics.png"):
        assert (evaluations / "report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = read_history(runs / "ekd" / "dvclive")
    assert history["eval/monitor/tpr@fpr=1e-4"] == ([9, 19], [0.2, 0.3])
    assert epochs_of(history, [9, 19, 5]) == [1.0, 2.0, pytest.approx(float("nan"), nan_ok=True)]


def test_without_histories_the_figures_say_so(evaluations):
    assert run_report(evaluations).exit_code == 0
    report = (evaluations / "report" / "report.md").read_text()
    assert "Training curves" not in report and "KD diagnostics" not in report
    assert (evaluations / "report" / "curves.png").is_file()  # a placeholder, so the declared outputs exist


def _write_ijb(folder, tprs: list[float], negatives: int = 4750, positives: int = 200, **stored) -> None:
    """<target>.json with TPR at 1e-6 .. 1e-1; `stored`: tpr_se / resolved as evaluate-ijb stores them (without
    them the report derives both from the pair counts)."""
    body = {f"tpr@fpr=1e-{6 - k}": t for k, t in enumerate(tprs)}
    body.update(target="IJBC", mode="F1 N1 D1", tpr_method="nearest", images=340, templates=100,
                pairs=negatives + positives, positive_pairs=positives, negative_pairs=negatives, **stored)
    (folder / "ijbc.json").write_text(json.dumps(body))


def _ijb_rows(report: str) -> tuple[str, list[str], dict[str, dict[str, str]]]:
    """(the IJBC section, the IJB table's header cells, {model: {column: cell}})."""
    section = report[report.index("## IJBC: 1:1 template verification"):report.index("### Test set vs IJBC")]
    lines = section.splitlines()
    header = next(line for line in lines if line.startswith("| model |"))
    cells = [c.strip() for c in header.strip("|").split("|")]
    rows = {line.split("(")[0].strip("| "): dict(zip(cells, [c.strip() for c in line.strip("|").split("|")]))
            for line in lines if line.startswith("| ") and " (" in line.split("|")[1]}
    return section, cells, rows


IJB_TPRS = {"teacher": [0.2, 0.3, 0.5, 0.7, 0.9, 0.95], "students/baseline": [0.1, 0.1, 0.1, 0.4, 0.8, 0.9],
            "students/ekd": [0.1, 0.2, 0.3, 0.5, 0.85, 0.93]}


def test_ijb_table_of_the_old_small_set_marks_what_it_cannot_resolve(evaluations):
    result = run_report(evaluations)
    assert result.exit_code == 0 and "IJBC" not in (evaluations / "report" / "report.md").read_text()
    for folder, tprs in IJB_TPRS.items():
        _write_ijb(evaluations / folder, tprs)  # 200 genuine, 4,750 impostor pairs: 1e-3 is 4 impostors
    result = run_report(evaluations)
    assert result.exit_code == 0, result.output
    section, cells, rows = _ijb_rows((evaluations / "report" / "report.md").read_text())
    assert "4950 template pairs (200 genuine)" in section
    assert cells == ["model", "TPR@1e-6 †", "TPR@1e-5 †", "TPR@1e-4 †", "TPR@1e-3 †", "TPR@1e-2", "TPR@1e-1",
                     "gap closed @1e-2", "gap closed @1e-3", "gap closed @1e-4", "gap closed @1e-5"]
    ekd = rows["ekd"]
    # sqrt(0.1 * 0.9 / 200) = 0.0212, sqrt(0.93 * 0.07 / 200) = 0.0180
    assert ekd["TPR@1e-6 †"] == "0.100 ± 0.021" and ekd["TPR@1e-1"] == "0.930 ± 0.018"
    # 1e-2: 47 impostors; teacher - baseline = 0.1 > 2 * sqrt(0.09 / 200 + 0.16 / 200) = 0.0707: shown
    assert ekd["gap closed @1e-2"] == f"{(0.85 - 0.8) / (0.9 - 0.8):.3f}"
    assert [ekd[f"gap closed @{f}"] for f in ("1e-3", "1e-4", "1e-5")] == ["n/r"] * 3
    assert "† not resolved: fewer than 10 of the 4750 impostor pairs" in section
    assert "n/r (IJBC): gap closed not shown" in section and "@1e-4: FPR not resolved" in section
    summary = json.loads((evaluations / "report" / "summary.json").read_text())
    assert summary["teacher"]["ijbc_tpr@1e-4"] == 0.5 and summary["ekd"]["ijbc_tpr@1e-6"] == 0.1
    assert summary["ekd"]["ijbc_tpr_se@1e-6"] == pytest.approx((0.09 / 200) ** 0.5)


def test_ijb_gap_closed_at_1e4_on_the_100_identity_set(evaluations):
    for folder, tprs in IJB_TPRS.items():  # 100 x 5 templates: 1,000 genuine, 123,750 impostors (12 at 1e-4)
        _write_ijb(evaluations / folder, tprs, negatives=123_750, positives=1_000)
    assert run_report(evaluations).exit_code == 0
    report = (evaluations / "report" / "report.md").read_text()
    section, cells, rows = _ijb_rows(report)
    assert cells[1:7] == ["TPR@1e-6 †", "TPR@1e-5 †", "TPR@1e-4", "TPR@1e-3", "TPR@1e-2", "TPR@1e-1"]
    assert rows["ekd"]["TPR@1e-4"] == "0.300 ± 0.014"
    assert rows["ekd"]["gap closed @1e-4"] == f"{(0.3 - 0.1) / (0.5 - 0.1):.3f}"
    assert rows["baseline"]["gap closed @1e-4"] == "0.000" and rows["teacher"]["gap closed @1e-3"] == "1.000"
    assert rows["ekd"]["gap closed @1e-5"] == "n/r"
    # side by side: test TPR (no SE: the fixture's metrics.json has no counts) and IJBC TPR ± SE, gains
    side = report[report.index("### Test set vs IJBC"):].split("\n## ")[0].splitlines()
    header = [c.strip() for c in next(line for line in side if line.startswith("| model |")).strip("|").split("|")]
    assert header[:3] == ["model", "test @1e-2", "IJBC @1e-2"] and header[-1] == "IJBC @1e-5 †"
    gain = dict(zip(header, [c.strip() for c in next(line for line in side if line.startswith("| ekd - baseline"))
                             .strip("|").split("|")]))
    assert gain["test @1e-4"] == "+0.300"  # 0.4 - 0.1, no SE without counts
    assert gain["IJBC @1e-4"] == f"+0.200 ± {((0.3 * 0.7 + 0.1 * 0.9) / 1000) ** 0.5:.3f}"


def test_ijb_uses_the_stored_se_and_resolution(evaluations):
    se = {f"1e-{k}": 0.001 for k in range(1, 7)}
    resolved = {f"1e-{k}": k <= 3 for k in range(1, 7)}  # as stored: 1e-4 and below not resolved
    for folder, tprs in IJB_TPRS.items():
        _write_ijb(evaluations / folder, tprs, negatives=15_000_000, positives=20_000, tpr_se=se, resolved=resolved)
    assert run_report(evaluations).exit_code == 0
    _, cells, rows = _ijb_rows((evaluations / "report" / "report.md").read_text())
    assert rows["ekd"]["TPR@1e-4 †"] == "0.300 ± 0.001" and rows["ekd"]["gap closed @1e-4"] == "n/r"
    assert rows["ekd"]["gap closed @1e-3"] == "0.333"


def test_a_baseline_that_names_no_student_is_refused(evaluations):
    result = run_report(evaluations, "--baseline", "nosuch")
    assert result.exit_code == 2 and not (evaluations / "report").exists()
    assert error_line(result.output) == (f"error: --baseline 'nosuch': no evaluated student of that name in "
                                         f"{evaluations / 'students'} (found baseline, ekd); name the no-KD run, "
                                         "or give --baseline '' for a report without 'gap closed' columns")
    result = run_report(evaluations, "--baseline", "")
    assert result.exit_code == 0, result.output
    assert "gap closed" not in (evaluations / "report" / "report.md").read_text()


def test_reordered_thresholds_are_refused(evaluations):
    path = evaluations / "thresholds.json"
    document = json.loads(path.read_text())
    document["1e-3"], document["1e-4"] = document["1e-4"], document["1e-3"]
    path.write_text(json.dumps(document))
    result = run_report(evaluations, "--thresholds", path)
    assert result.exit_code == 2 and not (evaluations / "report").exists()
    assert error_line(result.output).startswith(f"error: {path}: threshold at FPR 1e-4 (0.55) is below the one at "
                                                "FPR 1e-3 (0.65); thresholds must not decrease as the FPR falls")

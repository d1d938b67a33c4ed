"""`pipeline report`: teacher vs every student in one table, the ROC plot and the FPR thresholds."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import PipelineError
from pipeline.evaluation.curves import read_history, run_folders
from pipeline.evaluation.report import load_result, write_report
from pipeline.formats.summary import training_faces
from pipeline.search.pool_files import load_thresholds
from stages import options


def command(
    teacher: Annotated[Path, typer.Option("--teacher", help="The teacher's evaluation folder (metrics.json, roc.csv); "
                                          "an ensemble's (evaluate --model A --model B) is the reference line, "
                                          "labelled with its members.")],
    students: Annotated[Path, typer.Option("--students", help="Folder of student runs: every sub-folder with metrics.json "
                                            "(an ensemble's is a row of role 'ensemble', labelled with its members).")],
    out: Annotated[Path, typer.Option("--out", help="Report folder: report.md, roc.png, summary.json.")],
    baseline: Annotated[str, typer.Option("--baseline", help="Name of the no-KD student the gap is measured from "
                                          "('' for a report without 'gap closed' columns).")] = "baseline",
    thresholds: Annotated[Optional[Path], typer.Option("--thresholds", help="thresholds.json from build-pools.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="Training folder: its contact_sheet.png (written by "
                                                 "synthesize) or a grid of its first identities goes in the report.")] = None,
    runs: Annotated[Optional[list[Path]], typer.Option("--runs", help="Training run folders (with dvclive/), or folders "
                                                       "of them, whose per-epoch curves and KD diagnostics the report "
                                                       "plots (repeatable; missing folders are skipped).")] = None,
):
    """Write the teacher-vs-students report (markdown table, ROC plot, thresholds)."""
    results = [load_result(teacher, "teacher", "teacher")]
    evaluated = sorted(p for p in students.iterdir() if (p / "metrics.json").is_file()) if students.is_dir() else []
    if not evaluated:
        raise PipelineError(f"{students}: no evaluated student runs (sub-folders with metrics.json)")
    if baseline and baseline not in {run.name for run in evaluated}:
        raise PipelineError(f"--baseline {baseline!r}: no evaluated student of that name in {students} (found "
                            f"{', '.join(run.name for run in evaluated)}); name the no-KD run, or give --baseline '' "
                            "for a report without 'gap closed' columns")
    results += [load_result(run, run.name, "baseline" if run.name == baseline else "student") for run in evaluated]
    teacher_train = load_thresholds(thresholds) if thresholds is not None else {}
    histories = {run.name: read_history(run / "dvclive") for run in run_folders(runs or [])}
    text, written = write_report(results, teacher_train, out, faces=training_faces(data) if data else None,
                                 histories=histories)
    print(text)
    print(f"wrote {', '.join(map(str, written))}")


COMMANDS = {"report": options.command(command)}

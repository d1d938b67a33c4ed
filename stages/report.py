"""`pipeline report`: teacher vs every student in one table, the ROC plot and the FPR thresholds."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from pipeline.errors import PipelineError
from pipeline.models.model_file import load_model
from pipeline.models import count_parameters
from pipeline.evaluation.report import (
    REPORT_FPRS, ModelResult, markdown_table, plot_roc, read_roc_csv, read_roc_thresholds, thresholds_table,
)


def load_result(run: Path, name: str, role: str, model: Path | None = None) -> ModelResult:
    """A model's evaluation (metrics.json, roc.csv in `run`) plus its parameter count when it is our model.pt."""
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise PipelineError(f"{metrics_path}: missing (run `pipeline evaluate --out {run}` first)")
    metrics = json.loads(metrics_path.read_text())
    accuracy = {k: v["accuracy"] for k, v in metrics.items() if isinstance(v, dict) and "accuracy" in v}
    test = metrics.get("test", {})
    tpr = {k.split("=", 1)[1]: v for k, v in test.items() if k.startswith("tpr@fpr=")}
    roc, thresholds = None, {}
    if (run / "roc.csv").is_file():
        roc = read_roc_csv(run / "roc.csv")
        thresholds = _thresholds_at(roc[0], read_roc_thresholds(run / "roc.csv")) if roc[0] else {}
        roc = roc if roc[0] else None  # header only: no test set
    params = None
    model = model or run / "model.pt"
    if model.is_file() and model.suffix == ".pt":
        try:
            params = count_parameters(load_model(model)[0])
        except PipelineError:  # a foreign checkpoint (e.g. arcface_torch) has no architecture metadata
            params = None
    return ModelResult(name, role, params, accuracy, tpr, thresholds, roc)


def _thresholds_at(fpr: list[float], threshold: list[float]) -> dict[str, float]:
    """Each model's cosine threshold on the test set at the ROC point nearest each FPR."""
    fpr, threshold = np.asarray(fpr), np.asarray(threshold)
    out = {}
    for key in ("1e-1", "1e-2", "1e-3", "1e-4", "1e-5", "1e-6"):
        target = float(key)
        if fpr.size and fpr.max() >= target:
            out[key] = float(threshold[int(np.argmin(np.abs(fpr - target)))])
    return out


def command(
    teacher: Annotated[Path, typer.Option("--teacher", help="The teacher's evaluation folder (metrics.json, roc.csv).")],
    students: Annotated[Path, typer.Option("--students", help="Folder of student runs: every sub-folder with metrics.json.")],
    out: Annotated[Path, typer.Option("--out", help="Report folder: report.md, roc.png, summary.json.")],
    baseline: Annotated[str, typer.Option("--baseline", help="Name of the no-KD student the gap is measured from.")] = "baseline",
    thresholds: Annotated[Optional[Path], typer.Option("--thresholds", help="thresholds.json from build-pools.")] = None,
    teacher_model: Annotated[Optional[Path], typer.Option("--teacher-model", help="Teacher weights, for the parameter count.")] = None,
):
    """Write the teacher-vs-students report (markdown table, ROC plot, thresholds)."""
    results = [load_result(teacher, "teacher", "teacher", teacher_model)]
    runs = sorted(p for p in students.iterdir() if (p / "metrics.json").is_file()) if students.is_dir() else []
    if not runs:
        raise PipelineError(f"{students}: no evaluated student runs (sub-folders with metrics.json)")
    results += [load_result(run, run.name, "baseline" if run.name == baseline else "student") for run in runs]
    if not any(r.role == "baseline" for r in results):
        print(f"warning: no student named {baseline!r}: the report has no 'gap closed' columns")
    out.mkdir(parents=True, exist_ok=True)
    teacher_train = {}
    if thresholds is not None:
        loaded = json.loads(thresholds.read_text())
        teacher_train = {k: float(v) for k, v in loaded.items() if isinstance(v, (int, float))}
    text = render(results, teacher_train)
    plot_roc(results, out / "roc.png")
    _write(out / "report.md", text)
    _write(out / "summary.json", json.dumps(_summary(results), indent=2) + "\n")
    print(text)
    print(f"wrote {out / 'report.md'}, {out / 'roc.png'}, {out / 'summary.json'}")


def render(results: list[ModelResult], teacher_train: dict[str, float]) -> str:
    parts = [
        "# Teacher vs students",
        "",
        "Accuracy: 10-fold verification accuracy on each `.bin` (flip TTA). TPR@FPR: all pairs of `test.rec`. "
        "Gap closed = (student - baseline) / (teacher - baseline) at each FPR.",
        "",
        markdown_table(results),
        "",
        "![ROC](roc.png)",
    ]
    if teacher_train:
        parts += ["", "## FPR thresholds (cosine similarity)", "",
                  "The teacher's exact thresholds over all training negatives (build-pools) beside each model's "
                  "measured threshold on the test pairs.", "", thresholds_table(results, teacher_train)]
    return "\n".join(parts) + "\n"


def _summary(results: list[ModelResult]) -> dict:
    """Flat numbers per model, for `dvc metrics show`."""
    return {r.name: {"role": r.role, "params": r.params, **{f"acc_{k}": v for k, v in r.accuracy.items()},
                     **{f"tpr@{f}": r.tpr[f] for f in REPORT_FPRS if f in r.tpr}} for r in results}


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


COMMANDS = {"report": command}

"""The teacher-vs-students report: one table, the ROC plot, and the FPR thresholds side by side, read from
the evaluation folders (metrics.json, roc.csv) that `evaluate` writes, plus an IJB table for every
`<target>.json` that `evaluate-ijb` wrote there. A folder that `evaluate --model A --model B` wrote (an
ensemble scored by the mean of its members' cosines) is labelled with its members: as the teacher it is the
reference line; among the students its role is "ensemble" (a reference row, no gain over the baseline)."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import DataError, PipelineError
from pipeline.evaluation.curves import plot_curves, plot_diagnostics
from pipeline.evaluation.readback import number, read_json_object, read_table, read_uncertainty
from pipeline.evaluation.readouts import (
    Readout,
    gain_cell,
    gap_blockers,
    gap_cell,
    gap_footnote,
    tpr_cell,
    unresolved_levels,
)
from pipeline.evaluation.uncertainty import MIN_IMPOSTORS
from pipeline.fpr import LEVEL_KEYS, REPORT_KEYS
from pipeline.storage.io import atomic_path, write_text_atomic

REPORT_FPRS = REPORT_KEYS
IJB_TARGETS = ("ijbc", "ijbb")  # evaluate-ijb's <target>.json files in a run folder
IJB_FPRS = tuple(reversed(LEVEL_KEYS))  # "1e-6" .. "1e-1", the insightface IJB table's columns
UNRESOLVED_MARK = "†"  # on a TPR column some model's pairs do not resolve


@dataclass
class ModelResult:
    """What the report shows of one evaluated model."""

    name: str
    role: str  # "teacher", "baseline", "student" or "ensemble" (an ensemble's folder among the students)
    params: int | None
    accuracy: dict[str, float]  # verification .bin name -> 10-fold accuracy
    test: Readout  # "1e-4" -> TPR on the test set, its standard error, whether the test pairs resolve 1e-4
    thresholds: dict[str, float] = field(default_factory=dict)  # "1e-4" -> score threshold on the test set
    roc: tuple[list[float], list[float]] | None = None
    ijb: dict[str, dict] = field(default_factory=dict)  # "ijbc" -> that run's <target>.json (evaluate-ijb)
    members: list[str] = field(default_factory=list)  # an ensemble's members, e.g. ["teacher/model.pt", ...]

    @property
    def label(self) -> str:
        """The row's name: "ekd (student)"; an ensemble's names its members: "teacher (ensemble of r100/model.pt +
        r50/model.pt)", "ens (ensemble of ...)" among the students, "l2 (baseline: ensemble of ...)"."""
        if not self.members:
            return f"{self.name} ({self.role})"
        role = "" if self.role in ("ensemble", self.name) else f"{self.role}: "
        return f"{self.name} ({role}ensemble of {' + '.join(self.members)})"

    def ijb_readout(self, target: str) -> Readout:
        """The IJB `target`'s TPR at each FPR with standard errors and resolution (`_read_ijb` fills them in)."""
        document = self.ijb[target]
        return Readout({f: document[f"tpr@fpr={f}"] for f in IJB_FPRS if f"tpr@fpr={f}" in document},
                       document.get("tpr_se", {}), document.get("resolved", {}))


def load_result(run: Path, name: str, role: str) -> ModelResult:
    """A model's evaluation: metrics.json (with the model's parameter count, when known) and roc.csv in `run`."""
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise PipelineError(f"{metrics_path}: missing (run `pipeline evaluate --out {run}` first)")
    metrics = read_json_object(metrics_path)
    accuracy = {k: number(metrics_path, f"{k}.accuracy", v["accuracy"], 0, 1) for k, v in metrics.items()
                if isinstance(v, dict) and "accuracy" in v}
    test = _section(metrics_path, metrics, "test")
    tpr = {k.split("=", 1)[1]: number(metrics_path, f"test.{k}", v, 0, 1) for k, v in test.items()
           if k.startswith("tpr@fpr=")}
    se, resolved = read_uncertainty(metrics_path, "test.", test, tpr)
    roc, thresholds = None, {}
    if (run / "roc.csv").is_file():
        roc = read_roc_csv(run / "roc.csv")
        thresholds = _thresholds_at(roc[0], read_roc_thresholds(run / "roc.csv")) if roc[0] else {}
        roc = roc if roc[0] else None  # header only: no test set
    params = _section(metrics_path, metrics, "model").get("params")
    if params is not None:
        params = number(metrics_path, "model.params", params, 0, integer=True)
    ijb = {target: _read_ijb(run / f"{target}.json") for target in IJB_TARGETS if (run / f"{target}.json").is_file()}
    members = _ensemble_members(metrics_path, _section(metrics_path, metrics, "model"))
    role = "ensemble" if members and role == "student" else role
    return ModelResult(name, role, params, accuracy, Readout(tpr, se, resolved), thresholds, roc, ijb, members)


def _ensemble_members(path: Path, model: dict) -> list[str]:
    """An ensemble's members as `folder/file` (with their weights when unequal); [] for one model."""
    if model.get("kind") != "ensemble":
        return []
    members = model.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, dict) for m in members):
        raise DataError(f"{path}: model.members of an ensemble is not a list of its members")
    names = [Path(str(m.get("path", m.get("name", "?")))) for m in members]
    names = [f"{p.parent.name}/{p.name}" if p.parent.name else p.name for p in names]
    weights = [m.get("weight") for m in members]
    if len(set(map(str, weights))) > 1:
        names = [f"{name} x{weight:g}" if isinstance(weight, (int, float)) else name
                 for name, weight in zip(names, weights)]
    return names


def _section(path: Path, document: dict, key: str) -> dict:
    value = document.get(key, {})
    if not isinstance(value, dict):
        raise DataError(f"{path}: {key} is a {type(value).__name__}, expected an object")
    return value


def _read_ijb(path: Path) -> dict:
    """evaluate-ijb's <target>.json, with the numbers the IJB table reads checked and each TPR's `tpr_se` and
    `resolved` filled in (derived from the pair counts for a file written before they were stored)."""
    result = read_json_object(path)
    tpr = {key.split("=", 1)[1]: number(path, key, value, 0, 1) for key, value in result.items()
           if key.startswith("tpr@fpr=")}
    for key in ("images", "templates", "pairs", "positive_pairs", "negative_pairs"):
        if key in result:
            number(path, key, result[key], 0, integer=True)
    result["tpr_se"], result["resolved"] = read_uncertainty(path, "", result, tpr)
    return result


def _thresholds_at(fpr: list[float], threshold: list[float]) -> dict[str, float]:
    """Each model's cosine threshold on the test set at the ROC point nearest each FPR."""
    fpr, threshold = np.asarray(fpr), np.asarray(threshold)
    out = {}
    for key in LEVEL_KEYS:
        target = float(key)
        if fpr.size and fpr.max() >= target:
            out[key] = float(threshold[int(np.argmin(np.abs(fpr - target)))])
    return out


def read_roc_csv(path: Path) -> tuple[list[float], list[float]]:
    """The (fpr, tpr) columns of a ROC CSV written by `evaluate` (empty lists for a header-only file)."""
    rows = read_table(path, ("fpr", "tpr"))
    return ([number(path, f"line {i} fpr", r["fpr"], 0, 1) for i, r in enumerate(rows, start=2)],
            [number(path, f"line {i} tpr", r["tpr"], 0, 1) for i, r in enumerate(rows, start=2)])


def read_roc_thresholds(path: Path) -> list[float]:
    """The score-threshold column of a ROC CSV (+-inf allowed: a curve's end points)."""
    return [number(path, f"line {i} threshold", r["threshold"], infinite=True)
            for i, r in enumerate(read_table(path, ("threshold",)), start=2)]


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: list[str]) -> list[str]:
    return [_row(cells), "|" + "---|" * len(cells)]


def _roles(results: list[ModelResult]) -> tuple[ModelResult | None, ModelResult | None]:
    return (next((r for r in results if r.role == "teacher"), None),
            next((r for r in results if r.role == "baseline"), None))


def markdown_table(results: list[ModelResult]) -> str:
    """Teacher and each student: accuracy per .bin, test TPR ± SE at each FPR, parameters, gap closed per FPR
    (where resolved, `readouts`), with the footnote naming the levels that are not."""
    teacher, baseline = _roles(results)
    bins = sorted({name for r in results for name in r.accuracy})
    header = ["model", "params (M)"] + [f"{b} acc" for b in bins] + [f"TPR@{f}" for f in REPORT_FPRS]
    blockers = {}
    if teacher and baseline:
        header += [f"gap closed @{f}" for f in REPORT_FPRS]
        blockers = gap_blockers(REPORT_FPRS, [r.test for r in results], teacher.test, baseline.test)
    lines = _header(header)
    for r in results:
        row = [r.label, _fmt(r.params / 1e6, 3) if r.params else "–"]
        row += [_fmt(r.accuracy.get(b)) for b in bins] + [tpr_cell(r.test, f) for f in REPORT_FPRS]
        if teacher and baseline:
            row += [gap_cell(r.test, f, teacher.test, baseline.test, blockers) for f in REPORT_FPRS]
        lines.append(_row(row))
    note = gap_footnote(blockers, "test set")
    return "\n".join(lines) + (f"\n\n{note}" if note else "")


def ijb_table(results: list[ModelResult], target: str) -> str:
    """One IJB target: each model's TPR ± SE at FPR 1e-6 .. 1e-1 (a dagger on the levels some model's impostor
    pairs do not resolve) and, with teacher and baseline, gap closed at the report's FPRs where resolved,
    under a line saying what was measured."""
    rows = [r for r in results if target in r.ijb]
    readouts = {r.name: r.ijb_readout(target) for r in rows}
    first = rows[0].ijb[target]
    teacher, baseline = _roles(rows)
    unresolved = unresolved_levels(list(readouts.values()), IJB_FPRS)
    header = ["model"] + [f"TPR@{f}" + (f" {UNRESOLVED_MARK}" if f in unresolved else "") for f in IJB_FPRS]
    blockers = {}
    if teacher and baseline:
        header += [f"gap closed @{f}" for f in REPORT_FPRS]
        blockers = gap_blockers(REPORT_FPRS, list(readouts.values()), readouts[teacher.name],
                                readouts[baseline.name])
    lines = _header(header)
    for r in rows:
        row = [r.label] + [tpr_cell(readouts[r.name], f) for f in IJB_FPRS]
        if teacher and baseline:
            row += [gap_cell(readouts[r.name], f, readouts[teacher.name], readouts[baseline.name], blockers)
                    for f in REPORT_FPRS]
        lines.append(_row(row))
    negatives = first.get("negative_pairs")
    notes = [f"{UNRESOLVED_MARK} not resolved: fewer than {MIN_IMPOSTORS} of the {negatives} impostor pairs lie "
             "above the threshold (floor(FPR x impostor pairs)); the value reads the curve's first points."
             ] if unresolved else []
    notes += [note for note in [gap_footnote(blockers, target.upper())] if note]
    intro = (f"{first.get('target', target.upper())}, insightface eval_ijbc protocol ({first.get('mode', '')}, "
             f"{first.get('tpr_method', '')} read-out): {first.get('images')} images, {first.get('templates')} "
             f"templates, {first.get('pairs')} template pairs ({first.get('positive_pairs')} genuine). TPR ± its "
             "binomial standard error over the genuine pairs.")
    return "\n\n".join([intro, "\n".join(lines)] + notes)


def test_vs_ijb_table(results: list[ModelResult], target: str) -> str:
    """Test-set and IJB TPR ± SE side by side at the report's FPRs, and each student's gain over the baseline
    on both: whether what KD gains on the test pairs carries over to templates of aligned loose crops."""
    rows = [r for r in results if target in r.ijb]
    _, baseline = _roles(rows)
    name = target.upper()

    def column(label: str, readouts: list[Readout], f: str) -> str:
        return f"{label} @{f}" + (f" {UNRESOLVED_MARK}" if unresolved_levels(readouts, [f]) else "")

    header = ["model"] + [cell for f in REPORT_FPRS for cell in (
        column("test", [r.test for r in rows], f), column(name, [r.ijb_readout(target) for r in rows], f))]
    lines = _header(header)
    for r in rows:
        lines.append(_row([r.label] + [cell for f in REPORT_FPRS for cell in (
            tpr_cell(r.test, f), tpr_cell(r.ijb_readout(target), f))]))
    for r in (rows if baseline else []):
        if r.role == "student":
            lines.append(_row([f"{r.name} - {baseline.name}"] + [cell for f in REPORT_FPRS for cell in (
                gain_cell(r.test, baseline.test, f),
                gain_cell(r.ijb_readout(target), baseline.ijb_readout(target), f))]))
    return "\n".join(lines) + (f"\n\n{UNRESOLVED_MARK} not resolved on those pairs (see above)."
                               if UNRESOLVED_MARK in lines[0] else "")


def thresholds_table(results: list[ModelResult], teacher_train: dict[str, float]) -> str:
    """The teacher's exact thresholds over all training negatives beside each model's on the test set."""
    fprs = [f for f in LEVEL_KEYS if f in teacher_train]
    header = ["FPR", "teacher (train, build-pools)"] + [f"{r.name} (test)" for r in results]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for f in fprs:
        lines.append("| " + " | ".join([f, _fmt(teacher_train[f])] + [_fmt(r.thresholds.get(f)) for r in results]) + " |")
    return "\n".join(lines)


def plot_roc(results: list[ModelResult], path: Path) -> None:
    """All models' test ROC curves on a log-FPR axis, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 5), dpi=120)
    for r in results:
        if r.roc is None:
            continue
        fpr, tpr = r.roc
        points = [(f, t) for f, t in zip(fpr, tpr) if f > 0]
        if points:
            axis.plot(*zip(*points), label=r.label, linewidth=2 if r.role == "teacher" else 1.3)
    axis.set_xscale("log")
    axis.set_xlim(1e-6, 1)
    axis.set_xlabel("false positive rate (test, all pairs)")
    axis.set_ylabel("true positive rate")
    axis.set_title("1:1 verification ROC: teacher vs students")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)


def render(results: list[ModelResult], teacher_train: dict[str, float], faces: bool = False,
           figures: tuple[str, ...] = ()) -> str:
    """report.md: the table, the ROC plot, (given the teacher's training thresholds) the thresholds table,
    the training-history `figures` written beside it, and (`faces`) the training faces' contact sheet."""
    parts = [
        "# Teacher vs students",
        "",
        "Accuracy: 10-fold verification accuracy on each `.bin` (flip TTA). TPR@FPR: all pairs of `test.rec`, "
        "± its binomial standard error over the genuine pairs (a lower bound on the run-to-run spread: pairs "
        "share images). Gap closed = (student - baseline) / (teacher - baseline) at each FPR, shown where every "
        f"model's FPR is resolved (at least {MIN_IMPOSTORS} impostor pairs above the threshold) and teacher - "
        "baseline exceeds 2 combined standard errors; n/r otherwise.",
        "",
        markdown_table(results),
        "",
        "![ROC](roc.png)",
    ]
    for target in IJB_TARGETS:
        if any(target in r.ijb for r in results):
            parts += ["", f"## {target.upper()}: 1:1 template verification", "", ijb_table(results, target),
                      "", f"### Test set vs {target.upper()}", "",
                      "The same models' TPR ± SE on the test pairs (aligned training-style images) and on "
                      f"{target.upper()} templates (aligned loose crops), and each student's gain over the "
                      "baseline on both (standard errors combined as if independent: conservative, the models "
                      "share the pairs).", "", test_vs_ijb_table(results, target)]
    if teacher_train:
        parts += ["", "## FPR thresholds (cosine similarity)", "",
                  "The teacher's exact thresholds over all training negatives (build-pools) beside each model's "
                  "measured threshold on the test pairs.", "", thresholds_table(results, teacher_train)]
    if "curves.png" in figures:
        parts += ["", "## Training curves", "",
                  "Evaluated after every epoch on the monitor set (held-out identities, not the test set) and on "
                  "val.bin: a run has converged where its curves flatten.", "", "![curves](curves.png)"]
    if "diagnostics.png" in figures:
        parts += ["", "## KD diagnostics", "",
                  "Per logged step: each KD term's gradient norm at the embeddings relative to the margin loss's, "
                  "the critical pairs in a batch (pairs whose FPR interval differs between teacher and student), "
                  "and the student's FPR thresholds (solid) against the teacher's (dashed).", "",
                  "![diagnostics](diagnostics.png)"]
    if faces:
        parts += ["", "## The training faces", "",
                  "The first images of the first training identities, one identity per row.", "",
                  "![training faces](contact_sheet.png)"]
    return "\n".join(parts) + "\n"


def summary(results: list[ModelResult]) -> dict:
    """Flat numbers per model, for `dvc metrics show`."""
    return {r.name: {"role": r.role, "params": r.params, **{f"acc_{k}": v for k, v in r.accuracy.items()},
                     **{f"tpr@{f}": r.test.tpr[f] for f in REPORT_FPRS if f in r.test.tpr},
                     **{f"tpr_se@{f}": r.test.se[f] for f in REPORT_FPRS if f in r.test.se},
                     **{f"{target}_tpr@{f}": values[f"tpr@fpr={f}"] for target, values in r.ijb.items()
                        for f in IJB_FPRS if f"tpr@fpr={f}" in values},
                     **{f"{target}_tpr_se@{f}": values["tpr_se"][f] for target, values in r.ijb.items()
                        for f in IJB_FPRS if f in values["tpr_se"]}} for r in results}


def write_report(results: list[ModelResult], teacher_train: dict[str, float], out: Path,
                 faces: np.ndarray | None = None, histories: dict | None = None) -> tuple[str, list[Path]]:
    """report.md, roc.png, summary.json, contact_sheet.png (from `faces`, a uint8 RGB grid) and the training
    histories' curves.png / diagnostics.png in `out`; returns the markdown and the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "roc.png"]
    plot_roc(results, written[0])
    shown = tuple(name for name, plot in (("curves.png", plot_curves), ("diagnostics.png", plot_diagnostics))
                  if plot(histories or {}, out / name))
    written += [out / "curves.png", out / "diagnostics.png"]
    text = render(results, teacher_train, faces=faces is not None, figures=shown)
    if faces is not None:
        written.append(out / "contact_sheet.png")
        with atomic_path(written[-1]) as tmp:
            Image.fromarray(faces).save(tmp, format="PNG")
    written += [write_text_atomic(out / "report.md", text),
                write_text_atomic(out / "summary.json", json.dumps(summary(results), indent=2) + "\n")]
    return text, written

"""The frontier's summary and plot from its ledger entries (benchmarks/frontier.py writes them).

Per size: parameters and MACs per image; the search (final monitor.rec TPR@1e-4 per method and schedule) and
each method's chosen schedule; per method over the test seeds: TPR@FPR on test.rec (mean, SE), the paired
difference to the same-size baseline of the same seeds, the gap closed (m - b) / (T - b), the difference to the
teacher (SE combining the seeds' SE with the teacher's own binomial SE over test.rec's genuine pairs, since the
teacher is one model), the cosine to the teacher on the training and test images; the best method, the
methods within one SE of it, and EKD's own term (the shipped recipe `ekd` against `l2_hard_pairs`, the same
recipe without EKD), paired with its z.
"""
from __future__ import annotations

import math
from pathlib import Path

from pipeline.evaluation.compare import gap_closed, mean_and_se, paired

FPRS = ("1e-3", "1e-4", "1e-5")
BASELINE = "baseline"
EKD_TERM = ("ekd", "l2_hard_pairs")  # the shipped recipe and the same recipe without its EKD term


def _tpr(entry: dict, fpr: str) -> float:
    return entry["test"][f"tpr@fpr={fpr}"]


def _versus_teacher(values: dict, teacher: float, teacher_se: float) -> dict:
    mean, se = mean_and_se(list(values.values()))
    combined = math.sqrt(se ** 2 + teacher_se ** 2) if se == se else math.nan
    difference = mean - teacher
    return {"mean": difference, "se": combined, "z": difference / combined if combined > 0 else math.nan}


def _fidelity(tests: list[dict]) -> dict:
    out = {}
    for key in ("cos_to_teacher", "pair_corr"):
        out[key] = {}
        for name in ("train", "test"):
            mean, se = mean_and_se([e["fidelity"][name][key] for e in tests if "fidelity" in e])
            out[key][name] = {"mean": mean, "se": se}
    return out


def summarise(entries: list[dict], frontier: dict, teacher_test: dict) -> dict:
    teacher = {f: {"tpr": teacher_test[f"tpr@fpr={f}"], "se": teacher_test.get("tpr_se", {}).get(f, 0.0)}
               for f in FPRS}
    sizes = {}
    for size in frontier["sizes"]:
        mine = [e for e in entries if e["size"] == size]
        if not mine:
            continue
        entry = {"parameters": mine[0]["parameters"], "macs": mine[0]["macs"], "search": {}, "chosen": {},
                 "methods": {}}
        tpr = {}
        for method in frontier["methods"]:
            search = {e["schedule"]: e["monitor"]["tpr@fpr=1e-4"] for e in mine
                      if e["method"] == method and e["phase"] == "search"}
            if search:
                entry["search"][method] = search
            tests = [e for e in mine if e["method"] == method and e["phase"] == "test"]
            if not tests:
                continue
            entry["chosen"][method] = tests[0]["schedule"]
            tpr[method] = {f: {e["seed"]: _tpr(e, f) for e in tests} for f in FPRS}
            entry["methods"][method] = {"seeds": sorted(e["seed"] for e in tests), "fidelity": _fidelity(tests)}
        for method, by_fpr in tpr.items():
            result = entry["methods"][method]
            for f in FPRS:
                mean, se = mean_and_se(list(by_fpr[f].values()))
                result[f] = {"mean": mean, "se": se, "n": len(by_fpr[f]),
                             "vs_teacher": _versus_teacher(by_fpr[f], teacher[f]["tpr"], teacher[f]["se"])}
                if method != BASELINE and BASELINE in tpr:
                    result[f]["vs_baseline"] = paired(by_fpr[f], tpr[BASELINE][f])
                    result[f]["gap_closed"] = gap_closed(by_fpr[f], tpr[BASELINE][f], teacher[f]["tpr"])
        if tpr:
            best = max(tpr, key=lambda m: entry["methods"][m]["1e-4"]["mean"])
            top = entry["methods"][best]["1e-4"]
            entry["best"] = best
            entry["within_1se_of_best"] = [m for m in tpr if entry["methods"][m]["1e-4"]["mean"] >= top["mean"] - (
                top["se"] if top["se"] == top["se"] else 0.0)]
        if all(m in tpr for m in EKD_TERM):
            entry["ekd_term"] = {f: paired(tpr[EKD_TERM[0]][f], tpr[EKD_TERM[1]][f]) for f in FPRS}
        sizes[size] = entry
    return {"teacher": teacher, "seeds": frontier["seeds"], "search_seed": frontier["search_seed"], "sizes": sizes}


def plot(summary: dict, path: Path) -> None:
    """TPR@1e-4 on test.rec against parameters and against MACs (log axes), one line per method with SE
    bars, the teacher as a band of its standard error."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    sizes = sorted(summary["sizes"].values(), key=lambda s: s["parameters"])
    methods = sorted({m for s in sizes for m in s["methods"]})
    teacher = summary["teacher"]["1e-4"]
    for axis, measure, label in zip(axes, ("parameters", "macs"), ("parameters", "MACs per image")):
        for method in methods:
            points = [(s[measure], s["methods"][method]["1e-4"]) for s in sizes if method in s["methods"]]
            if points:
                axis.errorbar([p[0] for p in points], [p[1]["mean"] for p in points],
                              yerr=[p[1]["se"] if p[1]["se"] == p[1]["se"] else 0 for p in points],
                              marker="o", capsize=3, label=method)
        axis.axhspan(teacher["tpr"] - teacher["se"], teacher["tpr"] + teacher["se"], color="#c0392b", alpha=0.2,
                     label="teacher ± SE")
        axis.axhline(teacher["tpr"], color="#c0392b", linewidth=1)
        axis.set_xscale("log")
        axis.set_xlabel(f"student {label} (log)")
        axis.set_ylabel("TPR @ FPR 1e-4 (test.rec)")
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"Student-size frontier: mean ± SE over seeds {summary['seeds']}", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)

"""Ensembles of cached teachers: each member and their ensemble on test.rec, then students distilled from the
best member and from the ensemble with the same method and schedule, paired over the fixed seeds.

params.yaml `ensemble` names the members (a pinned folder with model.pt + teacher.h5, e.g. the frontier's
teacher, or train-teacher options on top of `teacher_training.demo`), the student sizes and the schedule
(frontier.sizes / frontier.schedules entries), the method (a frontier.methods entry) and the seeds. Steps, each
the command a user would type and each skipped when its output exists:

1. every member not pinned: `pipeline train-teacher`, then `extract-teacher` into its own cache;
2. every member, and the ensemble (`pipeline evaluate --model A --model B ...`, mean cosine), on test.rec;
3. `pipeline build-pools --cache A --cache B ...`: the ensemble's thresholds, centres, neighbours, hard pairs;
4. the students, through benchmarks/frontier.py's sweep (a ledger, resume): from the best member (reusing the
   frontier ledger's finished runs of the same jobs when that member is the frontier's pinned teacher; new runs
   go to this script's ledgers, never the frontier's) and from the ensemble.

The best member is the one with the highest test TPR@1e-4: the teachers are compared on test.rec, and no
student choice is made from it other than which single teacher a student is compared with (the question asked).
Prints one JSON line: members, the ensemble, the ensemble against its best member (binomial SEs combined as if
independent: conservative, since both score the same pairs), and per size the students' TPRs with the paired
difference ensemble-student minus best-member-student.

    python benchmarks/ensemble.py --parallel 2
    python benchmarks/ensemble.py --teachers-only    # steps 1-2: is the ensemble a better teacher at all?
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from arguments import positive_int, run_main  # noqa: E402
from frontier import PINNED, Job, Sweep, SweepError, cache_identity, read_ledger, resolved_options  # noqa: E402
from frontier_report import FPRS  # noqa: E402
from quality import pipeline, run  # noqa: E402

from pipeline.evaluation.compare import mean_and_se, paired  # noqa: E402


def member_paths(name: str, spec: dict, work: Path) -> dict[str, Path]:
    """A member's model and cache: its pinned folder's, or those this script trains and extracts."""
    if "pinned" in spec:
        folder = Path(spec["pinned"])
        return {"teacher": folder / PINNED["teacher"], "cache": folder / PINNED["cache"], "pinned": folder}
    return {"teacher": work / "teachers" / name / "model.pt", "cache": work / "caches" / f"{name}.h5"}


def options(spec: dict) -> list[str]:
    """A member's train-teacher options as command-line flags."""
    return [a for key, value in spec.items() for a in (f"--{key.replace('_', '-')}", value)]


def prepare_member(name: str, spec: dict, paths: dict, data: Path, log: Path, threads: int) -> None:
    """Steps 1: train-teacher (its own resume) and extract-teacher, skipped when their outputs exist."""
    if "pinned" in spec:
        return
    if not paths["teacher"].is_file():
        run(pipeline("train-teacher", "--params", "params.yaml:teacher_training.demo", *options(spec), "--data",
                     data, "--out", paths["teacher"].parent, "--monitor", data), log, threads)
    if not paths["cache"].is_file():
        run(pipeline("extract-teacher", "--params", "params.yaml:extract", "--data", data, "--teacher",
                     paths["teacher"], "--out", paths["cache"], "--threads", threads), log, threads)


def evaluated(models: list[Path], data: Path, out: Path, log: Path, threads: int) -> dict:
    """test.rec metrics of one model or of an ensemble of models (mean cosine), evaluated once."""
    metrics = out / "metrics.json"
    if not metrics.is_file():
        run(pipeline("evaluate", "--params", "params.yaml:evaluate", *[a for m in models for a in ("--model", m)],
                     "--data", data, "--out", out), log, threads)
    return json.loads(metrics.read_text())["test"]


def teacher_figures(test: dict) -> dict:
    return {f: {"tpr": test[f"tpr@fpr={f}"], "se": test.get("tpr_se", {}).get(f, math.nan)} for f in FPRS}


def versus(a: dict, b: dict) -> dict:
    """a - b per FPR with the two binomial SEs combined as if independent (conservative for the same pairs)."""
    out = {}
    for f in FPRS:
        se = math.sqrt(a[f]["se"] ** 2 + b[f]["se"] ** 2)
        difference = a[f]["tpr"] - b[f]["tpr"]
        out[f] = {"mean": difference, "se": se, "z": difference / se if se > 0 else math.nan}
    return out


def student_summary(entries: dict[str, dict], jobs: list[Job]) -> dict:
    """TPR per FPR over the seeds of `jobs` that are in the ledger `entries` (by seed)."""
    done = [entries[j.key] for j in jobs if j.key in entries]
    return {f: {e["seed"]: e["test"][f"tpr@fpr={f}"] for e in done} for f in FPRS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="benchmarks/out/ensemble", help="teachers, caches, evaluations, runs")
    parser.add_argument("--ledger", default="results/ensemble/runs.jsonl",
                        help="one JSON line per finished ensemble-student run")
    parser.add_argument("--frontier-ledger", default="results/frontier/runs.jsonl",
                        help="the frontier's ledger: its finished runs of the same jobs from the same (pinned) "
                             "teacher are reused, and nothing is written to it")
    parser.add_argument("--parallel", type=positive_int, default=1, help="runs at a time (one torch thread each)")
    parser.add_argument("--teachers-only", action="store_true", help="steps 1-2 only: members and their ensemble")
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    spec, data, work = params["ensemble"], Path(params["data"]["dir"]), Path(args.work)
    threads = 1 if args.parallel > 1 else 2
    members = {name: member_paths(name, s, work) for name, s in spec["members"].items()}
    log = work / "log.txt"
    for name, paths in members.items():
        prepare_member(name, spec["members"][name], paths, data, log, threads)
    tests = {name: teacher_figures(evaluated([p["teacher"]], data, work / "eval" / name, log, threads))
             for name, p in members.items()}
    ensemble = teacher_figures(evaluated([p["teacher"] for p in members.values()], data, work / "eval" / "ensemble",
                                         log, threads))
    best = max(tests, key=lambda n: tests[n]["1e-4"]["tpr"])
    summary = {"benchmark": "ensemble", "members": tests, "ensemble": ensemble, "best_member": best,
               "ensemble_vs_best": versus(ensemble, tests[best])}
    if not args.teachers_only:
        summary["students"] = distil(args, params, spec, members, best, data, work, threads)
    print(json.dumps(summary))


def reuse(sweep: Sweep, ledger: Path, jobs: list[Job]) -> None:
    """The finished runs of `jobs` in another ledger (the frontier's), read into `sweep` (never written there);
    the sweep's own pending check still skips only those of the same options and teacher."""
    keys = {j.key for j in jobs}
    sweep.entries.update({k: e for k, e in read_ledger(ledger).items() if k in keys and k not in sweep.entries})


def built_pools(caches: list[Path], out: Path, log: Path, threads: int) -> Path:
    """The pools folder of one cache or an ensemble of caches, built once (`pipeline build-pools`)."""
    if not (out / "pools.h5").is_file():
        run(pipeline("build-pools", "--params", "params.yaml:pools", *[a for c in caches for a in ("--cache", c)],
                     "--out", out), log, threads)
    return out


def distil(args, params: dict, spec: dict, members: dict, best: str, data: Path, work: Path,
           threads: int) -> dict:
    """Step 3 and 4: the ensemble's pools, then the students of both teachers; their paired summary."""
    caches = [p["cache"] for p in members.values()]
    pools = built_pools(caches, work / "pools", work / "log.txt", threads)
    jobs = [Job("test", size, spec["method"], spec["schedule"], seed) for size in spec["sizes"]
            for seed in spec["seeds"]]
    frontier_teacher = "pinned" in spec["members"][best]
    single_paths = {"data": data, "teacher": members[best]["teacher"], "cache": members[best]["cache"],
                    "pools": (members[best]["pinned"] / PINNED["pools"]) if frontier_teacher
                    else built_pools([members[best]["cache"]], work / f"pools-{best}", work / "log.txt", threads)}
    single = Sweep(params, single_paths, work / f"students-{best}", Path(args.ledger).with_name(f"{best}.jsonl"),
                   args.parallel, cache_identity(single_paths["cache"]))
    if frontier_teacher:
        reuse(single, Path(args.frontier_ledger), jobs)
    mixed = Sweep(params, {"data": data, "teacher": None, "cache": caches, "pools": pools}, work / "students",
                  Path(args.ledger), args.parallel, cache_identity(caches))
    Path(args.ledger).parent.mkdir(parents=True, exist_ok=True)
    try:
        single.run_all(jobs)
        mixed.run_all(jobs)
    except SweepError as error:
        sys.exit(f"ensemble: {error} (a rerun redoes only the unfinished runs)")
    out = {}
    for size in spec["sizes"]:
        mine = [j for j in jobs if j.size == size]
        of_best, of_ensemble = student_summary(single.entries, mine), student_summary(mixed.entries, mine)
        out[size] = {"options": resolved_options(params, mine[0]), "best_member": {}, "ensemble": {},
                     "ensemble_minus_best_member": {}}
        for f in FPRS:
            for key, values in (("best_member", of_best), ("ensemble", of_ensemble)):
                mean, se = mean_and_se(list(values[f].values()))
                out[size][key][f] = {"mean": mean, "se": se, "n": len(values[f])}
            out[size]["ensemble_minus_best_member"][f] = paired(of_ensemble[f], of_best[f])
    return out


if __name__ == "__main__":
    run_main(main)

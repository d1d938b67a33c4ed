"""Distillation quality over seeds, paired: every student against the no-KD baseline of the same seed.

For each data seed (`--data-seeds`; params.yaml's own seed reuses the pipeline's `data/` after `dvc repro`,
any other seed gets its own synthetic set, teacher, cache and pools under `--work`), every student of
params.yaml's `students` (what `dvc repro` ships) and `quality.students` (variants measured here only) is
trained with each seed of `--seeds` (params.yaml `quality.seeds` by default) exactly as dvc.yaml trains it
(`--params params.yaml:student --params params.yaml:<section>.<name>`, with `--seed`), then evaluated on the
data's test.rec. Finished runs are reused, so an interrupted benchmark resumes.

`--scale K` makes each data seed's training set K times larger (K times the identities, the same images per
identity and the same held-out sets). Its teacher is trained with params.yaml's schedule as it is (K times the
steps: the teacher is trained once, to its plateau; at the students' step count it was far from it,
docs/quality.md round 6); the students get the same number of *steps* as at scale 1 (epochs and warmup divided
by K, epochs rounded up): a larger set at the students' compute, so that conclusions can be checked as data
grows. Its runs go to `--work`/data-seedD-xK. `--steps F` trains the students F times that many steps (the
warmup unchanged; runs in data-seedD-xK/stepsF/), e.g. when the larger set's no-KD student is still far from
its plateau at the default's step count.

Prints ONE JSON line: the teacher's TPR@FPR; per method and FPR the mean and standard error over seeds, the
paired difference to the baseline (mean, SE, z = mean / SE), the gap closed (student - baseline) /
(teacher - baseline), and the paired difference of the best EKD student to the best feature-L2 student.
Writes `quality.png` (TPR at each FPR per method with SE error bars) and `runs.json` into `--work`.

    python benchmarks/quality.py                                  # params.yaml's seeds on the pipeline's data
    python benchmarks/quality.py --data-seeds 0,1 --parallel 2    # a second synthetic dataset too
    python benchmarks/quality.py --scale 4 --seeds 1,2,3 --students baseline,ekd,l2,adadistill --parallel 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # arguments.py, also when imported from elsewhere
from arguments import int_list, names, parse_later, positive_float, positive_int, processes, run_main  # noqa: E402

from pipeline.errors import PipelineError  # noqa: E402
from pipeline.evaluation.compare import gap_closed, mean_and_se, paired  # noqa: E402

FPRS = ("1e-3", "1e-4", "1e-5")


class ChildFailed(PipelineError):
    """A pipeline command run by a benchmark failed; its log says why."""


def run(command: list[str], log: Path, threads: int | None) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print("$ " + " ".join(command), file=sys.stderr, flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:
        done = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:  # one line naming the command and its log, not a traceback
        raise ChildFailed(f"{command[3]} exited with {done.returncode}; its log: {log}")


def pipeline(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline", *map(str, args)]


def dataset_name(data_seed: int, scale: int) -> str:
    return f"data-seed{data_seed}" + (f"-x{scale}" if scale != 1 else "")


def schedule(section: dict, scale: int, steps: float = 1.0) -> list[str]:
    """Options that train a section `steps` times its number of optimiser steps on `scale` times the data (epochs
    are whole, rounded up; the warmup keeps its number of steps)."""
    if scale == 1 and steps == 1:
        return []
    return ["--epochs", str(max(1, math.ceil(section["epochs"] * steps / scale))),
            "--warmup-epochs", str(section.get("warmup_epochs", 0.0) / scale)]


def prepare_data(params: dict, data_seed: int, scale: int, work: Path, threads: int | None) -> dict[str, Path]:
    """Data folder, teacher evaluation, cache and pools for a data seed and scale (the pipeline's own for its
    seed at scale 1)."""
    demo = next(iter(params["synthetic"].values()))
    if data_seed == demo["seed"] and scale == 1:
        return {"data": Path(params["data"]["dir"]), "cache": Path(params["extract"]["out"]),
                "pools": Path(params["pools"]["out"]), "teacher_eval": Path(params["teacher"]["eval_dir"])}
    root = work / dataset_name(data_seed, scale)
    paths = {"data": root / "synthetic", "cache": root / "cache" / "teacher.h5", "pools": root / "pools",
             "teacher_eval": root / "teacher-eval"}
    log = root / "prepare.log"
    key = next(iter(params["synthetic"]))
    if not (paths["data"] / "synthetic.json").is_file():
        run(pipeline("synthesize", "--params", f"params.yaml:synthetic.{key}", "--out", paths["data"],
                     "--seed", data_seed, "--identities", demo["identities"] * scale), log, None)
    teacher = root / "teacher"
    if not (teacher / "model.pt").is_file():
        run(pipeline("train-teacher", "--params", f"params.yaml:teacher_training.{next(iter(params['teacher_training']))}",
                     "--data", paths["data"], "--out", teacher, "--monitor", paths["data"], "--no-resume"), log, threads)
    if not paths["cache"].is_file():
        run(pipeline("extract-teacher", "--params", "params.yaml:extract", "--data", paths["data"], "--teacher",
                     teacher / "model.pt", "--out", paths["cache"]), log, threads)
    if not (paths["pools"] / "thresholds.json").is_file():
        run(pipeline("build-pools", "--params", "params.yaml:pools", "--cache", paths["cache"], "--out",
                     paths["pools"]), log, threads)
    if not (paths["teacher_eval"] / "metrics.json").is_file():
        run(pipeline("evaluate", "--params", "params.yaml:evaluate", "--model", teacher / "model.pt", "--data",
                     paths["data"], "--out", paths["teacher_eval"]), log, threads)
    return paths


def train_and_evaluate(section: str, name: str, seed: int, paths: dict, out: Path, threads: int | None,
                       schedule_options: list[str]) -> Path:
    """One student as dvc.yaml trains it, with `--seed` (and `schedule`'s options); returns its metrics.json
    (reused when present)."""
    metrics = out / "eval" / "metrics.json"
    if not metrics.is_file():
        run(pipeline("train-student", "--params", "params.yaml:student", "--params", f"params.yaml:{section}.{name}",
                     *schedule_options, "--data", paths["data"], "--name", name, "--out", out, "--cache",
                     paths["cache"], "--pools", paths["pools"], "--monitor", paths["data"], "--seed", seed,
                     "--no-resume"),
            out / "log.txt", threads)
        run(pipeline("evaluate", "--params", "params.yaml:evaluate", "--model", out / "model.pt", "--data",
                     paths["data"], "--out", out / "eval"), out / "log.txt", threads)
    return metrics


def summarise(tpr: dict[str, dict[str, dict]], teacher: dict[str, dict], baseline: str) -> dict:
    """Per method and FPR: mean and SE over runs, paired difference to the baseline, gap closed. `tpr` and
    `teacher` are keyed by run ("data seed:seed"); runs of a data seed share that dataset's teacher."""
    methods = {}
    for name, by_run in tpr.items():
        entry = {}
        for fpr in FPRS:
            values = {run: v[fpr] for run, v in by_run.items()}
            mean, se = mean_and_se(list(values.values()))
            entry[fpr] = {"mean": mean, "se": se, "n": len(values)}
            if name != baseline and baseline in tpr:
                base = {run: v[fpr] for run, v in tpr[baseline].items()}
                entry[fpr]["vs_baseline"] = paired(values, base)
                entry[fpr]["gap_closed"] = gap_closed(values, base, {run: teacher[run][fpr] for run in values})
        methods[name] = entry
    return methods


def best_of(methods: dict, names: list[str], fpr: str = "1e-4") -> str | None:
    scored = [n for n in names if n in methods]
    return max(scored, key=lambda n: methods[n][fpr]["mean"]) if scored else None


def plot(methods: dict, teacher: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(FPRS), figsize=(4.2 * len(FPRS), 3.8), dpi=110)
    names = list(methods)
    for axis, fpr in zip(axes, FPRS):
        means = [methods[n][fpr]["mean"] for n in names]
        errors = [methods[n][fpr]["se"] if methods[n][fpr]["se"] == methods[n][fpr]["se"] else 0 for n in names]
        axis.bar(range(len(names)), means, yerr=errors, capsize=3, color="#7aa6c2")
        axis.axhline(teacher[fpr], color="#c0392b", linestyle="--", label="teacher")
        axis.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        axis.set_title(f"TPR @ FPR {fpr} (test), mean ± SE", fontsize=9)
        axis.grid(True, axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int_list(), help="comma-separated student seeds (default: params.yaml "
                        "quality.seeds)")
    parser.add_argument("--data-seeds", type=int_list(), help="comma-separated synthetic data seeds (default: "
                        "params.yaml's)")
    parser.add_argument("--students", default="", help="comma-separated subset of the students to run")
    parser.add_argument("--work", default="benchmarks/out/quality")
    parser.add_argument("--scale", type=positive_int, default=1,
                        help="training set K times larger, trained for the same number of steps (see above)")
    parser.add_argument("--steps", type=positive_float, default=1.0,
                        help="students train F times the default's number of steps (see above)")
    parser.add_argument("--parallel", type=processes(), default=1,
                        help="runs at a time (each then uses one torch thread)")
    args = parser.parse_args()
    params = yaml.safe_load(Path("params.yaml").read_text())
    quality = params.get("quality", {})
    seeds = args.seeds or list(quality.get("seeds", [0]))
    demo_seed = next(iter(params["synthetic"].values()))["seed"]
    data_seeds = args.data_seeds or [demo_seed]
    students = {name: "students" for name in params["students"]}
    students.update({name: "quality.students" for name in quality.get("students", {})})
    if args.students:
        chosen = parse_later(parser, "--students", names(students, what="params.yaml's students and quality.students"),
                             args.students)
        students = {n: s for n, s in students.items() if n in chosen}
    baseline, work = params["report"]["baseline"], Path(args.work)
    threads = 1 if args.parallel > 1 else None

    tpr: dict[str, dict[str, dict]] = {name: {} for name in students}
    teachers, teacher_of_run, runs = {}, {}, []
    schedule_options = schedule(params["student"], args.scale, args.steps)
    for data_seed in data_seeds:
        paths = prepare_data(params, data_seed, args.scale, work, threads)
        name_of_data = dataset_name(data_seed, args.scale)
        runs_of_data = work / name_of_data / (f"steps{args.steps:g}" if args.steps != 1 else "")
        teacher_test = json.loads((paths["teacher_eval"] / "metrics.json").read_text())["test"]
        teachers[data_seed] = {f: teacher_test[f"tpr@fpr={f}"] for f in FPRS}
        jobs = [(section, name, seed, runs_of_data / f"seed{seed}" / name)
                for seed in seeds for name, section in students.items()]
        with ThreadPoolExecutor(max(1, args.parallel)) as pool:
            done = pool.map(lambda j: (j, train_and_evaluate(*j[:3], paths, j[3], threads, schedule_options)), jobs)
            for (section, name, seed, out), metrics in done:
                test = json.loads(metrics.read_text())["test"]
                key = f"{name_of_data}:{seed}"
                tpr[name][key], teacher_of_run[key] = {f: test[f"tpr@fpr={f}"] for f in FPRS}, teachers[data_seed]
                runs.append({"name": name, "data_seed": data_seed, "scale": args.scale, "steps": args.steps,
                             "seed": seed, "run": str(out),
                             **{f"tpr@{f}": test[f"tpr@fpr={f}"] for f in FPRS}})
    methods = summarise(tpr, teacher_of_run, baseline)
    kd_of = {name: (params["students"].get(name) or quality.get("students", {}).get(name) or {}).get("kd", "")
             for name in students}
    best_l2 = best_of(methods, [n for n, kd in kd_of.items() if kd == "l2"])
    best_ekd = best_of(methods, [n for n, kd in kd_of.items() if "ekd" in kd])
    comparison = {}
    if best_l2 and best_ekd:
        comparison = {"ekd": best_ekd, "l2": best_l2, **{f: paired(
            {run: v[f] for run, v in tpr[best_ekd].items()}, {run: v[f] for run, v in tpr[best_l2].items()})
            for f in FPRS}}
    teacher = {f: sum(t[f] for t in teachers.values()) / len(teachers) for f in FPRS}
    work.mkdir(parents=True, exist_ok=True)
    plot(methods, teacher, work / "quality.png")
    (work / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
    print(json.dumps({"benchmark": "quality", "data_seeds": data_seeds, "scale": args.scale, "steps": args.steps,
                      "seeds": seeds, "teacher": teachers,
                      "methods": methods, "best_ekd_vs_best_l2": comparison, "plot": str(work / "quality.png")}))


if __name__ == "__main__":
    run_main(main)

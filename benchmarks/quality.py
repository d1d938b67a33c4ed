"""Distillation quality over seeds: every default student trained with 3 seeds on the same teacher cache.

Run after `dvc repro` (it reuses data/: the synthetic set, the teacher, its cache and pools, and the students
of params.yaml's seed). Each student's
command is the one DVC renders from dvc.yaml + params.yaml, with `--seed S --out DIR` appended (the last
occurrence of an option wins), so this measures exactly what the pipeline trains. Prints ONE JSON line:
per KD method, mean/std over seeds of TPR@FPR=1e-4 on test and of the gap closed
(student - baseline) / (teacher - baseline), with the baseline of the same seed.

    python benchmarks/quality.py --seeds 0,1,2 [--fpr 1e-4] [--work data/quality]
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml


def student_commands(repo: Path) -> dict[str, str]:
    """The rendered `train-student@NAME` commands of the DVC pipeline."""
    from dvc.repo import Repo

    with Repo(str(repo)) as dvc_repo:
        return {
            stage.addressing.split("@", 1)[1]: stage.cmd
            for stage in dvc_repo.index.stages
            if stage.addressing.startswith("train-student@")
        }


def run(command: str) -> None:
    print(f"$ {command}", file=sys.stderr, flush=True)
    subprocess.run(shlex.split(command), check=True, stdout=sys.stderr)  # stdout keeps only the JSON line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--fpr", default="1e-4")
    parser.add_argument("--work", default="data/quality")
    parser.add_argument("--students", default="", help="comma-separated subset (default: all in params.yaml)")
    args = parser.parse_args()
    repo = Path.cwd()
    params = yaml.safe_load((repo / "params.yaml").read_text())
    data_dir, baseline = params["data"]["dir"], params["report"]["baseline"]
    teacher_metrics = json.loads((Path(params["teacher"]["eval_dir"]) / "metrics.json").read_text())
    key = f"tpr@fpr={args.fpr}"
    teacher = teacher_metrics["test"][key]

    commands = student_commands(repo)
    names = [n for n in args.students.split(",") if n] or list(commands)
    tpr: dict[str, list[float]] = {name: [] for name in names}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            out = Path(args.work) / f"seed{seed}" / name
            if seed == params["student"]["seed"] and (Path("data/students") / name / "metrics.json").is_file():
                out = Path("data/students") / name  # the pipeline's own run is this seed's run
            if not (out / "metrics.json").is_file():
                run(f"{commands[name]} --seed {seed} --out {out} --no-resume")
                run(f"pipeline evaluate --model {out / 'model.pt'} --data {data_dir} --out {out}")
            tpr[name].append(json.loads((out / "metrics.json").read_text())["test"][key])

    result = {"fpr": args.fpr, "teacher": teacher, "seeds": args.seeds, "methods": {}}
    base = np.array(tpr[baseline]) if baseline in tpr else None
    for name, values in tpr.items():
        values = np.array(values)
        entry = {"tpr_mean": float(values.mean()), "tpr_std": float(values.std()), "tpr": values.tolist()}
        if base is not None and teacher > base.mean():
            gap = (values - base) / (teacher - base)
            entry.update(gap_closed_mean=float(gap.mean()), gap_closed_std=float(gap.std()))
        result["methods"][name] = entry
    print(json.dumps(result))


if __name__ == "__main__":
    main()

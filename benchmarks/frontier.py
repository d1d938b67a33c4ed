"""The student-size frontier: every student size x distillation method from the one teacher cache of `dvc repro`.

params.yaml `frontier` holds the sizes (architecture options), the methods (KD options), the candidate
schedules and the seeds. Each run is exactly the command a user would type:

    pipeline train-student --params params.yaml:student --params params.yaml:frontier.sizes.SIZE \\
        --params params.yaml:frontier.methods.METHOD --params params.yaml:frontier.schedules.SCHEDULE --seed S ...

For every size, in two phases:
1. **search** (seed `frontier.search_seed`): every method is trained with every candidate schedule, and each
   method keeps the schedule with the best final monitor.rec TPR@1e-4 (ties: the earlier, cheaper candidate).
   These runs are never evaluated on test.rec: the choice is made before test.rec is read.
2. **test** (seeds `frontier.seeds`): every method with its chosen schedule, evaluated on test.rec, with the
   cosine to the teacher on the training and test images (benchmarks/fidelity.py's figures).

Every finished run appends one line to the ledger (`--ledger`, git-tracked: results readable while the sweep
runs, and a killed or later sweep reruns only what is missing). A ledger line is reused only while its run's
resolved options and the teacher cache's fingerprint are unchanged. At the end (or with `--report`, which
trains nothing) frontier_report.py's summary is printed as ONE JSON line and `docs/frontier.png` drawn.

    python benchmarks/frontier.py --parallel 2                       # the whole frontier (hours on 2 cores)
    python benchmarks/frontier.py --sizes mbf_w05 --methods baseline,ekd --parallel 2
    python benchmarks/frontier.py --report                           # summary and plot from the ledger only
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark scripts
from frontier_report import plot, summarise  # noqa: E402
from quality import ChildFailed, pipeline, run  # noqa: E402

from pipeline.models import BackboneShape  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402

PHASES = ("search", "test")


class SweepError(RuntimeError):
    """A run of the sweep failed (its siblings were finished and kept)."""


@dataclass(frozen=True)
class Job:
    phase: str
    size: str
    method: str
    schedule: str
    seed: int

    @classmethod
    def of(cls, entry: dict) -> "Job":
        """The job a ledger entry records."""
        return cls(*(entry[f.name] for f in fields(cls)))

    @property
    def key(self) -> str:
        return f"{self.phase}/{self.size}/{self.method}/{self.schedule}/seed{self.seed}"

    def sections(self) -> list[str]:
        return ["student", f"frontier.sizes.{self.size}", f"frontier.methods.{self.method}",
                f"frontier.schedules.{self.schedule}"]


def resolved_options(params: dict, job: Job) -> dict:
    """The train-student options a job's --params sections give (later sections win, as on the CLI)."""
    options: dict = {}
    for section in job.sections():
        node = params
        for part in section.split("."):
            node = node[part]
        options.update(node)
    return options


def read_ledger(path: Path) -> dict[str, dict]:
    """The ledger's entries by job key (a later line replaces an earlier one; a line torn by a kill is
    skipped with a note, and its run is redone)."""
    entries: dict[str, dict] = {}
    if not path.is_file():
        return entries
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            entry = json.loads(line)
            entries[entry["key"]] = entry
        except (json.JSONDecodeError, KeyError, TypeError):
            print(f"{path} line {number}: not a ledger entry (torn by a kill?); that run is redone", file=sys.stderr)
    return entries


def current(entry: dict | None, options: dict, teacher: str) -> bool:
    return entry is not None and entry.get("options") == options and entry.get("teacher") == teacher


def choose_schedules(entries: dict[str, dict], size: str, method: str, schedules: list[str], seed: int) -> str | None:
    """The candidate with the best final monitor TPR@1e-4 of the search runs (the first on ties), or None while
    any of them is missing."""
    scores = []
    for schedule in schedules:
        entry = entries.get(Job("search", size, method, schedule, seed).key)
        if entry is None:
            return None
        scores.append(entry["monitor"]["tpr@fpr=1e-4"])
    return schedules[max(range(len(schedules)), key=lambda i: (scores[i], -i))]


def cache_identity(cache: Path | list[Path]) -> str:
    """The teacher and dataset fingerprints of the cache every run distils from (a new teacher: new runs); of
    an ensemble for a list of several caches (pipeline.cache.ensemble's, every member and its weight)."""
    caches = cache if isinstance(cache, list) else [cache]
    if len(caches) > 1:
        from pipeline.cache.ensemble import TeacherEnsemble

        ensemble = TeacherEnsemble.open(caches, verify=False)
        try:
            return f"{ensemble.teacher_fingerprint}/{ensemble.dataset_fingerprint}"
        finally:
            ensemble.close()
    import h5py

    with h5py.File(caches[0], "r") as handle:
        return f"{handle.attrs['teacher_fingerprint']}/{handle.attrs['dataset_fingerprint']}"


PINNED = {"teacher": "model.pt", "cache": "teacher.h5", "pools": "pools", "metrics": "metrics.json"}


def teacher_paths(params: dict, pinned: Path | None) -> dict[str, Path]:
    """The data, and the teacher's model, cache, pools and test metrics: params.yaml's (what `dvc repro` wrote),
    or those of a pinned folder. A teacher retrained on another CPU differs (float kernels), so a sweep spread
    over machines pins one."""
    data = Path(params["data"]["dir"])
    if pinned is not None:
        return {"data": data, **{key: pinned / name for key, name in PINNED.items()}}
    return {"data": data, "teacher": Path(params["teacher"]["checkpoint"]), "cache": Path(params["extract"]["out"]),
            "pools": Path(params["pools"]["out"]), "metrics": Path(params["teacher"]["eval_dir"]) / "metrics.json"}


def cache_options(cache: Path | list[Path]) -> list:
    """train-student's --cache options: one cache, or every member of an ensemble of caches."""
    return [a for c in (cache if isinstance(cache, list) else [cache]) for a in ("--cache", c)]


def pin_teacher(paths: dict[str, Path], folder: Path) -> None:
    """Copy the teacher's files into `folder` (each through a temporary name, so a half copy never looks whole)."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in PINNED.items():
        sources = [paths[key]] if paths[key].is_file() else sorted(p for p in paths[key].iterdir() if p.is_file())
        for source in sources:
            target = folder / name / source.name if paths[key].is_dir() else folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            shutil.copyfile(source, partial)
            partial.replace(target)
            print(f"wrote {target}", file=sys.stderr)


def final_monitor(run_dir: Path) -> dict:
    """The last epoch's monitor.rec TPRs and val.bin accuracy (DVCLive's summary of the run)."""
    summary = json.loads((run_dir / "dvclive" / "metrics.json").read_text())["eval"]
    return {**summary["monitor"], "val_accuracy": summary["val"]["accuracy"]}


class Sweep:
    """Runs jobs (train-student, then for test runs evaluate and fidelity) and appends their ledger lines."""

    def __init__(self, params: dict, paths: dict, work: Path, ledger: Path, parallel: int, teacher: str):
        self.params, self.paths, self.work, self.ledger_path = params, paths, work, ledger
        self.parallel, self.teacher = parallel, teacher
        self.threads = 1 if parallel > 1 else None  # two 2-thread runs on 2 cores slow each other ~10x
        self.entries = read_ledger(ledger)
        self.lock = threading.Lock()
        self.started, self.done, self.total, self.seconds = time.time(), 0, 0, []
        self._fidelity = None

    def pending(self, jobs: list[Job]) -> list[Job]:
        return [j for j in jobs if not current(self.entries.get(j.key), resolved_options(self.params, j), self.teacher)]

    def run_all(self, jobs: list[Job]) -> None:
        # the longest first, so that parallel runs end together; then seed by seed, so that every method of a
        # seed (a paired comparison) is finished before the next seed starts
        todo = sorted(self.pending(jobs), key=lambda j: (-resolved_options(self.params, j).get("epochs", 0), j.seed))
        self.total += len(todo)
        with ThreadPoolExecutor(self.parallel) as pool:
            futures = [pool.submit(self.run_one, job) for job in todo]
        failed = [f.exception() for f in futures if f.exception() is not None]
        if failed:  # the other runs were finished and kept: a rerun redoes only the failed ones
            raise failed[0]

    def run_one(self, job: Job) -> dict:
        out = self.work / job.size / job.method / job.schedule / f"seed{job.seed}"
        began, reused = time.time(), (out / "model.pt").is_file()  # a finished run only gets its ledger line
        command = pipeline("train-student", *[a for s in job.sections() for a in ("--params", f"params.yaml:{s}")],
                           "--data", self.paths["data"], "--name", job.method, "--out", out,
                           *cache_options(self.paths["cache"]), "--pools", self.paths["pools"], "--monitor",
                           self.paths["data"], "--seed", job.seed)
        try:
            self._run_job(job, out, command)
        except ChildFailed as error:
            raise SweepError(f"{job.key}: {error}") from None
        entry = {"key": job.key, **vars(job), "options": resolved_options(self.params, job), "teacher": self.teacher,
                 "run": str(out), "monitor": final_monitor(out), **self.complexity(job)}
        if job.phase == "test":
            test = json.loads((out / "eval" / "metrics.json").read_text())["test"]
            entry["test"] = {k: v for k, v in test.items() if k.startswith("tpr@fpr=")}
            fidelity = self.fidelity(out / "model.pt")
            if fidelity is not None:
                entry["fidelity"] = fidelity
        entry["wall_s"] = round(time.time() - began, 1)
        with self.lock:
            with open(self.ledger_path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")
            self.entries[job.key] = entry
            self.done += 1
            if not reused:
                self.seconds.append(entry["wall_s"])
            left = (self.total - self.done) * sum(self.seconds) / max(1, len(self.seconds))
            print(f"[frontier {self.done}/{self.total}] {job.key}: monitor TPR@1e-4 "
                  f"{entry['monitor']['tpr@fpr=1e-4']:.4f}" + (f", test {entry['test']['tpr@fpr=1e-4']:.4f}"
                                                               if "test" in entry else "")
                  + f" ({entry['wall_s'] / 60:.1f} min; about {left / 60 / self.parallel:.0f} min left)",
                  file=sys.stderr, flush=True)
        return entry

    def _run_job(self, job: Job, out: Path, command: list[str]) -> None:
        run(command, out / "log.txt", self.threads)  # resumes a killed run from its checkpoint, exactly
        if job.phase == "test":  # only now, after the schedule was chosen, is test.rec read
            run(pipeline("evaluate", "--params", "params.yaml:evaluate", "--model", out / "model.pt", "--data",
                         self.paths["data"], "--out", out / "eval"), out / "log.txt", self.threads)

    def complexity(self, job: Job) -> dict:
        from pipeline.formats.recordio import read_property
        from pipeline.models import get_model
        from pipeline.models.complexity import complexity

        options = resolved_options(self.params, job)
        default = {f.name: f.default for cls in (TrainConfig, BackboneShape) for f in fields(cls)}  # train-student's
        arch, shape = options.get("arch", default["arch"]), {**default, **options}
        size = shape["input_size"] or read_property(Path(self.paths["data"]) / "property")[1][0]
        model = get_model(arch, width=shape["width"], num_features=shape["embedding_size"], input_size=size)
        return complexity(model, size)

    def fidelity(self, model: Path) -> dict | None:
        """Cosine to the teacher on the training and test images (fidelity.py's figures and image sets); None
        for a teacher without one model file (an ensemble of caches)."""
        import fidelity

        if self.paths.get("teacher") is None:
            return None

        with self.lock:  # the images and the teacher's embeddings once per sweep
            if self._fidelity is None:
                images, subset = fidelity.image_sets(Path(self.paths["data"]), None, fidelity.PAIRS_OF)
                self._fidelity = images, subset, fidelity.embeddings(self.paths["teacher"], images, 256)
        images, subset, teacher = self._fidelity
        student = fidelity.embeddings(model, images, 256)
        return {name: fidelity.figures(student[name], teacher[name], images[name].labels, subset[name])
                for name in fidelity.SETS}


def plan(frontier: dict, sizes: list[str], methods: list[str], phase: str, entries: dict) -> list[Job]:
    """The jobs of one phase for `sizes` x `methods`; test jobs only where the search has chosen a schedule."""
    schedules = list(frontier["schedules"])
    jobs = []
    for size in sizes:
        for method in methods:
            if phase == "search":
                jobs += [Job("search", size, method, s, frontier["search_seed"]) for s in schedules]
                continue
            chosen = choose_schedules(entries, size, method, schedules, frontier["search_seed"])
            if chosen is not None:
                jobs += [Job("test", size, method, chosen, seed) for seed in frontier["seeds"]]
    return jobs


def subset(text: str, names: list[str], what: str, parser: argparse.ArgumentParser) -> list[str]:
    picked = [n for n in text.split(",") if n] if text else names
    unknown = [n for n in picked if n not in names]
    if unknown:
        parser.error(f"--{what} {','.join(unknown)}: not in params.yaml frontier.{what} ({', '.join(names)})")
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="", help="comma-separated subset of frontier.sizes (default: all)")
    parser.add_argument("--methods", default="", help="comma-separated subset of frontier.methods (default: all)")
    parser.add_argument("--phase", choices=("both", *PHASES), default="both", help="run only one phase")
    parser.add_argument("--work", default="benchmarks/out/frontier", help="run folders (models, logs)")
    parser.add_argument("--ledger", default="results/frontier/runs.jsonl", help="one JSON line per finished run")
    parser.add_argument("--plot", default="docs/frontier.png")
    parser.add_argument("--parallel", type=int, default=1, help="runs at a time (each then uses one torch thread)")
    parser.add_argument("--report", action="store_true", help="train nothing: summary and plot from the ledger")
    parser.add_argument("--teacher", default="", help="a folder written by --pin-teacher (default: the dvc repro "
                        "teacher, cache, pools and teacher evaluation that params.yaml names)")
    parser.add_argument("--pin-teacher", default="", help="copy the teacher's files into this folder and exit, so "
                        "that later sweeps on another machine distil from the very same teacher")
    args = parser.parse_args()
    if args.parallel < 1:
        parser.error(f"--parallel {args.parallel}: must be at least 1")
    params = yaml.safe_load(Path("params.yaml").read_text())
    frontier = params["frontier"]
    sizes = subset(args.sizes, list(frontier["sizes"]), "sizes", parser)
    methods = subset(args.methods, list(frontier["methods"]), "methods", parser)
    paths = teacher_paths(params, Path(args.teacher) if args.teacher else None)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        parser.error(f"{', '.join(missing)}: missing (run `dvc repro` first, or give --teacher a pinned folder)")
    if args.pin_teacher:
        pin_teacher(paths, Path(args.pin_teacher))
        return
    teacher_metrics = json.loads(paths["metrics"].read_text())
    teacher = cache_identity(paths["cache"])
    ledger = Path(args.ledger)
    ledger.parent.mkdir(parents=True, exist_ok=True)
    sweep = Sweep(params, paths, Path(args.work), ledger, args.parallel, teacher)
    others = sorted({e.get("teacher") for e in sweep.entries.values()} - {teacher})
    if others:
        print(f"{ledger}: {sum(e.get('teacher') in others for e in sweep.entries.values())} run(s) distilled from "
              f"another teacher ({', '.join(o[:12] for o in others)}...) are not used; if that teacher was pinned, "
              "give its folder to --teacher", file=sys.stderr)
    try:
        for size in [] if args.report else sizes:  # size by size: a size's results are complete before the next
            for phase in PHASES:
                if args.phase in ("both", phase):
                    sweep.run_all(plan(frontier, [size], methods, phase, sweep.entries))
    except SweepError as error:
        sys.exit(f"frontier: {error} (a rerun redoes only the unfinished runs)")
    entries = [e for e in sweep.entries.values() if e["size"] in frontier["sizes"]
               and e["method"] in frontier["methods"] and e["schedule"] in frontier["schedules"]
               and current(e, resolved_options(params, Job.of(e)), teacher)]
    summary = summarise(entries, frontier, teacher_metrics["test"])
    plot(summary, Path(args.plot))
    print(json.dumps({"benchmark": "frontier", **summary, "plot": args.plot}))


if __name__ == "__main__":
    main()

"""What each stage costs as the training set grows: the pipeline at 112 px on geometrically growing synthetic
sets (~30 images per identity), stage by stage, each stage a `pipeline` command in a child process
(benchmarks/scale_runner.py: wall time, peak RSS of the process tree, its progress bar).

Stages per size N: synthesize, extract-teacher (a cheap proxy teacher, see below), build-pools (exact
thresholds over all negatives, identity neighbours, hard pairs), one epoch of train-student on the cached
targets (the shipped `ekd` recipe: L2 + EKD, hard-pair sampler), evaluate. For sizes above
`--train-full-max` the epoch is run until `--train-steps` steps, SIGKILLed, resumed from its mid-epoch
checkpoint (the resumed bar must start at the checkpoint) and killed again: the epoch's time is the
measured set-up plus total steps / measured steps per second (marked `"epoch": "extrapolated"`).

Teacher: a stand-in (`--teacher-arch pooled`: 8x8 average pooling and a fixed random projection to 512-d,
TorchScript; or a randomly initialised backbone such as mbf) replaces the real teacher so that 100k images
fit the CPU budget: extract-teacher then measures the pipeline's own cost (decode, preprocess, the cache),
and `teacher_rates` measures the bare two-view forward rate of the proxy and of an r100 at 112 px on this
machine (the real teacher's cost, added in the estimates), and the online-teacher epoch (`online_epoch_s`) is the cached
epoch plus one teacher forward per trained image at each rate (derived, not run).

At the largest size (`--extras`): build-pools is SIGKILLed at 60% of its threshold scan and rerun (it must
resume at its last saved block and write the same thresholds), and `--samples` rows of build-pools'
`--threshold-rows` are compared with the exact thresholds: the FPR each sampled threshold really has over all
negatives (counted in one more full scan with `count`, else read off the exact thresholds) over the target.
`--stages` measures some stages only, on the files another run kept in `--work` (`--keep`).

Prints one JSON line per stage (sizes, wall_s, images_per_s, peak_rss_mb, disk_bytes, exponents b of
wall ~ N^b and RSS ~ N^b) plus one for the teacher rates and one for the sampling error; `--plot` draws
wall time and peak RSS against N on log-log axes; `--json` keeps every record.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/scale.py --sizes 6250,25000,100000 --plot docs/scale.png
    python benchmarks/scale.py --tiny          # seconds: 32 px, two tiny sizes (the test suite runs it)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

import pipeline.cli  # noqa: F401  (imported before forking: every stage starts without import time)
from arguments import (architecture, existing_file, image_side, int_list, load_json, load_json_lines, names,
                       non_negative_int, parse_later, positive_float, positive_int, run_main)
from scale_probes import sample_error, save_teacher, teacher_rates
from scale_runner import Run, disk_bytes, pipeline_command, run_child

# --- CLI option names and the recipe: the one place to update when a command's options are renamed -------
SYNTHESIZE = {"--images-per-identity": 30, "--val-identities": 20, "--val-pairs": 200, "--test-identities": 100,
              "--test-images-per-identity": 5, "--monitor-identities": 0, "--ijb-identities": 0, "--workers": 1}
IDENTITIES = "--identities"
EXTRACT = {"--batch-size": 256, "--shard-size": 16384, "--threads": 1, "--device": "cpu", "--workers": 0}
POOLS = {"--neighbours": 16, "--hard-pairs": 100_000, "--block-rows": 4096, "--centre-views": "both"}
POOLS_SAMPLE = "--threshold-rows"
STUDENT = {"--arch": "mbf", "--width": 0.125, "--embedding-size": 512, "--epochs": 1, "--stop-after-epochs": 1,
           "--batch-size": 64, "--balanced-batch-size": 64, "--per-identity": 4, "--lr": 0.1, "--margin-s": 32.0,
           "--kd": "l2+ekd", "--kd-scale": "grad-ratio", "--l2-weight": 1.5, "--ekd-weight": 0.2,
           "--ekd-mode": "global", "--ekd-temperature": 0.05, "--ekd-one-sided": None,
           "--ekd-positive-weight": 0.0, "--sampler": "hard-pairs", "--pair-share": 0.5, "--ekd-queue-size": 8192,
           "--workers": 0, "--no-preload": None, "--device": "cpu", "--log-every": 50}
CHECKPOINT_EVERY = "--checkpoint-every"
EVALUATE = {"--batch-size": 256, "--device": "cpu"}
STAGES = ("synthesize", "extract-teacher", "build-pools", "train-student", "evaluate")
EXTRAS = ("resume", "sample", "count")
RECORD_FIGURES = ("n", "identities", "wall_s", "cpu_s", "images_per_s", "peak_rss_mb", "disk_bytes")  # of a stage
MB = 1 << 20


def argv(options: dict) -> list[str]:
    out: list[str] = []
    for key, value in options.items():
        out += [key] if value is None else [key, str(value)]
    return out


def record(stage: str, n: int, run: Run, images: int, path: Path, **extra) -> dict:
    if run.rc != 0 and not run.killed:
        raise SystemExit(f"{stage} at N={n} failed (exit {run.rc}):\n{run.tail}")
    return {"stage": stage, "n": n, "wall_s": round(run.wall_s, 2), "cpu_s": round(run.cpu_s, 2),
            "images_per_s": round(images / run.wall_s, 1),
            "peak_rss_mb": round(run.peak_rss / MB), "disk_bytes": disk_bytes(path),
            "bars": [f"{b.desc} {b.n}/{b.total} {b.rate}" for b in run.bars], **extra}


def train_student(n: int, data: Path, cache: Path, pools: Path, out: Path, log: Path, args) -> dict:
    base = ["train-student", "--name", "scale", "--cache", cache, "--pools", pools, "--data", data, "--out", out,
            *argv(STUDENT)]
    epoch_images = n // STUDENT["--batch-size"] * (STUDENT["--batch-size"] + STUDENT["--balanced-batch-size"])
    if n <= args.train_full_max:
        run = run_child(pipeline_command(base), log)
        return record("train-student", n, run, epoch_images, out, epoch="measured", epoch_images=epoch_images)
    every = max(1, args.train_steps // 2)
    command = pipeline_command(base + [CHECKPOINT_EVERY, every])
    first = run_child(command, log, kill_when=lambda b: b.desc.startswith("epoch") and b.n >= args.train_steps)
    if not first.killed or first.first_bar is None:  # finished before the kill: a whole epoch measured
        return record("train-student", n, first, epoch_images, out, epoch="measured", epoch_images=epoch_images)
    bar = first.bars[-1]
    steps_per_s = (bar.n - first.first_bar.n) / max(first.wall_s - first.first_bar_s, 1e-9)
    epoch_s = first.first_bar_s + bar.total / steps_per_s
    again = run_child(command, log, kill_when=lambda b: b.desc.startswith("epoch") and b.n >= args.train_steps + 10)
    resumed_at = again.first_bar.n if again.first_bar else None
    cpu_per_step = first.cpu_s / max(first.wall_s, 1e-9) * (first.wall_s - first.first_bar_s) / max(bar.n, 1)
    cpu_s = first.cpu_s / first.wall_s * first.first_bar_s + bar.total * cpu_per_step  # same split as wall
    run = Run(0, epoch_s, max(first.peak_rss, again.peak_rss), True, cpu_s, first.bars)
    return record("train-student", n, run, epoch_images, out, epoch="extrapolated", epoch_images=epoch_images,
                  setup_s=round(first.first_bar_s, 1), steps_measured=bar.n, steps_total=bar.total,
                  steps_per_s=round(steps_per_s, 3), killed_at_step=bar.n, resumed_at_step=resumed_at,
                  resume_ok=resumed_at == (bar.n // every) * every)


def pools_resume(n: int, cache: Path, out: Path, log: Path) -> dict:
    """build-pools killed at 60% of its threshold scan (scan state saved every 10 s), then rerun: the rerun's
    bar must start where the last save was, and it must write the same thresholds."""
    os.environ["PIPELINE_SCAN_CHECKPOINT_S"] = "10"
    command = pipeline_command(["build-pools", "--cache", cache, "--out", out, *argv(POOLS)])
    scans = ("thresholds", "coarse ranks", "exact ranks")
    first = run_child(command, log, kill_when=lambda b: b.desc in scans[:2] and b.n >= 0.6 * b.total)
    again = run_child(command, log)
    del os.environ["PIPELINE_SCAN_CHECKPOINT_S"]
    killed = {d: f"{b.n}/{b.total}" for d, b in zip([b.desc for b in first.bars], first.bars) if d in scans}
    resumed = {d: f"{b.n}/{b.total}" for d, b in again.firsts.items() if d in scans}
    return {"stage": "build-pools-resume", "n": n, "killed": first.killed, "killed_at": killed,
            "rerun_starts_at": resumed, "rerun_wall_s": round(again.wall_s, 1), "rerun_rc": again.rc,
            "same_thresholds": (out / "thresholds.json").read_text() == (out.parent / "pools" / "thresholds.json")
            .read_text() if again.rc == 0 else False}


def measure_size(n: int, root: Path, args, rates: dict) -> list[dict]:
    work = root / f"n{n}"
    data, cache, pools, student, results = (work / p for p in ("data", "teacher.h5", "pools", "student", "eval"))
    log = work / "stages.log"
    identities = max(2, n // SYNTHESIZE["--images-per-identity"])
    images = identities * SYNTHESIZE["--images-per-identity"]
    out: list[dict] = []

    def add(r: dict) -> None:  # each record is also kept as it comes: a stopped run keeps what it measured
        r["identities"] = identities
        out.append(r)
        with open(root / f"records{args.tag}.jsonl", "a") as handle:
            handle.write(json.dumps(r) + "\n")

    wanted = set(args.stages)  # the others reuse the files of an earlier run kept in --work
    if "synthesize" in wanted:
        run = run_child(pipeline_command(["synthesize", "--out", data, "--size", args.image_size,
                                          IDENTITIES, identities, *argv(SYNTHESIZE)]), log)
        add(record("synthesize", images, run, images, data / "train.rec", all_files_bytes=disk_bytes(data)))
    if "extract-teacher" in wanted:
        run = run_child(pipeline_command(["extract-teacher", "--data", data, "--teacher", args.teacher_file,
                                          "--out", cache, *argv(EXTRACT)]), log)
        add(record("extract-teacher", images, run, images, cache, teacher=args.teacher_arch))
    if "build-pools" in wanted:
        run = run_child(pipeline_command(["build-pools", "--cache", cache, "--out", pools, *argv(POOLS)]), log)
        n_neg = json.loads((pools / "thresholds.json").read_text()).get("counts", {}).get("n_neg")
        add(record("build-pools", images, run, images, pools, negative_pairs=n_neg,
                   ns_per_pair=round(run.cpu_s / n_neg * 1e9, 3) if n_neg else None))
    if "train-student" in wanted:
        train = train_student(images, data, cache, pools, student, log, args)
        epoch_images = train["epoch_images"]
        train["online_epoch_s"] = {name: round(train["wall_s"] + epoch_images / rate, 1)
                                   for name, rate in rates["images_per_s"].items()}
        add(train)
    model = student / "model.pt"
    if "evaluate" in wanted and model.exists():  # a killed (extrapolated) epoch leaves no model.pt
        run = run_child(pipeline_command(["evaluate", "--model", model, "--data", data, "--out", results,
                                          *argv(EVALUATE)]), log)
        add(record("evaluate", images, run, SYNTHESIZE["--test-identities"]
                          * SYNTHESIZE["--test-images-per-identity"], results))
    if n == max(args.sizes) and not args.tiny and "resume" in args.extras:
        try:
            add(pools_resume(images, cache, work / "pools_resume", log))
        except Exception as error:  # noqa: BLE001 - a failed demonstration is a result, not a reason to stop
            add({"stage": "build-pools-resume", "n": images, "error": repr(error)})
    if n == max(args.sizes) and args.samples and "sample" in args.extras:
        add({"stage": "sample-error", "n": images, **sample_error(
            cache, pools, args.samples, argv(POOLS), POOLS_SAMPLE, POOLS["--block-rows"], log, "count" in args.extras)})
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return out


def exponent(ns, values) -> float | None:
    pts = [(x, y) for x, y in zip(ns, values) if y and y > 0]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def summarise(records: list[dict]) -> list[dict]:
    lines = []
    for stage in STAGES:
        rows = sorted((r for r in records if r["stage"] == stage), key=lambda r: r["n"])
        if not rows:
            continue
        ns = [r["n"] for r in rows]
        line = {"benchmark": "scale", "stage": stage, "sizes": ns, "identities": [r["identities"] for r in rows]}
        for key in ("wall_s", "cpu_s", "images_per_s", "peak_rss_mb", "disk_bytes"):
            line[key] = [r[key] for r in rows]
        line["b_wall"] = exponent(ns, line["wall_s"])
        line["b_cpu"] = exponent(ns, line["cpu_s"])
        line["b_rss"] = exponent(ns, line["peak_rss_mb"])
        line["b_disk"] = exponent(ns, line["disk_bytes"])
        for key in ("epoch", "online_epoch_s", "ns_per_pair", "negative_pairs", "resume_ok", "resumed_at_step",
                    "killed_at_step", "steps_per_s", "setup_s"):
            if any(key in r for r in rows):
                line[key] = [r.get(key) for r in rows]
        lines.append(line)
    return lines


def markdown(lines: list[dict]) -> str:
    """The measured table: one row per stage and size, the fitted exponents in the stage's first row."""
    rows = ["| stage | N | identities | wall s | CPU s | images/s (wall) | peak RSS MB | disk MB | b (wall) | "
            "b (CPU) | b (RSS) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for line in lines:
        for i, n in enumerate(line["sizes"]):
            fits = (f"{line['b_wall']} | {line['b_cpu']} | {line['b_rss']}" if i == 0 else " | | ")
            mark = " (extrapolated)" if line.get("epoch", [""] * len(line["sizes"]))[i] == "extrapolated" else ""
            rows.append(f"| {line['stage'] if i == 0 else ''} | {n:,} | {line['identities'][i]:,} | "
                        f"{line['wall_s'][i]:.1f}{mark} | {line['cpu_s'][i]:.1f} | {line['images_per_s'][i]:,.0f} | "
                        f"{line['peak_rss_mb'][i]:,} | {line['disk_bytes'][i] / 1e6:,.1f} | {fits} |")
    return "\n".join(rows)


def plot(lines: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for line in lines:
        label = f"{line['stage']} (b CPU={line['b_cpu']}, wall={line['b_wall']})"
        drawn = axes[0].loglog(line["sizes"], line["cpu_s"], "o-", label=label)
        axes[0].loglog(line["sizes"], line["wall_s"], "o--", color=drawn[0].get_color(), alpha=0.4)
        axes[1].loglog(line["sizes"], np.array(line["peak_rss_mb"]) / 1024, "o-",
                       label=f"{line['stage']} (b={line['b_rss']})")
    axes[0].set(xlabel="training images N", ylabel="seconds",
               title="CPU s (solid), wall s (dashed, shared machine); train: one epoch")
    axes[1].set(xlabel="training images N", ylabel="peak RSS, GiB", title="peak RSS per stage")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int_list(1), default=[6250, 25000, 100000])
    parser.add_argument("--image-size", type=image_side, default=112)
    parser.add_argument("--teacher-arch", default="pooled", help="pooled (near-free TorchScript) or a backbone")
    parser.add_argument("--teacher-width", type=positive_float, default=0.125)
    parser.add_argument("--reference-arch", default="r100",
                        help="the real teacher whose forward rate is measured ('': none)")
    parser.add_argument("--train-full-max", type=non_negative_int, default=6250,
                        help="largest N trained for a whole epoch")
    parser.add_argument("--train-steps", type=positive_int, default=150, help="steps measured above --train-full-max")
    parser.add_argument("--samples", type=int_list(1, empty=True), default=[10000, 30000])
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep each size's files")
    parser.add_argument("--json", type=Path, help="write every record here")
    parser.add_argument("--plot", type=Path)
    parser.add_argument("--markdown", type=Path, help="write the measured table (markdown) here")
    parser.add_argument("--stages", type=names(STAGES), default=list(STAGES),
                        help="stages to measure (comma-separated); the others' files come from --work")
    parser.add_argument("--extras", type=names(EXTRAS, empty=True), default=list(EXTRAS),
                        help="at the largest size: resume (build-pools killed and resumed), sample (--threshold-rows error), "
                             "count (count every negative above the sampled thresholds instead of interpolating)")
    parser.add_argument("--tag", default="", help="suffix of the records file (records<TAG>.jsonl)")
    parser.add_argument("--from-records", type=existing_file,
                        help="only summarise a run's records.jsonl (no stage runs)")
    parser.add_argument("--tiny", action="store_true", help="a few seconds: 32 px, N = 600 and 1200, no r100")
    args = parser.parse_args()
    if args.tiny:
        args.sizes, args.image_size, args.teacher_width, args.reference_arch = [600, 1200], 32, 0.125, ""
        args.train_full_max, args.train_steps, args.samples = 600, 4, [300]
    if args.from_records:
        return report(*read_records(parser, args.from_records), args)
    # checked here, not by `type=`: the backbone names come with torch, which --from-records does without
    parse_later(parser, "--teacher-arch", architecture("pooled"), args.teacher_arch)
    parse_later(parser, "--reference-arch", architecture(""), args.reference_arch)
    root = args.work or Path(tempfile.mkdtemp(prefix="scale-"))
    root.mkdir(parents=True, exist_ok=True)
    args.teacher_file = root / ("teacher.ts" if args.teacher_arch == "pooled" else "teacher.pt")
    if args.teacher_file.exists() and (root / "rates.json").exists():  # a later pass over a kept --work
        rates = json.loads((root / "rates.json").read_text())
    else:
        save_teacher(args.teacher_file, args.teacher_arch, args.teacher_width, args.image_size, root / "probes.log")
        rates = teacher_rates(args.teacher_file, args.reference_arch, args.image_size, root / "probes.log")
    records = []
    for n in args.sizes:
        records += measure_size(n, root, args, rates)
    report(records, rates, args)
    if not args.work:
        shutil.rmtree(root, ignore_errors=True)


def read_records(parser: argparse.ArgumentParser, path: Path) -> tuple[list[dict], dict]:
    """The records of a run (`--from-records`, records<TAG>.jsonl) and its rates.json beside them; `parser.error`
    naming the file and line that is not what scale.py wrote."""
    records = load_json_lines(parser, "--from-records", path)
    for row, record in enumerate(records, 1):
        needed = ("stage", *RECORD_FIGURES) if record.get("stage") in STAGES else ("stage",)
        missing = [key for key in needed if not isinstance(record.get(key), str if key == "stage" else (int, float))]
        if missing:
            parser.error(f"--from-records {path}: record {row} is not one scale.py writes (no {', '.join(missing)})")
    beside = path.parent / "rates.json"
    if not beside.is_file():
        parser.error(f"--from-records {path}: no {beside} beside it (scale.py writes both into --work)")
    rates = load_json(parser, "--from-records", beside)
    if not isinstance(rates, dict):
        parser.error(f"--from-records {path}: {beside} is not the rates scale.py writes")
    return records, rates


def report(records: list[dict], rates: dict, args) -> None:
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "gpu": None}
    lines = summarise(records)
    for line in lines:
        print(json.dumps(line))
    print(json.dumps({"benchmark": "scale", "stage": "teacher-rates", **rates, "machine": machine}))
    for r in records:
        if r["stage"] in ("sample-error", "build-pools-resume"):
            print(json.dumps({"benchmark": "scale", **r}))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "rates": rates, "records": records,
                                         "lines": lines}, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(lines) + "\n")
    if args.plot:
        plot(lines, args.plot, f"{machine['cpu']}, {machine['cores']} cores, no GPU; {args.image_size} px, "
                               f"teacher {args.teacher_arch}")


if __name__ == "__main__":
    run_main(main)

"""Issue 28: every script of benchmarks/ answers a bad argument with ONE line, as the pipeline's CLI does: argparse's
usage, then `SCRIPT.py: error: ...` naming the option and the value, exit code 2; no traceback, nothing on stdout
(no NaN printed with exit code 0).

One row per case: the script, its arguments ("{name}" is a path of the `paths` fixture) and a fragment of the
error line. Each runs as `python benchmarks/SCRIPT.py ARGS` in a child process under a memory and process-count
limit, so that a row that regresses (100000 workers, a PiB allocation) fails instead of taking the machine down.
Every row fails while the arguments are checked, before the script imports torch where it can (the rows that name
a backbone or a device, or get past the parser, import it).
"""
from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from helpers.data import write_random_faces
from helpers.processes import ROOT, environment

MEMORY_LIMIT = 6 << 30  # address space of each child: torch's import takes ~2-3 GiB of it
EXTRA_PROCESSES = 32  # processes each child may add to what this user already runs
TIMEOUT_S = 60


def _limited() -> None:  # preexec_fn: runs in the child, before python starts
    user = os.getuid()
    running = sum(1 for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == user)
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    resource.setrlimit(resource.RLIMIT_NPROC, (running + EXTRA_PROCESSES,) * 2)


@dataclass
class Row:
    script: str  # benchmarks/SCRIPT.py
    args: tuple
    fragment: str  # in the one error line ("{name}" filled in as in `args`)


# fidelity.py's required options, all valid; a row's own value of one of them comes after and wins
FIDELITY = ("--data", "{data}", "--teacher", "{teacher}", "--runs", "{runs}", "--methods", "baseline", "--seeds", "1")
MORE = "more processes than this machine can run"
ROWS = {
    # quality.py
    "quality --seeds abc": Row("quality", ("--seeds", "abc"), "argument --seeds: 'abc': not an integer"),
    "quality --seeds 1,1": Row("quality", ("--seeds", "1,1"), "argument --seeds: '1,1': 1 given twice"),
    "quality --data-seeds -1": Row("quality", ("--data-seeds", "-1"), "argument --data-seeds: -1: must be >= 0"),
    "quality --scale 0": Row("quality", ("--scale", "0"), "argument --scale: 0: must be >= 1"),
    "quality --steps nan": Row("quality", ("--steps", "nan"), "argument --steps: nan: must be a finite number"),
    "quality --parallel 100000": Row("quality", ("--parallel", "100000"), f"argument --parallel: 100000: {MORE}"),
    "quality --students nosuch": Row("quality", ("--students", "nosuch"),
                                     "argument --students: nosuch: not one of params.yaml's students"),
    # fidelity.py
    "fidelity --batch-size 0": Row("fidelity", (*FIDELITY, "--batch-size", "0"),
                                   "argument --batch-size: 0: must be >= 1"),
    "fidelity --data missing": Row("fidelity", (*FIDELITY, "--data", "{missing}"),
                                   "argument --data: {missing}: no such folder"),
    "fidelity --data without train.rec": Row("fidelity", (*FIDELITY, "--data", "{runs}"),
                                             "argument --data: {runs}: no train.rec, test.rec in it"),
    "fidelity --teacher missing": Row("fidelity", (*FIDELITY, "--teacher", "{missing}"),
                                      "argument --teacher: {missing}: no such file"),
    "fidelity --runs missing": Row("fidelity", (*FIDELITY, "--runs", "{missing}"),
                                   "argument --runs: {missing}: no such folder"),
    "fidelity --methods nosuch": Row("fidelity", (*FIDELITY, "--methods", "nosuch"),
                                     "argument --methods: nosuch: not one of the models of every {runs}/seedS"),
    "fidelity --seeds without the method": Row("fidelity", (*FIDELITY, "--seeds", "1,2"),
                                               "argument --methods: baseline: not one of the models of every"),
    "fidelity --seeds abc": Row("fidelity", (*FIDELITY, "--seeds", "abc"), "argument --seeds: 'abc': not an integer"),
    "fidelity --pairs-of 0": Row("fidelity", (*FIDELITY, "--pairs-of", "0"), "argument --pairs-of: 0: must be >= 3"),
    "fidelity --train-images 1": Row("fidelity", (*FIDELITY, "--train-images", "1"),
                                     "argument --train-images: 1: must be >= 2"),
    "fidelity data without a positive pair": Row("fidelity", (*FIDELITY, "--data", "{singletons}"),
                                                 "{singletons}/train.rec: its 5 images hold no positive pair"),
    # scale.py
    "scale --from-records garbage": Row("scale", ("--from-records", "garbage"),
                                        "argument --from-records: garbage: no such file"),
    "scale --from-records not JSON": Row("scale", ("--from-records", "{garbage}"), "line 1 is not JSON"),
    "scale --from-records without figures": Row("scale", ("--from-records", "{partial}"),
                                                "record 1 is not one scale.py writes (no identities, wall_s"),
    "scale --from-records without rates.json": Row("scale", ("--from-records", "{records}"),
                                                   "rates.json beside it"),
    "scale --sizes 0": Row("scale", ("--sizes", "100,0"), "argument --sizes: '100,0': 0: must be >= 1"),
    "scale --image-size 100": Row("scale", ("--image-size", "100"), "argument --image-size: 100: must be a multiple"),
    "scale --teacher-arch nosuch": Row("scale", ("--teacher-arch", "nosuch"),
                                       "argument --teacher-arch: 'nosuch': not one of pooled, r18"),
    "scale --teacher-width 0": Row("scale", ("--teacher-width", "0"), "argument --teacher-width: 0.0: must be > 0"),
    "scale --train-full-max -1": Row("scale", ("--train-full-max", "-1"), "argument --train-full-max: -1: must be"),
    "scale --train-steps 0": Row("scale", ("--train-steps", "0"), "argument --train-steps: 0: must be >= 1"),
    "scale --samples x": Row("scale", ("--samples", "x"), "argument --samples: 'x': not an integer"),
    "scale --stages nosuch": Row("scale", ("--stages", "synthesize,nosuch"),
                                 "argument --stages: nosuch: not one of synthesize"),
    "scale --extras nosuch": Row("scale", ("--extras", "nosuch"), "argument --extras: nosuch: not one of resume"),
    # scale_estimate.py
    "scale_estimate missing file": Row("scale_estimate", ("{missing}",), "argument scale_json: {missing}: no such"),
    "scale_estimate not JSON": Row("scale_estimate", ("{garbage}",), "scale_json {garbage}: not a JSON file"),
    "scale_estimate without r100": Row("scale_estimate", ("{tiny_scale}",), "no r100 forward rate"),
    # shared_targets.py
    "shared_targets --gib 0": Row("shared_targets", ("--gib", "0"), "argument --gib: 0.0: must be > 0"),
    "shared_targets --gib 1e9": Row("shared_targets", ("--gib", "1e9"), "the cache takes"),
    "shared_targets --ranks 100000": Row("shared_targets", ("--ranks", "100000"), f"argument --ranks: 100000: {MORE}"),
    "shared_targets --steps 0": Row("shared_targets", ("--steps", "0"), "argument --steps: 0: must be >= 1"),
    "shared_targets --modes nosuch": Row("shared_targets", ("--modes", "nosuch"),
                                         "argument --modes: nosuch: not one of shared, ram"),
    "shared_targets --dir missing": Row("shared_targets", ("--dir", "{missing}"),
                                        "argument --dir: {missing}: no such folder"),
    # pools.py
    "pools --n 10": Row("pools", ("--n", "10"), "argument --n: 10: must be >= 32"),
    "pools --n 10**10": Row("pools", ("--n", str(10**10)), "--n 10000000000 with --dim 512: needs"),
    # 17 GB for the exact check's n x n arrays: more than the children's 6 GiB address space
    "pools --n 30000 (exact check)": Row("pools", ("--n", "30000", "--dim", "8"),
                                         "--n 30000 with --dim 8 (and the exact check, n <= 30000): needs"),
    "pools --dim 0": Row("pools", ("--dim", "0"), "argument --dim: 0: must be >= 1"),
    "pools --per-identity 0": Row("pools", ("--per-identity", "0"), "argument --per-identity: 0: must be >= 1"),
    "pools --block-rows 0": Row("pools", ("--block-rows", "0"), "argument --block-rows: 0: must be >= 1"),
    "pools --backend nosuch": Row("pools", ("--backend", "nosuch"), "argument --backend: invalid choice: 'nosuch'"),
    "pools --knn 5": Row("pools", ("--knn", "5"), "argument --knn: 5: must be >= 32"),
    "pools --seed -1": Row("pools", ("--seed", "-1"), "argument --seed: -1: must be >= 0"),
    "pools --repeats 0": Row("pools", ("--repeats", "0"), "argument --repeats: 0: must be >= 1"),
    # recordio_labels.py
    "recordio_labels --images 0": Row("recordio_labels", ("--images", "0"), "argument --images: 0: must be >= 1"),
    "recordio_labels --per-identity abc": Row("recordio_labels", ("--per-identity", "abc"),
                                              "argument --per-identity: 'abc': not an integer"),
    # synthesize.py
    "synthesize --identities 1": Row("synthesize", ("--identities", "1"), "argument --identities: 1: must be >= 2"),
    "synthesize --images-per-identity 0": Row("synthesize", ("--images-per-identity", "0"),
                                              "argument --images-per-identity: 0: must be >= 1"),
    "synthesize --workers 100000": Row("synthesize", ("--workers", "100000"), f"argument --workers: 100000: {MORE}"),
    # extract.py
    "extract --arch nosuch": Row("extract", ("--arch", "nosuch"), "argument --arch: 'nosuch': not one of r18"),
    "extract --width 0": Row("extract", ("--width", "0"), "argument --width: 0.0: must be > 0"),
    "extract --size 20": Row("extract", ("--size", "20"), "argument --size: 20: must be a multiple of 16"),
    "extract --images 0": Row("extract", ("--images", "0"), "argument --images: 0: must be >= 1"),
    "extract --batch-size 0": Row("extract", ("--batch-size", "0"), "argument --batch-size: 0: must be >= 1"),
    "extract --shard-size 0": Row("extract", ("--shard-size", "0"), "argument --shard-size: 0: must be >= 1"),
    "extract --repeats 0": Row("extract", ("--repeats", "0"), "argument --repeats: 0: must be >= 1"),
    "extract --warmup -1": Row("extract", ("--warmup", "-1"), "argument --warmup: -1: must be >= 0"),
    "extract --device nosuch": Row("extract", ("--device", "nosuch"), "argument --device: nosuch: use auto"),
    # ijb.py
    "ijb --images 0": Row("ijb", ("--images", "0"), "argument --images: 0: must be >= 1"),
    "ijb --workers 0": Row("ijb", ("--workers", "0"), "argument --workers: 0: must be >= 1"),
    # ensemble.py
    "ensemble --parallel 0": Row("ensemble", ("--parallel", "0"), "argument --parallel: 0: must be >= 1"),
    # train_step.py
    "train_step --size 8": Row("train_step", ("--size", "8"), "argument --size: 8: must be >= 16"),
    "train_step --batch 12": Row("train_step", ("--batch", "12"), "argument --batch: 12: must be a multiple of 8"),
    "train_step --classes 1": Row("train_step", ("--classes", "1"), "argument --classes: 1: must be >= 2"),
    "train_step --rows 0": Row("train_step", ("--rows", "0"), "argument --rows: 0: must be >= 1"),
    "train_step --teachers 1": Row("train_step", ("--teachers", "1"), "argument --teachers: 1: must be >= 2"),
    "train_step --queue 0": Row("train_step", ("--queue", "0"), "argument --queue: 0: must be >= 1"),
    "train_step --warmup -1": Row("train_step", ("--warmup", "-1"), "argument --warmup: -1: must be >= 0"),
    "train_step --repeats 0": Row("train_step", ("--repeats", "0"), "argument --repeats: 0: must be >= 1"),
    "train_step --threads 100000": Row("train_step", ("--threads", "100000"),
                                       "argument --threads: 100000: more threads than this machine can run"),
    "train_step --seed -1": Row("train_step", ("--seed", "-1"), "argument --seed: -1: must be >= 0"),
    # train_throughput.py
    "train_throughput --width -1": Row("train_throughput", ("--width", "-1"), "argument --width: -1.0: must be > 0"),
    "train_throughput --size 0": Row("train_throughput", ("--size", "0"), "argument --size: 0: must be >= 16"),
    "train_throughput --images 8": Row("train_throughput", ("--images", "8"), "argument --images: 8: must be >= 16"),
    "train_throughput --batch-size 0": Row("train_throughput", ("--batch-size", "0"),
                                           "argument --batch-size: 0: must be >= 1"),
    "train_throughput --batch-size above --images": Row(
        "train_throughput", ("--images", "64", "--batch-size", "65", "--device", "cpu"),
        "--batch-size 65: more than the 64 training images"),
    "train_throughput --epochs 1": Row("train_throughput", ("--epochs", "1"), "argument --epochs: 1: must be >= 2"),
    "train_throughput --workers 100000": Row("train_throughput", ("--workers", "100000"),
                                             f"argument --workers: 100000: {MORE}"),
    "train_throughput --repeats 0": Row("train_throughput", ("--repeats", "0"), "argument --repeats: 0: must be >= 1"),
}


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("benchmark-arguments")
    data = root / "data"  # only its files' names are looked at: every row fails before reading them
    data.mkdir()
    for name in ("train.rec", "test.rec"):
        (data / name).touch()
    (root / "teacher.pt").touch()
    (root / "runs" / "seed1" / "baseline").mkdir(parents=True)
    (root / "runs" / "seed1" / "baseline" / "model.pt").touch()
    singletons = write_random_faces(root / "singletons", classes=5, per_class=1)  # no positive pair
    for suffix in (".rec", ".idx"):
        shutil.copy(singletons / f"train{suffix}", singletons / f"test{suffix}")
    (root / "garbage.jsonl").write_text("garbage\n")
    (root / "partial.jsonl").write_text('{"stage": "synthesize", "n": 100}\n')
    (root / "records.jsonl").write_text('{"stage": "sample-error", "n": 100}\n')  # and no rates.json beside it
    (root / "tiny.json").write_text('{"lines": [{"stage": "build-pools", "cpu_s": [1.0], "negative_pairs": [10]}], '
                                    '"rates": {"images_per_s": {"proxy": 100.0}}}')
    return {"data": str(data), "teacher": str(root / "teacher.pt"), "runs": str(root / "runs"),
            "singletons": str(singletons), "missing": str(root / "missing"), "garbage": str(root / "garbage.jsonl"),
            "partial": str(root / "partial.jsonl"), "records": str(root / "records.jsonl"),
            "tiny_scale": str(root / "tiny.json")}


def error_lines(stderr: str) -> list[str]:
    """stderr without argparse's usage (its `usage:` line and the indented lines continuing it)."""
    lines, in_usage = [], False
    for line in stderr.splitlines():
        in_usage = line.startswith("usage:") or (in_usage and line.startswith(" "))
        if not in_usage:
            lines.append(line)
    return lines


def test_every_script_has_rows():
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    others = {"arguments", "gpu_common", "gpu_split_head", "scale_probes", "scale_runner",  # no command line
              "gpu_check", "split_head", "frontier", "frontier_report"}  # checked by their own tests
    assert scripts - others == {row.script for row in ROWS.values()}


@pytest.mark.parametrize("name", ROWS)
def test_a_bad_argument_is_one_line(name, paths):
    row = ROWS[name]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{row.script}.py"),
                           *(a.format(**paths) for a in row.args)], cwd=ROOT, env=environment(),
                          capture_output=True, text=True, timeout=TIMEOUT_S, preexec_fn=_limited)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output and done.stdout == "", output[-3000:]
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{row.script}.py: error: "), output[-3000:]
    assert row.fragment.format(**paths) in lines[0], output[-3000:]

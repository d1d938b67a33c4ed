"""Issue 28's hostile cases, one row each: the command, its exit code, a fragment of what it must print, and the
files that must be unchanged after it. Every command runs as `python -m pipeline` in a child process under a
memory and process-count limit (RLIMIT_AS, RLIMIT_NPROC), so that a case that regresses (100000 workers, a
512 GB margin head) fails its row instead of taking the test machine down.

Cases that need a damaged resume file (a scan checkpoint, a synthesize segment) compare the rerun's output
with an uninterrupted run's bytes.
"""
from __future__ import annotations

import hashlib
import json
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers.processes import environment
from helpers.teachers import teacher_and_cache

from pipeline.losses.config import KDConfig
from pipeline.synthetic.segments import Segments, segment_images

MEMORY_LIMIT = 6 << 30  # address space of each child: torch's import takes ~2-3 GiB of it
EXTRA_PROCESSES = 64  # processes each child may add to what this user already runs


def _limits() -> None:  # preexec_fn: runs in the child, before python starts
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    running = len([p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == _UID])
    resource.setrlimit(resource.RLIMIT_NPROC, (running + EXTRA_PROCESSES, running + EXTRA_PROCESSES))


_UID = psutil.Process().uids().real


def guarded(*args, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` under the memory and process limits (`env` added to the environment)."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], env={**environment(), **(env or {})},
                          cwd=cwd,
                          capture_output=True, text=True, timeout=240, preexec_fn=_limits)


def digests(paths) -> dict[str, str | None]:
    """sha256 of every file under `paths` (None for a missing path)."""
    out = {}
    for path in map(Path, paths):
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest() if file.exists() else None
    return out


@dataclass
class Case:
    args: tuple  # command line; "{name}" is a path of the world fixture
    code: int
    fragment: str  # in the single error line (or, for exit code 0, in stderr)
    unchanged: tuple = ()  # world paths that must keep their bytes
    absent: tuple = ()  # paths (under the case's folder) that must not exist afterwards
    env: dict = field(default_factory=dict)  # environment variables of the case


TRAIN = ("--arch", "mbf", "--width", 0.125, "--embedding-size", 16, "--epochs", 1, "--batch-size", 8,
         "--device", "cpu")
CASES = {
    "train-teacher --workers 100000": Case(
        ("train-teacher", "--data", "{data}", "--out", "{case}/run", *TRAIN, "--workers", 100000), 2,
        "--workers 100000: more processes than this machine can run", absent=("run",)),
    "train-student --workers 100000": Case(
        ("train-student", "--name", "s", "--data", "{data}", "--cache", "{cache}", "--out", "{case}/run", "--workers",
         100000), 2,
        "--workers 100000: more processes", absent=("run",)),
    "extract-teacher --workers 100000": Case(
        ("extract-teacher", "--data", "{data}", "--teacher", "{teacher}", "--out", "{case}/c.h5", "--workers",
         100000), 2, "--workers 100000: more processes", absent=("c.h5",)),
    "extract-teacher --threads 100000": Case(
        ("extract-teacher", "--data", "{data}", "--teacher", "{teacher}", "--out", "{case}/c.h5", "--threads",
         100000), 2, "--threads 100000: more threads", absent=("c.h5",)),
    "synthesize --workers 100000": Case(
        ("synthesize", "--out", "{case}/s", "--workers", 100000), 2, "--workers 100000: more processes",
        absent=("s",)),
    "property of 2e9 classes": Case(
        ("train-teacher", "--data", "{bigprop}", "--out", "{case}/run", *TRAIN, "--workers", 0), 2,
        "the margin head of 2000000000 classes x 16: needs", unchanged=("bigprop",), absent=("run/model.pt",)),
    "synthesize --size 70000": Case(
        ("synthesize", "--out", "{case}/s", "--size", 70000), 2, "--size 70000: must be <= 65535", absent=("s",)),
    "synthesize --size 5000": Case(
        ("synthesize", "--out", "{case}/s", "--size", 5000), 2, "--size 5000 (with --workers 1, --val-pairs 6000): "
        "needs", absent=("s",)),
    "--params random bytes": Case(
        ("train-teacher", "--data", "{data}", "--out", "{case}/run", "--params", "{random_bin}:teacher"), 2,
        "not a YAML text file", absent=("run",)),
    "--params a model file": Case(
        ("train-teacher", "--data", "{data}", "--out", "{case}/run", "--params", "{teacher}:teacher"), 2,
        "not a YAML text file", absent=("run",)),
    "--params an HDF5 file": Case(
        ("train-teacher", "--data", "{data}", "--out", "{case}/run", "--params", "{cache}:teacher"), 2,
        "not a YAML text file", unchanged=("cache",), absent=("run",)),
    "--ekd-temperature 1e-320": Case(
        ("train-student", "--name", "s", "--data", "{data}", "--cache", "{cache}", "--out", "{case}/run", "--kd", "ekd",
         "--ekd-temperature", "1e-320"), 2, "--ekd-temperature 1e-320: must be >= 0.0001", absent=("run",)),
    "train-student --ekd-queue-size 1e12": Case(
        ("train-student", "--name", "s", "--data", "{data}", "--cache", "{cache}", "--out", "{case}/run", "--pools",
         "{pools}", "--kd", "l2+ekd", "--sampler", "random", "--embedding-size", 32, *TRAIN[:4], "--workers", 0, "--ekd-queue-size",
         1_000_000_000_000), 2, "--ekd-queue-size 1000000000000: the queue's labels: needs", absent=("run/model.pt",)),
    "train-student --batch-size 1e9": Case(
        ("train-student", "--name", "s", "--data", "{data}", "--cache", "{cache}", "--out", "{case}/run", "--kd", "l2",
         "--sampler", "balanced", "--embedding-size", 32, *TRAIN[:4], "--workers", 0, "--batch-size", 1_000_000_000), 2,
        "--batch-size 1000000000: a batch of 1000000000 images of 32x32 (at least): needs", absent=("run/model.pt",)),
    "convert-cache --out DIR": Case(
        ("convert-cache", "{cache}", "--out", "{case}"), 2, "is a directory; give the file to write",
        unchanged=("cache",)),
    "evaluate-ijb --workers 100000": Case(
        ("evaluate-ijb", "--model", "{teacher}", "--ijb", "{case}/IJBC", "--target", "IJBC", "--out", "{case}/ijb",
         "--workers", 100000), 2, "--workers 100000: more processes", absent=("ijb",)),
    "PIPELINE_SCAN_CHECKPOINT_S=-5": Case(
        ("build-pools", "--cache", "{cache}", "--out", "{case}/pools"), 2,
        "PIPELINE_SCAN_CHECKPOINT_S='-5': must be a number >= 0", unchanged=("cache",), absent=("pools",),
        env={"PIPELINE_SCAN_CHECKPOINT_S": "-5"}),
    "PIPELINE_SCAN_CHECKPOINT_S=soon": Case(
        ("build-pools", "--cache", "{cache}", "--out", "{case}/pools"), 2,
        "PIPELINE_SCAN_CHECKPOINT_S='soon': must be a number", absent=("pools",),
        env={"PIPELINE_SCAN_CHECKPOINT_S": "soon"}),
    "PIPELINE_PROGRESS_SECONDS=nan": Case(
        ("build-pools", "--cache", "{cache}", "--out", "{case}/pools"), 2,
        "PIPELINE_PROGRESS_SECONDS='nan': must be a number >= 0", absent=("pools/pools.h5",),
        env={"PIPELINE_PROGRESS_SECONDS": "nan"}),
    "LOCAL_RANK=abc": Case(
        ("evaluate", "--model", "{teacher}", "--data", "{data}", "--out", "{case}/eval", "--device", "auto"), 2,
        "LOCAL_RANK='abc': must be an integer >= 0 and <= 1023", absent=("eval",), env={"LOCAL_RANK": "abc"}),
    "export --onnx DIR": Case(
        ("export", "--model", "{teacher}", "--onnx", "{case}"), 2, "is a directory; give the file to write",
        unchanged=("teacher",)),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    made = teacher_and_cache(tmp_path_factory.mktemp("hostile"), 48, 4)
    root = made["root"]
    bigprop = shutil.copytree(made["data"], root / "bigprop")
    (bigprop / "property").write_text("2000000000,32,32\n")  # the labels only go to 3
    (root / "random.bin").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    pools = guarded("build-pools", "--cache", made["cache"], "--out", root / "pools", "--hard-pairs", 50)
    assert pools.returncode == 0, pools.stderr[-3000:]
    return {**made, "bigprop": bigprop, "random_bin": root / "random.bin", "pools": root / "pools"}


def _filled(args, world, case_dir) -> list[str]:
    names = {**{k: str(v) for k, v in world.items()}, "case": str(case_dir)}
    return [str(a).format(**names) if isinstance(a, str) else str(a) for a in args]


@pytest.mark.parametrize("name", CASES)
def test_hostile_case(name, world, tmp_path):
    case = CASES[name]
    before = digests(world[k] for k in case.unchanged)
    done = guarded(*_filled(case.args, world, tmp_path), env=case.env)
    output = done.stdout + done.stderr
    assert done.returncode == case.code, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and case.fragment in errors[0], output[-3000:]
    assert digests(world[k] for k in case.unchanged) == before
    for path in case.absent:
        assert not (tmp_path / path).exists(), path


# (command, its options, a changed option, the difference the refusal names)
FINISHED_RUNS = {
    "train-teacher": (("train-teacher", "--data", "{data}", *TRAIN, "--workers", 0), ("--lr", 0.05), "lr 0.1 -> 0.05"),
    "train-student": (("train-student", "--name", "s", "--data", "{data}", "--cache", "{cache}", *TRAIN, "--workers",
                       0, "--embedding-size", 32, "--kd", "l2", "--sampler", "random"), ("--l2-weight", 3),
                      f"l2_weight {KDConfig().l2_weight} -> 3.0"),
}


@pytest.mark.parametrize("command", FINISHED_RUNS)
def test_a_finished_model_of_other_settings_is_never_replaced_without_checkpoint(world, tmp_path, command):
    args, changed, difference = FINISHED_RUNS[command]
    run = tmp_path / "run"
    base = [*_filled(args, world, tmp_path), "--out", run]
    first = guarded(*base)
    assert first.returncode == 0, first.stderr[-3000:]
    (run / "checkpoint.pt").unlink()
    model = (run / "model.pt").read_bytes()
    again = guarded(*base, *changed)
    assert again.returncode == 2, again.stderr[-3000:]
    line = again.stderr.strip().splitlines()[-1]
    assert f"the finished model was written with different settings: {difference}" in line, line
    assert "--no-resume" in line
    assert (run / "model.pt").read_bytes() == model
    same = guarded(*base)
    assert same.returncode == 0 and "training already finished" in same.stdout, same.stdout + same.stderr[-2000:]
    assert (run / "model.pt").read_bytes() == model


@pytest.mark.parametrize("damage", ["100 bytes", "empty", "random"])
def test_a_damaged_pools_scan_checkpoint_is_rebuilt_to_the_uninterrupted_bytes(world, tmp_path, damage):
    pools = ("--cache", world["cache"], "--hard-pairs", 50, "--block-rows", 8)
    reference = guarded("build-pools", *pools, "--out", tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    out = tmp_path / "pools"
    out.mkdir()
    content = {"100 bytes": b"PK\x03\x04" + bytes(96), "empty": b"",
               "random": (world["random_bin"]).read_bytes()}[damage]
    (out / "pools.scan.npz").write_bytes(content)
    done = guarded("build-pools", *pools, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "damaged scan checkpoint" in done.stderr and "Traceback" not in done.stderr
    assert not (out / "pools.scan.npz").exists()
    assert (out / "thresholds.json").read_bytes() == (tmp_path / "reference" / "thresholds.json").read_bytes()


class Task:
    def __init__(self, items):
        self.items = items


def _render(task) -> list[bytes]:
    """Images that are a function of their key only (as synthesize's are)."""
    return [hashlib.sha256(repr(key).encode()).digest() * 3 for _, key in task.items]


def test_a_synthesize_segment_with_a_flipped_byte_is_rendered_again(tmp_path, capsys):
    tasks = [Task([(i, (i, j)) for j in range(4)]) for i in range(130)]  # 3 segments of 64 tasks
    expected = [(image, index) for task in tasks for image, (index, _) in zip(_render(task), task.items)]
    segments = Segments(tmp_path, {"run": 1})
    segments.open()
    assert list(segment_images(tasks, _render, 0, segments)) == expected
    path = segments.path(0)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 3] ^= 0x01  # inside the images' data: only reading them finds it
    path.write_bytes(bytes(raw))
    capsys.readouterr()
    assert list(segment_images(tasks, _render, 0, segments)) == expected
    assert f"note: {path}: damaged or unfinished, discarded" in capsys.readouterr().err
    assert list(segment_images(tasks, _render, 0, segments)) == expected  # and it is whole again


def test_kd_spelling_is_normalised():
    assert KDConfig(kd=" l2 + ekd ").kd == "l2+ekd" == KDConfig(kd="l2+ekd").kd
    assert KDConfig(kd=" none ").kd == "none"


def test_cache_info_json_is_valid_for_non_finite_values():
    from stages.extract_teacher import strict_json

    text = strict_json({"norms": {"mean": float("nan"), "max": np.float32("inf"), "min": 1.5}, "rows": [1, -np.inf]})
    assert json.loads(text) == {"norms": {"mean": None, "max": None, "min": 1.5}, "rows": [1, None]}

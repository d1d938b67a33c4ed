"""A killed `synthesize` resumes: the training images of finished segments are not rendered again, and the
output is byte-identical to an uninterrupted run's; other arguments, or a damaged segment, render again; the
segments folder is removed on success and never deletes what synthesize did not write."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.synthetic.segments import FOLDER, Segments
from tests.helpers.processes import WORKERS, environment, error_line, kill_tree, run_pipeline, wait_for_line

TASKS = 20  # 40 identities x 8 images in the worker's 16-image tasks, one task per segment
ARGS = ["--identities", 40, "--images-per-identity", 8, "--size", 32, "--val-identities", 20, "--val-pairs", 20,
        "--test-identities", 4, "--test-images-per-identity", 3, "--monitor-identities", 0, "--ijb-identities", 0,
        "--workers", 1]
OUTPUTS = ("train.rec", "train.idx", "property", "val.bin", "val_pairs.csv", "test.rec", "test.idx",
           "contact_sheet.png", "synthetic.json")


def worker(out: Path, delay: float, *extra) -> subprocess.Popen:
    command = [sys.executable, str(WORKERS / "synthesize_segments.py"), str(delay), "--out", str(out),
               *map(str, ARGS), *map(str, extra)]
    return subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def killed_after(out: Path, tasks: int, *extra) -> int:
    """Run the slowed worker, SIGKILL it once it has rendered `tasks` training tasks; finished segments."""
    process = worker(out, 0.2, *extra)
    wait_for_line(process, f"rendered {tasks}")
    kill_tree(process)
    assert not (out / "synthetic.json").exists()
    return len(list((out / FOLDER).glob("segment-*.npz")))


def rerun(out: Path, *extra) -> int:
    """The worker to the end, unslowed: how many training tasks it rendered."""
    process = worker(out, 0.0, *extra)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    return sum(line.startswith("rendered ") for line in stdout.splitlines())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The same arguments, synthesized in one go by the plain command (default task and segment sizes)."""
    out = tmp_path_factory.mktemp("clean") / "s"
    done = run_pipeline("synthesize", "--out", out, *ARGS)
    assert done.returncode == 0, done.stderr
    return out


def assert_same_files(out: Path, reference: Path) -> None:
    for name in OUTPUTS:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (out / FOLDER).exists()


def test_a_killed_run_renders_only_what_was_not_finished(tmp_path, uninterrupted):
    out = tmp_path / "s"
    finished = killed_after(out, 6)
    assert 5 <= finished < TASKS
    assert rerun(out) == TASKS - finished
    assert_same_files(out, uninterrupted)


def test_a_damaged_segment_and_the_ones_after_it_are_rendered_again(tmp_path, uninterrupted):
    out = tmp_path / "s"
    assert killed_after(out, 6) >= 5
    segment = out / FOLDER / "segment-00002.npz"
    segment.write_bytes(segment.read_bytes()[:100])
    assert rerun(out) == TASKS - 2
    assert_same_files(out, uninterrupted)


def test_other_arguments_start_the_segments_over(tmp_path):
    out = tmp_path / "s"
    assert killed_after(out, 6, "--seed", 5) >= 5
    assert rerun(out) == TASKS  # the default seed: nothing of seed 5 is reused
    reference = tmp_path / "reference"
    assert run_pipeline("synthesize", "--out", reference, *ARGS).returncode == 0
    assert_same_files(out, reference)


def test_segments_read_back_only_with_their_labels(tmp_path):
    segments = Segments(tmp_path, {"seed": 1})
    segments.open()
    images = [bytes([1, 2, 3]), bytes([4, 5])]
    segments.write(0, images, [7, 7])
    assert segments.read(0, [7, 7]) == images
    assert segments.read(0, [7, 8]) is None and segments.read(0, [7]) is None and segments.read(1, [7]) is None
    np.savez(segments.path(1), data=np.zeros(3, np.uint8), offsets=np.array([0, 2, 1]), labels=np.array([1, 1]))
    assert segments.read(1, [1, 1]) is None  # offsets out of order
    Segments(tmp_path, {"seed": 2}).open()  # other arguments: the folder starts over
    assert segments.read(0, [7, 7]) is None


def test_files_synthesize_did_not_write_are_never_deleted(tmp_path):
    out = tmp_path / "s"
    Segments(out, {"seed": 1}).open()
    (out / FOLDER / "notes.txt").write_text("mine")
    done = run_pipeline("synthesize", "--out", out, *ARGS)
    assert done.returncode == 2
    assert "holds files synthesize did not write (notes.txt)" in error_line(done.stderr)
    assert (out / FOLDER / "notes.txt").read_text() == "mine"


def test_a_linked_segments_folder_is_refused(tmp_path):
    out, elsewhere = tmp_path / "s", tmp_path / "elsewhere"
    elsewhere.mkdir()
    out.mkdir()
    (out / FOLDER).symlink_to(elsewhere)
    done = run_pipeline("synthesize", "--out", out, *ARGS)
    assert done.returncode == 2 and "is a symlink" in error_line(done.stderr)

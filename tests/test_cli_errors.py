"""Bad inputs and nonsense options at the command line: each is refused with exit code 2 and ONE line naming the
option, or the file and record, before anything that looks complete is written.

Most cases run the command in-process (the `cli` fixture: the same app and error handling); the usage errors
and a sample of the others run `python -m pipeline` in a process of its own, as a user does.
"""
from __future__ import annotations

import hashlib
import shutil
import warnings

import h5py
import numpy as np
import pytest
import torch
from helpers.processes import error_line, run_pipeline
from helpers.teachers import teacher_and_cache

from pipeline.formats.jpeg import encode_jpeg
from pipeline.formats.recordio import write_face_recordio

ROWS, CLASSES = 48, 4


class ConstantBatch(torch.nn.Module):
    """A 'teacher' that returns one row whatever the batch size."""

    def forward(self, x):
        return torch.zeros(1, 32) + x.mean()


class PairsPerImage(torch.nn.Module):
    """A 'teacher' with a (B, 10, 2) output: not embeddings."""

    def forward(self, x):
        return x.mean((2, 3))[:, :1].repeat(1, 20).view(-1, 10, 2)


def write_faces(folder, sizes, property_size=(32, 32)):
    """A RecordIO set whose image k has shape sizes(k) (H, W); property says `property_size`."""
    rng = np.random.default_rng(0)
    items = [(encode_jpeg(rng.integers(0, 255, (*sizes(k), 3), dtype=np.uint8)), k * CLASSES // ROWS)
             for k in range(ROWS)]
    write_face_recordio(folder, items, num_classes=CLASSES, image_size=property_size)
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    world = teacher_and_cache(tmp_path_factory.mktemp("bad-inputs"), ROWS, CLASSES)
    root, data, teacher, cache = world["root"], world["data"], world["teacher"], world["cache"]
    bigprop = shutil.copytree(data, root / "bigprop")
    (bigprop / "property").write_text("12345678901234567890123,32,32\n")
    with warnings.catch_warnings():  # torch flags jit and the TorchScript-based ONNX exporter as deprecated
        warnings.simplefilter("ignore")
        torch.jit.trace(ConstantBatch(), torch.zeros(1, 3, 32, 32)).save(root / "constant.pt")
        torch.onnx.export(PairsPerImage(), (torch.zeros(1, 3, 32, 32),), str(root / "pairs.onnx"), dynamo=False,
                          input_names=["input"], output_names=["out"],
                          dynamic_axes={"input": {0: "b"}, "out": {0: "b"}})
    caches = {}
    for name in ("nan", "complete-no", "shifted"):
        caches[name] = shutil.copy(cache, root / f"{name}.h5")
    with h5py.File(caches["nan"], "a") as f:  # one NaN: row 5, flipped view
        embeddings = f["embeddings"][()]
        embeddings[5, 1, 3] = np.nan
        f["embeddings"][...] = embeddings
        f.attrs["embeddings_sha256"] = hashlib.sha256(embeddings.tobytes()).hexdigest()  # written so: not damage
    with h5py.File(caches["complete-no"], "a") as f:
        f.attrs["complete"] = "no"
    with h5py.File(caches["shifted"], "a") as f:
        f["labels"][...] = np.roll(f["labels"][()], 1)
    return {"root": root, "data": data, "teacher": teacher, "cache": cache, "bigprop": bigprop, **caches,
            "odd": write_faces(root / "odd", lambda k: (24, 32) if k == 13 else (32, 32)),  # key 14
            "small": write_faces(root / "small", lambda k: (16, 16))}


def student(files, out, *extra):
    return ["train-student", "--data", files["data"], "--name", "s", "--out", out, "--kd", "none", "--sampler",
            "random", "--width", 0.125, "--embedding-size", 32, "--epochs", 1, "--batch-size", 8, "--workers", 0,
            "--device", "cpu", *extra]


OPTIONS = {  # command, bad option -> the line
    "batch-size 0": ("train-student", ["--batch-size", 0], "--batch-size 0: must be >= 1"),
    "batch-size -5": ("train-student", ["--batch-size", -5], "--batch-size -5: must be >= 1"),
    "lr -1": ("train-student", ["--lr", -1], "--lr -1.0: must be > 0.0"),
    "arch r999": ("train-student", ["--arch", "r999"], "--arch 'r999': choose one of r18, r34, r50, r100, r200, mbf"),
    "width 0": ("train-student", ["--width", 0], "--width 0.0: must be > 0.0"),
    "lr-schedule": ("train-student", ["--lr-schedule", "fast"], "--lr-schedule 'fast': choose one of poly, step, cosine"),
    "device tpu": ("train-student", ["--device", "tpu"], "--device 'tpu': use auto (CUDA when available, else CPU)"),
    "workers -1": ("train-student", ["--workers", -1], "--workers -1: must be >= 0"),
    "epochs 0": ("train-student", ["--epochs", 0], "--epochs 0: must be >= 1"),
    "epochs -1": ("train-teacher", ["--epochs", -1], "--epochs -1: must be >= 1"),
    "block-rows 0": ("build-pools", ["--block-rows", 0], "--block-rows 0: must be >= 1"),
    "evaluate batch-size 0": ("evaluate", ["--batch-size", 0], "--batch-size 0: must be >= 1"),
    "extract device tpu on dask": ("extract-teacher", ["--device", "tpu", "--workers", 2], "--device 'tpu': use auto"),
}


def command_line(files, out, command, extra):
    """A complete command line of `command` whose only fault is `extra`."""
    if command == "train-student":
        return student(files, out, *extra)
    return {
        "train-teacher": ["train-teacher", "--data", files["data"], "--out", out],
        "build-pools": ["build-pools", "--cache", files["cache"], "--out", out],
        "evaluate": ["evaluate", "--model", files["teacher"], "--data", files["data"], "--out", out],
        "extract-teacher": ["extract-teacher", "--data", files["data"], "--teacher", files["teacher"], "--out",
                            out / "cache.h5"],
    }[command] + extra


@pytest.mark.parametrize("case", OPTIONS)
def test_a_bad_option_value_is_one_line_naming_it(files, tmp_path, cli, case):
    command, extra, message = OPTIONS[case]
    out = tmp_path / "out"
    result = cli(*command_line(files, out, command, extra))
    assert result.exit_code == 2
    assert error_line(result.output).startswith(f"error: {message}")
    assert not out.exists()  # refused before anything was written


def test_usage_errors_of_the_console_command_are_one_line(files, tmp_path):
    """Through `python -m pipeline` (the console script's main): click's own errors too."""
    out = tmp_path / "out"
    for extra, message in ((["--epoch", 2], "error: pipeline train-student: No such option: --epoch"),
                           (["--epochs", "two"], "error: pipeline train-student: Invalid value for '--epochs'"),
                           (["--batch-size", 0], "error: --batch-size 0: must be >= 1")):
        done = run_pipeline(*student(files, out, *extra))
        assert done.returncode == 2, done.stderr[-2000:]
        assert error_line(done.stderr).startswith(message) and done.stderr.count("\n") == 1
    assert not out.exists()


def refused(cli, args, *not_written) -> str:
    result = cli(*args)
    assert result.exit_code == 2
    assert not any(path.exists() for path in not_written)
    return error_line(result.output)


def test_a_missing_teacher_file(files, tmp_path, cli):
    out = tmp_path / "cache.h5"
    line = refused(cli, ["extract-teacher", "--data", files["data"], "--teacher", tmp_path / "nope.pt", "--out", out],
                   out, tmp_path / "cache.h5.shards")
    assert line == f"error: --teacher {tmp_path / 'nope.pt'}: file not found"


def test_an_existing_folder_as_the_cache_is_refused_before_extracting(files, tmp_path, cli):
    out = tmp_path / "cache"
    out.mkdir()
    line = refused(cli, ["extract-teacher", "--data", files["data"], "--teacher", files["teacher"], "--out", out,
                         "--threads", 1], tmp_path / "cache.shards")
    assert line.startswith(f"error: --out {out}: is a folder; name the cache file to write")


@pytest.mark.parametrize("loading", [["--workers", 0], ["--preload"], ["--workers", 2]])
def test_an_image_of_another_size_names_its_record(files, tmp_path, cli, loading):
    """Decoded on demand, preloaded, or in DataLoader worker processes: the same line."""
    out = tmp_path / "run"
    args = student(files, out, *loading)
    args[args.index("--data") + 1] = files["odd"]
    line = refused(cli, args, out / "model.pt", out / "checkpoint.pt")
    assert line == (f"error: {files['odd'] / 'train.rec'} key 14: image is 32x24, but this run's images are 32x32 "
                    "(the data's property, or --input-size)")


def test_a_property_that_disagrees_with_the_images(files, tmp_path, cli):
    out = tmp_path / "run"
    args = student(files, out, "--workers", 2)
    args[args.index("--data") + 1] = files["small"]
    line = refused(cli, args, out / "model.pt")
    assert line.startswith(f"error: {files['small'] / 'train.rec'} key ") and "image is 16x16, but this run's " \
        "images are 32x32" in line


def test_a_dataloader_worker_error_is_one_line_at_the_console(files, tmp_path):
    out = tmp_path / "run"
    args = student(files, out, "--workers", 2)
    args[args.index("--data") + 1] = files["odd"]
    done = run_pipeline(*args)
    assert done.returncode == 2 and "DataLoader worker" not in done.stderr
    assert error_line(done.stderr).startswith(f"error: {files['odd'] / 'train.rec'} key 14: image is 32x24")


@pytest.mark.parametrize("teacher, message", [
    ("constant.pt", "model returned shape (1, 32) for a batch of 96 images; an embedder returns (96, 32)"),
    ("pairs.onnx", "ONNX output shape ['b', 10, 2] is not (batch, embedding size)"),
])
def test_a_teacher_that_does_not_embed(files, tmp_path, cli, teacher, message):
    out = tmp_path / "cache.h5"
    line = refused(cli, ["extract-teacher", "--data", files["data"], "--teacher", files["root"] / teacher, "--out",
                         out, "--batch-size", 48, "--threads", 1], out)
    assert line == f"error: {files['root'] / teacher}: {message}"


def test_a_23_digit_class_count(files, cli):
    line = refused(cli, ["inspect", files["bigprop"]])
    assert line.startswith(f"error: {files['bigprop'] / 'property'}: 'num_classes,H,W' = '12345678901234567890123,"
                           "32,32' is out of range")


@pytest.mark.parametrize("cache, message", [
    ("nan", "embedding row 5 (key 6) contains NaN or inf"),
    ("complete-no", "teacher cache is incomplete"),
    ("shifted", "dataset 'labels' does not match its checksum (edited or corrupted)"),
])
def test_a_broken_cache_at_train_student(files, tmp_path, cli, cache, message):
    out = tmp_path / "run"
    line = refused(cli, student(files, out, "--kd", "l2", "--cache", files[cache]), out / "model.pt",
                   out / "checkpoint.pt")
    assert line.startswith(f"error: {files[cache]}: {message}")


def test_an_unexpected_error_keeps_its_own_traceback(monkeypatch):
    """A bug (not a user error) is not hidden: main() lets it through as itself."""
    from pipeline import cli

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr("stages.report.load_result", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["report", "--teacher", "t", "--students", "s", "--out", "o"])

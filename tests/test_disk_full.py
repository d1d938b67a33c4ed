"""extract-teacher on a really full disk (a 64 KiB tmpfs, where this process may mount one): one line naming
the file, exit 2 (not a segfault at exit: HDF5 kept the failed file open and crashed flushing it again), no
partial file, and a rerun with room finishes; and the rerun a float16 overflow advises (--dtype float32) works."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers.data import write_gradient_faces
from helpers.processes import error_line, run_pipeline
from helpers.teachers import FailingTeacher, make_teacher, quiet

from pipeline.cache.build import ExtractionConfig, build_teacher_cache
from pipeline.cache.shards import shard_dir
from pipeline.errors import PipelineError
from pipeline.models.loading import load_embedder

pytestmark = pytest.mark.slow  # processes of their own: skip locally with -m "not slow"; CI runs them

ROWS, SHARD, DIM = 150, 32, 256  # 32 KiB of float16 per shard, 150 KiB in all


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("disk-full")
    return write_gradient_faces(root / "data", n=ROWS), make_teacher(root / "teacher.pt", num_features=DIM)


def extract(inputs, out, *extra):
    data, teacher = inputs
    return run_pipeline("extract-teacher", "--data", data, "--teacher", teacher, "--out", out, "--shard-size", SHARD,
                        "--batch-size", 16, "--device", "cpu", "--threads", 1, *extra)


def leftovers(mount):
    return sorted(p.name for p in mount.rglob("*") if ".tmp-" in p.name or p.suffix == ".lock")


@pytest.mark.parametrize("room, failing", [("350k", "cache.h5"), ("64k", "shard-00000.h5")])
def test_a_full_disk_is_one_line_then_a_rerun_with_room_finishes(inputs, tmpfs, room, failing):
    mount, remount = tmpfs
    remount(room)  # 350k: every shard fits, the final cache does not; 64k: not even the first shard
    out = mount / "cache.h5"
    failed = extract(inputs, out)
    assert failed.returncode == 2, failed.stderr[-3000:]  # was 139: a segfault after the error
    line = error_line(failed.stderr)
    assert line.startswith("error: ") and f"{failing}: no space left on the device" in line, line
    assert "Traceback" not in failed.stderr
    assert not out.exists() and not leftovers(mount)
    remount("8m")
    done = extract(inputs, out)
    assert done.returncode == 0, done.stderr[-3000:]
    with h5py.File(out, "r") as handle:
        assert handle.attrs["complete"] and handle["embeddings"].shape == (ROWS, 2, DIM)
    assert not shard_dir(out).exists() and not leftovers(mount)


class Overflowing(FailingTeacher):
    """The teacher, with outputs beyond float16's range in its third batch."""

    def __call__(self, x):
        out = super().__call__(x)
        return out * 1e6 if self.calls == 3 else out


def test_the_advised_dtype_rerun_discards_the_float16_shards_and_works(inputs, tmp_path):
    data, teacher_path = inputs
    out = tmp_path / "cache.h5"
    cfg = ExtractionConfig(data=data, teacher=teacher_path, out=out, shard_size=SHARD, batch_size=16, device="cpu",
                           threads=1)
    teacher = load_embedder(teacher_path, device="cpu")
    with pytest.raises(PipelineError, match=r"--dtype float32"):
        build_teacher_cache(cfg, teacher=Overflowing(teacher), log=quiet)
    assert list(shard_dir(out).glob("shard-*.h5"))  # finished float16 shards were left behind
    messages = []
    build_teacher_cache(ExtractionConfig(**{**vars(cfg), "dtype": "float32"}), teacher=teacher,
                        log=messages.append)
    assert any("discarding the shards of an earlier run with dtype float16 (now float32)" in m for m in messages)
    with h5py.File(out, "r") as handle:
        assert handle["embeddings"].dtype == np.float32 and handle.attrs["complete"]

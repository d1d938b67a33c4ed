"""extract-teacher's Dask scratch (locks, spilled data, the scheduler's files) stays in a folder of the run's
own under the system temporary directory: removed after success, after a failure, and, for a killed run (no
exit handler ran), by the next run."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
from helpers.processes import environment
from helpers.teachers import teacher_and_cache

import pipeline.cache.dask_cluster as dask_cluster


def test_a_killed_runs_scratch_is_removed_and_a_live_runs_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process: the scratch of a SIGKILLed run
    killed = tmp_path / f"{dask_cluster.SCRATCH_PREFIX}{gone.pid}-abc"
    (killed / "worker-1").mkdir(parents=True)
    (killed / "worker-1" / "global.lock").write_text("")
    alive = tmp_path / f"{dask_cluster.SCRATCH_PREFIX}{os.getpid()}-def"  # a run still going
    alive.mkdir()
    unrelated = tmp_path / "dask-scratch-space-of-someone-else"
    unrelated.mkdir()
    mine = dask_cluster.scratch_directory()
    assert mine.parent == tmp_path and mine.is_dir()
    assert not killed.exists() and alive.is_dir() and unrelated.is_dir()


@pytest.mark.slow
def test_extract_with_two_workers_leaves_nothing_in_the_temporary_directory(tmp_path):
    made = teacher_and_cache(tmp_path / "world", 24, 3)
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    done = subprocess.run([sys.executable, "-m", "pipeline", "extract-teacher", "--data", str(made["data"]),
                           "--teacher", str(made["teacher"]), "--out", str(tmp_path / "c.h5"), "--workers", "2",
                           "--device", "cpu"], env={**environment(), "TMPDIR": str(temporary)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "c.h5").is_file()
    assert sorted(p.name for p in temporary.iterdir()) == []

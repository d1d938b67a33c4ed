"""Writing outputs on bad days (pipeline/storage/io.py): temporaries of killed writers, a second writer, a full disk
(a patched writer everywhere; a real 64 KiB tmpfs where this process may mount one)."""
from __future__ import annotations

import errno
import io
import os
import signal

import pytest
import torch
from helpers.processes import (
    dead_pid,
    error_line,
    run_pipeline,
    start_worker,
    wait_for_line,
)

import pipeline.storage.io
from pipeline.errors import PipelineError
from pipeline.storage.io import (
    atomic_path,
    lock_path,
    output_lock,
    remove_stale_temporaries_under,
    write_text_atomic,
    write_with,
)


def test_temporaries_of_dead_writers_are_removed_those_of_live_ones_kept(tmp_path):
    dead, live = dead_pid(), os.getppid()
    stale = [tmp_path / f"model.pt.tmp-{dead}-0123abcd", tmp_path / f"checkpoint.pt.tmp-{dead}",  # older scheme
             tmp_path / "dvclive" / f"loss.tsv.tmp-{dead}-89abcdef"]
    kept = [tmp_path / f"model.pt.tmp-{live}-0123abcd", tmp_path / "notes.tmp-x"]
    for path in stale + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")  # 0 bytes: a writer killed right after creating it
    folder = tmp_path / f"synthetic.tmp-{dead}-00000000"  # a killed synthesize's work folder
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "train.rec").write_bytes(b"x")
    removed = remove_stale_temporaries_under(tmp_path)
    assert sorted(removed) == sorted(stale + [folder])
    assert all(path.exists() for path in kept) and not any(path.exists() for path in stale + [folder])
    write_text_atomic(tmp_path / "model.pt", "x")  # a write leaves no temporary of its own either
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name) == sorted(p.name for p in kept)


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_blocks_nothing(tmp_path):
    out = tmp_path / "pools"
    holder = start_worker("hold_lock", out)
    try:
        wait_for_line(holder, "locked")
        with pytest.raises(PipelineError, match=rf"pools: another run \(PID {holder.pid}\) is writing it"):
            with output_lock(out):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(out).exists()  # SIGKILL: the file stays, the lock went with the process
    with output_lock(out) as lock:
        assert lock.read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists()


class FillingDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails every write with ENOSPC as a full disk does."""

    def __init__(self, path, room: int):
        self.handle, self.room = open(path, "wb", buffering=0), room

    def writable(self):
        return True

    def write(self, data):
        if self.room < len(data):
            self.handle.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.handle.write(data)

    def close(self):
        self.handle.close()
        super().close()


@pytest.fixture
def full_disk(monkeypatch):
    """pipeline.storage.io's writers open files on a disk with 3000 bytes of room."""
    monkeypatch.setattr(pipeline.storage.io, "open", lambda path, mode="r": FillingDisk(path, 3000), raising=False)


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tmp_path, full_disk):
    payload = {"weights": torch.arange(10_000, dtype=torch.float32)}
    with pytest.raises(PipelineError) as info:  # torch.save swallows ENOSPC ("unexpected pos"): still named
        write_with(tmp_path / "checkpoint.pt", lambda handle: torch.save(payload, handle))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'checkpoint.pt'}: no space left on the device (2.9 KiB written, ")
    assert "free more space there" in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(PipelineError, match="report.md: no space left"):
        with atomic_path(tmp_path / "report.md") as tmp:
            tmp.write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_training_on_a_full_disk_fails_in_one_line_and_reruns_once_there_is_space(random_faces, tmp_path, cli,
                                                                                  monkeypatch):
    args = ["train-teacher", "--data", random_faces, "--out", tmp_path / "run", "--arch", "mbf", "--width", 0.125,
            "--embedding-size", 16, "--epochs", 2, "--batch-size", 8, "--workers", 0, "--device", "cpu"]
    with monkeypatch.context() as patch:
        patch.setattr(pipeline.storage.io, "open", lambda path, mode="r": FillingDisk(path, 3000), raising=False)
        result = cli(*args)
    assert result.exit_code == 2
    assert error_line(result.output).startswith(f"error: {tmp_path / 'run' / 'checkpoint.pt'}: no space left")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["dvclive"]  # no model, no temporary
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model.pt").exists() and not list((tmp_path / "run").glob("*.tmp-*"))


@pytest.mark.slow
def test_a_really_full_disk_then_a_rerun_with_room(random_faces, tmpfs):
    mount, remount = tmpfs
    out = mount / "run"
    args = ["train-teacher", "--data", random_faces, "--out", out, "--arch", "mbf", "--width", 0.125,
            "--embedding-size", 16, "--epochs", 2, "--batch-size", 8, "--workers", 0, "--device", "cpu"]
    failed = run_pipeline(*args)
    assert failed.returncode == 2, failed.stderr[-2000:]
    line = error_line(failed.stderr)
    assert line.startswith(f"error: {out}") and "no space left on the device" in line
    assert not (out / "model.pt").exists() and not list(out.rglob("*.tmp-*"))
    remount("8m")
    done = run_pipeline(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "model.pt").exists() and not list(out.rglob("*.tmp-*"))

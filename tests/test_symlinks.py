"""Symlinks inside an output never lead a command to write or delete elsewhere: a linked lock file, a linked
DVCLive folder, a linked shard folder, an IJB folder synthesize did not write. Every case uses real links
whose targets must stay byte for byte as they were."""
from __future__ import annotations

import os

import pytest
from helpers.data import write_gradient_faces
from helpers.processes import error_line
from helpers.teachers import make_teacher, quiet

from pipeline.cache.build import ExtractionConfig, build_teacher_cache
from pipeline.errors import PipelineError
from pipeline.storage.io import lock_path, output_lock, write_text_atomic
from pipeline.synthetic.writer import synthesize
from pipeline.training.live import RunLog

TINY = dict(identities=3, images_per_identity=2, size=24, seed=5, val_identities=20, val_pairs=20,
            test_identities=2, test_images_per_identity=2, ijb_identities=4, ijb_templates=3)


def precious(folder):
    """A folder of someone else's files; returns {path: bytes} to compare with afterwards."""
    (folder / "plots" / "metrics").mkdir(parents=True)
    files = {folder / "metrics.json": b'{"theirs": 1}\n', folder / "plots" / "metrics" / "loss.tsv": b"step\tloss\n",
             folder / "notes.txt": b"keep me\n"}
    for path, data in files.items():
        path.write_bytes(data)
    return files


def untouched(files):
    return all(path.exists() and path.read_bytes() == data for path, data in files.items())


def test_a_symlinked_lock_file_is_refused_and_its_target_kept(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("not a lock\n")
    out = tmp_path / "pools"
    lock_path(out).symlink_to(target)
    with pytest.raises(PipelineError, match=r"pools\.lock: is a symlink"):
        with output_lock(out):
            pass
    assert target.read_text() == "not a lock\n" and lock_path(out).is_symlink()


def test_build_pools_with_a_symlinked_lock_is_one_line(tmp_path, cli):
    target = tmp_path / "elsewhere.txt"
    target.write_text("not a lock\n")
    out = tmp_path / "pools"
    lock_path(out).symlink_to(target)
    result = cli("build-pools", "--cache", tmp_path / "missing.h5", "--out", out)
    assert result.exit_code == 2
    assert error_line(result.output).startswith(f"error: {lock_path(out)}: is a symlink")
    assert target.read_text() == "not a lock\n"


@pytest.mark.parametrize("linked", ["dvclive", "dvclive/plots"])
@pytest.mark.parametrize("resume_step", [0, 5])
def test_a_symlinked_history_folder_is_refused_and_its_target_kept(tmp_path, linked, resume_step):
    theirs = precious(tmp_path / "theirs")
    run = tmp_path / "run"
    link = run / linked
    link.parent.mkdir(parents=True)
    link.symlink_to(tmp_path / "theirs" if linked == "dvclive" else tmp_path / "theirs" / "plots")
    with pytest.raises(PipelineError, match=r"is a symlink .*refusing to write or delete the training history"):
        RunLog(run, resume_step=resume_step)
    assert untouched(theirs) and link.is_symlink()


def test_train_teacher_no_resume_does_not_empty_a_linked_history(random_faces, tmp_path, cli):
    theirs = precious(tmp_path / "theirs")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "dvclive").symlink_to(tmp_path / "theirs")
    result = cli("train-teacher", "--data", random_faces, "--out", tmp_path / "run", "--arch", "mbf", "--width",
                 0.125, "--embedding-size", 16, "--epochs", 1, "--batch-size", 8, "--workers", 0, "--device", "cpu",
                 "--no-resume")
    assert result.exit_code == 2, result.output
    assert error_line(result.output).startswith(f"error: {tmp_path / 'run' / 'dvclive'}: is a symlink")
    assert untouched(theirs)


def test_a_write_replaces_a_symlink_at_its_name_not_the_target(tmp_path):
    target = tmp_path / "theirs.json"
    target.write_text("theirs\n")
    (tmp_path / "out.json").symlink_to(target)
    write_text_atomic(tmp_path / "out.json", "ours\n")
    assert target.read_text() == "theirs\n"
    assert not (tmp_path / "out.json").is_symlink() and (tmp_path / "out.json").read_text() == "ours\n"


def test_a_symlinked_shard_folder_is_refused_and_its_target_kept(tmp_path):
    data = write_gradient_faces(tmp_path / "data", n=24, classes=4)
    teacher = make_teacher(tmp_path / "teacher.pt")
    theirs = precious(tmp_path / "theirs")
    out = tmp_path / "cache.h5"
    (tmp_path / "cache.h5.shards").symlink_to(tmp_path / "theirs")
    for overwrite in (False, True):
        with pytest.raises(PipelineError, match=r"cache\.h5\.shards: is a symlink"):
            build_teacher_cache(ExtractionConfig(data=data, teacher=teacher, out=out, device="cpu", threads=1,
                                                 overwrite=overwrite), log=quiet)
        assert untouched(theirs) and not out.exists()


def test_synthesize_never_deletes_an_ijb_folder_it_did_not_write(tmp_path):
    out = tmp_path / "synthetic"
    theirs = precious(out / "ijb")
    with pytest.raises(PipelineError, match=r"ijb: holds files synthesize did not write"):
        synthesize(out, **TINY)
    assert untouched(theirs)
    other = precious(tmp_path / "theirs")
    for path in theirs:
        path.unlink()
    for folder in (out / "ijb" / "plots" / "metrics", out / "ijb" / "plots"):
        folder.rmdir()
    (out / "ijb").rmdir()
    (out / "ijb").symlink_to(tmp_path / "theirs")
    with pytest.raises(PipelineError, match=r"ijb: is a symlink"):
        synthesize(out, **TINY)
    assert untouched(other)


def test_synthesize_replaces_its_own_ijb_set_but_not_one_that_was_added_to(tmp_path):
    out = tmp_path / "synthetic"
    synthesize(out, **TINY)
    synthesize(out, **{**TINY, "ijb_templates": 2})  # its own previous set: replaced
    assert (out / "synthetic.json").exists()
    added = out / "ijb" / "IJBC" / "meta" / "mine.txt"
    added.write_text("mine\n")
    with pytest.raises(PipelineError, match=r"ijb: holds files synthesize did not write"):
        synthesize(out, **TINY)
    assert added.read_text() == "mine\n"
    os.remove(added)

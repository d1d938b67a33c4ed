"""The teacher cache's checksums on a bad day: one flipped byte inside `embeddings` (edited with h5py, as a
damaged disk or a careless script would) is refused by every command that opens the cache for a run, and a
verification is remembered only for the exact version of the file it read."""
from __future__ import annotations

import hashlib
import os
import shutil

import h5py
import numpy as np
import pytest
from helpers.data import write_cache_by_hand
from helpers.processes import error_line
from helpers.teachers import teacher_and_cache

import pipeline.cache.verify as verify
from pipeline.cache.format import TeacherCache
from pipeline.errors import DataError

ROWS, CLASSES = 48, 4


def flip_one_byte(path, row=7, view=1, column=3):
    """xor one bit of one stored float16 value, in place, with h5py (checksum attributes untouched)."""
    with h5py.File(path, "a") as handle:
        value = handle["embeddings"][row, view, column : column + 1].copy()
        value.view(np.uint8)[0] ^= 0x01
        handle["embeddings"][row, view, column : column + 1] = value


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return teacher_and_cache(tmp_path_factory.mktemp("integrity"), ROWS, CLASSES)


@pytest.fixture
def damaged(files, tmp_path):
    """A copy of the real cache, opened (verified and remembered) once, then one byte flipped."""
    path = shutil.copy(files["cache"], tmp_path / "teacher.h5")
    TeacherCache.open(path)
    flip_one_byte(path)
    return path


def refused(result, path):
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    assert line.startswith(f"error: {path}: dataset 'embeddings' does not match its checksum"), line


def test_cache_info_refuses_a_flipped_byte(damaged, cli):
    refused(cli("cache-info", damaged), damaged)
    refused(cli("cache-info", damaged, "--recheck"), damaged)


def test_build_pools_refuses_it_and_writes_nothing(damaged, tmp_path, cli):
    out = tmp_path / "pools"
    refused(cli("build-pools", "--cache", damaged, "--out", out, "--neighbours", 4), damaged)
    assert not (out / "pools.h5").exists() and not (out / "thresholds.json").exists()


def test_train_student_refuses_it_and_writes_no_model(files, damaged, tmp_path, cli):
    out = tmp_path / "student"
    refused(cli("train-student", "--data", files["data"], "--cache", damaged, "--kd", "l2", "--sampler", "random",
                "--name", "s", "--out", out, "--width", 0.125, "--embedding-size", 32, "--epochs", 1,
                "--batch-size", 8, "--workers", 0, "--device", "cpu"), damaged)
    assert not (out / "model.pt").exists()


def test_convert_cache_refuses_to_copy_it_under_fresh_checksums(damaged, tmp_path, cli):
    refused(cli("convert-cache", damaged, "--out", tmp_path / "converted.h5"), damaged)
    assert not (tmp_path / "converted.h5").exists()


def test_extract_teacher_rebuilds_it_instead_of_calling_it_up_to_date(files, damaged, cli):
    result = cli("extract-teacher", "--data", files["data"], "--teacher", files["teacher"], "--out", damaged,
                 "--device", "cpu", "--threads", 1)
    assert result.exit_code == 0, result.output
    assert "does not match its checksum" in result.output and "up to date" not in result.output
    digest = lambda path: hashlib.sha256(open(path, "rb").read()).hexdigest()  # noqa: E731
    assert digest(damaged) == digest(files["cache"])  # the same bytes as the undamaged build


def test_a_verification_is_remembered_for_that_version_of_the_file_only(tmp_path, monkeypatch):
    path = tmp_path / "teacher.h5"
    write_cache_by_hand(path)
    reads = []
    real = verify.embeddings_sha256
    monkeypatch.setattr(verify, "embeddings_sha256", lambda cache: reads.append(cache.path) or real(cache))
    TeacherCache.open(path)
    TeacherCache.open(path)
    assert len(reads) == 1  # the second open trusts the remembered verification
    TeacherCache.open(path, recheck=True)
    assert len(reads) == 2
    stat = os.stat(path)
    flip_one_byte(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as before: ctime still moved
    with pytest.raises(DataError, match=r"dataset 'embeddings' does not match its checksum"):
        TeacherCache.open(path)
    assert len(reads) == 3


def test_a_cache_replaced_by_another_file_is_verified_again(tmp_path, monkeypatch):
    path, other = tmp_path / "teacher.h5", tmp_path / "other.h5"
    write_cache_by_hand(path)
    write_cache_by_hand(other)
    flip_one_byte(other)
    TeacherCache.open(path)
    os.replace(other, path)  # same path, same size: another inode
    with pytest.raises(DataError, match=r"'embeddings' does not match its checksum"):
        TeacherCache.open(path)


def test_an_unwritable_cache_folder_only_costs_a_reread(tmp_path, monkeypatch):
    monkeypatch.setenv("EKD_CACHE_DIR", str(tmp_path / "not-a-folder"))
    (tmp_path / "not-a-folder").write_text("a file where the folder should be")
    path = tmp_path / "teacher.h5"
    write_cache_by_hand(path)
    TeacherCache.open(path)
    flip_one_byte(path)
    with pytest.raises(DataError, match=r"'embeddings' does not match its checksum"):
        TeacherCache.open(path)

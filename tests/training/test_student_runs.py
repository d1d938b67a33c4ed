"""What a student run refuses and what a rerun does, through `pipeline train-student` on a tiny set with a real
extract-teacher cache and build-pools folder:

- the resume identity: a checkpoint is continued only with the settings that wrote it; each result-changing
  option (KD method and weights, EKD options, sampler, margin, cache and pools) is refused by name;
- a finished run is reported as finished (model.pt records the identity); another method into its folder
  is refused and leaves model.pt alone;
- pools.h5 and thresholds.json as a pair, and against the cache: a rewrite interrupted between the two
  files, an edited or reordered thresholds.json, pools of another cache of the same teacher and data;
- a cache whose labels disagree with the data; a second writer of the same run folder.
"""
from __future__ import annotations

import json
import shutil
import signal
from dataclasses import fields

import h5py
import numpy as np
import pytest
from helpers.data import write_gradient_faces
from helpers.processes import dead_pid, error_line, start_worker, wait_for_line
from helpers.teachers import make_teacher

import pipeline.storage.io
from pipeline.cache.format import TeacherCache
from pipeline.losses.config import KDConfig
from pipeline.models import BackboneShape
from pipeline.models.model_file import load_model
from pipeline.search.pool_files import load_pools, pools_fingerprint
from pipeline.search.pools import PoolsConfig
from pipeline.settings import flag, identity_fields
from pipeline.training.config import TrainConfig
from pipeline.training.sampling.config import SamplerConfig
from pipeline.training.student import STUDENT_DEFAULTS
from stages.build_pools import build_pools_command

ROWS, CLASSES = 48, 4


@pytest.fixture(scope="module")
def world(tmp_path_factory, cli):
    """Data, a teacher, its cache and pools (k=2) through the CLI; a second teacher's cache and pools."""
    root = tmp_path_factory.mktemp("student-runs")
    data = write_gradient_faces(root / "data", n=ROWS, classes=CLASSES)
    paths = {"root": root, "data": data}
    for name, seed in (("", 0), ("other-", 7)):
        teacher = make_teacher(root / f"{name}teacher.pt", seed=seed)
        cache, pools = root / f"{name}cache.h5", root / f"{name}pools"
        for args in (["extract-teacher", "--data", data, "--teacher", teacher, "--out", cache, "--device", "cpu",
                      "--threads", 1],
                     ["build-pools", "--cache", cache, "--out", pools, "--neighbours", 2, "--hard-pairs", 100]):
            result = cli(*args)
            assert result.exit_code == 0, result.output
        paths[f"{name}cache"], paths[f"{name}pools"] = cache, pools
    return paths


def student(world, out, *options, cache=None, pools=None):
    """train-student arguments: a tiny MobileFaceNet, 2 epochs of 6 steps, EKD l2+ekd (global) on the
    neighbours sampler unless `options` say otherwise (later options win)."""
    return ["train-student", "--data", world["data"], "--name", out.name, "--out", out,
            "--cache", cache or world["cache"], "--pools", pools or world["pools"],
            "--width", 0.125, "--embedding-size", 32, "--epochs", 2, "--batch-size", 8, "--lr", 0.01,
            "--workers", 0, "--device", "cpu", "--balanced-batch-size", 8, "--per-identity", 4,
            "--kd", "l2+ekd", "--ekd-mode", "global", "--sampler", "neighbours", "--ekd-queue-size", 256, *options]


@pytest.fixture(scope="module")
def stopped(world, cli):
    """A run folder holding the checkpoint of epoch 1 of 2 (nothing finished)."""
    out = world["root"] / "stopped"
    result = cli(*student(world, out, "--stop-after-epochs", 1))
    assert result.exit_code == 0, result.output
    assert (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()
    return out


# What the stopped run was started with, where student() or the recipe's defaults do not say it plainly.
STARTED = {"kd": "l2+ekd", "sampler": "neighbours", "ekd_mode": "global", "ekd_queue_size": 256, "width": 0.125,
           "embedding_size": 32, "epochs": 2, "batch_size": 8, "lr": 0.01, "balanced_batch_size": 8,
           "per_identity": 4}
# Another value for fields whose neighbours in value space would be refused for another reason first.
OTHER = {"kd": "l2", "sampler": "balanced", "arch": "r18", "balanced_batch_size": 4, "per_identity": 2, "lr_milestones": "1", "ekd_mode": "reference",
         "margin_m": 0.3, "sample_rate": 0.5, "lr_schedule": "cosine"}
NOT_A_RESUME_CHECK = {  # identity fields whose change is refused earlier, or changes nothing, and why
    "embedding_size": "refused first against the cache's embedding size",
    "input_size": "the data's size is the only valid one, so it cannot change",
}


def _changed(field, current):
    """A valid different value for a config field, as a command-line word (and as the refusal prints it)."""
    if field.name in OTHER:
        return OTHER[field.name]
    if isinstance(current, bool):
        return not current
    if isinstance(current, int):
        return current + 1
    if isinstance(current, float):
        return current / 2 if current else 0.5
    choices = field.metadata.get("choices")
    return next(v for v in choices.values() if v != current)


def _identity_changes():
    """option -> arguments changing it, for EVERY identity field of train-student's configs that the stopped
    l2+ekd run uses (other methods' options are outside its identity: tested below)."""
    kd_fields = set(KDConfig(kd="l2+ekd").identity())
    changes = {}
    for cls in (KDConfig, SamplerConfig, TrainConfig, BackboneShape):
        for field in identity_fields(cls):
            if not field.metadata.get("cli") or field.name in NOT_A_RESUME_CHECK:
                continue
            if cls is KDConfig and field.name not in kd_fields:
                continue
            default = STARTED.get(field.name, STUDENT_DEFAULTS.get(field.name, getattr(cls, field.name, None)))
            value = _changed(field, default)
            words = [flag(field)] if value is True else [f"--no-{flag(field)[2:]}"] if value is False else \
                [flag(field), value]
            changes[field.name] = words
    return changes


CHANGES = _identity_changes()


def test_every_identity_setting_is_checked_and_the_rest_are_declared():
    declared = {f.name for cls in (KDConfig, SamplerConfig, TrainConfig, BackboneShape) for f in fields(cls)}
    used = set(KDConfig(kd="l2+ekd").identity())
    other_methods = {f.name for f in fields(KDConfig)} - used
    volatile = {f.name for cls in (TrainConfig,) for f in fields(cls) if not f.metadata.get("identity", True)}
    assert volatile == {"out_dir", "workers", "preload", "device", "resume", "stop_after_epochs", "checkpoint_every",
                        "monitor", "log_every", "head_parallel", "save_head"}
    assert declared == set(CHANGES) | other_methods | volatile | set(NOT_A_RESUME_CHECK) | {"arch_kwargs"}
    assert {"pair_share", "ekd_queue_size", "l2_weight", "margin_on", "amp"} <= set(CHANGES)


@pytest.mark.parametrize("change", CHANGES)
def test_resume_is_refused_when_a_result_changing_setting_differs(world, stopped, cli, change):
    options = CHANGES[change]
    before = (stopped / "checkpoint.pt").read_bytes()
    result = cli(*student(world, stopped, *options))
    assert result.exit_code == 2, result.output
    line = error_line(result.output)
    named = "arch_kwargs" if change == "width" else change
    assert line.startswith(f"error: {stopped / 'checkpoint.pt'}: the checkpoint was written with different "
                           "settings: ") and f" {named} " in " " + line.split("settings: ")[1] and "--no-resume" in line
    assert (stopped / "checkpoint.pt").read_bytes() == before and not (stopped / "model.pt").exists()


def test_resume_is_refused_with_another_cache_or_pools(world, stopped, cli):
    result = cli(*student(world, stopped, cache=world["other-cache"], pools=world["other-pools"]))
    assert result.exit_code == 2
    line = error_line(result.output)
    assert "different settings: cache '" in line and ", pools '" in line
    rebuilt = world["root"] / "pools-k3"
    assert cli("build-pools", "--cache", world["cache"], "--out", rebuilt, "--neighbours", 3, "--hard-pairs", 100).exit_code == 0
    line = error_line(cli(*student(world, stopped, pools=rebuilt)).output)
    assert "different settings: pools '" in line and "cache" not in line.split("settings: ")[1]


def test_a_finished_run_is_reported_as_finished_and_another_method_cannot_take_its_folder(world, cli):
    out = world["root"] / "finished"
    result = cli(*student(world, out))
    assert result.exit_code == 0, result.output
    _, meta = load_model(out / "model.pt")
    run = meta["extra"]["run"]
    assert (run["kd"], run["l2_weight"], run["ekd_weight"], run["ekd_mode"], run["sampler"]) == \
        ("l2+ekd", 1.5, 0.2, "global", "neighbours")
    assert run["cache"] == TeacherCache.open(world["cache"]).fingerprint
    assert run["pools"] == pools_fingerprint(load_pools(world["pools"] / "pools.h5"))
    model = (out / "model.pt").read_bytes()
    again = cli(*student(world, out))
    assert again.exit_code == 0
    assert f"training already finished: {out / 'model.pt'}" in again.output and "nan" not in again.output
    baseline = cli(*student(world, out, "--kd", "none", "--sampler", "random"))  # the silent swap
    assert baseline.exit_code == 2 and "kd 'l2+ekd' -> 'none'" in error_line(baseline.output)
    assert (out / "model.pt").read_bytes() == model


def refused_line(world, cli, out, pools):
    result = cli(*student(world, out, pools=pools))
    assert result.exit_code == 2
    assert not (out / "model.pt").exists() and not (out / "checkpoint.pt").exists()
    return error_line(result.output)


def test_a_build_pools_killed_between_its_two_files_is_refused(world, cli, monkeypatch):
    pools = world["root"] / "torn-pools"
    shutil.copytree(world["pools"], pools)
    (pools / f"pools.h5.tmp-{dead_pid()}-0badcafe").write_bytes(b"")  # left by a build killed earlier
    replace = pipeline.storage.io.os.replace

    class Killed(BaseException):
        pass

    def killed_before_pools_h5(src, dst):
        if str(dst).endswith("pools.h5"):
            raise Killed()
        return replace(src, dst)

    monkeypatch.setattr(pipeline.storage.io.os, "replace", killed_before_pools_h5)
    with pytest.raises(Killed):  # thresholds of a row sample: another thresholds.json than the first build's
        build_pools_command(cache=world["cache"], out=pools, cfg=PoolsConfig(neighbours=3, hard_pairs=50, threshold_rows=40, seed=1))
    monkeypatch.undo()
    assert (pools / "pools.h5").read_bytes() == (world["pools"] / "pools.h5").read_bytes()  # the old one
    assert (pools / "thresholds.json").read_bytes() != (world["pools"] / "thresholds.json").read_bytes()
    assert sorted(p.name for p in pools.iterdir()) == ["pools.h5", "thresholds.json"]  # no temporary, old or new
    line = refused_line(world, cli, world["root"] / "torn", pools)
    assert f"{pools / 'thresholds.json'}: not the thresholds.json written with {pools / 'pools.h5'}" in line


@pytest.mark.parametrize("edit", ["edited", "reordered"])
def test_an_edited_or_reordered_thresholds_json_is_refused(world, cli, edit):
    pools = world["root"] / f"{edit}-pools"
    shutil.copytree(world["pools"], pools)
    document = json.loads((pools / "thresholds.json").read_text())
    if edit == "edited":  # still in order, just not what build-pools computed
        document["1e-3"] = (document["1e-2"] + document["1e-3"]) / 2
    else:
        document["1e-2"], document["1e-3"] = document["1e-3"] + 0.01, document["1e-2"]
    (pools / "thresholds.json").write_text(json.dumps(document))
    line = refused_line(world, cli, world["root"] / edit, pools)
    expected = "not the thresholds.json written with" if edit == "edited" else "threshold at FPR 1e-3"
    assert line.startswith(f"error: {pools / 'thresholds.json'}: ") and expected in line


def test_pools_of_another_cache_of_the_same_teacher_and_data_are_refused(world, cli):
    cache32, pools32 = world["root"] / "cache32.h5", world["root"] / "pools32"
    for args in (["extract-teacher", "--data", world["data"], "--teacher", world["root"] / "teacher.pt", "--out",
                  cache32, "--device", "cpu", "--dtype", "float32", "--threads", 1],
                 ["build-pools", "--cache", cache32, "--out", pools32, "--neighbours", 2, "--hard-pairs", 100]):
        assert cli(*args).exit_code == 0
    line = refused_line(world, cli, world["root"] / "mixed", pools32)
    assert "pools come from another teacher cache: cache_fingerprint" in line and "teacher_fingerprint" not in line


def test_a_cache_whose_labels_disagree_with_the_data_is_refused(world, cli):
    cache = world["root"] / "relabelled.h5"
    shutil.copy(world["cache"], cache)
    with h5py.File(cache, "a") as f:  # labels shifted by one row, checksum updated: the file is consistent
        labels = np.roll(f["labels"][()], 1)
        f["labels"][...] = labels
        f.attrs["labels_sha256"] = pipeline.storage.io.array_sha256(labels)
    out = world["root"] / "relabelled"
    result = cli(*student(world, out, "--kd", "l2", "--sampler", "random", cache=cache))
    assert result.exit_code == 2 and not out.joinpath("model.pt").exists()
    assert error_line(result.output).startswith(f"error: {cache}: row 0 has label 3 but the training data has 0")


def test_a_second_writer_of_a_run_folder_is_refused(world, cli):
    out = world["root"] / "busy"
    holder = start_worker("hold_lock", out)
    try:
        wait_for_line(holder, "locked")
        result = cli(*student(world, out))
        assert result.exit_code == 2
        assert error_line(result.output) == (f"error: {out}: another run (PID {holder.pid}) is writing it (lock "
                                             f"{pipeline.storage.io.lock_path(out)}); wait for it to finish or stop it")
        assert not (out / "checkpoint.pt").exists()
        result = cli("build-pools", "--cache", world["cache"], "--out", out, "--neighbours", 2)
        assert result.exit_code == 2 and f"(PID {holder.pid})" in error_line(result.output)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

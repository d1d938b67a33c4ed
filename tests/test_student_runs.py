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

import h5py
import numpy as np
import pytest
from helpers.data import write_gradient_faces
from helpers.processes import dead_pid, error_line, start_worker, wait_for_line
from helpers.teachers import make_teacher

import pipeline.io
from pipeline.cache.format import TeacherCache
from pipeline.models.model_file import load_model
from pipeline.search.pool_files import load_pools, pools_fingerprint
from pipeline.search.pools import PoolsConfig
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
                     ["build-pools", "--cache", cache, "--out", pools, "--k", 2, "--m", 100]):
            result = cli(*args)
            assert result.exit_code == 0, result.output
        paths[f"{name}cache"], paths[f"{name}pools"] = cache, pools
    return paths


def student(world, out, *options, cache=None, pools=None):
    """train-student arguments: a tiny MobileFaceNet, 2 epochs of 6 steps, EKD l2+ekd (global) on the pool
    sampler unless `options` say otherwise (later options win)."""
    return ["train-student", "--data", world["data"], "--name", out.name, "--out", out,
            "--cache", cache or world["cache"], "--pools", pools or world["pools"],
            "--width", 0.125, "--embedding-size", 32, "--epochs", 2, "--batch-size", 8, "--lr", 0.01,
            "--workers", 0, "--device", "cpu", "--balanced-batch-size", 8, "--per-identity", 4,
            "--kd", "l2+ekd", "--ekd-mode", "global", "--sampler", "pool", "--queue-size", 256, *options]


@pytest.fixture(scope="module")
def stopped(world, cli):
    """A run folder holding the checkpoint of epoch 1 of 2 (nothing finished)."""
    out = world["root"] / "stopped"
    result = cli(*student(world, out, "--stop-after-epochs", 1))
    assert result.exit_code == 0, result.output
    assert (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()
    return out


CHANGES = {  # option(s) changed on the rerun -> how the refusal names the setting
    "kd": (["--kd", "ekd"], "kd 'l2+ekd' -> 'ekd'"),
    "kd-weight": (["--kd-weight", 2], "kd_weight 1.5 -> 2.0"),
    "ekd-weight": (["--ekd-weight", 0.5], "ekd_weight 0.2 -> 0.5"),
    "kd-scale": (["--kd-scale", "weight"], "kd_scale 'grad-ratio' -> 'weight'"),
    "kd-warmup": (["--kd-warmup-epochs", 1], "kd_warmup_epochs 0.0 -> 1.0"),
    "ekd-mode": (["--ekd-mode", "reference"], "ekd_mode 'global' -> 'reference'"),
    "ekd-temperature": (["--ekd-temperature", 0.05], "ekd_temperature 0.01 -> 0.05"),
    "ekd-one-sided": (["--ekd-one-sided"], "ekd_one_sided False -> True"),
    "queue-size": (["--queue-size", 128], "queue_size 256 -> 128"),
    "sampler": (["--sampler", "balanced"], "sampler 'pool' -> 'balanced'"),
    "balanced-batch": (["--balanced-batch-size", 4], "balanced_batch_size 8 -> 4"),
    "per-identity": (["--per-identity", 2], "per_identity 4 -> 2"),
    "margin-on": (["--margin-on", "general"], "margin_on 'all' -> 'general'"),
    "margin-m": (["--margin-m", 0.3], "margin_m None -> 0.3"),
    "seed": (["--seed", 1], "seed 0 -> 1"),
    "no-kd": (["--kd", "none", "--sampler", "random"], "kd 'l2+ekd' -> 'none'"),
}


@pytest.mark.parametrize("change", CHANGES)
def test_resume_is_refused_when_a_result_changing_setting_differs(world, stopped, cli, change):
    options, named = CHANGES[change]
    before = (stopped / "checkpoint.pt").read_bytes()
    result = cli(*student(world, stopped, *options))
    assert result.exit_code == 2
    line = error_line(result.output)
    assert line.startswith(f"error: {stopped / 'checkpoint.pt'}: the checkpoint was written with different "
                           "settings: ") and named in line and "--no-resume" in line
    assert (stopped / "checkpoint.pt").read_bytes() == before and not (stopped / "model.pt").exists()


def test_resume_is_refused_with_another_cache_or_pools(world, stopped, cli):
    result = cli(*student(world, stopped, cache=world["other-cache"], pools=world["other-pools"]))
    assert result.exit_code == 2
    line = error_line(result.output)
    assert "different settings: cache '" in line and ", pools '" in line
    rebuilt = world["root"] / "pools-k3"
    assert cli("build-pools", "--cache", world["cache"], "--out", rebuilt, "--k", 3, "--m", 100).exit_code == 0
    line = error_line(cli(*student(world, stopped, pools=rebuilt)).output)
    assert "different settings: pools '" in line and "cache" not in line.split("settings: ")[1]


def test_a_finished_run_is_reported_as_finished_and_another_method_cannot_take_its_folder(world, cli):
    out = world["root"] / "finished"
    result = cli(*student(world, out))
    assert result.exit_code == 0, result.output
    _, meta = load_model(out / "model.pt")
    run = meta["extra"]["run"]
    assert (run["kd"], run["kd_weight"], run["ekd_weight"], run["ekd_mode"], run["sampler"]) == \
        ("l2+ekd", 1.5, 0.2, "global", "pool")
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
    replace = pipeline.io.os.replace

    class Killed(BaseException):
        pass

    def killed_before_pools_h5(src, dst):
        if str(dst).endswith("pools.h5"):
            raise Killed()
        return replace(src, dst)

    monkeypatch.setattr(pipeline.io.os, "replace", killed_before_pools_h5)
    with pytest.raises(Killed):  # thresholds of a row sample: another thresholds.json than the first build's
        build_pools_command(cache=world["cache"], out=pools, cfg=PoolsConfig(k=3, m=50, sample=40, seed=1))
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
                 ["build-pools", "--cache", cache32, "--out", pools32, "--k", 2, "--m", 100]):
        assert cli(*args).exit_code == 0
    line = refused_line(world, cli, world["root"] / "mixed", pools32)
    assert "pools come from another teacher cache: cache_fingerprint" in line and "teacher_fingerprint" not in line


def test_a_cache_whose_labels_disagree_with_the_data_is_refused(world, cli):
    cache = world["root"] / "relabelled.h5"
    shutil.copy(world["cache"], cache)
    with h5py.File(cache, "a") as f:  # labels shifted by one row, checksum updated: the file is consistent
        labels = np.roll(f["labels"][()], 1)
        f["labels"][...] = labels
        f.attrs["labels_sha256"] = pipeline.io.array_sha256(labels)
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
                                             f"{pipeline.io.lock_path(out)}); wait for it to finish or stop it")
        assert not (out / "checkpoint.pt").exists()
        result = cli("build-pools", "--cache", world["cache"], "--out", out, "--k", 2)
        assert result.exit_code == 2 and f"(PID {holder.pid})" in error_line(result.output)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()

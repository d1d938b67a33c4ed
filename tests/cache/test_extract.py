"""`extract-teacher` end to end on a tiny RecordIO set and a tiny r18 teacher: the cache contract, both views
against the teacher run directly, crash/kill/resume bit-identity, refusals, and the Dask path."""
import hashlib
import json
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import typer
from helpers.data import write_gradient_faces
from helpers.processes import environment, error_line
from helpers.teachers import FailingTeacher, make_teacher, quiet
from typer.testing import CliRunner
from workers.dask_tasks import exit_once_then_run

import pipeline.cache.worker as worker
from pipeline.cache.build import REDONE_ON_CHANGE, ExtractionConfig, _manifest, build_teacher_cache, shard_progress
from pipeline.cache.format import TeacherCache
from pipeline.cache.shards import shard_dir
from pipeline.errors import DataError, PipelineError
from pipeline.formats.source import open_face_source
from pipeline.models.loading import load_embedder
from pipeline.models.model_file import load_model
from pipeline.settings import identity_fields
from stages.extract_teacher import COMMANDS

ROWS, SHARD, BATCH = 150, 32, 16  # 5 shards of 2 batches (the last shard is shorter)
SLOW_EXTRACTION = Path(__file__).parents[1] / "workers" / "slow_extract.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Data, two teachers and the reference (uninterrupted, in-process) cache, built once for the module."""
    root = tmp_path_factory.mktemp("extract")
    data = write_gradient_faces(root / "data", n=ROWS)
    teacher = make_teacher(root / "teacher.pt", seed=0)
    other = make_teacher(root / "other.pt", seed=1)
    reference = root / "reference.h5"
    build_teacher_cache(config(data, teacher, reference), log=quiet)
    return {"root": root, "data": data, "teacher": teacher, "other": other, "reference": reference}


def config(data, teacher, out, **kw):
    """One torch thread per forward unless `kw` says otherwise (the suite shares two busy cores)."""
    return ExtractionConfig(data=data, teacher=teacher, out=out,
                            **{"shard_size": SHARD, "batch_size": BATCH, "device": "cpu", "threads": 1, **kw})


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_contract_attributes(setup):
    source = open_face_source(setup["data"])
    with h5py.File(setup["reference"], "r") as f:
        attrs = dict(f.attrs)
        assert f["embeddings"].shape == (ROWS, 2, 32) and f["embeddings"].dtype == np.float16
        np.testing.assert_array_equal(f["labels"][()], source.labels)
        np.testing.assert_array_equal(f["keys"][()], source.keys)
        assert list(f.attrs)[-1] == "complete"
    assert attrs["teacher_fingerprint"] == hashlib.sha256(setup["teacher"].read_bytes()).hexdigest()
    assert attrs["dataset_fingerprint"] == source.fingerprint()
    assert json.loads(attrs["preprocessing"]) == {"size": 32, "mean": 0.5, "std": 0.5, "color": "RGB",
                                                  "layout": "NCHW", "flip": "horizontal"}
    assert (attrs["dim"], attrs["views"], attrs["dtype"], attrs["format_version"]) == (32, 2, "float16", 2)
    with h5py.File(setup["reference"], "r") as f:
        for name in ("embeddings", "labels", "keys"):
            assert attrs[f"{name}_sha256"] == hashlib.sha256(f[name][()].tobytes()).hexdigest()
    assert attrs["complete"] and not shard_dir(setup["reference"]).exists()


def test_views_are_the_teacher_on_image_and_flip(setup, tmp_path):
    source = open_face_source(setup["data"])
    teacher = load_embedder(setup["teacher"])
    images = np.stack([source.decode(i) for i in range(ROWS)]).astype(np.float32)
    direct = {}
    for view, batch in (("original", images), ("flipped", images[:, :, ::-1, :])):
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)
        direct[view] = teacher((x / 255 - 0.5) / 0.5).numpy()
    cache = TeacherCache.open(setup["reference"])
    got = cache.embeddings()
    np.testing.assert_allclose(got[:, 0], direct["original"], rtol=2e-3, atol=2e-3)  # float16 storage
    np.testing.assert_allclose(got[:, 1], direct["flipped"], rtol=2e-3, atol=2e-3)
    assert np.abs(direct["original"] - direct["flipped"]).max() > 0.05  # the views really differ
    build_teacher_cache(config(setup["data"], setup["teacher"], tmp_path / "f32.h5", dtype="float32"), log=quiet)
    exact = TeacherCache.open(tmp_path / "f32.h5")
    assert exact.dtype == "float32"
    np.testing.assert_allclose(exact.embeddings()[:, 1], direct["flipped"], rtol=1e-5, atol=1e-5)


def test_rerun_on_complete_cache_is_a_no_op(setup, monkeypatch):
    before = (sha256(setup["reference"]), setup["reference"].stat().st_mtime_ns)
    messages = []

    def no_loading(*args, **kwargs):
        raise AssertionError("an up-to-date cache must not load the teacher")

    monkeypatch.setattr("pipeline.cache.build.load_embedder", no_loading)
    summary = build_teacher_cache(config(setup["data"], setup["teacher"], setup["reference"]), log=messages.append)
    assert summary["status"] == "up-to-date" and "up to date" in messages[-1]
    assert (sha256(setup["reference"]), setup["reference"].stat().st_mtime_ns) == before


def test_failure_mid_run_leaves_nothing_complete_then_resumes(setup, tmp_path):
    out = tmp_path / "cache.h5"
    failing = FailingTeacher(load_embedder(setup["teacher"]), raise_on=6)  # during the third shard
    with pytest.raises(OSError, match="simulated"):
        build_teacher_cache(config(setup["data"], setup["teacher"], out), teacher=failing, log=quiet)
    assert not out.exists() and not Path(str(out) + ".tmp").exists()
    assert sorted(p.name for p in shard_dir(out).glob("shard-*")) == ["shard-00000.h5", "shard-00001.h5"]
    progress = shard_progress(out)
    assert (progress["shards_finished"], progress["shards_planned"], progress["rows_finished"]) == (2, 5, 64)
    with pytest.raises(PipelineError, match="interrupted after 2/5 shards"):
        COMMANDS["cache-info"](out)
    summary = build_teacher_cache(config(setup["data"], setup["teacher"], out), log=quiet)
    assert (summary["shards_reused"], summary["shards_run"]) == (2, 3)
    assert sha256(out) == sha256(setup["reference"])


# ExtractionConfig's identity fields changed on a resume: refused by name, or (settings a user changes on purpose,
# REDONE_ON_CHANGE) the earlier shards discarded. arch and input_size only apply to files that do not record
# them (TorchScript/ONNX): their presence in the manifest is checked below instead.
# The device is compared as the kind it resolves to: a CPU-only machine has one kind, so "another device" is a
# CUDA one as the manifest records it (checked on the manifest below), and `auto` here is the same as `cpu`.
RESUME_CHANGES = {"batch_size": BATCH + 1, "threads": 2, "dtype": "float32", "shard_size": SHARD * 2}


def killed_extraction(setup, out: Path) -> None:
    failing = FailingTeacher(load_embedder(setup["teacher"]), raise_on=6)
    with pytest.raises(OSError, match="simulated"):
        build_teacher_cache(config(setup["data"], setup["teacher"], out), teacher=failing, log=quiet)


@pytest.mark.parametrize("name", RESUME_CHANGES)
def test_a_resume_with_a_changed_setting_is_refused_by_name_or_starts_over(setup, tmp_path, name):
    out = tmp_path / "cache.h5"
    killed_extraction(setup, out)
    changed = config(setup["data"], setup["teacher"], out, **{name: RESUME_CHANGES[name]})
    if name in REDONE_ON_CHANGE:
        summary = build_teacher_cache(changed, log=quiet)
        assert summary["shards_reused"] == 0 and summary["shards_run"] > 0
        return
    with pytest.raises(PipelineError, match=f"{name} "):
        build_teacher_cache(changed, log=quiet)


def test_every_identity_setting_is_in_the_shard_manifest(setup):
    cfg = config(setup["data"], setup["teacher"], setup["root"] / "unused.h5")
    manifest = _manifest(cfg, load_embedder(setup["teacher"]), "fingerprint", ROWS)
    assert {f.name for f in identity_fields(ExtractionConfig)} <= set(manifest)
    assert set(RESUME_CHANGES) | {"arch", "input_size", "device"} == {f.name for f in identity_fields(ExtractionConfig)}


def test_the_device_counts_as_the_kind_it_resolves_to(setup, tmp_path, monkeypatch):
    """`auto` on this CPU machine resumes a `cpu` run; a CUDA device is another manifest."""
    out = tmp_path / "cache.h5"
    killed_extraction(setup, out)
    summary = build_teacher_cache(config(setup["data"], setup["teacher"], out, device="auto"), log=quiet)
    assert (summary["shards_reused"], summary["shards_run"]) == (2, 3)
    assert sha256(out) == sha256(setup["reference"])
    cfg = config(setup["data"], setup["teacher"], out)
    teacher = load_embedder(setup["teacher"])
    assert _manifest(cfg, teacher, "fingerprint", ROWS)["device"] == "cpu"
    monkeypatch.setattr("pipeline.cache.build.resolve_device", lambda device: torch.device("cuda", 1))
    assert _manifest(replace(cfg, device="cuda:1"), teacher, "fingerprint", ROWS)["device"] == "cuda"


def test_nan_teacher_output_names_the_keys(setup, tmp_path):
    out = tmp_path / "cache.h5"
    # second call = rows 16..31; positions 3 and 16 + 5 of the 2B batch = rows 19 (original) and 21 (flip)
    failing = FailingTeacher(load_embedder(setup["teacher"]), nan_batch=2, nan_rows=[3, BATCH + 5])
    keys = open_face_source(setup["data"]).keys
    with pytest.raises(PipelineError) as info:
        build_teacher_cache(config(setup["data"], setup["teacher"], out), teacher=failing, log=quiet)
    assert f"record keys {keys[19]}, {keys[21]}" in str(info.value)
    assert not out.exists() and not list(shard_dir(out).glob("shard-*"))


def test_other_teacher_refused_with_both_fingerprints_unless_overwrite(setup, tmp_path):
    out = tmp_path / "cache.h5"
    out.write_bytes(setup["reference"].read_bytes())
    old_fp, new_fp = (hashlib.sha256(setup[k].read_bytes()).hexdigest() for k in ("teacher", "other"))
    with pytest.raises(PipelineError) as info:
        build_teacher_cache(config(setup["data"], setup["other"], out), log=quiet)
    assert old_fp in str(info.value) and new_fp in str(info.value) and "--overwrite" in str(info.value)
    assert sha256(out) == sha256(setup["reference"])  # untouched
    build_teacher_cache(config(setup["data"], setup["other"], out, overwrite=True), log=quiet)
    assert TeacherCache.open(out).teacher_fingerprint == new_fp


def test_dim_mismatch_with_partial_cache_refused(setup, tmp_path):
    out = tmp_path / "cache.h5"
    failing = FailingTeacher(load_embedder(setup["teacher"]), raise_on=3)
    with pytest.raises(OSError):
        build_teacher_cache(config(setup["data"], setup["teacher"], out), teacher=failing, log=quiet)
    narrow = make_teacher(tmp_path / "narrow.pt", num_features=16)
    with pytest.raises(PipelineError, match="dim 32 .found. != 16 .expected."):
        build_teacher_cache(config(setup["data"], narrow, out), log=quiet)
    assert (shard_dir(out) / "shard-00000.h5").exists()  # the partial work is kept


def test_image_size_must_match_teacher(setup, tmp_path):
    big = make_teacher(tmp_path / "big.pt", input_size=48)
    with pytest.raises(DataError, match="32x32 but teacher .*48x48"):
        build_teacher_cache(config(setup["data"], big, tmp_path / "cache.h5"), log=quiet)


def _start_slow_run(setup, out, delay=0.25):
    args = [sys.executable, str(SLOW_EXTRACTION), str(setup["data"]), str(setup["teacher"]), str(out), str(SHARD),
            str(BATCH), str(delay)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())


def _kill_when(process, condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"extraction ended before the kill point: {process.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_sigkill_at_any_point_then_rerun_is_bit_identical(setup, tmp_path):
    out = tmp_path / "cache.h5"
    shards = shard_dir(out)

    def finished():
        return len(list(shards.glob("shard-*.h5")))

    _kill_when(_start_slow_run(setup, out), lambda: finished() >= 1)
    first = shards / "shard-00000.h5"
    first_stamp = first.stat().st_mtime_ns
    _kill_when(_start_slow_run(setup, out), lambda: finished() >= 3)
    assert first.stat().st_mtime_ns == first_stamp  # finished shards are reused, not recomputed
    marker = Path(str(out) + ".assembling")
    _kill_when(_start_slow_run(setup, out), lambda: marker.exists())
    assert not out.exists()
    [partial_final] = out.parent.glob(out.name + ".tmp-*")  # the killed merge's temporary file
    with pytest.raises(PipelineError, match="incomplete|not a readable"):  # HDF5 may not have flushed yet
        TeacherCache.open(partial_final)
    summary = build_teacher_cache(config(setup["data"], setup["teacher"], out), log=quiet)
    assert summary["shards_run"] == 0
    assert sha256(out) == sha256(setup["reference"])
    assert not shards.exists() and not partial_final.exists()


def test_a_second_extraction_into_the_same_cache_is_refused_naming_the_first(setup, tmp_path, cli):
    out = tmp_path / "cache.h5"
    first = _start_slow_run(setup, out)
    try:
        deadline = time.monotonic() + 60
        while not (shard_dir(out) / "manifest.json").exists():  # the first run holds the lock by now
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()[-2000:]
            time.sleep(0.02)
        args = ["extract-teacher", "--data", setup["data"], "--teacher", setup["teacher"], "--out", out,
                "--device", "cpu", "--batch-size", BATCH, "--shard-size", SHARD, "--threads", 1]
        second = cli(*args)
        assert second.exit_code == 2
        assert error_line(second.output).startswith(f"error: {out}: another run (PID {first.pid}) is writing it")
        assert first.poll() is None and not out.exists()  # the first run goes on undisturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert cli(*args).exit_code == 0  # the killed run's lock went with it; its shards are reused
    assert sha256(out) == sha256(setup["reference"])


def test_every_forward_runs_with_the_fixed_thread_count(setup, tmp_path, monkeypatch):
    """The cache's bytes depend on the intra-op thread count: each forward runs with --threads, whatever this
    process (or a Dask worker) is set to, and the process's own setting is restored afterwards."""
    seen = []
    forward = worker.forward_views

    def recording_forward(teacher, images):
        seen.append(torch.get_num_threads())
        return forward(teacher, images)

    monkeypatch.setattr(worker, "forward_views", recording_forward)
    before = torch.get_num_threads()
    build_teacher_cache(config(setup["data"], setup["teacher"], tmp_path / "cache.h5", threads=before + 2), log=quiet)
    assert seen and set(seen) == {before + 2} and torch.get_num_threads() == before


def test_a_torchscript_teacher_takes_its_input_size_from_the_data(setup, tmp_path, cli):
    """A TorchScript file declares no input size: the data's 32x32 is used (not 112), or --input-size."""
    model, _ = load_model(setup["teacher"])
    scripted = tmp_path / "teacher.torchscript"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.trace(model, torch.zeros(1, 3, 32, 32)).save(scripted)
    args = ["extract-teacher", "--data", setup["data"], "--teacher", scripted, "--device", "cpu", "--threads", 1]
    result = cli(*args, "--out", tmp_path / "cache.h5")
    assert result.exit_code == 0, result.output
    cache = TeacherCache.open(tmp_path / "cache.h5")
    assert cache.preprocessing["size"] == 32
    np.testing.assert_allclose(cache.embeddings(), TeacherCache.open(setup["reference"]).embeddings(), atol=2e-3)
    result = cli(*args, "--out", tmp_path / "other.h5", "--input-size", 48)
    assert result.exit_code == 2 and not (tmp_path / "other.h5").exists()
    assert error_line(result.output).startswith(f"error: {scripted}: model fails on a (1, 3, 48, 48) input: ")


def test_cli_commands(setup, tmp_path):
    app = typer.Typer()
    for name, function in COMMANDS.items():
        app.command(name=name)(function)
    runner = CliRunner()
    out = tmp_path / "cache.h5"
    result = runner.invoke(app, ["extract-teacher", "--data", str(setup["data"]), "--teacher", str(setup["teacher"]),
                                 "--out", str(out), "--batch-size", str(BATCH), "--shard-size", str(SHARD),
                                 "--device", "cpu", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert sha256(out) == sha256(setup["reference"])
    info = runner.invoke(app, ["cache-info", str(out)])
    assert info.exit_code == 0 and json.loads(info.output)["rows"] == ROWS


# ------------------------------------------------------------------------------------------------ Dask
@pytest.fixture(scope="module")
def dask_client():
    from pipeline.cache.dask_cluster import make_client

    client = make_client(n_workers=2, threads_per_worker=1, processes=True)
    yield client
    client.close()


def test_two_worker_cluster_matches_in_process(setup, tmp_path, dask_client):
    out = tmp_path / "cache.h5"
    summary = build_teacher_cache(config(setup["data"], setup["teacher"], out), client=dask_client, log=quiet)
    assert summary["shards_run"] == 5
    assert sha256(out) == sha256(setup["reference"])


def test_an_in_process_run_resumed_on_dask_gives_the_same_bytes(setup, tmp_path, dask_client):
    out = tmp_path / "cache.h5"
    failing = FailingTeacher(load_embedder(setup["teacher"]), raise_on=5)  # two shards done in this process
    with pytest.raises(OSError):
        build_teacher_cache(config(setup["data"], setup["teacher"], out), teacher=failing, log=quiet)
    summary = build_teacher_cache(config(setup["data"], setup["teacher"], out), client=dask_client, log=quiet)
    assert (summary["shards_reused"], summary["shards_run"]) == (2, 3)
    assert sha256(out) == sha256(setup["reference"])


def test_worker_killed_mid_run_still_gives_the_full_cache(setup, tmp_path, dask_client):
    out, marker = tmp_path / "cache.h5", tmp_path / "worker-died"
    task = partial(exit_once_then_run, str(marker))
    build_teacher_cache(config(setup["data"], setup["teacher"], out), client=dask_client, shard_task=task, log=quiet)
    assert marker.exists()  # a worker really died running shard 1
    assert sha256(out) == sha256(setup["reference"])

"""Students trained on cached teacher targets.

1. Equivalence: training on the extract-teacher cache gives the student weights of training with the teacher
   run online on every batch (the official EKD setup), for the same batches and flips: equal for a float32
   cache, within float16 rounding for the default float16 cache. A negative control (the cached views
   swapped, i.e. the wrong flip looked up) shows the comparison is sensitive to the targets.
2. `pipeline train-student` end to end through the CLI, after real extract-teacher and build-pools runs, with
   the teacher's weights deleted: EKD global mode + neighbours sampler, `--kd none` (= plain training), and the
   refusals of bad inputs.
"""
from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from helpers.data import write_gradient_faces
from helpers.teachers import TEACHER_KWARGS, make_spread_teacher, make_teacher, quiet

from pipeline.cache.build import ExtractionConfig, build_teacher_cache
from pipeline.cache.format import TeacherCache
from pipeline.formats.source import open_face_source
from pipeline.losses.ekd import DEFAULT_ANCHORS
from pipeline.losses.registry import build_kd_loss
from pipeline.models import get_model
from pipeline.models.loading import load_embedder
from pipeline.models.model_file import load_model, safe_torch_load
from pipeline.search.pool_files import load_pools
from pipeline.training.config import TrainConfig
from pipeline.training.data import FlipAugment
from pipeline.training.distill import Distillation
from pipeline.training.loop import train
from pipeline.training.sampling import config as sampling
from pipeline.training.sampling.balanced import BalancedBatchSampler

ROWS, CLASSES = 96, 8
STUDENT_KWARGS = {"input_size": 32, "width": 0.125, "num_features": TEACHER_KWARGS["num_features"]}
GENERAL, BALANCED, PER_IDENTITY = 8, 8, 4
EPOCHS, STEPS_PER_EPOCH, SEED = 2, 1, 0
LOSSES = {"l2": {}, "ekd": {"mode": "reference"}}
# Tolerances on |w_cached - w_online| relative to how far training moved the weights (|w_online - w_init|).
FLOAT32_TOLERANCE = 1e-5  # same float32 targets: only batch-composition rounding in the teacher may differ
FLOAT16_TOLERANCE = 4e-3  # targets rounded to float16 (relative error ~5e-4), amplified by two SGD steps
CONTROL_MINIMUM = 5 * FLOAT16_TOLERANCE  # the wrong targets must differ far more than any tolerance
# Measured on the CPU build: float32 0.0 (bit-identical), float16 2.5e-4 (l2) / 6.2e-4 (ekd), swapped views
# 4.6e-2 / 5.0e-2.


class CountingTeacher:
    """The online teacher as a target lookup: the teacher run on each batch's images, counting the batches."""

    def __init__(self, teacher):
        self.teacher, self.calls = teacher, 0

    def __call__(self, images, indices, flips, device):
        self.calls += 1
        return self.teacher(images).float()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Data, a teacher and its caches (float32 and float16) built by the in-process extraction."""
    root = tmp_path_factory.mktemp("students")
    data = write_gradient_faces(root / "data", n=ROWS, classes=CLASSES)
    source = open_face_source(data)
    teacher_path = make_spread_teacher(root / "teacher.pt", source)
    teacher = load_embedder(teacher_path, device="cpu")
    caches = {}
    for dtype in ("float32", "float16"):
        out = root / f"cache-{dtype}.h5"
        cfg = ExtractionConfig(data=data, teacher=teacher_path, out=out, dtype=dtype, batch_size=32,
                               shard_size=64, device="cpu", threads=1)
        build_teacher_cache(cfg, teacher=teacher, log=quiet)
        caches[dtype] = TeacherCache.open(out)
    return {"root": root, "data": data, "source": source, "teacher": teacher, "caches": caches, "online": {}}


class FirstBatches:
    """The first `steps` batches of each epoch of a batch sampler (short epochs for a quick test)."""

    def __init__(self, sampler, steps):
        self.sampler, self.steps = sampler, steps

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)

    def __len__(self):
        return self.steps

    def __iter__(self):
        return itertools.islice(iter(self.sampler), self.steps)


def batches(source):
    def factory(world_size, rank):
        return FirstBatches(BalancedBatchSampler(source.labels, GENERAL, BALANCED, per_identity=PER_IDENTITY,
                                                 seed=SEED, world_size=world_size, rank=rank), STEPS_PER_EPOCH)
    return factory


def train_student(world, name, loss, **targets) -> dict:
    """Train the tiny student for EPOCHS x STEPS_PER_EPOCH steps; returns its final state dict."""
    cfg = TrainConfig(out_dir=world["root"] / name, arch="mbf", arch_kwargs=STUDENT_KWARGS, epochs=EPOCHS,
                      batch_size=GENERAL, lr=0.01, seed=SEED, workers=0, preload=True, resume=False)
    distill = Distillation(loss=build_kd_loss(loss, **LOSSES[loss]), **targets)
    source = world["source"]
    train(cfg, source, source.num_classes, distill=distill, batch_sampler_factory=batches(source),
          margin_samples=GENERAL)
    return safe_torch_load(world["root"] / name / "model.pt")["state_dict"]


def online_weights(world, loss) -> dict:
    """The reference: the teacher run on every batch (once per loss for the module)."""
    if loss not in world["online"]:
        counting = CountingTeacher(world["teacher"])
        world["online"][loss] = train_student(world, f"{loss}-online", loss, targets=counting)
        assert counting.calls == EPOCHS * STEPS_PER_EPOCH
    return world["online"][loss]


def initial_weights() -> dict:
    torch.manual_seed(SEED)  # train() seeds like this right before building the backbone
    return get_model("mbf", **STUDENT_KWARGS).state_dict()


def relative_to_update(got: dict, reference: dict) -> float:
    """|got - reference| / |reference - initial| over every floating-point tensor of the backbone."""
    init = initial_weights()
    keys = [k for k in reference if reference[k].is_floating_point()]
    flat = {name: torch.cat([sd[k].double().flatten() for k in keys]) for name, sd in
            (("got", got), ("ref", reference), ("init", init))}
    moved = (flat["ref"] - flat["init"]).norm()
    assert moved > 0
    return float((flat["got"] - flat["ref"]).norm() / moved)


def test_batches_use_both_flips(world):
    """Precondition of the equivalence: the steps contain originals and flips, so both cached views are read."""
    sampler = FlipAugment(batches(world["source"])(1, 0), seed=SEED)
    flips = []
    for epoch in range(EPOCHS):
        sampler.set_epoch(epoch)
        flips += [flip for batch in sampler for _, flip in batch]
    assert 0 < sum(flips) < len(flips)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype, tolerance", [("float32", FLOAT32_TOLERANCE), ("float16", FLOAT16_TOLERANCE)])
def test_cached_targets_train_like_the_online_teacher(world, loss, dtype, tolerance):
    online = online_weights(world, loss)
    cached = train_student(world, f"{loss}-{dtype}", loss, targets=world["caches"][dtype].to_torch())
    assert relative_to_update(cached, online) <= tolerance


@pytest.mark.parametrize("loss", LOSSES)
def test_wrong_view_is_detected(world, loss):
    """Negative control: originals and flips swapped in the cache give clearly different weights."""
    swapped = world["caches"]["float32"].to_torch().flip(1).contiguous()
    wrong = train_student(world, f"{loss}-swapped", loss, targets=swapped)
    assert relative_to_update(wrong, online_weights(world, loss)) >= CONTROL_MINIMUM


# ----------------------------------------------------------------------------------------------- the CLI
def training_args(world, out):
    """Options train-student shares with train-teacher."""
    return ["--data", world["data"], "--out", out, "--width", 0.125, "--embedding-size",
            STUDENT_KWARGS["num_features"], "--epochs", 2, "--batch-size", GENERAL, "--lr", 0.01, "--workers", 0,
            "--preload", "--device", "cpu"]


def student_args(world, out, *extra):
    return ["train-student", *training_args(world, out), "--name", out.name, "--balanced-batch-size", BALANCED,
            "--per-identity", PER_IDENTITY, *extra]


@pytest.fixture(scope="module")
def pipeline_run(world, cli):
    """extract-teacher and build-pools through the CLI, then the teacher's weights deleted."""
    root = world["root"] / "cli"
    root.mkdir()
    teacher = shutil.copy(world["root"] / "teacher.pt", root / "teacher.pt")
    cache, pools = root / "cache.h5", root / "pools"
    for args in (["extract-teacher", "--threads", 1, "--data", world["data"], "--teacher", teacher, "--out", cache,
                  "--device", "cpu", "--batch-size", 32],
                 ["build-pools", "--cache", cache, "--out", pools, "--neighbours", 4, "--hard-pairs", 200]):
        result = cli(*args)
        assert result.exit_code == 0, result.output
    (root / "teacher.pt").unlink()  # the cache must be enough: no teacher file exists any more
    return {"root": root, "cache": cache, "pools": pools}


def forbid_teacher(monkeypatch):
    """From now on, any attempt to load or run a teacher fails the test."""
    def forbidden(*args, **kwargs):
        raise AssertionError("train-student must not load or run a teacher")
    monkeypatch.setattr("pipeline.models.loading.load_embedder", forbidden)
    monkeypatch.setattr("pipeline.models.loading.Embedder.__call__", forbidden)


@pytest.fixture
def no_teacher(monkeypatch):
    forbid_teacher(monkeypatch)


def test_cli_ekd_global_with_pools(world, pipeline_run, no_teacher, monkeypatch, cli):
    seen = {}

    class SpySampler(BalancedBatchSampler):
        def __init__(self, *args, **kwargs):
            seen["neighbours"] = kwargs["neighbours"]
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sampling, "BalancedBatchSampler", SpySampler)  # the name the sampler factory calls
    out = pipeline_run["root"] / "ekd-global"
    queue = 1000  # larger than every embedding the run produces: the queue then counts them all
    result = cli(*student_args(world, out, "--cache", pipeline_run["cache"], "--pools", pipeline_run["pools"],
                               "--kd", "ekd", "--ekd-mode", "global", "--sampler", "neighbours",
                               "--ekd-queue-size", queue))
    assert result.exit_code == 0, result.output
    assert f"wrote {out / 'model.pt'}" in result.output

    model, meta = load_model(out / "model.pt")
    assert meta["arch"] == "mbf" and meta["arch_kwargs"] == STUDENT_KWARGS
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, STUDENT_KWARGS["num_features"])
    # the neighbours sampler got build-pools' identity neighbours
    np.testing.assert_array_equal(seen["neighbours"], load_pools(pipeline_run["pools"] / "pools.h5")["neighbours"])
    # the EKD loss state saved with the run: build-pools' exact thresholds and every student embedding seen
    ekd_state = safe_torch_load(out / "checkpoint.pt")["extra_modules"][0]
    thresholds = json.loads((pipeline_run["pools"] / "thresholds.json").read_text())
    expected = [thresholds[f"1e-{round(np.log10(a))}"] for a in DEFAULT_ANCHORS]
    np.testing.assert_allclose(ekd_state["teacher_thresholds"].numpy(), expected, rtol=1e-6)
    steps = 2 * (ROWS // GENERAL)  # BalancedBatchSampler: len(labels) // general batches per epoch
    assert int(ekd_state["queue.count"]) == steps * (GENERAL + BALANCED)
    norms = ekd_state["queue.embeddings"][: steps * (GENERAL + BALANCED)].norm(dim=1)
    np.testing.assert_allclose(norms.numpy(), 1.0, atol=1e-5)


def test_cli_kd_none_is_plain_training(world, pipeline_run, no_teacher, cli):
    """`--kd none` needs no cache and trains exactly like `train-teacher --arch mbf` with the same settings."""
    out = pipeline_run["root"] / "no-kd"
    result = cli(*student_args(world, out, "--kd", "none", "--sampler", "random"))
    assert result.exit_code == 0, result.output
    reference_out = pipeline_run["root"] / "plain-mbf"
    result = cli("train-teacher", *training_args(world, reference_out), "--arch", "mbf")
    assert result.exit_code == 0, result.output
    got, _ = load_model(out / "model.pt")
    reference, _ = load_model(reference_out / "model.pt")
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got.state_dict()[key], value, rtol=0, atol=0)


def test_cli_refuses_a_cache_of_another_dataset(world, pipeline_run, no_teacher, cli):
    other = write_gradient_faces(pipeline_run["root"] / "other-data", n=ROWS, classes=CLASSES, seed=5)
    other_fp = open_face_source(other).fingerprint()
    cache_fp = TeacherCache.open(pipeline_run["cache"]).dataset_fingerprint
    assert other_fp != cache_fp
    out = pipeline_run["root"] / "wrong-data"
    args = student_args(world, out, "--cache", pipeline_run["cache"], "--pools", pipeline_run["pools"])
    args[args.index("--data") + 1] = other
    result = cli(*args)
    assert result.exit_code != 0
    assert str(pipeline_run["cache"]) in result.output
    assert other_fp in result.output and cache_fp in result.output
    assert not (out / "model.pt").exists()


def test_cli_refuses_pools_of_another_teacher(world, pipeline_run, monkeypatch, cli):
    """Pools (hence thresholds) built from another teacher's cache of the same data are refused."""
    root = pipeline_run["root"]
    other_teacher = make_teacher(root / "other-teacher.pt", seed=7)
    other_cache, other_pools = root / "other-cache.h5", root / "other-pools"
    for args in (["extract-teacher", "--threads", 1, "--data", world["data"], "--teacher", other_teacher, "--out",
                  other_cache, "--device", "cpu"], ["build-pools", "--cache", other_cache, "--out", other_pools, "--neighbours", 4]):
        assert cli(*args).exit_code == 0
    forbid_teacher(monkeypatch)
    out = root / "wrong-pools"
    result = cli(*student_args(world, out, "--cache", pipeline_run["cache"], "--pools", other_pools,
                               "--kd", "ekd", "--ekd-mode", "global", "--sampler", "neighbours"))
    assert result.exit_code == 2, result.output
    fingerprints = [TeacherCache.open(c).teacher_fingerprint for c in (other_cache, pipeline_run["cache"])]
    assert f"{other_pools / 'pools.h5'}: pools come from another teacher cache" in result.output
    assert all(fp in result.output for fp in fingerprints)
    assert not (out / "model.pt").exists()


@pytest.mark.parametrize("extra, message", [
    (["--kd", "ekd", "--sampler", "random"], "--kd ekd needs --cache"),
    (["--kd", "ekd", "--ekd-mode", "global", "--sampler", "random", "--cache", "CACHE"], "needs --pools"),
    (["--kd", "none", "--sampler", "neighbours"], "--sampler neighbours needs --pools"),
    (["--kd", "adadistill", "--sampler", "random", "--cache", "CACHE", "--pools", "POOLS", "--embedding-size", "16"],
     "32-d, the student's 16-d; --kd adadistill moves the student's class centres"),
    (["--kd", "ekd", "--sampler", "random", "--cache", "CACHE", "--cache-weights", "1,2"], "2 weight(s) for 1 cache"),
    (["--kd", "ekd", "--sampler", "random", "--cache", "MISSING"], "teacher cache not found"),
    (["--kd", "fitnet", "--sampler", "random"], "--kd 'fitnet': 'fitnet' is not a method"),
])
def test_cli_bad_inputs_are_clear_errors(world, pipeline_run, no_teacher, extra, message, cli):
    paths = {"CACHE": pipeline_run["cache"], "POOLS": pipeline_run["pools"], "MISSING": pipeline_run["root"] / "missing.h5"}
    out = pipeline_run["root"] / "refused"
    result = cli(*student_args(world, out, *[paths.get(a, a) for a in extra]))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (out / "model.pt").exists()

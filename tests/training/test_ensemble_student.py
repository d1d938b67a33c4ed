"""Students distilled from an ensemble of teacher caches (`train-student --cache A --cache B`).

1. The step's targets (`EnsembleTargets`) against a direct computation: each member's row of the sample's view,
   L2-normalised, times sqrt(share), concatenated; pair inner products = the weighted mean of member cosines.
2. A feature term through the learned projection equals its formula on the projected student; a similarity term
   sees the raw student.
3. An ensemble of a cache with itself gives that cache's EKD loss and gradient (EKD compares similarities, which
   are the same); another member changes them (a negative control).
4. Through the CLI: a run reads every member; a 32-d + 16-d
   ensemble trains l2+ekd through the projection, which the checkpoint keeps and model.pt does not; a finished
   run is not replaced by a run whose members changed; class-centre KD of another size is one line.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.data import write_gradient_faces
from helpers.teachers import make_spread_teacher

from pipeline.cache.format import TeacherCache
from pipeline.formats.source import open_face_source
from pipeline.losses.registry import build_kd_loss
from pipeline.models.model_file import safe_torch_load
from pipeline.training.distill import Distillation, KDTerm
from pipeline.training.targets import CachedTargets, EnsembleTargets, StudentProjection

ROWS, CLASSES, STUDENT_DIM = 64, 8, 16


def test_ensemble_targets_are_the_weighted_mean_of_member_cosines():
    g = torch.Generator().manual_seed(0)
    tables = [torch.randn(10, 2, 6, generator=g).half(), torch.randn(10, 2, 4, generator=g)]
    weights = np.array([1.0, 3.0])
    lookup = EnsembleTargets(tables, list(weights / weights.sum()))
    indices, flips = torch.tensor([3, 7, 0, 9]), torch.tensor([True, False, False, True])
    got = lookup(None, indices, flips, "cpu").numpy()
    assert got.shape == (4, 10) and lookup.dim == 10
    members = [t.float().numpy()[indices.numpy(), flips.long().numpy()] for t in tables]
    expected_rows = np.concatenate([m / np.linalg.norm(m, axis=1, keepdims=True) * np.sqrt(w / weights.sum())
                                    for m, w in zip(members, weights)], axis=1)
    np.testing.assert_allclose(got, expected_rows, rtol=1e-6, atol=1e-7)
    cosines = [(m @ m.T) / np.outer(np.linalg.norm(m, axis=1), np.linalg.norm(m, axis=1)) for m in members]
    mean_cosine = sum(w * c for w, c in zip(weights, cosines)) / weights.sum()
    np.testing.assert_allclose(got @ got.T, mean_cosine, rtol=1e-5, atol=1e-6)


def test_feature_terms_see_the_projected_student_and_similarity_terms_the_raw_one():
    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, student, teacher, labels):
            seen["student"] = student.detach().clone()
            return student.sum() * 0

    torch.manual_seed(0)
    student, teacher = torch.randn(6, 4, requires_grad=True), torch.randn(6, 10)
    projection = StudentProjection(4, 10)
    distill = Distillation(targets=torch.zeros(1, 1, 10), projection=projection,
                           terms=[KDTerm("l2", build_kd_loss("l2")), KDTerm("similarity", Recorder())])
    l2, _ = distill.term_losses(student, teacher, torch.zeros(6, dtype=torch.long))
    projected = student.detach() @ projection.linear.weight.detach().T
    formula = (F.normalize(projected, dim=1) - F.normalize(teacher, dim=1)).pow(2).sum(dim=1).mean()
    torch.testing.assert_close(l2.detach(), formula, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(seen["student"], student.detach(), rtol=0, atol=0)
    l2.backward()
    assert projection.linear.weight.grad.abs().max() > 0  # the map trains with the student
    assert projection in distill.modules  # so the optimiser, the device move and the checkpoint include it


# ----------------------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def caches(tmp_path_factory, cli):
    """Data and three teacher caches of it (two 32-d teachers, one 16-d), the pools of the 32-d + 16-d ensemble,
    and a cache of another training set; all written by the CLI."""
    root = tmp_path_factory.mktemp("ensemble-students")
    data = write_gradient_faces(root / "data", n=ROWS, classes=CLASSES)
    paths = {}
    source = open_face_source(data)
    for name, seed, dim in (("a", 0, 32), ("b", 5, 32), ("small", 9, 16)):
        teacher = make_spread_teacher(root / f"{name}.pt", source, seed=seed, num_features=dim)
        paths[name] = root / f"{name}.h5"
        result = cli("extract-teacher", "--threads", 1, "--data", data, "--teacher", teacher, "--out",
                     paths[name], "--device", "cpu", "--batch-size", 32)
        assert result.exit_code == 0, result.output
    paths["pools"] = root / "pools-a-small"
    result = cli("build-pools", "--cache", paths["a"], "--cache", paths["small"], "--out", paths["pools"],
                 "--neighbours", 4)
    assert result.exit_code == 0, result.output
    other = write_gradient_faces(root / "other-data", n=ROWS, classes=CLASSES, seed=3)  # another training set
    paths["other"] = root / "other.h5"
    result = cli("extract-teacher", "--threads", 1, "--data", other, "--teacher", root / "a.pt", "--out",
                 paths["other"], "--device", "cpu", "--batch-size", 32)
    assert result.exit_code == 0, result.output
    return {"root": root, "data": data, **paths}


def student(cli, caches, name, *extra):
    out = caches["root"] / name
    result = cli("train-student", "--data", caches["data"], "--out", out, "--name", name, "--width", 0.125,
                 "--embedding-size", STUDENT_DIM, "--epochs", 1, "--batch-size", 8, "--balanced-batch-size", 8,
                 "--per-identity", 4, "--lr", 0.01, "--workers", 0, "--preload", "--device", "cpu",
                 "--sampler", "random", *extra)
    return out, result


def weights(out) -> dict:
    return safe_torch_load(out / "model.pt")["state_dict"]


EKD = ("--kd", "ekd", "--ekd-mode", "reference")


def test_an_ensemble_of_a_cache_with_itself_gives_that_caches_ekd_loss_and_gradient(caches):
    """The cache's own targets and those of the cache twice (any weights) have the same cosines, so EKD (on
    similarities only) gives the same loss and gradient; another member gives another (a negative control)."""
    a, b = (TeacherCache.open(caches[name]) for name in ("a", "b"))
    lookups = {"single": CachedTargets(a.to_torch()),
               "doubled": EnsembleTargets([a.to_torch(), a.to_torch()], [0.25, 0.75]),
               "other": EnsembleTargets([a.to_torch(), b.to_torch()], [0.5, 0.5])}
    g = torch.Generator().manual_seed(0)
    indices, flips = torch.randperm(ROWS, generator=g)[:32], torch.rand(32, generator=g) < 0.5
    student = torch.randn(32, STUDENT_DIM, generator=g)
    labels = torch.as_tensor(a.labels[indices.numpy()])
    results = {}
    for name, lookup in lookups.items():
        embeddings = student.clone().requires_grad_(True)
        loss = build_kd_loss("ekd", mode="reference", momentum=0.0)(embeddings, lookup(None, indices, flips, "cpu"),
                                                                    labels)
        loss.backward()
        results[name] = (loss.detach(), embeddings.grad)
    assert results["single"][0] > 0 and results["single"][1].abs().max() > 0
    torch.testing.assert_close(results["doubled"][0], results["single"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(results["doubled"][1], results["single"][1], rtol=1e-4, atol=1e-7)
    assert (results["other"][1] - results["single"][1]).abs().max() > 1e-3 * results["single"][1].abs().max()


def test_an_ensemble_run_reads_every_member(caches, cli):
    single, result = student(cli, caches, "single", "--cache", caches["a"], *EKD)
    assert result.exit_code == 0, result.output
    other, result = student(cli, caches, "other", "--cache", caches["a"], "--cache", caches["b"], *EKD)
    assert result.exit_code == 0, result.output
    reference = weights(single)
    assert any(not torch.equal(value, weights(other)[key]) for key, value in reference.items())


def test_feature_kd_from_an_ensemble_of_other_sizes_trains_through_the_projection(caches, cli):
    out, result = student(cli, caches, "mixed", "--cache", caches["a"], "--cache", caches["small"],
                          "--kd", "l2+ekd", "--ekd-mode", "reference")
    assert result.exit_code == 0, result.output
    projection = [m for m in safe_torch_load(out / "checkpoint.pt")["extra_modules"] if "linear.weight" in m]
    assert len(projection) == 1 and projection[0]["linear.weight"].shape == (32 + 16, STUDENT_DIM)
    plain, result = student(cli, caches, "plain", "--kd", "none")
    assert result.exit_code == 0, result.output
    assert weights(out).keys() == weights(plain).keys()  # the exported student has no projection

    # the same folder with another member is another run: refused, the finished model kept
    before = (out / "model.pt").read_bytes()
    _, result = student(cli, caches, "mixed", "--cache", caches["b"], "--cache", caches["small"],
                        "--kd", "l2+ekd", "--ekd-mode", "reference")
    assert result.exit_code == 2, result.output
    assert "written with different settings" in result.output and "cache" in result.output
    assert (out / "model.pt").read_bytes() == before


@pytest.mark.parametrize("extra, message", [
    (["--cache", "A", "--cache", "SMALL", "--kd", "adadistill", "--pools", "POOLS"],
     "the teacher's embeddings are 48-d, the student's 16-d; --kd adadistill moves the student's class centres"),
    (["--cache", "A", "--cache", "B", "--cache-weights", "1,0", *EKD], "--cache-weights 1,0: 0 is not a finite"),
    (["--cache", "A", "--cache", "B", "--cache-weights", "2", *EKD], "1 weight(s) for 2 cache(s)"),
    (["--cache", "A", "--cache", "OTHER", *EKD], "are not caches of the same training set"),
])
def test_bad_ensembles_are_one_line(caches, cli, extra, message):
    paths = {"A": caches["a"], "B": caches["b"], "SMALL": caches["small"], "OTHER": caches["other"],
             "POOLS": caches["pools"]}
    out, result = student(cli, caches, "refused", *[paths.get(a, a) for a in extra])
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (out / "model.pt").exists()

"""benchmarks/fidelity.py's figures against direct computations on small embeddings."""
from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from pipeline.formats.recordio import FaceRecordIO

from helpers.benchmarks import benchmark_module
from helpers.data import write_random_faces


@pytest.fixture(scope="module")
def fidelity():
    return benchmark_module("fidelity")


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def embeddings():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(12), 4)
    teacher = unit(rng.normal(size=(12, 16))[labels] + 0.6 * rng.normal(size=(48, 16)))
    student = unit(teacher + 0.4 * rng.normal(size=teacher.shape))
    return teacher, student, labels


def test_figures_match_a_direct_computation(fidelity, embeddings):
    teacher, student, labels = embeddings
    subset = np.array([0, 1, 2, 5, 9, 13, 17, 22, 30, 41, 47])
    got = fidelity.figures(student, teacher, labels, subset)
    assert got["cos_to_teacher"] == pytest.approx(np.mean([s @ t for s, t in zip(student, teacher)]), abs=1e-6)
    negatives = [(i, j) for i, j in combinations(subset, 2) if labels[i] != labels[j]]
    s = np.array([student[i] @ student[j] for i, j in negatives])
    t = np.array([teacher[i] @ teacher[j] for i, j in negatives])
    corr = np.sum((s - s.mean()) * (t - t.mean())) / np.sqrt(np.sum((s - s.mean()) ** 2) * np.sum((t - t.mean()) ** 2))
    assert got["pair_corr"] == pytest.approx(corr, abs=1e-6)
    assert got["pair_mae"] == pytest.approx(np.mean(np.abs(s - t)), abs=1e-6)


def test_a_rotated_teacher_has_its_similarity_structure_but_not_its_features(fidelity, embeddings):
    teacher, _, labels = embeddings
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(16, 16)))
    rotated = (teacher @ rotation).astype(np.float32)
    subset = np.arange(len(labels))
    same = fidelity.figures(teacher, teacher, labels, subset)
    turned = fidelity.figures(rotated, teacher, labels, subset)
    assert same["cos_to_teacher"] == pytest.approx(1.0, abs=1e-6) and same["pair_mae"] == pytest.approx(0, abs=1e-6)
    assert turned["pair_corr"] == pytest.approx(1.0, abs=1e-5) and turned["pair_mae"] == pytest.approx(0, abs=1e-5)
    assert turned["cos_to_teacher"] < 0.5
    assert turned["tpr@1e-4"] == pytest.approx(same["tpr@1e-4"])


def test_a_training_subset_keeps_each_image_with_its_label(fidelity, tmp_path):
    write_random_faces(tmp_path, classes=6, per_class=4)
    records = FaceRecordIO(tmp_path / "train.rec", require_property=False)
    everything = fidelity.Images(tmp_path / "train.rec", None, np.random.default_rng(0))
    assert len(everything) == 24 and np.array_equal(everything.labels, np.asarray(records.labels).reshape(-1))
    subset = fidelity.Images(tmp_path / "train.rec", 7, np.random.default_rng(0))
    assert len(subset) == 7 and len(set(subset.rows.tolist())) == 7
    for i, row in enumerate(subset.rows):
        assert subset.labels[i] == records.labels[row]
        assert np.array_equal(subset[i], records.decode(int(row)))
